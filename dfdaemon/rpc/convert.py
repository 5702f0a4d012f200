"""Translation between protobuf messages and the domain's plain records, and domain errors to gRPC status."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NoReturn, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from dfdaemon import ids
from dfdaemon.admission import Busy
from dfdaemon.api import common_pb2, dfdaemon_ext_pb2, dfdaemon_pb2
from dfdaemon.backend import BackendError, SourceNotAllowed
from dfdaemon.download import (
    ByteRange,
    ContentMismatch,
    DownloadFailed,
    DownloadPrecondition,
    DownloadRequest,
    PieceDone,
    Started,
)
from dfdaemon.download.peering import Registration
from dfdaemon.gc import GCReport
from dfdaemon.rpc.download_message import OPTIONAL_DOWNLOAD_FIELDS
from dfdaemon.rpc.download_message import download as download
from dfdaemon.rpc.download_message import duration as duration
from dfdaemon.rpc.servers import Context, details
from dfdaemon.storage import (
    Hold,
    InvalidPiece,
    PieceCorrupt,
    PieceNotFound,
    PieceRecord,
    StorageFull,
    TaskInUse,
    TaskNotFound,
    TaskRecord,
    Usage,
)
from dfdaemon.units import MAX_DURATION_SECONDS

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class InvalidRequest(ValueError):
    """A request the caller must fix; answered INVALID_ARGUMENT."""


class Refused(Exception):
    """A request this daemon's configuration forbids (FAILED_PRECONDITION)."""


class Unsupported(Exception):
    """A well-formed request for something upstream serves and this daemon does not (UNIMPLEMENTED)."""


