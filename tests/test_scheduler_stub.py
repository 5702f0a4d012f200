"""The scheduler stub as its own process, driven over gRPC the way Dragonfly peers drive a scheduler."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dfdaemon.api import common_pb2, scheduler_pb2
from dfdaemon.api.scheduler_pb2_grpc import SchedulerStub
from scheduler_stub.registry import Answer, NoParentAvailable, Registry, Task
from tests.support import REPO_ROOT, wait_for_line

READ_TIMEOUT = 10.0
PIECE = 4 * 1024 * 1024


@dataclass
class Stub:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def start_stub(workdir: Path, log_level: str = "info") -> Stub:
    """Run ``python -m scheduler_stub`` on a free loopback port and learn the port from its log."""
    log_path = workdir / "dfscheduler.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_stub", "--listen", "127.0.0.1:0", "--log-level", log_level],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    port = int(wait_for_line(log_path, r"scheduler listening on 127\.0\.0\.1:(\d+)", proc).group(1))
    assert port > 0
    return Stub(proc, f"127.0.0.1:{port}", log_path)


def stop_stub(stub: Stub, sig: int = signal.SIGTERM) -> int:
    if stub.proc.poll() is None:
        stub.proc.send_signal(sig)
        try:
            stub.proc.wait(15)
        except subprocess.TimeoutExpired:
            stub.proc.kill()
            stub.proc.wait()
    return stub.proc.returncode


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    running = start_stub(tmp_path_factory.mktemp("scheduler"), log_level="debug")
    try:
        yield running
    finally:
        stop_stub(running)


@pytest.fixture
async def client(scheduler: Stub) -> AsyncIterator[SchedulerStub]:
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        yield SchedulerStub(channel)


def new_id() -> str:
    return uuid.uuid4().hex


def new_task_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


async def announce(
    client: SchedulerStub, number: int, *, host_type: int = 0, interval: float | None = None
) -> common_pb2.Host:
    """Announce a host with a unique id, reachable at 10.0.0.<number>:<4000 + number>."""
    host = common_pb2.Host(
        id=f"10.0.0.{number}-host{number}-{new_id()}",
        type=host_type,
        hostname=f"host{number}",
        ip=f"10.0.0.{number}",
        port=4000 + number,
    )
    request = scheduler_pb2.AnnounceHostRequest(host=host)
    if interval is not None:
        request.interval.CopyFrom(Duration(seconds=int(interval), nanos=int(interval % 1 * 1e9)))
    await client.AnnounceHost(request)
    return host


class PeerStream:
    """One download's AnnouncePeer stream, driven as a daemon drives it."""

    def __init__(self, client: SchedulerStub, host: common_pb2.Host, task_id: str) -> None:
        self.call = client.AnnouncePeer()
        self.host = host
        self.task_id = task_id
        self.peer_id = f"{host.ip}-{host.hostname}-{uuid.uuid4()}"

    async def send(self, **request: Any) -> None:
        await self.call.write(
            scheduler_pb2.AnnouncePeerRequest(
                host_id=self.host.id, task_id=self.task_id, peer_id=self.peer_id, **request
            )
        )

    async def read(self) -> scheduler_pb2.AnnouncePeerResponse:
        response = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        assert response is not grpc.aio.EOF, "the scheduler closed the stream"
        assert isinstance(response, scheduler_pb2.AnnouncePeerResponse)
        return response

    async def register(self, content_length: int = 2 * PIECE, **download: Any) -> scheduler_pb2.AnnouncePeerResponse:
        await self.send(
            register_peer_request=scheduler_pb2.RegisterPeerRequest(
                download=common_pb2.Download(
                    url="http://origin.test/file",
                    actual_content_length=content_length,
                    actual_piece_length=PIECE,
                    actual_piece_count=-(-content_length // PIECE),
                    **download,
                )
            )
        )
        return await self.read()

    async def reschedule(self, *given_up: str) -> scheduler_pb2.AnnouncePeerResponse:
        parents = [common_pb2.Peer(id=parent) for parent in given_up]
        await self.send(reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(candidate_parents=parents))
        return await self.read()

    async def rejected(self) -> grpc.aio.AioRpcError:
        """The error the scheduler ended the stream with."""
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        return raised.value

    async def closed_by_scheduler(self) -> bool:
        """True when the scheduler ended the stream with OK without the peer half-closing it."""
        end = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        return end is grpc.aio.EOF and await self.call.code() == grpc.StatusCode.OK

    async def back_to_source(self, pieces: int = 2) -> None:
        await self.send(
            download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest()
        )
        for number in range(pieces):
            piece = common_pb2.Piece(number=number, offset=number * PIECE, length=PIECE, digest="crc32:1")
            await self.send(
                download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                    piece=piece
                )
            )
        await self.send(
            download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest()
        )
        assert await self.closed_by_scheduler()

    async def started(self) -> None:
        await self.send(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest())

    async def finished(self) -> None:
        await self.send(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest())
        assert await self.closed_by_scheduler()


