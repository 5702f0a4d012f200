"""Task downloads: orchestration (manager), piece collection from parents, the scheduler-driven flow."""

from dfdaemon.download.manager import (
    ByteRange,
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
    "DownloadFailed",
    "DownloadManager",
    "DownloadPrecondition",
    "DownloadRequest",
    "InvalidDownload",
    "PieceDone",
    "Started",
    "TaskJob",
]
