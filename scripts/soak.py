"""Soak the daemon: random downloads, holds, uploads and GC runs for a while, proving data in use is never evicted.

Usage::

    .venv/bin/python scripts/soak.py --duration 60s
    .venv/bin/python scripts/soak.py --duration 10m --concurrency 8 --files 60 --quota 96MiB --seed 7

It starts one daemon (back to source only: no scheduler) and a loopback origin (``scripts/origin.py``) serving a
pool of generated files, then runs ``--concurrency`` workers until ``--duration`` is over. Each worker repeatedly
picks one operation:

``download``  ``DfdaemonDownload.DownloadTask`` of a random file into an output file, checked against the origin's
              sha256, then removed;
``dfget``     the same through the ``dfget`` command line;
``acquire`` / ``release`` / ``sync``
              ``dfdaemon.ext.v1.Use`` calls for one of ``--holders`` holders, each on a lease of ``--lease`` renewed
              by a keep-alive loop (which now and then stops for longer than the lease, as a crashed runtime would);
``upload``    pins a task with its own short-lived holder, reads every piece with ``DfdaemonUpload.DownloadPiece``
              (bytes and CRC checked against the origin's file), releases it;
``gc``        ``Cache.RunGC``, then checks that every task held throughout the run is still listed.

The cache quota (``--quota``) is small against the pool, the grace period short and the GC interval two seconds,
so GC evicts a lot; the holders never hold more than a third of the quota between them.

The script tracks what is in use at every moment: for each hold, the span during which it is certainly in place
(from the reply to the acquire, sync or keep-alive that set it, until the release was sent or its lease ran out),
and for each ``DownloadTask`` stream, the span between its first and its last message (the daemon holds an
in-flight reference meanwhile). A watcher reads every GC run the daemon records (``Cache.ListGCRuns``: periodic,
quota and manual) and counts as an *eviction of in-use data* any task evicted by a run that started and finished
inside such a span. At the end it prints the operations done, the errors (expected 0), the evictions of in-use
data (expected 0), the GC runs and evictions, and the daemon's peak RSS (``VmHWM``); it exits 1 when there were
errors or evictions of data in use.

Expected outcomes that are not errors are counted apart: an acquire or sync naming a task GC had already evicted
(``NOT_FOUND`` / ``missing``), and a download refused with ``RESOURCE_EXHAUSTED`` because data in use fills the
quota.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from google.protobuf.duration_pb2 import Duration  # noqa: E402

from dfdaemon import ids  # noqa: E402
from dfdaemon.api import (  # noqa: E402
    common_pb2,
    dfdaemon_ext_pb2,
    dfdaemon_ext_pb2_grpc,
    dfdaemon_pb2,
    dfdaemon_pb2_grpc,
)
from dfdaemon.rpc.servers import CHANNEL_OPTIONS  # noqa: E402
from dfdaemon.units import parse_duration, parse_size  # noqa: E402
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
RPC_TIMEOUT = 30.0
DOWNLOAD_TIMEOUT = 120.0
MAX_HOLDS_PER_HOLDER = 3
RECENT = 24  # downloads remembered as acquire / upload candidates
OPERATIONS: dict[str, int] = {
    "download": 30,
    "dfget": 6,
    "acquire": 16,
    "release": 10,
    "sync": 6,
    "upload": 20,
    "gc": 4,
}


def say(text: str = "") -> None:
    print(text, flush=True)


def vm_bytes(pid: int, name: str) -> int:
    """A ``Vm*`` figure of /proc/PID/status in bytes (VmHWM: peak resident memory, VmRSS: current)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * KiB
    return 0


