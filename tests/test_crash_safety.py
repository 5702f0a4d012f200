"""SIGKILL in the middle of storing and of evicting: after a restart metadata and files agree.

Holders survive, half-done evictions are finished, no partially written piece is ever served, and an
interrupted download resumes from the pieces that were committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfdaemon.storage import Storage, TaskState
from tests.storage_support import fill, seeded_bytes
from tests.support import REPO_ROOT, dfget, run_dfctl, running_daemon, running_origin

MB = 1_000_000
pytestmark = pytest.mark.slow


def consistency(storage_dir: Path) -> dict[str, int]:
    """Open the store offline and check it against the disk; returns bytes per task."""

    async def check() -> dict[str, int]:
        storage = Storage(storage_dir)
        await storage.open()
        try:
            tasks = await storage.list_tasks()
            assert all(task.state is not TaskState.EVICTING for task in tasks)
            files = {path.name for shard in (storage_dir / "content" / "tasks").iterdir() for path in shard.iterdir()}
            assert files == {task.id for task in tasks}
            for task in tasks:
                for piece in await storage.pieces(task.id):
                    await storage.read_piece(task.id, piece.number)  # raises if the CRC does not match
            return {task.id: storage.task_bytes(task.id) for task in tasks}
        finally:
            await storage.close()

    return asyncio.run(check())


def wait_for_committed_pieces(database: Path, at_least: int, timeout: float = 60.0) -> None:
    """Poll the daemon's metadata (WAL lets another process read it) until enough pieces are visible."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            if db.execute("SELECT COUNT(*) FROM pieces").fetchone()[0] >= at_least:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} pieces were committed within {timeout:.0f}s")


def _count_files(root: Path) -> int:
    """Files under ``root`` while another process deletes them (vanishing directories are skipped)."""
    return sum(len(files) for _, _, files in os.walk(root))


