"""``dfdaemon.v2.DfdaemonUpload``: what other peers and schedulers call over TCP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.empty_pb2 import Empty

from dfdaemon import ids
from dfdaemon.admission import Admission
from dfdaemon.api import common_pb2, dfdaemon_pb2
from dfdaemon.download import DownloadManager
from dfdaemon.ratelimit import TokenBucket
from dfdaemon.rpc import convert
from dfdaemon.rpc.convert import unary
from dfdaemon.rpc.download import Membership, TaskServicer
from dfdaemon.rpc.servers import Context
from dfdaemon.storage import InvalidPiece, PieceRecord, Storage, TaskNotFound, TaskState
from dfdaemon.telemetry import metrics

SERVICE = dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonUpload"]
# DownloadPiece buffers kept between calls, and the largest kept (larger pieces get one of their own).
MAX_POOLED_BUFFERS = 4
MAX_POOLED_BUFFER = 16 * 1024 * 1024


class UploadServicer(TaskServicer):
    """Serves other peers what a peer needs; others answer UNIMPLEMENTED.

    Callers come from the network: a DownloadTask may not write files and may not reach internal origins,
    and DeleteTask is refused unless ``upload.server.enableDeleteTask`` allows it.
    """

    from_network = True

    def __init__(
        self,
        storage: Storage,
        downloads: DownloadManager,
        membership: Membership,
        host_ip: str,
        piece_timeout: float,
        admission: Admission,
        enable_delete_task: bool = False,
        sync_host_interval: float = 30.0,
        tcp_port: int | None = None,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        super().__init__(storage, downloads, membership)
        self.host_ip = host_ip
        self.piece_timeout = piece_timeout
        self.admission = admission
        self.enable_delete_task = enable_delete_task
        self.sync_host_interval = sync_host_interval
        # The vortex port, advertised in every SyncPiecesResponse: an upstream child >= 1.2.2 fetches only over
        # vortex and, without it, would send vortex bytes to the gRPC port.
        self.tcp_port = tcp_port
        self.bandwidth = bandwidth  # upload.bandwidthLimit, shared with vortex
        # Piece buffers reused by DownloadPiece: one per concurrent call, a few kept between calls.
        self._buffers: list[bytearray] = []

    async def SyncHost(self, request: dfdaemon_pb2.SyncHostRequest, context: Context) -> AsyncIterator[common_pb2.Host]:
        """This host's description, now and then every announce interval, until the caller goes away."""
        while True:
            host = self.membership.host
            if host is not None:
                yield host.message()
            await asyncio.sleep(self.sync_host_interval)

    @unary
    async def DeleteTask(self, request: dfdaemon_pb2.DeleteTaskRequest, context: Context) -> Empty:
        if not self.enable_delete_task:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "DeleteTask over the network is disabled (set upload.server.enableDeleteTask to allow it)",
            )
        await self.storage.delete_task(request.task_id)
        return Empty()

    async def SyncPieces(
        self, request: dfdaemon_pb2.SyncPiecesRequest, context: Context
    ) -> AsyncIterator[dfdaemon_pb2.SyncPiecesResponse]:
        """Tell a child which pieces are here, then each new one as it is committed.

        Ends once the child has every piece it asked for (all of them when it named none), the task is
        complete here, or it is partial with no download filling it; a task that stops making progress for a
        piece timeout ends with DEADLINE_EXCEEDED.
        """
        try:
            async for response in self._sync_pieces(request):
                yield response
        except Exception as error:
            await convert.abort_for(context, error)

    async def _sync_pieces(
        self, request: dfdaemon_pb2.SyncPiecesRequest
    ) -> AsyncIterator[dfdaemon_pb2.SyncPiecesResponse]:
        task_id = ids.validate_task_id(request.task_id)
        interested = set(request.interested_piece_numbers)
        sent: set[int] = set()
        while True:
            task = await self.storage.require_task(task_id)
            if task.content_length is not None and task.piece_length:
                count = ids.piece_count(task.content_length, task.piece_length)
                beyond = sorted(n for n in interested if n >= count)
                if beyond:
                    raise InvalidPiece(f"task {task_id} has {count} pieces; piece {beyond[0]} does not exist")
            for piece in await self.storage.pieces(task_id):
                if piece.number not in sent and (not interested or piece.number in interested):
                    sent.add(piece.number)
                    yield dfdaemon_pb2.SyncPiecesResponse(
                        number=piece.number,
                        offset=piece.offset,
                        length=piece.length,
                        ip=self.host_ip,
                        tcp_port=self.tcp_port,
                    )
            if (interested and interested <= sent) or task.state is TaskState.SUCCEEDED:
                return
            if task.state is TaskState.RUNNING and not self.storage.in_flight(task_id)[0]:
                return  # a partial task (a ranged download's) that nothing is filling: no more pieces will come
            if task.state is TaskState.FAILED:
                raise TaskNotFound(task_id)
            try:
                async with asyncio.timeout(self.piece_timeout):
                    await self.storage.wait_for_change(task_id)
            except TimeoutError:
                raise TimeoutError(f"task {task_id} made no progress for {self.piece_timeout:.0f}s") from None

    @unary
    async def DownloadPiece(self, request: dfdaemon_pb2.DownloadPieceRequest, context: Context) -> bytes:
        """One piece's bytes, CRC-checked on the way out, with the piece metadata digest, already serialized.

        The piece is read into a reused buffer and the response's wire bytes are built around it in one copy
        (``encode_download_piece``): a protobuf message would copy the bytes in, then out again. A slot is held
        until the response has been sent (its bytes are in memory until then): memory stays bounded by the
        slots, whatever the number of callers.
        """
        release = await self.admission.enter()

        def done(_: Context) -> None:
            release()

        context.add_done_callback(done)  # type: ignore[arg-type]  # the stubs declare a non-Protocol callback type
        buffer = self._buffers.pop() if self._buffers else bytearray()
        try:
            async with self.storage.upload(ids.validate_task_id(request.task_id)) as reader:
                piece, content = await reader.read_piece_into(request.piece_number, buffer)
            with content:
                response = encode_download_piece(piece, content)
        finally:
            if len(self._buffers) < MAX_POOLED_BUFFERS and len(buffer) <= MAX_POOLED_BUFFER:
                self._buffers.append(buffer)
        if self.bandwidth is not None:
            await self.bandwidth.acquire(piece.length)
        metrics.UPLOAD_PIECES.inc()
        metrics.UPLOAD_BYTES.inc(piece.length)
        return response


