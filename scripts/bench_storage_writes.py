"""Benchmark what the daemon's storage writes cost: the size of each write call, and the CRC.

Usage::

    .venv/bin/python scripts/bench_storage_writes.py              # 256 MiB, 3 rounds
    .venv/bin/python scripts/bench_storage_writes.py --size 64MiB --rounds 5
    .venv/bin/python scripts/bench_storage_writes.py --quick      # 16 MiB, 1 round: a smoke run

Benchmarks, each measured side by side in one run (the table shows medians over the rounds):

``write calls``
    A new file of ``--size`` bytes is written in a temporary directory with ``pwritev`` calls of at most 256 KiB
    (what ``dfdaemon.storage.content`` does), and another with 2 MiB calls (the daemon's segment size). Before each,
    the script waits ``--settle`` seconds (default 3) so that memory freed by the previous file is no longer warm:
    on a VM that hands free memory back to its host (virtio-balloon free page reporting) it is gone from the guest
    by then, as it is for most of a daemon's writes. ``ratio = kernel+user CPU seconds of 256 KiB calls / of 2 MiB
    calls``; on a machine without such reporting both cost about the same (ratio near 1).
``warm memory``
    The same 256 KiB-call write right after a file of the same size was deleted (what the other benchmarks'
    priming arranges), against the settled write above. ``ratio = warm CPU / settled CPU``.
``crc``
    CRC-32 over an in-memory buffer of ``--size`` bytes in 128 KiB chunks (as a stream's chunks arrive), with
    zlib-ng (what ``dfdaemon.ids.crc32_update`` uses) and with the standard library's zlib; the values must match.
    ``ratio = zlib-ng MB/s / zlib MB/s``.

Files are written to ``--dir`` (default the system's temporary directory) and removed at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
for _path in (ROOT, SCRIPTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_p2p  # noqa: E402
from bench_p2p import KiB, MiB, Report, fmt_size, mb_per_s, say  # noqa: E402

from dfdaemon.ids import crc32_update  # noqa: E402
from dfdaemon.units import parse_size  # noqa: E402

CHUNK = 128 * KiB  # a typical chunk as aiohttp hands them over


def write_file(path: Path, source: memoryview, call: int) -> float:
    """Write ``source`` to a new file at ``path``, ``call`` bytes per ``pwritev`` of 128 KiB views; CPU seconds."""
    started = time.process_time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, len(source), call):
            end = min(offset + call, len(source))
            views = [source[at : min(at + CHUNK, end)] for at in range(offset, end, CHUNK)]
            os.pwritev(fd, views, offset)
    finally:
        os.close(fd)
    return time.process_time() - started


def settled_write(directory: Path, source: memoryview, call: int, settle: float) -> float:
    time.sleep(settle)
    path = directory / f"settled-{call}"
    try:
        return write_file(path, source, call)
    finally:
        path.unlink()


def warm_write(directory: Path, source: memoryview) -> float:
    scratch, path = directory / "scratch", directory / "warm"
    write_file(scratch, source, 256 * KiB)
    scratch.unlink()  # its memory is free and still the guest's
    try:
        return write_file(path, source, 256 * KiB)
    finally:
        path.unlink()


def crc_rate(source: memoryview, fold: Callable[[int, memoryview], int]) -> tuple[float, int]:
    started = time.perf_counter()
    crc = 0
    for offset in range(0, len(source), CHUNK):
        crc = fold(crc, source[offset : offset + CHUNK])
    return mb_per_s(len(source), time.perf_counter() - started), crc


def run(args: argparse.Namespace, report: Report) -> None:
    size: int = args.size_bytes
    source = memoryview(os.urandom(size))
    small, large, warm, fast, slow = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-writes-", dir=args.dir) as name:
        directory = Path(name)
        for number in range(args.rounds):
            small.append(settled_write(directory, source, 256 * KiB, args.settle))
            large.append(settled_write(directory, source, 2 * MiB, args.settle))
            warm.append(warm_write(directory, source))
            rate_ng, crc_ng = crc_rate(source, crc32_update)
            rate_zlib, crc_zlib = crc_rate(source, lambda crc, view: zlib.crc32(view, crc))
            if crc_ng != crc_zlib:
                raise RuntimeError(f"zlib-ng's CRC {crc_ng} differs from zlib's {crc_zlib}")
            fast.append(rate_ng)
            slow.append(rate_zlib)
            say(
                f"  round {number + 1}: 256 KiB calls {small[-1]:.3f} s CPU, 2 MiB calls {large[-1]:.3f} s, "
                f"warm {warm[-1]:.3f} s; CRC zlib-ng {rate_ng:,.0f} MB/s, zlib {rate_zlib:,.0f} MB/s"
            )
    median = statistics.median
    report.add(
        f"write calls: 256 KiB / 2 MiB, {fmt_size(size)} new file",
        f"{median(small):.3f} s CPU",
        f"2 MiB calls {median(large):.3f} s",
        median(small) / median(large) if median(large) else None,
        "1.0 without free page reporting (lower is better)",
    )
    report.add(
        "warm memory / settled memory, 256 KiB calls",
        f"{median(warm):.3f} s CPU",
        f"settled {median(small):.3f} s",
        median(warm) / median(small) if median(small) else None,
        "1.0 without free page reporting",
    )
    report.add(
        "crc: zlib-ng / zlib",
        f"{median(fast):,.0f} MB/s",
        f"zlib {median(slow):,.0f} MB/s",
        median(fast) / median(slow),
        "higher is better",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default=None, help="bytes per file, e.g. 64MiB (default 256MiB)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before a settled write")
    parser.add_argument("--quick", action="store_true", help="16 MiB, one round, a short settle: a smoke run")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary directory goes")
    args = parser.parse_args(argv)
    try:
        args.size_bytes = parse_size(args.size) if args.size else 16 * MiB if args.quick else 256 * MiB
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    args.rounds = args.rounds if args.rounds is not None else 1 if args.quick else 3
    if args.quick:
        args.settle = min(args.settle, 0.1)
    if args.rounds < 1 or args.size_bytes < CHUNK or args.settle < 0:
        parser.error("--rounds must be positive, --size at least 128 KiB, --settle not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench_p2p.catch_stop_signals()
    report = Report()
    say(f"bench_storage_writes: {fmt_size(args.size_bytes)}, {args.rounds} round(s), on {os.cpu_count()} CPUs")
    return bench_p2p.run_reported("bench_storage_writes", lambda: run(args, report), report)


if __name__ == "__main__":
    sys.exit(main())
