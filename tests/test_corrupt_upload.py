"""A parent never serves a piece whose bytes changed on its disk, and serves every other piece from its own offset.

One daemon process caches a task of seeded random bytes (no two pieces alike); a byte of one piece is then changed
in its content file behind the daemon's back. ``DfdaemonUpload.DownloadPiece`` must answer DATA_LOSS for that
piece (the CRC check on reading), forget it (NOT_FOUND next time), count no upload for it, and still serve the
other pieces byte for byte.
"""

from __future__ import annotations

import hashlib
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin

PIECE = 4 * 1024 * 1024  # the default piece length for this size
CONTENT = seeded_bytes("corrupt-upload", 3 * PIECE + 4321)


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    with running_origin(tmp_path / "files") as origin, running_daemon(tmp_path / "parent") as daemon:
        (origin.root / "blob.bin").write_bytes(CONTENT)
        yield daemon, cache(daemon, origin)


def cache(daemon: DaemonProcess, origin: OriginProcess) -> str:
    request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=origin.url("blob.bin")))
    with grpc.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        task_ids = {response.task_id for response in stub.DownloadTask(request, timeout=60)}
    assert len(task_ids) == 1, task_ids
    return task_ids.pop()


def uploads_counted(daemon: DaemonProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^dfdaemon_upload_pieces_total (\S+)$", text, re.MULTILINE)
    assert match, "no dfdaemon_upload_pieces_total in the metrics"
    return float(match.group(1))


def test_a_piece_changed_on_disk_is_refused_and_forgotten_the_others_are_served(
    cached: tuple[DaemonProcess, str],
) -> None:
    daemon, task_id = cached
    content = daemon.storage_dir / "content" / "tasks" / task_id[:3] / task_id
    with content.open("r+b") as f:
        f.seek(PIECE + 1000)  # inside piece 1
        byte = f.read(1)
        f.seek(PIECE + 1000)
        f.write(bytes([byte[0] ^ 0x5A]))
    with grpc.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS) as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)

        def piece(number: int) -> bytes:
            request = dfdaemon_pb2.DownloadPieceRequest(task_id=task_id, piece_number=number)
            return bytes(stub.DownloadPiece(request, timeout=30).piece.content)

        for number, expected_code in ((1, grpc.StatusCode.DATA_LOSS), (1, grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as refused:
                piece(number)
            assert refused.value.code() is expected_code, refused.value  # type: ignore[attr-defined]
        assert uploads_counted(daemon) == 0
        for number in (0, 2, 3):
            expected = CONTENT[number * PIECE : (number + 1) * PIECE]
            assert hashlib.sha256(piece(number)).digest() == hashlib.sha256(expected).digest(), number
        assert uploads_counted(daemon) == 3