async def seeded(client: SchedulerStub, host: common_pb2.Host, task_id: str) -> PeerStream:
    """A peer that fetched the whole task from the source and stays a parent for later children."""
    peer = PeerStream(client, host, task_id)
    answer = await peer.register(need_back_to_source=True)
    assert answer.WhichOneof("response") == "need_back_to_source_response"
    await peer.back_to_source()
    return peer


async def wait_for_state(client: SchedulerStub, peer: PeerStream, state: str) -> None:
    """Reports on one stream race requests on others: wait until the scheduler has taken this one in."""
    request = scheduler_pb2.StatPeerRequest(host_id=peer.host.id, task_id=peer.task_id, peer_id=peer.peer_id)
    for _ in range(200):
        if (await client.StatPeer(request)).state == state:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"peer {peer.peer_id} never reached {state}")


def parent_ids(answer: scheduler_pb2.AnnouncePeerResponse) -> list[str]:
    assert answer.WhichOneof("response") == "normal_task_response", answer
    return [parent.id for parent in answer.normal_task_response.candidate_parents]


async def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    code: grpc.StatusCode = raised.value.code()
    return code


async def test_peers_are_sent_to_the_source_first_then_to_each_other(scheduler: Stub, client: SchedulerStub) -> None:
    host_a, host_b, _ = [await announce(client, n) for n in (1, 2, 3)]
    task_id = new_task_id()

    first = PeerStream(client, host_a, task_id)
    answer = await first.register()
    assert answer.WhichOneof("response") == "need_back_to_source_response"
    assert answer.need_back_to_source_response.description
    await first.back_to_source(pieces=2)

    child = PeerStream(client, host_b, task_id)
    answer = await child.register()
    (parent,) = answer.normal_task_response.candidate_parents
    assert parent.id == first.peer_id != child.peer_id
    assert (parent.host.id, parent.host.ip, parent.host.port, parent.host.hostname) == (
        host_a.id,
        "10.0.0.1",
        4001,
        "host1",
    )
    assert parent.state == "Succeeded"
    assert (parent.task.id, parent.task.content_length, parent.task.piece_count) == (task_id, 2 * PIECE, 2)
    await child.started()
    piece = common_pb2.Piece(number=0, parent_id=first.peer_id, offset=0, length=PIECE, digest="crc32:1")
    await child.send(download_piece_finished_request=scheduler_pb2.DownloadPieceFinishedRequest(piece=piece))
    await wait_for_state(client, child, "Running")

    same_host = PeerStream(client, host_a, task_id)
    assert parent_ids(await same_host.register()) == [child.peer_id]

    stat = await client.StatTask(scheduler_pb2.StatTaskRequest(host_id=host_b.id, task_id=task_id))
    assert (stat.id, stat.type, stat.url, stat.state) == (
        task_id,
        common_pb2.STANDARD,
        "http://origin.test/file",
        "Succeeded",
    )
    assert (stat.peer_count, stat.has_available_peer, stat.content_length, stat.piece_count) == (3, True, 2 * PIECE, 2)

    await child.finished()
    same_host.call.cancel()
    log = scheduler.log()
    assert f"register peer {first.peer_id} of task {task_id} on host {host_a.id}: back to source" in log
    assert (
        f"register peer {child.peer_id} of task {task_id} on host {host_b.id}: normal, parents [{first.peer_id}@" in log
    )
    assert f"peer {child.peer_id} of task {task_id} succeeded" in log
    assert "AnnouncePeer <- " in log and "AnnouncePeer -> " in log


