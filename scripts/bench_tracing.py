"""Benchmark what tracing costs a daemon that serves pieces: DownloadPiece MB/s with tracing off and on, in one run.

Usage::

    .venv/bin/python scripts/bench_tracing.py                     # a 256 MiB file, 5 rounds
    .venv/bin/python scripts/bench_tracing.py --size 1GiB --rounds 9
    .venv/bin/python scripts/bench_tracing.py --quick             # 8 MiB, 1 round: a smoke run of the whole script

Three daemons hold the same file in their caches (each fetched it back to source from the loopback origin,
``scripts/origin.py``). They differ only in their ``tracing`` configuration:

``(a) off``
    No ``tracing`` keys and no ``OTEL_*`` variables: no tracer provider, no gRPC interceptors. The baseline.
``(b) sampled out``
    ``tracing.protocol: grpc`` to the loopback sink with ``samplingRatio: 0``: the interceptors run and a span is
    created for every RPC, but none is recorded or exported.
``(c) exported``
    The same with ``samplingRatio: 1``: every DownloadPiece makes a recorded span that the batch processor exports
    over OTLP/gRPC to the sink, a receiver in a process of its own that only counts what it gets.

For each, this script acts as a child peer and fetches every piece of the file with ``DfdaemonUpload.DownloadPiece``
over loopback TCP, 8 pieces in flight (``grpc_copy`` of ``scripts/bench_p2p.py``, the measure of its ``throughput``
benchmark). A round fetches the file once from each daemon, in an order that rotates from round to round, so drift
on a noisy machine hits the three alike; the table shows the median of ``--rounds`` rounds. Before the rounds, each
daemon serves the file once unmeasured (warm-up).

Ratios (higher is better, 1.0 means no cost):

``b/a``
    what the instrumentation costs when tracing is configured but nothing is sampled: the cost of spans created and
    dropped. The issue's target is a cost under 5%, i.e. ``b/a`` of at least 0.95. (On the DownloadPiece path the
    daemon opens no span of its own, so ``(a)`` serves exactly as a build without tracing would.)
``c/a``
    what tracing everything costs: span recording, the batch processor and the OTLP export.

The script prints the figures and asserts nothing about them; compare the numbers of one run with each other, never
with fixed thresholds, and rerun before drawing conclusions. The spans the sink received are shown too, as a check
that ``(c)`` really exported and ``(b)`` did not.

Options: ``--size SIZE`` (default 256MiB; e.g. ``1GiB``, ``50MB`` or bytes), ``--rounds N`` (default 5),
``--quick`` (8 MiB and 1 round unless given), ``--concurrency N`` (pieces in flight, default 8) and ``--dir DIR``
(where the temporary directory goes; default the system's temporary directory).

Everything runs on loopback with ephemeral ports in temporary directories that are removed afterwards; every process
the script starts is stopped at the end, on Ctrl-C and on SIGTERM too. ``OTEL_*`` variables of the environment are
not passed on to the daemons, so that each runs with its configuration alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
for _path in (ROOT, SCRIPTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_p2p  # noqa: E402
import grpc  # noqa: E402
from bench_p2p import MB, MiB, Reaper, Report, fmt_size, mb_per_s, say  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import (  # noqa: E402
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from dfdaemon import ids  # noqa: E402
from dfdaemon.units import parse_size  # noqa: E402
from tests.support import DaemonProcess, running_daemon, running_origin, wait_for_line  # noqa: E402

DEFAULT_SIZE = 256 * MiB
QUICK_SIZE = 8 * MiB
DEFAULT_ROUNDS = 5
SINK = "_otlp-sink"  # hidden mode: this script as the OTLP/gRPC receiver that counts spans
FILE_NAME = "blob.bin"
CACHES = 3  # one cached copy of the file per daemon


@dataclass(frozen=True)
class Variant:
    """One configuration of the serving daemon."""

    key: str
    label: str
    service: str  # tracing.serviceName, so the sink can tell whose spans it counts
    sampling_ratio: float | None  # None: tracing off

    def tracing_config(self, sink: str) -> dict[str, Any]:
        if self.sampling_ratio is None:
            return {}
        return {
            "tracing": {
                "protocol": "grpc",
                "endpoint": f"http://{sink}",
                "samplingRatio": self.sampling_ratio,
                "serviceName": self.service,
            }
        }


VARIANTS = (
    Variant("a", "(a) tracing off", "bench-tracing-off", None),
    Variant("b", "(b) on, samplingRatio 0", "bench-tracing-sampled-out", 0.0),
    Variant("c", "(c) on, all sampled, OTLP/gRPC", "bench-tracing-exported", 1.0),
)


# --------------------------------------------------------------------------- the span sink (its own process)


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts the spans it is sent by service.name and span name into a JSON file; keeps nothing else."""

    def __init__(self, counts_path: Path) -> None:
        self.counts_path = counts_path
        self.counts: dict[str, dict[str, int]] = {}
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                by_name = self.counts.setdefault(service, {})
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        by_name[span.name] = by_name.get(span.name, 0) + 1
            partial = self.counts_path.with_suffix(".tmp")
            partial.write_text(json.dumps(self.counts))
            partial.replace(self.counts_path)
        return trace_service_pb2.ExportTraceServiceResponse()


