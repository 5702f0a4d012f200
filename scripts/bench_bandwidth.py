"""Benchmark the bandwidth limits: each held by four concurrent transfers, measured against the configured rate.

Usage::

    .venv/bin/python scripts/bench_bandwidth.py                        # 30 s per case at 10 MB/s
    .venv/bin/python scripts/bench_bandwidth.py --seconds 60 --rate 20MB

Cases (each runs four transfers at once for ``--seconds``):

``upload.bandwidthLimit``
    A daemon with the limit holds a file. This script, as four children, fetches its pieces over and over: two over
    vortex TCP, two with gRPC ``DownloadPiece``; both paths share the one upload bucket.
``download.bandwidthLimit``
    A scheduler stub, a parent daemon (upstream's defaults) holding four files, and a child with the limit that
    downloads the four at once (``DownloadTask`` on its socket); the scheduler sends it to the parent.
``download.backToSourceBandwidthLimit``
    A daemon with the limit and no scheduler downloads the four files from the loopback origin at once.
``unlimited``
    The upload case against the parent, which runs with upstream's defaults (50 GB/s: no limit in practice).

``ratio = measured / configured`` (target 0.90 to 1.10); for ``unlimited``, the measured rate over the rate the
other cases were limited to (far above 1: nothing holds it back). The rate is taken from piece completions after
the first tenth of the run (at least a second): each bucket starts with one second's worth, and the transfers keep
a few pieces' worth of tokens reserved while they wait, so the first moments are faster than the limit; from then
on pieces complete exactly at the limit, which is what the limit promises.

Everything runs on loopback with ephemeral ports in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc  # noqa: E402
from dfdaemon.download.peering import Parent  # noqa: E402
from dfdaemon.ids import PieceSpan  # noqa: E402
from dfdaemon.rpc.peer_client import GrpcParentClient  # noqa: E402
from dfdaemon.units import parse_size  # noqa: E402
from dfdaemon.vortex.client import VortexClient  # noqa: E402
from tests.support import (  # noqa: E402
    DaemonProcess,
    OriginProcess,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
)

MB = 1_000_000
MiB = 1024 * 1024
TRANSFERS = 4
FILES = tuple(f"bw-{n}.bin" for n in range(TRANSFERS))


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Meter:
    """Piece completions (monotonic time, bytes), and the steady rate they show after a warm-up."""

    started: float = field(default_factory=time.monotonic)
    done: list[tuple[float, int]] = field(default_factory=list)

    def add(self, nbytes: int) -> None:
        self.done.append((time.monotonic(), nbytes))

    def rate(self, warmup: float) -> float | None:
        """Bytes per second between the first completion after the warm-up and the last (its own bytes excluded);
        over every completion when too few came after the warm-up (a short run on a busy machine)."""
        steady = [(at, n) for at, n in self.done if at >= self.started + warmup]
        if len(steady) < 2:
            steady = list(self.done)
        if len(steady) < 2 or steady[-1][0] <= steady[0][0]:
            return None
        return sum(n for _, n in steady[1:]) / (steady[-1][0] - steady[0][0])


async def for_a_while(seconds: float, transfers: list[Awaitable[None]]) -> None:
    """Run the transfers until they finish or ``seconds`` pass, then cancel what is left."""
    tasks = [asyncio.ensure_future(t) for t in transfers]
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"a transfer failed: {task.exception()}")


async def download_task(daemon: DaemonProcess, url: str, meter: Meter | None = None) -> tuple[str, list[PieceSpan]]:
    """``DownloadTask`` on the daemon's socket; the task id and its pieces, each counted by ``meter`` on arrival."""
    spans: list[PieceSpan] = []
    task_id = ""
    async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=url))
        async for response in stub.DownloadTask(request, timeout=3600):
            task_id = response.task_id
            if response.HasField("download_piece_finished_response"):
                piece = response.download_piece_finished_response.piece
                spans.append(PieceSpan(number=piece.number, offset=piece.offset, length=piece.length))
                if meter is not None:
                    meter.add(piece.length)
    return task_id, sorted(spans, key=lambda span: span.number)


async def fetch_pieces(daemon: DaemonProcess, task_id: str, spans: list[PieceSpan], meter: Meter, vortex: bool) -> None:
    """Fetch the task's pieces from the daemon round and round, as a child would, until cancelled."""
    assert daemon.vortex_port is not None
    client = GrpcParentClient(host_id="bench-bandwidth-child", use_vortex=False)
    parent = Parent(peer_id="bench-parent", host_id="bench-parent", ip="127.0.0.1", port=daemon.upload_port)
    pieces = VortexClient(piece_timeout=600.0)
    try:
        while True:
            for span in spans:
                if vortex:
                    fetched = await pieces.download_piece("127.0.0.1", daemon.vortex_port, task_id, span.number)
                    fetched.done()
                else:
                    fetched = await client.download_piece(parent, task_id, span.number)
                if fetched.length != span.length:
                    raise RuntimeError(f"piece {span.number}: {fetched.length} bytes, not {span.length}")
                meter.add(span.length)
    finally:
        await client.close()


