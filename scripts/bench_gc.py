"""Benchmark garbage collection: one GC pass and one eviction over a cache of N small tasks.

Usage::

    .venv/bin/python scripts/bench_gc.py                      # 100 000 tasks in a temporary directory
    .venv/bin/python scripts/bench_gc.py --tasks 20000 --held-fraction 0.25
    .venv/bin/python scripts/bench_gc.py --dir /some/empty/dir  # keep the cache afterwards for inspection

Options: ``--tasks N`` (default 100 000), ``--dir DIR`` (an empty or absent directory; default a temporary
directory, removed afterwards), ``--held-fraction F`` (default 0.1: that share of the tasks, spread evenly, is
held by one holder), ``--piece-size BYTES`` (default 1024: every task is one piece of that size, so the disk
stays small), ``--evict-fraction E`` (default 0.01: the share of the tasks each evict pass must remove, at least
one), ``--repeat R`` (default 3: rounds of the three passes), ``--populate bulk|downloads`` (default bulk, see
below) and ``--concurrency C`` (default 32: downloads written at once by ``--populate downloads``).

What it does, in one process and one run so the numbers compare:

1. Populate. ``bulk`` (the default) is a benchmark-only shortcut: before the storage opens, it writes every
   task's one-piece content file (not synced) and inserts the finished task and piece rows into the real
   metadata schema (``MetadataStore``, which creates and migrates it) in one transaction; opening the storage
   then reconciles them with the files as a daemon's start-up would. It takes seconds where ``downloads`` (N
   downloads through ``Storage.download`` / ``write_piece`` / ``finish``, C at a time, every piece fdatasync'd
   and every step its own transaction) takes minutes for 100 000 tasks. The holds are then taken in batches
   through ``Storage.acquire`` either way.
2. The storage clock is moved past the grace period, so every unheld task is an ordinary candidate.
3. R rounds, each of three passes in a row (so drift on a noisy machine hits all three alike); the table shows
   the median of each over the rounds:

   - ``no-evict pass``: a GC run with a huge quota and a long TTL. It evicts nothing, so its time is the pure
     cost of a pass: measuring the usage, scanning the task table (with nothing calling for eviction, the
     snapshot leaves out the quiet tasks, finished, unheld, past the grace and within the TTL, inside SQLite),
     reading the holds, classifying the tasks left and recording the run. ``us/task`` is that time over N.
   - ``dry run``: a dry run with the quota set just below the current usage (both watermarks at 100%) so that
     exactly k = E * N least-recently-used unheld tasks would go (checked). It deletes nothing.
   - ``evict pass``: the same run for real; it evicts those k tasks (checked), so R rounds remove R * k.
     ``ms/evict`` is the marginal cost of one eviction: the median over rounds of (evict pass - no-evict pass)
     divided by k. It covers the per-task lock, the transactions that mark the task evicting and delete its
     rows, and unlinking its file. No scheduler is attached, so ``DeleteTask`` costs nothing here.

Each pass is also timed in CPU seconds of this process (all its threads), which a busy machine inflates less
than wall time; the per-pass lines show both. ``peak RSS`` is ``ru_maxrss`` of this process (storage, GC and
benchmark together) after populating and at the end.
``record`` is the size of the JSON report that each run stores in the metadata (every skipped task is listed).
Machines are noisy: compare numbers from the same run, and rerun before drawing conclusions.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dfdaemon.gc import GarbageCollector, GCPolicy, GCReport
from dfdaemon.ids import task_id
from dfdaemon.storage import Storage, TaskInfo, TrafficType
from dfdaemon.storage.content import ContentStore
from dfdaemon.storage.manager import METADATA_FILE
from dfdaemon.storage.metadata import MetadataStore

HOLDER = "bench-gc-holder"
ACQUIRE_BATCH = 1000
LONG_TTL = 10 * 365 * 86400.0
HUGE_QUOTA = 1 << 50
COLUMNS = (
    ("tasks", 8),
    ("held", 7),
    ("no-evict pass s", 16),
    ("us/task", 8),
    ("evict pass s", 13),
    ("k", 6),
    ("ms/evict", 9),
    ("dry run s", 10),
    ("peak RSS MiB", 13),
)
HEADER = "  ".join(name.rjust(width) for name, width in COLUMNS)


class ShiftedClock:
    """Wall-clock time plus an offset the benchmark can move forward (past the grace period)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Timing:
    seconds: float
    cpu: float
    report: GCReport


@dataclass
class Round:
    none: Timing
    dry: Timing
    evict: Timing


def task_url(number: int) -> str:
    return f"http://origin.bench/gc/{number}"


