"""Which origins the daemon may fetch from (``download.backToSource``), and which URLs it can fetch at all.

The policy is applied twice: to the URL before any work starts (a clear early refusal), and to every address a
host name resolves to when a connection is opened (:class:`PolicyResolver`), so a name that resolves differently
the second time (DNS rebinding) still cannot reach a forbidden address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

SUPPORTED_SCHEMES = ("http", "https")
# A host name as it goes on the wire (IDNA names in their xn-- form).
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


class BackendError(Exception):
    """The origin failed or refused; ``status_code`` is None when no HTTP answer arrived."""

    def __init__(self, message: str, status_code: int | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.headers = dict(headers or {})


class UnsupportedURL(ValueError):
    """The URL is malformed or uses a scheme this daemon cannot fetch."""


class SourceNotAllowed(Exception):
    """Back-to-source policy forbids this origin (PERMISSION_DENIED)."""


def parse_url(url: str) -> URL:
    """The URL as the HTTP client will send it; ``UnsupportedURL`` for what it cannot fetch."""
    if not url.isprintable() or " " in url:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: it contains spaces, control or invisible characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: {exc}") from None
    if parts.scheme.lower() not in SUPPORTED_SCHEMES:
        raise UnsupportedURL(f"unsupported URL scheme {parts.scheme[:20]!r} in {url[:200]!r} (use http or https)")
    if not parts.hostname:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: it has no host")
    try:
        parsed = URL(url)
        host = parsed.host  # decoding an IDNA name may fail only here
    except (ValueError, UnicodeError) as exc:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: {str(exc)[:200]}") from None
    if not host:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: it has no host")
    if not (_HOST_NAME.fullmatch(parsed.raw_host or "") or _is_address(parsed.raw_host or "")):
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: {host[:100]!r} is not a host name or address")
    return parsed


def check_url(url: str) -> None:
    """Reject what the origin client cannot fetch, before any work starts."""
    parse_url(url)


@dataclass(frozen=True)
class SourcePolicy:
    """Which origins the daemon may fetch from; see ``download.backToSource`` in the configuration."""

    allowed_schemes: tuple[str, ...] = SUPPORTED_SCHEMES
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()

    def _host_allowed(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        return any(
            host == allowed or (allowed.startswith(".") and (host.endswith(allowed) or host == allowed[1:]))
            for allowed in (entry.lower() for entry in self.allowed_hosts)
        )

    def limits_addresses(self, from_network: bool) -> bool:
        """Whether the resolved addresses matter at all for a request from here."""
        return bool(self.allowed_networks) or from_network

    def check_address(self, address: str, host: str, *, from_network: bool) -> None:
        """Refuse an address outside the allowed networks; from the network, any address that is not public."""
        if not self.limits_addresses(from_network):
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        networks = [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]
        allowed = any(ip in network for network in networks) if networks else ip.is_global
        if not allowed:
            raise SourceNotAllowed(
                f"back to source to {ip} ({host}) is not allowed"
                + ("" if networks else " from a network request: it is not a public address")
            )

    def check_hop(self, url: URL, *, from_network: bool) -> None:
        """Refuse a scheme, host name or literal address outside the policy; names are checked when resolved."""
        scheme, host = url.scheme.lower(), (url.host or "").lower()
        if scheme not in self.allowed_schemes:
            raise SourceNotAllowed(f"back to source over {scheme!r} is not allowed (download.backToSource)")
        if not self._host_allowed(host):
            raise SourceNotAllowed(f"back to source from host {host!r} is not allowed (download.backToSource)")
        if _is_address(url.raw_host or ""):  # the client connects to a literal address without resolving it
            self.check_address(url.raw_host or "", host, from_network=from_network)

    async def check(self, url: str, *, from_network: bool, resolver: AbstractResolver | None = None) -> None:
        """Refuse an origin outside the policy; requests from the network never reach internal addresses.

        Resolving here gives an early, clear refusal; every connection is checked again when it is opened.
        """
        parsed = parse_url(url)
        self.check_hop(parsed, from_network=from_network)
        if not self.limits_addresses(from_network) or _is_address(parsed.raw_host or ""):
            return
        checking = PolicyResolver(self, from_network=from_network, resolver=resolver)
        try:
            await checking.resolve(parsed.raw_host or "", parsed.port or 0, socket.AF_UNSPEC)
        except OSError as exc:
            raise BackendError(f"cannot resolve origin host {parsed.host!r}: {exc.strerror or exc}") from None
        finally:
            await checking.close()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class PolicyResolver(AbstractResolver):
    """Resolves host names for the HTTP client and refuses any name with an address the policy forbids.

    Used by every connection the client opens, redirects included, so the address connected to is the one checked.
    """

    def __init__(self, policy: SourcePolicy, *, from_network: bool, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.from_network = from_network
        self._owned = resolver is None
        self._resolver = resolver if resolver is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            results = await self._resolver.resolve(host, port, family)
        except UnicodeError as exc:  # a name the IDNA codec refuses (an empty or over-long label) resolves to nothing
            raise OSError(f"cannot resolve host {host!r}: {exc}") from None
        for result in results:
            self.policy.check_address(result["host"], host, from_network=self.from_network)
        return results

    async def close(self) -> None:
        if self._owned:
            await self._resolver.close()
