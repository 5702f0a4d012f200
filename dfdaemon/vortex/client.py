"""The child side of vortex: fetch one piece per connection, its bytes received straight into a reused buffer.

The protocol reads into the buffer it is pointed at (``asyncio.BufferedProtocol``: the transport calls
``recv_into`` on that memory, TLS or not) and pauses reading between targets, so the header, the metadata and
the piece's bytes each land exactly where they belong, without per-chunk ``bytes`` objects. The piece is handed
on as a view of that buffer, not copied: the collector computes its CRC while writing it (once) and hands the
buffer back for the next fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from dfdaemon.download.peering import FetchedPiece, ParentUnavailable, PieceUnavailable
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

CONNECT_TIMEOUT = 2.0
# The largest piece a parent may announce (the largest piece length a download may request).
MAX_PIECE_LENGTH = 1024 * 1024 * 1024
# Bytes of receive buffers in existence at once (handed out or kept for reuse), whatever the number of fetches
# and the piece length: a fetch waits for room before it allocates (a piece larger than this alone still goes).
MEMORY_BUDGET = 24 * 1024 * 1024


class _Receiver(asyncio.BufferedProtocol):
    """Fills one target buffer at a time; reading stays paused while there is none."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._target: memoryview | None = None
        self._filled = 0
        self._done: asyncio.Future[None] | None = None
        self._closed: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()

    async def read_into(self, target: memoryview) -> None:
        """Fill ``target`` completely with the next bytes of the stream."""
        if self._closed is not None:
            raise self._closed
        assert self.transport is not None
        self._target, self._filled = target, 0
        self._done = asyncio.get_running_loop().create_future()
        self.transport.resume_reading()
        try:
            await self._done
        finally:
            self._target = self._done = None

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self._target is not None
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._target is not None and self.transport is not None
        self._filled += nbytes
        if self._filled == len(self._target):
            self.transport.pause_reading()
            if self._done is not None and not self._done.done():
                self._done.set_result(None)

    def eof_received(self) -> bool:
        self._end(ConnectionResetError("the parent closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionResetError("the parent closed the connection"))

    def _end(self, error: Exception) -> None:
        if self._closed is None:
            self._closed = error
        if self._done is not None and not self._done.done():
            self._done.set_exception(self._closed)


class VortexClient:
    """Fetches pieces over vortex TCP (mutual TLS when given a context); one reused buffer per concurrent fetch."""

    def __init__(
        self, *, piece_timeout: float, ssl_context: ssl.SSLContext | None = None, memory_budget: int = MEMORY_BUDGET
    ) -> None:
        self.piece_timeout = piece_timeout
        self.ssl_context = ssl_context
        self.memory_budget = memory_budget
        self._free: list[bytearray] = []
        self._out = 0  # bytes of the buffers handed out
        self._waiters: list[asyncio.Future[None]] = []

    async def download_piece(self, ip: str, port: int, task_id: str, number: int) -> FetchedPiece:
        """One piece from the parent at ``ip:port``, as a view of a pooled buffer; the caller checks its CRC.

        The caller must call ``done()`` on the result once the bytes are written. Raises PieceUnavailable when
        only this piece cannot come from this parent (it lacks it), ParentUnavailable when the parent cannot be
        reached or breaks the protocol.
        """
        where = f"vortex {ip}:{port}"
        receiver = await self._connect(ip, port, where)
        try:
            metadata, buffer = await self._receive(receiver, task_id, number, where)
        finally:
            if receiver.transport is not None:
                receiver.transport.close()
        view = memoryview(buffer)[: metadata.length]

        def release() -> None:  # once only (FetchedPiece.done): pooling twice would give two fetches one buffer
            try:
                view.release()
            except BufferError:
                self._give_back(buffer, keep=False)  # a cancelled write's thread still reads it: never reuse it
            else:
                self._give_back(buffer)

        return FetchedPiece(
            number=metadata.number,
            offset=metadata.offset,
            length=metadata.length,
            digest=metadata.digest,
            metadata_digest=None,
            content=view,
            release=release,
        )

    async def _receive(
        self, receiver: _Receiver, task_id: str, number: int, where: str
    ) -> tuple[PieceMetadata, bytearray]:
        """Request the piece and read its bytes into a buffer taken within the memory budget."""
        try:
            async with asyncio.timeout(self.piece_timeout):
                metadata = await _request(receiver, task_id, number)
                if metadata.number != number:
                    raise PieceUnavailable(f"{where}: asked for piece {number}, got #{metadata.number}")
                if metadata.length > MAX_PIECE_LENGTH:
                    raise ParentUnavailable(f"{where}: piece {number} claims {metadata.length} bytes")
                buffer = await self._take(metadata.length)
                try:
                    await receiver.read_into(memoryview(buffer)[: metadata.length])
                except BaseException:
                    self._give_back(buffer)
                    raise
        except TimeoutError:
            raise ParentUnavailable(f"{where}: piece {number} took longer than {self.piece_timeout:.0f}s") from None
        except (OSError, ProtocolError) as exc:
            raise ParentUnavailable(f"{where}: piece {number}: {exc}") from None
        return metadata, buffer

    async def _take(self, length: int) -> bytearray:
        """A buffer of at least ``length`` bytes, once the budget has room (always when no other is out).

        Meanwhile the request is already sent: the parent's bytes wait in the socket buffers.
        """
        while self._out and self._out + length > self.memory_budget:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        buffer = next((b for b in self._free if len(b) >= length), None)
        if buffer is None:
            self._free.clear()  # too small for this piece: freed before the new one is allocated
            buffer = bytearray(length)
        else:
            self._free.remove(buffer)
        self._out += len(buffer)
        return buffer

    def _give_back(self, buffer: bytearray, *, keep: bool = True) -> None:
        """Return a buffer: kept for the next fetch while the budget allows, and a waiting fetch is woken."""
        self._out -= len(buffer)
        if keep and self._out + sum(map(len, self._free)) + len(buffer) <= self.memory_budget:
            self._free.append(buffer)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _connect(self, ip: str, port: int, where: str) -> _Receiver:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                transport, receiver = await loop.create_connection(
                    _Receiver, ip, port, ssl=self.ssl_context, server_hostname=ip if self.ssl_context else None
                )
        except TimeoutError:
            raise ParentUnavailable(f"{where}: no connection within {CONNECT_TIMEOUT:.0f}s") from None
        except OSError as exc:
            raise ParentUnavailable(f"{where}: cannot connect: {exc.strerror or exc}") from None
        tune_socket(transport.get_extra_info("socket"))
        return receiver


async def _request(receiver: _Receiver, task_id: str, number: int) -> PieceMetadata:
    """Send the DownloadPiece and read the answer up to the piece's bytes."""
    assert receiver.transport is not None
    receiver.transport.write(DownloadPiece(task_id, number).encode())
    header_bytes = bytearray(HEADER_SIZE)
    await receiver.read_into(memoryview(header_bytes))
    header = decode_header(header_bytes)
    if header.length > value_limit(header.tag):
        raise ProtocolError(f"a packet with tag {header.tag} of {header.length} bytes is too large")
    value = bytearray(header.length)
    await receiver.read_into(memoryview(value))
    if header.tag == Tag.ERROR:
        error = Error.decode(value)
        if error.code == ErrorCode.NOT_FOUND:
            raise PieceUnavailable(f"NotFound: {error.message}")
        raise ParentUnavailable(f"{error.code_name}: {error.message}")
    if header.tag != Tag.PIECE_CONTENT:
        raise ProtocolError(f"expected PieceContent, got tag {header.tag}")
    metadata = PieceMetadata.decode(value)
    if receiver.transport.can_write_eof():  # plain TCP only: TLS has no half-close
        with contextlib.suppress(OSError):
            receiver.transport.write_eof()  # as upstream: the request is all this side sends
    return metadata
