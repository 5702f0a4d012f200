"""What the download path needs from the P2P network, in domain terms.

A scheduler session decides where a peer gets its pieces (no pieces at all, candidate parents, or
back to source) and hears about every piece; a parent client lists and fetches a parent's pieces.
The gRPC layer implements both; the download path never sees protobuf.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from dfdaemon.download.manager import DownloadRequest
from dfdaemon.ids import PieceSpan
from dfdaemon.storage import IncomingPiece, PieceRecord


@dataclass(frozen=True)
class Parent:
    """A peer that has (or is fetching) the task, reachable at ``ip:port`` (its upload server)."""

    peer_id: str
    host_id: str
    ip: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class EmptyTask:
    """The task has no content: nothing to fetch."""


@dataclass(frozen=True)
class NormalTask:
    parents: list[Parent] = field(default_factory=list)


@dataclass(frozen=True)
class BackToSource:
    description: str = ""


Decision = EmptyTask | NormalTask | BackToSource


@dataclass(frozen=True)
class Registration:
    """What a peer tells the scheduler when it registers for a task: the caller's download as received (the
    scheduler passes it on to a seed peer, which must name the same task), and the sizes this peer measured."""

    task_id: str
    peer_id: str
    download: DownloadRequest
    content_length: int
    actual_piece_length: int
    piece_count: int
    concurrent_piece_count: int


@dataclass(frozen=True)
class FetchedPiece:
    """A piece's bytes as a parent sent them (or sends them still), with the digests to check them against.

    ``content`` may be the bytes, or an ``IncomingPiece`` whose bytes the collector's writing thread receives
    block by block, computing the CRC in the same pass. Either way the collector calls ``done`` once it is through
    with them, which lets the client reuse its buffer or end its connection.
    """

    number: int
    offset: int
    length: int
    digest: str
    metadata_digest: str | None
    content: bytes | memoryview | IncomingPiece
    release: Callable[[], None] | None = None

    def done(self) -> None:
        """The bytes are written or refused; the release hook runs once however often this is called."""
        release = self.release
        if release is not None:
            object.__setattr__(self, "release", None)  # frozen for everything else
            release()


class SchedulerSession(Protocol):
    """One AnnouncePeer stream; ends after a terminal report."""

    async def register(self, registration: Registration) -> None: ...

    async def decision(self) -> Decision: ...

    async def download_started(self) -> None: ...

    async def back_to_source_started(self, description: str) -> None: ...

    async def piece_finished(self, piece: PieceRecord) -> None: ...

    async def back_to_source_piece_finished(self, piece: PieceRecord) -> None: ...

    async def piece_failed(self, number: int, parent_id: str, temporary: bool) -> None: ...

    async def reschedule(self, candidates: list[Parent], description: str) -> None: ...

    async def finished(self, *, back_to_source: bool) -> None: ...

    async def failed(self, description: str, *, back_to_source: bool) -> None: ...

    async def close(self) -> None: ...


class Scheduler(Protocol):
    def open_session(self, task_id: str, peer_id: str) -> SchedulerSession: ...


class ParentClient(Protocol):
    """Fetches from other peers' upload servers."""

    def sync_pieces(self, parent: Parent, task_id: str, interested: list[int]) -> AsyncIterator[PieceSpan]: ...

    async def download_piece(self, parent: Parent, task_id: str, number: int) -> FetchedPiece: ...


class SchedulerUnavailable(Exception):
    """The scheduler could not be reached or broke the session."""


class PieceUnavailable(Exception):
    """A parent cannot serve this one piece (it lacks it, or its copy failed its CRC); others may still serve."""


class ParentUnavailable(Exception):
    """A parent cannot be reached or keeps failing: avoid it for the rest of the download."""
