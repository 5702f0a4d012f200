"""Benchmark the registry mirror: a blob pulled through the daemon, next to the same blob pulled from the registry.

Usage::

    .venv/bin/python scripts/bench_mirror.py                    # a 256 MiB blob, 5 rounds
    .venv/bin/python scripts/bench_mirror.py --size 64MiB --rounds 9
    .venv/bin/python scripts/bench_mirror.py --quick            # 16 MiB, 1 round: a smoke run of the whole script

The script starts a real distribution registry (``docker-registry``, as ``tests/registry_support.py`` runs it) and
pushes one image to it whose single layer is a blob of about ``--size`` bytes (``filler_image``: a gzip of random
bytes, so it does not compress). A client in this script then GETs ``/v2/<name>/blobs/sha256:<hex>`` in two ways:

*mirror*
    from a daemon's ``proxy.server`` port with ``?ns=<registry host>``, as containerd does with a ``hosts.toml``
    mirror. The daemon turns the request into a P2P task named by the digest (with no scheduler it goes back to
    source: one streamed GET to the registry), passes the registry's bytes to the client as they arrive while it
    stores them as pieces, and holds the last 64 KiB until the whole blob has matched its digest. A cached blob goes
    out by ``sendfile`` from the daemon's content file while its pieces' CRCs are checked.
*direct*
    from the registry itself, the baseline: what the client would see without the mirror.

The client is the same for both: one streaming GET (urllib3), every byte hashed with sha256 as it arrives (as
containerd does when it writes a layer) and then dropped. What came through the mirror must hash to the digest every
time, or the script stops with an error. Each round starts a fresh daemon with empty storage (so its cache does not
have the blob), fetches the image's manifest and config blob through it as a runtime does before any layer (unmeasured;
this also spares the layer the daemon's first-request costs), and measures, in this order, each pair alternating which
of the two goes first from round to round:

``cold``
    The mirror's first fetch of the blob (a cache miss: the daemon fetches it from the registry while it streams it)
    next to a direct fetch. ``ratio = mirror seconds / direct seconds``: 1.0 would mean the mirror costs nothing on a
    miss; 2.0 that a pull through it takes twice as long. The registry's access log must show that it served the blob
    during the mirror's fetch (the daemon learns the length, and whether the client may read the blob, with HEADs,
    which move no blob bytes). Wall time suffers from other load on the machine, so the daemon's CPU seconds during
    the cold fetch are shown too, against the client's own for the direct fetch (receiving and hashing).
    Before each of the two, the blob's size is written to a scratch file and deleted (``bench_p2p.prime_memory``),
    so that on a VM the daemon writes the blob into recently freed memory, as on a machine without free page
    reporting (``--no-prime`` skips it).
``cached``
    The same blob again through the mirror, now a cache hit, next to another direct fetch.
    ``ratio = mirror seconds / direct seconds``. The registry must have served no blob byte during the mirror's fetch
    (``blob_bytes_served()`` of its access log does not grow), or the script stops with an error.
``first-byte``
    The time from sending the request to the first body byte, for the cold mirror fetch and the direct fetch of the
    ``cold`` pair. ``ratio = mirror / direct``. A second row sets the mirror's first byte against its own whole cold
    fetch: far below 1 shows the blob is streamed as its pieces arrive, not sent once it is all in the cache.
``memory``
    The daemon's peak resident memory (``VmHWM`` in ``/proc/PID/status``) after the cold fetch, and after the cached
    one too (a peak only grows). ``ratio = peak RSS / blob size``: far below 1, since pieces are streamed, not held.
    The peak right after start-up is shown in a note; with ``--quick``'s small blob the ratio says little.

The table shows the medians over ``--rounds`` rounds. Before the first round one direct fetch warms the registry up,
unmeasured. The registry, the daemon and this client share the machine's CPUs, as they would on a node.

Options: ``--size SIZE`` (default 256MiB, at most 2GiB; e.g. ``64MiB``, ``50MB`` or bytes; the blob is a little
smaller, a whole number of tar blocks),
``--rounds N`` (default 5), ``--quick`` (16 MiB and 1 round unless given), ``--dir DIR``
(where the temporary directory goes; default the system's temporary directory) and ``--no-prime``. The blob is built
in memory before it is pushed (about three times ``--size`` at the peak) and needs about three times ``--size`` of disk
(the registry's copy, the daemon's cache and a priming scratch file; twice with ``--no-prime``).

Everything runs on loopback with ephemeral ports in temporary directories that are removed afterwards; every process
the script starts is stopped at the end, on Ctrl-C and on SIGTERM too. Machines are noisy: compare the numbers of one
run with each other, never with fixed thresholds, and rerun before drawing conclusions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
for _path in (ROOT, SCRIPTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_p2p  # noqa: E402
import urllib3  # noqa: E402
from bench_p2p import (  # noqa: E402
    DISK_RESERVE,
    MB,
    KiB,
    MiB,
    Report,
    cpu_seconds,
    fmt_size,
    mb_per_s,
    prime_memory,
    say,
    vm_bytes,
)

from dfdaemon.units import parse_size  # noqa: E402
from tests.registry_support import OCI_MANIFEST, Registry, filler_image, push_image, running_registry  # noqa: E402
from tests.support import DaemonProcess, running_daemon  # noqa: E402

DEFAULT_SIZE = 256 * MiB
QUICK_SIZE = 16 * MiB  # four 4 MiB pieces, so that streaming shows even in a smoke run
MIN_SIZE = 64 * KiB
MAX_SIZE = 2048 * MiB  # the blob is built in memory, twice over (tar, then gzip)
DEFAULT_ROUNDS = 5
REPOSITORY = "bench/mirror"
TAG = "v1"
SEED = 20240601


@dataclass(frozen=True)
class Fetch:
    """One GET as the client saw it."""

    seconds: float  # from sending the request to the last body byte
    first_byte: float  # from sending the request to the first body byte
    nbytes: int
    digest: str  # "sha256:<hex>" of the body
    headers: urllib3.HTTPHeaderDict
    cpu: float  # this process's CPU seconds meanwhile (receiving and hashing)


@dataclass
class Samples:
    """Every round's measures, by name."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def last(self, name: str) -> float:
        return self.values[name][-1]


