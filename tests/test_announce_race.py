"""The AnnouncePeer race: peers that get every piece from parents must report success, every time.

Three peers fetch one task from a fresh seed at once, over a real ``scheduler.v2`` stream to the stub's servicer
(in process, on an ephemeral port) and the real gRPC session; the parents are in-process fakes that answer at
once, so many pieces finish together and the collection ends while other pieces' reports are still being
written. A report cut short there used to cancel the whole AnnouncePeer call: the peer then found its stream
finished, went back to source, and the stub recorded it as failed. Each round checks what the stub recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from dfdaemon import ids
from dfdaemon.download.manager import DownloadManager, DownloadRequest, TaskJob
from dfdaemon.download.peering import FetchedPiece, Parent
from dfdaemon.download.scheduled import ScheduledFetch
from dfdaemon.ids import PieceSpan
from dfdaemon.ratelimit import Bandwidth
from dfdaemon.rpc.scheduler_client import HostInfo, SchedulerClient
from dfdaemon.rpc.servers import add_service, new_server
from dfdaemon.storage import Storage, TaskInfo
from scheduler_stub.registry import PeerState, Registry, Task
from scheduler_stub.service import SERVICE, SchedulerServicer
from tests.storage_support import FakeClock, payload, read_all

PIECE_LENGTH = 1024
SIZE = 48 * PIECE_LENGTH + 7
CONTENT = payload("announce-race", SIZE)
SPANS = ids.pieces_for(SIZE, PIECE_LENGTH)
PEERS = 3
ROUNDS = 30
pytestmark = pytest.mark.slow


class InstantParents:
    """Every parent holds every piece and answers without delay (the seed's pieces are all on disk)."""

    async def sync_pieces(self, parent: Parent, task_id: str, interested: list[int]) -> AsyncIterator[PieceSpan]:
        for number in interested:
            yield SPANS[number]

    async def download_piece(self, parent: Parent, task_id: str, number: int) -> FetchedPiece:
        span = SPANS[number]
        content = CONTENT[span.offset : span.end]
        digest = ids.piece_digest(content)
        metadata = ids.piece_metadata_digest(number, span.offset, span.length, digest)
        return FetchedPiece(number, span.offset, span.length, digest, metadata, content)


@dataclass
class SourceRecorder:
    """The part of the manager ScheduledFetch uses; a trip to the source is recorded and refused."""

    concurrent_piece_count: int = 8
    went_to_source: list[str] = field(default_factory=list)
    bandwidth: Bandwidth = field(default_factory=Bandwidth.of)

    async def back_to_source(self, job: TaskJob, **_: object) -> None:
        self.went_to_source.append(job.peer_id)
        raise AssertionError(f"peer {job.peer_id} went back to source")


@pytest.fixture
async def stub() -> AsyncIterator[tuple[Registry, str]]:
    registry = Registry()
    server, _ = new_server([SERVICE.full_name], lambda s: add_service(s, SERVICE, SchedulerServicer(registry)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield registry, f"127.0.0.1:{port}"
    await server.stop(None)


async def one_peer(
    client: SchedulerClient, storage: Storage, manager: SourceRecorder, task_id: str, peer_id: str
) -> None:
    # Tiny tasks keep the rounds quick; a task this small would otherwise skip the scheduler (test_small_download).
    fetch = ScheduledFetch(
        cast(DownloadManager, manager), client, InstantParents(), piece_timeout=10.0, small_download_limit=0
    )
    job = TaskJob(task_id, peer_id, DownloadRequest(url="http://origin.test/race", concurrent_piece_count=8))
    job.content_length, job.piece_length = SIZE, PIECE_LENGTH
    info = TaskInfo(url="http://origin.test/race", piece_length=PIECE_LENGTH, content_length=SIZE)
    async with storage.download(task_id, info) as writer:
        job.writer = writer
        await fetch(job)
        await writer.finish()


async def test_peers_with_every_piece_always_report_success(stub: tuple[Registry, str], tmp_path: Path) -> None:
    registry, address = stub
    registry.announce_host("seed-host", "127.0.0.1", 1, "seed", 1, 60.0)
    clients = [
        SchedulerClient([address], HostInfo(f"host-{i}", "127.0.0.1", f"peer{i}", 1), 60.0, 10.0) for i in range(PEERS)
    ]
    storages = [Storage(tmp_path / f"peer{i}", clock=FakeClock()) for i in range(PEERS)]
    manager = SourceRecorder()
    try:
        for client, storage in zip(clients, storages, strict=True):
            await client.announce_host()
            await storage.open()
        for round_ in range(ROUNDS):
            task_id = ids.task_id(f"http://origin.test/race/{round_}")
            registry.register_peer(f"seed-{round_}", "seed-host", Task(id=task_id))  # back to source: a parent
            peer_ids = [f"peer{i}-{round_}" for i in range(PEERS)]
            await asyncio.gather(
                *(
                    one_peer(client, storage, manager, task_id, peer_id)
                    for client, storage, peer_id in zip(clients, storages, peer_ids, strict=True)
                )
            )
            states = {peer_id: registry.peers[peer_id].state for peer_id in peer_ids}
            assert states == dict.fromkeys(peer_ids, PeerState.SUCCEEDED), f"round {round_}"
            for storage in storages:
                assert await read_all(storage, task_id) == CONTENT
        assert manager.went_to_source == []
    finally:
        for client in clients:
            await client.close()
        for storage in storages:
            await storage.close()
