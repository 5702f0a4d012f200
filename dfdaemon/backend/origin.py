"""Origin (back-to-source) access over HTTP(S): length and headers, then byte ranges streamed as they arrive.

Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential backoff; the
origin's own answers (404, 403, ...) are not, and surface as ``BackendError`` carrying the status code
and headers so clients can say "origin answered 404".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDictProxy

from dfdaemon.backend.client import OriginClient
from dfdaemon.backend.direct import DirectBody, take_over
from dfdaemon.backend.policy import BackendError, SourcePolicy

log = logging.getLogger("dfdaemon.backend")

T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# Headers that describe one HTTP exchange, not the content; never recorded as the task's response headers.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-range", "date", "server", "content-length"}


@dataclass(frozen=True)
class OriginInfo:
    content_length: int
    headers: dict[str, str] = field(default_factory=dict)
    # Whether the origin answers a Range with 206; one that does not sends the whole body for any request.
    accepts_ranges: bool = True


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0


def header_text(value: str) -> str:
    """A received header value as text: UTF-8 where it is, else each byte as Latin-1 (never a lone surrogate)."""
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")
    return value


def _header_dict(headers: CIMultiDictProxy[str], *, content_only: bool = False) -> dict[str, str]:
    """Headers by lower-case name, repeated ones joined with ", " (one value per name, as gRPC maps carry)."""
    joined: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if content_only and key in _HOP_HEADERS:
            continue
        text = header_text(value)
        joined[key] = f"{joined[key]}, {text}" if key in joined else text
    return joined


def _error_from(response: aiohttp.ClientResponse, url: str) -> BackendError:
    """An origin's refusal: ``message`` says what and where, ``str()`` adds the status for gRPC details."""
    reason = response.reason or "error"
    error = BackendError(f"{reason}: {url}", response.status, _header_dict(response.headers))
    error.args = (f"origin answered {response.status} {reason} for {url}",)
    return error