def held_numbers(tasks: int, fraction: float) -> list[int]:
    """floor(tasks * fraction) task numbers spread evenly over the population (and so over the LRU order)."""
    return [n for n in range(tasks) if math.floor((n + 1) * fraction) > math.floor(n * fraction)]


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def piece_bytes(number: int, piece_size: int) -> bytes:
    """Task ``number``'s one piece: its number, then a fixed pattern."""
    block = bytes(range(256)) * (piece_size // 256 + 1)
    return (number.to_bytes(8, "big") + block)[:piece_size]


def populate_bulk(root: Path, tasks: int, piece_size: int, now: float) -> None:
    """Benchmark-only: N finished one-piece tasks written straight into a cache that is not open yet.

    The content files are written without syncing and every task and piece row goes in one transaction of the
    real schema. Task n finished a microsecond after task n - 1, so the least-recently-used order is the
    population order, as with downloads one after another. ``Storage.open`` reconciles the result afterwards.
    """
    content = ContentStore(root)
    meta = MetadataStore(root / METADATA_FILE)
    shards: set[Path] = set()
    try:
        task_rows, piece_rows = [], []
        for number in range(tasks):
            url = task_url(number)
            tid, at, data = task_id(url), now + number * 1e-6, piece_bytes(number, piece_size)
            path = content.path(tid)
            if path.parent not in shards:
                path.parent.mkdir(parents=True, exist_ok=True)
                shards.add(path.parent)
            path.write_bytes(data)
            task_rows.append((tid, url, piece_size, piece_size, at, at, at, at, piece_size))
            piece_rows.append((tid, piece_size, zlib.crc32(data), TrafficType.BACK_TO_SOURCE, at))
        with meta.transaction() as db:
            db.executemany(
                "INSERT INTO tasks (id, state, url, piece_length, content_length, created_at, updated_at,"
                " last_used_at, finished_at, content_bytes) VALUES (?, 'succeeded', ?, ?, ?, ?, ?, ?, ?, ?)",
                task_rows,
            )
            db.executemany(
                "INSERT INTO pieces (task_id, number, offset, length, crc, traffic_type, cost, created_at)"
                " VALUES (?, 0, 0, ?, ?, ?, 0.0, ?)",
                piece_rows,
            )
    finally:
        meta.close()


async def populate_downloads(storage: Storage, tasks: int, piece_size: int, concurrency: int) -> None:
    """N downloads through the storage API, ``concurrency`` at a time, as a daemon writes them."""
    numbers: Iterator[int] = iter(range(tasks))

    async def one(number: int) -> None:
        url = task_url(number)
        data = piece_bytes(number, piece_size)
        info = TaskInfo(url=url, piece_length=piece_size, content_length=piece_size)
        async with storage.download(task_id(url), info) as writer:
            await writer.write_piece(0, 0, data)
            await writer.finish()

    async def worker() -> None:
        # Workers share one iterator, so at most `concurrency` downloads are in flight at any moment.
        for number in numbers:
            await one(number)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))


async def hold(storage: Storage, numbers: list[int]) -> None:
    for start in range(0, len(numbers), ACQUIRE_BATCH):
        batch = numbers[start : start + ACQUIRE_BATCH]
        await storage.acquire(HOLDER, [task_id(task_url(n)) for n in batch])


async def timed(run: Awaitable[GCReport]) -> Timing:
    started, cpu = time.perf_counter(), time.process_time()
    report = await run
    return Timing(time.perf_counter() - started, time.process_time() - cpu, report)


async def quota_policy(storage: Storage, evict: int, piece_size: int) -> GCPolicy:
    """A policy under which exactly ``evict`` least-recently-used candidates of ``piece_size`` bytes must go.

    With both watermarks at 100%, GC evicts while usage is above the quota. Putting the quota half a task
    above ``used - evict * piece_size`` makes the ``evict``-th eviction the first to get below it.
    """
    await storage.compact()  # the run compacts too; measure the same usage it will see
    used = await storage.used_bytes()
    quota = used - evict * piece_size + piece_size // 2
    return GCPolicy(task_ttl=LONG_TTL, quota_bytes=quota, high_percent=100, low_percent=100)


def check(report: GCReport, evicted: int, what: str) -> None:
    if len(report.evicted) != evicted:
        raise SystemExit(f"bench_gc: the {what} evicted {len(report.evicted)} tasks, expected {evicted}")