def fetch(url: str, params: dict[str, str] | None = None) -> Fetch:
    """One streaming GET: hash every byte as it arrives, keep none."""
    hasher = hashlib.sha256()
    nbytes = 0
    first_byte: float | None = None
    timeout = urllib3.Timeout(connect=10.0, read=120.0)
    started, cpu = time.perf_counter(), time.process_time()
    response = urllib3.request("GET", url, fields=params, timeout=timeout, retries=False, preload_content=False)
    try:
        if response.status != 200:
            body = response.read()[:300].decode(errors="replace")
            raise RuntimeError(f"GET {url} answered {response.status}: {body}")
        # read1: as the socket gives them (up to 1 MiB); waiting for a full chunk would delay the first byte.
        while chunk := response.read1(1024 * 1024):
            if first_byte is None:
                first_byte = time.perf_counter() - started
            hasher.update(chunk)
            nbytes += len(chunk)
    finally:
        response.release_conn()
    seconds = time.perf_counter() - started
    first = seconds if first_byte is None else first_byte  # an empty body: its end is its first byte
    return Fetch(seconds, first, nbytes, "sha256:" + hasher.hexdigest(), response.headers, time.process_time() - cpu)


@dataclass(frozen=True)
class Target:
    """The blob and the two ways to it."""

    registry: Registry
    digest: str
    size: int
    config_digest: str

    def direct(self) -> Fetch:
        return self.check(fetch(f"{self.registry.url}/v2/{REPOSITORY}/blobs/{self.digest}"), "the registry")

    def mirror(self, daemon: DaemonProcess) -> Fetch:
        url = f"http://127.0.0.1:{daemon.proxy_port}/v2/{REPOSITORY}/blobs/{self.digest}"
        return self.check(fetch(url, {"ns": self.registry.host}), "the mirror")

    def pull_starts(self, daemon: DaemonProcess) -> None:
        """What a runtime fetches through the mirror before the layers: the manifest, then the config blob."""
        base = f"http://127.0.0.1:{daemon.proxy_port}/v2/{REPOSITORY}"
        for path, accept in ((f"manifests/{TAG}", OCI_MANIFEST), (f"blobs/{self.config_digest}", "*/*")):
            answer = urllib3.request(
                "GET", f"{base}/{path}", fields={"ns": self.registry.host}, headers={"Accept": accept}, retries=False
            )
            if answer.status != 200:
                raise RuntimeError(f"GET {path} through the mirror answered {answer.status}")

    def check(self, got: Fetch, source: str) -> Fetch:
        """Fail loudly unless ``got`` is exactly the blob."""
        if got.nbytes != self.size or got.digest != self.digest:
            raise RuntimeError(
                f"{source} sent {got.nbytes} bytes hashing to {got.digest}; the blob is {self.size} bytes, "
                f"{self.digest}"
            )
        named = got.headers.get("docker-content-digest")
        if named is not None and named != self.digest:
            raise RuntimeError(f"{source} named the blob {named}, not {self.digest}")
        return got


