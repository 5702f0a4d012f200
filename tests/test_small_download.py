"""Small downloads skip the scheduler, as upstream's Rust peer does since 1.4.1.

Upstream's rule (``resource/task.rs``): when back to source is allowed and the content length, or the length of
the range asked for, is at most 4 MiB (its minimum piece length), the peer downloads from the source without
registering. A recording scheduler counts the registrations of a real daemon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.recording_scheduler import RecordingScheduler, recording_scheduler
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
FILES = {"four-mib.bin": 4 * MIB, "just-over.bin": 4 * MIB + 1, "big.bin": 9 * MIB}


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("small-origin") / "files"
    root.mkdir()
    for name, size in FILES.items():
        (root / name).write_bytes(seeded_bytes(name, size))
    with running_origin(root) as running:
        yield running


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[RecordingScheduler, DaemonProcess]]:
    with recording_scheduler() as (scheduler, address):
        config = {"scheduler": {"addrs": [address], "announceInterval": "1h"}}
        with running_daemon(tmp_path / "node", config) as daemon:
            yield scheduler, daemon


def fetch(daemon: DaemonProcess, download: common_pb2.Download) -> bytes:
    """The bytes the daemon delivers for ``download`` (its pieces' content, in order)."""
    download.need_piece_content = True
    with grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS) as channel:
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
        responses = list(dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel).DownloadTask(request, timeout=60))
    pieces = sorted((r.download_piece_finished_response.piece for r in responses[1:]), key=lambda p: p.number)
    return b"".join(piece.content for piece in pieces)


def expected(origin: OriginProcess, name: str) -> str:
    return hashlib.sha256((origin.root / name).read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "registers"), [("four-mib.bin", False), ("just-over.bin", True)])
def test_content_of_at_most_4_mib_skips_the_scheduler(
    origin: OriginProcess, node: tuple[RecordingScheduler, DaemonProcess], name: str, registers: bool
) -> None:
    scheduler, daemon = node
    content = fetch(daemon, common_pb2.Download(url=origin.url(name)))
    assert hashlib.sha256(content).hexdigest() == expected(origin, name)
    assert len(scheduler.streams) == (1 if registers else 0)
    assert origin.bytes_served(name) >= FILES[name]  # either way this first peer read the origin


@pytest.mark.parametrize(("length", "registers"), [(4 * MIB, False), (4 * MIB + 1, True)])
def test_a_range_of_at_most_4_mib_skips_the_scheduler(
    origin: OriginProcess, node: tuple[RecordingScheduler, DaemonProcess], length: int, registers: bool
) -> None:
    scheduler, daemon = node
    download = common_pb2.Download(
        url=origin.url("big.bin"), tag=f"range-{length}", range=common_pb2.Range(start=1000, length=length)
    )
    covering = fetch(daemon, download)  # the pieces covering the range, the first one starting at 0
    assert covering[1000 : 1000 + length] == (origin.root / "big.bin").read_bytes()[1000 : 1000 + length]
    assert len(scheduler.streams) == (1 if registers else 0)


def test_a_small_download_that_may_not_go_to_the_source_still_asks_the_scheduler(
    origin: OriginProcess, node: tuple[RecordingScheduler, DaemonProcess]
) -> None:
    scheduler, daemon = node
    download = common_pb2.Download(url=origin.url("four-mib.bin"), tag="p2p-only", disable_back_to_source=True)
    with pytest.raises(grpc.RpcError) as failed:
        fetch(daemon, download)  # the recording scheduler sends every peer to the source, which is not allowed
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    (stream,) = scheduler.streams
    assert stream.requests[0].register_peer_request.download.disable_back_to_source