def uploads(daemon: DaemonProcess, task_id: str, spans: list[PieceSpan], meter: Meter) -> list[Awaitable[None]]:
    return [fetch_pieces(daemon, task_id, spans, meter, vortex=n % 2 == 0) for n in range(TRANSFERS)]


def downloads(daemon: DaemonProcess, origin: OriginProcess, meter: Meter) -> list[Awaitable[None]]:
    async def one(name: str) -> None:
        await download_task(daemon, origin.url(name), meter)

    return [one(name) for name in FILES]


@dataclass
class Case:
    name: str
    rate: int | None  # None: unlimited, compared with the tested rate
    meter: Meter


def write_files(root: Path, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        with (root / name).open("wb") as out:
            for _ in range(size // MiB):
                out.write(os.urandom(MiB))


def limit(section: str, key: str, rate: int) -> dict[str, Any]:
    return {section: {key: str(rate)}}


async def measure(
    seconds: float, transfers: Callable[[Meter], list[Awaitable[None]]], name: str, rate: int | None
) -> Case:
    say(f"  {name}: {TRANSFERS} transfers for {seconds:g} s")
    meter = Meter()
    await for_a_while(seconds, transfers(meter))
    return Case(name, rate, meter)


def run(args: argparse.Namespace, workdir: Path) -> list[Case]:
    rate, seconds = args.rate_bytes, args.seconds
    file_size = max(8 * MiB, -(-int(rate * seconds * 1.25 / TRANSFERS) // MiB) * MiB)
    say(f"bench_bandwidth: {TRANSFERS} files of {file_size / MiB:.0f} MiB, limits of {rate / MB:g} MB/s")
    write_files(workdir / "origin", file_size)
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(workdir / "origin"))
        scheduler = stack.enter_context(running_scheduler(workdir / "scheduler"))
        peer = {"scheduler": {"addrs": [scheduler.address], "announceInterval": "2s"}}
        parent = stack.enter_context(running_daemon(workdir / "parent", peer))
        upload = stack.enter_context(running_daemon(workdir / "upload", limit("upload", "bandwidthLimit", rate)))
        child_config = {**peer, **limit("download", "bandwidthLimit", rate)}
        child = stack.enter_context(running_daemon(workdir / "child", child_config))
        source_config = limit("download", "backToSourceBandwidthLimit", rate)
        source = stack.enter_context(running_daemon(workdir / "source", source_config))
        wait_for_hosts(scheduler, 2)
        return asyncio.run(_cases(seconds, rate, origin, parent, upload, child, source))


async def _cases(
    seconds: float,
    rate: int,
    origin: OriginProcess,
    parent: DaemonProcess,
    upload: DaemonProcess,
    child: DaemonProcess,
    source: DaemonProcess,
) -> list[Case]:
    say("  the parent fetches the files from the origin")
    held = await asyncio.gather(*(download_task(parent, origin.url(name)) for name in FILES))
    task_id, spans = await download_task(upload, origin.url(FILES[0]))
    return [
        await measure(seconds, lambda m: uploads(upload, task_id, spans, m), "upload.bandwidthLimit", rate),
        await measure(seconds, lambda m: downloads(child, origin, m), "download.bandwidthLimit", rate),
        await measure(seconds, lambda m: downloads(source, origin, m), "download.backToSourceBandwidthLimit", rate),
        await measure(seconds, lambda m: uploads(parent, *held[0], m), "unlimited", None),
    ]


def print_table(cases: list[Case], seconds: float, tested: int) -> None:
    warmup = max(1.0, seconds / 10)
    rows = [("benchmark", "measured", "against", "ratio", "ideal")]
    for case in cases:
        measured = case.meter.rate(warmup)
        against = case.rate or tested
        ratio = "n/a" if measured is None else f"{measured / against:.3f}"
        shown = "n/a" if measured is None else f"{measured / MB:.2f} MB/s"
        configured = f"{against / MB:g} MB/s " + ("configured" if case.rate else "tested limit")
        rows.append((case.name, shown, configured, ratio, "0.90-1.10" if case.rate else "well above 1"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    say()
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = (cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in pairs)
        say("  ".join(cells).rstrip())
    say(f"note: rates from piece completions after the first {warmup:g} s of each {seconds:g} s run")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure each bandwidth limit with four concurrent transfers.")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each case runs (default 30)")
    parser.add_argument("--rate", default="10MB", help="the limit each case configures (default 10MB, per second)")
    parser.add_argument("--dir", default=None, help="where the temporary directory goes")
    args = parser.parse_args(argv)
    try:
        args.rate_bytes = parse_size(args.rate)
    except ValueError as exc:
        parser.error(f"--rate: {exc}")
    if args.rate_bytes <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    return args


@contextlib.contextmanager
def temporary_dir(parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-bandwidth-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with temporary_dir(args.dir) as workdir:
            cases = run(args, workdir)
    except KeyboardInterrupt:
        say("bench_bandwidth: interrupted")
        return 130
    print_table(cases, args.seconds, args.rate_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
