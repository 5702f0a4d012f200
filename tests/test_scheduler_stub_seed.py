"""Seed triggering: the stub (its own process) asks a seed peer for a new task instead of sending the first child to
the origin. The seed here is a recording fake ``DfdaemonUpload`` in the test's process that, like a seed daemon,
registers the task back to source with the stub when asked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from dfdaemon.api.scheduler_pb2_grpc import SchedulerStub
from tests.test_scheduler_stub import PeerStream, Stub, announce, new_task_id, parent_ids, start_stub, stop_stub


class FakeSeed(dfdaemon_pb2_grpc.DfdaemonUploadServicer):
    """Records every DownloadTask; with ``fail`` it refuses, else it downloads "from the source" through the stub."""

    def __init__(self, scheduler: SchedulerStub, fail: bool = False) -> None:
        self.scheduler = scheduler
        self.fail = fail
        self.requests: list[dfdaemon_pb2.DownloadTaskRequest] = []
        self.host = common_pb2.Host()

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: Any
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        self.requests.append(request)
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the seed's origin is down")
        task_id = request.download.tag  # the tests carry the task id in the tag
        peer = PeerStream(self.scheduler, self.host, task_id)
        answer = await peer.register(need_back_to_source=request.download.need_back_to_source)
        assert answer.WhichOneof("response") == "need_back_to_source_response"
        await peer.back_to_source(pieces=2)
        yield dfdaemon_pb2.DownloadTaskResponse(host_id=self.host.id, task_id=task_id, peer_id=peer.peer_id)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Stub]:
    running = start_stub(tmp_path)
    try:
        yield running
    finally:
        stop_stub(running)


@asynccontextmanager
async def serving_seed(client: SchedulerStub, fail: bool = False) -> AsyncIterator[FakeSeed]:
    """The fake seed on a free port, announced to the stub as a super seed (type 1), stopped afterwards."""
    seed = FakeSeed(client, fail)
    server = grpc.aio.server()
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(seed, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        seed.host = common_pb2.Host(id="127.0.0.1-seed-seed", type=1, hostname="seed", ip="127.0.0.1", port=port)
        await client.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=seed.host))
        yield seed
    finally:
        await server.stop(None)


async def test_first_child_gets_the_triggered_seed_as_its_parent(stub: Stub) -> None:
    async with grpc.aio.insecure_channel(stub.address) as channel:
        client = SchedulerStub(channel)
        async with serving_seed(client) as seed:
            task_id = new_task_id()
            child = PeerStream(client, await announce(client, 1), task_id)
            answer = await child.register(tag=task_id, output_path="child.bin", priority=common_pb2.LEVEL6)
            (parent,) = answer.normal_task_response.candidate_parents
            assert parent.host.id == seed.host.id and parent.host.port == seed.host.port
            (request,) = seed.requests
            # The child's Download, sent back to source, with no output file on the seed.
            assert request.download.url == "http://origin.test/file" and request.download.tag == task_id
            assert request.download.need_back_to_source and not request.download.HasField("output_path")
            assert request.download.priority == common_pb2.LEVEL6

            # A second child of the task is offered the seed too, and the seed is not asked again.
            second = PeerStream(client, await announce(client, 2), task_id)
            assert seed.host.id in {
                p.host.id for p in (await second.register(tag=task_id)).normal_task_response.candidate_parents
            }
            assert len(seed.requests) == 1
            child.call.cancel()
            second.call.cancel()
    assert f"asking seed peer {seed.host.id} to download task {task_id}" in stub.log()


async def test_a_failing_seed_sends_the_children_to_the_source(stub: Stub) -> None:
    async with grpc.aio.insecure_channel(stub.address) as channel:
        client = SchedulerStub(channel)
        async with serving_seed(client, fail=True) as seed:
            task_id = new_task_id()
            child = PeerStream(client, await announce(client, 3), task_id)
            answer = await child.register(tag=task_id)
            assert answer.WhichOneof("response") == "need_back_to_source_response"
            assert len(seed.requests) == 1
            # The seed failed this task: the next child goes to the source (or the first child) without asking it.
            later = PeerStream(client, await announce(client, 4), task_id)
            assert parent_ids(await later.register(tag=task_id)) == [child.peer_id]
            other = PeerStream(client, await announce(client, 5), new_task_id())
            await other.register()
            assert len(seed.requests) == 2  # another task asks the seed again
            for peer in (child, later, other):
                peer.call.cancel()


async def test_a_seed_host_never_triggers_itself_and_normal_children_use_its_peer(stub: Stub) -> None:
    async with grpc.aio.insecure_channel(stub.address) as channel:
        client = SchedulerStub(channel)
        async with serving_seed(client) as seed:
            task_id = new_task_id()
            on_seed = PeerStream(client, seed.host, task_id)
            assert (await on_seed.register()).WhichOneof("response") == "need_back_to_source_response"
            child = PeerStream(client, await announce(client, 6), task_id)
            assert parent_ids(await child.register()) == [on_seed.peer_id]
            assert seed.requests == []
            await on_seed.back_to_source(pieces=2)
            child.call.cancel()
