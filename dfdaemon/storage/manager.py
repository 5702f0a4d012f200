"""The storage manager: metadata, content files and references behind one asyncio API.

``Storage`` is the only way into the cache; the operations and the transaction each one is are listed in the
package docstring (``dfdaemon.storage``). SQLite work runs on one dedicated thread (the single writer), file work
on worker threads; the event loop never blocks. In-flight references (downloads writing, uploads reading) live in
memory and die with the process; use references (holds) live in SQLite. Every change of a task's references and
its eviction take the same per-task lock, so an acquire and an eviction never interleave: the acquire either wins
or finds the task gone. ``TaskWriter`` and ``TaskReader`` are thin handles naming one task for that API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from dfdaemon.ids import InvalidTaskId, blob_digest_task_id, crc32_update, validate_task_id
from dfdaemon.storage.content import ContentStore, remove_path, sync_and_size, thread_block, write_vector_at
from dfdaemon.storage.metadata import MetadataStore
from dfdaemon.storage.models import (
    Applied,
    DiskFull,
    Hold,
    InvalidPiece,
    PieceCorrupt,
    PieceNotFound,
    PieceRecord,
    Quiet,
    References,
    Refusal,
    SyncResult,
    TaskInfo,
    TaskInUse,
    TaskNotFound,
    TaskRecord,
    TaskState,
    TaskUse,
    TrafficType,
    Victim,
)

log = logging.getLogger("dfdaemon.storage")

T = TypeVar("T")

# Test hook, off unless the environment sets it: DFDAEMON_TEST_PAUSE_AT=<point>[:<n>] makes the n-th arrival
# (default the first) at <point> create the file DFDAEMON_TEST_PAUSE_FILE names and block the event loop for
# good, so a crash test can SIGKILL the daemon exactly there. Points: "commit" (a piece's bytes are on disk, its
# row is not written) and "evict" (a task is marked evicting, nothing of it deleted yet).
_PAUSE_POINT, _, _PAUSE_AT = os.environ.get("DFDAEMON_TEST_PAUSE_AT", "").partition(":")
_pause_arrivals: Counter[str] = Counter()


def _test_pause(point: str) -> None:
    if point != _PAUSE_POINT:
        return
    _pause_arrivals[point] += 1
    if _pause_arrivals[point] == int(_PAUSE_AT or 1):
        Path(os.environ["DFDAEMON_TEST_PAUSE_FILE"]).write_text(point)
        threading.Event().wait()


METADATA_FILE = "metadata.db"
# How long uses (pieces served) wait in memory before one transaction records them all.
USE_FLUSH_DELAY = 5.0
# Piece records kept in memory for serving, whole tasks at a time, the least recently used task forgotten first
# (the latest is always kept). A record takes about half a KiB: this bounds the cache to about 10 MiB.
PIECE_CACHE_PIECES = 20_000

# A task's state as stored, to the enum member (a dict lookup per row is what a snapshot of 100k tasks affords).
_STATES = {state.value: state for state in TaskState}

# Called after a task's bytes are deleted, e.g. to tell the scheduler (DeleteTask).
DeletionListener = Callable[[str], Awaitable[None]]


class Storage:
    """The cache of one daemon, rooted at ``storage.dir``."""

    def __init__(self, root: Path, *, keep: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.keep = keep
        self.clock = clock
        self.content = ContentStore(root)
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfdaemon-sqlite")
        self._meta: MetadataStore | None = None
        self._downloads: Counter[str] = Counter()
        self._uploads: Counter[str] = Counter()
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()
        self._content_bytes: dict[str, int] = {}
        self._deletion_listeners: list[DeletionListener] = []
        self._growth_listeners: list[Callable[[], None]] = []
        self._changes: dict[str, asyncio.Event] = {}
        # Uses not yet in SQLite: task id -> (last use, pieces served). Readers see them merged in.
        self._uses: dict[str, tuple[float, int]] = {}
        self._uses_timer: asyncio.TimerHandle | None = None
        self._uses_flush: asyncio.Task[None] | None = None
        self._piece_cache = PieceCache(PIECE_CACHE_PIECES)

    # Lifetime

    async def open(self) -> None:
        """Create or reopen the store: migrate the schema, finish half-done evictions, reconcile with the disk."""
        await self._io(self.root.mkdir, parents=True, exist_ok=True)
        if not self.keep:
            await self._io(_wipe, self.root)
        self._meta = await self._db(MetadataStore, self.root / METADATA_FILE)
        await self._reconcile()

    async def close(self) -> None:
        if self._uses_timer is not None:
            self._uses_timer.cancel()
        if self._uses_flush is not None:
            await self._uses_flush
        if self._meta is not None:
            await self.flush_uses()
            await self._db(self._meta.close)
            self._meta = None
        self._db_thread.shutdown(wait=True)

    def add_deletion_listener(self, listener: DeletionListener) -> None:
        self._deletion_listeners.append(listener)

    def add_growth_listener(self, listener: Callable[[], None]) -> None:
        """Called (on the loop) whenever the cache grew, so GC can react to crossing the quota."""
        self._growth_listeners.append(listener)

    @contextlib.contextmanager
    def _disk_full_guard(self, task_id: str, number: int) -> Iterator[None]:
        """Turn "no space left" under a piece write into StorageFull (the piece never became visible)."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.error("no space left writing piece %d of task %s", number, task_id)
            raise DiskFull(
                f"no space left on the cache's filesystem writing piece {number} of task {task_id}"
            ) from None

    @property
    def meta(self) -> MetadataStore:
        if self._meta is None:
            raise RuntimeError("storage is not open")
        return self._meta

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._db_thread, partial(fn, *args, **kwargs))
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise DiskFull(f"no space left on the cache's filesystem for its metadata: {exc}") from None
            raise

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def _lock(self, task_id: str) -> AsyncIterator[None]:
        """The task's lock; it is forgotten only when nobody holds or awaits it, so there is only ever one."""
        lock = self._locks.get(task_id)
        if lock is None:
            lock = self._locks[task_id] = asyncio.Lock()
        self._lock_users[task_id] += 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[task_id] -= 1
            if not self._lock_users[task_id]:
                del self._lock_users[task_id]
                del self._locks[task_id]

    @contextlib.asynccontextmanager
    async def _locks_in_order(self, task_ids: list[str]) -> AsyncIterator[None]:
        """Take several per-task locks in a fixed order so two multi-task calls cannot deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for task_id in sorted(set(task_ids)):
                await stack.enter_async_context(self._lock(task_id))
            yield

    def locked_task_ids(self) -> list[str]:
        """Tasks whose lock is held or awaited right now (read only: a check that no lock outlives its users)."""
        return sorted(set(self._locks) | set(self._lock_users))

    async def _reconcile(self) -> None:
        now = self.clock()
        for task_id in await self._db(self.meta.evicting_task_ids):
            log.info("finishing interrupted eviction of task %s", task_id)
            await self._io(self.content.delete, task_id)
            await self._db(self.meta.delete_task, task_id)
        tasks = {task.id: task for task in await self._db(self.meta.list_tasks)}
        for path, name in await self._io(lambda: list(self.content.scan())):
            if name is None or name not in tasks:
                log.warning("removing orphan %s from the content directory", path.name)
                await self._io(remove_path, path)
        sizes = await self._io(self.content.sizes, list(tasks))
        for task in tasks.values():
            size = sizes[task.id]
            if size is None:
                if task.piece_count or task.state is TaskState.SUCCEEDED:
                    log.warning("content of task %s vanished; marking it failed", task.id)
                    await self._db(self.meta.fail_missing, task.id, now)
                await self._io(self.content.create, task.id)
                size = 0
            if size != task.content_bytes:
                await self._db(self.meta.set_content_bytes, task.id, size)
            self._content_bytes[task.id] = size

    # Accounting

    @property
    def content_bytes(self) -> int:
        return sum(self._content_bytes.values())

    def task_bytes(self, task_id: str) -> int:
        return self._content_bytes.get(task_id, 0)

    async def compact(self) -> None:
        """Shrink the metadata's write-ahead log before space is measured for a decision."""
        await self._db(self.meta.checkpoint)

    async def used_bytes(self) -> int:
        """The cache's own bytes: content files (kept incrementally), metadata files and directories."""
        return self.content_bytes + await self._io(self._overhead_bytes)

    def _overhead_bytes(self) -> int:
        total = self.content.overhead_bytes()
        for name in (METADATA_FILE, METADATA_FILE + "-wal", METADATA_FILE + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += (self.root / name).stat().st_size
        with contextlib.suppress(FileNotFoundError):
            total += self.root.stat().st_size
        return total

    def _changed(self, task_id: str) -> None:
        """Wake whoever waits on this task (a SyncPieces stream of a child, say)."""
        event = self._changes.pop(task_id, None)
        if event is not None:
            event.set()

    async def wait_for_change(self, task_id: str) -> None:
        """Wait until a piece of the task is committed, it finishes, fails or goes, or a reference is released."""
        event = self._changes.get(task_id)
        if event is None:
            event = self._changes[task_id] = asyncio.Event()
        await event.wait()

    def _account(self, task_id: str, size: int) -> None:
        before = self._content_bytes.get(task_id, 0)
        if size > before:
            self._content_bytes[task_id] = size
            for listener in self._growth_listeners:
                listener()

    # Tasks

    async def get_task(self, task_id: str) -> TaskRecord | None:
        validate_task_id(task_id)
        task = await self._db(self.meta.get_task, task_id)
        return None if task is None else self._with_uses(task)

    async def require_task(self, task_id: str) -> TaskRecord:
        task = await self.get_task(task_id)
        if task is None or task.state is TaskState.EVICTING:
            raise TaskNotFound(task_id)
        return task

    async def list_tasks(self) -> list[TaskRecord]:
        tasks = await self._db(self.meta.list_tasks)
        return [self._with_uses(task) for task in tasks if task.state is not TaskState.EVICTING]

    async def count_tasks(self) -> int:
        return await self._db(self.meta.count_tasks)

    async def pieces(self, task_id: str) -> list[PieceRecord]:
        """The task's committed pieces by number (from memory once the task's pieces were looked up)."""
        known = await self._known_pieces(validate_task_id(task_id))
        return [] if known is None else sorted(known.values(), key=lambda piece: piece.number)

    async def piece(self, task_id: str, number: int) -> PieceRecord | None:
        """One committed piece's metadata; serving a piece reads it from memory, not SQLite."""
        known = await self._known_pieces(validate_task_id(task_id))
        return None if known is None else known.get(number)

    async def _known_pieces(self, task_id: str) -> dict[int, PieceRecord] | None:
        """The committed pieces of a task that exists and is not being evicted (None otherwise), cached.

        A miss reads the task and its pieces in one database hop; the result is cached only if no piece of any
        task changed meanwhile, so a commit racing the read is never lost from the cache.
        """
        known = self._piece_cache.get(task_id)
        if known is not None:
            return known
        epoch = self._piece_cache.epoch

        def read() -> tuple[TaskRecord | None, list[PieceRecord]]:
            return self.meta.get_task(task_id), self.meta.list_pieces(task_id)

        task, pieces = await self._db(read)
        if task is None or task.state is TaskState.EVICTING:
            return None
        known = {piece.number: piece for piece in pieces}
        if epoch == self._piece_cache.epoch:
            self._piece_cache.put(task_id, known)
        return known

    async def touch(self, task_id: str) -> None:
        """A download hit the cache: the task counts as used now."""
        await self._db(self.meta.touch_task, task_id, self.clock())

    async def record_upload(self, task_id: str) -> None:
        """A piece was served to a peer: the task counts as used now, and its upload count grows.

        Kept in memory and written with every other pending use at most ``USE_FLUSH_DELAY`` later, so serving
        a piece costs no SQLite write. Task reads merge pending uses in, and GC flushes them before it looks.
        """
        _, served = self._uses.get(task_id, (0.0, 0))
        self._uses[task_id] = (self.clock(), served + 1)
        if self._uses_timer is None:
            self._uses_timer = asyncio.get_running_loop().call_later(USE_FLUSH_DELAY, self._flush_uses_later)

    def _flush_uses_later(self) -> None:
        self._uses_timer = None
        if self._uses_flush is None or self._uses_flush.done():
            self._uses_flush = asyncio.create_task(self.flush_uses())

    async def flush_uses(self) -> None:
        """Record every pending use in one transaction; on failure they stay pending for the next flush."""
        uses, self._uses = self._uses, {}
        if not uses:
            return
        try:
            await self._db(self.meta.record_uses, [(task_id, at, served) for task_id, (at, served) in uses.items()])
        except (DiskFull, sqlite3.Error) as exc:
            log.warning("could not record %d tasks' uploads yet: %s", len(uses), exc)
            for task_id, (at, served) in uses.items():
                later, more = self._uses.get(task_id, (0.0, 0))
                self._uses[task_id] = (max(at, later), served + more)

    def _with_uses(self, task: TaskRecord) -> TaskRecord:
        """The task as it will be once its pending uses are written."""
        pending = self._uses.get(task.id)
        if pending is None:
            return task
        at, served = pending
        return dataclasses.replace(
            task, last_used_at=max(task.last_used_at, at), uploaded_count=task.uploaded_count + served
        )

    def references(self, task_id: str, holds: list[Hold]) -> References:
        return References(
            task_id=task_id, holds=holds, downloads=self._downloads[task_id], uploads=self._uploads[task_id]
        )

    async def get_references(self, task_id: str) -> References:
        validate_task_id(task_id)
        holds = await self._db(self.meta.live_holds, self.clock(), task_id=task_id)
        return self.references(task_id, holds)

    def in_flight(self, task_id: str) -> tuple[int, int]:
        """(downloads, uploads) in flight for a task."""
        return self._downloads[task_id], self._uploads[task_id]

    @contextlib.asynccontextmanager
    async def download(self, task_id: str, info: TaskInfo) -> AsyncIterator[TaskWriter]:
        """Write a task: holds an in-flight download reference from before the first byte until the end."""
        validate_task_id(task_id)
        async with self._lock(task_id):
            self._downloads[task_id] += 1
        writer: TaskWriter | None = None
        try:
            task = await self._db(self.meta.create_or_resume_task, task_id, info, self.clock())
            await self._io(self.content.create, task_id)
            self._content_bytes.setdefault(task_id, 0)
            writer = TaskWriter(self, task)
            yield writer
        finally:
            try:
                if writer is not None:
                    await writer.close()
            finally:
                async with self._lock(task_id):
                    self._release_count(self._downloads, task_id)

    @contextlib.asynccontextmanager
    async def reading(self, task_id: str) -> AsyncIterator[None]:
        """A local client following or copying a task counts as a download in flight until it is done."""
        validate_task_id(task_id)
        async with self._lock(task_id):
            self._downloads[task_id] += 1
        try:
            yield
        finally:
            async with self._lock(task_id):
                self._release_count(self._downloads, task_id)

    @contextlib.asynccontextmanager
    async def upload(self, task_id: str) -> AsyncIterator[TaskReader]:
        """Read a task's pieces for a peer: holds an in-flight upload reference meanwhile.

        Whether the task exists comes from the piece cache (emptied for a task as it is evicted, under this same
        lock), so serving a cached task reads no SQLite.
        """
        validate_task_id(task_id)
        async with self._lock(task_id):
            if await self._known_pieces(task_id) is None:
                raise TaskNotFound(task_id)
            self._uploads[task_id] += 1
        try:
            yield TaskReader(self, task_id)
        finally:
            async with self._lock(task_id):
                self._release_count(self._uploads, task_id)

    def _release_count(self, counter: Counter[str], task_id: str) -> None:
        counter[task_id] -= 1
        if counter[task_id] <= 0:
            del counter[task_id]
        self._changed(task_id)

    async def read_piece(self, task_id: str, number: int) -> tuple[PieceRecord, bytes]:
        """Read and CRC-verify one piece; a piece whose bytes changed is forgotten and reported corrupt."""
        piece = await self._stored_piece(task_id, number)

        def read_and_check() -> tuple[bytes, bool]:
            data = self.content.read_piece(task_id, piece.offset, piece.length)
            return data, len(data) == piece.length and crc32_update(0, data) == piece.crc

        data, intact = await self._io(read_and_check)  # the CRC runs off the loop (it releases the GIL)
        await self._drop_if_corrupt(piece, intact)
        return piece, data

    async def read_piece_into(self, task_id: str, number: int, buffer: bytearray) -> tuple[PieceRecord, memoryview]:
        """As ``read_piece``, into a caller's reused buffer (grown when too small): nothing allocated per piece.

        Returns a view of the piece's bytes in ``buffer``; the caller releases it before reusing the buffer.
        """
        piece = await self._stored_piece(task_id, number)
        if len(buffer) < piece.length:
            buffer.extend(bytes(piece.length - len(buffer)))
        view = memoryview(buffer)[: piece.length]

        def read_and_check() -> bool:
            read = self.content.read_into(task_id, piece.offset, view)
            return read == piece.length and crc32_update(0, view) == piece.crc

        intact = await self._io(read_and_check)
        if not intact:
            view.release()
        await self._drop_if_corrupt(piece, intact)
        return piece, view

    async def _stored_piece(self, task_id: str, number: int) -> PieceRecord:
        piece = await self.piece(task_id, number)
        if piece is None:
            raise PieceNotFound(task_id, number)
        return piece

    async def _drop_if_corrupt(self, piece: PieceRecord, intact: bool) -> None:
        if not intact:
            log.error("piece %d of task %s failed its CRC check; dropping it", piece.number, piece.task_id)
            self._piece_cache.drop_piece(piece.task_id, piece.number)
            await self._db(self.meta.remove_piece, piece.task_id, piece.number)
            raise PieceCorrupt(f"piece {piece.number} of task {piece.task_id} is corrupt on disk and was dropped")

    # Writing (under a download reference: ``download`` gives a TaskWriter naming the task, holding its file)

    def _piece(
        self,
        task_id: str,
        number: int,
        offset: int,
        length: int,
        crc: int,
        parent_id: str | None,
        traffic_type: int,
        cost: float,
    ) -> PieceRecord:
        return PieceRecord(task_id, number, offset, length, crc, parent_id, traffic_type, cost, self.clock())

    async def _commit(self, task_id: str, pieces: Sequence[PieceRecord], size: int) -> None:
        """Only now, with their bytes durable, do the pieces' rows appear; waiters are woken."""
        if pieces:
            _test_pause("commit")
            await self._db(self.meta.add_pieces, task_id, pieces, size, self.clock())
            self._piece_cache.add(task_id, pieces)
        self._account(task_id, size)
        self._changed(task_id)

    async def finish_task(self, task_id: str, *, digest: str | None = None) -> TaskRecord:
        """Mark a task succeeded with its file's final size (and the blob digest its content was verified against)."""
        size = await self._io(self.content.size, task_id)
        await self._db(self.meta.finish_task, task_id, size, self.clock(), digest)
        self._account(task_id, size)
        self._changed(task_id)
        return await self.require_task(task_id)

    async def fail_task(self, task_id: str, *, discard: bool = False) -> None:
        """Mark a task failed; with ``discard`` (bytes that must never be served) its pieces go too.

        On a full disk the bytes go first as well: they are worthless and the mark needs room.
        """
        if not discard:
            try:
                await self._db(self.meta.fail_task, task_id, self.clock())
            except DiskFull:
                discard = True
        if discard:
            self._piece_cache.forget(task_id)
            await self._io(self.content.delete, task_id)
            await self._io(self.content.create, task_id)
            self._content_bytes[task_id] = 0
            await self._db(self.meta.fail_missing, task_id, self.clock())
        self._changed(task_id)

    # Deletion and eviction

    async def delete_task(self, task_id: str, *, force: bool = False) -> tuple[list[str], int]:
        """Delete a task now. Refused while referenced; ``force`` drops its holds but never in-flight work.

        Returns the holders whose holds were dropped and the bytes freed.
        """
        validate_task_id(task_id)
        now = self.clock()
        async with self._lock(task_id):
            task = await self._db(self.meta.get_task, task_id)
            if task is None or task.state is TaskState.EVICTING:
                raise TaskNotFound(task_id)
            refs = self.references(task_id, await self._db(self.meta.live_holds, now, task_id=task_id))
            if refs.downloads or refs.uploads or (refs.holds and not force):
                raise TaskInUse(refs)
            if force:
                dropped = await self._db(self.meta.force_mark_evicting, task_id, now)
            else:
                if not await self._db(self.meta.mark_evicting, task_id, list(TaskState), now):
                    raise TaskInUse(self.references(task_id, await self._db(self.meta.live_holds, now, task_id)))
                dropped = []
            freed = await self._remove(task_id)
        await self._notify_deleted(task_id)
        return dropped, freed

    async def evict(self, task_id: str, expected_states: Iterable[TaskState]) -> int | None:
        """Evict an unreferenced task for GC; returns bytes freed, or None when a reference appeared meanwhile.

        Bytes freed are those the filesystem got back: none for a file another hard link still holds.
        """
        now = self.clock()
        states = list(expected_states)
        async with self._lock(task_id):
            downloads, uploads = self.in_flight(task_id)
            if downloads or uploads:
                return None
            task = await self._db(self.meta.get_task, task_id)
            if task is None or task.state not in states:
                return None
            freed_first = 0
            if task.state is TaskState.FAILED and not await self._db(self.meta.live_holds, now, task_id=task_id):
                # A failed task's bytes are worth nothing: free them before writing anything, so eviction works
                # even on a full disk. A crash right here leaves a failed row without a file, which start-up handles.
                self._piece_cache.forget(task_id)
                freed_first = await self._io(self.content.delete, task_id)
                self._content_bytes[task_id] = 0
            if not await self._db(self.meta.mark_evicting, task_id, states, now):
                return None
            _test_pause("evict")
            freed = freed_first + await self._remove(task_id)
        await self._notify_deleted(task_id)
        return freed

    async def apply(self, victims: Iterable[Victim]) -> Applied:
        """Evict the victims GC chose, each re-checked inside its eviction: a reference taken since wins.

        A victim still referenced, or no longer in the state it was chosen in, is refused and left alone.
        """
        evicted: list[Victim] = []
        refused: list[Refusal] = []
        for victim in victims:
            freed = await self.evict(victim.task_id, [victim.state])
            if freed is None:
                refused.append(Refusal(victim, await self.get_references(victim.task_id)))
                continue
            log.info("evicted task %s reason=%s bytes=%d", victim.task_id, victim.reason, freed)
            evicted.append(victim._replace(bytes=freed))
        return Applied(evicted, refused)

    async def gc_view(self, *, purge_lapsed: bool, quiet: Quiet | None = None) -> list[TaskUse]:
        """Every task not being evicted, with its bytes and references at one instant: what GC plans over.

        Lapsed leases count as released when they lapsed; ``purge_lapsed`` deletes them as well (a real run),
        otherwise they are only read (a dry run, or a disk too full to write). With ``quiet``, the tasks it
        describes are left out (a big cache's quiet majority costs no object then); a task with a hold or a
        transfer in flight is always in.
        """
        await self.flush_uses()
        lapsed = await self._lapsed_holds(purge_lapsed)
        busy = [task_id for counter in (self._downloads, self._uploads) for task_id, n in counter.items() if n]
        rows, holds = await self._db(self.meta.gc_rows, self.clock(), quiet, busy)
        holding: dict[str, list[str]] = {}
        for task_id, holder in holds:
            holding.setdefault(task_id, []).append(holder)
        holders = {task_id: tuple(names) for task_id, names in holding.items()}
        # Bound lookups: this runs once per task of a cache that may hold a hundred thousand.
        size, held, downloads, uploads = self._content_bytes.get, holders.get, self._downloads.get, self._uploads.get
        states = _STATES
        return [
            TaskUse(
                i,
                states[s],
                c,
                u,
                lu,
                f,
                max(r or 0.0, lapsed[i]) if i in lapsed else r,
                size(i, 0),
                held(i, ()),
                downloads(i, 0),
                uploads(i, 0),
            )
            for i, s, c, u, lu, f, r in rows
        ]

    async def _lapsed_holds(self, purge: bool) -> dict[str, float]:
        """When each task's last lapsed lease lapsed; purged (and logged) when asked and the disk allows."""
        expired: list[Hold] | None = None
        if purge:
            try:
                expired = await self.expire_holds()
            except DiskFull as exc:
                log.warning("%s; evicting what frees space first", exc)  # failed tasks go without a metadata write
            else:
                for hold in expired:
                    log.info("lease of holder %s on task %s expired", hold.holder, hold.task_id)
        if expired is None:
            expired = await self.expired_holds()  # read only: the grace after each lapse still counts
        lapsed: dict[str, float] = {}
        for hold in expired:
            lapsed[hold.task_id] = max(lapsed.get(hold.task_id, 0.0), hold.expires_at or 0.0)
        return lapsed

    async def _remove(self, task_id: str) -> int:
        """Delete a task already marked evicting: file first, then rows (a crash in between is finished at start).

        Returns the bytes the filesystem got back (0 while an output file hard-linked to it remains).
        """
        self._content_bytes.pop(task_id, 0)
        self._piece_cache.forget(task_id)
        freed = await self._io(self.content.delete, task_id)
        await self._db(self.meta.delete_task, task_id)
        self._changed(task_id)
        return freed

    async def _notify_deleted(self, task_id: str) -> None:
        for listener in self._deletion_listeners:
            try:
                await listener(task_id)
            except Exception:
                log.exception("deletion listener failed for task %s", task_id)

    # Holds (use references)

    async def acquire(self, holder: str, task_ids: list[str], ttl: float | None = None) -> list[Hold]:
        """Hold every named task for ``holder`` (idempotent); all or nothing, NOT_FOUND for an absent task."""
        _check_holder(holder)
        ids = _unique([validate_task_id(task_id) for task_id in task_ids])
        now = self.clock()
        async with self._locks_in_order(ids):
            missing = await self._db(self.meta.acquire, holder, ids, ttl, now)
        if missing:
            raise TaskNotFound(missing[0])
        return [hold for hold in await self._db(self.meta.live_holds, now, holder=holder) if hold.task_id in ids]

    async def release(self, holder: str, task_ids: list[str]) -> list[str]:
        _check_holder(holder)
        ids = _unique([validate_task_id(task_id) for task_id in task_ids])
        async with self._locks_in_order(ids):
            return await self._db(self.meta.release, holder, ids, self.clock())

    async def keep_alive(self, holder: str, ttl: float | None = None) -> list[Hold]:
        _check_holder(holder)
        now = self.clock()
        await self._db(self.meta.keep_alive, holder, ttl, now)
        return await self._db(self.meta.live_holds, now, holder=holder)

    async def sync(self, holder: str, task_ids: list[str], ttl: float | None = None) -> SyncResult:
        """Make ``holder`` hold exactly these tasks: acquire the new ones present, release the rest."""
        _check_holder(holder)
        wanted = _unique([validate_task_id(task_id) for task_id in task_ids])
        now = self.clock()
        current = set(await self._db(self.meta.holder_task_ids, holder, now))
        to_release = sorted(current - set(wanted))
        acquired: list[str] = []
        missing: list[str] = []
        async with self._locks_in_order(sorted(set(wanted) | current)):
            for task_id in wanted:
                if await self._db(self.meta.acquire, holder, [task_id], ttl, now):
                    missing.append(task_id)
                elif task_id not in current:
                    acquired.append(task_id)
            released = await self._db(self.meta.release, holder, to_release, now)
        kept = [task_id for task_id in wanted if task_id in current and task_id not in missing]
        return SyncResult(acquired=acquired, released=released, kept=kept, missing=missing)

    async def list_holds(self, holder: str | None = None, task_id: str | None = None) -> list[Hold]:
        if task_id is not None:
            validate_task_id(task_id)
        return await self._db(self.meta.live_holds, self.clock(), task_id=task_id, holder=holder)

    async def expire_holds(self) -> list[Hold]:
        return await self._db(self.meta.expire_holds, self.clock())

    async def expired_holds(self) -> list[Hold]:
        """Lapsed leases not yet purged; reading them changes nothing."""
        return await self._db(self.meta.expired_holds, self.clock())

    async def all_live_holds(self) -> list[Hold]:
        return await self._db(self.meta.live_holds, self.clock())

    async def held_task_ids(self) -> list[str]:
        """The tasks some live hold names (what usage reports as held)."""
        return await self._db(self.meta.held_task_ids, self.clock())

    async def task_ids_for_digests(self, digests: Iterable[str]) -> dict[str, list[str]]:
        """The tasks holding each blob digest: those whose content was verified against it (a blob pulled from two
        repositories is two URL-named tasks) and the one named by the digest's hex. A digest no task holds is
        absent from the answer. One read of the metadata."""
        wanted = set(digests)
        if not wanted:
            return {}
        hex_ids: dict[str, str] = {}
        for digest in wanted:
            with contextlib.suppress(InvalidTaskId):
                hex_ids[blob_digest_task_id(digest)] = digest
        found: dict[str, list[str]] = {}
        for task_id, recorded in await self._db(self.meta.task_ids_for_digests, sorted(wanted), list(hex_ids)):
            names = {hex_ids[task_id]} if task_id in hex_ids else set()
            if recorded is not None and recorded in wanted:
                names.add(recorded)
            for name in names:
                found.setdefault(name, []).append(task_id)
        return found

    # GC records

    async def record_gc_run(
        self, dry_run: bool, trigger: str, started_at: float, finished_at: float, report: str
    ) -> int:
        return await self._db(self.meta.record_gc_run, dry_run, trigger, started_at, finished_at, report)

    async def list_gc_runs(self, limit: int) -> list[Any]:
        return await self._db(self.meta.list_gc_runs, limit)


class TaskWriter:
    """A handle on one task being downloaded, under the download's reference: every piece, from the origin or a
    parent, goes through the task's one ``PieceFile`` (opened at the first write, closed when the download ends).
    """

    def __init__(self, storage: Storage, task: TaskRecord) -> None:
        self.storage = storage
        self.task = task
        self._file: PieceFile | None = None
        self._opening = asyncio.Lock()

    @property
    def task_id(self) -> str:
        return self.task.id

    async def file(self) -> PieceFile:
        """The task's content file, held open for the rest of the download."""
        async with self._opening:
            if self._file is None:
                fd = await self.storage._io(self.storage.content.open_for_write, self.task_id)
                self._file = PieceFile(self.storage, self.task_id, fd)
            return self._file

    async def write_piece(
        self,
        number: int,
        offset: int,
        data: bytes | memoryview,
        *,
        parent_id: str | None = None,
        traffic_type: int = TrafficType.BACK_TO_SOURCE,
        cost: float = 0.0,
    ) -> PieceRecord:
        """Write one piece held in memory and commit it at once (durable, then visible): for single pieces."""
        file = await self.file()
        piece = await file.stage(number, offset, data, parent_id=parent_id, traffic_type=traffic_type, cost=cost)
        await file.commit([piece])
        return piece

    async def stage_piece(
        self,
        number: int,
        offset: int,
        data: bytes | memoryview | IncomingPiece,
        *,
        parent_id: str | None = None,
        traffic_type: int = TrafficType.REMOTE_PEER,
        cost: float = 0.0,
    ) -> PieceRecord:
        """Write a piece's bytes (held, or still arriving) and compute its CRC in one thread hop; invisible until the
        task's ``PieceFile`` commits it."""
        file = await self.file()
        return await file.stage(number, offset, data, parent_id=parent_id, traffic_type=traffic_type, cost=cost)

    @contextlib.asynccontextmanager
    async def piece_file(self) -> AsyncIterator[PieceFile]:
        """The task's file for a writer that streams pieces and commits them in batches; its hops are waited for
        on the way out."""
        file = await self.file()
        try:
            yield file
        finally:
            await file.drain()

    async def finish(self, *, digest: str | None = None) -> TaskRecord:
        return await self.storage.finish_task(self.task_id, digest=digest)

    async def fail(self, *, discard: bool = False) -> None:
        """Mark the task failed. Its file is closed first: discarded bytes free their space only once no
        descriptor holds them, and a full disk needs that space for the mark."""
        await self.close()
        await self.storage.fail_task(self.task_id, discard=discard)

    async def close(self) -> None:
        """Wait for writes still running, then close the file (the download is over)."""
        if self._file is not None:
            await self._file.close()
            self._file = None


@dataclasses.dataclass
class Progress:
    """How far a piece arriving block by block got: the next byte's offset, and the piece's CRC up to it."""

    offset: int
    crc: int = 0


@dataclasses.dataclass(frozen=True)
class IncomingPiece:
    """A piece still arriving: ``length`` bytes that ``read_into`` receives into the buffer it is given (blocking, at
    least one byte per call, run in the writing thread; see ``PieceFile.receive``); ``end`` (from the event loop)
    makes a blocked ``read_into`` fail at once."""

    length: int
    read_into: Callable[[memoryview], int]
    end: Callable[[], None]


class PieceFile:
    """A task's open content file: bytes written in thread hops, made visible later by ``commit``.

    The one writer of a task's bytes, for the origin stream and for pieces from parents alike. Nothing written
    here is visible until committed; ``commit`` syncs the file before the rows go in, so a crash never leaves a
    committed piece whose bytes are not on disk.
    """

    def __init__(self, storage: Storage, task_id: str, fd: int) -> None:
        self.storage = storage
        self.task_id = task_id
        self._fd = fd
        self._hops: set[asyncio.Future[Any]] = set()
        # One write at a time into the file: the kernel serialises writers of an inode anyway, and concurrent ones
        # (parallel origin ranges, pieces from several parents) spin on its lock, burning the CPU the copy needs.
        self._writing = threading.Lock()

    async def hop(self, fn: Callable[[], T], end: Callable[[], None] | None = None) -> T:
        """Run work on the piece bytes in a thread. A cancelled caller does not stop it, so ``drain`` waits for it;
        with ``end`` (work that waits on a socket), a cancelled caller calls it, which fails the work at once, and
        waits for the thread to be through, so nothing is written after the caller gave up."""
        hop = asyncio.get_running_loop().run_in_executor(None, fn)
        self._hops.add(hop)
        hop.add_done_callback(self._hop_done)
        try:
            return await asyncio.shield(hop)
        except asyncio.CancelledError:
            if end is not None:
                end()
                await asyncio.wait([hop])
            raise

    def _hop_done(self, hop: asyncio.Future[Any]) -> None:
        self._hops.discard(hop)
        if not hop.cancelled():
            hop.exception()  # read: a caller that went away (it was cancelled) has no use for the failure

    async def drain(self) -> None:
        """Wait for every thread hop still using the file (before it is closed)."""
        while self._hops:
            await asyncio.wait(set(self._hops))

    async def close(self) -> None:
        await self.drain()
        await self.storage._io(os.close, self._fd)

    def write_chunks(self, offset: int, chunks: Sequence[bytes | memoryview], crc: int) -> int:
        """Write consecutive chunks at ``offset`` (vectored: no joining); returns the CRC-32 continued over them.

        Blocking, so called inside ``hop``, where the CRC runs too (off the event loop).
        """
        with self._full_disk():
            return self._write(offset, chunks, crc)

    def _write(self, offset: int, chunks: Sequence[bytes | memoryview], crc: int) -> int:
        with self._writing:
            write_vector_at(self._fd, offset, chunks)
        for chunk in chunks:  # outside the lock: another hop writes meanwhile
            crc = crc32_update(crc, chunk)
        return crc

    async def stage(
        self,
        number: int,
        offset: int,
        data: bytes | memoryview | IncomingPiece,
        *,
        parent_id: str | None,
        traffic_type: int,
        cost: float,
    ) -> PieceRecord:
        """Write a whole piece (held, or still arriving) and compute its CRC in one thread hop; neither durable nor
        visible yet. A piece still arriving costs ``cost`` plus the time it took to arrive."""
        length = data.length if isinstance(data, IncomingPiece) else len(data)
        _check_span(number, offset, length)
        started = time.monotonic()
        with self.storage._disk_full_guard(self.task_id, number):
            if isinstance(data, IncomingPiece):  # given up, it stops before another parent may write the piece
                progress = Progress(offset)
                await self.hop(partial(self.receive, progress, offset + length, data.read_into), data.end)
                crc, cost = progress.crc, cost + time.monotonic() - started
            else:
                crc = await self.hop(partial(self._write, offset, (data,), 0))
        return self.storage._piece(self.task_id, number, offset, length, crc, parent_id, traffic_type, cost)

    def receive(
        self,
        progress: Progress,
        end: int,
        read_into: Callable[[memoryview], int],
        written: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        """In a worker thread: fill the file from ``progress.offset`` to ``end`` with what ``read_into`` receives,
        a block at a time, each written and CRCed (then passed to ``written``) while still in the CPU's cache.

        ``progress`` says how far it got, CRC included, should a read fail: a resumed piece continues from there.
        """
        block = thread_block()
        with self._full_disk():
            while progress.offset < end:
                offset = progress.offset
                received = block[: read_into(block[: end - offset])]
                crc = self._write(offset, (received,), progress.crc)
                progress.offset, progress.crc = offset + len(received), crc  # together: a resume trusts both
                if written is not None:
                    written(offset, received)

    @contextlib.contextmanager
    def _full_disk(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on the cache's filesystem writing task {self.task_id}") from None
            raise

    def piece(self, number: int, offset: int, length: int, crc: int, traffic_type: int, started: float) -> PieceRecord:
        """The record of a piece whose bytes were written; its cost runs from ``started`` (``time.monotonic``)."""
        _check_span(number, offset, length)
        cost = time.monotonic() - started
        return self.storage._piece(self.task_id, number, offset, length, crc, None, traffic_type, cost)

    async def commit(self, pieces: Sequence[PieceRecord]) -> None:
        """Make written pieces visible: the file is synced first, then their rows go in, in one transaction."""
        for piece in pieces:
            if piece.task_id != self.task_id:
                raise InvalidPiece(f"piece {piece.number} belongs to task {piece.task_id}, not {self.task_id}")
        number = pieces[0].number if pieces else -1
        with self.storage._disk_full_guard(self.task_id, number):
            size = await self.hop(partial(sync_and_size, self._fd))
            await self.storage._commit(self.task_id, pieces, size)


class TaskReader:
    """A handle on one task being uploaded: each read is CRC-verified and counts as a use of the task."""

    def __init__(self, storage: Storage, task_id: str) -> None:
        self.storage = storage
        self.task_id = task_id

    async def read_piece(self, number: int) -> tuple[PieceRecord, bytes]:
        piece, data = await self.storage.read_piece(self.task_id, number)
        await self.storage.record_upload(self.task_id)
        return piece, data

    async def read_piece_into(self, number: int, buffer: bytearray) -> tuple[PieceRecord, memoryview]:
        """One piece into ``buffer`` (see ``Storage.read_piece_into``), counted as a use of the task."""
        piece, view = await self.storage.read_piece_into(self.task_id, number, buffer)
        await self.storage.record_upload(self.task_id)
        return piece, view


class PieceCache:
    """Committed piece metadata of recently used tasks, so serving a piece reads no SQLite.

    Derived from the store, never ahead of it: pieces are added once their rows are committed, and a task's entry
    goes when a piece is dropped or the task is evicted, deleted or discarded. ``epoch`` counts every change, so a
    reader that loaded a task from SQLite can tell whether a change happened meanwhile (then it does not cache).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # in pieces
        self.epoch = 0
        self._tasks: OrderedDict[str, dict[int, PieceRecord]] = OrderedDict()
        self._pieces = 0

    def get(self, task_id: str) -> dict[int, PieceRecord] | None:
        known = self._tasks.get(task_id)
        if known is not None:
            self._tasks.move_to_end(task_id)
        return known

    def put(self, task_id: str, pieces: dict[int, PieceRecord]) -> None:
        self.forget(task_id)
        self._tasks[task_id] = pieces
        self._pieces += len(pieces)
        self._trim()

    def add(self, task_id: str, pieces: Sequence[PieceRecord]) -> None:
        """Committed pieces join a cached task (an uncached one is read whole when next asked for)."""
        self.epoch += 1
        known = self._tasks.get(task_id)
        if known is not None:
            before = len(known)
            known.update((piece.number, piece) for piece in pieces)
            self._pieces += len(known) - before
            self._trim()

    def drop_piece(self, task_id: str, number: int) -> None:
        self.epoch += 1
        known = self._tasks.get(task_id)
        if known is not None and known.pop(number, None) is not None:
            self._pieces -= 1

    def forget(self, task_id: str) -> None:
        self.epoch += 1
        known = self._tasks.pop(task_id, None)
        if known is not None:
            self._pieces -= len(known)

    def _trim(self) -> None:
        while self._pieces > self.capacity and len(self._tasks) > 1:
            _, known = self._tasks.popitem(last=False)
            self._pieces -= len(known)


def _check_span(number: int, offset: int, length: int) -> None:
    if number < 0 or offset < 0 or length < 0:
        raise InvalidPiece(f"piece {number} at offset {offset} with length {length} is out of range")


def _check_holder(holder: str) -> None:
    if not holder or len(holder) > 512 or not holder.isprintable():
        raise ValueError("holder must be 1 to 512 printable characters")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _wipe(root: Path) -> None:
    """``storage.keep: false``: start from an empty cache, as upstream does."""
    for name in ("content", METADATA_FILE, METADATA_FILE + "-wal", METADATA_FILE + "-shm"):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            os.unlink(path)
