"""A state machine over the storage and GC: whatever the interleaving, data in use is never evicted.

The machine drives the real ``Storage`` (SQLite and content files in a temporary directory) and a real
``GarbageCollector`` with a small quota through random interleavings of finished stores, downloads and uploads
held open across steps, acquires (permanent and leased), releases, keep-alives, syncs, the passing of time (to
the moment leases lapse, too), deletes (plain and forced), restarts, GC runs (real, dry, and a dry one right
before a real one) and requests for room for a download. It keeps a model of every task, hold row and open
reference and, after every step, checks that:

* a task with a live holder, an open writer or an open reader is present and every piece it stored reads back
  byte-identical to the origin's bytes, and so does every other task still listed;
* the storage agrees with the model: tasks, states, timestamps, pieces, live holds, lapsed leases not yet purged
  and in-flight counts;
* accounting matches the disk: ``content_bytes`` is the sum of the content files and ``used_bytes()`` is exactly
  what ``du -sb`` says;
* the metadata and the content directory correspond one to one, and no per-task lock outlives its users.

A lapsed lease is no hold: it protects nothing, a keep-alive does not revive it, a sync acquires its task anew,
releasing it reports nothing, and it counts as released at the moment it lapsed (whether or not a real GC run
purged it yet), which starts the task's grace period then.

After every GC run it checks the run against the policy, replayed on the measurements the run took (each one is
checked against ``du -sb`` at the moment it was taken): exactly the unreferenced, settled tasks are candidates;
failed, stale and idle ones go; if the usage predicted from the run's first measurement (taken after a real run
purged lapsed leases) is at or above the high watermark, or above the quota less the room reserved, quota
evictions go least recently used first while the predicted usage is above the target (the low watermark, or less
to leave the room) and then, in a real run, one by one while the measured usage still is; a real run that had to
act ends above the target only if everything left is protected; "quota exceeded by data in use" is reported
exactly when the quota acted and the usage it ended with (measured, or predicted in a dry run) is still at or
above the high watermark or above the quota less the room; a dry run right before a real one predicts it; and a
request for room fails exactly when the usage measured after its run leaves no room.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from dfdaemon.gc import GarbageCollector, GCPolicy, GCReport, Limits
from dfdaemon.ids import PieceSpan, pieces_for
from dfdaemon.storage import (
    PieceNotFound,
    Storage,
    StorageFull,
    SyncResult,
    TaskInfo,
    TaskInUse,
    TaskNotFound,
    TaskReader,
    TaskState,
    TaskWriter,
)
from tests.storage_support import FakeClock, du_bytes, make_id, payload

T = TypeVar("T")

POLICY = GCPolicy(quota_bytes=500_000, grace_period=30, task_ttl=600, stale_after=120)
# SQLite's page: the metadata file (its log folded back) only ever grows by whole pages.
PAGE = 4096
# A run the quota stays out of predicts its usage from the content bytes it frees; what evicting writes to the
# metadata itself (a page or two) is not in that prediction. That is the only slack any check allows.
SLACK = 2 * PAGE

NAMES = st.sampled_from(
    ["alpine", "busybox", "redis", "nginx", "postgres", "python", "node", "golang", "ubuntu", "debian"]
)
HOLDERS = st.sampled_from(["container:default/web", "container:default/db", "runtime:cri"])
# Sizes at piece boundaries, spread evenly over a few KB to 150 KB (plain integers would mostly be tiny), and
# small ones, so the last eviction of a quota run can land anywhere around the low watermark.
SIZES = st.one_of(
    st.sampled_from([1, 16_384, 16_385, 65_536, 65_537, 150_000]),
    st.builds(lambda kilobytes, rest: kilobytes * 1000 + rest, st.integers(2, 149), st.integers(0, 999)),
    st.integers(1_000, 30_000),
)
PIECE_LENGTHS = st.sampled_from([16 * 1024, 64 * 1024])
TTLS = st.sampled_from([None, 20.0, 45.0, 90.0, 300.0])
SECONDS = st.sampled_from([1, 10, 29, 30, 31, 60, 119, 120, 121, 300, 600, 601]) | st.integers(1, 300)
OUTCOMES = st.sampled_from(["finish", "fail", "abandon", "crash"])
# Bytes a real run's measurements after its first find beyond the disk's: see ``_measuring``.
UNFORESEEN = st.sampled_from([0, PAGE, 30_000, 80_000])
# Room asked of GC for a download: small, around the watermarks and the quota, and more than the quota.
ROOM = st.sampled_from([1, 50_000, 100_000, 200_000, 500_000, 500_001]) | st.integers(1, 520_000)

MAX_WRITERS = 3
MAX_READERS = 3


@dataclass
class Lease:
    """One row of the holds table as the model sees it: live until ``expires_at``, kept until purged."""

    acquired_at: float
    expires_at: float | None
    ttl: float | None

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass
class ModelTask:
    """What must be true of one task's row, pieces and content file."""

    name: str
    tid: str
    size: int
    piece_length: int
    state: TaskState
    created_at: float
    updated_at: float
    last_used_at: float
    finished_at: float | None = None
    released_at: float | None = None
    pieces: set[int] = field(default_factory=set)
    file_size: int = 0
    uploaded_count: int = 0

    @property
    def spans(self) -> list[PieceSpan]:
        return pieces_for(self.size, self.piece_length)

    def expected(self, span: PieceSpan) -> bytes:
        return payload(self.name, self.size)[span.offset : span.end]