class Backend:
    """One pooled HTTP client for every back-to-source request of the daemon."""

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        policy: SourcePolicy | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.policy = policy
        self.timeout = timeout
        self.client = OriginClient(policy, timeout=timeout, resolver=resolver)

    async def close(self) -> None:
        await self.client.close()

    async def _retrying(self, what: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        delay = self.retry.initial_backoff
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return await attempt_once()
            except (aiohttp.ClientError, TimeoutError, _Transient) as exc:
                if attempt == self.retry.attempts:
                    if isinstance(exc, _Transient):
                        raise exc.error from None
                    raise BackendError(f"{what}: {type(exc).__name__}: {exc or 'no answer'}") from None
                log.info("%s failed (%s), retrying in %.1fs", what, exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry.max_backoff)
        raise AssertionError("unreachable")

    def _request(
        self, method: str, url: str, headers: Mapping[str, str], from_network: bool, **extra: str
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        send = [*headers.items(), *extra.items(), ("Accept-Encoding", "identity")]
        return self.client.request(method, url, send, from_network=from_network, follow_redirects=True)

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
            async with self._request("GET", url, headers, from_network, Range="bytes=0-0") as response:
                return _stat_answer(response, url)

        return await self._retrying(f"stat {url}", once)

    async def _head(self, url: str, headers: Mapping[str, str], from_network: bool) -> OriginInfo | None:
        """The length from a HEAD, when the origin gives one and serves ranges; None means ask with a GET."""
        try:
            async with self._request("HEAD", url, headers, from_network) as response:
                status, answer = response.status, response.headers
        except (aiohttp.ClientError, TimeoutError, BackendError):
            return None  # the GET that follows reports the origin's trouble, with retries
        length = answer.get("Content-Length", "")
        if status != 200 or not length.isascii() or not length.isdigit():
            return None
        if answer.get("Accept-Ranges", "").strip().lower() != "bytes":
            return None
        return OriginInfo(int(length), _header_dict(answer, content_only=True))

    @contextlib.asynccontextmanager
    async def open_range(
        self, url: str, headers: Mapping[str, str], start: int, length: int, *, from_network: bool = False
    ) -> AsyncIterator[RangeBody]:
        """Open ``length`` bytes at ``start`` and yield them as they arrive (connection retried before any byte).

        An origin that ignores ranges answers with its whole body; the bytes before ``start`` are then skipped.
        A range read to its end through aiohttp leaves its connection in the pool for the next one.
        """
        asked = f"bytes={start}-{start + length - 1}"

        async def once() -> tuple[aiohttp.ClientResponse, contextlib.AsyncExitStack]:
            stack = contextlib.AsyncExitStack()
            response = await stack.enter_async_context(self._request("GET", url, headers, from_network, Range=asked))
            try:
                _check_range_answer(response, url, start, length)
            except BaseException:
                await stack.aclose()
                raise
            return response, stack

        response, stack = await self._retrying(f"range {start}+{length} of {url}", once)
        body = RangeBody(response, start if response.status == 200 else 0, length, url, self.timeout)
        async with stack:
            try:
                yield body
            finally:
                body.finish()


class RangeBody:
    """The bytes of an opened range: iterated as aiohttp delivers them, or taken over by a worker thread."""

    def __init__(self, response: aiohttp.ClientResponse, skip: int, length: int, url: str, timeout: float) -> None:
        self._response = response
        self._skip = skip
        self._length = length
        self._url = url
        self._timeout = timeout
        self._direct: DirectBody | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _limited(self._response, self._skip, self._length, self._url)

    def direct(self) -> DirectBody | None:
        """The body for a worker thread to read from the socket (see ``dfdaemon.backend.direct``), when it can be;
        then it must not be iterated."""
        self._direct = take_over(self._response, self._skip, self._length, self._url, self._timeout)
        return self._direct

    def finish(self) -> None:
        """A body taken over ends its socket; its connection is closed, never pooled."""
        if self._direct is not None:
            self._direct.end()
            self._response.close()


def _stat_answer(response: aiohttp.ClientResponse, url: str) -> OriginInfo:
    """The length and headers a one-byte ranged GET tells; errors for answers that tell neither."""
    if response.status in _TRANSIENT_STATUS:
        raise _Transient(_error_from(response, url))
    headers = _header_dict(response.headers)
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or match.group(3) == "*":
            raise BackendError(f"origin sent no usable Content-Range for {url}", 206, headers)
        return OriginInfo(int(match.group(3)), _header_dict(response.headers, content_only=True))
    if response.status == 416:
        return OriginInfo(0, _header_dict(response.headers, content_only=True))  # an empty file has no byte 0
    if response.status == 200:
        length = response.headers.get("Content-Length")
        if length is None:
            raise BackendError(f"origin gave no length for {url} and ignores Range", 200, headers)
        return OriginInfo(int(length), _header_dict(response.headers, content_only=True), accepts_ranges=False)
    raise _error_from(response, url)


def _check_range_answer(response: aiohttp.ClientResponse, url: str, start: int, length: int) -> None:
    """Accept a 206 for exactly the asked range, or a whole-body 200 (an origin that ignores ranges)."""
    if response.status == 206:
        expected = f"bytes {start}-{start + length - 1}/"
        if not response.headers.get("Content-Range", "").startswith(expected):
            raise BackendError(
                f"origin answered range {response.headers.get('Content-Range')!r} for {expected}… of {url}",
                206,
                _header_dict(response.headers),
            )
        return
    if response.status == 200:
        return
    error = _error_from(response, url)
    if response.status in _TRANSIENT_STATUS:
        raise _Transient(error)
    raise error


async def _limited(response: aiohttp.ClientResponse, skip: int, length: int, url: str) -> AsyncIterator[bytes]:
    """Exactly ``length`` bytes of the body after its first ``skip`` bytes, as the connection delivers them."""
    remaining = length
    try:
        # iter_chunks, not iter_any: iter_any joins (copies) every chunk waiting in the buffer; iter_chunks joins
        # at most up to an HTTP chunk's end, and hands an empty one at each end of a chunked body's chunk.
        async for chunk, _ in response.content.iter_chunks():
            if not chunk:
                continue
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            if len(chunk) >= remaining:
                yield chunk[:remaining]
                return
            remaining -= len(chunk)
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise BackendError(f"origin connection broke after {length - remaining} of {length} bytes: {detail}") from None
    if remaining:
        raise BackendError(f"origin sent {length - remaining} of {length} bytes of a range of {url}")


class _Transient(Exception):
    """An origin answer worth retrying (5xx, 429, 408); carries the error to report if retries run out."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(error.message)
        self.error = error
