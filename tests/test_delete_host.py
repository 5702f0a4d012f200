"""``DfdaemonDownload.DeleteHost`` between real processes: the host leaves the cluster for good.

The scheduler stub forgets it and its peers, no later announcement brings it back, other peers go to the origin
instead of to it, and it keeps serving its own cache to its own clients; a download it was running finishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from dfdaemon.api import dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from dfdaemon.download import DownloadRequest
from dfdaemon.download.peering import Registration, SchedulerUnavailable
from dfdaemon.rpc.scheduler_client import HostInfo, SchedulerClient
from tests.storage_support import seeded_bytes
from tests.support import (
    REPO_ROOT,
    DaemonProcess,
    OriginProcess,
    SchedulerProcess,
    dfget,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
)

MB = 1_000_000
SIZE = 8 * MB + 17
ANNOUNCE_INTERVAL = 1.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    for name in ("model.bin", "other.bin", "slow.bin", "never.bin"):
        (root / name).write_bytes(seeded_bytes("test_delete_host-1", SIZE))
    with running_origin(root) as running:
        yield running


def start_cluster(stack: ExitStack, tmp_path: Path, peers: int) -> tuple[SchedulerProcess, list[DaemonProcess]]:
    scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
    config = {
        "scheduler": {"addrs": [scheduler.address], "announceInterval": f"{ANNOUNCE_INTERVAL}s"},
        "download": {"pieceTimeout": "10s"},
    }
    daemons = [stack.enter_context(running_daemon(tmp_path / f"peer{i}", config)) for i in range(peers)]
    wait_for_hosts(scheduler, peers)
    return scheduler, daemons


def fetch(daemon: DaemonProcess, url: str, output: Path, *args: str) -> dict[str, dict[str, int]]:
    """``dfget --json`` that must succeed: its report."""
    done = dfget(daemon, url, output, "--json", *args)
    assert done.returncode == 0, done.stderr
    report: dict[str, dict[str, int]] = json.loads(done.stdout)
    return report


def delete_host(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel).DeleteHost(Empty(), timeout=30)


def host_id_of(scheduler: SchedulerProcess, daemon: DaemonProcess) -> str:
    """The daemon's host id as the scheduler lists it (the test config names each host after its directory)."""
    hosts = scheduler.stub().ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts
    [host] = [host for host in hosts if host.hostname == daemon.storage_dir.parent.name]
    return str(host.id)


def listed(scheduler: SchedulerProcess) -> set[str]:
    return {host.id for host in scheduler.stub().ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts}


def known_to_scheduler(scheduler: SchedulerProcess, task_id: str) -> bool:
    try:
        scheduler.stub().StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id), timeout=5)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False
    return True