@dataclass(frozen=True)
class Measurement:
    """One usage measurement GC took: what it was told, what the disk held, and the content bytes accounted then."""

    seen: int
    actual: int
    content: int


@dataclass
class Plan:
    """What the policy says of every task just before a GC run, and the usage then."""

    protected: dict[str, str]  # task id -> why GC must keep it
    must_go: dict[str, str]  # task id -> why it goes whatever the quota
    lru: list[ModelTask]  # the quota's candidates, least recently used first
    by_id: dict[str, ModelTask]
    content: int
    measured: int


@dataclass(eq=False)
class OpenWriter:
    """A download in flight: its ``storage.download`` context is entered and not yet exited."""

    name: str
    context: contextlib.AbstractAsyncContextManager[TaskWriter]
    writer: TaskWriter
    written: int = 0

    def __repr__(self) -> str:
        return f"OpenWriter({self.name!r}, written={self.written})"


@dataclass(eq=False)
class OpenReader:
    """An upload in flight: its ``storage.upload`` context is entered and not yet exited."""

    name: str
    context: contextlib.AbstractAsyncContextManager[TaskReader]
    reader: TaskReader

    def __repr__(self) -> str:
        return f"OpenReader({self.name!r})"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _info(name: str, size: int, piece_length: int) -> TaskInfo:
    return TaskInfo(url=f"http://origin.test/{name}", piece_length=piece_length, content_length=size)