def daemon_extra(registry: Registry, socket_path: Path) -> dict[str, Any]:
    # Unix socket paths must stay short, so they live in a directory of their own.
    return {
        "download": {"server": {"socketPath": str(socket_path)}},
        "proxy": {"enable": True, "registryMirror": {"insecureRegistries": [registry.host]}},
    }


def push_blob(registry: Registry, size: int) -> tuple[str, int, str]:
    """Push a one-layer image with a layer of about ``size`` bytes; returns the layer's (digest, size) and the
    config's digest."""
    image = filler_image("bench-mirror", [size], seed=SEED)
    layer = image.layers[0]
    push_image(registry.url, REPOSITORY, TAG, image)
    return layer.digest, layer.size, image.config.digest


def sha256_rate(nbytes: int) -> float:
    """sha256 over ``nbytes`` of memory on this machine, in MB/s: the client's own share of every fetch."""
    block = os.urandom(min(nbytes, 64 * MiB))
    hasher = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(max(1, nbytes // len(block))):
        hasher.update(block)
    return mb_per_s(max(1, nbytes // len(block)) * len(block), time.perf_counter() - started)


# --------------------------------------------------------------------------- the rounds


def one_round(number: int, target: Target, workdir: Path, sockets: Path, samples: Samples, *, no_prime: bool) -> None:
    """A fresh daemon: the cold pair, the cached pair, the daemon's peak memory."""
    order = ("direct", "mirror") if number % 2 == 0 else ("mirror", "direct")
    daemon_dir = workdir / f"daemon-{number}"
    registry = target.registry
    try:
        with running_daemon(daemon_dir, daemon_extra(registry, sockets / f"d{number}.sock")) as daemon:
            if daemon.proxy_port is None:
                raise RuntimeError(f"the daemon did not log its proxy port; see {daemon.log_path}")
            pid = daemon.proc.pid
            samples.add("rss idle", vm_bytes(pid, "VmHWM"))
            target.pull_starts(daemon)  # unmeasured, as containerd does before it asks for a layer
            for kind in order:  # cold: the daemon's cache does not have the blob
                if not no_prime:
                    prime_memory(workdir, target.size)
                if kind == "direct":
                    got = target.direct()
                    samples.add("cold direct", got.seconds)
                    samples.add("cold direct cpu", got.cpu)
                    samples.add("cold direct first byte", got.first_byte)
                    continue
                before, cpu = registry.blob_bytes_served(), cpu_seconds(pid)
                got = target.mirror(daemon)
                samples.add("cold daemon cpu", cpu_seconds(pid) - cpu)
                served = registry.blob_bytes_served() - before
                if served < target.size:
                    raise RuntimeError(f"the cold mirror fetch took only {served} blob bytes from the registry")
                samples.add("cold mirror", got.seconds)
                samples.add("cold mirror first byte", got.first_byte)
                samples.add("cold registry bytes", served)
            samples.add("rss cold", vm_bytes(pid, "VmHWM"))
            for kind in order:  # cached: the daemon has the blob now
                if kind == "direct":
                    samples.add("cached direct", target.direct().seconds)
                    continue
                before = registry.blob_bytes_served()
                got = target.mirror(daemon)
                served = registry.blob_bytes_served() - before
                if served:
                    raise RuntimeError(f"the cached mirror fetch took {served} blob bytes from the registry")
                samples.add("cached mirror", got.seconds)
                samples.add("cached mirror first byte", got.first_byte)
            samples.add("rss cached", vm_bytes(pid, "VmHWM"))
    finally:
        shutil.rmtree(daemon_dir, ignore_errors=True)  # the next round starts with an empty cache
    say(
        f"  round {number + 1}: cold mirror {samples.last('cold mirror'):.2f} s, "
        f"direct {samples.last('cold direct'):.2f} s; "
        f"cached mirror {samples.last('cached mirror'):.2f} s, direct {samples.last('cached direct'):.2f} s; "
        f"first byte mirror {samples.last('cold mirror first byte') * 1000:.0f} ms, "
        f"direct {samples.last('cold direct first byte') * 1000:.1f} ms; "
        f"daemon peak RSS {fmt_size(samples.last('rss cached'))}"
    )


def seconds_and_rate(seconds: float, size: int) -> str:
    return f"{seconds:.2f} s ({mb_per_s(size, seconds):,.0f} MB/s)"


def fill_report(samples: Samples, size: int, report: Report) -> None:
    for name in ("cold", "cached"):
        mirror, direct = samples.median(f"{name} mirror"), samples.median(f"{name} direct")
        report.add(
            f"{name}: mirror / direct",
            seconds_and_rate(mirror, size),
            f"direct {seconds_and_rate(direct, size)}",
            mirror / direct,
            "1.0 (lower is better)",
        )
    daemon_cpu, client_cpu = samples.median("cold daemon cpu"), samples.median("cold direct cpu")
    report.add(
        "cold: daemon CPU / direct client CPU",
        f"{daemon_cpu:.2f} s",
        f"client {client_cpu:.2f} s",
        daemon_cpu / client_cpu if client_cpu else None,
        "lower is better",
    )
    first, first_direct = samples.median("cold mirror first byte"), samples.median("cold direct first byte")
    report.add(
        "first-byte: mirror cold / direct",
        f"{first * 1000:.1f} ms",
        f"direct {first_direct * 1000:.1f} ms",
        first / first_direct,
        "small (lower is better)",
    )
    cold = samples.median("cold mirror")
    report.add(
        "first-byte: mirror cold / whole fetch",
        f"{first * 1000:.1f} ms",
        f"whole {cold:.2f} s",
        first / cold,
        "far below 1",
    )
    for when in ("cold", "cached"):
        peak = samples.median(f"rss {when}")
        report.add(
            f"memory: daemon peak RSS after {when} / blob",
            fmt_size(peak),
            f"blob {fmt_size(size)}",
            peak / size,
            "far below 1",
        )
    idle = samples.median("rss idle")
    report.note(
        f"daemon peak RSS right after start-up {fmt_size(idle)}; the fetches added "
        f"{fmt_size(max(0.0, samples.median('rss cached') - idle))}"
    )
    served = samples.median("cold registry bytes")
    report.note(
        f"the registry served {served:,.0f} blob bytes per cold mirror fetch ({served - size:+,.0f} over the blob), "
        "none per cached one"
    )
    cached_first = samples.median("cached mirror first byte")
    report.note(f"first byte of a cached mirror fetch: {cached_first * 1000:.1f} ms")


def run(args: argparse.Namespace, report: Report) -> None:
    size: int = args.size_bytes
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="bench-mirror-", dir=args.dir))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        sockets = Path(tempfile.mkdtemp(prefix="bmir-"))  # short: unix socket paths are limited
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        # The registry's copy, one daemon cache at a time and, while it holds the blob, a priming scratch file.
        need = (2 if args.no_prime else 3) * size + DISK_RESERVE
        free = shutil.disk_usage(workdir).free
        if free < need:
            raise SystemExit(
                f"bench_mirror: {fmt_size(free)} of free disk under {workdir.parent} is not enough for "
                f"--size {fmt_size(size)} (needs about {fmt_size(need)}); try a smaller --size or another --dir"
            )
        registry = stack.enter_context(running_registry(workdir / "registry"))
        say(f"pushing a one-layer image with a {fmt_size(size)} layer to the registry at {registry.host}")
        started = time.perf_counter()
        digest, blob_size, config_digest = push_blob(registry, size)
        say(f"  blob {digest[:19]}… of {blob_size:,} bytes, pushed in {time.perf_counter() - started:.1f} s")
        target = Target(registry, digest, blob_size, config_digest)
        target.direct()  # warm-up, unmeasured
        samples = Samples()
        say(f"{args.rounds} round(s), each with a fresh daemon")
        for number in range(args.rounds):
            one_round(number, target, workdir, sockets, samples, no_prime=args.no_prime)
        fill_report(samples, blob_size, report)
        rate = sha256_rate(blob_size)
        report.note(
            f"the client hashes every byte both ways; sha256 alone runs at {rate:,.0f} MB/s here, "
            f"{blob_size / MB / rate:.2f} s of each fetch of this blob"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default=None, help="blob size, e.g. 64MiB, 50MB (default 256MiB, at most 2GiB)")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds (default {DEFAULT_ROUNDS}, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="16 MiB and one round: a smoke run")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary directory goes")
    parser.add_argument(
        "--no-prime",
        action="store_true",
        help="no memory priming before each cold fetch (see bench_p2p)",
    )
    args = parser.parse_args(argv)
    try:
        args.size_bytes = parse_size(args.size) if args.size is not None else QUICK_SIZE if args.quick else DEFAULT_SIZE
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    if not MIN_SIZE <= args.size_bytes <= MAX_SIZE:
        parser.error(f"--size must be between {fmt_size(MIN_SIZE)} and {fmt_size(MAX_SIZE)}")
    args.rounds = args.rounds if args.rounds is not None else 1 if args.quick else DEFAULT_ROUNDS
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench_p2p.catch_stop_signals()
    report = Report()
    say(
        f"bench_mirror: a {fmt_size(args.size_bytes)} blob through the registry mirror and direct, "
        f"{args.rounds} round(s), on {os.cpu_count()} CPUs"
    )
    return bench_p2p.run_reported("bench_mirror", lambda: run(args, report), report)


if __name__ == "__main__":
    sys.exit(main())
