"""Load against one real daemon process: many concurrent piece uploads and task downloads, and their limits.

* 200 concurrent ``DfdaemonUpload.DownloadPiece`` calls for the 16 pieces of a cached 64 MiB task all return the
  right bytes; the daemon's peak resident memory (printed with ``-s``) does not grow with the burst: at most
  ``upload.concurrentPieceCount`` pieces are read and sent at once.
* 64 concurrent ``DfdaemonDownload.DownloadTask`` calls over the unix socket, half for one URL (one shared job) and
  half for 32 different URLs, all produce files identical to the origin's, and the origin serves the shared file
  about once.
* Downloads that start together do not overcommit the cache quota (each reserves its bytes).
* Past a configured concurrency limit (``upload.server.maxConcurrentRequests``, ``download.maxConcurrentTasks``) a
  caller gets ``RESOURCE_EXHAUSTED`` at once instead of waiting into its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_ext_pb2, dfdaemon_ext_pb2_grpc, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.http2_support import StalledCaller
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin

pytestmark = pytest.mark.slow

MB = 1_000_000
MiB = 1024 * 1024
GiB = 1024 * MiB
PIECE_LENGTH = 4 * MiB
BIG_SIZE = 64 * MiB  # 16 pieces of 4 MiB: the default piece length for this size
SHARED_SIZE = 24 * MiB + 5
DISTINCT_FILES = 32
PIECE_CALLS = 200
PIECE_CHANNELS = 4
TASK_CALLS = 64
QUOTA_FILES = 8
# During the burst 800 MiB move through the daemon. Its peak RSS grows today by 0.45 to 2.0 GiB (about one copy of
# every piece in flight, sometimes more than two), so even 1 GiB cannot be asserted without flaking. RSS_GUARD only
# catches gross regressions (say, a whole task read per call); BOUNDED_GROWTH is what an upload path holding at most
# 8 pieces at once (the other calls waiting for a slot) stays under: +107 to +190 MiB measured.
RSS_GUARD = 4 * GiB
BOUNDED_GROWTH = 256 * MiB


def vm_bytes(pid: int, field: str) -> int:
    """A ``Vm*`` figure of /proc/PID/status (VmHWM: peak resident memory, VmRSS: current), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS, so that the next reading is the peak from now on."""
    with contextlib.suppress(OSError):  # without it, VmHWM keeps the peak since start (the caching download's)
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def distinct_name(index: int) -> str:
    return f"distinct-{index:02d}.bin"


def quota_name(index: int) -> str:
    return f"quota-{index}.bin"


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("origin") / "files"
    root.mkdir()
    (root / "big.bin").write_bytes(seeded_bytes("big.bin", BIG_SIZE))
    (root / "shared.bin").write_bytes(seeded_bytes("shared.bin", SHARED_SIZE))
    for index in range(DISTINCT_FILES):
        (root / distinct_name(index)).write_bytes(seeded_bytes(distinct_name(index), MB + 977 * index))
    for index in range(QUOTA_FILES):
        (root / quota_name(index)).write_bytes(seeded_bytes(quota_name(index), 12 * MiB))
    with running_origin(root) as running:
        yield running


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("daemon")) as running:
        yield running
        log = running.log()
    assert "Traceback" not in log, log


def download_request(url: str, output: Path | None = None) -> dfdaemon_pb2.DownloadTaskRequest:
    download = common_pb2.Download(url=url)
    if output is not None:
        download.output_path = str(output)
    return dfdaemon_pb2.DownloadTaskRequest(download=download)


async def cache_task(daemon: DaemonProcess, url: str) -> str:
    """Download ``url`` into the daemon's cache (no output file) and return its task id."""
    async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS) as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        task_ids = {response.task_id async for response in stub.DownloadTask(download_request(url), timeout=120)}
    assert len(task_ids) == 1, task_ids
    return task_ids.pop()


@dataclass
class PieceCall:
    number: int
    seconds: float
    error: grpc.StatusCode | None = None


@dataclass
class Burst:
    """What one burst of concurrent DownloadPiece calls against the daemon returned, and what it cost."""

    task_id: str
    calls: list[PieceCall]
    mismatches: list[str]
    seconds: float
    rss_before: int
    peak: int
    uploading_after: int

    @property
    def moved(self) -> int:
        return len(self.calls) * PIECE_LENGTH

    @property
    def growth(self) -> int:
        return self.peak - self.rss_before


