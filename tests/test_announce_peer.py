"""AnnouncePeer as upstream's Rust peer writes it, seen by a recording scheduler (a real gRPC server).

A real daemon process downloads from a real origin while the scheduler answers from a script and records every
request of the stream: the registration forwards the caller's ``Download`` with the measured sizes, failing
parents are reported ``temporary``, a reschedule names every candidate of the round, ``scheduleTimeout`` and
``maxScheduleCount`` send the download back to source, and the peer waits for the scheduler to close the stream.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from dfdaemon.config import Config, ConfigError, parse_config
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.recording_scheduler import RecordingScheduler, Script, Stream, normal_task, recording_scheduler
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
SIZE = 9 * 1_000_000 + 123  # three 4 MiB pieces, the last one short: big enough to go through the scheduler
DATA = seeded_bytes("test_announce_peer", SIZE)
PIECES = 3


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("announce-origin") / "files"
    root.mkdir()
    (root / "model.bin").write_bytes(DATA)
    with running_origin(root) as running:
        yield running


def daemon_for(tmp_path: Path, address: str, **scheduler: Any) -> Any:
    config = {
        "scheduler": {"addrs": [address], "announceInterval": "1h", **scheduler},
        "download": {"concurrentPieceCount": 4, "pieceTimeout": "10s"},
    }
    return running_daemon(tmp_path / "peer", config)


def download_task(daemon: DaemonProcess, download: common_pb2.Download) -> list[dfdaemon_pb2.DownloadTaskResponse]:
    with grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS) as channel:
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
        return list(dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel).DownloadTask(request, timeout=120))


def only_stream(scheduler: RecordingScheduler) -> Stream:
    (stream,) = scheduler.streams
    assert stream.closed.wait(30), "the AnnouncePeer call never ended"
    return stream


def dead_parent(name: str) -> common_pb2.Peer:
    """A candidate nobody answers for: a port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = common_pb2.Host(id=f"127.0.0.1-{name}", ip="127.0.0.1", port=port, download_port=port)
    return common_pb2.Peer(id=f"127.0.0.1-{name}-peer", host=host)


def test_the_scheduler_keys_take_upstreams_names_and_defaults() -> None:
    assert (Config().scheduler.schedule_timeout, Config().scheduler.max_schedule_count) == (3 * 3600, 5)
    scheduler = parse_config({"scheduler": {"scheduleTimeout": "90s", "maxScheduleCount": 2}}).scheduler
    assert (scheduler.schedule_timeout, scheduler.max_schedule_count) == (90, 2)
    with pytest.raises(ConfigError, match=r"^config: scheduler\.maxScheduleCount: .*greater than or equal to 1"):
        parse_config({"scheduler": {"maxScheduleCount": 0}})


def test_registration_forwards_the_callers_download_with_the_measured_sizes(
    origin: OriginProcess, tmp_path: Path
) -> None:
    sent = common_pb2.Download(
        url=origin.url("model.bin"),
        tag="forwarded",
        application="announce-test",
        priority=common_pb2.LEVEL2,
        request_header={"X-Request-Id": "abc-123"},
        range=common_pb2.Range(start=100, length=5 * MIB),
        remote_ip="10.1.2.3",
        digest="sha256:" + hashlib.sha256(DATA).hexdigest(),
        output_path=str(tmp_path / "slice.bin"),
    )
    with recording_scheduler() as (scheduler, address), daemon_for(tmp_path, address) as daemon:
        download_task(daemon, sent)
        stream = only_stream(scheduler)
    assert (tmp_path / "slice.bin").read_bytes() == DATA[100 : 100 + 5 * MIB]

    register = stream.requests[0]
    task_id = ids.task_id(sent.url, tag="forwarded", application="announce-test")
    assert (register.task_id, register.host_id) == (task_id, "127.0.0.1-peer")
    assert register.peer_id.startswith("127.0.0.1-peer-")
    expected = common_pb2.Download()
    expected.CopyFrom(sent)  # as the caller sent it, type and all, plus what the registering peer knows
    expected.concurrent_piece_count = 4
    expected.actual_content_length = SIZE
    expected.actual_piece_length = 4 * MIB
    expected.actual_piece_count = PIECES
    assert register.register_peer_request.download == expected

    assert stream.kinds() == [
        "register_peer_request",
        "download_peer_back_to_source_started_request",
        *["download_piece_back_to_source_finished_request"] * PIECES,
        "download_peer_back_to_source_finished_request",
    ]
    pieces = stream.all("download_piece_back_to_source_finished_request")
    reported = sorted(r.download_piece_back_to_source_finished_request.piece.number for r in pieces)
    assert reported == list(range(PIECES))
    assert stream.half_closed


def test_a_digest_that_does_not_parse_is_refused_before_registering(origin: OriginProcess, tmp_path: Path) -> None:
    download = common_pb2.Download(url=origin.url("model.bin"), digest="sha256:not-hex")
    with recording_scheduler() as (scheduler, address), daemon_for(tmp_path, address) as daemon:
        with pytest.raises(grpc.RpcError) as refused:
            download_task(daemon, download)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "digest" in str(refused.value.details())
        assert scheduler.streams == []


def reschedule_to_source(*parents: common_pb2.Peer) -> Script:
    """The parents first; to the origin once the peer asks again."""

    def answer(stream: Stream, request: scheduler_pb2.AnnouncePeerRequest) -> Any:
        kind = request.WhichOneof("request")
        if kind == "register_peer_request":
            return normal_task(*parents)
        if kind == "reschedule_peer_request":
            return scheduler_pb2.AnnouncePeerResponse(
                need_back_to_source_response=scheduler_pb2.NeedBackToSourceResponse()
            )
        return None

    return answer