async def test_peer_sent_to_the_source_is_a_parent_before_its_first_report(client: SchedulerStub) -> None:
    task_id = new_task_id()
    first = PeerStream(client, await announce(client, 26), task_id)
    assert (await first.register()).WhichOneof("response") == "need_back_to_source_response"
    second = PeerStream(client, await announce(client, 27), task_id)
    assert parent_ids(await second.register()) == [first.peer_id]
    first.call.cancel()
    second.call.cancel()


async def test_zero_length_task_is_answered_empty(client: SchedulerStub) -> None:
    peer = PeerStream(client, await announce(client, 4), new_task_id())
    answer = await peer.register(content_length=0)
    assert answer.WhichOneof("response") == "empty_task_response"
    await peer.started()
    await peer.finished()


async def test_peer_asking_for_the_source_gets_it_even_with_parents_around(client: SchedulerStub) -> None:
    task_id = new_task_id()
    await seeded(client, await announce(client, 5), task_id)
    peer = PeerStream(client, await announce(client, 6), task_id)
    answer = await peer.register(need_back_to_source=True)
    assert answer.WhichOneof("response") == "need_back_to_source_response"
    peer.call.cancel()


async def test_a_parent_reported_failing_is_not_offered_again(client: SchedulerStub, scheduler: Stub) -> None:
    hosts = [await announce(client, n) for n in (7, 8, 9)]
    task_id = new_task_id()
    bad = await seeded(client, hosts[0], task_id)
    good = await seeded(client, hosts[1], task_id)

    child = PeerStream(client, hosts[2], task_id)
    assert sorted(parent_ids(await child.register())) == sorted([bad.peer_id, good.peer_id])
    await child.started()
    await child.send(
        download_piece_failed_request=scheduler_pb2.DownloadPieceFailedRequest(
            piece_number=0, parent_id=bad.peer_id, temporary=True
        )
    )
    assert parent_ids(await child.reschedule()) == [good.peer_id]
    assert parent_ids(await child.reschedule()) == [good.peer_id]
    child.call.cancel()
    # The report is on record with its fields (the stub answered the reschedule after reading it).
    record = f"piece failed: task={task_id} peer={child.peer_id} parent={bad.peer_id} piece=0 temporary=true"
    assert record in scheduler.log()


async def test_peer_goes_back_to_source_after_four_fruitless_reschedules(client: SchedulerStub) -> None:
    task_id = new_task_id()
    parent = await seeded(client, await announce(client, 10), task_id)
    child = PeerStream(client, await announce(client, 11), task_id)
    assert parent_ids(await child.register()) == [parent.peer_id]
    await child.started()
    for _ in range(3):
        assert parent_ids(await child.reschedule(parent.peer_id)) == []
    answer = await child.reschedule()
    assert answer.WhichOneof("response") == "need_back_to_source_response"
    assert "4 scheduling attempts" in answer.need_back_to_source_response.description
    await child.back_to_source()


async def test_delete_task_stops_offering_that_hosts_peer(client: SchedulerStub) -> None:
    host_a, host_b = await announce(client, 12), await announce(client, 13)
    task_id = new_task_id()
    await seeded(client, host_a, task_id)
    await client.DeleteTask(scheduler_pb2.DeleteTaskRequest(host_id=host_a.id, task_id=task_id))
    assert await status_of(client.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id))) == grpc.StatusCode.NOT_FOUND

    child = PeerStream(client, host_b, task_id)
    assert (await child.register()).WhichOneof("response") == "need_back_to_source_response"
    stat = await client.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id))
    assert (stat.peer_count, stat.state, stat.has_available_peer) == (1, "Running", True)
    await child.back_to_source()


async def test_delete_host_forgets_it_and_its_peers(client: SchedulerStub) -> None:
    leaving, staying = await announce(client, 14), await announce(client, 15)
    task_id = new_task_id()
    await seeded(client, leaving, task_id)
    await client.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id=leaving.id))

    hosts = {host.id for host in (await client.ListHosts(scheduler_pb2.ListHostsRequest())).hosts}
    assert leaving.id not in hosts and staying.id in hosts
    assert await status_of(client.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id))) == grpc.StatusCode.NOT_FOUND
    child = PeerStream(client, staying, task_id)
    assert (await child.register()).WhichOneof("response") == "need_back_to_source_response"
    child.call.cancel()


