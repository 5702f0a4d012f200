"""Back to source under download.backToSourceBandwidthLimit and download.bandwidthLimit: every byte the origin
sends is taken from both buckets, as upstream counts it (a real DownloadManager against a loopback origin)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from dfdaemon.backend import Backend
from dfdaemon.download import ByteRange, DownloadManager, DownloadRequest, Started
from dfdaemon.gc import GarbageCollector, GCPolicy
from dfdaemon.ratelimit import Bandwidth
from dfdaemon.storage import Storage
from dfdaemon.storage.content import BLOCK
from tests import test_source_stream
from tests.test_ratelimit import FakeTime, bucket
from tests.test_source_stream import Origin

MIB = 1024 * 1024
origin = test_source_stream.origin  # the loopback origin fixture, 10 MiB and a bit


@asynccontextmanager
async def managed(tmp_path: Path, bandwidth: Bandwidth) -> AsyncIterator[tuple[DownloadManager, Storage]]:
    """A real download manager over real storage with these buckets, closed afterwards."""
    storage = Storage(tmp_path / "storage")
    await storage.open()
    backend = Backend(timeout=10)
    gc = GarbageCollector(storage, GCPolicy())
    manager = DownloadManager(storage, gc, backend, host_ip="127.0.0.1", hostname="t", bandwidth=bandwidth)
    try:
        yield manager, storage
    finally:
        await manager.close()
        await backend.close()
        await storage.close()


async def test_bytes_from_the_origin_are_taken_from_back_to_source_and_download(tmp_path: Path, origin: Origin) -> None:
    time = FakeTime(advance=False)  # waits are computed and recorded, not slept
    download, back_to_source = bucket(MIB, time), bucket(4 * MIB, time)
    async with managed(tmp_path, Bandwidth(None, download, back_to_source, None)) as (manager, storage):
        events = [event async for event in manager.download(DownloadRequest(url=origin.url))]
        started = events[0]
        assert isinstance(started, Started)
        assert storage.content.path(started.task_id).read_bytes() == origin.body
    size = len(origin.body)
    assert (download.tokens, back_to_source.tokens) == (MIB - size, 4 * MIB - size)
    assert time.sleeps and time.sleeps[-1] == (size - MIB) / MIB  # the last chunk waits for the whole debt


async def test_a_prefetch_also_takes_from_the_prefetch_limit_and_a_plain_download_does_not(
    tmp_path: Path, origin: Origin
) -> None:
    """proxy.prefetchBandwidthLimit: the background download a ranged request with prefetch starts (is_prefetch)
    draws on the prefetch bucket for every origin byte; the ranged request itself does not."""
    time = FakeTime(advance=False)
    prefetch = bucket(MIB, time)
    size = len(origin.body)
    async with managed(tmp_path, Bandwidth(None, None, None, prefetch)) as (manager, storage):
        ranged = DownloadRequest(url=origin.url, range=ByteRange(0, 10), prefetch=True)
        events = [event async for event in manager.download(ranged)]
        started = events[0]
        assert isinstance(started, Started)
        first_piece = next(piece.length for piece in await storage.pieces(started.task_id))
        await manager.prefetched(started.task_id)
        assert storage.content.path(started.task_id).read_bytes() == origin.body
    # Every byte but the ranged request's own piece came through the prefetch, and only those took from the bucket.
    assert prefetch.tokens == MIB - (size - first_piece)


async def test_a_limited_download_reads_the_origin_in_a_tenth_of_a_seconds_worth_at_a_time(
    tmp_path: Path, origin: Origin
) -> None:
    """Under a limit, a body the writing thread reads from its socket is taken in hops of a tenth of a second's
    worth (at least one block), each paid before it is read: the origin is never left idle for a whole piece."""
    time = FakeTime(advance=False)
    download = bucket(MIB, time)
    taken: list[int] = []
    acquire = download.acquire

    async def recording(count: int) -> None:
        taken.append(count)
        await acquire(count)

    download.acquire = recording  # type: ignore[method-assign]
    async with managed(tmp_path, Bandwidth(None, download, None, None)) as (manager, storage):
        events = [event async for event in manager.download(DownloadRequest(url=origin.url))]
        started = events[0]
        assert isinstance(started, Started)
        assert storage.content.path(started.task_id).read_bytes() == origin.body
    assert sum(taken) == len(origin.body)
    assert max(taken) == BLOCK  # a tenth of 1 MiB/s is less than a block: a block at a time
