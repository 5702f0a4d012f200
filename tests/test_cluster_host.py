"""What this daemon tells schedulers about its host, judged as upstream's Go scheduler judges it.

A daemon process announces itself to a recording scheduler in this process; the captured ``AnnounceHost`` must
carry the machine's real figures, and upstream's parent evaluator (``upstream_parent_score``, written from the facts
in PROTOCOL.md: 0.6 load + 0.2 IDC + 0.1 location + 0.1 host type, load from the reported transmit bandwidth)
must score it like an idle host with the same NIC speed.
"""

from __future__ import annotations

import importlib.metadata
import os
import queue
import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf.empty_pb2 import Empty

from dfdaemon.api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.support import running_daemon

PIECE_LENGTH = 16 * 1024 * 1024  # upstream's assumed piece length for concurrency
DURATION_WINDOW = 60  # seconds over which upstream spreads uploaded bytes


def _load_quality(network: common_pb2.Network, uploaded_bytes: int = 0, uploading_pieces: int = 0) -> float:
    """Upstream's load quality: 0.5 peak bandwidth + 0.3 bandwidth over a minute + 0.2 concurrency, each 0..1."""
    limit = network.max_tx_bandwidth
    if limit == 0:
        return 0.0
    peak = max(0.0, 1.0 - network.tx_bandwidth / limit)
    duration = 1.0 if uploaded_bytes == 0 else max(0.0, 1.0 - uploaded_bytes * 8 / limit / DURATION_WINDOW)
    needed = limit / PIECE_LENGTH / 8
    if needed <= 1.0:
        concurrency = 0.0
    elif uploading_pieces == 0 or uploading_pieces / needed <= 1.0:
        concurrency = 1.0
    else:
        concurrency = needed / uploading_pieces
    return 0.5 * peak + 0.3 * duration + 0.2 * concurrency


def _location_affinity(parent: str, child: str) -> float:
    if not parent or not child:
        return 0.0
    if parent.lower() == child.lower():
        return 1.0
    matched = 0
    for mine, theirs in list(zip(parent.split("|"), child.split("|"), strict=False))[:5]:
        if mine.lower() != theirs.lower():
            break
        matched += 1
    return matched / 5


def upstream_parent_score(parent: common_pb2.Host, child: common_pb2.Host, parent_running: bool = False) -> float:
    """The Go scheduler's score of ``parent`` for ``child`` (a normal parent's host type scores 0.5; a seed 1 while
    running)."""
    idc = 1.0 if parent.network.idc and parent.network.idc.lower() == child.network.idc.lower() else 0.0
    location = _location_affinity(parent.network.location, child.network.location)
    host_type = 0.5 if parent.type == 0 else (1.0 if parent_running else 0.0)
    return 0.6 * _load_quality(parent.network) + 0.2 * idc + 0.1 * location + 0.1 * host_type


GBIT = 1_000_000_000


def test_evaluator_helper_reproduces_the_documented_scores() -> None:
    """PROTOCOL.md: a host reporting no bandwidth scores about 0.05, an idle upstream peer about 0.65."""
    child = common_pb2.Host()
    silent = common_pb2.Host(network=common_pb2.Network())
    idle = common_pb2.Host(network=common_pb2.Network(max_tx_bandwidth=10 * GBIT, tx_bandwidth=0))
    assert upstream_parent_score(silent, child) == pytest.approx(0.05)
    assert upstream_parent_score(idle, child) == pytest.approx(0.65)
    busy = common_pb2.Host(network=common_pb2.Network(max_tx_bandwidth=10 * GBIT, tx_bandwidth=5 * GBIT))
    assert upstream_parent_score(busy, child) == pytest.approx(0.65 - 0.6 * 0.5 * 0.5)
    near = common_pb2.Host(network=common_pb2.Network(idc="a", location="cn|bj|hd"))
    assert upstream_parent_score(near, common_pb2.Host(network=common_pb2.Network(idc="A", location="cn|bj|cy"))) == (
        pytest.approx(0.05 + 0.2 + 0.1 * 2 / 5)
    )


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Keeps every AnnounceHost and DeleteHost it is sent."""

    def __init__(self) -> None:
        self.announced: queue.Queue[scheduler_pb2.AnnounceHostRequest] = queue.Queue()
        self.deleted: queue.Queue[str] = queue.Queue()

    def AnnounceHost(self, request: scheduler_pb2.AnnounceHostRequest, context: grpc.ServicerContext) -> Empty:
        self.announced.put(request)
        return Empty()

    def DeleteHost(self, request: scheduler_pb2.DeleteHostRequest, context: grpc.ServicerContext) -> Empty:
        self.deleted.put(request.host_id)
        return Empty()


@pytest.fixture
def recording() -> Iterator[tuple[RecordingScheduler, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = RecordingScheduler()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_announce_host_carries_the_machine_and_scores_like_an_idle_peer(
    recording: tuple[RecordingScheduler, str], tmp_path: Path
) -> None:
    servicer, address = recording
    config = {
        "host": {"idc": "idc-a", "location": "cn|hz|1", "schedulerClusterID": 3},
        "scheduler": {"addrs": [address], "announceInterval": "1s"},
        "upload": {"bandwidthLimit": "1GB"},
    }
    with running_daemon(tmp_path / "reporter", config) as daemon:
        servicer.announced.get(timeout=20)
        announced = servicer.announced.get(timeout=20)  # the second one has rates measured over an interval
        daemon.stop()
        assert servicer.deleted.get(timeout=20) == announced.host.id  # DeleteHost on shutdown

    host = announced.host
    assert announced.interval.ToSeconds() == 1
    assert (host.id, host.type, host.hostname, host.ip) == ("127.0.0.1-reporter", 0, "reporter", "127.0.0.1")
    assert host.port == host.download_port == daemon.upload_port
    assert (host.network.idc, host.network.location, host.scheduler_cluster_id) == ("idc-a", "cn|hz|1", 3)
    assert host.os == "linux" and host.kernel_version == os.uname().release
    assert host.build.git_version == importlib.metadata.version("dfdaemon-py")
    assert host.cpu.logical_count == psutil.cpu_count() and host.cpu.physical_count >= 1
    assert host.memory.total == psutil.virtual_memory().total and 0 < host.memory.available <= host.memory.total
    disk = shutil.disk_usage(daemon.storage_dir)
    assert host.disk.total == disk.total and host.disk.inodes_total > 0
    # Loopback reports no link speed: the cap is upload.bandwidthLimit (1 GB/s) in bits per second.
    assert host.network.max_tx_bandwidth == host.network.max_rx_bandwidth == 8 * GBIT
    assert host.network.HasField("tx_bandwidth") and host.network.HasField("rx_bandwidth")

    idle = common_pb2.Host(network=common_pb2.Network(max_tx_bandwidth=host.network.max_tx_bandwidth))
    child = common_pb2.Host(network=common_pb2.Network())
    ours, theirs = upstream_parent_score(host, child), upstream_parent_score(idle, child)
    assert theirs == pytest.approx(0.65)
    assert abs(ours - theirs) < 0.1, (ours, host.network)
