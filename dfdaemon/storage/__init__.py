"""The cache: metadata in SQLite, one content file per task, references that keep data in use."""

from dfdaemon.storage.manager import Storage, TaskReader, TaskWriter
from dfdaemon.storage.models import (
    Hold,
    InvalidPiece,
    PieceCorrupt,
    PieceNotFound,
    PieceRecord,
    References,
    StorageError,
    StorageFull,
    SyncResult,
    TaskInfo,
    TaskInUse,
    TaskNotFound,
    TaskRecord,
    TaskState,
    TrafficType,
    Usage,
)

__all__ = [
    "Hold",
    "InvalidPiece",
    "PieceCorrupt",
    "PieceNotFound",
    "PieceRecord",
    "References",
    "Storage",
    "StorageError",
    "StorageFull",
    "SyncResult",
    "TaskInUse",
    "TaskInfo",
    "TaskNotFound",
    "TaskReader",
    "TaskRecord",
    "TaskState",
    "TaskWriter",
    "TrafficType",
    "Usage",
]