def pieces_uploaded(daemon: DaemonProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^dfdaemon_upload_pieces_total (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


@pytest.mark.slow
def test_a_host_that_left_is_never_offered_and_still_serves_itself(origin: OriginProcess, tmp_path: Path) -> None:
    url = origin.url("model.bin")
    with ExitStack() as stack:
        scheduler, (a, b) = start_cluster(stack, tmp_path, 2)
        a_id, b_id = host_id_of(scheduler, a), host_id_of(scheduler, b)
        first = fetch(a, url, tmp_path / "a-first")
        assert first["pieces"]["BACK_TO_SOURCE"] > 0

        delete_host(a)
        assert a_id not in listed(scheduler)
        time.sleep(2.5 * ANNOUNCE_INTERVAL)  # room for two more announcements, had any been left running
        assert listed(scheduler) == {b_id}
        assert scheduler.log_path.read_text().count(f"host {a_id} joined") == 1

        # B finds no parent: A's copy is not offered, so B goes to the origin and A uploads nothing.
        second = fetch(b, url, tmp_path / "b")
        assert second["pieces"]["BACK_TO_SOURCE"] > 0 and second["pieces"]["REMOTE_PEER"] == 0
        assert origin.bytes_served("model.bin") == 2 * SIZE
        assert pieces_uploaded(a) == 0

        # A still serves its cache to its own clients, without the origin.
        again = fetch(a, url, tmp_path / "a-again")
        assert again["pieces"]["LOCAL_PEER"] > 0 and again["pieces"]["BACK_TO_SOURCE"] == 0
        assert origin.bytes_served("model.bin") == 2 * SIZE

        # A new download on A goes to the origin without registering; one that may not go there fails clearly.
        other = fetch(a, origin.url("other.bin"), tmp_path / "a-other")
        assert other["pieces"]["BACK_TO_SOURCE"] > 0
        assert not known_to_scheduler(scheduler, str(other["task_id"]))
        refused = dfget(a, origin.url("never.bin"), tmp_path / "never", "--disable-back-to-source")
        assert refused.returncode == 1 and "left the cluster" in refused.stderr, refused.stderr
        assert origin.bytes_served("never.bin") == 0
    expected = sha256(origin.root / "model.bin")
    assert {sha256(tmp_path / name) for name in ("a-first", "b", "a-again")} == {expected}
    assert sha256(tmp_path / "a-other") == sha256(origin.root / "other.bin")


@pytest.mark.slow
def test_a_download_under_way_when_the_host_leaves_finishes(origin: OriginProcess, tmp_path: Path) -> None:
    origin.fault("slow.bin", rate=1 * MB)  # about eight seconds: long enough to leave in the middle
    output = tmp_path / "slow"
    with ExitStack() as stack:
        scheduler, (daemon,) = start_cluster(stack, tmp_path, 1)
        command = ["-m", "dfdaemon.cli.dfget", origin.url("slow.bin"), "-O", str(output), "-e", str(daemon.socket_path)]
        download = subprocess.Popen(
            [sys.executable, *command, "--no-progress"],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
        )
        stack.callback(download.kill)
        task_id = wait_for_registration(scheduler, daemon)
        delete_host(daemon)
        assert download.poll() is None, "the download ended before the host left; the test proves nothing"
        assert not known_to_scheduler(scheduler, task_id)
        _, stderr = download.communicate(timeout=120)
        assert download.returncode == 0, stderr.decode()
    assert sha256(output) == sha256(origin.root / "slow.bin")


def wait_for_registration(scheduler: SchedulerProcess, daemon: DaemonProcess) -> str:
    """The id of the daemon's one task, once the scheduler knows it."""
    with grpc.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tasks = stub.ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=5).tasks
            if tasks and known_to_scheduler(scheduler, tasks[0].task_id):
                return str(tasks[0].task_id)
            time.sleep(0.05)
    raise AssertionError("the download never registered with the scheduler")


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Records the host-wide calls in the order they complete; the first announcement waits to be released."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.announcing = asyncio.Event()
        self.release = asyncio.Event()

    async def AnnounceHost(self, request: scheduler_pb2.AnnounceHostRequest, context: object) -> Empty:
        self.announcing.set()
        await self.release.wait()
        self.calls.append("AnnounceHost")
        return Empty()

    async def DeleteHost(self, request: scheduler_pb2.DeleteHostRequest, context: object) -> Empty:
        self.calls.append(f"DeleteHost {request.host_id}")
        return Empty()

    async def DeleteTask(self, request: scheduler_pb2.DeleteTaskRequest, context: object) -> Empty:
        self.calls.append("DeleteTask")
        return Empty()


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingScheduler, str]]:
    server = grpc.aio.server()
    servicer = RecordingScheduler()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_leaving_waits_for_the_announcement_under_way_and_stays_left(
    recording: tuple[RecordingScheduler, str],
) -> None:
    servicer, address = recording
    host = HostInfo(host_id="127.0.0.1-leaving", ip="127.0.0.1", hostname="leaving", port=4000)
    client = SchedulerClient([address], host, announce_interval=0.05, timeout=10)
    client.start()
    try:
        await asyncio.wait_for(servicer.announcing.wait(), 10)
        leaving = asyncio.create_task(client.delete_host())
        await asyncio.sleep(0)
        servicer.release.set()
        await asyncio.wait_for(leaving, 10)
        # The announcement under way reached the scheduler before the DeleteHost, never after it.
        assert servicer.calls == ["AnnounceHost", "DeleteHost 127.0.0.1-leaving"]

        await client.announce_host()
        await client.delete_task("a" * 64)
        await client.delete_host()
        session = client.open_session("a" * 64, "peer")
        with pytest.raises(SchedulerUnavailable, match="left the cluster"):
            await session.register(REGISTRATION)
        await session.close()
        assert servicer.calls == ["AnnounceHost", "DeleteHost 127.0.0.1-leaving"]
        assert client.left
    finally:
        await client.close()


REGISTRATION = Registration(
    task_id="a" * 64,
    peer_id="peer",
    download=DownloadRequest(url="http://origin.example/f"),
    content_length=1,
    actual_piece_length=1,
    piece_count=1,
    concurrent_piece_count=1,
)