async def test_delete_host_ends_its_downloads_and_keeps_the_other_parents(client: SchedulerStub) -> None:
    leaving, staying, child_host = [await announce(client, n) for n in (28, 29, 30)]
    task_id, other_task = new_task_id(), new_task_id()
    await seeded(client, leaving, task_id)
    kept = await seeded(client, staying, task_id)
    running = PeerStream(client, leaving, other_task)
    assert (await running.register()).WhichOneof("response") == "need_back_to_source_response"
    await running.started()
    await wait_for_state(client, running, "Running")

    await client.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id=leaving.id))

    child = PeerStream(client, child_host, task_id)
    assert parent_ids(await child.register()) == [kept.peer_id]
    stat = await client.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id))
    assert stat.peer_count == 2  # the staying parent and the new child
    stat_running = scheduler_pb2.StatPeerRequest(task_id=other_task, peer_id=running.peer_id)
    assert await status_of(client.StatPeer(stat_running)) == grpc.StatusCode.NOT_FOUND
    # The leaving host's download in progress can neither report nor register again: nothing brings it back.
    piece = common_pb2.Piece(number=0, offset=0, length=PIECE, digest="crc32:1")
    await running.send(
        download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
            piece=piece
        )
    )
    assert (await running.rejected()).code() == grpc.StatusCode.NOT_FOUND
    again = PeerStream(client, leaving, task_id)
    await again.send(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=common_pb2.Download(url="u")))
    assert (await again.rejected()).code() == grpc.StatusCode.FAILED_PRECONDITION
    child.call.cancel()


async def test_delete_host_is_idempotent_and_needs_an_id(client: SchedulerStub) -> None:
    leaving = await announce(client, 31)
    for _ in range(2):
        await client.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id=leaving.id))
    empty = scheduler_pb2.DeleteHostRequest(host_id="")
    assert await status_of(client.DeleteHost(empty)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_hosts_filters_by_type(client: SchedulerStub) -> None:
    normal, seed = await announce(client, 16), await announce(client, 17, host_type=1)
    everyone = (await client.ListHosts(scheduler_pb2.ListHostsRequest())).hosts
    assert {normal.id, seed.id} <= {host.id for host in everyone}
    listed = next(host for host in everyone if host.id == seed.id)
    assert (listed.ip, listed.port, listed.hostname, listed.type) == ("10.0.0.17", 4017, "host17", 1)
    seeds = (await client.ListHosts(scheduler_pb2.ListHostsRequest(type=1))).hosts
    assert seed.id in {host.id for host in seeds} and all(host.type == 1 for host in seeds)
    # Gone again: with a seed around, the shared stub would send the other tests' first peers to it.
    await client.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id=seed.id))


async def test_register_from_unknown_host_fails_precondition(client: SchedulerStub) -> None:
    stranger = common_pb2.Host(id="10.9.9.9-stranger", ip="10.9.9.9", hostname="stranger", port=4000)
    peer = PeerStream(client, stranger, new_task_id())
    await peer.send(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=common_pb2.Download(url="u")))
    error = await peer.rejected()
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "host 10.9.9.9-stranger has not announced itself"


async def test_register_without_ids_is_invalid(client: SchedulerStub) -> None:
    peer = PeerStream(client, await announce(client, 18), "")
    await peer.send(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=common_pb2.Download(url="u")))
    assert (await peer.rejected()).code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_report_before_register_fails_precondition(client: SchedulerStub) -> None:
    peer = PeerStream(client, await announce(client, 19), new_task_id())
    await peer.started()
    assert (await peer.rejected()).code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_stream_closed_without_final_report_leaves_the_peer_failed(client: SchedulerStub) -> None:
    host_a, host_b = await announce(client, 20), await announce(client, 21)
    task_id = new_task_id()
    quitter = PeerStream(client, host_a, task_id)
    await quitter.register()
    await quitter.send(
        download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest()
    )
    await quitter.call.done_writing()
    assert await quitter.closed_by_scheduler()

    peer = await client.StatPeer(scheduler_pb2.StatPeerRequest(task_id=task_id, peer_id=quitter.peer_id))
    assert peer.state == "Failed"
    child = PeerStream(client, host_b, task_id)
    assert (await child.register()).WhichOneof("response") == "need_back_to_source_response"
    child.call.cancel()


