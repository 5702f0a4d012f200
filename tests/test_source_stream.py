"""Back to source as one stream: a DownloadManager with real storage against a loopback aiohttp origin.

The origin counts connections and GETs, can cut its first answer after some bytes, and can ignore Range.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from dfdaemon.backend import Backend, BackendError, RetryPolicy
from dfdaemon.download import DownloadManager, DownloadRequest, PieceDone, Started, TaskJob
from dfdaemon.download.committer import COMMIT_DELAY, COMMIT_PIECES, BatchCommitter
from dfdaemon.gc import GarbageCollector, GCPolicy
from dfdaemon.storage import PieceRecord, Storage, TaskState, TrafficType
from tests.storage_support import seeded_bytes
from tests.support import serving

MIB = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Origin:
    body: bytes
    ranges: bool = True
    cut_first_at: int | None = None  # the first GETs' connections are dropped after this many body bytes
    cuts: int = 1  # how many GETs are cut
    chunked_gets: set[int] = field(default_factory=set)  # which GETs (0 the first) answer in chunked encoding
    connections: set[tuple[str, int]] = field(default_factory=set)
    gets: list[str | None] = field(default_factory=list)  # each GET's Range header
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.connections.add(request.transport.get_extra_info("peername") if request.transport else ("", 0))
        start, end = 0, len(self.body)
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        ranged = self.ranges and match is not None
        if match is not None and self.ranges:
            start, end = int(match.group(1)), min(int(match.group(2)) + 1, len(self.body))
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes" if self.ranges else "none"}
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(self.body)}"
        probe = request.method == "HEAD" or request.headers.get("Range") == "bytes=0-0"  # a length probe: no stream
        response = web.StreamResponse(status=206 if ranged else 200, headers=headers)
        if not probe and len(self.gets) in self.chunked_gets:
            del response.headers["Content-Length"]
            response.enable_chunked_encoding()
        await response.prepare(request)
        if probe:
            return response
        self.gets.append(request.headers.get("Range"))
        if self.cut_first_at is not None and len(self.gets) <= self.cuts:
            await response.write(self.body[start : start + self.cut_first_at])
            assert request.transport is not None
            request.transport.abort()
            return response
        for offset in range(start, end, 256 * 1024):
            await response.write(self.body[offset : min(offset + 256 * 1024, end)])
        await response.write_eof()
        return response


@dataclass
class Daemon:
    storage: Storage
    manager: DownloadManager
    reported: list[tuple[PieceRecord, bool]]  # each piece reported to the scheduler, and whether it was committed


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    storage = Storage(tmp_path / "storage")
    await storage.open()
    backend = Backend(timeout=10, retry=RetryPolicy(attempts=2, initial_backoff=0.01))
    manager = DownloadManager(
        storage, GarbageCollector(storage, GCPolicy()), backend, host_ip="127.0.0.1", hostname="t"
    )
    reported: list[tuple[PieceRecord, bool]] = []

    async def scheduled(job: TaskJob) -> None:  # reports each piece as the scheduler flow does
        async def report(piece: PieceRecord) -> None:
            reported.append((piece, await storage.piece(job.task_id, piece.number) is not None))

        await manager.back_to_source(job, on_piece=report)

    manager.fetch_missing = scheduled
    try:
        yield Daemon(storage, manager, reported)
    finally:
        await manager.close()
        await backend.close()
        await storage.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    served = Origin(seeded_bytes("test_source_stream-1", 10 * MIB + 12345))
    app = web.Application()
    app.router.add_route("*", "/file", served.handle)
    async with serving(app) as port:
        served.url = f"http://127.0.0.1:{port}/file"
        yield served


async def fetch(daemon: Daemon, url: str) -> tuple[Started, list[PieceDone]]:
    events = [event async for event in daemon.manager.download(DownloadRequest(url=url))]
    started, pieces = events[0], events[1:]
    assert isinstance(started, Started)
    assert all(isinstance(piece, PieceDone) for piece in pieces)
    return started, [piece for piece in pieces if isinstance(piece, PieceDone)]


def stored(daemon: Daemon, task_id: str) -> bytes:
    return daemon.storage.content.path(task_id).read_bytes()


async def test_a_task_is_one_get_on_one_connection_and_each_piece_is_reported_once_committed(
    daemon: Daemon, origin: Origin
) -> None:
    started, pieces = await fetch(daemon, origin.url)
    assert hashlib.sha256(stored(daemon, started.task_id)).digest() == hashlib.sha256(origin.body).digest()
    assert origin.gets == [f"bytes=0-{len(origin.body) - 1}"]
    assert len(origin.connections) == 1  # the HEAD's connection was reused for the GET
    assert sorted(p.piece.number for p in pieces) == [0, 1, 2]
    assert all(p.traffic_type == TrafficType.BACK_TO_SOURCE for p in pieces)
    assert sorted(piece.number for piece, _ in daemon.reported) == [0, 1, 2]
    assert all(committed for _, committed in daemon.reported), "a piece was reported before it was committed"
    for piece, _ in daemon.reported:
        span = origin.body[piece.offset : piece.offset + piece.length]
        assert (await daemon.storage.read_piece(started.task_id, piece.number))[1] == span


# A plain answer is read by the writing thread straight from the socket, a chunked one through aiohttp on the loop.
READINGS = pytest.mark.parametrize("chunked", [False, True], ids=["direct", "aiohttp"])


@READINGS
async def test_a_stream_broken_mid_piece_resumes_at_the_byte_where_it_broke(
    daemon: Daemon, origin: Origin, chunked: bool
) -> None:
    origin.cut_first_at = 5 * MIB + 777  # inside the second piece
    origin.chunked_gets = {0, 1} if chunked else set()
    started, pieces = await fetch(daemon, origin.url)
    assert hashlib.sha256(stored(daemon, started.task_id)).hexdigest() == hashlib.sha256(origin.body).hexdigest()
    assert origin.gets == [f"bytes=0-{len(origin.body) - 1}", f"bytes={5 * MIB + 777}-{len(origin.body) - 1}"]
    assert sorted(p.piece.number for p in pieces) == [0, 1, 2]


@pytest.mark.parametrize("chunked", [{0}, {1}], ids=["aiohttp-then-direct", "direct-then-aiohttp"])
async def test_a_piece_broken_in_one_way_of_reading_is_finished_in_the_other(
    daemon: Daemon, origin: Origin, chunked: set[int]
) -> None:
    """A chunked answer is read through aiohttp, a plain one by the writing thread: a piece begun one way and
    resumed the other keeps its bytes and CRC (a wrong CRC fails the piece's commit check on read below)."""
    origin.cut_first_at, origin.chunked_gets = 5 * MIB + 777, chunked
    started, pieces = await fetch(daemon, origin.url)
    assert stored(daemon, started.task_id) == origin.body
    assert origin.gets == [f"bytes=0-{len(origin.body) - 1}", f"bytes={5 * MIB + 777}-{len(origin.body) - 1}"]
    for done in pieces:
        span = origin.body[done.piece.offset : done.piece.offset + done.piece.length]
        assert (await daemon.storage.read_piece(started.task_id, done.piece.number))[1] == span  # CRC-checked


@READINGS
@pytest.mark.parametrize("cut", [None, 3 * MIB])
async def test_an_origin_that_ignores_ranges_is_read_whole(
    daemon: Daemon, origin: Origin, cut: int | None, chunked: bool
) -> None:
    origin.ranges, origin.cut_first_at = False, cut
    origin.chunked_gets = {0, 1} if chunked else set()
    started, pieces = await fetch(daemon, origin.url)
    assert stored(daemon, started.task_id) == origin.body
    assert len(origin.gets) == (1 if cut is None else 2)  # a resume reads the body again, skipping what it has
    assert sorted(p.piece.number for p in pieces) == [0, 1, 2]


async def test_a_stream_that_breaks_without_progress_fails_after_its_attempts(daemon: Daemon, origin: Origin) -> None:
    origin.cut_first_at, origin.cuts = MIB, 10  # every answer stops short of completing a 4 MiB piece
    with pytest.raises(BackendError, match="broke"):
        await fetch(daemon, origin.url)
    assert len(origin.gets) == daemon.manager.piece_attempts
    [task] = await daemon.storage.list_tasks()
    assert task.state is TaskState.FAILED


class RecordingFile:
    """Stands in for a PieceFile: records the batches committed."""

    def __init__(self) -> None:
        self.committed: list[list[int]] = []

    async def commit(self, pieces: list[PieceRecord]) -> None:
        self.committed.append([piece.number for piece in pieces])


def piece_record(number: int) -> PieceRecord:
    return PieceRecord(
        "t", number, offset=number, length=1, crc=0, parent_id=None, traffic_type=0, cost=0, created_at=0
    )


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):  # a liveness bound (about 5 s), not a measurement
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never came true")


