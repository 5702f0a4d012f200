"""Seed peer mode (``seedPeer``): announced as upstream's seeds are, and answering a scheduler's DownloadTask.

A scheduler that triggers a seed calls its ``DfdaemonUpload.DownloadTask`` with the child's ``Download`` and
``need_back_to_source``; here the test makes that call itself, on a real seed daemon, while a normal peer asks
for the same file through the scheduler stub: the child gets its pieces from the seed while the seed is still
reading a throttled origin, and the origin serves the file once, to the seed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, manager_pb2, scheduler_pb2
from dfdaemon.cluster.host import host_type
from dfdaemon.cluster.manager import PeerIdentity
from dfdaemon.config import ConfigError, parse_config
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.recording_scheduler import recording_scheduler
from tests.storage_support import seeded_bytes
from tests.support import (
    DaemonProcess,
    OriginProcess,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
)

pytestmark = pytest.mark.slow

MB = 1_000_000
SIZE = 40 * MB + 11  # ten 4 MiB pieces: about eight seconds from the throttled origin
DATA = seeded_bytes("test_seed_peer", SIZE)
# Requests from the network may reach only global addresses unless allowed: the test's origin is on loopback.
LOOPBACK_ORIGIN = {"download": {"backToSource": {"allowedNetworks": ["127.0.0.0/8"]}}}


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    (root / "model.bin").write_bytes(DATA)
    with running_origin(root) as running:
        yield running


def upload_download_task(daemon: DaemonProcess, download: common_pb2.Download) -> Iterator[Any]:
    """``DfdaemonUpload.DownloadTask`` over TCP, as a scheduler calls a seed."""
    with grpc.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS) as channel:
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
        yield from dfdaemon_pb2_grpc.DfdaemonUploadStub(channel).DownloadTask(request, timeout=120)


@pytest.mark.parametrize(
    ("section", "kind"),
    [({}, 0), ({"seedPeer": {"enable": False, "type": "super"}}, 0), ({"seedPeer": {"enable": True}}, 1)],
)
def test_the_host_type_follows_upstreams_seed_peer_keys(section: dict[str, Any], kind: int) -> None:
    seed_peer = parse_config(section).seed_peer
    assert host_type(seed_peer.enable, seed_peer.type) == kind


@pytest.mark.parametrize(("seed", "source"), [(True, manager_pb2.SEED_PEER_SOURCE), (False, manager_pb2.PEER_SOURCE)])
def test_a_seed_asks_the_manager_for_schedulers_as_a_seed_peer(seed: bool, source: int) -> None:
    assert PeerIdentity(hostname="node", ip="10.0.0.1", seed=seed).request().source_type == source


def test_an_unknown_seed_peer_type_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"seedPeer\.type: .*'normal' or 'super'"):
        parse_config({"seedPeer": {"enable": True, "type": "weak"}})


@pytest.mark.parametrize(
    ("seed_peer", "announced_type", "seed"),
    [({"enable": True}, 1, True), ({"enable": True, "type": "normal"}, 0, True), ({"enable": False}, 0, False)],
)
def test_a_seed_announces_its_type_and_seed_ids(
    origin: OriginProcess, tmp_path: Path, seed_peer: dict[str, object], announced_type: int, seed: bool
) -> None:
    download = common_pb2.Download(url=origin.url("model.bin"), need_back_to_source=True)
    with recording_scheduler() as (scheduler, address):
        config = {"scheduler": {"addrs": [address], "announceInterval": "1h"}, "seedPeer": seed_peer}
        with running_daemon(tmp_path / "node", {**config, **LOOPBACK_ORIGIN}) as daemon:
            responses = list(upload_download_task(daemon, download))
        (stream,) = scheduler.streams
    host = scheduler.hosts[0]
    suffix = "-seed" if seed else ""
    assert (host.type, host.id) == (announced_type, f"127.0.0.1-node{suffix}")
    register = stream.requests[0]
    assert register.host_id == host.id
    assert register.peer_id.startswith("127.0.0.1-node-") and register.peer_id.endswith(suffix)
    assert register.register_peer_request.download.need_back_to_source
    assert responses[0].host_id == host.id and responses[0].peer_id == register.peer_id


def test_a_child_gets_pieces_from_a_seed_still_downloading_a_throttled_origin(
    origin: OriginProcess, tmp_path: Path
) -> None:
    origin.fault("model.bin", rate=5 * MB)
    url = origin.url("model.bin")
    seed_first_piece, seed_done = threading.Event(), threading.Event()
    seed_pieces: list[int] = []

    def trigger(seed: DaemonProcess) -> None:
        """What a scheduler does to a seed: the child's download, from the source, read to the end."""
        try:
            for response in upload_download_task(seed, common_pb2.Download(url=url, need_back_to_source=True)):
                if response.HasField("download_piece_finished_response"):
                    seed_pieces.append(response.download_piece_finished_response.piece.traffic_type)
                    seed_first_piece.set()
        finally:
            seed_done.set()

    with running_scheduler(tmp_path / "scheduler") as scheduler:
        seed_config = {**peer_config(scheduler), "seedPeer": {"enable": True}, **LOOPBACK_ORIGIN}
        with (
            running_daemon(tmp_path / "seed", seed_config) as seed,
            running_daemon(tmp_path / "child", peer_config(scheduler)) as child,
        ):
            wait_for_hosts(scheduler, 2)
            hosts = scheduler.stub().ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts
            assert {(host.id, host.type) for host in hosts} == {("127.0.0.1-seed-seed", 1), ("127.0.0.1-child", 0)}
            seeding = threading.Thread(target=trigger, args=(seed,))
            seeding.start()
            assert seed_first_piece.wait(60), "the seed never got a piece from the origin"
            first_child_piece_while_seeding: bool | None = None
            parents: set[str] = set()
            traffic: list[int] = []
            output = tmp_path / "model.bin"
            with grpc.insecure_channel(f"unix:{child.socket_path}", options=CHANNEL_OPTIONS) as channel:
                request = dfdaemon_pb2.DownloadTaskRequest(
                    download=common_pb2.Download(url=url, output_path=str(output))
                )
                for response in dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel).DownloadTask(request, timeout=120):
                    if not response.HasField("download_piece_finished_response"):
                        continue
                    if first_child_piece_while_seeding is None:
                        first_child_piece_while_seeding = not seed_done.is_set()
                    piece = response.download_piece_finished_response.piece
                    parents.add(piece.parent_id)
                    traffic.append(piece.traffic_type)
            seeding.join(120)
    assert first_child_piece_while_seeding, "the child's first piece came only after the seed had finished"
    assert hashlib.sha256(output.read_bytes()).digest() == hashlib.sha256(DATA).digest()
    assert set(seed_pieces) == {common_pb2.BACK_TO_SOURCE} and len(seed_pieces) == 10
    assert set(traffic) == {common_pb2.REMOTE_PEER} and len(traffic) == 10
    (parent,) = parents
    assert parent.startswith("127.0.0.1-seed-") and parent.endswith("-seed")  # the seed's peer
    # The body once, to the seed; the child only asked the origin for the file's length (at most a byte).
    assert SIZE <= origin.bytes_served("model.bin") <= SIZE + 2


