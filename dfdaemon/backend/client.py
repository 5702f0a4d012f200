"""The daemon's one HTTP client stack (aiohttp): pooled sessions whose every connection obeys the source policy.

Requests from the network and local ones never share a pool or a resolver: a connection opened for a local request
may lead to an internal address a network request must not reach. Redirects are followed here, hop by hop, so each
hop's scheme and host pass the policy before its connection is opened; the resolver checks the addresses.

A forward proxy named by ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` (read once, at start; ``NO_PROXY`` lists
the hosts reached directly) carries the requests it covers, as upstream's client does. The proxy is the operator's
choice and its address is not checked; the origin is: its scheme and name pass the policy, and where addresses
matter (a request from the network, or ``allowedNetworks`` set) the name is resolved here and refused if any address
is outside the policy, before the request reaches the proxy. The proxy resolves the name again itself, so through a
proxy the check is as good as the proxy's DNS agrees with this host's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict
from yarl import URL

from dfdaemon.backend.policy import SUPPORTED_SCHEMES, BackendError, PolicyResolver, SourcePolicy

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 20
# The default headers aiohttp would add; a pass-through sends only what its client sent.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")
# A bigger read buffer than aiohttp's 64 KiB: fewer wake-ups per byte on large bodies.
_READ_BUFFER = 256 * 1024


class OriginClient:
    """Pooled HTTP sessions for fetching from origins and registries, one per kind of requester."""

    def __init__(
        self,
        policy: SourcePolicy | None,
        *,
        timeout: float,
        pass_through: bool = False,
        resolver: AbstractResolver | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        """``proxies`` maps a scheme (and ``no``) as ``urllib.request.getproxies`` does; None reads the environment."""
        self.policy = policy
        self.pass_through = pass_through
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout)
        self._resolver = resolver
        self._proxies = dict(urllib.request.getproxies_environment() if proxies is None else proxies)
        self._sessions: dict[tuple[bool, bool], aiohttp.ClientSession] = {}
        self._resolvers: list[AbstractResolver] = []

    def proxy_for(self, url: URL) -> URL | None:
        """The forward proxy a request for ``url`` goes through, or None to connect to the origin directly."""
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        if not proxy or _bypasses_proxy(url.raw_host or "", self._proxies.get("no", "")):
            return None
        return URL(proxy if "://" in proxy else f"http://{proxy}")

    def _session(self, from_network: bool, proxied: bool) -> aiohttp.ClientSession:
        """One pool per kind of requester; proxied connections go to the proxy, whose address is not checked."""
        session = self._sessions.get((from_network, proxied))
        if session is None or session.closed:
            resolver: AbstractResolver | None = self._resolver
            if self.policy is not None and not proxied:
                resolver = PolicyResolver(self.policy, from_network=from_network, resolver=self._resolver)
                self._resolvers.append(resolver)
            connector = aiohttp.TCPConnector(limit=256, use_dns_cache=False, resolver=resolver)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,  # bytes pass as the server sent them
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # requests of different users share nothing
                skip_auto_headers=_AUTO_HEADERS if self.pass_through else (),
                read_bufsize=_READ_BUFFER,
            )
            self._sessions[from_network, proxied] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
        resolvers, self._resolvers = self._resolvers, []
        for resolver in resolvers:
            await resolver.close()

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]],
        *,
        from_network: bool,
        follow_redirects: bool,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request (following redirects when asked) and yield the final response, released on exit.

        A response whose body was not read to its end closes its connection instead of returning it to the pool.
        """
        target, send = URL(url), CIMultiDict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            proxy = self.proxy_for(target)
            if self.policy is not None and proxy is not None:
                await self.policy.check(str(target), from_network=from_network, resolver=self._resolver)
            elif self.policy is not None:
                self.policy.check_hop(target, from_network=from_network)
            session = self._session(from_network, proxy is not None)
            response = await session.request(method, target, headers=send, allow_redirects=False, proxy=proxy)
            location = response.headers.get("Location")
            if not follow_redirects or response.status not in _REDIRECTS or location is None:
                try:
                    yield response
                finally:
                    response.release()
                return
            response.release()
            target, method = _next_hop(target, location, method, response.status, send)
        raise BackendError(f"origin redirected more than {MAX_REDIRECTS} times for {url}")


def _bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (``*``, domains matching their subdomains too, addresses, CIDR blocks) covers ``host``."""
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (part.strip().lower() for part in no_proxy.split(",")):
        if entry == "*":
            return True
        if address is not None:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
        domain = entry.lstrip(".").rsplit(":", 1)[0] if entry.count(":") == 1 else entry.lstrip(".")
        if domain and (host == domain or host.endswith(f".{domain}")):
            return True
    return False


def _next_hop(current: URL, location: str, method: str, status: int, headers: CIMultiDict[str]) -> tuple[URL, str]:
    """Where a redirect leads, and with which method; credentials never follow to another origin."""
    try:
        target = current.join(URL(location))
        usable = target.scheme in SUPPORTED_SCHEMES and bool(target.host)  # an IDNA name may fail to decode here
    except (ValueError, UnicodeError):
        raise BackendError(f"origin redirected to a malformed URL {location[:200]!r}", status) from None
    if not usable:
        raise BackendError(f"origin redirected to {location[:200]!r}, which is not an http(s) URL", status)
    if target.origin() != current.origin():
        headers.popall("Authorization", None)
    return target, "GET" if status == 303 and method != "HEAD" else method
