"""The vortex client against an in-process vortex server: pieces in pooled buffers, held within a memory budget."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

import pytest

from dfdaemon import ids
from dfdaemon.storage import Storage
from dfdaemon.vortex.client import VortexClient
from dfdaemon.vortex.server import VortexServer
from tests.storage_support import fill, payload

PIECE = 64 * 1024


@pytest.fixture
async def served(storage: Storage) -> AsyncIterator[tuple[int, str]]:
    """A vortex server on an ephemeral port with one four-piece task; yields (port, task id)."""
    task = await fill(storage, "vortex-client", 4 * PIECE, piece_length=PIECE)
    server = VortexServer(storage, piece_timeout=30.0)
    port = await server.start("127.0.0.1", 0)
    try:
        yield port, task.id
    finally:
        await server.stop()


async def test_pieces_beyond_the_budget_wait_for_a_buffer_to_come_back(served: tuple[int, str]) -> None:
    port, task_id = served
    data = payload("vortex-client", 4 * PIECE)
    client = VortexClient(piece_timeout=30.0, memory_budget=2 * PIECE)
    first, second = await asyncio.gather(*(client.download_piece("127.0.0.1", port, task_id, n) for n in (0, 1)))
    third = asyncio.create_task(client.download_piece("127.0.0.1", port, task_id, 2))
    for _ in range(3000):  # until the request is out and only the buffer is missing
        if client._waiters:
            break
        await asyncio.sleep(0.01)
    assert not third.done()
    first.done()
    piece = await third
    for fetched in (second, piece):
        span = ids.PieceSpan(fetched.number, fetched.offset, fetched.length)
        assert bytes(fetched.content) == data[span.offset : span.end]
        assert fetched.digest == ids.format_crc32(zlib.crc32(fetched.content))
        fetched.done()
        fetched.done()  # a second call must not pool the buffer twice
    assert client._out == 0
    assert len(client._free) == 2 and client._free[0] is not client._free[1]


async def test_a_missing_piece_gives_its_buffer_back(served: tuple[int, str]) -> None:
    port, _ = served
    client = VortexClient(piece_timeout=30.0, memory_budget=PIECE)
    with pytest.raises(Exception, match="NotFound"):
        await client.download_piece("127.0.0.1", port, "a" * 64, 0)
    assert client._out == 0
