"""Faults: the disk filling up mid-piece, SIGKILL again and again, the scheduler going away, a parent stalling."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from dfdaemon import ids
from dfdaemon.storage import Storage, TaskState
from tests.storage_support import seeded_bytes
from tests.support import (
    REPO_ROOT,
    OriginProcess,
    SchedulerProcess,
    dfctl_json,
    dfget,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
    wait_for_line,
)

MB = 1_000_000
pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_store(storage_dir: Path) -> dict[str, int]:
    """Open the store offline: no half-evicted task, files and rows agree, every visible piece verifies."""

    async def check() -> dict[str, int]:
        storage = Storage(storage_dir)
        await storage.open()
        try:
            pieces = {}
            for task in await storage.list_tasks():
                assert task.state is not TaskState.EVICTING
                assert storage.content.path(task.id).is_file()
                for piece in await storage.pieces(task.id):
                    await storage.read_piece(task.id, piece.number)  # raises on a CRC mismatch
                pieces[task.id] = len(await storage.pieces(task.id))
            return pieces
        finally:
            await storage.close()

    return asyncio.run(check())


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real, small tmpfs mounted for the test (root only); skips with the reason where mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or 'mount failed'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_mid_piece_fails_cleanly_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    with ExitStack() as stack:
        disk = stack.enter_context(small_filesystem(tmp_path / "disk", "24m"))
        origin = stack.enter_context(running_origin(tmp_path / "files"))
        (origin.root / "layer.bin").write_bytes(seeded_bytes("test_faults-1", 16 * MB))
        (origin.root / "small.bin").write_bytes(seeded_bytes("test_faults-2", 1 * MB))
        origin.fault("layer.bin", rate=4 * MB)
        config = {"storage": {"dir": str(disk / "storage")}, "download": {"concurrentPieceCount": 2}}
        daemon = stack.enter_context(running_daemon(tmp_path / "daemon", config))
        client = subprocess.Popen(
            [sys.executable, "-m", "dfdaemon.cli.dfget", origin.url("layer.bin"), "-O", str(tmp_path / "layer.bin"),
             "-e", str(daemon.socket_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        wait_for_line(daemon.log_path, r"download started task=", daemon.proc)
        time.sleep(0.5)
        # Another program fills the filesystem while the pieces are being written.
        filler = disk / "filler"
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1024 * 1024))
                    f.flush()
            except OSError:
                pass
        _, stderr = client.communicate(timeout=60)
        assert client.returncode == 1
        assert "RESOURCE_EXHAUSTED" in stderr and "no space left" in stderr
        assert not (tmp_path / "layer.bin").exists()
        wait_for_line(daemon.log_path, r"evicted task \w+ reason=failed", daemon.proc)
        filler.unlink()

        small = dfget(daemon, origin.url("small.bin"), tmp_path / "small.bin")
        assert small.returncode == 0, small.stderr
        assert sha256(tmp_path / "small.bin") == sha256(origin.root / "small.bin")
        runs = dfctl_json(daemon, "gc", "report", "--limit", "10")["runs"]
        assert any(run["trigger"] == "disk-full" for run in runs)
        daemon.stop()
        assert daemon.proc.returncode == 0
        verify_store(disk / "storage")


def test_sigkill_at_random_points_twenty_times(tmp_path: Path) -> None:
    rng = random.Random(20)
    data = seeded_bytes("test_faults-3", 40 * MB)
    workdir = tmp_path / "daemon"
    with running_origin(tmp_path / "files") as origin:
        (origin.root / "model.bin").write_bytes(data)
        origin.fault("model.bin", rate=3 * MB)
        for _ in range(20):
            with running_daemon(workdir, {"download": {"concurrentPieceCount": 2}}) as daemon:
                client = subprocess.Popen(
                    [sys.executable, "-m", "dfdaemon.cli.dfget", origin.url("model.bin"), "-O",
                     str(tmp_path / "model.bin"), "-e", str(daemon.socket_path), "--overwrite"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
                )  # fmt: skip
                time.sleep(rng.uniform(0.05, 1.2))
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait()
                client.wait(30)
            verify_store(workdir / "storage")
        origin.fault("model.bin")
        with running_daemon(workdir) as daemon:
            done = dfget(daemon, origin.url("model.bin"), tmp_path / "final.bin", "--json")
        assert done.returncode == 0, done.stderr
        assert hashlib.sha256((tmp_path / "final.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        # Committed pieces survive every kill: at most the pieces in flight (2 of 4 MiB) are fetched again per kill.
        assert origin.bytes_served("model.bin") <= len(data) + 20 * 2 * 4 * 1024 * 1024


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    (root / "one.bin").write_bytes(seeded_bytes("test_faults-4", 12 * MB))
    (root / "two.bin").write_bytes(seeded_bytes("test_faults-5", 12 * MB))
    with running_origin(root) as running:
        yield running


def test_scheduler_down_at_start_then_back(tmp_path: Path, origin: OriginProcess) -> None:
    with running_scheduler(tmp_path / "probe") as probe:
        address = probe.address  # a free port, closed again once the probe stops
    config = {"scheduler": {"addrs": [address], "announceInterval": "1s", "scheduleTimeout": "2s"}}
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(tmp_path / "a", config))
        alone = dfget(first, origin.url("one.bin"), tmp_path / "one.bin", "--json")
        assert alone.returncode == 0, alone.stderr  # back to source while the scheduler is away
        assert sha256(tmp_path / "one.bin") == sha256(origin.root / "one.bin")

        host, port = address.rsplit(":", 1)
        log_path = tmp_path / "scheduler.log"
        with log_path.open("wb") as log_file:
            scheduler_proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler_stub", "--listen", f"{host}:{port}"],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )  # fmt: skip
        stack.callback(lambda: (scheduler_proc.terminate(), scheduler_proc.wait(10)))
        wait_for_line(log_path, r"scheduler listening on", scheduler_proc)
        # The daemon re-announces itself: the stub's record of its host joining.
        wait_for_line(log_path, r"host \S+ joined at 127\.0\.0\.1:\d+ ", scheduler_proc, timeout=15)
        assert dfget(first, origin.url("two.bin"), tmp_path / "two-a.bin").returncode == 0
        second = stack.enter_context(running_daemon(tmp_path / "b", config))
        shared = dfget(second, origin.url("two.bin"), tmp_path / "two-b.bin", "--json")
        assert shared.returncode == 0, shared.stderr
        assert json.loads(shared.stdout)["pieces"]["REMOTE_PEER"] > 0


def test_scheduler_gone_mid_download(tmp_path: Path, origin: OriginProcess) -> None:
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        config = {"scheduler": {"addrs": [scheduler.address], "announceInterval": "1s"}}
        daemon = stack.enter_context(running_daemon(tmp_path / "a", config))
        wait_for_hosts(scheduler, 1)
        origin.fault("one.bin", rate=4 * MB)
        client = subprocess.Popen(
            [sys.executable, "-m", "dfdaemon.cli.dfget", origin.url("one.bin"), "-O", str(tmp_path / "one.bin"),
             "-e", str(daemon.socket_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        time.sleep(1.0)
        scheduler.proc.send_signal(signal.SIGKILL)
        _, stderr = client.communicate(timeout=60)
        assert client.returncode == 0, stderr
        assert sha256(tmp_path / "one.bin") == sha256(origin.root / "one.bin")


def test_a_stalled_parent_times_out_instead_of_hanging(tmp_path: Path, origin: OriginProcess) -> None:
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        # The stub forgets a host after two announce intervals without a word; announcing every 30 s, the stopped
        # parent stays known (and so is offered to the child) for the whole test.
        config = {
            "scheduler": {"addrs": [scheduler.address], "announceInterval": "30s"},
            "download": {"pieceTimeout": "2s"},
        }
        parent = stack.enter_context(running_daemon(tmp_path / "parent", config))
        child = stack.enter_context(running_daemon(tmp_path / "child", config))
        wait_for_hosts(scheduler, 2)
        assert dfget(parent, origin.url("one.bin"), tmp_path / "parent.bin").returncode == 0
        parent.proc.send_signal(signal.SIGSTOP)  # alive but answering nothing
        stack.callback(lambda: parent.proc.send_signal(signal.SIGCONT))
        started = time.monotonic()
        out = dfget(child, origin.url("one.bin"), tmp_path / "child.bin")
        elapsed = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        assert sha256(tmp_path / "child.bin") == sha256(origin.root / "one.bin")
        assert elapsed < 60
        # The child gave up on the stalled parent and told the scheduler so: the stub's record names both peers.
        task_id = ids.task_id(origin.url("one.bin"))
        parent_peer, child_peer = registered_peers(scheduler, task_id)
        wait_for_line(scheduler.log_path, failure_record(task_id, child_peer, parent_peer), scheduler.proc)


def registered_peers(scheduler: SchedulerProcess, task_id: str) -> tuple[str, str]:
    """The peer the stub sent back to source for ``task_id`` and the one it then gave that peer as parent."""
    log = scheduler.log_path.read_text()
    first = re.search(rf"register peer (\S+) of task {task_id} on host \S+: back to source\b", log)
    assert first is not None, log
    second = re.search(
        rf"register peer (\S+) of task {task_id} on host \S+: normal, parents \[{re.escape(first[1])}@", log
    )
    assert second is not None, log
    return first[1], second[1]


def failure_record(task_id: str, peer: str, parent: str) -> str:
    """The stub's record of ``peer`` reporting ``parent`` failing a piece (``-`` for none in particular, as when it
    made no progress at all), temporarily."""
    return (
        rf"piece failed: task={task_id} peer={re.escape(peer)} parent={re.escape(parent)} piece=(?:\d+|-) "
        r"temporary=true\b"
    )