async def test_a_commit_does_not_wait_for_the_announcements_of_the_batch_before() -> None:
    """Announcements (followers, the scheduler) run beside the commits, in order; ``close`` waits for them all."""
    file, announced, release = RecordingFile(), [], asyncio.Event()

    async def announce(piece: PieceRecord) -> None:
        await release.wait()  # the first batch's announcements hang until released
        announced.append(piece.number)

    committer = BatchCommitter(file, announce, pieces=4 * COMMIT_PIECES)  # type: ignore[arg-type]
    for number in range(2 * COMMIT_PIECES):
        committer.add(piece_record(number))
        await asyncio.sleep(0)
    await until(lambda: len(file.committed) == 2)  # both batches committed while the first one's announcements hang
    assert [len(batch) for batch in file.committed] == [COMMIT_PIECES, COMMIT_PIECES]
    assert announced == []
    closing = asyncio.create_task(committer.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    release.set()
    await closing
    assert announced == list(range(2 * COMMIT_PIECES))


async def test_a_failed_announcement_reaches_the_stream_and_close() -> None:
    async def announce(piece: PieceRecord) -> None:
        raise RuntimeError(f"follower gone at piece {piece.number}")

    committer = BatchCommitter(RecordingFile(), announce, pieces=4 * COMMIT_PIECES)  # type: ignore[arg-type]
    for number in range(COMMIT_PIECES):
        committer.add(piece_record(number))
    await until(lambda: committer._announcing is not None and committer._announcing.done())
    with pytest.raises(RuntimeError, match="piece 0"):
        committer.add(piece_record(COMMIT_PIECES))
    with pytest.raises(RuntimeError, match="piece 0"):
        await committer.close()


async def test_abandon_stops_every_announcement_still_to_come() -> None:
    """A download that failed announces nothing more, from any batch committed before it failed."""
    file, announced, release = RecordingFile(), [], asyncio.Event()

    async def announce(piece: PieceRecord) -> None:
        await release.wait()
        announced.append(piece.number)

    committer = BatchCommitter(file, announce, pieces=4 * COMMIT_PIECES)  # type: ignore[arg-type]
    for number in range(2 * COMMIT_PIECES):
        committer.add(piece_record(number))
        await asyncio.sleep(0)
    await until(lambda: len(file.committed) == 2)
    committer.abandon()
    release.set()
    await asyncio.sleep(0.05)
    assert announced == []


class FailingFile(RecordingFile):
    """A PieceFile whose first commit fails (a full disk) once ``fail`` is set; every later one would succeed."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = asyncio.Event()

    async def commit(self, pieces: list[PieceRecord]) -> None:
        if not self.committed:
            self.committed.append([])
            await self.fail.wait()
            raise OSError(28, f"no space left committing piece {pieces[0].number}")
        await super().commit(pieces)


async def test_the_first_failed_commit_stops_the_batches_and_is_what_every_later_call_raises() -> None:
    """A batch that failed is not replaced by a later one, not even by the batch timer of a piece added while it
    ran: nothing after it is made visible (the file's state is unknown), and ``add``, ``check`` and ``close`` all
    raise the first failure."""
    file, woken, announced = FailingFile(), [], []

    async def announce(piece: PieceRecord) -> None:
        announced.append(piece.number)

    committer = BatchCommitter(file, announce, pieces=4 * COMMIT_PIECES, on_failure=lambda: woken.append(True))
    for number in range(COMMIT_PIECES + 1):  # a full batch goes to commit; the one after it waits for the timer
        committer.add(piece_record(number))
        await asyncio.sleep(0)
    file.fail.set()
    await until(lambda: woken == [True])
    await asyncio.sleep(2 * COMMIT_DELAY)  # the timer fires
    assert file.committed == [[]] and announced == []
    for call in (lambda: committer.add(piece_record(COMMIT_PIECES + 1)), committer.check):
        with pytest.raises(OSError, match="piece 0"):
            call()
    with pytest.raises(OSError, match="piece 0"):
        await committer.close()
    assert file.committed == [[]] and announced == [] and woken == [True]