async def piece_burst(daemon: DaemonProcess, task_id: str, expected: bytes) -> Burst:
    """Fire PIECE_CALLS concurrent DownloadPiece calls over a few channels, each piece asked for many times."""
    pieces = ids.pieces_for(BIG_SIZE, PIECE_LENGTH)
    pid = daemon.proc.pid
    reset_peak(pid)
    rss_before = vm_bytes(pid, "VmHWM")
    channels = [
        grpc.aio.insecure_channel(daemon.upload_address, options=[*CHANNEL_OPTIONS, ("grpc.channel_id", index)])
        for index in range(PIECE_CHANNELS)
    ]
    stubs = [dfdaemon_pb2_grpc.DfdaemonUploadStub(channel) for channel in channels]
    mismatches: list[str] = []

    async def fetch(call: int) -> PieceCall:
        span = pieces[call % len(pieces)]
        request = dfdaemon_pb2.DownloadPieceRequest(host_id="load-test-host", task_id=task_id, piece_number=span.number)
        started = time.monotonic()
        try:
            response = await stubs[call % len(stubs)].DownloadPiece(request, timeout=90)
        except grpc.aio.AioRpcError as error:
            return PieceCall(span.number, time.monotonic() - started, error.code())
        seconds = time.monotonic() - started
        piece = response.piece
        content = piece.content
        if (
            piece.number != span.number
            or piece.offset != span.offset
            or piece.length != span.length
            or piece.digest != ids.format_crc32(zlib.crc32(content))
            or content != expected[span.offset : span.offset + span.length]
            or response.digest != ids.piece_metadata_digest(span.number, span.offset, span.length, piece.digest)
        ):
            mismatches.append(f"call {call}: piece {span.number} came back wrong (digest {piece.digest})")
        return PieceCall(span.number, seconds)

    try:
        started = time.monotonic()
        calls = await asyncio.gather(*(fetch(call) for call in range(PIECE_CALLS)))
        seconds = time.monotonic() - started
    finally:
        for channel in channels:
            await channel.close()
    peak = vm_bytes(pid, "VmHWM")
    async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        stat = await dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel).StatLocalTask(
            dfdaemon_pb2.StatLocalTaskRequest(task_id=task_id), timeout=10
        )
    burst = Burst(task_id, calls, mismatches, seconds, rss_before, peak, stat.uploading_count)
    latencies = sorted(call.seconds for call in calls)
    print(
        f"\n{PIECE_CALLS} concurrent DownloadPiece calls of 4 MiB ({burst.moved / MiB:.0f} MiB) in {seconds:.2f}s "
        f"({burst.moved / MiB / seconds:.0f} MiB/s), latency median {latencies[len(latencies) // 2]:.2f}s "
        f"max {latencies[-1]:.2f}s; daemon RSS before {rss_before / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
        f"(+{burst.growth / MiB:.0f} MiB: {burst.growth / burst.moved:.2f} of the data moved)"
    )
    return burst


@pytest.fixture(scope="module")
def burst(daemon: DaemonProcess, origin: OriginProcess) -> Burst:
    """One burst against a cached 64 MiB task, shared by the tests that judge it."""

    async def run() -> Burst:
        task_id = await cache_task(daemon, origin.url("big.bin"))
        return await piece_burst(daemon, task_id, (origin.root / "big.bin").read_bytes())

    return asyncio.run(run())


def test_200_concurrent_piece_uploads_return_the_right_bytes(burst: Burst) -> None:
    failed = [call for call in burst.calls if call.error is not None]
    assert not failed, f"{len(failed)} calls failed: {sorted({str(call.error) for call in failed})}"
    assert not burst.mismatches, burst.mismatches[:5]
    assert {call.number for call in burst.calls} == set(range(16))
    # Every upload reference was released: nothing is left "uploading" the task.
    assert burst.uploading_after == 0
    # A coarse guard only (today's peak is erratic, see below): several copies of every piece at once.
    assert burst.peak < RSS_GUARD, f"daemon peak RSS {burst.peak / MiB:.0f} MiB"


def test_piece_upload_memory_does_not_grow_with_the_burst(burst: Burst) -> None:
    assert burst.growth < BOUNDED_GROWTH, (
        f"peak RSS grew by {burst.growth / MiB:.0f} MiB for {len(burst.calls)} concurrent 4 MiB pieces"
    )


