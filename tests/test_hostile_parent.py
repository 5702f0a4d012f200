"""A child facing a hostile parent (``tests/hostile_parent.py``, its own process) over gRPC and over vortex.

For every lie the parent can tell about one piece, the child must notice, tell the scheduler the parent failed
(``temporary=true``, as the stub records it), take that piece elsewhere (here the origin: the stub has no other
parent to offer), never store or serve the lie, and end with the origin's bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dfdaemon import ids
from dfdaemon.api import dfdaemon_pb2, dfdaemon_pb2_grpc
from tests.hostile_parent import BEHAVIOURS, PEER_ID, running_hostile_parent
from tests.support import (
    DaemonProcess,
    OriginProcess,
    SchedulerProcess,
    dfget,
    merge,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
)

pytestmark = pytest.mark.slow

PIECE_LENGTH = 64 * 1024
SIZE = 64 * PIECE_LENGTH + 100  # 65 pieces, the last one short: over 4 MiB, so the child asks the scheduler
TARGET = 60  # late, so most pieces come honestly from the parent before the lie (a reset drops the parent)


@dataclass
class Cluster:
    scheduler: SchedulerProcess
    origin: OriginProcess
    child: DaemonProcess


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One scheduler stub, origin and child daemon for the module; each test has its own file (so its own task)
    and its own hostile parent."""
    root = tmp_path_factory.mktemp("hostile")
    with (
        running_scheduler(root / "scheduler") as scheduler,
        running_origin(root / "files") as origin,
        running_daemon(root / "child", child_config(scheduler)) as child,
    ):
        yield Cluster(scheduler, origin, child)


def child_config(scheduler: SchedulerProcess) -> dict[str, object]:
    # A short piece timeout: the stalling parent costs the child this long.
    return merge(peer_config(scheduler), {"download": {"pieceTimeout": "3s", "concurrentPieceCount": 2}})


def write_file(root: Path, name: str, seed: str) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    (root / name).write_bytes(data)
    return data


def stored_pieces(daemon: DaemonProcess, task_id: str) -> dict[int, tuple[str, bytes]]:
    """Each piece the daemon serves to other peers: its recorded digest and its bytes."""
    with grpc.insecure_channel(daemon.upload_address) as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        pieces = {}
        for number in range(len(ids.pieces_for(SIZE, PIECE_LENGTH))):
            request = dfdaemon_pb2.DownloadPieceRequest(host_id="test", task_id=task_id, piece_number=number)
            piece = stub.DownloadPiece(request, timeout=10).piece
            pieces[number] = (piece.digest, piece.content)
    return pieces


def assert_child_has_the_origin_bytes(daemon: DaemonProcess, task_id: str, data: bytes, output: Path) -> None:
    assert hashlib.sha256(output.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    for number, (digest, content) in stored_pieces(daemon, task_id).items():
        span = ids.pieces_for(SIZE, PIECE_LENGTH)[number]
        assert content == data[span.offset : span.end], f"piece {number}"
        assert digest == ids.piece_digest(data[span.offset : span.end]), f"piece {number}"


def blamed(scheduler: SchedulerProcess, task_id: str, number: int) -> list[str]:
    """The stub's records of a child reporting the hostile parent failing ``number``: their temporary flags."""
    pattern = rf"piece failed: task={task_id} peer=\S+ parent={PEER_ID} piece={number} temporary=(\w+)"
    return re.findall(pattern, scheduler.log_path.read_text())


@pytest.mark.parametrize("protocol", ["grpc", "vortex"])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_a_hostile_parent_is_detected_and_the_piece_taken_elsewhere(
    shared: Cluster, tmp_path: Path, behaviour: str, protocol: str
) -> None:
    name = f"{behaviour}-{protocol}.bin"
    data = write_file(shared.origin.root, name, name)
    url = shared.origin.url(name)
    task_id = ids.task_id(url, piece_length=PIECE_LENGTH)
    options = ["--vortex"] if protocol == "vortex" else []
    output = tmp_path / "out.bin"
    hostile = running_hostile_parent(
        tmp_path, shared.scheduler, url, task_id, shared.origin.root / name, PIECE_LENGTH, behaviour, TARGET, *options
    )
    with hostile as parent:
        result = dfget(shared.child, url, output, "--piece-length", str(PIECE_LENGTH), "--json")
        assert result.returncode == 0, result.stderr
        assert f"DownloadPiece {TARGET} over {'vortex' if protocol == 'vortex' else 'gRPC'}" in parent.log()
    assert_child_has_the_origin_bytes(shared.child, task_id, data, output)
    flags = blamed(shared.scheduler, task_id, TARGET)
    assert flags and set(flags) == {"true"}, flags
    pieces = json.loads(result.stdout)["pieces"]
    assert pieces["BACK_TO_SOURCE"] >= 1, pieces  # the lied-about piece came from the origin
    assert shared.origin.bytes_served(name) < SIZE, "the parent's honest pieces were not taken from it"
