"""Peer to peer between real processes: the scheduler stub, several daemons and a loopback origin.

The origin is hit about once per file; children fetch pieces from parents with SyncPieces and
DownloadPiece; a dead or lying parent is reported and avoided, and the child still finishes.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from tests.hostile_parent import PEER_ID, running_hostile_parent
from tests.storage_support import seeded_bytes
from tests.support import (
    REPO_ROOT,
    DaemonProcess,
    OriginProcess,
    SchedulerProcess,
    cluster,
    dfget,
    merge,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
)

MB = 1_000_000
pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    (root / "model.bin").write_bytes(seeded_bytes("test_p2p_process-1", 40 * MB + 17))
    with running_origin(root) as running:
        yield running


def fetch_all(daemons: list[DaemonProcess], url: str, out: Path, prefix: str = "copy") -> list[dict[str, object]]:
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def run(index: int, daemon: DaemonProcess) -> None:
        results[index] = dfget(daemon, url, out / f"{prefix}-{index}", "--json")

    threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(daemons)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in sorted(results.items()):
        assert result.returncode == 0, f"peer {index}: {result.stderr}"
    return [json.loads(results[i].stdout) for i in sorted(results)]


def test_first_peer_goes_to_source_the_others_share(origin: OriginProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    size = 40 * MB + 17
    with cluster(tmp_path, 4) as (_, daemons):
        first = fetch_all(daemons[:1], origin.url("model.bin"), out, "first")[0]
        assert first["pieces"]["BACK_TO_SOURCE"] > 0  # type: ignore[index]
        reports = fetch_all(daemons[1:], origin.url("model.bin"), out)
    expected = sha256(origin.root / "model.bin")
    assert all(sha256(out / f"copy-{i}") == expected for i in range(3))
    for report in reports:
        pieces = report["pieces"]
        assert pieces["BACK_TO_SOURCE"] == 0 and pieces["REMOTE_PEER"] > 0, report
    assert origin.bytes_served("model.bin") <= 1.05 * size


def test_four_peers_at_once_hit_the_origin_about_once(origin: OriginProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    size = 40 * MB + 17
    origin.fault("model.bin", rate=40 * MB)  # slow enough that the peers overlap
    with cluster(tmp_path, 4) as (_, daemons):
        reports = fetch_all(daemons, origin.url("model.bin"), out)
    expected = sha256(origin.root / "model.bin")
    assert all(sha256(out / f"copy-{i}") == expected for i in range(4))
    assert sum(1 for r in reports if r["pieces"]["BACK_TO_SOURCE"]) == 1  # type: ignore[index]
    assert origin.bytes_served("model.bin") <= 1.05 * size


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    """The contents of ``path`` once a process has created it; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process exited with {proc.returncode} before creating {path.name}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)
    return path.read_text()


def download_from_source(daemon: DaemonProcess, url: str) -> None:
    """DownloadTask with need_back_to_source: the daemon registers and goes straight to the origin."""
    with grpc.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        download = common_pb2.Download(url=url, need_back_to_source=True)
        for _ in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=120):
            pass


def test_a_parent_killed_mid_piece_is_replaced_by_another_parent(origin: OriginProcess, tmp_path: Path) -> None:
    """The only parent (a real process) sends 100 000 bytes of piece 3, says so and stalls; another parent
    appears, the stalled one is killed, and the child takes piece 3 from the new parent, none from the origin."""
    size, target, sent = 40 * MB + 17, 3, 100_000
    url = origin.url("model.bin")
    task_id = ids.task_id(url)
    paused = tmp_path / "paused"
    out = tmp_path / "out"
    out.mkdir()
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        config = merge(peer_config(scheduler), {"download": {"pieceTimeout": "120s"}})  # the kill ends the piece
        good, child = (stack.enter_context(running_daemon(tmp_path / name, config)) for name in ("good", "child"))
        wait_for_hosts(scheduler, 2)
        victim = stack.enter_context(
            running_hostile_parent(
                tmp_path / "victim", scheduler, url, task_id, origin.root / "model.bin", ids.piece_length_for(size),
                "stall", target, "--vortex", "--pause-after", str(sent), "--progress-file", str(paused),
            )
        )  # fmt: skip
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", dfget(child, url, out / "child", "--json")))
        thread.start()
        assert wait_for_file(paused, victim.proc) == f"{sent}\n"  # those bytes of piece 3 went to the child
        download_from_source(good, url)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        thread.join()
        assert result["r"].returncode == 0, result["r"].stderr
        assert blamed(scheduler, task_id, PEER_ID, target) == ["true"]
    assert sha256(out / "child") == sha256(origin.root / "model.bin")
    pieces = json.loads(result["r"].stdout)["pieces"]
    assert pieces["BACK_TO_SOURCE"] == 0 and pieces["REMOTE_PEER"] == len(
        ids.pieces_for(size, ids.piece_length_for(size))
    )
    assert origin.bytes_served("model.bin") <= 1.05 * size  # the good parent's one trip