def test_failing_parents_are_reported_temporary_and_every_candidate_rescheduled(
    origin: OriginProcess, tmp_path: Path
) -> None:
    parents = (dead_parent("a"), dead_parent("b"))
    download = common_pb2.Download(url=origin.url("model.bin"), tag="dead-parents", need_piece_content=True)
    with (
        recording_scheduler(reschedule_to_source(*parents)) as (scheduler, address),
        daemon_for(tmp_path, address) as daemon,
    ):
        responses = download_task(daemon, download)
        stream = only_stream(scheduler)
    content = sorted((r.download_piece_finished_response.piece for r in responses[1:]), key=lambda p: p.number)
    assert b"".join(piece.content for piece in content) == DATA

    failures = [r.download_piece_failed_request for r in stream.all("download_piece_failed_request")]
    assert failures, stream.kinds()
    assert all(failure.temporary for failure in failures)  # upstream's flag; the scheduler ignores false
    assert {failure.parent_id for failure in failures} <= {parent.id for parent in parents}
    (reschedule,) = stream.all("reschedule_peer_request")
    given_up = [peer.id for peer in reschedule.reschedule_peer_request.candidate_parents]
    assert given_up == [parent.id for parent in parents]
    assert stream.kinds()[:2] == ["register_peer_request", "download_peer_started_request"]
    assert stream.kinds()[-1] == "download_peer_back_to_source_finished_request"


def no_parents(stream: Stream, request: scheduler_pb2.AnnouncePeerRequest) -> Any:
    """A round without candidates for every registration and reschedule, for ever."""
    if request.WhichOneof("request") in {"register_peer_request", "reschedule_peer_request"}:
        return normal_task()
    return None


def test_max_schedule_count_ends_the_stream_then_the_origin_serves(origin: OriginProcess, tmp_path: Path) -> None:
    download = common_pb2.Download(url=origin.url("model.bin"), tag="max-count", output_path=str(tmp_path / "out"))
    p2p_only = common_pb2.Download(url=origin.url("model.bin"), tag="max-count-p2p", disable_back_to_source=True)
    with (
        recording_scheduler(no_parents) as (scheduler, address),
        daemon_for(tmp_path, address, maxScheduleCount=2) as daemon,
    ):
        download_task(daemon, download)
        with pytest.raises(grpc.RpcError) as failed:
            download_task(daemon, p2p_only)
        streams = scheduler.streams
        assert len(streams) == 2
        assert all(stream.closed.wait(30) for stream in streams)
    assert (tmp_path / "out").read_bytes() == DATA
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "scheduler.maxScheduleCount" in str(failed.value.details())
    # Two answers followed, the third one is one too many: the stream ends as failed, then the origin is used
    # directly when it may be.
    for stream in streams:
        assert stream.kinds() == [
            "register_peer_request",
            "download_peer_started_request",
            "reschedule_peer_request",
            "reschedule_peer_request",
            "download_peer_failed_request",
        ]
        assert stream.requests[-1].download_peer_failed_request.description == "max schedule count exceeded"
        assert stream.half_closed


def silent(stream: Stream, request: scheduler_pb2.AnnouncePeerRequest) -> None:
    return None


def test_a_silent_scheduler_sends_the_download_back_to_source_after_schedule_timeout(
    origin: OriginProcess, tmp_path: Path
) -> None:
    allowed = common_pb2.Download(url=origin.url("model.bin"), tag="silent", output_path=str(tmp_path / "out"))
    forbidden = common_pb2.Download(url=origin.url("model.bin"), tag="silent-only-p2p", disable_back_to_source=True)
    with (
        recording_scheduler(silent) as (scheduler, address),
        daemon_for(tmp_path, address, scheduleTimeout="1s") as daemon,
    ):
        download_task(daemon, allowed)
        with pytest.raises(grpc.RpcError) as failed:
            download_task(daemon, forbidden)
        first, second = scheduler.streams
        assert first.closed.wait(30) and second.closed.wait(30)  # the peer dropped both streams
    assert (tmp_path / "out").read_bytes() == DATA
    assert first.kinds() == second.kinds() == ["register_peer_request"]
    assert not first.half_closed  # abandoned, not ended with a report
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "scheduler.scheduleTimeout" in str(failed.value.details())
    assert "back to source is disabled" in str(failed.value.details())


def test_the_peer_waits_for_the_scheduler_to_close_after_its_terminal_request(
    origin: OriginProcess, tmp_path: Path
) -> None:
    download = common_pb2.Download(url=origin.url("model.bin"), tag="close", output_path=str(tmp_path / "out"))
    with recording_scheduler() as (scheduler, address), daemon_for(tmp_path, address) as daemon:
        scheduler.release.clear()  # the scheduler holds the stream open after the terminal request
        download_task(daemon, download)
        assert scheduler.terminal.wait(60), "the terminal request never came"
        (stream,) = scheduler.streams
        time.sleep(0.5)
        # The peer ended its side and is still there, waiting for the scheduler to end the call.
        assert stream.half_closed and stream.is_active() and not stream.closed.is_set()
        scheduler.release.set()
        assert stream.closed.wait(30)
    assert (tmp_path / "out").read_bytes() == DATA
    assert stream.kinds()[-1] == "download_peer_back_to_source_finished_request"
    assert "did not close cleanly" not in daemon.log()  # it read the scheduler's close, not its own timeout
