"""The vortex client against an in-process vortex server and scripted parents: a piece's metadata first, its
bytes received afterwards by the thread that writes them, and a fetch given up ending its connection."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

import pytest

from dfdaemon import ids
from dfdaemon.download.peering import ParentUnavailable, PieceUnavailable
from dfdaemon.storage import IncomingPiece, Storage
from dfdaemon.vortex.client import VortexClient
from dfdaemon.vortex.codec import PieceMetadata
from dfdaemon.vortex.server import VortexServer
from tests.storage_support import fill, payload, received, seeded_bytes

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


async def test_pieces_fetched_at_once_arrive_whole_with_their_digests(served: tuple[int, str]) -> None:
    port, task_id = served
    data = payload("vortex-client", 4 * PIECE)
    client = VortexClient(piece_timeout=30.0)
    fetched = await asyncio.gather(*(client.download_piece("127.0.0.1", port, task_id, n) for n in range(4)))
    for piece in fetched:
        assert isinstance(piece.content, IncomingPiece) and piece.content.length == PIECE  # not received yet
    for piece in fetched:
        content = await received(piece)
        assert content == data[piece.offset : piece.offset + piece.length]
        assert piece.digest == ids.format_crc32(zlib.crc32(content))


async def test_a_missing_piece_is_refused_before_any_byte(served: tuple[int, str]) -> None:
    port, _ = served
    client = VortexClient(piece_timeout=30.0)
    with pytest.raises(PieceUnavailable, match="NotFound"):
        await client.download_piece("127.0.0.1", port, "a" * 64, 0)


async def stalling_parent(metadata: PieceMetadata, sent: bytes) -> tuple[asyncio.Server, int, asyncio.Event]:
    """A parent that answers with ``metadata`` and ``sent`` (less than the piece), then says nothing more; the
    event is set once the child closed the connection."""
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(74)
        writer.write(metadata.encode() + sent)
        await writer.drain()
        await reader.read()  # the child half-closes after its request: wait for the full close
        while await reader.read(1024):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], closed


async def test_a_fetch_given_up_fails_its_blocked_receive_at_once_and_closes() -> None:
    content = seeded_bytes("test_vortex_client-1", 1024 * 1024)
    metadata = PieceMetadata(number=0, offset=0, length=len(content), digest=ids.format_crc32(zlib.crc32(content)))
    server, port, closed = await stalling_parent(metadata, content[:1000])
    async with server:
        fetched = await VortexClient(piece_timeout=60).download_piece("127.0.0.1", port, "c" * 64, 0)
        assert isinstance(fetched.content, IncomingPiece)
        receiving = asyncio.ensure_future(received(fetched))
        await asyncio.sleep(0.2)  # the thread blocks on the silent parent (if not yet, it finds the fetch ended)
        fetched.done()
        with pytest.raises(ParentUnavailable):
            await asyncio.wait_for(receiving, 10)  # far less than the 60 s piece timeout
        await asyncio.wait_for(closed.wait(), 10)