def sink_main(argv: list[str]) -> int:
    """Hidden mode: an OTLP/gRPC trace receiver on loopback that counts spans into the file named by ``argv[0]``."""
    counts_path = Path(argv[0])
    counts_path.write_text("{}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        SpanCounter(counts_path), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say(f"otlp sink listening on 127.0.0.1:{port}")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(0)
    return 0


@dataclass
class Sink:
    address: str
    counts_path: Path

    def counts(self) -> dict[str, dict[str, int]]:
        """Spans received so far: service.name -> span name -> count."""
        loaded: dict[str, dict[str, int]] = json.loads(self.counts_path.read_text())
        return loaded


@contextmanager
def running_sink(reaper: Reaper, workdir: Path) -> Iterator[Sink]:
    log_path = workdir / "sink.log"
    counts_path = workdir / "sink-counts.json"
    with log_path.open("wb") as log_file:
        proc = reaper.spawn(
            [sys.executable, str(Path(__file__).resolve()), SINK, str(counts_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=bench_p2p.child_env(),
        )
    try:
        address = wait_for_line(log_path, r"otlp sink listening on (\S+)", proc).group(1)
        yield Sink(address, counts_path)
    finally:
        bench_p2p.stop(proc)


# --------------------------------------------------------------------------- the benchmark


def drop_otel_environment() -> list[str]:
    """Remove OTEL_* variables from this process's environment (the daemons inherit it); returns their names."""
    names = sorted(name for name in os.environ if name.startswith("OTEL_"))
    for name in names:
        del os.environ[name]
    return names


def copy_once(daemon: DaemonProcess, task_id: str, spans: list[ids.PieceSpan], concurrency: int) -> float:
    """Fetch the whole file from ``daemon`` with DownloadPiece; returns MB/s."""
    seconds, nbytes = asyncio.run(bench_p2p.grpc_copy(daemon.upload_port, task_id, spans, concurrency))
    expected = sum(span.length for span in spans)
    if nbytes != expected:
        raise RuntimeError(f"DownloadPiece moved {nbytes} bytes, expected {expected}")
    return mb_per_s(nbytes, seconds)


def tracing_logged(daemon: DaemonProcess) -> bool:
    return "tracing to " in daemon.log()


def run(args: argparse.Namespace, report: Report) -> None:
    size: int = args.size_bytes
    reaper = Reaper()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="bench-tracing-", dir=args.dir))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        sockets = Path(tempfile.mkdtemp(prefix="btr-"))  # short: unix socket paths are limited
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        stack.callback(reaper.stop_all)

        need = (1 + CACHES) * size + bench_p2p.DISK_RESERVE  # the origin's file and one cache per daemon
        free = shutil.disk_usage(workdir).free
        if free < need:
            raise SystemExit(
                f"bench_tracing: {fmt_size(free)} of free disk under {workdir.parent} is not enough for "
                f"--size {fmt_size(size)} (needs about {fmt_size(need)}); try a smaller --size or another --dir"
            )
        files = workdir / "files"
        files.mkdir()
        say(f"writing a {fmt_size(size)} file of random bytes for the origin")
        bench_p2p.write_random_file(files / FILE_NAME, size)
        origin = stack.enter_context(running_origin(files))
        sink = stack.enter_context(running_sink(reaper, workdir))
        rates, calls = measure(args, reaper, workdir, sockets, origin.url(FILE_NAME), sink, size, report)
        # The daemons have stopped, which flushed what their batch processors still held: the counts are final.
        counts = sink.counts()

    medians = {key: statistics.median(values) for key, values in rates.items()}
    base = medians["a"]
    for variant in VARIANTS:
        rate = medians[variant.key]
        report.add(
            variant.label if variant.key == "a" else f"{variant.label} / (a)",
            f"{rate:,.0f} MB/s",
            "baseline" if variant.key == "a" else f"off {base:,.0f} MB/s",
            rate / base,
            "1.0" if variant.key == "a" else "1.0 (higher is better)",
        )
    # Report.note would print each at once too; these belong under the table only.
    for variant in VARIANTS:
        values = ", ".join(f"{v:,.0f}" for v in rates[variant.key])
        report.notes.append(f"{variant.label}: rounds {values} MB/s")
    for variant in VARIANTS:
        by_name = counts.get(variant.service, {})
        pieces = sum(n for name, n in by_name.items() if name.endswith("/DownloadPiece"))
        others = sum(by_name.values()) - pieces
        report.notes.append(
            f"{variant.label}: the sink received {pieces} DownloadPiece span(s) for {calls} call(s), "
            f"{others} other span(s) (the cache fill)"
        )
    ratio_b, ratio_c = medians["b"] / base, medians["c"] / base
    report.notes.append(f"b/a = {ratio_b:.3f} (the target: at least 0.95, a cost under 5%), c/a = {ratio_c:.3f}")


def measure(
    args: argparse.Namespace,
    reaper: Reaper,
    workdir: Path,
    sockets: Path,
    url: str,
    sink: Sink,
    size: int,
    report: Report,
) -> tuple[dict[str, list[float]], int]:
    """Start the three daemons, fill their caches and run the rounds; returns MB/s per variant and calls per daemon."""
    piece_length = ids.piece_length_for(size)
    spans = ids.pieces_for(size, piece_length)
    timeout = bench_p2p.dfget_timeout(size)
    out = workdir / "out"
    out.mkdir()
    rates: dict[str, list[float]] = {variant.key: [] for variant in VARIANTS}
    with ExitStack() as stack:
        daemons: dict[str, DaemonProcess] = {}
        for variant in VARIANTS:
            extra = {
                **variant.tracing_config(sink.address),
                "download": {"server": {"socketPath": str(sockets / f"{variant.key}.sock")}},
            }
            daemons[variant.key] = stack.enter_context(running_daemon(workdir / f"daemon-{variant.key}", extra))
        for variant in VARIANTS:
            daemon = daemons[variant.key]
            if tracing_logged(daemon) != (variant.sampling_ratio is not None):
                report.note(f"{variant.label}: the daemon's log does not say tracing is as configured")
        task_ids = set()
        for variant in VARIANTS:
            result = bench_p2p.run_dfget(reaper, daemons[variant.key], url, out / f"{variant.key}.bin", timeout)
            say(f"{variant.label}: cached the file in {result.elapsed:.2f} s")
            task_ids.add(result.task_id)
        if len(task_ids) != 1:
            raise RuntimeError(f"the daemons cached the file under different task ids: {sorted(task_ids)}")
        (task_id,) = task_ids

        say(
            f"DownloadPiece: {len(spans)} pieces of {fmt_size(piece_length)}, {args.concurrency} in flight, "
            f"{args.rounds} round(s) on {os.cpu_count()} CPUs"
        )
        for variant in VARIANTS:
            rate = copy_once(daemons[variant.key], task_id, spans, args.concurrency)
            say(f"  warm-up {variant.label}: {rate:,.0f} MB/s")
        for number in range(args.rounds):
            # Rotate the order, so that drift on a noisy machine hits the three alike.
            shift = number % len(VARIANTS)
            for variant in (*VARIANTS[shift:], *VARIANTS[:shift]):
                rates[variant.key].append(copy_once(daemons[variant.key], task_id, spans, args.concurrency))
            say(
                f"  round {number + 1}: "
                + ", ".join(f"{variant.key} {rates[variant.key][-1]:,.0f}" for variant in VARIANTS)
                + " MB/s"
            )
    # grpc_copy makes one call before its clock starts, then one per piece.
    calls = (1 + args.rounds) * (1 + len(spans))
    return rates, calls


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default=None, help="file size, e.g. 256MiB, 1GiB, 50MB (default 256MiB)")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds (default {DEFAULT_ROUNDS}, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="8 MiB and one round: a smoke run")
    parser.add_argument("--concurrency", type=int, default=8, help="pieces in flight (default 8)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary directory goes")
    args = parser.parse_args(argv)
    try:
        args.size_bytes = parse_size(args.size) if args.size is not None else QUICK_SIZE if args.quick else DEFAULT_SIZE
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    if args.size_bytes < 1:
        parser.error("--size must be at least one byte")
    args.rounds = args.rounds if args.rounds is not None else 1 if args.quick else DEFAULT_ROUNDS
    if args.rounds < 1 or args.concurrency < 1:
        parser.error("--rounds and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SINK]:
        return sink_main(argv[1:])
    args = parse_args(argv)
    bench_p2p.catch_stop_signals()
    report = Report()
    say(
        f"bench_tracing: DownloadPiece with tracing off, sampled out and exported; a {fmt_size(args.size_bytes)} "
        f"file ({args.size_bytes / MB:,.0f} MB), {args.rounds} round(s)"
    )
    dropped = drop_otel_environment()
    if dropped:
        report.note(f"not passed on to the daemons: {', '.join(dropped)}")
    return bench_p2p.run_reported("bench_tracing", lambda: run(args, report), report)


if __name__ == "__main__":
    sys.exit(main())
