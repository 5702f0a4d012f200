"""The child side of vortex: one piece per connection, its bytes received by the thread that writes them.

Connecting and sending the DownloadPiece run on the event loop (a TLS handshake and its send in a worker thread).
A parent may hold its answer until it has the piece; that wait is on the event loop too, and holds no thread. Once
the answer begins, one short thread hop reads the header and the metadata. The piece's bytes are then handed on
unread, as an ``IncomingPiece``: the collector's writing thread receives them block by block into one reused
buffer (``recv`` with ``MSG_WAITALL`` on plain TCP) and writes and CRCs each block while it is still in the CPU's
cache, the shape that took ``bench_p2p``'s dfget back to source from 0.41 s to 0.30 s per 256 MiB (README).
Receiving, the largest cost of a P2P download (the kernel copying the bytes out of the socket and running TCP for
both ends of a loopback connection), thus runs beside the event loop, on both cores. A fetch given up (timeout,
cancellation, the piece written or refused) ends its connection, which fails a blocked call at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from dfdaemon.blocking import SharedSocket, receive_into, receive_timeout
from dfdaemon.download.peering import FetchedPiece, ParentUnavailable, PieceUnavailable
from dfdaemon.storage import IncomingPiece
from dfdaemon.vortex.codec import (
    HEADER_SIZE,
    DownloadPiece,
    Error,
    ErrorCode,
    PieceMetadata,
    ProtocolError,
    Tag,
    decode_header,
    value_limit,
)
from dfdaemon.vortex.server import tune_socket

T = TypeVar("T")

CONNECT_TIMEOUT = 2.0
# The largest piece a parent may announce (the largest piece length a download may request).
MAX_PIECE_LENGTH = 1024 * 1024 * 1024


class VortexClient:
    """Fetches pieces over vortex TCP (mutual TLS when given a context)."""

    def __init__(self, *, piece_timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.piece_timeout = piece_timeout
        self.ssl_context = ssl_context

    async def download_piece(self, ip: str, port: int, task_id: str, number: int) -> FetchedPiece:
        """One piece from the parent at ``ip:port``: its metadata, and its bytes still to be received.

        The caller must call ``done()`` on the result once it wrote the bytes or gave up, which ends the
        connection. Raises PieceUnavailable when only this piece cannot come from this parent (it lacks it),
        ParentUnavailable when the parent cannot be reached or breaks the protocol; receiving the bytes raises
        ParentUnavailable.
        """
        connection = _Connection(ip, port, self.ssl_context, self.piece_timeout)
        try:
            async with asyncio.timeout(self.piece_timeout):
                await connection.send(task_id, number)
                await connection.answered()
                metadata = await connection.in_thread(connection.read_answer)
            if metadata.number != number:
                raise PieceUnavailable(f"{connection.where}: asked for piece {number}, got #{metadata.number}")
            if metadata.length > MAX_PIECE_LENGTH:
                raise ParentUnavailable(f"{connection.where}: piece {number} claims {metadata.length} bytes")
        except BaseException as exc:
            connection.end()
            if isinstance(exc, TimeoutError):
                raise ParentUnavailable(
                    f"{connection.where}: piece {number} took longer than {self.piece_timeout:.0f}s"
                ) from None
            if isinstance(exc, OSError | ProtocolError):
                raise ParentUnavailable(f"{connection.where}: piece {number}: {exc}") from None
            raise
        return FetchedPiece(
            number=metadata.number,
            offset=metadata.offset,
            length=metadata.length,
            digest=metadata.digest,
            metadata_digest=None,
            content=IncomingPiece(metadata.length, connection.receive, connection.end),
            release=connection.end,
        )


class _Connection:
    """One blocking socket to a parent (a ``SharedSocket``: the loop's ``end`` fails a thread's call at once)."""

    def __init__(self, ip: str, port: int, ssl_context: ssl.SSLContext | None, timeout: float) -> None:
        self.ip, self.port, self.ssl_context, self.timeout = ip, port, ssl_context, timeout
        self.where = f"vortex {ip}:{port}"
        self._socket = SharedSocket()
        self.end = self._socket.end

    async def in_thread(self, call: Callable[..., T], *args: object) -> T:
        """``call`` in a worker thread; a cancelled wait ends the connection (and so the call)."""
        try:
            return await asyncio.to_thread(self._socket.run, call, *args)
        except asyncio.CancelledError:
            self.end()
            raise

    async def send(self, task_id: str, number: int) -> None:
        """Connect and send the DownloadPiece, on the event loop; a TLS handshake and its send go to a thread."""
        request = DownloadPiece(task_id, number).encode()
        sock = await self._connect()
        if self.ssl_context is None:
            await asyncio.get_running_loop().sock_sendall(sock, request)
            self._block(sock)
        else:
            self._block(sock)
            await self.in_thread(self._send_secured, sock, request)

    async def answered(self) -> None:
        """Until the parent's answer begins to arrive: on the event loop, holding no thread.

        (A TLS peer that sends session tickets after the handshake looks readable at once; then the answer is
        awaited by the thread that reads it. The vortex server sends none.)
        """
        loop = asyncio.get_running_loop()
        fd = self._socket.sock.fileno()
        arrived: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not arrived.done():
                arrived.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await arrived
        finally:
            loop.remove_reader(fd)

    def read_answer(self) -> PieceMetadata:
        """Read the answer up to the piece's bytes."""
        sock = self._socket.sock
        header = decode_header(self._read(HEADER_SIZE))
        if header.length > value_limit(header.tag):
            raise ProtocolError(f"a packet with tag {header.tag} of {header.length} bytes is too large")
        value = self._read(header.length)
        if header.tag == Tag.ERROR:
            error = Error.decode(value)
            if error.code == ErrorCode.NOT_FOUND:
                raise PieceUnavailable(f"NotFound: {error.message}")
            raise ParentUnavailable(f"{error.code_name}: {error.message}")
        if header.tag != Tag.PIECE_CONTENT:
            raise ProtocolError(f"expected PieceContent, got tag {header.tag}")
        metadata = PieceMetadata.decode(value)
        if not isinstance(sock, ssl.SSLSocket):  # plain TCP only: TLS has no half-close
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # as upstream: the request is all this side sends
        return metadata

    async def _connect(self) -> socket.socket:
        """A connected non-blocking socket, owned by the ``SharedSocket`` from here on."""
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            tune_socket(sock)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, (self.ip, self.port))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise ParentUnavailable(f"{self.where}: no connection within {CONNECT_TIMEOUT:.0f}s") from None
            if isinstance(exc, OSError):
                reason = os.strerror(exc.errno) if exc.errno else str(exc)  # (asyncio's own strerror names no cause)
                raise ParentUnavailable(f"{self.where}: cannot connect: {reason}") from None
            raise
        self._socket.attach(sock)
        return sock

    def _block(self, sock: socket.socket) -> None:
        """Blocking from here, so ``MSG_WAITALL`` fills a block in one call; the kernel's receive timeout is a
        backstop for a fetch the loop never ends."""
        sock.setblocking(True)
        receive_timeout(sock, self.timeout)

    def _send_secured(self, sock: socket.socket, request: bytes) -> None:
        """In a worker thread: the TLS handshake, then the request. The TLS socket takes over the descriptor, so
        it is attached before the handshake starts: ``end`` then cuts the handshake short too."""
        assert self.ssl_context is not None, "only a TLS connection is secured"
        secured = self.ssl_context.wrap_socket(sock, server_hostname=self.ip, do_handshake_on_connect=False)
        self._socket.attach(secured)
        secured.do_handshake()
        secured.sendall(request)

    def _read(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            filled += self._receive_some(view[filled:])
        return buffer

    def receive(self, target: memoryview) -> int:
        """In the writing thread: the piece's next bytes into ``target`` (all of it, but for a failure)."""
        try:
            return self._socket.run(self._receive_some, target)
        except BlockingIOError:  # the kernel's receive timeout
            raise ParentUnavailable(f"{self.where}: nothing received for {self.timeout:g}s") from None
        except OSError as exc:
            raise ParentUnavailable(f"{self.where}: {exc}") from None

    def _receive_some(self, target: memoryview) -> int:
        return receive_into(self._socket.sock, target)
