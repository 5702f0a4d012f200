"""Origin (back-to-source) access over HTTP(S): length and headers, then byte ranges streamed per piece.

Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential backoff; the
origin's own answers (404, 403, ...) are not, and surface as ``BackendError`` carrying the status code
and headers so clients can say "origin answered 404".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("dfdaemon.backend")

T = TypeVar("T")

SUPPORTED_SCHEMES = ("http", "https")
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# Headers that describe one HTTP exchange, not the content; never recorded as the task's response headers.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-range", "date", "server", "content-length"}


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

    async def check(self, url: str, *, from_network: bool) -> None:
        """Refuse an origin outside the policy; requests from the network never reach internal addresses."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        if scheme not in self.allowed_schemes:
            raise SourceNotAllowed(f"back to source over {scheme!r} is not allowed (download.backToSource)")
        if not self._host_allowed(host):
            raise SourceNotAllowed(f"back to source from host {host!r} is not allowed (download.backToSource)")
        if not self.allowed_networks and not from_network:
            return
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise BackendError(f"cannot resolve origin host {host!r}: {exc.strerror or exc}") from None
        networks = [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            allowed = any(address in network for network in networks) if networks else address.is_global
            if not allowed:
                raise SourceNotAllowed(
                    f"back to source to {address} ({host}) is not allowed"
                    + ("" if networks else " from a network request: it is not a public address")
                )


@dataclass(frozen=True)
class OriginInfo:
    content_length: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0


def check_url(url: str) -> None:
    """Reject what the origin client cannot fetch, before any work starts."""
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: it contains spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: {exc}") from None
    if parts.scheme.lower() not in SUPPORTED_SCHEMES:
        raise UnsupportedURL(f"unsupported URL scheme {parts.scheme[:20]!r} in {url[:200]!r} (use http or https)")
    if not parts.hostname:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: it has no host")
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UnsupportedURL(f"malformed URL {url[:200]!r}: {exc}") from None


def _content_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}


def _error_from(response: httpx.Response, url: str) -> BackendError:
    """An origin's refusal: ``message`` says what and where, ``str()`` adds the status for gRPC details."""
    reason = response.reason_phrase or "error"
    error = BackendError(f"{reason}: {url}", response.status_code, dict(response.headers))
    error.args = (f"origin answered {response.status_code} {reason} for {url}",)
    return error