async def bench(args: argparse.Namespace, root: Path) -> None:
    tasks: int = args.tasks
    piece_size: int = args.piece_size
    repeat = max(1, args.repeat)
    held = held_numbers(tasks, args.held_fraction)
    unheld = tasks - len(held)
    # At least one eviction per round, and never more than the unheld tasks can supply over all rounds.
    evict = min(unheld // repeat, max(1, round(tasks * args.evict_fraction)))

    clock = ShiftedClock()
    storage = Storage(root, clock=clock)
    started = time.perf_counter()
    if args.populate == "bulk":
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(populate_bulk, root, tasks, piece_size, clock())
    await storage.open()
    try:
        if args.populate == "downloads":
            await populate_downloads(storage, tasks, piece_size, args.concurrency)
        populate_s = time.perf_counter() - started
        started = time.perf_counter()
        await hold(storage, held)
        hold_s = time.perf_counter() - started
        rss_populated = peak_rss_mib()
        print(
            f"populate ({args.populate}): {tasks} tasks in {populate_s:.1f} s ({tasks / populate_s:,.0f} tasks/s); "
            f"{len(held)} holds in {hold_s:.2f} s; "
            f"cache {await storage.used_bytes() / 2**20:.1f} MiB; peak RSS {rss_populated:.0f} MiB",
            flush=True,
        )

        # Every task finished just now; move past the grace period so unheld tasks are plain candidates.
        clock.offset += GCPolicy().grace_period + 3600.0

        # Rounds interleave the three passes so that drift on a noisy machine hits them alike; every round's evict
        # pass removes another k least-recently-used tasks.
        idle = GarbageCollector(storage, GCPolicy(task_ttl=LONG_TTL, quota_bytes=HUGE_QUOTA))
        rounds: list[Round] = []
        for _ in range(repeat):
            none_run = await timed(idle.run("bench"))
            check(none_run.report, 0, "no-evict pass")
            dry = GarbageCollector(storage, await quota_policy(storage, evict, piece_size))
            dry_run = await timed(dry.run("bench", dry_run=True))
            check(dry_run.report, evict, "dry run")
            real = GarbageCollector(storage, await quota_policy(storage, evict, piece_size))
            evict_run = await timed(real.run("bench"))
            check(evict_run.report, evict, "evict pass")
            if real.quota_exceeded_by_data_in_use:
                raise SystemExit("bench_gc: the evict pass reported the quota exceeded by data in use")
            rounds.append(Round(none_run, dry_run, evict_run))
        record_bytes = len(rounds[-1].evict.report.to_json())
        skipped = len(rounds[-1].evict.report.skipped)
    finally:
        await storage.close()

    none_s = statistics.median(r.none.seconds for r in rounds)
    dry_s = statistics.median(r.dry.seconds for r in rounds)
    evict_s = statistics.median(r.evict.seconds for r in rounds)
    # Paired per round: the evict pass minus the no-evict pass just before it, over k.
    marginal_s = statistics.median(r.evict.seconds - r.none.seconds for r in rounds)
    values = (
        f"{tasks}",
        f"{len(held)}",
        f"{none_s:.3f}",
        f"{none_s / tasks * 1e6:.1f}",
        f"{evict_s:.3f}",
        f"{evict}",
        f"{marginal_s / evict * 1e3:.2f}" if evict else "n/a",
        f"{dry_s:.3f}",
        f"{peak_rss_mib():.0f}",
    )
    print()
    print(HEADER)
    print("  ".join(value.rjust(width) for value, (_, width) in zip(values, COLUMNS, strict=True)))
    print()
    for name, pick in (("no-evict", "none"), ("dry run", "dry"), ("evict", "evict")):
        timings = [getattr(r, pick) for r in rounds]
        print(f"{name + ' passes (s, wall/CPU):':32}", ", ".join(f"{t.seconds:.3f}/{t.cpu:.3f}" for t in timings))
    print(
        f"record of one run: {record_bytes / 1024:.0f} KiB ({skipped} skipped tasks listed); "
        f"peak RSS after populate {rss_populated:.0f} MiB, at the end {peak_rss_mib():.0f} MiB"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks in the cache (default 100000)")
    parser.add_argument("--dir", type=Path, default=None, help="an empty cache directory (default: temporary)")
    parser.add_argument("--held-fraction", type=float, default=0.1, help="share of tasks held (default 0.1)")
    parser.add_argument("--piece-size", type=int, default=1024, help="bytes of each task's one piece (default 1024)")
    parser.add_argument("--evict-fraction", type=float, default=0.01, help="share of tasks to evict (default 0.01)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three passes (default 3)")
    parser.add_argument(
        "--populate",
        choices=("bulk", "downloads"),
        default="bulk",
        help="bulk: rows and files written directly (default); downloads: through Storage.download",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="downloads in flight with --populate downloads")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    if args.piece_size < 2:
        parser.error("--piece-size must be at least 2 (the evict pass aims half a task between two evictions)")
    if not 0.0 <= args.held_fraction <= 1.0 or not 0.0 <= args.evict_fraction <= 1.0:
        parser.error("fractions must lie between 0 and 1")
    if args.dir is not None and args.dir.exists() and any(args.dir.iterdir()):
        parser.error(f"--dir {args.dir} is not empty; the benchmark needs a cache of its own")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dir is not None:
        asyncio.run(bench(args, args.dir))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    try:
        asyncio.run(bench(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
