"""Plain records and errors of the storage layer; the gRPC layer translates them to protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple


class TaskState(StrEnum):
    """Lifecycle of a task's local copy. ``EVICTING`` is committed before any byte is deleted."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EVICTING = "evicting"


class TrafficType:
    """Where a piece's bytes came from (numbers as in ``common.v2.TrafficType``)."""

    BACK_TO_SOURCE = 0
    REMOTE_PEER = 1
    LOCAL_PEER = 2


@dataclass(frozen=True)
class TaskInfo:
    """What identifies a task's content: recorded when the task is created."""

    url: str = ""
    tag: str = ""
    application: str = ""
    piece_length: int | None = None
    content_length: int | None = None
    response_header: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskRecord:
    id: str
    state: TaskState
    url: str
    tag: str
    application: str
    piece_length: int | None
    content_length: int | None
    response_header: dict[str, str]
    created_at: float
    updated_at: float
    last_used_at: float
    finished_at: float | None
    failed_at: float | None
    released_at: float | None
    uploaded_count: int
    content_bytes: int
    piece_count: int = 0
    digest: str | None = None  # the blob digest the content was verified against when it completed, if any

    @property
    def is_finished(self) -> bool:
        return self.state is TaskState.SUCCEEDED


class TaskUse(NamedTuple):
    """One task as GC sees it at one instant: its times, its bytes and what references it.

    ``released_at`` already counts a lapsed lease as released at the moment it lapsed.
    """

    id: str
    state: TaskState
    created_at: float
    updated_at: float
    last_used_at: float
    finished_at: float | None = None
    released_at: float | None = None
    bytes: int = 0
    holders: tuple[str, ...] = ()
    downloads: int = 0
    uploads: int = 0


class Quiet(NamedTuple):
    """Which tasks a GC snapshot may leave out: finished ones with no hold and no transfer in flight, settled
    (finished or released) before ``settled_before`` and last used after ``used_since``. Past their grace and
    within their TTL, only quota or disk eviction could take them."""

    settled_before: float
    used_since: float


class Victim(NamedTuple):
    """A task chosen for eviction: it goes only if it is still in ``state`` and unreferenced when evicted."""

    task_id: str
    state: TaskState
    reason: str
    bytes: int


class Refusal(NamedTuple):
    """A victim that was not evicted: a reference taken since it was chosen wins (or it changed or went)."""

    victim: Victim
    references: References


@dataclass(frozen=True)
class Applied:
    """What an eviction batch really did: victims evicted (with the bytes they freed) and those refused."""

    evicted: list[Victim]
    refused: list[Refusal]


@dataclass(frozen=True)
class PieceRecord:
    task_id: str
    number: int
    offset: int
    length: int
    crc: int
    parent_id: str | None
    traffic_type: int
    cost: float
    created_at: float

    @property
    def digest(self) -> str:
        return f"crc32:{self.crc}"


@dataclass(frozen=True)
class Hold:
    """A use reference: ``holder`` uses ``task_id`` until released (or until ``expires_at``)."""

    task_id: str
    holder: str
    acquired_at: float
    expires_at: float | None
    ttl: float | None


@dataclass(frozen=True)
class References:
    """Everything keeping a task from being collected, at one instant."""

    task_id: str
    holds: list[Hold]
    downloads: int
    uploads: int

    @property
    def holders(self) -> list[str]:
        return [hold.holder for hold in self.holds]

    @property
    def refcount(self) -> int:
        return len(self.holds) + self.downloads + self.uploads


@dataclass(frozen=True)
class SyncResult:
    acquired: list[str]
    released: list[str]
    kept: list[str]
    missing: list[str]


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    quota_bytes: int
    high_watermark_bytes: int
    low_watermark_bytes: int
    held_bytes: int
    task_count: int
    held_task_count: int
    quota_exceeded_by_data_in_use: bool
    filesystem_total_bytes: int
    filesystem_free_bytes: int


class StorageError(Exception):
    """Base of the storage layer's errors; messages are meant for users."""


class TaskNotFound(StorageError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} is not in the cache")
        self.task_id = task_id


class PieceNotFound(StorageError):
    def __init__(self, task_id: str, number: int) -> None:
        super().__init__(f"piece {number} of task {task_id} is not in the cache")


class PieceCorrupt(StorageError):
    """The bytes on disk no longer match the CRC recorded when they were written."""


class TaskInUse(StorageError):
    """A task cannot be deleted: holders or in-flight work reference it."""

    def __init__(self, refs: References) -> None:
        parts = []
        if refs.holds:
            parts.append("held by " + ", ".join(refs.holders))
        if refs.downloads:
            parts.append(f"{refs.downloads} download(s) in flight")
        if refs.uploads:
            parts.append(f"{refs.uploads} upload(s) in flight")
        super().__init__(f"task {refs.task_id} is in use: " + "; ".join(parts))
        self.refs = refs


class StorageFull(StorageError):
    """A download cannot fit in the quota because data in use fills it."""


class DiskFull(StorageFull):
    """The filesystem ran out of space under a write; the piece being written never became visible."""


class InvalidPiece(StorageError):
    """A piece write that does not fit the task (offset, length or number out of range)."""
