"""Benchmark peer-to-peer transfer: each number is measured next to its baseline, in one run.

Usage::

    .venv/bin/python scripts/bench_p2p.py                       # every benchmark with a 1 GiB file
    .venv/bin/python scripts/bench_p2p.py --size 256MiB         # the same with 256 MiB
    .venv/bin/python scripts/bench_p2p.py throughput memory     # only the named benchmarks
    .venv/bin/python scripts/bench_p2p.py --quick               # small sizes: a smoke run of the whole script

Benchmarks (positional names, default all but ``floors``):

``throughput``
    A daemon (the *parent*) holds the file in its cache. This script, acting as a child, fetches every piece twice:
    over vortex TCP (the daemon's ``storage.server.tcpPort``) with the daemon's own vortex client, and with gRPC
    ``DfdaemonUpload.DownloadPiece`` through its gRPC parent client, ``--concurrency`` pieces at a time (8, the
    daemon's default ``concurrentPieceCount``). The baseline is a raw copy of the same bytes over loopback: a plain
    asyncio TCP server in its own process reads each piece of the same file and writes it to the socket, and a plain
    asyncio client here asks for the pieces with the same concurrency.
    ``ratio = vortex (or DownloadPiece) MB/s / raw MB/s``: 1.0 means the upload path moves bytes as fast as a bare
    socket; 0.25 means it takes four times as long. The rounds rotate the three; the table shows the medians.
``dfget``
    A file of ``--size`` on the loopback origin (``scripts/origin.py``), a scheduler stub and two daemons. The
    parent fetches the file with ``dfget`` first: no peer has it, so it goes back to source (``dfget back-to-source``).
    Then the child fetches it with ``dfget``; the scheduler points it at the parent (``dfget P2P``). Before each, the
    same file is downloaded directly from the same origin (urllib3, one streaming GET written to a file
    256 KiB at a time, as the daemon writes).
    ``ratio = dfget seconds / direct seconds`` (1.0: as fast as a plain HTTP download; 2.0: twice as long). dfget's
    own ``elapsed_seconds`` is used (the download, without the interpreter start-up, which is shown separately).
    The daemon makes every piece durable (fdatasync) before announcing it; the direct download does not sync.
    Wall time suffers from whatever else runs on the machine, so the CPU seconds the daemon spent on each download
    are shown too, against those of the direct client (``daemon CPU / direct client CPU``); dfget itself only
    waits, and the origin serves both alike. With ``--rounds N`` this is done N times, each round with a task of
    its own (the URL with ``?round=N``, which the origin ignores); the table shows the median of the rounds' ratios,
    and a note lists each. Before each measured download, ``--size`` bytes are written to a scratch file and deleted
    (``prime_memory``), so that on a VM both sides write into recently freed memory (``--no-prime`` skips it).
``peers``
    A scheduler stub and ``--peers`` daemons (8) download the same file at the same moment. The origin sends each
    request at a limited rate so that the first peer is still fetching when the others ask (the ``rate`` fault of
    ``scripts/origin.py``; ``--origin-seconds`` sets how long the origin part alone would take).
    ``ratio = bytes the origin served / file size``: 1.0 is ideal (the origin is hit once), N would mean every peer
    went to the origin. The wall time of all the downloads is shown, with the aggregate rate (peers x size / wall).
    Every peer caches the file, so this needs peers x size of disk: when the disk is short, the file for this
    benchmark is scaled down, and the output says so.
``memory``
    The peak resident memory (VmHWM in ``/proc/PID/status``) of the child daemon, which received the whole file
    from its parent during ``dfget P2P`` (every round), and of the parent right after it fetched the file from the
    origin (the first round; before it serves the ``throughput`` benchmark's pieces).
    ``ratio = peak RSS / file size``: it should be far below 1, since pieces are streamed, not held.
    The daemon's peak before the download (start-up) is shown next to it.
``floors`` (only when named; it runs the ``dfget`` rounds too)
    What a plain client doing the daemon's work takes, measured in every dfget round beside the dfget.
    Before the child's direct download, a *bare vortex receiver* in this script fetches the same pieces from the
    same parent: plain threads that only receive, CRC, write and sync every 8 pieces, what a child must do at the
    least (``bare_vortex_download``). ``dfget P2P / bare vortex receiver`` is then the cost of the daemon itself,
    and ``bare vortex receiver / direct HTTP`` the floor under the P2P ratio on this machine; the same receiver
    once more without syncing shows what durability adds to that floor. Before the parent's direct download, the
    direct download runs once more with a CRC of every byte and the daemon's syncs (after every 8 pieces' worth
    and at the end, each waited for, as a plain client would): ``direct HTTP, CRCed and synced / direct HTTP`` is
    what keeping the daemon's promises costs a plain client. These three extra downloads per round make the later
    rounds' dfget stall on a VM that hands memory back to its host, hence not by default.
``repeat``
    Does memory creep? The parent daemon downloads ``--repeat`` (500) small distinct files one after the other
    (gRPC ``DownloadTask`` over its socket, back to source); its resident memory (VmRSS) is read after a tenth of
    them and after all. ``ratio = RSS after all / RSS after a tenth``: 1.0 is flat; the target is at most 1.10.

Options: ``--size SIZE`` (default 1GiB; e.g. ``256MiB``, ``50MB`` or bytes), ``--quick`` (a small file, one round, a
short origin throttle: a smoke run), ``--rounds N`` (throughput and dfget rounds, default 3), ``--concurrency N``
(pieces in flight in ``throughput``, default 8), ``--peers N`` (default 8), ``--origin-seconds S`` (default 8; 0
disables the throttle), ``--repeat N`` (downloads in ``repeat``, default 500, 50 with ``--quick``) and ``--dir DIR``
(where the temporary directory goes; default the system's temporary directory) and ``--no-prime``.

Everything runs on loopback with ephemeral ports in a temporary directory that is removed afterwards; every process
the script starts is stopped at the end, on Ctrl-C and on SIGTERM too. Machines are noisy: compare the numbers of one
run with each other, never with fixed thresholds, and rerun before drawing conclusions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import urllib3  # noqa: E402

from dfdaemon import ids  # noqa: E402
from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc  # noqa: E402
from dfdaemon.blocking import receive_into, receive_timeout  # noqa: E402
from dfdaemon.download.peering import Parent  # noqa: E402
from dfdaemon.rpc.peer_client import GrpcParentClient  # noqa: E402
from dfdaemon.storage import IncomingPiece  # noqa: E402
from dfdaemon.storage.content import thread_block, write_vector_at  # noqa: E402
from dfdaemon.units import parse_size  # noqa: E402
from dfdaemon.vortex.client import VortexClient  # noqa: E402
from dfdaemon.vortex.codec import HEADER_SIZE, DownloadPiece, PieceMetadata, Tag, decode_header  # noqa: E402
from tests.support import (  # noqa: E402
    DaemonProcess,
    OriginProcess,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
    wait_for_line,
)

BENCHMARKS = ("throughput", "dfget", "peers", "memory", "repeat", "floors")
# ``floors`` adds three downloads of the file to every dfget round; on a VM that hands memory back to its host that
# makes the later rounds' dfget stall, so it runs only when named.
DEFAULT_BENCHMARKS = tuple(name for name in BENCHMARKS if name != "floors")
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
QUICK_SIZE = 8 * MiB
RAW_SERVER = "_raw-server"  # hidden mode: this script as the raw TCP server of the throughput baseline
DISK_RESERVE = 1 * GiB  # left free on the disk whatever the benchmarks need
FILE_NAME = "blob.bin"
SMALL_FILE_NAME = "small.bin"  # what ``repeat`` downloads, under a different query each time
SMALL_SIZE = 256 * KiB
PEERS_FILE_NAME = "peers.bin"
_HEADER = struct.Struct(">Q")
DFGET_FLAGS = ("--json", "--no-progress")
PIECE_TIMEOUT = 60.0  # seconds without a byte before the bare vortex receiver gives a piece up


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt_size(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / KiB:.0f} KiB"


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    benchmark: str
    measured: str
    against: str
    ratio: float | None
    ideal: str


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, benchmark: str, measured: str, against: str, ratio: float | None, ideal: str) -> None:
        self.rows.append(Row(benchmark, measured, against, ratio, ideal))

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"  note: {text}")

    def print_table(self) -> None:
        header = ("benchmark", "measured", "against", "ratio", "ideal")
        cells = [
            (r.benchmark, r.measured, r.against, "n/a" if r.ratio is None else f"{r.ratio:.3f}", r.ideal)
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        say()
        for row in [header, *cells]:
            # The ratio column is right-aligned, the others left-aligned.
            padded = (c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            say("  ".join(padded).rstrip())
        for text in self.notes:
            say(f"note: {text}")


# --------------------------------------------------------------------------- processes


class Reaper:
    """Every process this script starts itself; whatever still runs at the end is stopped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(args, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            stop(proc, timeout=10)
        self.procs.clear()


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def peer_extra(scheduler: str, socket_path: Path) -> dict[str, Any]:
    # Unix socket paths must stay short, so they live in a directory of their own.
    return {"scheduler": {"addrs": [scheduler]}, "download": {"server": {"socketPath": str(socket_path)}}}


def vm_bytes(pid: int, key: str) -> int:
    """A ``Vm*`` line of /proc/PID/status (VmHWM: peak resident memory, VmRSS: current), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * KiB
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


# --------------------------------------------------------------------------- files and downloads


def write_random_file(path: Path, size: int) -> None:
    block = 16 * MiB
    with path.open("wb") as f:
        written = 0
        while written < size:
            n = min(block, size - written)
            f.write(os.urandom(n))
            written += n


def prime_memory(directory: Path, size: int) -> None:
    """Write ``size`` bytes to a scratch file in ``directory`` and delete it, so the next writer reuses its memory.

    On a VM that hands free memory back to its host (virtio-balloon free page reporting), memory freed more than a
    moment ago is gone from the guest, and whoever writes a file into it pays the host's faults: 256 MiB cost
    0.7-1.0 s of kernel CPU that way here, against 0.07 s written into memory freed just before. Which side of a
    comparison drew which was chance, and swung ratios between 0.4 and 4. Priming before each measured download
    gives both sides recently freed memory, as a machine without such reporting always does.
    """
    scratch = directory / ".prime"
    block = bytes(256 * KiB)
    with scratch.open("wb") as f:
        for _ in range(-(-size // len(block))):
            f.write(block)
    scratch.unlink()


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Direct:
    seconds: float
    cpu: float  # CPU seconds of this process meanwhile (the client's own work, reading and writing)


def direct_download(url: str, output: Path, *, durable: bool = False) -> Direct:
    """One streaming GET written to a file, as a plain HTTP client does it.

    ``durable`` adds what the daemon promises besides: a CRC of every byte and a sync after every 8 pieces' worth
    and at the end.
    """
    started, cpu = time.perf_counter(), time.process_time()
    response = urllib3.request("GET", url, timeout=120, retries=False, preload_content=False)
    try:
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}")
        sync_every = 8 * ids.piece_length_for(int(response.headers.get("Content-Length", 0))) if durable else 0
        crc, unsynced = 0, 0
        with output.open("wb") as f:
            # 256 KiB writes, as the daemon's: on a VM that hands free memory back to its host, 1 MiB writes can cost
            # ten times the kernel CPU (see ``dfdaemon.storage.content``), which would flatter every ratio.
            for chunk in response.stream(256 * KiB):
                f.write(chunk)
                if durable:
                    crc = ids.crc32_update(crc, chunk)
                    unsynced += len(chunk)
                    if unsynced >= sync_every:
                        f.flush()
                        os.fdatasync(f.fileno())
                        unsynced = 0
            if durable:
                f.flush()
                os.fdatasync(f.fileno())
    finally:
        response.release_conn()
    return Direct(time.perf_counter() - started, time.process_time() - cpu)


def bare_vortex_download(
    port: int, task_id: str, size: int, output: Path, concurrency: int, *, durable: bool = True
) -> Direct:
    """The floor under ``dfget P2P`` on this machine: the parent's pieces over vortex, nothing else.

    ``concurrency`` threads (the daemon's ``concurrentPieceCount``) each ask for a piece on a connection of its own
    and receive it into one reused block, which is written (at most 256 KiB per call, as the daemon writes) and
    CRCed while in cache; the CRC must match the parent's digest. When ``durable``, the file is synced after every
    8 pieces and at the end, as the daemon commits. No event loop, scheduler, gRPC, SQLite or thread hand-over:
    what a child must do at the least to store the pieces, done by plain threads.
    """
    spans = ids.pieces_for(size, ids.piece_length_for(size))
    lock = threading.Lock()
    stored = 0
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def receive(sock: socket.socket, target: memoryview) -> None:
        while target:  # (``receive_into`` raises when the parent closes early)
            target = target[receive_into(sock, target) :]

    def fetch(span: ids.PieceSpan) -> None:
        nonlocal stored
        with socket.create_connection(("127.0.0.1", port), timeout=PIECE_TIMEOUT) as sock:
            sock.settimeout(None)  # blocking, for MSG_WAITALL; a stalled parent fails after the kernel's timeout
            receive_timeout(sock, PIECE_TIMEOUT)
            sock.sendall(DownloadPiece(task_id, span.number).encode())
            head = bytearray(HEADER_SIZE)
            receive(sock, memoryview(head))
            header = decode_header(head)
            value = bytearray(header.length)
            receive(sock, memoryview(value))
            if header.tag != Tag.PIECE_CONTENT:
                raise RuntimeError(f"the parent refused piece {span.number} (tag {header.tag})")
            metadata = PieceMetadata.decode(value)
            if (metadata.offset, metadata.length) != (span.offset, span.length):
                raise RuntimeError(f"the parent sent piece {span.number} at {metadata.offset}+{metadata.length}")
            block, done, crc = thread_block(), 0, 0
            while done < span.length:
                chunk = block[: min(len(block), span.length - done)]
                receive(sock, chunk)
                write_vector_at(fd, span.offset + done, (chunk,))
                crc = ids.crc32_update(crc, chunk)
                done += len(chunk)
        if ids.format_crc32(crc) != metadata.digest:
            raise RuntimeError(f"piece {span.number} does not match its digest {metadata.digest}")
        with lock:
            stored += 1
            due = durable and stored % 8 == 0
        if due:
            os.fdatasync(fd)

    started, cpu = time.perf_counter(), time.process_time()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            fetches = [pool.submit(fetch, span) for span in spans]
            try:
                for fetched in fetches:
                    fetched.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the first failure ends it: no more pieces are asked for
                raise
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return Direct(time.perf_counter() - started, time.process_time() - cpu)


@dataclass
class DfgetResult:
    wall: float  # the dfget process, start-up included
    elapsed: float  # dfget's own measure of the download
    task_id: str
    pieces: dict[str, int]


def start_dfget(reaper: Reaper, daemon: DaemonProcess, url: str, output: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "dfdaemon.cli.dfget", url, "-O", str(output), "-e", str(daemon.socket_path)]
    return reaper.spawn(
        [*command, *DFGET_FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def finish_dfget(proc: subprocess.Popen[bytes], started: float, timeout: float) -> DfgetResult:
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"dfget took longer than {timeout:.0f}s") from None
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"dfget failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    report = json.loads(out)
    return DfgetResult(wall, float(report["elapsed_seconds"]), str(report["task_id"]), dict(report["pieces"]))


def run_dfget(reaper: Reaper, daemon: DaemonProcess, url: str, output: Path, timeout: float) -> DfgetResult:
    started = time.perf_counter()
    return finish_dfget(start_dfget(reaper, daemon, url, output), started, timeout)


def dfget_timeout(size: int) -> float:
    return 120.0 + size / MB  # generous: at least 1 MB/s on a loaded machine


# --------------------------------------------------------------------------- throughput


def raw_server_main(argv: list[str]) -> int:
    """Hidden mode: serve pieces of a file over plain TCP (request: piece number; answer: length + bytes)."""
    path, piece_length = Path(argv[0]), int(argv[1])

    async def serve() -> None:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    try:
                        (number,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                    except asyncio.IncompleteReadError:
                        return
                    offset = number * piece_length
                    length = max(0, min(piece_length, size - offset))
                    # Read the piece off the page cache in a worker thread, as the daemon does.
                    data = await asyncio.to_thread(os.pread, fd, length, offset)
                    writer.write(_HEADER.pack(len(data)))
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        say(f"raw server listening on 127.0.0.1:{port}")
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(serve())
    return 0


@contextmanager
def running_raw_server(reaper: Reaper, workdir: Path, path: Path, piece_length: int) -> Iterator[int]:
    log_path = workdir / "raw-server.log"
    with log_path.open("wb") as log_file:
        proc = reaper.spawn(
            [sys.executable, str(Path(__file__).resolve()), RAW_SERVER, str(path), str(piece_length)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    try:
        yield int(wait_for_line(log_path, r"raw server listening on [^\s]+:(\d+)", proc).group(1))
    finally:
        stop(proc)


async def raw_copy(port: int, spans: list[ids.PieceSpan], concurrency: int) -> tuple[float, int]:
    """Fetch every piece from the raw server over ``concurrency`` connections; returns (seconds, bytes)."""
    limit = 2 * max(span.length for span in spans)
    connections = [await asyncio.open_connection("127.0.0.1", port, limit=limit) for _ in range(concurrency)]
    todo = iter(spans)
    received = 0

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        for span in todo:
            writer.write(_HEADER.pack(span.number))
            (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
            data = await reader.readexactly(length)
            if len(data) != span.length:
                raise RuntimeError(f"raw server sent {len(data)} bytes of piece {span.number}")
            received += len(data)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in connections))
        return time.perf_counter() - started, received
    finally:
        for _, writer in connections:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def grpc_copy(port: int, task_id: str, spans: list[ids.PieceSpan], concurrency: int) -> tuple[float, int]:
    """Fetch every piece with DownloadPiece, as a child daemon does; returns (seconds, bytes)."""
    client = GrpcParentClient(host_id="bench-p2p-child")
    parent = Parent(peer_id="bench-p2p-parent", host_id="bench-p2p-parent", ip="127.0.0.1", port=port)
    try:
        await client.download_piece(parent, task_id, spans[-1].number)  # connect before the clock starts
        todo = iter(spans)
        received = 0

        async def worker() -> None:
            nonlocal received
            for span in todo:
                content = (await client.download_piece(parent, task_id, span.number)).content
                assert not isinstance(content, IncomingPiece), "DownloadPiece answers hold the bytes"
                if len(content) != span.length:
                    raise RuntimeError(f"the daemon sent {len(content)} bytes of piece {span.number}")
                received += len(content)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, received
    finally:
        await client.close()


def drain(incoming: IncomingPiece) -> int:
    """In a worker thread: a piece's bytes received into this thread's block, as the daemon's writer receives them,
    and dropped; returns how many there were."""
    block, count = thread_block(), 0
    while count < incoming.length:
        count += incoming.read_into(block[: incoming.length - count])
    return count


async def vortex_copy(port: int, task_id: str, spans: list[ids.PieceSpan], concurrency: int) -> tuple[float, int]:
    """Fetch every piece over vortex TCP with the daemon's own client, as a child daemon does; (seconds, bytes)."""
    client = VortexClient(piece_timeout=120.0)
    todo = iter(spans)
    received = 0

    async def worker() -> None:
        nonlocal received
        for span in todo:
            piece = await client.download_piece("127.0.0.1", port, task_id, span.number)
            try:
                content = piece.content
                assert isinstance(content, IncomingPiece), "vortex pieces are received by the writing thread"
                count = await asyncio.to_thread(drain, content)
                if count != span.length:
                    raise RuntimeError(f"the daemon sent {count} bytes of piece {span.number}")
                received += count
            finally:
                piece.done()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, received


def throughput_benchmark(
    args: argparse.Namespace,
    reaper: Reaper,
    workdir: Path,
    source: Path,
    parent: DaemonProcess,
    task_id: str,
    size: int,
    report: Report,
) -> None:
    piece_length = ids.piece_length_for(size)
    spans = ids.pieces_for(size, piece_length)
    say(
        f"throughput: {len(spans)} pieces of {fmt_size(piece_length)}, {args.concurrency} in flight, "
        f"{args.rounds} round(s)"
    )
    if parent.vortex_port is None:
        raise RuntimeError("the parent daemon did not report its vortex port")
    vortex_port = parent.vortex_port
    copies: dict[str, Callable[[int], Any]] = {
        "raw": lambda raw_port: raw_copy(raw_port, spans, args.concurrency),
        "vortex": lambda _: vortex_copy(vortex_port, task_id, spans, args.concurrency),
        "grpc": lambda _: grpc_copy(parent.upload_port, task_id, spans, args.concurrency),
    }
    rates: dict[str, list[float]] = {kind: [] for kind in copies}
    with running_raw_server(reaper, workdir, source, piece_length) as raw_port:
        for round_number in range(args.rounds):
            # Rotate which goes first, so drift on a noisy machine hits all alike.
            kinds = list(copies)
            for kind in kinds[round_number % 3 :] + kinds[: round_number % 3]:
                seconds, nbytes = asyncio.run(copies[kind](raw_port))
                if nbytes != size:
                    raise RuntimeError(f"{kind} copy moved {nbytes} bytes, expected {size}")
                rates[kind].append(mb_per_s(nbytes, seconds))
            say(
                f"  round {round_number + 1}: vortex {rates['vortex'][-1]:,.0f} MB/s, "
                f"DownloadPiece {rates['grpc'][-1]:,.0f} MB/s, raw TCP {rates['raw'][-1]:,.0f} MB/s"
            )
    raw_rate = statistics.median(rates["raw"])
    for kind, name, target in (("vortex", "vortex", "0.7"), ("grpc", "DownloadPiece", "0.45")):
        rate = statistics.median(rates[kind])
        report.add(
            f"piece throughput: {name} / raw TCP",
            f"{rate:,.0f} MB/s",
            f"raw {raw_rate:,.0f} MB/s",
            rate / raw_rate,
            f"1.0 (higher is better; target >= {target})",
        )


# --------------------------------------------------------------------------- dfget and memory


@dataclass
class DfgetRound:
    """One round of ``dfget``: each download next to the direct download just before it."""

    b2s: DfgetResult
    direct_b2s: Direct | None  # None when only the downloads' side effects are wanted (no ``dfget`` benchmark)
    durable_b2s: Direct | None  # the direct download with a CRC and the daemon's syncs (the floor)
    b2s_cpu: float  # the parent daemon's CPU seconds during its download
    p2p: DfgetResult | None = None
    direct_p2p: Direct | None = None
    p2p_cpu: float = 0.0
    bare_p2p: Direct | None = None  # the same pieces from the same parent by plain threads (the floor)
    bare_unsynced: Direct | None = None  # the same, never synced


def pair_benchmarks(
    args: argparse.Namespace,
    selected: set[str],
    reaper: Reaper,
    workdir: Path,
    sockets: Path,
    origin: OriginProcess,
    size: int,
    report: Report,
) -> None:
    """Scheduler stub, a parent and a child daemon: dfget back-to-source, throughput, dfget P2P, memory."""
    source = origin.root / FILE_NAME
    timeout = dfget_timeout(size)
    out = workdir / "out"
    out.mkdir(parents=True)
    want_child = bool(selected & {"dfget", "memory"})
    rounds: list[DfgetRound] = []
    with ExitStack() as stack:
        scheduler_process = stack.enter_context(running_scheduler(workdir / "scheduler"))
        scheduler = scheduler_process.address
        parent = stack.enter_context(running_daemon(workdir / "parent", peer_extra(scheduler, sockets / "p.sock")))
        child = None
        if want_child:
            child = stack.enter_context(running_daemon(workdir / "child", peer_extra(scheduler, sockets / "c.sock")))
        wait_for_hosts(scheduler_process, 2 if want_child else 1)
        expected = sha256(source)
        parent_idle, child_idle, parent_peak = vm_bytes(parent.proc.pid, "VmHWM"), 0, 0
        if child is not None:
            child_idle = vm_bytes(child.proc.pid, "VmHWM")

        measuring = "dfget" in selected
        flooring = "floors" in selected

        def direct(url: str, *, durable: bool = False) -> Direct | None:
            """The direct download a dfget is measured against, each with primed memory (see ``prime_memory``)."""
            if not measuring:
                return None
            if not args.no_prime:
                prime_memory(out, size)
            result = direct_download(url, out / "direct", durable=durable)
            (out / "direct").unlink()
            if not args.no_prime:
                prime_memory(out, size)
            return result

        for number in range(args.rounds if measuring else 1):
            # Each round its own task (a query the origin ignores), so neither daemon has it cached.
            url = origin.url(FILE_NAME) + (f"?round={number}" if number else "")
            # The floors first: each dfget follows its own direct download, as without them.
            durable_b2s = direct(url, durable=True) if flooring else None
            direct_b2s = direct(url)
            cpu = cpu_seconds(parent.proc.pid)
            b2s = run_dfget(reaper, parent, url, out / f"parent-{number}.bin", timeout)
            one = DfgetRound(b2s, direct_b2s, durable_b2s, cpu_seconds(parent.proc.pid) - cpu)
            rounds.append(one)
            say(f"dfget back-to-source: {b2s.elapsed:.2f} s (process {b2s.wall:.2f} s), pieces {compact(b2s.pieces)}")
            if not b2s.pieces.get("BACK_TO_SOURCE"):
                report.note(f"the parent's dfget did not go back to source: {compact(b2s.pieces)}")
            verify(out / f"parent-{number}.bin", expected, "the parent's dfget")
            if number == 0:  # before the parent serves the throughput benchmark's pieces
                parent_peak = vm_bytes(parent.proc.pid, "VmHWM")

            if number == 0 and "throughput" in selected:
                throughput_benchmark(args, reaper, workdir, source, parent, b2s.task_id, size, report)
            if number == 0 and "repeat" in selected:
                repeat_benchmark(args, parent, origin.url(SMALL_FILE_NAME), report)
            if child is None:
                continue

            if flooring and parent.vortex_port is not None:
                for durable in (True, False):
                    if not args.no_prime:
                        prime_memory(out, size)
                    bare = bare_vortex_download(
                        parent.vortex_port, b2s.task_id, size, out / "bare", args.concurrency, durable=durable
                    )
                    verify(out / "bare", expected, "the bare vortex receiver")
                    (out / "bare").unlink()
                    if durable:
                        one.bare_p2p = bare
                    else:
                        one.bare_unsynced = bare
            one.direct_p2p = direct(url)
            cpu = cpu_seconds(child.proc.pid)
            one.p2p = p2p = run_dfget(reaper, child, url, out / f"child-{number}.bin", timeout)
            one.p2p_cpu = cpu_seconds(child.proc.pid) - cpu
            say(f"dfget P2P: {p2p.elapsed:.2f} s (process {p2p.wall:.2f} s), pieces {compact(p2p.pieces)}")
            if p2p.pieces.get("BACK_TO_SOURCE") or not p2p.pieces.get("REMOTE_PEER"):
                report.note(f"the child's dfget did not get the file from its parent: {compact(p2p.pieces)}")
            verify(out / f"child-{number}.bin", expected, "the child's dfget")
            if direct_b2s is not None and one.direct_p2p is not None:
                say(f"direct HTTP download: {direct_b2s.seconds:.2f} s, then {one.direct_p2p.seconds:.2f} s")
            if one.bare_p2p is not None and one.bare_unsynced is not None:
                say(f"bare vortex receiver: {one.bare_p2p.seconds:.2f} s, {one.bare_unsynced.seconds:.2f} s unsynced")
        child_peak = vm_bytes(child.proc.pid, "VmHWM") if child is not None else 0

    if "dfget" in selected and child is not None:
        report_dfget(rounds, report)
    if "floors" in selected:
        report_floors(rounds, report)
    if "memory" in selected:
        report.add(
            "peak RSS / file size, P2P child daemon",
            fmt_size(child_peak),
            f"file {fmt_size(size)}",
            child_peak / size,
            "far below 1",
        )
        report.add(
            "peak RSS / file size, back-to-source daemon",
            fmt_size(parent_peak),
            f"file {fmt_size(size)}",
            parent_peak / size,
            "far below 1",
        )
        report.note(
            f"peak RSS before the download (start-up): child {fmt_size(child_idle)}, parent {fmt_size(parent_idle)}"
        )


def report_dfget(rounds: list[DfgetRound], report: Report) -> None:
    """Medians over the rounds of each ratio, every ratio taken within its round (dfget next to its direct)."""
    series: dict[str, list[tuple[float, Direct, float]]] = {"P2P": [], "back-to-source": []}
    startups: list[float] = []
    for one in rounds:
        assert one.direct_b2s is not None, "dfget rounds always measure the direct download"
        series["back-to-source"].append((one.b2s.elapsed, one.direct_b2s, one.b2s_cpu))
        startups.append(one.b2s.wall - one.b2s.elapsed)
        if one.p2p is not None and one.direct_p2p is not None:
            series["P2P"].append((one.p2p.elapsed, one.direct_p2p, one.p2p_cpu))
            startups.append(one.p2p.wall - one.p2p.elapsed)
    for name, runs in series.items():
        ratios = [took / direct.seconds for took, direct, _ in runs]
        report.add(
            f"dfget {name} / direct HTTP",
            f"{statistics.median(took for took, _, _ in runs):.2f} s",
            f"direct {statistics.median(direct.seconds for _, direct, _ in runs):.2f} s",
            statistics.median(ratios),
            "1.0 (lower is better)",
        )
        # CPU seconds are far less disturbed by other load on the machine than wall time.
        cpu_ratios = [cpu / direct.cpu for _, direct, cpu in runs if direct.cpu]
        report.add(
            f"daemon CPU, {name} / direct client CPU",
            f"{statistics.median(cpu for _, _, cpu in runs):.2f} s",
            f"direct {statistics.median(direct.cpu for _, direct, _ in runs):.2f} s",
            statistics.median(cpu_ratios) if cpu_ratios else None,
            "lower is better",
        )
        if len(ratios) > 1:
            report.note(f"dfget {name} / direct in each round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios))
    startup = statistics.median(startups)
    report.note(f"dfget's own start-up and health check add about {startup:.2f} s per run (not in the ratios)")


def report_floors(rounds: list[DfgetRound], report: Report) -> None:
    """Each dfget against a plain client doing what it must (a durable direct download, a bare vortex receiver),
    and those against the plain direct download: the daemon's own cost, and the floor under each ratio."""
    b2s, durable, direct_b2s = [], [], []
    for one in rounds:
        if one.durable_b2s and one.direct_b2s:
            b2s.append(one.b2s.elapsed)
            durable.append(one.durable_b2s.seconds)
            direct_b2s.append(one.direct_b2s.seconds)
    p2p, bare, unsynced, direct = [], [], [], []
    for one in rounds:
        if one.p2p and one.bare_p2p and one.bare_unsynced and one.direct_p2p:
            p2p.append(one.p2p.elapsed)
            bare.append(one.bare_p2p.seconds)
            unsynced.append(one.bare_unsynced.seconds)
            direct.append(one.direct_p2p.seconds)
    floors = [
        ("dfget back-to-source / direct HTTP, CRCed and synced", b2s, durable, "plain", "1.0: no cost beyond it"),
        ("direct HTTP, CRCed and synced / direct HTTP", durable, direct_b2s, "direct", "what durability costs it"),
    ]
    if p2p:
        floors += [
            ("dfget P2P / bare vortex receiver", p2p, bare, "bare", "1.0: no cost beyond storing the pieces"),
            ("bare vortex receiver / direct HTTP", bare, direct, "direct", "the floor under dfget P2P / direct"),
            ("bare receiver, unsynced / direct HTTP", unsynced, direct, "direct", "the same floor without durability"),
        ]
    if b2s:
        for name, took, against, label, ideal in floors:
            report.add(
                name,
                f"{statistics.median(took):.2f} s",
                f"{label} {statistics.median(against):.2f} s",
                statistics.median(a / b for a, b in zip(took, against, strict=True)),
                ideal,
            )


async def sequential_downloads(socket_path: Path, url: str, numbers: range) -> None:
    """Download ``url?n=N`` for each N, one after the other, through the daemon's ``DownloadTask``."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        for number in numbers:
            request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=f"{url}?n={number}"))
            async for _ in stub.DownloadTask(request, timeout=120):
                pass


def repeat_benchmark(args: argparse.Namespace, daemon: DaemonProcess, url: str, report: Report) -> None:
    """RSS after a tenth of ``--repeat`` sequential downloads, then after all of them."""
    total: int = args.repeat
    early = max(1, total // 10)
    say(f"repeat: {total} sequential downloads of {fmt_size(SMALL_SIZE)}, RSS read after {early} and {total}")
    started = time.perf_counter()
    asyncio.run(sequential_downloads(daemon.socket_path, url, range(early)))
    rss_early = vm_bytes(daemon.proc.pid, "VmRSS")
    asyncio.run(sequential_downloads(daemon.socket_path, url, range(early, total)))
    rss_all = vm_bytes(daemon.proc.pid, "VmRSS")
    say(f"  {total} downloads in {time.perf_counter() - started:.1f} s")
    report.add(
        f"RSS after {total} / after {early} downloads",
        fmt_size(rss_all),
        f"{early}: {fmt_size(rss_early)}",
        rss_all / rss_early,
        "1.0 (target <= 1.10)",
    )


def compact(pieces: dict[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in pieces.items() if count) or "none"


def verify(path: Path, expected: str, what: str) -> None:
    if sha256(path) != expected:
        raise RuntimeError(f"{what} produced a file that differs from the origin's")


# --------------------------------------------------------------------------- peers


def peers_benchmark(
    args: argparse.Namespace,
    reaper: Reaper,
    workdir: Path,
    sockets: Path,
    origin: OriginProcess,
    size: int,
    report: Report,
) -> None:
    """``--peers`` daemons fetch the same file at once; how many times did the origin send it?"""
    peers: int = args.peers
    name = FILE_NAME
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free - DISK_RESERVE
    if peers * size > free:
        scaled = max(0, free // (peers + 1)) // MiB * MiB  # the smaller file needs its own origin copy
        if scaled < ids.MIN_DEFAULT_PIECE_LENGTH:
            report.note(f"peers: skipped, {fmt_size(free)} of disk cannot hold {peers} copies of even a small file")
            return
        report.note(
            f"peers: scaled down to a {fmt_size(scaled)} file: {peers} x {fmt_size(size)} would not fit "
            f"in the {fmt_size(free)} of disk left (keeping {fmt_size(DISK_RESERVE)} free)"
        )
        size, name = scaled, PEERS_FILE_NAME
        write_random_file(origin.root / name, size)
    # A task of its own (the origin ignores the query), so no daemon finds it cached.
    url = origin.url(name) + "?bench=peers"
    pieces = len(ids.pieces_for(size, ids.piece_length_for(size)))
    rate = 0
    if args.origin_seconds > 0:
        # A back-to-source daemon opens up to 8 piece requests at once; each is throttled to `rate`.
        rate = max(1, int(size / (args.origin_seconds * min(8, pieces))))
    out = workdir / "out"
    out.mkdir()
    expected = sha256(origin.root / name)
    with ExitStack() as stack:
        scheduler_process = stack.enter_context(running_scheduler(workdir / "scheduler"))
        scheduler = scheduler_process.address
        daemons = [
            stack.enter_context(running_daemon(workdir / f"peer{i}", peer_extra(scheduler, sockets / f"peer{i}.sock")))
            for i in range(peers)
        ]
        wait_for_hosts(scheduler_process, peers)
        say(
            f"peers: {peers} daemons fetch a {fmt_size(size)} file at once; origin "
            + (f"throttled to {rate / MB:.1f} MB/s per request" if rate else "not throttled")
        )
        if rate:
            origin.fault(name, rate=rate)
        before = origin.bytes_served(name)
        timeout = dfget_timeout(size) + args.origin_seconds
        started = time.perf_counter()
        procs = [start_dfget(reaper, daemon, url, out / f"copy-{i}") for i, daemon in enumerate(daemons)]
        results = [finish_dfget(proc, started, timeout) for proc in procs]
        wall = max(result.wall for result in results)
        served = origin.bytes_served(name) - before
        if rate:
            origin.fault(name)
        peaks = [vm_bytes(daemon.proc.pid, "VmHWM") for daemon in daemons]
    for i in range(peers):
        verify(out / f"copy-{i}", expected, f"peer {i}'s dfget")
    to_source = sum(1 for result in results if result.pieces.get("BACK_TO_SOURCE"))
    say(
        f"  origin served {fmt_size(served)} for a {fmt_size(size)} file; {to_source} peer(s) went to the origin; "
        f"wall {wall:.2f} s"
    )
    report.add(
        f"origin bytes / file size, {peers} peers at once",
        fmt_size(served),
        f"file {fmt_size(size)}",
        served / size,
        "1.0 (the origin hit once)",
    )
    report.add(
        f"wall time, {peers} peers at once",
        f"{wall:.2f} s",
        f"{peers * size / MB / wall:,.0f} MB/s in all",
        None,
        "",
    )
    if rate:
        floor = size / (rate * min(8, pieces))
        report.note(f"peers: the origin was throttled, so no peer could finish in under about {floor:.1f} s")
    report.note(f"peers: the daemons' peak RSS was {fmt_size(min(peaks))} to {fmt_size(max(peaks))}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"any of {', '.join(BENCHMARKS)} (default: all but floors)",
    )
    parser.add_argument("--size", default=None, help="file size, e.g. 1GiB, 256MiB, 50MB (default 1GiB)")
    parser.add_argument("--quick", action="store_true", help="a small file and one round: a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=None, help="throughput and dfget rounds (default 3, 1 with --quick)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="pieces in flight in throughput (default 8)")
    parser.add_argument("--peers", type=int, default=8, help="daemons in the peers benchmark (default 8)")
    parser.add_argument(
        "--origin-seconds",
        type=float,
        default=None,
        help="how long the throttled origin takes alone in peers (default 8, 2 with --quick; 0: no throttle)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="downloads in repeat (default 500, 50 with --quick)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary directory goes")
    parser.add_argument(
        "--no-prime", action="store_true", help="do not prime memory before each measured download (see prime_memory)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    try:
        args.size_bytes = parse_size(args.size) if args.size is not None else QUICK_SIZE if args.quick else GiB
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    if args.size_bytes < 1:
        parser.error("--size must be at least one byte")
    args.rounds = args.rounds if args.rounds is not None else 1 if args.quick else 3
    args.origin_seconds = args.origin_seconds if args.origin_seconds is not None else 2.0 if args.quick else 8.0
    args.repeat = args.repeat if args.repeat is not None else 50 if args.quick else 500
    if min(args.rounds, args.concurrency, args.peers, args.repeat) < 1 or args.origin_seconds < 0:
        parser.error("--rounds, --concurrency, --peers and --repeat must be positive, --origin-seconds not negative")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def catch_stop_signals() -> None:
    """Ctrl-C and SIGTERM both unwind through the cleanup, even when started with SIGINT ignored (``cmd &``)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def run_reported(name: str, run: Callable[[], None], report: Report) -> int:
    """Run a benchmark script's body, print its table, and turn an interruption or failure into an exit status."""
    started = time.perf_counter()
    try:
        run()
    except KeyboardInterrupt:
        say(f"{name}: interrupted; every process it started has been stopped")
        return 130
    except (RuntimeError, AssertionError) as exc:  # a failed fetch or check, or a process that did not start
        say(f"{name}: failed: {exc}")
        return 1
    report.print_table()
    say(f"total {time.perf_counter() - started:.0f} s")
    return 0


def run(args: argparse.Namespace, selected: set[str], report: Report) -> None:
    size: int = args.size_bytes
    reaper = Reaper()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="bench-p2p-", dir=args.dir))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        sockets = Path(tempfile.mkdtemp(prefix="bp2p-"))  # short: unix socket paths are limited
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        stack.callback(reaper.stop_all)

        pair = bool(selected & {"throughput", "dfget", "memory", "repeat"})
        # The origin file, two caches and a direct copy (every dfget output is a hard link into a cache).
        rounds = args.rounds if "dfget" in selected else 1
        need = ((2 + 2 * rounds) if pair else 1) * size + DISK_RESERVE
        free = shutil.disk_usage(workdir).free
        if free < need:
            raise SystemExit(
                f"bench_p2p: {fmt_size(free)} of free disk under {workdir.parent} is not enough for "
                f"--size {fmt_size(size)} (needs about {fmt_size(need)}); try a smaller --size or another --dir"
            )
        files = workdir / "files"
        files.mkdir()
        say(f"writing a {fmt_size(size)} file of random bytes for the origin")
        write_random_file(files / FILE_NAME, size)
        write_random_file(files / SMALL_FILE_NAME, SMALL_SIZE)
        origin = stack.enter_context(running_origin(files))

        if pair:
            pair_dir = workdir / "pair"
            try:
                pair_benchmarks(args, selected, reaper, pair_dir, sockets, origin, size, report)
            finally:
                shutil.rmtree(pair_dir, ignore_errors=True)  # free the two caches before the peers fill theirs
        if "peers" in selected:
            peers_benchmark(args, reaper, workdir / "peers", sockets, origin, size, report)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RAW_SERVER]:
        return raw_server_main(argv[1:])
    args = parse_args(argv)
    selected = set(args.benchmarks or DEFAULT_BENCHMARKS)
    if "floors" in selected:  # (measured beside the dfget rounds)
        selected.add("dfget")
    catch_stop_signals()
    report = Report()
    say(
        f"bench_p2p: {', '.join(b for b in BENCHMARKS if b in selected)} with a {fmt_size(args.size_bytes)} file "
        f"on {os.cpu_count()} CPUs"
    )
    return run_reported("bench_p2p", lambda: run(args, selected, report), report)


if __name__ == "__main__":
    sys.exit(main())