async def test_64_concurrent_download_tasks_shared_and_distinct(
    daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path
) -> None:
    # Slow enough (24 MiB in parallel 4 MiB ranges at 4 MB/s each: about a second) that the requests overlap.
    origin.fault("shared.bin", rate=4 * MB)
    served_before = {
        name: origin.bytes_served(name) for name in ["shared.bin", *map(distinct_name, range(DISTINCT_FILES))]
    }
    names = ["shared.bin" if index % 2 == 0 else distinct_name(index // 2) for index in range(TASK_CALLS)]
    outputs = [tmp_path / f"out-{index:02d}-{name}" for index, name in enumerate(names)]

    async def one(stub: dfdaemon_pb2_grpc.DfdaemonDownloadAsyncStub, index: int) -> str:
        """One request to the end; returns its task id after checking it got every piece exactly once."""
        call = stub.DownloadTask(download_request(origin.url(names[index]), outputs[index]), timeout=120)
        task_ids: set[str] = set()
        pieces: list[int] = []
        async for response in call:
            task_ids.add(response.task_id)
            if response.HasField("download_piece_finished_response"):
                pieces.append(response.download_piece_finished_response.piece.number)
        size = (origin.root / names[index]).stat().st_size
        assert sorted(pieces) == list(range(ids.piece_count(size, ids.piece_length_for(size)))), pieces
        assert len(task_ids) == 1, task_ids
        return task_ids.pop()

    started = time.monotonic()
    try:
        async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS) as channel:
            stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
            results = await asyncio.gather(*(one(stub, index) for index in range(TASK_CALLS)), return_exceptions=True)
    finally:
        origin.fault("shared.bin")
    wall = time.monotonic() - started
    errors = [
        f"request {i} ({names[i]}): {result!r}" for i, result in enumerate(results) if not isinstance(result, str)
    ]
    assert not errors, errors[:5]
    print(f"\n{TASK_CALLS} concurrent DownloadTask calls in {wall:.2f}s")

    assert len({result for result, name in zip(results, names, strict=True) if name == "shared.bin"}) == 1
    expected = {name: sha256(origin.root / name) for name in set(names)}
    different = [str(out.name) for out, name in zip(outputs, names, strict=True) if sha256(out) != expected[name]]
    assert not different, different
    # The shared URL was fetched by one job: about once from the origin (plus the one-byte length probe).
    shared_served = origin.bytes_served("shared.bin") - served_before["shared.bin"]
    assert SHARED_SIZE <= shared_served <= 1.05 * SHARED_SIZE, shared_served
    for index in range(DISTINCT_FILES):
        name = distinct_name(index)
        size = (origin.root / name).stat().st_size
        assert size <= origin.bytes_served(name) - served_before[name] <= 1.05 * size + 1, name


async def test_concurrent_downloads_cannot_overcommit_the_quota(origin: OriginProcess, tmp_path: Path) -> None:
    """Downloads that start at the same moment share the quota: those that cannot fit are refused up front."""
    quota = 64 * MiB
    # Nothing finished may be evicted (a long grace period), so the quota can only be kept by refusing.
    config = {"gc": {"policy": {"diskThreshold": quota, "gracePeriod": "10m"}}}
    names = [quota_name(index) for index in range(QUOTA_FILES)]
    for name in names:
        origin.fault(name, rate=4 * MB)  # about a second each: all of them are in flight together
    try:
        with running_daemon(tmp_path / "quota", config) as daemon:
            async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS) as channel:
                stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)

                async def one(name: str) -> grpc.StatusCode:
                    try:
                        async for _ in stub.DownloadTask(download_request(origin.url(name)), timeout=60):
                            pass
                    except grpc.aio.AioRpcError as error:
                        return error.code()
                    return grpc.StatusCode.OK

                codes = await asyncio.gather(*(one(name) for name in names))
                usage = await dfdaemon_ext_pb2_grpc.CacheStub(channel).GetUsage(
                    dfdaemon_ext_pb2.GetUsageRequest(), timeout=10
                )
    finally:
        for name in names:
            origin.fault(name)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.OK in codes
    assert usage.used_bytes <= usage.quota_bytes, (
        f"{codes.count(grpc.StatusCode.OK)} of {len(codes)} accepted; the cache holds {usage.used_bytes / MiB:.1f} "
        f"MiB of a {usage.quota_bytes / MiB:.0f} MiB quota"
    )


# Past the limits: RESOURCE_EXHAUSTED, quickly. Not implemented yet; these tests specify the behaviour.


