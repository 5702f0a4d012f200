"""The storage manager on a real directory and a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import sqlite3
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from dfdaemon.ids import InvalidTaskId
from dfdaemon.storage import (
    DiskFull,
    IncomingPiece,
    InvalidPiece,
    PieceCorrupt,
    PieceNotFound,
    Storage,
    TaskInfo,
    TaskInUse,
    TaskNotFound,
    TaskState,
    content,
)
from dfdaemon.storage.content import write_vector_at
from dfdaemon.storage.metadata import SCHEMA_VERSION, MetadataStore
from tests.storage_support import FakeClock, du_bytes, fill, make_id, payload, read_all


async def reopen(storage: Storage, keep: bool = True) -> Storage:
    await storage.close()
    fresh = Storage(storage.root, keep=keep, clock=storage.clock)
    await fresh.open()
    return fresh


async def test_pieces_round_trip_to_the_origin_bytes(storage: Storage) -> None:
    task = await fill(storage, "layer", 300_000, piece_length=65_536)
    assert task.state is TaskState.SUCCEEDED
    assert task.content_length == 300_000
    assert task.piece_count == 5
    data = await read_all(storage, task.id)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(payload("layer", 300_000)).hexdigest()
    path = storage.content.path(task.id)
    assert path == storage.root / "content" / "tasks" / task.id[:3] / task.id
    assert path.stat().st_size == 300_000


async def test_out_of_order_pieces_and_crc_digests(storage: Storage) -> None:
    tid = make_id("shuffled")
    data = payload("shuffled", 10)
    async with storage.download(tid, TaskInfo(url="http://origin.test/shuffled", content_length=10)) as writer:
        second = await writer.write_piece(1, 5, data[5:])
        first = await writer.write_piece(0, 0, data[:5])
        await writer.finish()
    assert first.digest == f"crc32:{zlib.crc32(data[:5])}"
    assert second.digest == f"crc32:{zlib.crc32(data[5:])}"
    assert [p.number for p in await storage.pieces(tid)] == [0, 1]
    assert await read_all(storage, tid) == data


async def test_batched_commit_makes_durable_pieces_visible_at_once(storage: Storage) -> None:
    """A writer that stages pieces and commits them in one batch: nothing is visible before the commit."""
    tid = make_id("batched")
    data = payload("batched", 3000)
    async with storage.download(tid, TaskInfo(url="http://origin.test/batched", content_length=3000)) as writer:
        pieces = [await writer.stage_piece(n, n * 1000, data[n * 1000 : n * 1000 + 1000]) for n in range(3)]
        assert await storage.piece(tid, 0) is None
        with pytest.raises(InvalidPiece, match="belongs to task"):
            await (await writer.file()).commit([replace(pieces[0], task_id=make_id("other"))])
        await (await writer.file()).commit(pieces)
        assert await storage.piece(tid, 2) == pieces[2]
        await writer.finish()
    assert storage.task_bytes(tid) == 3000
    assert hashlib.sha256(await read_all(storage, tid)).digest() == hashlib.sha256(data).digest()


async def test_corrupt_piece_is_detected_and_dropped(storage: Storage) -> None:
    task = await fill(storage, "bitrot", 200_000, piece_length=65_536)
    path = storage.content.path(task.id)
    with path.open("r+b") as f:
        f.seek(70_000)
        f.write(b"\xff\xfe")
    with pytest.raises(PieceCorrupt):
        await storage.read_piece(task.id, 1)
    with pytest.raises(PieceNotFound):
        await storage.read_piece(task.id, 1)
    assert [p.number for p in await storage.pieces(task.id)] == [0, 2, 3]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "A" * 64, "a" * 63, "a" * 10_000, "/abs"])
async def test_invalid_task_ids_never_touch_the_filesystem(storage: Storage, tmp_path: Path, bad: str) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidTaskId):
        async with storage.download(bad, TaskInfo()):
            pass
    with pytest.raises(InvalidTaskId):
        await storage.acquire("user:x", [bad])
    with pytest.raises(InvalidTaskId):
        await storage.delete_task(bad)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert before == after


async def test_acquire_is_idempotent_and_release_removes_the_pair(storage: Storage) -> None:
    task = await fill(storage, "img", 1000)
    await storage.acquire("container:default/a", [task.id])
    await storage.acquire("container:default/a", [task.id])
    await storage.acquire("container:default/b", [task.id])
    refs = await storage.get_references(task.id)
    assert refs.holders == ["container:default/a", "container:default/b"]
    assert refs.refcount == 2
    assert await storage.release("container:default/a", [task.id]) == [task.id]
    assert await storage.release("container:default/a", [task.id]) == []
    assert (await storage.get_references(task.id)).holders == ["container:default/b"]


async def test_acquire_is_all_or_nothing(storage: Storage) -> None:
    present = await fill(storage, "present", 100)
    absent = make_id("absent")
    with pytest.raises(TaskNotFound, match=absent):
        await storage.acquire("user:u", [present.id, absent])
    assert await storage.list_holds(holder="user:u") == []


async def test_leases_expire_unless_kept_alive(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "leased", 100)
    holds = await storage.acquire("runtime:cri", [task.id], ttl=60)
    assert holds[0].expires_at == clock.now + 60
    clock.advance(50)
    renewed = await storage.keep_alive("runtime:cri")
    assert renewed[0].expires_at == clock.now + 60
    clock.advance(50)
    assert (await storage.get_references(task.id)).holders == ["runtime:cri"]
    clock.advance(11)
    assert (await storage.get_references(task.id)).holders == []


async def test_sync_replaces_the_holders_whole_set(storage: Storage) -> None:
    a, b, c = [await fill(storage, name, 100) for name in ("a", "b", "c")]
    await storage.acquire("container:x", [a.id, b.id])
    result = await storage.sync("container:x", [b.id, c.id, make_id("not-here")])
    assert result.acquired == [c.id]
    assert result.released == [a.id]
    assert result.kept == [b.id]
    assert result.missing == [make_id("not-here")]
    assert sorted(h.task_id for h in await storage.list_holds(holder="container:x")) == sorted([b.id, c.id])
    empty = await storage.sync("container:x", [])
    assert sorted(empty.released) == sorted([b.id, c.id])


async def test_delete_refuses_referenced_tasks_and_names_them(storage: Storage) -> None:
    task = await fill(storage, "busy", 1000)
    await storage.acquire("container:default/busybox", [task.id])
    with pytest.raises(TaskInUse, match="held by container:default/busybox"):
        await storage.delete_task(task.id)
    deleted: list[str] = []

    async def listener(tid: str) -> None:
        deleted.append(tid)

    storage.add_deletion_listener(listener)
    dropped, freed = await storage.delete_task(task.id, force=True)
    assert dropped == ["container:default/busybox"]
    assert freed == 1000
    assert deleted == [task.id]
    assert not storage.content.path(task.id).exists()
    assert await storage.get_task(task.id) is None


async def test_in_flight_download_and_upload_count_as_references(storage: Storage) -> None:
    task = await fill(storage, "flight", 1000)
    async with storage.upload(task.id):
        refs = await storage.get_references(task.id)
        assert (refs.uploads, refs.downloads) == (1, 0)
        with pytest.raises(TaskInUse, match="upload"):
            await storage.delete_task(task.id, force=True)
    async with storage.download(task.id, TaskInfo(url="http://origin.test/flight")):
        assert (await storage.get_references(task.id)).downloads == 1
        with pytest.raises(TaskInUse, match="download"):
            await storage.delete_task(task.id)
    assert (await storage.get_references(task.id)).refcount == 0


async def test_references_are_released_when_the_work_fails(storage: Storage) -> None:
    task = await fill(storage, "boom", 100)
    with pytest.raises(RuntimeError):
        async with storage.upload(task.id):
            raise RuntimeError("peer went away")
    with pytest.raises(RuntimeError):
        async with storage.download(task.id, TaskInfo()):
            raise RuntimeError("origin went away")
    assert (await storage.get_references(task.id)).refcount == 0


async def test_tasks_and_holds_survive_a_restart(storage: Storage) -> None:
    task = await fill(storage, "kept", 5000)
    await storage.acquire("container:default/web", [task.id])
    storage = await reopen(storage)
    try:
        assert (await storage.get_references(task.id)).holders == ["container:default/web"]
        assert await read_all(storage, task.id) == payload("kept", 5000)
        assert storage.meta.schema_version == SCHEMA_VERSION
    finally:
        await storage.close()


async def test_keep_false_starts_empty(storage: Storage) -> None:
    task = await fill(storage, "gone", 5000)
    storage = await reopen(storage, keep=False)
    try:
        assert await storage.get_task(task.id) is None
        assert storage.content_bytes == 0
    finally:
        await storage.close()


async def test_startup_reconciles_with_the_disk(storage: Storage) -> None:
    vanished = await fill(storage, "vanished", 4000)
    kept = await fill(storage, "kept", 3000)
    orphan = storage.content.root / "abc" / ("abc" + "0" * 61)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 100)
    junk = storage.content.root / "not-a-shard.txt"
    junk.write_text("junk")
    storage.content.path(vanished.id).unlink()
    storage = await reopen(storage)
    try:
        assert not orphan.exists()
        assert not junk.exists()
        record = await storage.get_task(vanished.id)
        assert record is not None and record.state is TaskState.FAILED
        assert await storage.pieces(vanished.id) == []
        assert await read_all(storage, kept.id) == payload("kept", 3000)
        assert storage.content_bytes == 3000
    finally:
        await storage.close()


async def test_half_done_eviction_is_finished_at_start(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "half", 4000)
    assert storage.meta.mark_evicting(task.id, [TaskState.SUCCEEDED], clock.now)
    storage = await reopen(storage)
    try:
        assert await storage.get_task(task.id) is None
        assert not storage.content.path(task.id).exists()
    finally:
        await storage.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(Exception, match="newer than this daemon"):
        MetadataStore(path)


async def test_usage_tracks_du_within_one_percent(storage: Storage, clock: FakeClock) -> None:
    tasks = [await fill(storage, f"t{i}", 50_000 + i * 12_345, piece_length=16_384) for i in range(12)]
    await fill(storage, "partial", 40_000, piece_length=16_384, finish=False)
    await storage.acquire("user:u", [tasks[0].id])
    await storage.delete_task(tasks[3].id)
    await storage.delete_task(tasks[5].id)
    await fill(storage, "late", 77_777)
    used = await storage.used_bytes()
    actual = du_bytes(storage.root)
    assert abs(used - actual) <= actual * 0.01, (used, actual)
    storage = await reopen(storage)
    try:
        used = await storage.used_bytes()
        assert abs(used - du_bytes(storage.root)) <= du_bytes(storage.root) * 0.01
    finally:
        await storage.close()


async def test_concurrent_downloads_of_different_tasks(storage: Storage) -> None:
    tasks = await asyncio.gather(*(fill(storage, f"c{i}", 100_000, piece_length=8192) for i in range(8)))
    for task in tasks:
        assert (
            hashlib.sha256(await read_all(storage, task.id)).digest()
            == hashlib.sha256(payload(task.url.rsplit("/", 1)[1], 100_000)).digest()
        )


async def test_content_files_are_private_to_the_storage_dir(storage: Storage) -> None:
    task = await fill(storage, "mode", 10)
    mode = os.stat(storage.content.path(task.id)).st_mode & 0o777
    assert mode & 0o002 == 0


def open_files() -> list[str]:
    """What this process's file descriptors point at (a deleted file's name ends in " (deleted)")."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the descriptor that listed the directory is gone
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def open_descriptors(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    return open_files().count(str(path))


async def test_a_download_writes_through_one_open_file_from_both_paths(storage: Storage) -> None:
    """Pieces streamed from the origin and pieces staged from a parent go through the same descriptor, which is
    closed when the download ends."""
    tid = make_id("one-file")
    data = payload("one-file", 4000)
    path = storage.content.path(tid)
    async with storage.download(tid, TaskInfo(url="http://origin.test/one-file", content_length=4000)) as writer:
        async with writer.piece_file() as file:
            chunks = [memoryview(data)[0:700], memoryview(data)[700:2000]]
            crc = await file.hop(lambda: file.write_chunks(0, chunks, 0))
            streamed = file.piece(0, 0, 2000, crc, 1, 0.0)
            await file.commit([streamed])
        staged = [await writer.stage_piece(n, n * 1000, data[n * 1000 : (n + 1) * 1000]) for n in (2, 3)]
        await (await writer.file()).commit(staged)
        assert open_descriptors(path) == 1
        await writer.finish()
    assert open_descriptors(path) == 0
    assert streamed.crc == zlib.crc32(data[:2000])
    assert await read_all(storage, tid) == data


def test_a_vectored_write_takes_more_chunks_than_one_call_may(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    cuts = sorted({0, len(data), *(int.from_bytes(data[i : i + 3]) % len(data) for i in range(0, 9000, 3))})
    chunks = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    assert len(chunks) > 2048  # more than Linux's IOV_MAX (1024) allows in one pwritev
    assert written_vector(tmp_path / "vectored", 100, chunks) == bytes(100) + data


def test_vectored_writes_stay_within_the_write_limit_per_call_and_resume_after_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No call writes more than ``content._WRITE_LIMIT`` bytes (large calls are slow on VMs, see there); a short
    write resumes mid-chunk."""
    data = os.urandom(5 * 1024 * 1024 + 12345)
    cuts = [0, 1000, 3 * 1024 * 1024, 3 * 1024 * 1024 + 7, len(data)]
    chunks = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    asked: list[int] = []
    real_pwritev = os.pwritev

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        """Writes all but the last 3 bytes asked for (all of a call of 3 bytes or fewer): short writes that end in
        the first view, or after whole views in a later one."""
        total = sum(len(b) for b in buffers)
        asked.append(total)
        keep, kept = max(1, total - 3) if total > 3 else total, []
        for view in buffers:
            kept.append(view[:keep])
            keep -= len(kept[-1])
            if not keep:
                break
        return real_pwritev(fd, kept, offset)

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    assert written_vector(tmp_path / "limited", 4096, chunks) == bytes(4096) + data
    assert max(asked) == content._WRITE_LIMIT


async def test_a_whole_piece_is_written_within_the_write_limit_per_call(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    tid = make_id("limited piece")
    data = os.urandom(4 * 1024 * 1024 + 5)
    asked: list[int] = []
    real_pwritev = os.pwritev

    def recording_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        asked.append(sum(len(b) for b in buffers))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", recording_pwritev)
    info = TaskInfo(url="http://origin.test/limited", content_length=len(data), piece_length=len(data))
    async with storage.download(tid, info) as writer:
        piece = await writer.stage_piece(0, 0, data)
        await (await writer.file()).commit([piece])
        await writer.finish()
    assert piece.crc == zlib.crc32(data)
    assert await read_all(storage, tid) == data
    assert max(asked) == content._WRITE_LIMIT and sum(asked) == len(data)


def written_vector(path: Path, offset: int, chunks: list[memoryview]) -> bytes:
    """``write_vector_at`` into a new file at ``path``; the file's bytes afterwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_vector_at(fd, offset, chunks)
    finally:
        os.close(fd)
    return path.read_bytes()


async def test_a_discarded_task_holds_no_descriptor_on_its_old_bytes(storage: Storage) -> None:
    """Failing with discard closes the writer's file first, so the discarded bytes go back to the filesystem."""
    tid = make_id("discarded")
    data = payload("discarded", 3000)
    async with storage.download(tid, TaskInfo(url="http://origin.test/discarded", content_length=3000)) as writer:
        await writer.write_piece(0, 0, data[:1000])
        await writer.fail(discard=True)
        assert [name for name in open_files() if tid in name] == []
        assert await storage.pieces(tid) == []
    task = await storage.get_task(tid)
    assert task is not None and task.state is TaskState.FAILED


async def test_a_full_disk_under_a_staged_piece_is_reported_as_such(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    tid = make_id("full")
    async with storage.download(tid, TaskInfo(url="http://origin.test/full", content_length=3000)) as writer:

        def no_space(fd: int, data: object, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwritev", no_space)
        with pytest.raises(DiskFull, match="writing piece 2 of task"):
            await writer.stage_piece(2, 2000, b"x" * 1000)
        monkeypatch.undo()
        assert await storage.pieces(tid) == []


async def test_a_piece_given_up_while_arriving_stops_its_writer_before_the_stage_returns(storage: Storage) -> None:
    """A stage cancelled (a piece timeout) ends the incoming piece and waits for the writing thread: once the caller
    may hand the piece to another parent, no byte of this one is written any more."""
    tid = make_id("incoming-given-up")
    ended, stopped = threading.Event(), threading.Event()
    first = payload("incoming-given-up", 1000)

    def read_into(target: memoryview) -> int:
        if not ended.is_set() and not getattr(read_into, "sent", False):
            target[: len(first)] = first
            read_into.sent = True  # type: ignore[attr-defined]
            return len(first)
        ended.wait(10)  # a silent parent, until the fetch is ended
        stopped.set()
        raise OSError("the fetch was given up")

    info = TaskInfo(url="http://origin.test/given-up", content_length=4096, piece_length=4096)
    async with storage.download(tid, info) as writer:
        staging = asyncio.ensure_future(writer.stage_piece(0, 0, IncomingPiece(4096, read_into, ended.set)))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(staging, 0.3)
        assert ended.is_set() and stopped.is_set()  # ended by the stage, and the thread was through before it raised
        await writer.fail(discard=True)
