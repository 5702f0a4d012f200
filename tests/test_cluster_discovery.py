"""Manager discovery between real processes: a manager built from upstream's ``dragonfly-api`` (its own process)
names the schedulers, daemons find them, tasks land on the scheduler upstream's ring names, a scheduler that dies
is dropped at the next refresh, and a manager that cannot be reached at start leaves ``scheduler.addrs`` in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dfdaemon.api import scheduler_pb2
from dfdaemon.cluster.ring import HashRing
from dfdaemon.ids import filtered_query_params_or_default, task_id
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
    wait_for_line,
)

pytestmark = pytest.mark.slow
MANAGER_SCRIPT = REPO_ROOT / "tests" / "manager_server.py"
FILE = "weights.bin"


@dataclass
class ManagerProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def requests(self) -> list[dict[str, object]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("ListSchedulers ")]


@contextmanager
def running_manager(workdir: Path, schedulers: list[str]) -> Iterator[ManagerProcess]:
    """The manager stand-in listing ``schedulers`` (``CLUSTER_ID/IP:PORT``) in that order."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "manager.log"
    args = [arg for spec in schedulers for arg in ("--scheduler", spec)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(MANAGER_SCRIPT), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        address = wait_for_line(log_path, r"manager listening on (\S+)", proc).group(1)
        yield ManagerProcess(proc, address, log_path)
    finally:
        proc.terminate()
        proc.wait(10)


def closed_port() -> str:
    """An address nothing listens on (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    # Over 4 MiB: smaller downloads skip the scheduler, as upstream's do.
    (root / FILE).write_bytes(seeded_bytes("test_cluster_discovery-1", 4 * 1024 * 1024 + 1))
    with running_origin(root) as running:
        yield running


def has_task(scheduler: SchedulerProcess, task: str) -> bool:
    try:
        scheduler.stub().StatTask(scheduler_pb2.StatTaskRequest(task_id=task), timeout=5)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False
    return True


def tags_for(url: str, ring: HashRing, owner: str, count: int) -> list[str]:
    """Tags whose task ids (the URL plus the tag, as dfget forms them) the ring gives to ``owner``."""
    filtered = filtered_query_params_or_default(())
    tags = (f"t{n}" for n in range(10_000))
    return [tag for tag in tags if ring.pick(task_id(url, tag=tag, filtered_query_params=filtered)) == owner][:count]


def fetch(daemon: DaemonProcess, origin: OriginProcess, out: Path, tag: str) -> str:
    """Download through ``daemon`` with ``tag``; checks the bytes and returns the reported task id."""
    result = dfget(daemon, origin.url(FILE), out / tag, "--tag", tag, "--json")
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    assert (
        hashlib.sha256((out / tag).read_bytes()).digest() == hashlib.sha256((origin.root / FILE).read_bytes()).digest()
    )
    return str(json.loads(result.stdout)["task_id"])


def discovery_config(manager: str) -> dict[str, object]:
    return {
        "manager": {"addr": f"http://{manager}"},
        "dynconfig": {"refreshInterval": "1s"},
        "scheduler": {"announceInterval": "2s"},
        "download": {"pieceTimeout": "10s"},
    }


def test_discovery_follows_the_manager_and_the_ring(origin: OriginProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with ExitStack() as stack:
        first, second, other = (stack.enter_context(running_scheduler(tmp_path / f"s{i}")) for i in range(3))
        # A dead scheduler first (skipped), then cluster 1's two, then another cluster's (not this host's).
        listed = [f"7/{closed_port()}", f"1/{first.address}", f"1/{second.address}", f"2/{other.address}"]
        manager = stack.enter_context(running_manager(tmp_path / "manager", listed))
        daemons = [
            stack.enter_context(running_daemon(tmp_path / f"peer{i}", discovery_config(manager.address)))
            for i in range(2)
        ]
        wait_for_hosts(first, 2)
        wait_for_hosts(second, 2)
        assert not other.stub().ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts
        request = manager.requests()[0]
        assert request["source_type"] == 1 and request["ip"] == "127.0.0.1"
        assert request["hostname"] in {"peer0", "peer1"}

        ring = HashRing([first.address, second.address])
        for scheduler, peer in ((first, second), (second, first)):
            for tag in tags_for(origin.url(FILE), ring, scheduler.address, 2):
                task = fetch(daemons[0], origin, out, tag)
                assert ring.pick(task) == scheduler.address
                assert has_task(scheduler, task) and not has_task(peer, task)

        # The second scheduler dies: the next refresh drops it, and its tasks move to the first.
        moved = tags_for(origin.url(FILE), ring, second.address, 3)[-1]  # a task nobody has yet
        second.proc.terminate()
        second.proc.wait(10)
        for daemon in daemons:
            wait_for_line(daemon.log_path, rf"schedulers now {first.address} \(were ", daemon.proc)
        task = fetch(daemons[1], origin, out, moved)
        assert has_task(first, task)


def test_unreachable_manager_at_start_falls_back_to_configured_schedulers(
    origin: OriginProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        config = {**discovery_config(closed_port()), "scheduler": {"addrs": [scheduler.address]}}
        daemon = stack.enter_context(running_daemon(tmp_path / "peer", config))
        warning = wait_for_line(daemon.log_path, r"WARN.*manager .*using scheduler\.addrs \(([^)]*)\)", daemon.proc)
        assert warning.group(1) == scheduler.address
        wait_for_hosts(scheduler, 1)
        task = fetch(daemon, origin, out, "fallback")
        assert has_task(scheduler, task)