async def test_piece_uploads_past_the_limit_are_refused_and_memory_stays_small(
    origin: OriginProcess, tmp_path: Path
) -> None:
    """With ``upload.server.maxConcurrentRequests: 8``, a burst of 200 is answered (served or refused) and memory
    stays small: at most the admitted calls' pieces are in memory at once, whatever the size of the burst.

    The upload bandwidth limit keeps each admitted call at work for a tenth of a second once its bucket's first
    second is spent, so the burst meets full slots however fast this machine serves a piece."""
    limit = 8
    config = {"upload": {"server": {"maxConcurrentRequests": limit}, "bandwidthLimit": str(10 * PIECE_LENGTH)}}
    with running_daemon(tmp_path / "limited", config) as daemon:
        task_id = await cache_task(daemon, origin.url("big.bin"))
        reset_peak(daemon.proc.pid)
        peak_before = vm_bytes(daemon.proc.pid, "VmHWM")
        async with grpc.aio.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS) as channel:
            stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)

            async def fetch(call: int) -> grpc.StatusCode:
                request = dfdaemon_pb2.DownloadPieceRequest(task_id=task_id, piece_number=call % 16)
                try:
                    await stub.DownloadPiece(request, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            codes = await asyncio.gather(*(fetch(call) for call in range(PIECE_CALLS)))
        growth = vm_bytes(daemon.proc.pid, "VmHWM") - peak_before
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= limit
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, f"{PIECE_CALLS} calls against a limit of {limit} all served"
    assert growth < BOUNDED_GROWTH, f"peak RSS grew by {growth / MiB:.0f} MiB"


async def test_a_piece_upload_past_the_limit_is_refused_while_the_admitted_ones_are_still_held(
    origin: OriginProcess, tmp_path: Path
) -> None:
    """The refusal does not wait for a slot: with every slot held by callers that never read their piece, one more
    call gets RESOURCE_EXHAUSTED while they are still held; once they are let through, the same call is served the
    right bytes."""
    limit = 4
    config = {"upload": {"concurrentPieceCount": limit, "server": {"maxConcurrentRequests": limit}}}
    with running_daemon(tmp_path / "limited", config) as daemon:
        task_id = await cache_task(daemon, origin.url("big.bin"))
        method = "/dfdaemon.v2.DfdaemonUpload/DownloadPiece"
        holder = await StalledCaller.connect("127.0.0.1", daemon.upload_port)
        held = [
            await holder.call(
                method, dfdaemon_pb2.DownloadPieceRequest(task_id=task_id, piece_number=n).SerializeToString()
            )
            for n in range(limit)
        ]
        await holder.wait_answered(held)  # every handler has returned; its response waits for a window
        request = dfdaemon_pb2.DownloadPieceRequest(task_id=task_id, piece_number=limit)
        async with grpc.aio.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS) as channel:
            stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DownloadPiece(request, timeout=60)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            assert not holder.ended & set(held), "a held upload finished before the refusal"
            await holder.finish()
            served = await served_once_slots_free(stub, request)
    expected = (origin.root / "big.bin").read_bytes()[limit * PIECE_LENGTH : (limit + 1) * PIECE_LENGTH]
    assert hashlib.sha256(served).digest() == hashlib.sha256(expected).digest()


async def served_once_slots_free(
    stub: dfdaemon_pb2_grpc.DfdaemonUploadStub, request: dfdaemon_pb2.DownloadPieceRequest
) -> bytes:
    """The piece's bytes, asking again while the server has not yet freed the slots of the calls just finished."""
    for _ in range(600):  # a liveness bound (about 30 s), not a measurement
        try:
            response = await stub.DownloadPiece(request, timeout=60)
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
            await asyncio.sleep(0.05)
            continue
        return bytes(response.piece.content)
    raise AssertionError("the slots were never freed after their callers went away")


async def test_download_tasks_past_the_limit_are_refused_before_the_running_ones_end(
    origin: OriginProcess, tmp_path: Path
) -> None:
    """With ``download.maxConcurrentTasks: 2``, new tasks past two running ones are refused at once.

    Joining a task that is already downloading costs nothing and is not counted; these are 8 different tasks.
    """
    limit = 2
    names = [distinct_name(index) for index in range(8)]
    for name in names:
        origin.fault(name, rate=MB)  # each download lasts about a second: the first ones are still running
    try:
        with running_daemon(tmp_path / "limited", {"download": {"maxConcurrentTasks": limit}}) as daemon:
            async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS) as channel:
                stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)

                finished: list[grpc.StatusCode] = []  # in the order the calls ended

                async def one(name: str) -> None:
                    try:
                        async for _ in stub.DownloadTask(download_request(origin.url(name)), timeout=60):
                            pass
                    except grpc.aio.AioRpcError as error:
                        finished.append(error.code())
                        return
                    finished.append(grpc.StatusCode.OK)

                await asyncio.gather(*(one(name) for name in names))
    finally:
        for name in names:
            origin.fault(name)
    assert set(finished) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, finished
    assert finished.count(grpc.StatusCode.OK) >= limit
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in finished, "8 concurrent distinct tasks against a limit of 2 all ran"
    # The refusals did not wait for a running download to end: every one came before the first accepted task ended.
    refused_at = [i for i, code in enumerate(finished) if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    served_at = [i for i, code in enumerate(finished) if code is grpc.StatusCode.OK]
    assert max(refused_at) < min(served_at), finished