async def test_stub_keeps_serving_after_a_client_cancels_mid_stream(client: SchedulerStub) -> None:
    task_id = new_task_id()
    peer = PeerStream(client, await announce(client, 22), task_id)
    await peer.register()
    await peer.send(download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest())
    peer.call.cancel()

    await wait_for_state(client, peer, "Failed")
    again = await seeded(client, await announce(client, 23), new_task_id())
    assert again.peer_id


async def test_silent_host_is_forgotten_after_two_intervals(client: SchedulerStub) -> None:
    silent = await announce(client, 24, interval=1.0)
    chatty = await announce(client, 25)
    task_id = new_task_id()
    await seeded(client, silent, task_id)
    assert silent.id in {host.id for host in (await client.ListHosts(scheduler_pb2.ListHostsRequest())).hosts}

    await asyncio.sleep(2.5)
    hosts = {host.id for host in (await client.ListHosts(scheduler_pb2.ListHostsRequest())).hosts}
    assert silent.id not in hosts and chatty.id in hosts
    assert await status_of(client.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id))) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", ["", "scheduler.v2.Scheduler"])
async def test_health_is_serving(scheduler: Stub, service: str) -> None:
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signal(tmp_path: Path, sig: int) -> None:
    stub = start_stub(tmp_path)
    assert stop_stub(stub, sig) == 0
    assert "Traceback" not in stub.log()


def test_deleted_host_peers_are_never_candidates_even_after_it_rejoins() -> None:
    registry = Registry()
    for number in (1, 2, 3):
        registry.announce_host(f"h{number}", f"10.0.0.{number}", 4000, f"h{number}", 0, 60.0)
    for host in ("h1", "h2"):
        registry.register_peer(f"{host}-peer", host, Task("t"), need_back_to_source=True)
        registry.peer_finished(f"{host}-peer", succeeded=True)
    registry.register_peer("h1-only", "h1", Task("t-h1"), need_back_to_source=True)

    registry.delete_host("h1")

    assert {host.id for host in registry.list_hosts()} == {"h2", "h3"}
    assert set(registry.peers) == {"h2-peer"} and set(registry.tasks) == {"t"}
    registry.announce_host("h1", "10.0.0.1", 4000, "h1", 0, 60.0)  # a restarted daemon joins afresh
    schedule = registry.register_peer("child", "h3", Task("t"))
    assert [view.peer.id for view in schedule.parents] == ["h2-peer"]
    assert registry.register_peer("child-h1", "h3", Task("t-h1")).answer is Answer.BACK_TO_SOURCE


def test_hosts_expire_after_two_intervals_default_five_minutes() -> None:
    now = [0.0]
    registry = Registry(clock=lambda: now[0])
    registry.announce_host("quick", "10.1.0.1", 4000, "quick", 0, 2.0)
    registry.announce_host("default", "10.1.0.2", 4000, "default", 0, None)
    now[0] = 3.9
    assert {host.id for host in registry.list_hosts()} == {"quick", "default"}
    now[0] = 4.0
    assert {host.id for host in registry.list_hosts()} == {"default"}
    now[0] = 599.9
    assert {host.id for host in registry.list_hosts()} == {"default"}
    now[0] = 600.0
    assert registry.list_hosts() == []


def test_peer_that_may_not_go_to_the_source_fails_when_no_parent_turns_up() -> None:
    registry = Registry()
    registry.announce_host("h", "10.1.0.1", 4000, "h", 0, None)
    schedule = registry.register_peer("p", "h", Task(id="t", content_length=PIECE), may_back_to_source=False)
    assert (schedule.answer, schedule.parents) == (Answer.NORMAL, [])
    registry.reschedule_peer("p", [])
    registry.reschedule_peer("p", [])
    with pytest.raises(NoParentAvailable):
        registry.reschedule_peer("p", [])
