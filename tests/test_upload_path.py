"""The upload path's storage side and the DownloadPiece wire bytes built around a reused buffer."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from dfdaemon import ids
from dfdaemon.api import dfdaemon_pb2
from dfdaemon.rpc import convert
from dfdaemon.rpc.upload import encode_download_piece
from dfdaemon.storage import PieceCorrupt, PieceRecord, Storage, TaskInfo, TaskNotFound, TaskState, TrafficType
from dfdaemon.storage.manager import PieceCache
from tests.storage_support import FakeClock, fill, make_id, payload


async def stored_uploads(storage: Storage, task_id: str) -> tuple[int, float]:
    """(uploaded_count, last_used_at) as SQLite holds them, pending uses not merged in."""
    row = await storage._db(storage.meta.get_task, task_id)
    assert row is not None
    return row.uploaded_count, row.last_used_at


async def test_served_pieces_are_counted_in_memory_then_in_one_write(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "served", 200_000, piece_length=65_536)
    before = await stored_uploads(storage, task.id)
    clock.advance(60)
    async with storage.upload(task.id) as reader:
        for number in range(task.piece_count):
            await reader.read_piece(number)
    assert await stored_uploads(storage, task.id) == before  # no write per piece served
    seen = await storage.get_task(task.id)
    assert seen is not None and (seen.uploaded_count, seen.last_used_at) == (4, clock.now)
    assert [t.uploaded_count for t in await storage.list_tasks()] == [4]
    await storage.flush_uses()
    assert await stored_uploads(storage, task.id) == (4, clock.now)


async def test_pending_uses_are_written_when_the_flush_timer_fires(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "later", 1000)
    async with storage.upload(task.id) as reader:
        await reader.read_piece(0)
    timer = storage._uses_timer
    assert timer is not None
    timer.cancel()
    storage._flush_uses_later()  # what the timer runs once USE_FLUSH_DELAY has passed
    assert storage._uses_flush is not None
    await storage._uses_flush
    assert await stored_uploads(storage, task.id) == (1, clock.now)


async def test_gc_sees_the_last_upload(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "gc-sees", 1000)
    clock.advance(3600)
    async with storage.upload(task.id) as reader:
        await reader.read_piece(0)
    (use,) = await storage.gc_view(purge_lapsed=False)
    assert use.last_used_at == clock.now


async def test_an_older_pending_use_never_moves_the_last_use_back(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "older", 1000)
    async with storage.upload(task.id) as reader:
        await reader.read_piece(0)
    served_at = clock.now
    clock.advance(100)
    await storage.touch(task.id)  # a later use written straight away
    await storage.flush_uses()
    assert await stored_uploads(storage, task.id) == (1, served_at + 100)


async def test_uses_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    storage = Storage(tmp_path / "cache", clock=clock)
    await storage.open()
    task = await fill(storage, "restart", 1000)
    async with storage.upload(task.id) as reader:
        await reader.read_piece(0)
        await reader.read_piece(0)
    await storage.close()
    fresh = Storage(tmp_path / "cache", clock=clock)
    await fresh.open()
    try:
        record = await fresh.get_task(task.id)
        assert record is not None and record.uploaded_count == 2
    finally:
        await fresh.close()


async def test_read_piece_into_reuses_the_buffer_and_checks_the_crc(storage: Storage) -> None:
    task = await fill(storage, "into", 5000, piece_length=2048)
    data = payload("into", 5000)
    buffer = bytearray()
    async with storage.upload(task.id) as reader:
        for number, (start, end) in enumerate([(0, 2048), (2048, 4096), (4096, 5000)]):
            piece, view = await reader.read_piece_into(number, buffer)
            with view:
                assert bytes(view) == data[start:end] and piece.number == number
    assert len(buffer) == 2048  # grown once, to the largest piece
    with open(storage.content.path(task.id), "r+b") as file:
        file.seek(2050)
        file.write(b"\0")
    async with storage.upload(task.id) as reader:
        with pytest.raises(PieceCorrupt):
            await reader.read_piece_into(1, buffer)
    assert await storage.piece(task.id, 1) is None
    buffer.extend(b"x")  # no view of it is left behind


async def test_staged_pieces_are_invisible_until_committed(storage: Storage) -> None:
    tid = make_id("staged")
    data = payload("staged", 3000)
    async with storage.download(tid, TaskInfo(url="http://origin.test/staged", content_length=3000)) as writer:
        first = await writer.stage_piece(0, 0, memoryview(data)[:1500], parent_id="peer-a")
        second = await writer.stage_piece(1, 1500, data[1500:])
        assert (first.crc, second.crc) == (zlib.crc32(data[:1500]), zlib.crc32(data[1500:]))
        assert first.traffic_type == TrafficType.REMOTE_PEER
        assert await storage.pieces(tid) == []
        await (await writer.file()).commit([first, second])
        assert [p.number for p in await storage.pieces(tid)] == [0, 1]
        await writer.finish()
    _, got = await storage.read_piece(tid, 1)
    assert got == data[1500:]


async def test_download_piece_bytes_parse_as_the_message_protobuf_would_build(storage: Storage) -> None:
    task = await fill(storage, "wire", 300_000, piece_length=200_000)  # a varint length of three bytes
    buffer = bytearray()
    for number in range(task.piece_count):
        async with storage.upload(task.id) as reader:
            piece, view = await reader.read_piece_into(number, buffer)
        with view:
            wire = encode_download_piece(piece, view)
            content = bytes(view)
        expected = dfdaemon_pb2.DownloadPieceResponse(
            digest=ids.piece_metadata_digest(piece.number, piece.offset, piece.length, piece.digest)
        )
        expected.piece.CopyFrom(convert.piece(piece, piece.traffic_type))
        expected.piece.content = content
        assert dfdaemon_pb2.DownloadPieceResponse.FromString(wire) == expected
        assert len(wire) == expected.ByteSize()


class MetadataReads:
    """Counts the metadata store's reads of tasks and pieces (the store itself still answers them)."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("get_task", "get_piece", "list_pieces"):
            original = getattr(storage.meta, name)
            monkeypatch.setattr(storage.meta, name, self._counting(name, original))

    def _counting(self, name: str, original: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return original(*args, **kwargs)

        return counted


async def test_serving_a_task_reads_its_metadata_from_sqlite_once(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = await fill(storage, "cached", 200_000, piece_length=65_536)
    data = payload("cached", 200_000)
    reads = MetadataReads(storage, monkeypatch)
    buffer = bytearray()
    for _ in range(2):
        for number in range(task.piece_count):
            async with storage.upload(task.id) as reader:
                piece, view = await reader.read_piece_into(number, buffer)
                with view:
                    assert bytes(view) == data[piece.offset : piece.offset + piece.length]
            assert await storage.piece(task.id, number) == piece
    assert sorted(reads.calls) == ["get_task", "list_pieces"]  # the first upload's lookup, nothing after it


async def test_the_piece_cache_follows_commits_and_forgets_a_deleted_task(storage: Storage) -> None:
    tid = make_id("followed")
    data = payload("followed", 3000)
    async with storage.download(tid, TaskInfo(url="http://origin.test/followed", content_length=3000)) as writer:
        assert await storage.pieces(tid) == []  # the task is cached with no piece
        first = await writer.write_piece(0, 0, data[:1000])
        assert await storage.piece(tid, 0) == first
        staged = [await writer.stage_piece(n, n * 1000, data[n * 1000 : (n + 1) * 1000]) for n in (1, 2)]
        assert await storage.piece(tid, 1) is None
        await (await writer.file()).commit(staged)
        assert [p.number for p in await storage.pieces(tid)] == [0, 1, 2]
        await writer.finish()
    await storage.delete_task(tid)
    assert await storage.piece(tid, 0) is None
    with pytest.raises(TaskNotFound):
        async with storage.upload(tid):
            pass
    task = await fill(storage, "followed", 3000, piece_length=1000)  # the same task again, from scratch
    async with storage.upload(task.id) as reader:
        _, got = await reader.read_piece(2)
    assert got == data[2000:]


async def test_an_evicted_task_is_not_served_from_the_cache(storage: Storage) -> None:
    task = await fill(storage, "evicted", 3000, piece_length=1000)
    async with storage.upload(task.id) as reader:
        await reader.read_piece(0)
    assert await storage.evict(task.id, [TaskState.SUCCEEDED]) is not None
    with pytest.raises(TaskNotFound):
        async with storage.upload(task.id):
            pass
    assert await storage.pieces(task.id) == []


def test_the_piece_cache_forgets_the_least_recently_used_tasks_past_its_size() -> None:
    def records(name: str, count: int) -> dict[int, PieceRecord]:
        return {n: PieceRecord(make_id(name), n, n * 10, 10, 0, None, 0, 0.0, 0.0) for n in range(count)}

    cache = PieceCache(capacity=5)
    cache.put(make_id("a"), records("a", 2))
    cache.put(make_id("b"), records("b", 2))
    assert cache.get(make_id("a")) is not None  # now the most recently used
    cache.put(make_id("c"), records("c", 2))
    assert cache.get(make_id("b")) is None
    assert cache.get(make_id("a")) is not None and cache.get(make_id("c")) is not None
    cache.put(make_id("huge"), records("huge", 9))  # larger than the whole cache: kept alone
    assert [cache.get(make_id(name)) is not None for name in ("a", "c", "huge")] == [False, False, True]
    cache.add(make_id("huge"), [PieceRecord(make_id("huge"), 9, 90, 10, 0, None, 0, 0.0, 0.0)])
    known = cache.get(make_id("huge"))
    assert known is not None and sorted(known) == list(range(10))
