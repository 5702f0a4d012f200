"""Task downloads: orchestration (manager), piece collection from parents, the scheduler-driven flow.

Names resolve on first use: a request (``DownloadRequest``) is light, the manager pulls in the origin client,
storage and GC, which the CLIs must not pay for at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dfdaemon.download.manager import (
        ContentMismatch,
        DownloadFailed,
        DownloadManager,
        DownloadPrecondition,
        InvalidDownload,
        PieceDone,
        Started,
        TaskJob,
    )
    from dfdaemon.download.request import ByteRange, DownloadRequest

_HOME = {
    "ByteRange": "request",
    "ContentMismatch": "manager",
    "DownloadFailed": "manager",
    "DownloadManager": "manager",
    "DownloadPrecondition": "manager",
    "DownloadRequest": "request",
    "InvalidDownload": "manager",
    "PieceDone": "manager",
    "Started": "manager",
    "TaskJob": "manager",
}

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


def __getattr__(name: str) -> object:
    """Import the submodule that defines ``name`` when it is first asked for."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
