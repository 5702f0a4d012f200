"""Building the ``common.v2.Download`` message that asks for a download.

The CLIs build one on every call, so this module imports only the generated messages and the request record,
never the download machinery (``convert`` translates everything else and re-exports these).
"""

from __future__ import annotations

from typing import Literal, get_args

from google.protobuf.duration_pb2 import Duration

from dfdaemon.api import common_pb2
from dfdaemon.download.request import DownloadRequest

# The optional scalar fields of ``common.v2.Download`` that ``DownloadRequest`` carries under the same name;
# ``None`` on one side is an unset field on the other (presence changes the task id).
OptionalDownloadField = Literal[
    "digest",
    "tag",
    "application",
    "piece_length",
    "output_path",
    "content_for_calculating_task_id",
    "concurrent_piece_count",
    "remote_ip",
]
OPTIONAL_DOWNLOAD_FIELDS: tuple[OptionalDownloadField, ...] = get_args(OptionalDownloadField)


def download(request: DownloadRequest) -> common_pb2.Download:
    """The ``common.v2.Download`` that asks for ``request``: the inverse of ``convert.download_request``, and the
    one place such a message is built (the CLIs, the scheduler registration). ``from_network`` is the server's to
    say."""
    message = common_pb2.Download(
        url=request.url,
        type=common_pb2.STANDARD,
        filtered_query_params=request.filtered_query_params,
        request_header=request.request_header,
        disable_back_to_source=request.disable_back_to_source,
        need_back_to_source=request.need_back_to_source,
        need_piece_content=request.need_piece_content,
        force_hard_link=request.force_hard_link,
        overwrite=request.overwrite,
        enable_task_id_based_blob_digest=request.enable_task_id_based_blob_digest,
        priority=common_pb2.Priority.ValueType(request.priority),
        prefetch=request.prefetch,
        is_prefetch=request.is_prefetch,
    )
    for name in OPTIONAL_DOWNLOAD_FIELDS:
        value = getattr(request, name)
        if value is not None:
            setattr(message, name, value)
    if request.range is not None:
        message.range.CopyFrom(common_pb2.Range(start=request.range.start, length=request.range.length))
    if request.timeout is not None:
        message.timeout.CopyFrom(duration(request.timeout))
    return message


def duration(seconds: float) -> Duration:
    """Rounded to the nearest nanosecond, not truncated: a value read back from a Duration converts to itself."""
    value = Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value
