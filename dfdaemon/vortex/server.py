"""The parent side of vortex: one piece per TCP connection, its bytes sent with ``sendfile`` from the content file.

Per connection: read one DownloadPiece, take an upload reference on the task (GC cannot evict it meanwhile),
wait for the piece if it is still being downloaded, send header and metadata in one write, then the piece's
bytes straight from the page cache, and close. A request that does not parse gets the connection closed, as
upstream does; an unknown task or piece gets Error code 2.

Unlike the gRPC ``DownloadPiece``, the bytes are not re-read and CRC-checked here before they go out: sendfile
never brings them into this process. The child checks every piece's CRC against the digest sent in the
metadata, so a copy that rotted on this disk is refused there and fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import BinaryIO

from prometheus_client import Counter

from dfdaemon import ids
from dfdaemon.ratelimit import TokenBucket
from dfdaemon.storage import PieceNotFound, PieceRecord, Storage, StorageError, TaskNotFound, TaskState, TrafficType
from dfdaemon.telemetry import metrics
from dfdaemon.vortex.codec import (
    DOWNLOAD_PIECE_SIZE,
    HEADER_SIZE,
    DownloadPiece,
    Error,
    ErrorCode,
    PieceMetadata,
    ProtocolError,
    Tag,
    decode_header,
)

log = logging.getLogger("dfdaemon.vortex")

PIECES = Counter(
    "dfdaemon_vortex_upload_pieces_total",
    "Vortex piece requests answered, by result (served, not_found, error, refused).",
    ["result"],
    registry=metrics.REGISTRY,
)
# How long a connection may take to send its one request.
REQUEST_TIMEOUT = 30.0


def tune_socket(sock: socket.socket | None) -> None:
    """TCP_NODELAY (the header must not wait for more) and keepalive (a vanished peer is noticed)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class VortexServer:
    """Serves pieces of the tasks in ``storage`` on one TCP port (TLS when given a context)."""

    def __init__(
        self,
        storage: Storage,
        piece_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        self.storage = storage
        self.piece_timeout = piece_timeout
        self.ssl_context = ssl_context
        self.bandwidth = bandwidth  # upload.bandwidthLimit, shared with gRPC DownloadPiece
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, ip: str, port: int) -> int:
        """Listen on ``ip:port`` (0 picks a free port); returns the port."""
        self._server = await asyncio.start_server(self._serve, ip, port, ssl=self.ssl_context)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and end the connections still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        tune_socket(writer.get_extra_info("socket"))
        try:
            request = await _read_request(reader)
            if request is None:
                PIECES.labels("refused").inc()
            else:
                await self._answer(request, writer)
        except (OSError, StorageError) as exc:  # the child went away, the file could not be sent or counted
            log.debug("vortex connection from %s ended: %s", writer.get_extra_info("peername"), exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _answer(self, request: DownloadPiece, writer: asyncio.StreamWriter) -> None:
        """Error packets only before the first byte of the piece; a failure while sending just closes."""
        task_id, number = request.task_id, request.number
        try:
            async with self.storage.upload(task_id):
                piece, content = await self._open_piece(task_id, number)
                try:
                    if self.bandwidth is not None:
                        await self.bandwidth.acquire(piece.length)
                    await self._send(writer, piece, content)
                finally:
                    await asyncio.to_thread(content.close)
        except TaskNotFound:
            await _refuse(writer, _Refusal(ErrorCode.NOT_FOUND, f"piece {task_id}-{number} not found"))
        except _Refusal as refusal:
            await _refuse(writer, refusal)

    async def _open_piece(self, task_id: str, number: int) -> tuple[PieceRecord, BinaryIO]:
        """The piece's record and its task's content file, open; lookup failures become refusals."""
        try:
            piece = await self._wait_for_piece(task_id, number)
            return piece, await asyncio.to_thread(open, self.storage.content.path(task_id), "rb")
        except (TaskNotFound, PieceNotFound, FileNotFoundError):
            raise _Refusal(ErrorCode.NOT_FOUND, f"piece {task_id}-{number} not found") from None
        except (StorageError, OSError, TimeoutError) as exc:
            log.warning("vortex: cannot serve piece %d of task %s: %s", number, task_id, exc)
            raise _Refusal(ErrorCode.INTERNAL, f"piece {task_id}-{number}: {exc}") from None

    async def _wait_for_piece(self, task_id: str, number: int) -> PieceRecord:
        """The piece's record; waits while the task is still downloading, up to the piece timeout."""
        try:
            async with asyncio.timeout(self.piece_timeout):
                while True:
                    piece = await self.storage.piece(task_id, number)
                    if piece is not None:
                        return piece
                    task = await self.storage.require_task(task_id)
                    beyond = (
                        task.content_length is not None
                        and task.piece_length
                        and (number >= ids.piece_count(task.content_length, task.piece_length))
                    )
                    if task.state is not TaskState.RUNNING or beyond:
                        raise PieceNotFound(task_id, number)
                    await self.storage.wait_for_change(task_id)
        except TimeoutError:
            raise TimeoutError(f"no piece {number} within {self.piece_timeout:.0f}s") from None

    async def _send(self, writer: asyncio.StreamWriter, piece: PieceRecord, content: BinaryIO) -> None:
        """Header and metadata in one write, then the bytes by ``sendfile`` (a copy under TLS), unchecked here."""
        metadata = PieceMetadata(
            number=piece.number,
            offset=piece.offset,
            length=piece.length,
            digest=piece.digest,
            parent_id=piece.parent_id or "",
            traffic_type=TrafficType.REMOTE_PEER,
            cost=int(piece.cost),
            created_at=int(piece.created_at),
        )
        writer.write(metadata.encode())
        loop = asyncio.get_running_loop()
        sent = await loop.sendfile(writer.transport, content, piece.offset, piece.length)
        if sent != piece.length:
            # The file is shorter than its metadata says; closing early tells the child the piece is incomplete.
            PIECES.labels("error").inc()
            log.error(
                "vortex: piece %d of task %s: file held %d of %d bytes", piece.number, piece.task_id, sent, piece.length
            )
            return
        PIECES.labels("served").inc()
        metrics.UPLOAD_PIECES.inc()
        metrics.UPLOAD_BYTES.inc(sent)
        await self.storage.record_upload(piece.task_id)


async def _read_request(reader: asyncio.StreamReader) -> DownloadPiece | None:
    """The one DownloadPiece of a connection, or None when the bytes are no such request."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            header = decode_header(await reader.readexactly(HEADER_SIZE))
            if header.tag != Tag.DOWNLOAD_PIECE or header.length != DOWNLOAD_PIECE_SIZE:
                raise ProtocolError(f"expected a DownloadPiece, got tag {header.tag} with {header.length} bytes")
            return DownloadPiece.decode(await reader.readexactly(DOWNLOAD_PIECE_SIZE))
    except (ProtocolError, asyncio.IncompleteReadError) as exc:
        log.debug("vortex: closing a connection whose request does not parse: %s", exc)
        return None


class _Refusal(Exception):
    """A request this parent answers with an Error packet."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _refuse(writer: asyncio.StreamWriter, refusal: _Refusal) -> None:
    PIECES.labels("not_found" if refusal.code is ErrorCode.NOT_FOUND else "error").inc()
    writer.write(Error(refusal.code, refusal.message).encode())
    await writer.drain()
