"""Back to source under download.backToSourceBandwidthLimit and download.bandwidthLimit: every byte the origin
sends is taken from both buckets, as upstream counts it (a real DownloadManager against a loopback origin)."""

from __future__ import annotations

from pathlib import Path

from dfdaemon.backend import Backend
from dfdaemon.download import DownloadManager, DownloadRequest, Started
from dfdaemon.gc import GarbageCollector, GCPolicy
from dfdaemon.ratelimit import Bandwidth
from dfdaemon.storage import Storage
from tests import test_source_stream
from tests.test_ratelimit import FakeTime, bucket
from tests.test_source_stream import Origin

MIB = 1024 * 1024
origin = test_source_stream.origin  # the loopback origin fixture, 10 MiB and a bit


async def test_bytes_from_the_origin_are_taken_from_back_to_source_and_download(tmp_path: Path, origin: Origin) -> None:
    time = FakeTime(advance=False)  # waits are computed and recorded, not slept
    download, back_to_source = bucket(MIB, time), bucket(4 * MIB, time)
    storage = Storage(tmp_path / "storage")
    await storage.open()
    backend = Backend(timeout=10)
    manager = DownloadManager(
        storage,
        GarbageCollector(storage, GCPolicy()),
        backend,
        host_ip="127.0.0.1",
        hostname="t",
        bandwidth=Bandwidth(None, download, back_to_source, None),
    )
    try:
        events = [event async for event in manager.download(DownloadRequest(url=origin.url))]
        started = events[0]
        assert isinstance(started, Started)
        assert storage.content.path(started.task_id).read_bytes() == origin.body
    finally:
        await manager.close()
        await backend.close()
        await storage.close()
    size = len(origin.body)
    assert (download.tokens, back_to_source.tokens) == (MIB - size, 4 * MIB - size)
    assert time.sleeps and time.sleeps[-1] == (size - MIB) / MIB  # the last chunk waits for the whole debt