# Domain errors and the status each maps to; the first match wins.
_STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (TaskNotFound, grpc.StatusCode.NOT_FOUND),
    (PieceNotFound, grpc.StatusCode.NOT_FOUND),
    (TaskInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
    (StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PieceCorrupt, grpc.StatusCode.DATA_LOSS),
    (InvalidPiece, grpc.StatusCode.OUT_OF_RANGE),
    (DownloadPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (SourceNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (ContentMismatch, grpc.StatusCode.DATA_LOSS),
    (DownloadFailed, grpc.StatusCode.INTERNAL),
    (BackendError, grpc.StatusCode.INTERNAL),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def status_for(error: Exception) -> grpc.StatusCode | None:
    for kind, code in _STATUS_OF:
        if isinstance(error, kind):
            return code
    return None


async def abort_for(context: Context, error: Exception) -> NoReturn:
    """End the RPC with the status that matches a domain error (re-raising anything unexpected).

    An origin failure also carries upstream's ``errordetails.v2.Backend`` in the status details trailer.
    """
    code = status_for(error)
    if code is None:
        raise error
    message = details(str(error) or type(error).__name__)
    if isinstance(error, TimeoutError) and not str(error):
        message = "the download did not finish within its timeout"
    if isinstance(error, BackendError):
        await context.abort(code, message, trailing_metadata=(("grpc-status-details-bin", backend_details(error)),))
    await context.abort(code, message)


def unary(
    method: Callable[[Any, RequestT, Context], Awaitable[ResponseT]],
) -> Callable[[Any, RequestT, Context], Awaitable[ResponseT]]:
    """Decorate a unary servicer method so domain errors end it with their gRPC status and message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: RequestT, context: Context) -> ResponseT:
        try:
            return await method(self, request, context)
        except Exception as error:
            await abort_for(context, error)

    return wrapper


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def duration_seconds(value: Duration, field: str) -> float:
    nanoseconds = value.ToNanoseconds()
    if not 0 < nanoseconds <= MAX_DURATION_SECONDS * 1_000_000_000:
        raise InvalidRequest(f"{field} must be positive and at most 100 years")
    return nanoseconds / 1e9


def stat_local_task(task: TaskRecord, uploading: int) -> dfdaemon_pb2.StatLocalTaskResponse:
    response = dfdaemon_pb2.StatLocalTaskResponse(
        task_id=task.id,
        response_header=task.response_header,
        uploading_count=uploading,
        uploaded_count=task.uploaded_count,
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
        finished_at=timestamp(task.finished_at),
        failed_at=timestamp(task.failed_at),
    )
    if task.piece_length is not None:
        response.piece_length = task.piece_length
    if task.content_length is not None:
        response.content_length = task.content_length
    return response


def download_task_id(download: common_pb2.Download) -> str:
    """The task id a ``Download`` names, computed exactly as upstream does."""
    if not download.url:
        raise InvalidRequest("download.url is required")
    return download_request(download).task_id()


def task_ref_id(ref: dfdaemon_ext_pb2.TaskRef) -> str:
    """Resolve a TaskRef (task id, Download or OCI blob digest) to a validated task id."""
    kind = ref.WhichOneof("ref")
    if kind == "task_id":
        return ids.validate_task_id(ref.task_id)
    if kind == "download":
        return download_task_id(ref.download)
    if kind == "blob_digest":
        return ids.blob_digest_task_id(ref.blob_digest)
    raise InvalidRequest("a task reference needs task_id, download or blob_digest")


def hold(record: Hold) -> dfdaemon_ext_pb2.Hold:
    return dfdaemon_ext_pb2.Hold(
        task_id=record.task_id,
        holder=record.holder,
        acquired_at=timestamp(record.acquired_at),
        expires_at=timestamp(record.expires_at),
    )


def usage(record: Usage) -> dfdaemon_ext_pb2.Usage:
    return dfdaemon_ext_pb2.Usage(
        used_bytes=record.used_bytes,
        quota_bytes=record.quota_bytes,
        high_watermark_bytes=record.high_watermark_bytes,
        low_watermark_bytes=record.low_watermark_bytes,
        held_bytes=record.held_bytes,
        task_count=record.task_count,
        held_task_count=record.held_task_count,
        quota_exceeded_by_data_in_use=record.quota_exceeded_by_data_in_use,
        filesystem_total_bytes=record.filesystem_total_bytes,
        filesystem_free_bytes=record.filesystem_free_bytes,
    )


def gc_run(report: GCReport) -> dfdaemon_ext_pb2.GCRun:
    return dfdaemon_ext_pb2.GCRun(
        id=report.id,
        dry_run=report.dry_run,
        trigger=report.trigger,
        started_at=timestamp(report.started_at),
        finished_at=timestamp(report.finished_at),
        bytes_before=report.bytes_before,
        bytes_after=report.bytes_after,
        evicted=[
            dfdaemon_ext_pb2.GCEviction(task_id=e.task_id, reason=e.reason, bytes=e.bytes) for e in report.evicted
        ],
        skipped=[
            dfdaemon_ext_pb2.GCSkip(
                task_id=s.task_id,
                reason=s.reason,
                holders=s.holders,
                downloads=s.downloads,
                uploads=s.uploads,
                bytes=s.bytes,
            )
            for s in report.skipped
        ],
        quota_exceeded_by_data_in_use=report.quota_exceeded_by_data_in_use,
    )


# Model hubs upstream's Rust daemon downloads from (API 2.3 ``Download`` fields 31, 32, 34) and the URL
# schemes its backends register for them. This daemon has no such backend.
_MODEL_HUBS: tuple[tuple[Literal["hugging_face", "model_scope", "open_csg"], str, str], ...] = (
    ("hugging_face", "hf", "Hugging Face"),
    ("model_scope", "modelscope", "ModelScope"),
    ("open_csg", "opencsg", "OpenCSG"),
)


def _check_supported_source(download: common_pb2.Download) -> None:
    """Refuse model-hub downloads up front, naming the hub, instead of failing somewhere in the backend."""
    scheme = download.url.partition(":")[0].lower() if ":" in download.url else ""
    for field, hub_scheme, hub in _MODEL_HUBS:
        if download.HasField(field) or scheme == hub_scheme:
            raise Unsupported(
                f"{hub} downloads (download.{field} or {hub_scheme}:// URLs) are not supported by this daemon: "
                "it fetches http(s) origins and peers only"
            )


def download_request(download: common_pb2.Download, *, from_network: bool = False) -> DownloadRequest:
    """A ``common.v2.Download`` as the download manager's request; ``from_network`` says who is asking.

    API 2.3's ``metadata_only`` and ``scheduling_policy`` are accepted and not acted on (the README says so).
    """
    _check_supported_source(download)
    if download.priority not in common_pb2.Priority.values():
        raise InvalidRequest(f"download.priority {download.priority} is not a priority level (0 to 6)")
    timeout = None
    if download.HasField("timeout"):
        timeout = duration_seconds(download.timeout, "download.timeout")
    return DownloadRequest(
        url=download.url,
        range=ByteRange(download.range.start, download.range.length) if download.HasField("range") else None,
        filtered_query_params=tuple(download.filtered_query_params),
        request_header=dict(download.request_header),
        timeout=timeout,
        disable_back_to_source=download.disable_back_to_source,
        need_back_to_source=download.need_back_to_source,
        need_piece_content=download.need_piece_content,
        force_hard_link=download.force_hard_link,
        overwrite=download.overwrite,
        enable_task_id_based_blob_digest=download.enable_task_id_based_blob_digest,
        priority=download.priority,
        prefetch=download.prefetch,
        is_prefetch=download.is_prefetch,
        from_network=from_network,
        long_suffix_is_whole=False,  # upstream's reading: a suffix longer than the content is refused
        **{name: getattr(download, name) if download.HasField(name) else None for name in OPTIONAL_DOWNLOAD_FIELDS},
    )


def registered_download(registration: Registration) -> common_pb2.Download:
    """What ``RegisterPeerRequest`` carries: the caller's download as upstream forwards it, with the concurrency
    in use and the sizes the registering peer measured."""
    request = dataclasses.replace(registration.download, concurrent_piece_count=registration.concurrent_piece_count)
    message = download(request)
    message.actual_content_length = registration.content_length
    message.actual_piece_length = registration.actual_piece_length
    message.actual_piece_count = registration.piece_count
    return message


def piece(record: PieceRecord, traffic_type: int | None = None) -> common_pb2.Piece:
    message = common_pb2.Piece(
        number=record.number,
        offset=record.offset,
        length=record.length,
        digest=record.digest,
        cost=duration(record.cost),
        created_at=timestamp(record.created_at),
    )
    if record.parent_id is not None:
        message.parent_id = record.parent_id
    if traffic_type is not None:
        message.traffic_type = traffic_type  # type: ignore[assignment]
    return message


def download_event(event: Started | PieceDone, host_id: str) -> dfdaemon_pb2.DownloadTaskResponse:
    if isinstance(event, Started):
        started = dfdaemon_pb2.DownloadTaskStartedResponse(
            content_length=event.content_length,
            response_header=event.response_header,
            pieces=[common_pb2.Piece(number=p.number, offset=p.offset, length=p.length) for p in event.pieces],
            is_finished=event.is_finished,
        )
        if event.range is not None:
            started.range.CopyFrom(common_pb2.Range(start=event.range.start, length=event.range.length))
        return dfdaemon_pb2.DownloadTaskResponse(
            host_id=host_id, task_id=event.task_id, peer_id=event.peer_id, download_task_started_response=started
        )
    response = dfdaemon_pb2.DownloadTaskResponse(host_id=host_id, task_id=event.piece.task_id, peer_id=event.peer_id)
    finished = response.download_piece_finished_response
    finished.piece.CopyFrom(piece(event.piece, event.traffic_type))
    if event.content is not None:
        finished.piece.content = event.content  # set in place: one copy of the bytes, not two
    return response


def backend_details(error: BackendError) -> bytes:
    """Upstream's ``errordetails.v2.Backend`` as JSON bytes, for the ``grpc-status-details-bin`` trailer."""
    backend: dict[str, Any] = {"message": details(error.message), "header": error.headers}
    if error.status_code is not None:
        backend["status_code"] = error.status_code
    return json.dumps(backend).encode()


def local_task(task: TaskRecord) -> common_pb2.Task:
    """This daemon's own view of a task, for StatTask without a scheduler: one peer, this one."""
    message = common_pb2.Task(
        id=task.id,
        type=common_pb2.STANDARD,
        url=task.url,
        content_length=task.content_length or 0,
        piece_count=task.piece_count,
        state={"succeeded": "Succeeded", "failed": "Failed"}.get(task.state.value, "Running"),
        peer_count=1,
        has_available_peer=task.state.value == "succeeded",
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
    )
    if task.tag:
        message.tag = task.tag
    if task.application:
        message.application = task.application
    return message
