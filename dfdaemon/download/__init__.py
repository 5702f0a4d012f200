"""Task downloads: orchestration (manager), piece collection from parents, the scheduler-driven flow."""

from dfdaemon.download.manager import (
    ByteRange,
    ContentMismatch,
    DownloadFailed,
    DownloadManager,
    DownloadPrecondition,
    DownloadRequest,
    InvalidDownload,
    PieceDone,
    Started,
    TaskJob,
)

__all__ = [
    "ByteRange",
    "ContentMismatch",
    "DownloadFailed",
    "DownloadManager",
    "DownloadPrecondition",
    "DownloadRequest",
    "InvalidDownload",
    "PieceDone",
    "Started",
    "TaskJob",
]