class StorageMachine(RuleBasedStateMachine):
    """One storage directory, one event loop and one model for the whole life of an example."""

    writers = Bundle("writers")
    readers = Bundle("readers")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="dfdaemon-stateful-"))
        self.runner = asyncio.Runner()
        self.clock = FakeClock()
        self.storage = Storage(self.root / "cache", clock=self.clock)
        self.gc = GarbageCollector(self.storage, POLICY)
        self.tasks: dict[str, ModelTask] = {}
        self.leases: dict[tuple[str, str], Lease] = {}  # (holder, task name) -> hold row, live or lapsed
        self.open_writers: list[OpenWriter] = []
        self.open_readers: list[OpenReader] = []
        try:
            self.run(self.storage.open())
            self.limits: Limits = self.run(self.gc.limits())
        except BaseException:
            self.runner.close()
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            try:
                for reader in self.open_readers:
                    self.run(reader.context.__aexit__(None, None, None))
                for writer in self.open_writers:
                    self.run(writer.context.__aexit__(None, None, None))
            finally:
                self.run(self.storage.close())
        finally:
            self.runner.close()
            shutil.rmtree(self.root, ignore_errors=True)

    # The model

    @property
    def now(self) -> float:
        return self.clock.now

    def _open_task(self, name: str, size: int, piece_length: int) -> ModelTask:
        """What ``storage.download`` does to the row: create it, resume it, or leave a finished task alone."""
        task = self.tasks.get(name)
        if task is None:
            task = ModelTask(
                name=name,
                tid=make_id(name),
                size=size,
                piece_length=piece_length,
                state=TaskState.RUNNING,
                created_at=self.now,
                updated_at=self.now,
                last_used_at=self.now,
            )
            self.tasks[name] = task
        elif task.state is not TaskState.SUCCEEDED:
            task.state = TaskState.RUNNING
            task.updated_at = task.last_used_at = self.now
        return task

    def _shape(self, name: str, size: int, piece_length: int) -> tuple[int, int]:
        """A task keeps the size and piece length it was created with for as long as it exists."""
        task = self.tasks.get(name)
        return (size, piece_length) if task is None else (task.size, task.piece_length)

    def _wrote(self, task: ModelTask, span: PieceSpan) -> None:
        task.pieces.add(span.number)
        task.file_size = max(task.file_size, span.end)
        task.updated_at = self.now

    def _finished(self, task: ModelTask) -> None:
        task.state = TaskState.SUCCEEDED
        task.finished_at = task.updated_at = task.last_used_at = self.now

    def _grant(self, holder: str, name: str, ttl: float | None) -> None:
        """What acquiring does to the hold row: a live one keeps its start, a lapsed one starts anew."""
        old = self.leases.get((holder, name))
        acquired_at = old.acquired_at if old is not None and old.live(self.now) else self.now
        self.leases[(holder, name)] = Lease(acquired_at, None if ttl is None else self.now + ttl, ttl)

    def _released(self, holder: str, name: str) -> None:
        """A live hold released: the row goes, and the task's grace period and its last use start now."""
        lease = self.leases.pop((holder, name))
        assert lease.live(self.now)
        task = self.tasks[name]
        task.released_at = task.last_used_at = self.now

    def _forget(self, name: str) -> None:
        del self.tasks[name]
        for key in [key for key in self.leases if key[1] == name]:
            del self.leases[key]

    def _lapsed(self) -> dict[str, float]:
        """The latest moment a lease lapsed, for each task with a lapsed lease not yet purged."""
        lapsed: dict[str, float] = {}
        for (_, name), lease in self.leases.items():
            if not lease.live(self.now):
                assert lease.expires_at is not None
                lapsed[name] = max(lapsed.get(name, 0.0), lease.expires_at)
        return lapsed

    def _purge_lapsed(self) -> int:
        """What a real GC run does first: drop lapsed leases, stamping each task released when its lease lapsed."""
        lapsed = [(key, lease) for key, lease in self.leases.items() if not lease.live(self.now)]
        for (holder, name), lease in lapsed:
            del self.leases[(holder, name)]
            task = self.tasks[name]
            task.released_at = max(task.released_at or 0.0, lease.expires_at or 0.0)
        return len(lapsed)

    def _live_holders(self, name: str) -> list[str]:
        return sorted(holder for (holder, held), lease in self.leases.items() if held == name and lease.live(self.now))

    def _live_names(self, holder: str) -> set[str]:
        return {name for (who, name), lease in self.leases.items() if who == holder and lease.live(self.now)}

    def _names(self) -> st.SearchStrategy[str]:
        """Names of tasks in flight or present, mostly, and sometimes any name."""
        busy = sorted({writer.name for writer in self.open_writers} | {reader.name for reader in self.open_readers})
        present = sorted(self.tasks)
        return st.one_of(*(st.sampled_from(names) for names in (busy, present) if names), NAMES)

    def _in_flight(self, name: str) -> tuple[int, int]:
        return (
            sum(handle.name == name for handle in self.open_writers),
            sum(handle.name == name for handle in self.open_readers),
        )

    def _in_use(self, name: str) -> bool:
        return bool(self._live_holders(name)) or self._in_flight(name) != (0, 0)

    def _protection(self, task: ModelTask, lapsed_at: float | None) -> str:
        """Why GC must keep a task now ("" when it may take it), in the order the policy states the reasons.

        ``lapsed_at`` is when the task's latest lapsed, unpurged lease lapsed: it counts as a release then.
        """
        downloads, uploads = self._in_flight(task.name)
        if self._live_holders(task.name):
            return "held"
        if downloads:
            return "downloading"
        if uploads:
            return "uploading"
        if task.state is TaskState.RUNNING and self.now - task.updated_at < POLICY.stale_after:
            return "downloading"
        if task.state is TaskState.SUCCEEDED:
            settled = max(task.finished_at or task.created_at, task.released_at or 0.0, lapsed_at or 0.0)
            if self.now - settled < POLICY.grace_period:
                return "grace"
        return ""

    def _must_go(self, task: ModelTask) -> str:
        """Why an unprotected task goes whatever the quota ("" when only the quota may take it)."""
        if task.state is TaskState.FAILED:
            return "failed"
        if task.state is TaskState.RUNNING:
            return "stale"
        if self.now - task.last_used_at > POLICY.task_ttl:
            return "ttl"
        return ""

    async def _write(self, handle: OpenWriter, count: int) -> None:
        task = self.tasks[handle.name]
        for span in task.spans[handle.written : handle.written + count]:
            piece = await handle.writer.write_piece(span.number, span.offset, task.expected(span))
            assert (piece.number, piece.offset, piece.length) == (span.number, span.offset, span.length)
            self._wrote(task, span)
            handle.written += 1

    # Stores and downloads in flight

    def _store(self, name: str, size: int, piece_length: int) -> None:
        size, piece_length = self._shape(name, size, piece_length)

        async def download() -> None:
            async with self.storage.download(make_id(name), _info(name, size, piece_length)) as writer:
                task = self._open_task(name, size, piece_length)
                assert self.storage.in_flight(task.tid)[0] == self._in_flight(name)[0] + 1
                for span in task.spans:
                    await writer.write_piece(span.number, span.offset, task.expected(span))
                    self._wrote(task, span)
                record = await writer.finish()
                self._finished(task)
                assert record.state is TaskState.SUCCEEDED
                assert record.piece_count == len(task.pieces)

        self.run(download())

    @initialize(
        stored=st.lists(st.tuples(NAMES, SIZES, PIECE_LENGTHS), min_size=4, max_size=10),
        age=st.sampled_from([0, 45, 300]),
    )
    def warm_cache(self, stored: list[tuple[str, int, int]], age: int) -> None:
        """Start from a cache filled ``age`` seconds ago, so the quota matters from the first steps."""
        for name, size, piece_length in stored:
            self._store(name, size, piece_length)
        self.clock.advance(age)

    @rule(stored=st.lists(st.tuples(NAMES, SIZES, PIECE_LENGTHS), min_size=1, max_size=3))
    def store(self, stored: list[tuple[str, int, int]]) -> None:
        """Whole downloads through the storage API, finished (over an existing task too: a re-download)."""
        for name, size, piece_length in stored:
            self._store(name, size, piece_length)

    @rule(target=writers, name=NAMES, size=SIZES, piece_length=PIECE_LENGTHS, data=st.data())
    def start_download(self, name: str, size: int, piece_length: int, data: st.DataObject) -> Any:
        """Open a download and write some of its pieces; the writer stays open across steps."""
        if len(self.open_writers) >= MAX_WRITERS or any(handle.name == name for handle in self.open_writers):
            return multiple()
        size, piece_length = self._shape(name, size, piece_length)
        context = self.storage.download(make_id(name), _info(name, size, piece_length))
        writer = self.run(context.__aenter__())
        task = self._open_task(name, size, piece_length)
        handle = OpenWriter(name, context, writer)
        self.open_writers.append(handle)
        count = data.draw(st.integers(0, len(task.spans) - 1), label="pieces written")
        self.run(self._write(handle, count))
        return handle

    @rule(handle=writers, count=st.integers(1, 4))
    def continue_download(self, handle: OpenWriter, count: int) -> None:
        self.run(self._write(handle, count))

    @rule(handle=consumes(writers), outcome=OUTCOMES)
    def end_download(self, handle: OpenWriter, outcome: str) -> None:
        """Finish (writing the rest), fail, abandon, or crash out of an open download."""
        task = self.tasks[handle.name]

        async def end() -> None:
            if outcome == "finish":
                await self._write(handle, len(task.spans))
                record = await handle.writer.finish()
                self._finished(task)
                assert record.state is TaskState.SUCCEEDED
            elif outcome == "fail":
                await handle.writer.fail()
                if task.state is TaskState.RUNNING:
                    task.state = TaskState.FAILED
                    task.updated_at = self.now
            if outcome == "crash":
                error = RuntimeError("the origin went away")
                assert not await handle.context.__aexit__(RuntimeError, error, None)
            else:
                await handle.context.__aexit__(None, None, None)

        self.open_writers.remove(handle)
        self.run(end())

    # Uploads in flight

    @rule(target=readers, data=st.data())
    def start_upload(self, data: st.DataObject) -> Any:
        """Open an upload, mostly of a present task; the reader stays open across steps."""
        if len(self.open_readers) >= MAX_READERS:
            return multiple()
        name = data.draw(self._names(), label="name")
        context = self.storage.upload(make_id(name))
        if name not in self.tasks:
            with pytest.raises(TaskNotFound):
                self.run(context.__aenter__())
            return multiple()
        handle = OpenReader(name, context, self.run(context.__aenter__()))
        self.open_readers.append(handle)
        return handle

    @rule(handle=readers, data=st.data())
    def upload_piece(self, handle: OpenReader, data: st.DataObject) -> None:
        """Serve a random piece (or one not stored): the bytes are the origin's, or PieceNotFound."""
        task = self.tasks[handle.name]
        number = data.draw(st.integers(0, len(task.spans)), label="piece")
        if number not in task.pieces:
            with pytest.raises(PieceNotFound):
                self.run(handle.reader.read_piece(number))
            return
        span = task.spans[number]
        piece, got = self.run(handle.reader.read_piece(number))
        task.last_used_at = self.now
        task.uploaded_count += 1
        assert (piece.offset, piece.length) == (span.offset, span.length)
        assert got == task.expected(span)

    @rule(handle=consumes(readers))
    def end_upload(self, handle: OpenReader) -> None:
        self.open_readers.remove(handle)
        self.run(handle.context.__aexit__(None, None, None))

    # Holds

    @rule(holder=HOLDERS, data=st.data(), ttl=TTLS)
    def acquire(self, holder: str, data: st.DataObject, ttl: float | None) -> None:
        """Hold every named task or none; a live hold keeps its start, a lapsed one is acquired anew."""
        names = _unique(data.draw(st.lists(self._names(), min_size=1, max_size=3), label="names"))
        ids = [make_id(name) for name in names]
        absent = [make_id(name) for name in names if name not in self.tasks]
        if absent:
            with pytest.raises(TaskNotFound) as excinfo:
                self.run(self.storage.acquire(holder, ids, ttl=ttl))
            assert excinfo.value.task_id == absent[0]
            return
        holds = self.run(self.storage.acquire(holder, ids, ttl=ttl))
        for name in names:
            self._grant(holder, name, ttl)
        leases = {make_id(name): self.leases[(holder, name)] for name in names}
        assert sorted((hold.task_id, hold.acquired_at, hold.expires_at, hold.ttl) for hold in holds) == sorted(
            (task_id, lease.acquired_at, lease.expires_at, lease.ttl) for task_id, lease in leases.items()
        )

    @rule(holder=HOLDERS, data=st.data())
    def release(self, holder: str, data: st.DataObject) -> None:
        """Live holds are released (grace and last use start now); a lapsed row goes, released when it lapsed."""
        names = _unique(data.draw(st.lists(self._names(), min_size=1, max_size=3), label="names"))
        released = self.run(self.storage.release(holder, [make_id(name) for name in names]))
        live = self._live_names(holder)
        expected = [name for name in names if name in live]
        for name in names:
            if name in live:
                self._released(holder, name)
            elif (lapsed := self.leases.pop((holder, name), None)) is not None:
                task = self.tasks[name]  # released when it lapsed, as a GC purge would stamp it
                task.released_at = max(task.released_at or 0.0, lapsed.expires_at or 0.0)
        assert released == [make_id(name) for name in expected]

    @rule(holder=HOLDERS, ttl=TTLS)
    def keep_alive(self, holder: str, ttl: float | None) -> None:
        """Renew the holder's live leases; a lapsed lease stays lapsed and is not among the holds returned."""
        holds = self.run(self.storage.keep_alive(holder, ttl))
        for (who, _), lease in self.leases.items():
            if who == holder and lease.ttl is not None and lease.live(self.now):
                lease.ttl = lease.ttl if ttl is None else ttl
                lease.expires_at = self.now + lease.ttl
        expected = sorted(
            (make_id(name), lease.acquired_at, lease.expires_at, lease.ttl)
            for (who, name), lease in self.leases.items()
            if who == holder and lease.live(self.now)
        )
        assert sorted((hold.task_id, hold.acquired_at, hold.expires_at, hold.ttl) for hold in holds) == expected

    @rule(holder=HOLDERS, data=st.data(), ttl=TTLS)
    def sync(self, holder: str, data: st.DataObject, ttl: float | None) -> None:
        """Hold exactly these: a task whose lease lapsed is acquired anew, and only live holds are released."""
        names = _unique(data.draw(st.lists(self._names(), max_size=4), label="names"))
        result = self.run(self.storage.sync(holder, [make_id(name) for name in names], ttl))
        current = self._live_names(holder)
        acquired: list[str] = []
        kept: list[str] = []
        missing: list[str] = []
        for name in names:
            if name not in self.tasks:
                missing.append(make_id(name))
                continue
            self._grant(holder, name, ttl)
            (kept if name in current else acquired).append(make_id(name))
        released = sorted((self.tasks[name].tid, name) for name in current - set(names))
        for _, name in released:
            self._released(holder, name)
        assert result == SyncResult(
            acquired=acquired, released=[task_id for task_id, _ in released], kept=kept, missing=missing
        )

    # Time, deletion, restarts

    @rule(seconds=SECONDS)
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: any(lease.expires_at is not None for lease in self.leases.values()))
    @rule(data=st.data(), past=st.sampled_from([0, 1, 29, 30]))
    def lapse(self, data: st.DataObject, past: int) -> None:
        """Let time run to the moment a lease lapses (or is about to, or has), and ``past`` seconds beyond it.

        Lapsed leases (and the grace they leave behind) come up often so, and so does the very moment a lease stops
        being live: at its ``expires_at`` it is lapsed.
        """
        expiries = sorted({lease.expires_at for lease in self.leases.values() if lease.expires_at is not None})
        expires_at = data.draw(st.sampled_from(expiries), label="expires_at")
        if expires_at + past > self.now:
            self.clock.advance(expires_at + past - self.now)

    @rule(data=st.data(), force=st.booleans())
    def delete(self, data: st.DataObject, force: bool) -> None:
        """A plain delete refuses a referenced task; force drops its holds but never in-flight work."""
        name = data.draw(self._names(), label="name")
        task_id = make_id(name)
        task = self.tasks.get(name)
        if task is None:
            with pytest.raises(TaskNotFound):
                self.run(self.storage.delete_task(task_id, force=force))
            return
        downloads, uploads = self._in_flight(name)
        holders = self._live_holders(name)
        if downloads or uploads or (holders and not force):
            with pytest.raises(TaskInUse) as excinfo:
                self.run(self.storage.delete_task(task_id, force=force))
            refs = excinfo.value.refs
            assert (refs.downloads, refs.uploads, sorted(refs.holders)) == (downloads, uploads, holders)
            return
        dropped, freed = self.run(self.storage.delete_task(task_id, force=force))
        # Only live holds are dropped; lapsed rows go with the task unreported.
        assert sorted(dropped) == (holders if force else [])
        assert freed == task.file_size
        self._forget(name)

    @precondition(lambda self: not self.open_writers and not self.open_readers)
    @rule()
    def restart(self) -> None:
        """Close the storage and open it again on the same directory: rows, holds and bytes survive."""
        self.run(self.storage.close())
        self.storage = Storage(self.storage.root, clock=self.clock)
        self.gc = GarbageCollector(self.storage, POLICY)
        self.run(self.storage.open())

    # Garbage collection

    @rule(unforeseen=UNFORESEEN)
    def collect(self, unforeseen: int) -> None:
        """A real GC run, its measurements after the first told of ``unforeseen`` more bytes (see ``_measuring``)."""
        self._collect(dry=False, unforeseen=unforeseen)

    @rule()
    def collect_dry(self) -> None:
        self._collect(dry=True)

    @rule(unforeseen=UNFORESEEN)
    def preview_then_collect(self, unforeseen: int) -> None:
        """A dry run tells what a real run right after it does: the same skips, for the same reasons (lapsed leases
        counted as released when they lapsed by both), the same failed, stale and idle evictions, and the same quota
        evictions, which the real run may only extend (its usage can only have grown, and it re-measures)."""
        preview = self._collect(dry=True)
        report = self._collect(dry=False, unforeseen=unforeseen)
        assert report.skipped == preview.skipped
        assert [e for e in report.evicted if e.reason != "quota"] == [e for e in preview.evicted if e.reason != "quota"]
        predicted = [e for e in preview.evicted if e.reason == "quota"]
        assert report.bytes_before >= preview.bytes_before
        assert [e for e in report.evicted if e.reason == "quota"][: len(predicted)] == predicted

    @rule(nbytes=ROOM)
    def make_room(self, nbytes: int) -> None:
        """Room for a download: a quota run that reserves it when it does not fit, and StorageFull if still not."""
        limits = self.limits
        last = max((run.id for run in self.run(self.gc.list_runs())), default=0)
        plan = self._plan()
        runs = nbytes <= limits.quota and plan.measured + nbytes > limits.quota
        purged = self._purge_lapsed() if runs else 0
        with self._measuring() as measurements:
            try:
                self.run(self.gc.ensure_room(nbytes))
                full = False
            except StorageFull:
                full = True
        recorded = [run for run in self.run(self.gc.list_runs()) if run.id > last]
        steps = iter(measurements)
        if nbytes > limits.quota:
            assert full and not measurements and not recorded
            return
        assert next(steps, None) == Measurement(plan.measured, plan.measured, plan.content)
        if not runs:
            assert not full and not recorded
        else:
            assert len(recorded) == 1 and recorded[0].trigger == "quota"
            report = recorded[0]
            self._check_run(report, plan, steps, dry=False, reserve=nbytes, purged=purged)
            after = next(steps, None)
            assert after is not None, "no measurement after the run decided whether the download fits"
            assert after.seen == after.actual and after.content == self.storage.content_bytes
            grown = after.actual - report.bytes_after  # recording the run may only add metadata pages
            assert grown >= 0 and grown % PAGE == 0, (after.actual, report.bytes_after)
            assert full == (after.actual + nbytes > limits.quota)
        assert next(steps, None) is None, f"ensure_room measured {len(measurements)} times, more than it needs"

    def _plan(self) -> Plan:
        """What the policy says of every task just before a GC run (which must not change the model before)."""
        self.run(self.storage.compact())
        measured = self.run(self.storage.used_bytes())
        # A lapsed lease counts as released when it lapsed, in a dry run (which only reads it) as in a real one.
        lapsed = self._lapsed()
        protected = {
            task.tid: reason
            for task in self.tasks.values()
            if (reason := self._protection(task, lapsed.get(task.name)))
        }
        must_go = {
            task.tid: reason
            for task in self.tasks.values()
            if task.tid not in protected and (reason := self._must_go(task))
        }
        lru = sorted(
            (task for task in self.tasks.values() if task.tid not in protected and task.tid not in must_go),
            key=lambda task: (task.last_used_at, task.tid),
        )
        by_id = {task.tid: task for task in self.tasks.values()}
        return Plan(protected, must_go, lru, by_id, self.storage.content_bytes, measured)

    @contextlib.contextmanager
    def _measuring(self, unforeseen: int = 0) -> Iterator[list[Measurement]]:
        """Record every usage measurement GC takes meanwhile, each checked against ``du -sb`` as it is taken.

        From the second measurement on, GC is told of ``unforeseen`` bytes more than the disk holds: usage its
        prediction cannot know of (as if evicting wrote that much metadata), so that its re-measuring is exercised.
        """
        storage = self.storage
        measurements: list[Measurement] = []
        measure = self.gc._measure

        async def spy() -> int:
            actual = await measure()
            physical = du_bytes(storage.root)
            assert actual == physical, f"GC measured {actual} bytes where du -sb says {physical}"
            seen = actual + (unforeseen if measurements else 0)
            measurements.append(Measurement(seen, actual, storage.content_bytes))
            return seen

        with mock.patch.object(self.gc, "_measure", spy):
            yield measurements

    def _collect(self, dry: bool, unforeseen: int = 0) -> GCReport:
        """One GC run, checked against the policy replayed on the model and on the measurements the run took."""
        plan = self._plan()
        purged = 0 if dry else self._purge_lapsed()
        with self._measuring(unforeseen) as measurements:
            report = self.run(self.gc.run("manual", dry_run=dry))
        assert report.trigger == "manual"
        steps = iter(measurements)
        self._check_run(report, plan, steps, dry=dry, unforeseen=unforeseen, purged=purged)
        assert next(steps, None) is None, f"the run measured {len(measurements)} times, more than the policy needs"
        if not dry:
            # What the disk says once the metadata's log is folded back: recording the run may only add pages.
            self.run(self.storage.compact())
            grown = self.run(self.storage.used_bytes()) - (report.bytes_after - unforeseen)
            assert grown >= 0 and grown % PAGE == 0, grown
        return report

    def _check_run(
        self,
        report: GCReport,
        plan: Plan,
        steps: Iterator[Measurement],
        *,
        dry: bool,
        reserve: int = 0,
        unforeseen: int = 0,
        purged: int = 0,
    ) -> None:
        """Check a run against the policy replayed on the model and on the run's own measurements, taken from
        ``steps`` as the policy says the run takes them: first, then (real runs, when the quota acts) once the
        quota's prediction is met and after every eviction past that, and once more at the end; a dry run measures
        once and predicts the rest. A real run's evictions then leave the model."""
        limits = self.limits
        assert report.dry_run is dry
        # Every protected task is skipped, for the reason the policy gives, and named with what holds it.
        assert {skip.task_id: skip.reason for skip in report.skipped} == plan.protected
        for skip in report.skipped:
            task = plan.by_id[skip.task_id]
            assert sorted(skip.holders) == self._live_holders(task.name)
            assert (skip.downloads, skip.uploads) == self._in_flight(task.name)
            assert skip.bytes == task.file_size
        # Failed, stale and idle candidates go whatever the quota, before it; the quota takes the least recently used.
        for eviction in report.evicted:
            assert eviction.task_id not in plan.protected
            assert eviction.bytes == plan.by_id[eviction.task_id].file_size
        others = [e for e in report.evicted if e.reason != "quota"]
        by_quota = [e for e in report.evicted if e.reason == "quota"]
        assert report.evicted == others + by_quota
        assert {e.task_id: e.reason for e in others} == plan.must_go

        taken: list[ModelTask] = []
        freed = 0  # by the failed, stale and idle tasks, which go after the first measurement
        first = True

        def measured() -> int:
            nonlocal first
            step = next(steps, None)
            assert step is not None, "the run measured fewer times than the policy needs"
            assert step.seen == step.actual + (0 if first else unforeseen)
            assert step.content == plan.content - freed - sum(task.file_size for task in taken)
            first = False
            return step.seen

        # The first measurement: the cache as it stood, after (a real run) purging lapsed leases and folding the
        # metadata's log back, which may only have added a page per lease purged.
        used = report.bytes_before
        assert measured() == used
        grown = used - plan.measured
        assert grown >= 0 and grown % PAGE == 0 and grown <= PAGE * purged, (used, plan.measured)
        freed = sum(e.bytes for e in others)
        used -= freed
        target = min(limits.low, limits.quota - reserve)

        def over() -> bool:
            return used >= limits.high or used > limits.quota - reserve

        # The quota acts when the predicted usage is over: it evicts while the prediction is above the target, then
        # (a real run) while the measured usage still is, measuring after each eviction.
        triggered = over()
        queue = list(plan.lru)
        if triggered:
            while queue and used > target:
                taken.append(queue.pop(0))
                used -= taken[-1].file_size
            if not dry:
                used = measured()
                while queue and used > target:
                    taken.append(queue.pop(0))
                    used = measured()
        exceeded = triggered and over()
        assert [e.task_id for e in by_quota] == [task.tid for task in taken]
        assert report.quota_exceeded_by_data_in_use == exceeded
        if not dry:
            final = measured()
            assert not triggered or final == used, "the cache changed after the quota's last measurement"
            used = final
        assert report.bytes_after == used
        if dry:
            return

        assert self.gc.quota_exceeded_by_data_in_use == exceeded
        for eviction in report.evicted:
            self._forget(plan.by_id[eviction.task_id].name)
        unprotected_left = [task.name for task in self.tasks.values() if task.tid not in plan.protected]
        if triggered and report.bytes_after > target:
            assert not unprotected_left, f"{report.bytes_after} bytes above the target, yet {unprotected_left} stayed"
        if exceeded:
            assert report.bytes_after >= limits.high or report.bytes_after > limits.quota - reserve
            assert not unprotected_left, f"quota reported exceeded by data in use, yet {unprotected_left} stayed"
        elif triggered:
            assert report.bytes_after < limits.high and report.bytes_after <= limits.quota - reserve
        else:
            # Only failed, stale and idle tasks went and the prediction kept the quota out: the run ends below the
            # high watermark but for what evicting them wrote to the metadata itself.
            assert report.bytes_after - unforeseen < limits.high + SLACK, report.bytes_after

    # Invariants

    @invariant()
    def data_in_use_is_intact(self) -> None:
        """A task with a live holder, an open writer or an open reader is present, its pieces unchanged."""

        async def check() -> None:
            for task in self.tasks.values():
                if not self._in_use(task.name):
                    continue
                record = await self.storage.get_task(task.tid)
                assert record is not None and record.state is not TaskState.EVICTING, f"{task.name} in use, gone"
                for number in sorted(task.pieces):
                    span = task.spans[number]
                    _, data = await self.storage.read_piece(task.tid, number)
                    assert data == task.expected(span), f"piece {number} of {task.name} changed"

        self.run(check())

    @invariant()
    def storage_agrees_with_the_model(self) -> None:
        """Tasks, their rows, pieces and bytes, live holds and in-flight counts are what the model says."""

        async def check() -> None:
            listed = {record.id: record for record in await self.storage.list_tasks()}
            assert sorted(listed) == sorted(task.tid for task in self.tasks.values())
            for task in self.tasks.values():
                record = listed[task.tid]
                assert (record.state, record.piece_count) == (task.state, len(task.pieces)), task.name
                assert (record.content_bytes, record.uploaded_count) == (task.file_size, task.uploaded_count)
                assert (record.created_at, record.updated_at, record.last_used_at) == (
                    task.created_at,
                    task.updated_at,
                    task.last_used_at,
                ), task.name
                assert (record.finished_at, record.released_at) == (task.finished_at, task.released_at), task.name
                pieces = await self.storage.pieces(task.tid)
                assert [(p.number, p.offset, p.length) for p in pieces] == [
                    (span.number, span.offset, span.length) for span in task.spans if span.number in task.pieces
                ]
                if not self._in_use(task.name):
                    for piece in pieces:
                        _, data = await self.storage.read_piece(task.tid, piece.number)
                        assert data == task.expected(task.spans[piece.number])
                refs = await self.storage.get_references(task.tid)
                assert (refs.downloads, refs.uploads) == self._in_flight(task.name)
                assert refs.holders == self._live_holders(task.name)
            for live, holds in ((True, await self.storage.list_holds()), (False, await self.storage.expired_holds())):
                assert sorted(
                    (hold.holder, hold.task_id, hold.acquired_at, hold.expires_at, hold.ttl) for hold in holds
                ) == sorted(
                    (holder, make_id(name), lease.acquired_at, lease.expires_at, lease.ttl)
                    for (holder, name), lease in self.leases.items()
                    if lease.live(self.now) is live
                ), "live holds" if live else "lapsed leases"

        self.run(check())

    @invariant()
    def accounting_matches_the_disk(self) -> None:
        """The incremental accounting is the sum of the content files, and the cache's usage is ``du -sb``."""
        content = self.storage.root / "content" / "tasks"
        sizes = {path.name: path.stat().st_size for path in content.glob("*/*")}
        assert self.storage.content_bytes == sum(sizes.values())
        for task in self.tasks.values():
            assert self.storage.task_bytes(task.tid) == sizes.get(task.tid) == task.file_size, task.name
        used = self.run(self.storage.used_bytes())
        actual = du_bytes(self.storage.root)
        assert used == actual, (used, actual)

    @invariant()
    def metadata_and_content_files_correspond(self) -> None:
        """Every listed task has its content file, and every file under the content root is a listed task's."""
        content = self.storage.root / "content" / "tasks"
        files = set()
        for shard in content.iterdir() if content.is_dir() else []:
            assert shard.is_dir() and not shard.is_symlink(), f"stray {shard.name} in the content directory"
            entries = list(shard.iterdir())
            assert entries, f"empty shard directory {shard.name} left behind"
            for entry in entries:
                assert entry.is_file() and entry.name[:3] == shard.name, f"stray {shard.name}/{entry.name}"
                files.add(entry.name)
        listed = {record.id for record in self.run(self.storage.list_tasks())}
        assert files == listed, (sorted(files - listed), sorted(listed - files))

    @invariant()
    def no_lock_outlives_its_users(self) -> None:
        """Between steps nobody holds or awaits a per-task lock, so none is remembered."""
        assert not self.storage.locked_task_ids(), self.storage.locked_task_ids()


StorageMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
TestStorageMachine = StorageMachine.TestCase