def ttl(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


@dataclass(frozen=True)
class PoolFile:
    """One file the origin serves, with what the daemon must give back for it."""

    name: str
    size: int
    sha256: str
    url: str
    task_id: str


@dataclass
class Span:
    """A time span during which a task is certainly in use (``end`` is ``inf`` while open-ended)."""

    kind: str
    owner: str
    start: float
    end: float = math.inf


class UseTracker:
    """What the script knows is in use, at every moment, from its own calls and the daemon's replies."""

    def __init__(self) -> None:
        self.spans: dict[str, list[Span]] = {}
        self.open: dict[tuple[str, str], Span] = {}

    def held(self, holder: str, task_id: str, acked_at: float, expires_at: float | None) -> None:
        """A reply received at ``acked_at`` says the hold is in place until ``expires_at`` (None: no lease)."""
        until = math.inf if expires_at is None else expires_at
        span = self.open.get((holder, task_id))
        if span is not None and span.end >= acked_at:
            span.end = max(span.end, until)  # renewed before it lapsed: one continuous span
            return
        span = Span("hold", holder, acked_at, until)
        self.open[(holder, task_id)] = span
        self.spans.setdefault(task_id, []).append(span)

    def releasing(self, holder: str, task_id: str, sent_at: float) -> None:
        span = self.open.pop((holder, task_id), None)
        if span is not None:
            span.end = min(span.end, sent_at)

    def holds_of(self, holder: str, now: float) -> list[str]:
        return [task for (owner, task), span in self.open.items() if owner == holder and span.end > now]

    def held_tasks(self, now: float) -> set[str]:
        return {task for (_, task), span in self.open.items() if span.end > now}

    def streaming(self, owner: str, task_id: str, first: float, last: float) -> None:
        self.spans.setdefault(task_id, []).append(Span("download", owner, first, last))

    def covering(self, task_id: str, start: float, end: float) -> list[Span]:
        """The spans that cover the whole of [start, end]."""
        return [span for span in self.spans.get(task_id, []) if span.start <= start and span.end >= end]


@dataclass
class Stats:
    operations: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    gc_runs: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    protected: Counter[str] = field(default_factory=Counter)
    runs_unchecked: int = 0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    peak_rss_sampled: int = 0
    peak_used: int = 0
    usage_samples: int = 0
    over_quota_samples: int = 0

    def error(self, text: str) -> None:
        self.errors.append(text)
        if len(self.errors) <= 20:
            say(f"error: {text}")


class Soak:
    """The running soak: one daemon, one origin, the workers and the watchers."""

    def __init__(
        self, args: argparse.Namespace, daemon: DaemonProcess, origin: OriginProcess, pool: list[PoolFile], work: Path
    ) -> None:
        self.args = args
        self.daemon = daemon
        self.origin = origin
        self.pool = pool
        self.by_task = {item.task_id: item for item in pool}
        self.work = work
        self.rng = random.Random(args.seed)
        self.tracker = UseTracker()
        self.stats = Stats()
        self.recent: list[str] = []
        self.holders = [f"container:soak/holder-{index}" for index in range(args.holders)]
        self.holder_locks = {holder: asyncio.Lock() for holder in self.holders}
        self.hold_budget = args.quota // 3
        self.deadline = 0.0
        self.last_run_id = 0
        self.runs_lock = asyncio.Lock()
        local = grpc.aio.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS)
        remote = grpc.aio.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS)
        self.channels = [local, remote]
        self.download = dfdaemon_pb2_grpc.DfdaemonDownloadStub(local)
        self.use = dfdaemon_ext_pb2_grpc.UseStub(local)
        self.cache = dfdaemon_ext_pb2_grpc.CacheStub(local)
        self.upload_stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(remote)

    # Bookkeeping

    def remember(self, task_id: str) -> None:
        if task_id in self.recent:
            self.recent.remove(task_id)
        self.recent.append(task_id)
        del self.recent[:-RECENT]

    def held_bytes(self) -> int:
        return sum(self.by_task[task].size for task in self.tracker.held_tasks(time.time()) if task in self.by_task)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    async def nap(self, seconds: float) -> None:
        """Sleep, but not past the end of the soak."""
        await asyncio.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    # Operations

    async def op_download(self, worker: int) -> None:
        item = self.rng.choice(self.pool)
        output = self.work / "out" / f"w{worker}-{time.monotonic_ns()}"
        request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=item.url, output_path=str(output)))
        first = last = 0.0
        task_ids: set[str] = set()
        try:
            async for response in self.download.DownloadTask(request, timeout=DOWNLOAD_TIMEOUT):
                last = time.time()
                first = first or last
                task_ids.add(response.task_id)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await self.refused(error.details() or "")
                return
            self.stats.error(f"DownloadTask {item.name}: {error.code().name} {error.details()}")
            return
        finally:
            if first:
                self.tracker.streaming(f"download-w{worker}", item.task_id, first, last)
        if task_ids != {item.task_id}:
            self.stats.error(f"DownloadTask {item.name}: task ids {task_ids}, expected {item.task_id}")
        await self.check_output(output, item, "DownloadTask")

    async def op_dfget(self, worker: int) -> None:
        item = self.rng.choice(self.pool)
        output = self.work / "out" / f"w{worker}-{time.monotonic_ns()}"
        command = [sys.executable, "-m", "dfdaemon.cli.dfget", item.url, "-O", str(output)]
        command += ["-e", str(self.daemon.socket_path), "--json", "--no-progress"]
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), DOWNLOAD_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            message = stderr.decode().strip()
            if "RESOURCE_EXHAUSTED" in message:
                await self.refused(message)
            else:
                self.stats.error(f"dfget {item.name}: exit {process.returncode}: {message}")
            return
        report = json.loads(stdout)
        if report.get("task_id") != item.task_id:
            self.stats.error(f"dfget {item.name}: task id {report.get('task_id')}, expected {item.task_id}")
        await self.check_output(output, item, "dfget")

    async def refused(self, message: str) -> None:
        """A download refused because the quota is full of data GC may not evict (yet): note what protected it."""
        self.stats.misses["download refused: quota full"] += 1
        reply = await self.cache.ListGCRuns(dfdaemon_ext_pb2.ListGCRunsRequest(limit=1), timeout=RPC_TIMEOUT)
        protected: Counter[str] = Counter()
        for run in reply.runs:
            for skip in run.skipped:
                protected[skip.reason] += skip.bytes
        self.stats.refusals.append(f"{message}; the last GC run protected {_sizes(protected)}")

    async def check_output(self, output: Path, item: PoolFile, how: str) -> None:
        digest = await asyncio.to_thread(_sha256, output)
        await asyncio.to_thread(output.unlink, True)
        if digest != item.sha256:
            self.stats.error(f"{how} {item.name}: output differs from the origin's file")
            return
        self.stats.bytes_downloaded += item.size
        self.remember(item.task_id)

    async def op_acquire(self, worker: int) -> None:
        holder = self.rng.choice(self.holders)
        async with self.holder_locks[holder]:
            now = time.time()
            mine = set(self.tracker.holds_of(holder, now))
            choices = [task for task in self.recent if task not in mine]
            if len(mine) >= MAX_HOLDS_PER_HOLDER or not choices:
                return
            task_id = self.rng.choice(choices)
            if self.held_bytes() + self.by_task[task_id].size > self.hold_budget:
                return
            request = dfdaemon_ext_pb2.AcquireRequest(
                holder=holder, tasks=[dfdaemon_ext_pb2.TaskRef(task_id=task_id)], ttl=ttl(self.args.lease)
            )
            try:
                reply = await self.use.Acquire(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    self.stats.misses["acquire: task already evicted"] += 1
                    return
                raise
            self.note_holds(holder, reply.holds, time.time())

    def note_holds(self, holder: str, holds: Iterable[dfdaemon_ext_pb2.Hold], acked_at: float) -> None:
        for hold in holds:
            expires = hold.expires_at.ToNanoseconds() / 1e9 if hold.HasField("expires_at") else None
            self.tracker.held(holder, hold.task_id, acked_at, expires)

    async def op_release(self, worker: int) -> None:
        holder = self.rng.choice(self.holders)
        async with self.holder_locks[holder]:
            mine = self.tracker.holds_of(holder, time.time())
            if not mine:
                return
            task_id = self.rng.choice(mine)
            self.tracker.releasing(holder, task_id, time.time())
            request = dfdaemon_ext_pb2.ReleaseRequest(holder=holder, tasks=[dfdaemon_ext_pb2.TaskRef(task_id=task_id)])
            await self.use.Release(request, timeout=RPC_TIMEOUT)

    async def op_sync(self, worker: int) -> None:
        holder = self.rng.choice(self.holders)
        async with self.holder_locks[holder]:
            now = time.time()
            mine = self.tracker.holds_of(holder, now)
            candidates = sorted(set(mine) | set(self.recent))
            wanted = self.rng.sample(candidates, min(len(candidates), self.rng.randint(0, MAX_HOLDS_PER_HOLDER)))
            others = self.held_bytes() - sum(self.by_task[task].size for task in mine)
            while wanted and others + sum(self.by_task[task].size for task in wanted) > self.hold_budget:
                wanted.pop()
            sent = time.time()
            for task_id in set(mine) - set(wanted):
                self.tracker.releasing(holder, task_id, sent)
            request = dfdaemon_ext_pb2.SyncRequest(
                holder=holder,
                tasks=[dfdaemon_ext_pb2.TaskRef(task_id=task) for task in wanted],
                ttl=ttl(self.args.lease),
            )
            reply = await self.use.Sync(request, timeout=RPC_TIMEOUT)
            acked = time.time()
            for task_id in [*reply.acquired, *reply.kept]:
                # The daemon set the lease to its own clock + ttl, and its clock read at least `sent` then.
                self.tracker.held(holder, task_id, acked, sent + self.args.lease)
            for task_id in set(reply.released) & set(wanted):
                self.stats.error(f"Sync for {holder} released {task_id}, which it was asked to keep")
            if reply.missing:
                self.stats.misses["sync: task already evicted"] += len(reply.missing)

    async def op_upload(self, worker: int) -> None:
        if not self.recent:
            return
        item = self.by_task[self.rng.choice(self.recent)]
        holder = f"upload:soak/worker-{worker}"
        request = dfdaemon_ext_pb2.AcquireRequest(
            holder=holder, tasks=[dfdaemon_ext_pb2.TaskRef(task_id=item.task_id)], ttl=ttl(60)
        )
        try:
            reply = await self.use.Acquire(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                self.stats.misses["upload: task already evicted"] += 1
                return
            raise
        self.note_holds(holder, reply.holds, time.time())
        try:
            stat = await self.download.StatLocalTask(
                dfdaemon_pb2.StatLocalTaskRequest(task_id=item.task_id), timeout=RPC_TIMEOUT
            )
            if not stat.HasField("finished_at"):
                self.stats.misses["upload: task downloading again"] += 1
                return
            expected = await asyncio.to_thread((self.origin.root / item.name).read_bytes)
            for span in ids.pieces_for(item.size, ids.piece_length_for(item.size)):
                piece_request = dfdaemon_pb2.DownloadPieceRequest(
                    host_id="soak", task_id=item.task_id, piece_number=span.number
                )
                response = await self.upload_stub.DownloadPiece(piece_request, timeout=RPC_TIMEOUT)
                content = response.piece.content
                if content != expected[
                    span.offset : span.offset + span.length
                ] or response.piece.digest != ids.format_crc32(zlib.crc32(content)):
                    self.stats.error(f"DownloadPiece {item.name} piece {span.number}: wrong bytes or digest")
                self.stats.bytes_uploaded += len(content)
        finally:
            self.tracker.releasing(holder, item.task_id, time.time())
            release = dfdaemon_ext_pb2.ReleaseRequest(
                holder=holder, tasks=[dfdaemon_ext_pb2.TaskRef(task_id=item.task_id)]
            )
            await self.use.Release(release, timeout=RPC_TIMEOUT)

    async def op_gc(self, worker: int) -> None:
        started = time.time()
        await self.cache.RunGC(dfdaemon_ext_pb2.RunGCRequest(), timeout=RPC_TIMEOUT)
        listed = await self.download.ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=RPC_TIMEOUT)
        checked = time.time()
        present = {task.task_id for task in listed.tasks}
        for task_id in list(self.tracker.spans):
            for span in self.tracker.covering(task_id, started, checked):
                if span.kind == "hold" and task_id not in present:
                    self.stats.violations.append(f"{task_id} held by {span.owner} throughout a GC run is gone")
        await self.check_runs()

    # Watchers

    async def check_runs(self) -> None:
        """Read the GC runs recorded since the last look; flag every eviction of a task in use throughout a run."""
        async with self.runs_lock:
            runs = await self.new_runs(16)
            if runs and runs[0].id > self.last_run_id + 1:
                runs = await self.new_runs(1000)  # more than a few since the last look: read them all
            if runs:
                self.judge(runs)

    async def new_runs(self, limit: int) -> list[dfdaemon_ext_pb2.GCRun]:
        reply = await self.cache.ListGCRuns(dfdaemon_ext_pb2.ListGCRunsRequest(limit=limit), timeout=RPC_TIMEOUT)
        return sorted((run for run in reply.runs if run.id > self.last_run_id), key=lambda run: run.id)

    def judge(self, runs: list[dfdaemon_ext_pb2.GCRun]) -> None:
        if self.last_run_id and runs[0].id != self.last_run_id + 1:
            self.stats.runs_unchecked += runs[0].id - self.last_run_id - 1
        self.last_run_id = runs[-1].id
        for run in runs:
            self.stats.gc_runs[run.trigger] += 1
            start, end = run.started_at.ToNanoseconds() / 1e9, run.finished_at.ToNanoseconds() / 1e9
            for skip in run.skipped:
                self.stats.protected[skip.reason] += 1
            for eviction in run.evicted:
                self.stats.evictions[eviction.reason] += 1
                for span in self.tracker.covering(eviction.task_id, start, end):
                    self.stats.violations.append(
                        f"GC run {run.id} ({run.trigger}) evicted {eviction.task_id} ({eviction.reason}) while "
                        f"{span.kind} by {span.owner} held it from {span.start:.3f} to {span.end:.3f}"
                    )

    async def watch_runs(self) -> None:
        while not self.expired():
            await self.check_runs()
            await self.nap(0.25)

    async def watch_daemon(self) -> None:
        """Sample the daemon's RSS and the cache's usage against its quota."""
        while not self.expired():
            self.stats.peak_rss_sampled = max(self.stats.peak_rss_sampled, vm_bytes(self.daemon.proc.pid, "VmRSS"))
            usage = await self.cache.GetUsage(dfdaemon_ext_pb2.GetUsageRequest(), timeout=RPC_TIMEOUT)
            self.stats.peak_used = max(self.stats.peak_used, usage.used_bytes)
            self.stats.usage_samples += 1
            self.stats.over_quota_samples += usage.used_bytes > usage.quota_bytes
            await self.nap(0.25)

    async def keep_alive(self, holder: str) -> None:
        """Renew the holder's leases; now and then stop for longer than the lease, like a runtime that crashed."""
        while not self.expired():
            if self.rng.random() < 0.03:
                await self.nap(self.args.lease * 1.5)
                continue
            await self.nap(self.args.lease / 4)
            if self.expired():
                break
            async with self.holder_locks[holder]:
                request = dfdaemon_ext_pb2.KeepAliveRequest(holder=holder)
                try:
                    reply = await self.use.KeepAlive(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    self.stats.error(f"KeepAlive {holder}: {error.code().name} {error.details()}")
                    continue
                self.stats.operations["keepalive"] += 1
                acked = time.time()
                live = {hold.task_id for hold in reply.holds}
                for task_id in self.tracker.holds_of(holder, acked):
                    if task_id not in live:
                        self.stats.error(f"KeepAlive {holder}: hold on {task_id} vanished before its lease ended")
                self.note_holds(holder, reply.holds, acked)

    async def worker(self, index: int) -> None:
        names, weights = list(OPERATIONS), list(OPERATIONS.values())
        while not self.expired():
            name = self.rng.choices(names, weights)[0]
            try:
                await getattr(self, f"op_{name}")(index)
            except grpc.aio.AioRpcError as error:
                self.stats.error(f"{name}: {error.code().name} {error.details()}")
            except Exception as error:
                self.stats.error(f"{name}: {type(error).__name__}: {error}")
            self.stats.operations[name] += 1

    async def run(self) -> None:
        (self.work / "out").mkdir(exist_ok=True)
        self.deadline = time.monotonic() + self.args.duration
        try:
            await asyncio.gather(
                self.watch_runs(),
                self.watch_daemon(),
                *(self.keep_alive(holder) for holder in self.holders),
                *(self.worker(index) for index in range(self.args.concurrency)),
            )
            await self.finish()
        finally:
            for channel in self.channels:
                await channel.close()

    async def finish(self) -> None:
        """Last look: every run read, and every hold the script is sure of is known to the daemon."""
        await self.check_runs()
        reply = await self.use.ListHolds(dfdaemon_ext_pb2.ListHoldsRequest(), timeout=RPC_TIMEOUT)
        now = time.time()
        live = {(hold.holder, hold.task_id) for hold in reply.holds}
        for (holder, task_id), span in self.tracker.open.items():
            if span.end > now + 1 and (holder, task_id) not in live:
                self.stats.error(f"hold of {holder} on {task_id} is missing at the end")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def make_pool(root: Path, count: int, largest: int, rng: random.Random) -> list[tuple[str, int, str]]:
    """Generate ``count`` files of 64 KiB to ``largest`` bytes; returns (name, size, sha256) of each."""
    files = []
    for index in range(count):
        size = rng.randint(64 * KiB, largest)
        data = rng.randbytes(size)
        name = f"blob-{index:03d}.bin"
        (root / name).write_bytes(data)
        files.append((name, size, hashlib.sha256(data).hexdigest()))
    return files


@contextlib.contextmanager
def environment(args: argparse.Namespace, work: Path) -> Iterator[tuple[DaemonProcess, OriginProcess]]:
    config = {
        "gc": {
            "interval": "2s",
            "policy": {
                "diskThreshold": args.quota,
                "gracePeriod": "1s",
                "taskTTL": "30s",
                "diskHighThresholdPercent": 80,
                "diskLowThresholdPercent": 60,
            },
        },
        "download": {"concurrentPieceCount": 4},
        "metrics": {"enable": False},
    }
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(work / "files"))
        daemon = stack.enter_context(running_daemon(work / "daemon", config))
        yield daemon, origin


def report(soak: Soak, seconds: float) -> None:
    stats = soak.stats
    pid = soak.daemon.proc.pid
    peak = max(vm_bytes(pid, "VmHWM"), stats.peak_rss_sampled)
    log = soak.daemon.log()
    log_errors = sum(1 for line in log.splitlines() if " ERROR " in line or line.startswith("Traceback"))
    rows = [
        ("operations done", f"{sum(stats.operations.values())}  ({_counts(stats.operations)})"),
        (
            "bytes moved",
            f"{stats.bytes_downloaded / MiB:.0f} MiB downloaded, {stats.bytes_uploaded / MiB:.0f} MiB uploaded",
        ),
        ("expected misses", f"{sum(stats.misses.values())}  ({_counts(stats.misses)})"),
        ("GC runs", f"{sum(stats.gc_runs.values())}  ({_counts(stats.gc_runs)}); not checked {stats.runs_unchecked}"),
        ("evictions", f"{sum(stats.evictions.values())}  ({_counts(stats.evictions)})"),
        ("protected (GC skips)", f"{sum(stats.protected.values())}  ({_counts(stats.protected)})"),
        ("errors", f"{len(stats.errors)}  (expected 0)"),
        ("in-use evictions", f"{len(stats.violations)}  (expected 0)"),
        ("daemon log errors", str(log_errors)),
        (
            "cache usage",
            f"peak {stats.peak_used / MiB:.0f} MiB of a {soak.args.quota / MiB:.0f} MiB quota; over the quota in "
            f"{stats.over_quota_samples} of {stats.usage_samples} samples",
        ),
        ("daemon peak RSS", f"{peak / MiB:.0f} MiB"),
    ]
    say()
    say(f"soak over after {seconds:.0f}s with {soak.args.concurrency} workers and {len(soak.holders)} holders")
    for label, value in rows:
        say(f"{label:<22}{value}")
    if stats.refusals:
        say(f"first refusal: {stats.refusals[0]}")
    for line in [*stats.errors[:10], *stats.violations[:10]]:
        say(f"  {line}")


def _sizes(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count / MiB:.1f} MiB" for name, count in sorted(counter.items())) or "nothing"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items())) or "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=parse_duration, default=60.0, help="how long to run: 60s, 10m, ...")
    parser.add_argument("--concurrency", type=int, default=6, help="operations in flight at once (default 6)")
    parser.add_argument("--holders", type=int, default=4, help="holders acquiring, releasing, syncing (default 4)")
    parser.add_argument("--files", type=int, default=40, help="files in the origin's pool (default 40)")
    parser.add_argument("--largest", type=parse_size, default=10 * MiB, help="largest pool file (default 10MiB)")
    parser.add_argument("--quota", type=parse_size, default=64 * MiB, help="the cache quota (default 64MiB)")
    parser.add_argument("--lease", type=parse_duration, default=8.0, help="the holders' lease (default 8s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary directory goes")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    return args


async def soak(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    origin_root = work / "files"
    origin_root.mkdir()
    files = make_pool(origin_root, args.files, args.largest, rng)
    say(
        f"pool: {len(files)} files, {sum(size for _, size, _ in files) / MiB:.0f} MiB; quota {args.quota / MiB:.0f} MiB"
    )
    with environment(args, work) as (daemon, origin):
        pool = [
            PoolFile(name, size, digest, origin.url(name), ids.task_id(origin.url(name)))
            for name, size, digest in files
        ]
        runner = Soak(args, daemon, origin, pool, work)
        say(f"daemon pid {daemon.proc.pid} on {daemon.upload_address}; {args.duration:.0f}s, seed {args.seed}")
        started = time.monotonic()
        await runner.run()
        if daemon.proc.poll() is not None:
            runner.stats.error(f"the daemon exited with {daemon.proc.returncode} during the soak")
        report(runner, time.monotonic() - started)
    return 1 if runner.stats.errors or runner.stats.violations else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfdaemon-soak-", dir=args.dir) as work:
        return asyncio.run(soak(args, Path(work)))


if __name__ == "__main__":
    sys.exit(main())
