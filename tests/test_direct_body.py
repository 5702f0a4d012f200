"""A range's body read by a worker thread straight from its socket, against a loopback aiohttp origin.

The origin counts its connections and can ignore ranges, answer chunked, cut the connection after some bytes, or
fall silent after some bytes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from dfdaemon.backend import Backend, BackendError, RetryPolicy
from dfdaemon.backend.direct import DirectBody
from tests.storage_support import seeded_bytes
from tests.support import serving

BODY = seeded_bytes("test_direct_body", 3 * 1024 * 1024 + 4321)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Origin:
    ranges: bool = True
    chunked: bool = False
    cut_at: int | None = None  # body bytes sent before the connection is dropped
    silent_at: int | None = None  # body bytes sent before the origin stops sending (connection kept open)
    connections: set[object] = field(default_factory=set)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.connections.add(request.transport)
        start, end = 0, len(BODY)
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if match is not None and self.ranges:
            start, end = int(match.group(1)), int(match.group(2)) + 1
        ranged = start > 0 or end < len(BODY)
        response = web.StreamResponse(status=206 if ranged else 200)
        if ranged:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(BODY)}"
        if self.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = end - start
        await response.prepare(request)
        stop = end if self.cut_at is None and self.silent_at is None else start + (self.cut_at or self.silent_at or 0)
        for offset in range(start, stop, 64 * 1024):
            await response.write(BODY[offset : min(offset + 64 * 1024, stop)])
        if self.cut_at is not None:
            assert request.transport is not None
            request.transport.abort()
        elif self.silent_at is not None:
            await asyncio.sleep(60)
        else:
            await response.write_eof()
        return response


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    served = Origin()
    app = web.Application()
    app.router.add_get("/blob", served.handle)
    async with serving(app, shutdown_timeout=0.1) as port:  # a silent origin's handler is still sleeping
        served.url = f"http://127.0.0.1:{port}/blob"
        yield served


def read_all(body: DirectBody, block: int = 100_000) -> bytes:
    """In a worker thread: the whole body, block by block."""
    target = memoryview(bytearray(block))
    parts = []
    while body.received < body.length:
        count = body.read_into(target)
        parts.append(bytes(target[:count]))
    return b"".join(parts)


async def fetch_range(backend: Backend, url: str, start: int, length: int) -> bytes:
    async with backend.open_range(url, {}, start, length) as body:
        direct = body.direct()
        assert direct is not None
        return await asyncio.to_thread(read_all, direct)


async def test_a_plain_body_is_read_by_a_thread_byte_exact_and_its_connection_is_not_reused(origin: Origin) -> None:
    backend = Backend()
    try:
        first = await fetch_range(backend, origin.url, 1000, 2 * 1024 * 1024)
        second = await fetch_range(backend, origin.url, 0, len(BODY))
    finally:
        await backend.close()
    assert first == BODY[1000 : 1000 + 2 * 1024 * 1024]
    assert second == BODY
    assert len(origin.connections) == 2  # aiohttp no longer knows where the first stood: it was closed


async def test_an_origin_that_ignores_ranges_has_the_bytes_before_the_range_dropped(origin: Origin) -> None:
    origin.ranges = False
    backend = Backend()
    try:
        data = await fetch_range(backend, origin.url, 1024 * 1024 + 3, 777_777)
    finally:
        await backend.close()
    assert data == BODY[1024 * 1024 + 3 : 1024 * 1024 + 3 + 777_777]


async def test_a_chunked_body_is_not_taken_over_and_still_reads_through_aiohttp(origin: Origin) -> None:
    origin.chunked = True
    backend = Backend()
    try:
        async with backend.open_range(origin.url, {}, 5, 100_000) as body:
            assert body.direct() is None
            data = b"".join([chunk async for chunk in body])
    finally:
        await backend.close()
    assert data == BODY[5:100_005]


@pytest.mark.parametrize(
    ("cut_at", "silent_at", "error"),
    [
        (300_000, None, r"broke after 300000 of \d+ bytes: "),  # closed or reset, as the kernel tells it
        (None, 200_000, r"broke after 200000 of \d+ bytes: nothing received for 0\.5s"),
    ],
    ids=["cut", "silent"],
)
async def test_a_read_that_breaks_says_how_far_it_got(
    origin: Origin, cut_at: int | None, silent_at: int | None, error: str
) -> None:
    origin.cut_at, origin.silent_at = cut_at, silent_at
    backend = Backend(timeout=0.5, retry=RetryPolicy(attempts=1))
    try:
        with pytest.raises(BackendError, match=error):
            await fetch_range(backend, origin.url, 0, len(BODY))
    finally:
        await backend.close()


async def test_ending_the_body_fails_a_blocked_read_at_once(origin: Origin) -> None:
    origin.silent_at = 100_000
    backend = Backend(timeout=60)
    try:
        async with backend.open_range(origin.url, {}, 0, len(BODY)) as body:
            direct = body.direct()
            assert direct is not None
            first = memoryview(bytearray(100_000))
            assert await asyncio.to_thread(direct.read_into, first) == 100_000  # all the origin sends
            reading = asyncio.ensure_future(asyncio.to_thread(direct.read_into, memoryview(bytearray(10))))
            await asyncio.sleep(0.2)  # the thread blocks on the silent origin (if not yet, it finds the body ended)
            direct.end()
            with pytest.raises(BackendError, match=r"broke after 100000|given up"):
                await asyncio.wait_for(reading, 10)  # far less than the 60 s read timeout
            with pytest.raises(BackendError, match="given up"):
                direct.read_into(memoryview(bytearray(10)))
    finally:
        await backend.close()