class Backend:
    """One pooled HTTP client for every back-to-source request of the daemon."""

    def __init__(
        self, *, timeout: float = 60.0, retry: RetryPolicy | None = None, policy: SourcePolicy | None = None
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.policy = policy
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            event_hooks={"request": [self._check_redirect]},
        )

    async def _check_redirect(self, request: httpx.Request) -> None:
        """A redirect leads to a new origin: each hop must pass the policy the requested URL passed."""
        asked = request.extensions.get(_ASKED_URL)
        if self.policy is None or asked is None or str(request.url) == asked:
            return
        await self.policy.check(str(request.url), from_network=bool(request.extensions.get(_FROM_NETWORK)))

    async def close(self) -> None:
        await self._client.aclose()

    async def _retrying(self, what: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        delay = self.retry.initial_backoff
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return await attempt_once()
            except (httpx.TransportError, _Transient) as exc:
                if attempt == self.retry.attempts:
                    if isinstance(exc, _Transient):
                        raise exc.error from None
                    raise BackendError(f"{what}: {type(exc).__name__}: {exc or 'no answer'}") from None
                log.info("%s failed (%s), retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry.max_backoff)
        raise AssertionError("unreachable")

    async def stat(self, url: str, headers: Mapping[str, str], *, from_network: bool = False) -> OriginInfo:
        """Length and headers of the origin's content.

        A HEAD first, as upstream asks: it moves no content, so a peer that takes every piece from other peers
        costs the origin nothing. An origin whose HEAD gives no length, or does not say it serves ranges, gets a
        one-byte ranged GET, which every range server answers.
        """
        head = await self._head(url, headers, from_network)
        if head is not None:
            return head

        async def once() -> OriginInfo:
            request_headers = {**headers, "Range": "bytes=0-0", "Accept-Encoding": "identity"}
            extensions = _asked(url, from_network)
            async with self._client.stream("GET", url, headers=request_headers, extensions=extensions) as response:
                if response.status_code in _TRANSIENT_STATUS:
                    raise _Transient(_error_from(response, url))
                if response.status_code == 206:
                    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                    if match is None or match.group(3) == "*":
                        raise BackendError(f"origin sent no usable Content-Range for {url}", 206, response.headers)
                    return OriginInfo(int(match.group(3)), _content_headers(response))
                if response.status_code == 416:
                    return OriginInfo(0, _content_headers(response))  # an empty file has no byte 0
                if response.status_code == 200:
                    length = response.headers.get("content-length")
                    if length is None:
                        raise BackendError(f"origin gave no length for {url} and ignores Range", 200, response.headers)
                    return OriginInfo(int(length), _content_headers(response))
                raise _error_from(response, url)

        return await self._retrying(f"stat {url}", once)

    async def _head(self, url: str, headers: Mapping[str, str], from_network: bool) -> OriginInfo | None:
        """The length from a HEAD, when the origin gives one and serves ranges; None means ask with a GET."""
        try:
            response = await self._client.head(
                url, headers={**headers, "Accept-Encoding": "identity"}, extensions=_asked(url, from_network)
            )
        except httpx.HTTPError:
            return None  # the GET that follows reports the origin's trouble, with retries
        length = response.headers.get("content-length", "")
        if response.status_code != 200 or not length.isascii() or not length.isdigit():
            return None
        if response.headers.get("accept-ranges", "").strip().lower() != "bytes":
            return None
        return OriginInfo(int(length), _content_headers(response))

    @contextlib.asynccontextmanager
    async def open_range(
        self, url: str, headers: Mapping[str, str], start: int, length: int, *, from_network: bool = False
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open ``length`` bytes at ``start`` and yield a stream of chunks (connection retried before any byte)."""

        async def once() -> httpx.Response:
            request_headers = {
                **headers,
                "Range": f"bytes={start}-{start + length - 1}",
                "Accept-Encoding": "identity",
            }
            request = self._client.build_request(
                "GET", url, headers=request_headers, extensions=_asked(url, from_network)
            )
            response = await self._client.send(request, stream=True)
            if response.status_code == 206:
                expected = f"bytes {start}-{start + length - 1}/"
                if not response.headers.get("content-range", "").startswith(expected):
                    await response.aclose()
                    raise BackendError(
                        f"origin answered range {response.headers.get('content-range')!r} for {expected}… of {url}",
                        206,
                        response.headers,
                    )
                return response
            if response.status_code == 200 and start == 0:
                return response
            await response.aclose()
            error = _error_from(response, url)
            if response.status_code in _TRANSIENT_STATUS:
                raise _Transient(error)
            raise error

        response = await self._retrying(f"range {start}+{length} of {url}", once)
        try:
            yield _limited(response, length, url)
        finally:
            await response.aclose()


# Request extensions that follow a request through its redirects: the URL asked for, and who asked.
_ASKED_URL = "dfdaemon.asked_url"
_FROM_NETWORK = "dfdaemon.from_network"


def _asked(url: str, from_network: bool) -> dict[str, object]:
    return {_ASKED_URL: url, _FROM_NETWORK: from_network}


async def _limited(response: httpx.Response, length: int, url: str) -> AsyncIterator[bytes]:
    """Exactly ``length`` bytes from the body (a 200 answer to a range request is cut short)."""
    remaining = length
    try:
        async for chunk in response.aiter_raw(256 * 1024):
            if len(chunk) >= remaining:
                yield chunk[:remaining]
                return
            remaining -= len(chunk)
            yield chunk
    except httpx.TransportError as exc:
        raise BackendError(f"origin connection broke after {length - remaining} of {length} bytes: {exc}") from None
    if remaining:
        raise BackendError(f"origin sent {length - remaining} of {length} bytes of a range of {url}")


class _Transient(Exception):
    """An origin answer worth retrying (5xx, 429, 408); carries the error to report if retries run out."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(error.message)
        self.error = error