def test_the_stub_triggers_the_seed_so_the_first_child_never_touches_the_origin(
    origin: OriginProcess, tmp_path: Path
) -> None:
    """Nobody calls the seed here: the child's registration makes the embedded scheduler ask it, as upstream's does."""
    origin.fault("model.bin", rate=5 * MB)
    url = origin.url("model.bin")
    output = tmp_path / "model.bin"
    seed_state_at_first_piece: str | None = None
    parents: set[str] = set()
    traffic: list[int] = []
    with running_scheduler(tmp_path / "scheduler") as scheduler:
        seed_config = {**peer_config(scheduler), "seedPeer": {"enable": True}, **LOOPBACK_ORIGIN}
        with (
            running_daemon(tmp_path / "seed", seed_config) as seed,
            running_daemon(tmp_path / "child", peer_config(scheduler)) as child,
            grpc.insecure_channel(f"unix:{seed.socket_path}", options=CHANNEL_OPTIONS) as seed_channel,
            grpc.insecure_channel(f"unix:{child.socket_path}", options=CHANNEL_OPTIONS) as child_channel,
        ):
            wait_for_hosts(scheduler, 2)
            seed_stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(seed_channel)
            request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=url, output_path=str(output)))
            for response in dfdaemon_pb2_grpc.DfdaemonDownloadStub(child_channel).DownloadTask(request, timeout=120):
                if not response.HasField("download_piece_finished_response"):
                    continue
                if seed_state_at_first_piece is None:  # asked of the seed itself, the moment the child has a piece
                    stat = dfdaemon_pb2.StatTaskRequest(task_id=response.task_id)
                    seed_state_at_first_piece = seed_stub.StatTask(stat, timeout=10).state
                piece = response.download_piece_finished_response.piece
                parents.add(piece.parent_id)
                traffic.append(piece.traffic_type)
    assert seed_state_at_first_piece == "Running", "the child's first piece came only after the seed had finished"
    assert hashlib.sha256(output.read_bytes()).digest() == hashlib.sha256(DATA).digest()
    assert set(traffic) == {common_pb2.REMOTE_PEER} and len(traffic) == 10
    (parent,) = parents
    assert parent.endswith("-seed")  # the seed's peer, the only parent
    # The body once, to the seed; the child only asked the origin for the file's length (at most a byte).
    assert SIZE <= origin.bytes_served("model.bin") <= SIZE + 2