def encode_download_piece(piece: PieceRecord, content: memoryview) -> bytes:
    """A ``DownloadPieceResponse``'s wire bytes, the content copied once (into the result).

    Protobuf lets a message's fields come in any order, so the piece's content field follows the piece's other
    fields, each length-delimited field being its tag, the varint length of its value, then the value.
    """
    metadata = convert.piece(piece, piece.traffic_type).SerializeToString()
    content_field = _PIECE_CONTENT_TAG + _varint(len(content))
    piece_length = len(metadata) + len(content_field) + len(content)
    digest = ids.piece_metadata_digest(piece.number, piece.offset, piece.length, piece.digest)
    tail = dfdaemon_pb2.DownloadPieceResponse(digest=digest).SerializeToString()
    return b"".join((_RESPONSE_PIECE_TAG, _varint(piece_length), metadata, content_field, content, tail))


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint: seven bits a byte, least significant first, the high bit set on all but the last."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited_tag(field: FieldDescriptor) -> bytes:
    return _varint(field.number << 3 | 2)  # wire type 2: length-delimited


_RESPONSE_PIECE_TAG = _length_delimited_tag(dfdaemon_pb2.DownloadPieceResponse.DESCRIPTOR.fields_by_name["piece"])
_PIECE_CONTENT_TAG = _length_delimited_tag(common_pb2.Piece.DESCRIPTOR.fields_by_name["content"])