def test_sigkill_while_storing_then_resume(tmp_path: Path) -> None:
    data = seeded_bytes("test_crash_safety-1", 24 * MB)
    with running_origin(tmp_path / "files") as origin:
        (origin.root / "layer.bin").write_bytes(data)
        (origin.root / "kept.bin").write_bytes(seeded_bytes("kept", 1000))
        workdir = tmp_path / "daemon"
        with running_daemon(workdir, {"download": {"concurrentPieceCount": 2}}) as daemon:
            kept = dfget(daemon, origin.url("kept.bin"), tmp_path / "kept.bin", "--json")
            kept_id = json.loads(kept.stdout)["task_id"]
            assert (
                run_dfctl(daemon, "--json", "use", "acquire", "--holder", "container:default/app", kept_id).returncode
                == 0
            )
            origin.fault("layer.bin", rate=3 * MB)
            client = subprocess.Popen(
                [sys.executable, "-m", "dfdaemon.cli.dfget", origin.url("layer.bin"), "-O", str(tmp_path / "out"),
                 "-e", str(daemon.socket_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT,
            )  # fmt: skip
            # Kill once some 4 MiB pieces are committed while others are still being written.
            wait_for_committed_pieces(workdir / "storage" / "metadata.db", at_least=2)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            client.wait(30)
            assert client.returncode != 0
            assert not (tmp_path / "out").exists()
        origin.fault("layer.bin")
        served_before = origin.bytes_served("layer.bin")

        sizes = consistency(workdir / "storage")
        assert kept_id in sizes

        with running_daemon(workdir) as daemon:
            holds = json.loads(run_dfctl(daemon, "--json", "use", "ls").stdout)["holds"]
            assert [(h["task_id"], h["holder"]) for h in holds] == [(kept_id, "container:default/app")]
            resumed = dfget(daemon, origin.url("layer.bin"), tmp_path / "out", "--json")
            assert resumed.returncode == 0, resumed.stderr
            report = json.loads(resumed.stdout)
        assert hashlib.sha256((tmp_path / "out").read_bytes()).digest() == hashlib.sha256(data).digest()
        assert report["pieces"]["LOCAL_PEER"] >= 1, report  # committed pieces were reused
        assert origin.bytes_served("layer.bin") - served_before < len(data)
    consistency(workdir / "storage")


def test_sigkill_while_evicting(tmp_path: Path) -> None:
    workdir = tmp_path / "daemon"
    storage_dir = workdir / "storage"

    async def prefill() -> tuple[list[str], list[str]]:
        storage = Storage(storage_dir)
        await storage.open()
        try:
            held = [(await fill(storage, f"held-{i}", 20_000)).id for i in range(5)]
            await storage.acquire("container:default/keep", held)
            loose = [(await fill(storage, f"loose-{i}", 20_000, piece_length=8192)).id for i in range(1500)]
            return held, loose
        finally:
            await storage.close()

    held, loose = asyncio.run(prefill())
    config = {"gc": {"interval": "1h", "policy": {"diskThreshold": "1MB", "gracePeriod": "0s"}}}
    with running_daemon(workdir, config) as daemon:
        gc_run = subprocess.Popen(
            [sys.executable, "-m", "dfdaemon.cli.dfctl", "-e", str(daemon.socket_path), "gc", "run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
        )  # fmt: skip
        # Kill once the run is under way: some tasks are gone, most are not.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _count_files(storage_dir / "content" / "tasks") < len(held) + len(loose) - 20:
                break
            time.sleep(0.005)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        gc_run.wait(30)

    sizes = consistency(storage_dir)
    assert set(held) <= set(sizes)
    assert len(held) < len(sizes) < len(held) + len(loose)  # killed in the middle of the run
    with running_daemon(workdir, config) as daemon:
        holds = json.loads(run_dfctl(daemon, "--json", "use", "ls", "--holder", "container:default/keep").stdout)[
            "holds"
        ]
        assert sorted(h["task_id"] for h in holds) == sorted(held)
        run = json.loads(run_dfctl(daemon, "--json", "gc", "run").stdout)
        assert not set(held) & {e["task_id"] for e in run["evicted"]}
    sizes = consistency(storage_dir)
    assert set(sizes) == set(held)


def wait_for_pause(signal_file: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until the daemon's pause hook (DFDAEMON_TEST_PAUSE_AT) says it stopped at its point."""
    deadline = time.monotonic() + timeout
    while not signal_file.exists():
        assert proc.poll() is None, f"the daemon exited with {proc.returncode} before pausing"
        assert time.monotonic() < deadline, "the daemon never reached its pause point"
        time.sleep(0.02)


def committed(storage_dir: Path) -> dict[str, list[tuple[int, bytes]]]:
    """Per task, each committed piece's number and bytes, read (and CRC-checked) offline."""

    async def read() -> dict[str, list[tuple[int, bytes]]]:
        storage = Storage(storage_dir)
        await storage.open()
        try:
            out: dict[str, list[tuple[int, bytes]]] = {}
            for task in await storage.list_tasks():
                for piece in await storage.pieces(task.id):
                    _, data = await storage.read_piece(task.id, piece.number)
                    out.setdefault(task.id, []).append((piece.offset, data))
            return out
        finally:
            await storage.close()

    return asyncio.run(read())


def test_sigkill_between_a_pieces_bytes_and_its_commit(tmp_path: Path) -> None:
    """The daemon stops (test hook) at its second batch commit, the batch's bytes on disk and no rows yet, and is
    killed there: after a restart only the first batch's pieces exist, all the origin's bytes, and are reused.

    The origin is throttled so that pieces arrive one by one and each batch holds few of them."""
    data = random.Random("commit").randbytes(6 * MB)
    workdir = tmp_path / "daemon"
    paused = tmp_path / "paused"
    env = {"DFDAEMON_TEST_PAUSE_AT": "commit:2", "DFDAEMON_TEST_PAUSE_FILE": str(paused)}
    with running_origin(tmp_path / "files") as origin:
        (origin.root / "layer.bin").write_bytes(data)
        origin.fault("layer.bin", rate=2 * MB)
        args = ("--piece-length", "1MiB", "--json")
        with running_daemon(workdir, {"download": {"concurrentPieceCount": 2}}, env=env) as daemon:
            client = subprocess.Popen(
                [sys.executable, "-m", "dfdaemon.cli.dfget", origin.url("layer.bin"), "-O", str(tmp_path / "out"),
                 "-e", str(daemon.socket_path), *args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
            )  # fmt: skip
            wait_for_pause(paused, daemon.proc)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            client.wait(30)
        consistency(workdir / "storage")
        (pieces,) = committed(workdir / "storage").values()
        assert 1 <= len(pieces) < 6  # the first batch only: the second was on disk but never committed
        assert all(content == data[offset : offset + len(content)] for offset, content in pieces)
        origin.fault("layer.bin")  # cleared: the rest comes at full speed
        with running_daemon(workdir) as daemon:
            resumed = dfget(daemon, origin.url("layer.bin"), tmp_path / "out", *args)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["pieces"]["LOCAL_PEER"] == len(pieces)
    assert hashlib.sha256((tmp_path / "out").read_bytes()).digest() == hashlib.sha256(data).digest()
    consistency(workdir / "storage")


def test_sigkill_with_a_task_marked_evicting_then_restart_finishes_it(tmp_path: Path) -> None:
    """The daemon stops (test hook) right after marking its first victim evicting, before deleting anything, and
    is killed there; the restarted daemon finishes that eviction and leaves the rest intact."""
    workdir = tmp_path / "daemon"
    storage_dir = workdir / "storage"
    paused = tmp_path / "paused"

    async def prefill() -> tuple[list[str], list[str]]:
        storage = Storage(storage_dir)
        await storage.open()
        try:
            held = [(await fill(storage, f"held-{i}", 20_000)).id for i in range(2)]
            await storage.acquire("container:default/keep", held)
            loose = [(await fill(storage, f"loose-{i}", 500_000)).id for i in range(3)]  # over the 1MB quota
            return held, loose
        finally:
            await storage.close()

    held, loose = asyncio.run(prefill())
    config = {"gc": {"interval": "1h", "policy": {"diskThreshold": "1MB", "gracePeriod": "0s"}}}
    env = {"DFDAEMON_TEST_PAUSE_AT": "evict", "DFDAEMON_TEST_PAUSE_FILE": str(paused)}
    with running_daemon(workdir, config, env=env) as daemon:
        gc_run = subprocess.Popen(
            [sys.executable, "-m", "dfdaemon.cli.dfctl", "-e", str(daemon.socket_path), "gc", "run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
        )  # fmt: skip
        wait_for_pause(paused, daemon.proc)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        gc_run.wait(30)

    with contextlib.closing(sqlite3.connect(storage_dir / "metadata.db")) as db:
        evicting = [row[0] for row in db.execute("SELECT id FROM tasks WHERE state = 'evicting'")]
    assert len(evicting) == 1 and evicting[0] in loose  # killed with the victim marked, its bytes still there
    (victim,) = evicting
    assert (storage_dir / "content" / "tasks" / victim[:3] / victim).is_file()

    with running_daemon(workdir, config):
        pass  # start-up finishes the eviction
    sizes = consistency(storage_dir)
    assert set(sizes) == set(held) | set(loose) - {victim}
