"""The vortex client against an in-process vortex server and scripted parents: a piece's metadata first, its
bytes received afterwards by the thread that writes them, and a fetch given up ending its connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from dfdaemon import ids
from dfdaemon.config import TLSConfig
from dfdaemon.download.peering import ParentUnavailable, PieceUnavailable
from dfdaemon.storage import IncomingPiece, Storage
from dfdaemon.vortex import client as vortex_client
from dfdaemon.vortex.client import VortexClient
from dfdaemon.vortex.codec import Error, ErrorCode, PieceMetadata
from dfdaemon.vortex.server import VortexServer
from dfdaemon.vortex.tls import client_context, server_context
from tests import test_security
from tests.storage_support import fill, payload, received, seeded_bytes

PIECE = 64 * 1024
pki = test_security.pki


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


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "mutual-tls"])
async def test_requests_waiting_on_a_parent_hold_no_thread_and_each_gets_its_answer(
    tls: bool, pki: test_security.Pki
) -> None:
    """A parent may hold its answer until it has the piece: many requests waiting so must not take the threads file
    work needs (here a pool of two), and each still gets its own answer once the parent sends it. Under TLS too: the
    vortex server sends no session ticket that would wake the wait before the answer."""
    waiting = 12
    requests: list[int] = []
    all_asked, answer = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = int.from_bytes((await reader.readexactly(74))[-4:], "big")
        requests.append(number)
        if len(requests) == waiting:
            all_asked.set()
        await answer.wait()
        writer.write(Error(ErrorCode.NOT_FOUND, f"no piece {number} yet").encode())
        await writer.drain()
        writer.close()

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    client_tls = TLSConfig(ca_cert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
    server_tls = TLSConfig(ca_cert=str(pki.ca), cert=str(pki.server_cert), key=str(pki.server_key))
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(server_tls) if tls else None)
    threads_before = threading.active_count()
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = VortexClient(piece_timeout=60, ssl_context=client_context(client_tls) if tls else None)
        fetches = [asyncio.ensure_future(client.download_piece("127.0.0.1", port, "d" * 64, n)) for n in range(waiting)]
        await asyncio.wait_for(all_asked.wait(), 10)
        assert threading.active_count() <= threads_before + 2  # at most the pool's own two, whatever waits
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"  # and they are free
        answer.set()
        outcomes = await asyncio.gather(*fetches, return_exceptions=True)
    assert sorted(requests) == list(range(waiting))
    for number, outcome in enumerate(outcomes):
        assert isinstance(outcome, PieceUnavailable) and f"no piece {number} yet" in str(outcome)


async def test_connects_that_hang_hold_no_thread_and_give_up_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parent that never completes the handshake (its accept queue full, so the kernel drops the SYNs): the
    connects wait on the event loop, none in a thread, and each gives up after CONNECT_TIMEOUT."""
    monkeypatch.setattr(vortex_client, "CONNECT_TIMEOUT", 0.5)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # one completed connection fills the queue; it is never accepted
        port = listener.getsockname()[1]
        for _ in range(2):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        await asyncio.sleep(0.1)
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
        threads_before = threading.active_count()
        client = VortexClient(piece_timeout=60)
        fetches = [asyncio.ensure_future(client.download_piece("127.0.0.1", port, "e" * 64, n)) for n in range(8)]
        await asyncio.sleep(0.2)
        assert threading.active_count() == threads_before  # connecting took no thread from the pool
        outcomes = await asyncio.wait_for(asyncio.gather(*fetches, return_exceptions=True), 10)
    for outcome in outcomes:
        assert isinstance(outcome, ParentUnavailable) and "no connection within" in str(outcome)


async def test_a_parent_that_refuses_the_connection_is_unavailable_with_the_reason() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connects are refused
        with pytest.raises(ParentUnavailable, match="cannot connect: Connection refused"):
            await VortexClient(piece_timeout=30).download_piece("127.0.0.1", port, "f" * 64, 0)


async def test_a_fetch_given_up_during_the_tls_handshake_frees_its_thread_at_once(pki: test_security.Pki) -> None:
    """A parent that accepts the connection but never answers the TLS handshake: giving the fetch up ends the
    handshake in its thread at once, not after the kernel's receive timeout (the piece timeout)."""
    accepted: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # held open, never answered
        connected.set()

    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
    client_tls = TLSConfig(ca_cert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = VortexClient(piece_timeout=60, ssl_context=client_context(client_tls))
    fetch = asyncio.ensure_future(client.download_piece("127.0.0.1", port, "0" * 64, 0))
    try:
        await asyncio.wait_for(connected.wait(), 10)
        await asyncio.sleep(0.2)  # the handshake is under way in the pool's one thread
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