def blamed(scheduler: SchedulerProcess, task_id: str, parent_id: str, number: int) -> list[str]:
    """The temporary flags of every report the stub recorded of ``parent_id`` failing piece ``number``."""
    pattern = rf"piece failed: task={task_id} peer=\S+ parent={re.escape(parent_id)} piece={number} temporary=(\w+)"
    return re.findall(pattern, scheduler.log_path.read_text())


def test_a_corrupt_parent_is_detected_and_avoided(origin: OriginProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with cluster(tmp_path, 3) as (scheduler, daemons):
        first = fetch_all(daemons[:1], origin.url("model.bin"), out, "first")[0]
        task_id = str(first["task_id"])
        content = daemons[0].storage_dir / "content" / "tasks" / task_id[:3] / task_id
        with content.open("r+b") as f:  # flip bytes inside piece 1 on the parent's disk
            f.seek(5 * 1024 * 1024)
            f.write(bytes(b ^ 0xFF for b in f.read(64)))
        served = origin.bytes_served("model.bin")
        second = dfget(daemons[1], origin.url("model.bin"), out / "second", "--json")
        assert second.returncode == 0, second.stderr
        assert sha256(out / "second") == sha256(origin.root / "model.bin")
        # The child caught the flipped bytes of piece 1 and blamed the parent for that piece: the stub's record.
        assert blamed(scheduler, task_id, str(first["peer_id"]), 1) == ["true"]
        # The corrupt piece came from elsewhere (the origin), not from the parent.
        assert origin.bytes_served("model.bin") - served <= 8 * 1024 * 1024
        # A third peer gets the file whole: piece 1 from the second peer or the origin.
        third = dfget(daemons[2], origin.url("model.bin"), out / "third", "--json")
        assert third.returncode == 0, third.stderr
        assert sha256(out / "third") == sha256(origin.root / "model.bin")


def test_deletion_and_shutdown_are_told_to_the_scheduler(origin: OriginProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with cluster(tmp_path, 2) as (scheduler, daemons):
        first = fetch_all(daemons[:1], origin.url("model.bin"), out, "first")[0]
        task_id = str(first["task_id"])
        stat = scheduler.stub().StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id), timeout=5)
        assert stat.peer_count == 1 and stat.has_available_peer
        removed = subprocess.run(
            [sys.executable, "-m", "dfdaemon.cli.dfctl", "-e", str(daemons[0].socket_path), "task", "rm", task_id],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
        assert removed.returncode == 0, removed.stderr
        with pytest.raises(grpc.RpcError) as gone:
            scheduler.stub().StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id), timeout=5)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        # With the only copy gone, the next peer is sent back to source, not to the peer that deleted it.
        second = fetch_all(daemons[1:], origin.url("model.bin"), out, "second")[0]
        assert second["pieces"]["BACK_TO_SOURCE"] > 0  # type: ignore[index]

        daemons[1].stop()
        hosts = scheduler.stub().ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts
        assert [host.hostname for host in hosts] == [daemons[0].storage_dir.parent.name]


def test_disable_back_to_source_without_parents_fails_clearly(origin: OriginProcess, tmp_path: Path) -> None:
    with cluster(tmp_path, 1) as (_, daemons):
        out = dfget(daemons[0], origin.url("model.bin"), tmp_path / "model.bin", "--disable-back-to-source")
    assert out.returncode == 1
    assert out.stderr.startswith("dfget: download failed:")
    assert "back to source" in out.stderr
    assert not (tmp_path / "model.bin").exists()


def test_stat_task_shows_the_cluster_view(origin: OriginProcess, tmp_path: Path) -> None:
    with cluster(tmp_path, 2) as (_, daemons):
        reports = fetch_all(daemons, origin.url("model.bin"), tmp_path, "copy")
        channel = grpc.insecure_channel(f"unix:{daemons[0].socket_path}")
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        task = stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=str(reports[0]["task_id"])), timeout=10)
    assert task.peer_count == 2
    assert task.content_length == 40 * MB + 17
    assert task.state == "Succeeded"
