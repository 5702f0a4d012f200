"""Collecting pieces from parents, one module at a time: fake parents, a real storage on disk.

The parents here are in-process fakes of ``ParentClient`` (the process tests run the real gRPC one); what is
checked is what the collection does with them: which parent is asked for which piece, what is reported, and
that the stored bytes are the origin's.
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest

from dfdaemon import ids
from dfdaemon.download import committer as committer_module
from dfdaemon.download.manager import DownloadManager, DownloadRequest, TaskJob
from dfdaemon.download.parents import BadPiece, PieceCollection, check_digests, check_place, collect_from_parents
from dfdaemon.download.peering import (
    Decision,
    FetchedPiece,
    NormalTask,
    Parent,
    PieceUnavailable,
    Registration,
)
from dfdaemon.download.scheduled import ScheduledFetch
from dfdaemon.ids import PieceSpan
from dfdaemon.ratelimit import Bandwidth
from dfdaemon.storage import DiskFull, PieceFile, PieceRecord, Storage, TaskInfo, TaskWriter, TrafficType
from tests.storage_support import make_id, payload, read_all

PIECE_LENGTH = 1024
SIZE = 4 * PIECE_LENGTH + 100  # five pieces, the last one short
CONTENT = payload("parents", SIZE)
TASK_ID = make_id("parents")
SPANS = ids.pieces_for(SIZE, PIECE_LENGTH)


def parent(name: str) -> Parent:
    return Parent(peer_id=f"peer-{name}", host_id=f"host-{name}", ip="127.0.0.1", port=1)


A, B = parent("a"), parent("b")


@dataclass
class FakeParents:
    """Parents that hold some pieces; one may break, one may send a corrupted copy, one may wait before syncing."""

    holdings: dict[str, set[int]]
    broken: set[str] = field(default_factory=set)
    corrupt: set[tuple[str, int]] = field(default_factory=set)
    sync_broken: set[str] = field(default_factory=set)
    # A parent named here syncs only once some parent has failed a piece (it "joins late").
    late: set[str] = field(default_factory=set)
    first_failure: asyncio.Event = field(default_factory=asyncio.Event)
    asked: list[tuple[str, int]] = field(default_factory=list)

    async def sync_pieces(self, parent: Parent, task_id: str, interested: list[int]) -> AsyncIterator[PieceSpan]:
        assert task_id == TASK_ID
        if parent.peer_id in self.late:
            await self.first_failure.wait()
        if parent.peer_id in self.sync_broken:
            raise ConnectionError("stream reset")
        for number in interested:
            if number in self.holdings.get(parent.peer_id, set()):
                yield SPANS[number]

    async def download_piece(self, parent: Parent, task_id: str, number: int) -> FetchedPiece:
        self.asked.append((parent.peer_id, number))
        if parent.peer_id in self.broken:
            self.first_failure.set()
            raise ConnectionError("connection reset by peer")
        span = SPANS[number]
        content = CONTENT[span.offset : span.end]
        digest = ids.piece_digest(content)
        if (parent.peer_id, number) in self.corrupt:
            self.first_failure.set()
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        metadata = ids.piece_metadata_digest(number, span.offset, span.length, digest)
        return FetchedPiece(number, span.offset, span.length, digest, metadata, content)


@dataclass
class Reports:
    pieces: list[PieceRecord] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)

    async def on_piece(self, piece: PieceRecord) -> None:
        self.pieces.append(piece)

    async def on_failure(self, number: int, parent: Parent) -> None:
        self.failures.append((number, parent.peer_id))

    def served_by(self) -> dict[int, str | None]:
        return {piece.number: piece.parent_id for piece in self.pieces}


def task_info() -> TaskInfo:
    return TaskInfo(url="http://origin.test/parents", piece_length=PIECE_LENGTH, content_length=SIZE)


async def collect(
    storage: Storage, parents: list[Parent], client: FakeParents, *, concurrency: int = 2
) -> tuple[list[Parent], Reports]:
    """Run one collection into a finished task; returns the failed parents and what was reported."""
    reports = Reports()
    async with storage.download(TASK_ID, task_info()) as writer:
        failed = await collect_from_parents(
            TASK_ID,
            SPANS,
            parents,
            client,
            writer,
            concurrency=concurrency,
            piece_timeout=30.0,
            on_piece=reports.on_piece,
            on_failure=reports.on_failure,
        )
        if len(reports.pieces) == len(SPANS):
            await writer.finish()
        else:
            await writer.fail()
    return failed, reports


async def test_every_piece_comes_from_the_parents_that_hold_them(storage: Storage) -> None:
    client = FakeParents({A.peer_id: {0, 1, 2}, B.peer_id: {3, 4}})
    failed, reports = await collect(storage, [A, B], client)
    assert failed == []
    assert reports.failures == []
    assert reports.served_by() == {0: A.peer_id, 1: A.peer_id, 2: A.peer_id, 3: B.peer_id, 4: B.peer_id}
    assert all(piece.traffic_type == TrafficType.REMOTE_PEER for piece in reports.pieces)
    assert hashlib.sha256(await read_all(storage, TASK_ID)).digest() == hashlib.sha256(CONTENT).digest()


@dataclass
class BufferedParents(FakeParents):
    """Parents whose pieces arrive as views of one reused buffer each, as the vortex client hands them over."""

    released: list[int] = field(default_factory=list)

    async def download_piece(self, parent: Parent, task_id: str, number: int) -> FetchedPiece:
        piece = await super().download_piece(parent, task_id, number)
        buffer = bytearray(piece.content)
        view = memoryview(buffer)

        def release() -> None:
            view.release()
            buffer[:] = b"\xee" * len(buffer)  # reused for the next fetch: a late write would store garbage
            self.released.append(number)

        return FetchedPiece(
            piece.number, piece.offset, piece.length, piece.digest, piece.metadata_digest, view, release
        )


async def test_pieces_in_reused_buffers_are_stored_before_their_buffer_is_handed_back(storage: Storage) -> None:
    client = BufferedParents({A.peer_id: set(range(5)), B.peer_id: {2}}, corrupt={(A.peer_id, 2)}, late={B.peer_id})
    failed, reports = await collect(storage, [A, B], client, concurrency=3)
    assert failed == []
    assert reports.failures == [(2, A.peer_id)]
    assert sorted(client.released) == sorted(number for _, number in client.asked)  # each buffer once, bad too
    assert sorted(piece.number for piece in reports.pieces) == list(range(5))
    assert await read_all(storage, TASK_ID) == CONTENT


async def test_a_piece_is_reported_only_once_it_is_visible(storage: Storage) -> None:
    client = FakeParents({A.peer_id: set(range(5))})
    visible: list[bool] = []

    async def on_piece(piece: PieceRecord) -> None:
        visible.append(await storage.piece(TASK_ID, piece.number) == piece)

    async with storage.download(TASK_ID, task_info()) as writer:
        await collect_from_parents(
            TASK_ID,
            SPANS,
            [A],
            client,
            writer,
            concurrency=2,
            piece_timeout=30.0,
            on_piece=on_piece,
            on_failure=Reports().on_failure,
        )
    assert visible == [True] * 5


async def test_a_broken_parent_is_asked_once_then_avoided(storage: Storage) -> None:
    client = FakeParents({A.peer_id: set(range(5)), B.peer_id: set(range(5))}, broken={A.peer_id}, late={B.peer_id})
    failed, reports = await collect(storage, [A, B], client, concurrency=1)
    assert failed == [A]
    assert [name for name, _ in client.asked].count(A.peer_id) == 1
    assert len(reports.failures) == 1 and reports.failures[0][1] == A.peer_id
    assert set(reports.served_by().values()) == {B.peer_id}
    assert await read_all(storage, TASK_ID) == CONTENT


async def test_a_bad_copy_avoids_the_parent_for_that_piece_only(storage: Storage) -> None:
    client = FakeParents({A.peer_id: set(range(5)), B.peer_id: {2}}, corrupt={(A.peer_id, 2)}, late={B.peer_id})
    failed, reports = await collect(storage, [A, B], client, concurrency=1)
    assert failed == []  # one bad copy is no reason to drop the parent
    assert reports.failures == [(2, A.peer_id)]
    assert reports.served_by() == {0: A.peer_id, 1: A.peer_id, 2: B.peer_id, 3: A.peer_id, 4: A.peer_id}
    assert await read_all(storage, TASK_ID) == CONTENT


async def test_a_parent_whose_sync_breaks_is_failed_and_the_others_supply(storage: Storage) -> None:
    client = FakeParents({A.peer_id: set(range(5)), B.peer_id: set(range(5))}, sync_broken={A.peer_id})
    failed, reports = await collect(storage, [A, B], client)
    assert failed == [A]
    assert reports.failures == [(-1, A.peer_id)]  # not about any one piece
    assert A.peer_id not in {name for name, _ in client.asked}
    assert await read_all(storage, TASK_ID) == CONTENT


async def test_a_piece_no_parent_has_ends_the_collection_without_it(storage: Storage) -> None:
    client = FakeParents({A.peer_id: {0, 1, 2, 3}})
    failed, reports = await collect(storage, [A], client)
    assert failed == []
    assert sorted(reports.served_by()) == [0, 1, 2, 3]
    assert (A.peer_id, 4) not in client.asked


async def test_failing_a_parent_hands_its_pieces_to_the_other_parents() -> None:
    reports = Reports()
    writer = cast(TaskWriter, object())  # never written to: no piece is fetched here
    collection = PieceCollection(
        TASK_ID,
        SPANS,
        FakeParents({}),
        writer,
        piece_timeout=30.0,
        on_piece=reports.on_piece,
        on_failure=reports.on_failure,
    )
    collection.available = {0: [A, B], 1: [A], 2: [A, B], 3: [B, A]}
    collection.done = {2}
    collection.busy = {3}
    await collection.fail(A, 0, "connection reset")
    assert collection.failed == {A.peer_id: A}
    assert reports.failures == [(0, A.peer_id)]
    # 0 goes to B; 1 has nobody else; 2 is in; 3 is being fetched already.
    assert collection.queued == {0}
    assert collection.queue.get_nowait() == 0
    assert collection.wake.is_set()


def fetched(span: PieceSpan, content: bytes, *, number: int | None = None, metadata: str | None = None) -> FetchedPiece:
    digest = ids.format_crc32(zlib.crc32(content))
    return FetchedPiece(
        number if number is not None else span.number, span.offset, span.length, digest, metadata, content
    )


def check(span: PieceSpan, piece: FetchedPiece) -> None:
    """Both checks, the CRC computed over the bytes as the writer does."""
    check_place(span, piece)
    check_digests(span, piece, zlib.crc32(piece.content))


def test_check_piece_accepts_the_right_bytes_with_both_digests() -> None:
    span = SPANS[1]
    content = CONTENT[span.offset : span.end]
    metadata = ids.piece_metadata_digest(span.number, span.offset, span.length, ids.piece_digest(content))
    check(span, fetched(span, content, metadata=metadata))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong number", "parent sent #2"),
        ("short", "parent sent 1023 of 1024 bytes"),
        ("flipped byte", "piece 1 has digest crc32:[0-9]+, the parent sent"),
        ("wrong metadata digest", "metadata digest crc32:1 !="),
    ],
)
def test_check_piece_refuses_what_does_not_match(case: str, message: str) -> None:
    span = SPANS[1]
    content = CONTENT[span.offset : span.end]
    piece = {
        "wrong number": fetched(span, content, number=2),
        "short": fetched(span, content[:-1]),
        "flipped byte": FetchedPiece(1, span.offset, span.length, ids.piece_digest(content), None, b"\0" + content[1:]),
        "wrong metadata digest": fetched(span, content, metadata="crc32:1"),
    }[case]
    with pytest.raises(BadPiece, match=message):
        check(span, piece)
    assert issubclass(BadPiece, PieceUnavailable)  # a bad copy is the piece's fault, not the parent's


@dataclass
class FakeSession:
    """An AnnouncePeer stream that offers ``parents`` once and records every report."""

    parents: list[Parent]
    reports: list[tuple[str, object]] = field(default_factory=list)

    async def register(self, registration: Registration) -> None:
        self.reports.append(("register", registration.piece_count))

    async def decision(self) -> Decision:
        return NormalTask(self.parents)

    async def download_started(self) -> None:
        self.reports.append(("started", None))

    async def back_to_source_started(self, description: str) -> None:
        raise AssertionError("not sent back to source")

    async def piece_finished(self, piece: PieceRecord) -> None:
        self.reports.append(("piece", piece.number))

    async def back_to_source_piece_finished(self, piece: PieceRecord) -> None:
        raise AssertionError("not sent back to source")

    async def piece_failed(self, number: int, parent_id: str, temporary: bool) -> None:
        self.reports.append(("piece_failed", (number, parent_id, temporary)))

    async def reschedule(self, failed_parents: list[Parent], description: str) -> None:
        raise AssertionError("the second parent supplies everything")

    async def finished(self, *, back_to_source: bool) -> None:
        self.reports.append(("finished", back_to_source))

    async def failed(self, description: str, *, back_to_source: bool) -> None:
        self.reports.append(("failed", (description, back_to_source)))

    async def close(self) -> None:
        self.reports.append(("closed", None))


@dataclass
class FakeScheduler:
    session: FakeSession

    def open_session(self, task_id: str, peer_id: str) -> FakeSession:
        return self.session


@dataclass
class FakeManager:
    """What ScheduledFetch reads of the manager when the request names its own concurrency."""

    concurrent_piece_count: int = 2
    bandwidth: Bandwidth = field(default_factory=Bandwidth.of)


async def test_a_failing_parent_is_reported_temporary_to_the_scheduler(storage: Storage) -> None:
    session = FakeSession([A, B])
    client = FakeParents({A.peer_id: set(range(5)), B.peer_id: set(range(5))}, broken={A.peer_id}, late={B.peer_id})
    fetch = ScheduledFetch(  # a task this small would otherwise skip the scheduler (test_small_download)
        cast(DownloadManager, FakeManager()), FakeScheduler(session), client, piece_timeout=30.0, small_download_limit=0
    )
    job = TaskJob(TASK_ID, "peer-self", DownloadRequest(url="http://origin.test/parents", concurrent_piece_count=1))
    job.content_length, job.piece_length = SIZE, PIECE_LENGTH
    async with storage.download(TASK_ID, task_info()) as writer:
        job.writer = writer
        await fetch(job)
        await writer.finish()
    failures = [report for kind, report in session.reports if kind == "piece_failed"]
    assert len(failures) == 1
    _, parent_id, temporary = cast(tuple[int, str, bool], failures[0])
    assert (parent_id, temporary) == (A.peer_id, True)
    assert sorted(n for kind, n in session.reports if kind == "piece") == list(range(5))
    assert session.reports[-2:] == [("finished", False), ("closed", None)]
    assert await read_all(storage, TASK_ID) == CONTENT


async def test_a_failed_commit_fails_the_download_blames_no_parent_and_tells_the_scheduler(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committing is local work (an fdatasync, a transaction): when it fails, no parent is at fault and fetching the
    pieces elsewhere cannot help, so the download stops with the disk's error and the scheduler hears this peer
    failed."""

    async def failing_commit(file: PieceFile, pieces: list[PieceRecord]) -> None:
        raise DiskFull("no space left on the cache's filesystem")

    monkeypatch.setattr(PieceFile, "commit", failing_commit)
    session = FakeSession([A, B])
    client = FakeParents({A.peer_id: set(range(5)), B.peer_id: set(range(5))})
    fetch = ScheduledFetch(
        cast(DownloadManager, FakeManager()), FakeScheduler(session), client, piece_timeout=30.0, small_download_limit=0
    )
    job = TaskJob(TASK_ID, "peer-self", DownloadRequest(url="http://origin.test/parents"))
    job.content_length, job.piece_length = SIZE, PIECE_LENGTH
    async with storage.download(TASK_ID, task_info()) as writer:
        job.writer = writer
        with pytest.raises(DiskFull, match="no space left"):
            await fetch(job)
        await writer.fail()
    assert [kind for kind, _ in session.reports] == ["register", "started", "failed", "closed"]
    assert session.reports[2] == ("failed", ("no space left on the cache's filesystem", False))
    assert await storage.pieces(TASK_ID) == []


async def test_pieces_staged_close_together_are_committed_in_one_batch(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each commit is an fdatasync: pieces staged one after another wait (briefly) to be committed together, and
    the last of the task are committed at once rather than after the wait."""
    batches: list[list[int]] = []
    real_commit = PieceFile.commit

    async def counting_commit(file: PieceFile, pieces: list[PieceRecord]) -> None:
        batches.append([piece.number for piece in pieces])
        await real_commit(file, pieces)

    monkeypatch.setattr(PieceFile, "commit", counting_commit)
    # A batch would wait this long for more pieces: far longer than the bound below, so only committing the task's
    # last pieces at once can meet it.
    monkeypatch.setattr(committer_module, "COMMIT_DELAY", 60.0)
    client = FakeParents({A.peer_id: {0, 1, 2, 3, 4}})
    started = asyncio.get_running_loop().time()
    failed, reports = await collect(storage, [A], client, concurrency=1)
    assert failed == [] and len(reports.pieces) == len(SPANS)
    assert batches == [[0, 1, 2, 3, 4]]
    assert asyncio.get_running_loop().time() - started < 30
