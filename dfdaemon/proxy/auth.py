"""``proxy.server.basicAuth``: the credentials every forward-proxy request, CONNECT included, must carry.

A client names them the way HTTP proxies are asked (``Proxy-Authorization: Basic``, which ``curl -U`` and a
``HTTP_PROXY`` of ``http://user:pass@host:port`` send); ``Authorization: Basic``, which is where upstream looks, is
accepted too, and then goes no further (it is the proxy's, not the origin's). A request without them gets ``407
Proxy Authentication Required`` with ``Proxy-Authenticate``, so a client knows to ask for them (upstream answers 401
and does not guard CONNECT). Registry mirror requests are not guarded, as upstream's are not: a runtime cannot send
proxy credentials to a mirror.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

CHALLENGE = 'Basic realm="dfdaemon proxy"'
_HEADERS = ("proxy-authorization", "authorization")


@dataclass(frozen=True)
class ProxyCredentials:
    username: str
    password: str

    def carrier(self, headers: Mapping[str, str]) -> str | None:
        """The header (``proxy-authorization`` or ``authorization``; ``headers`` has lower-case names) that carries
        these credentials; None when neither does."""
        return next((name for name in _HEADERS if name in headers and self._matches(headers[name])), None)

    def _matches(self, value: str) -> bool:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        username, colon, password = decoded.partition(b":")
        # Both compared whatever the first says, in time independent of where they differ.
        same_user = hmac.compare_digest(username, self.username.encode())
        same_password = hmac.compare_digest(password, self.password.encode())
        return bool(colon) and same_user and same_password


def refusal(headers: Mapping[str, str]) -> str:
    """What a client whose request carries no valid credentials is told (``headers`` with lower-case names)."""
    if any(name in headers for name in _HEADERS):
        return "the proxy credentials are not valid"
    return "this proxy needs credentials (Proxy-Authorization: Basic)"
