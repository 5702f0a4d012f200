"""Ranged requests and the task's one job: a DownloadManager with real storage against a loopback aiohttp origin.

The origin records the Range of every GET and can hold GETs back until the test lets them go, so requests can be
made to overlap without any timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from dfdaemon.backend import Backend, RetryPolicy
from dfdaemon.download import DownloadManager, DownloadPrecondition, DownloadRequest, PieceDone, Started
from dfdaemon.download.ranges import ByteRange
from dfdaemon.gc import GarbageCollector, GCPolicy
from dfdaemon.storage import Storage, TaskState, TrafficType
from tests.storage_support import seeded_bytes
from tests.support import serving

MIB = 1024 * 1024
PIECE = 4 * MIB
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Origin:
    body: bytes
    gets: list[tuple[int, int]] = field(default_factory=list)  # each GET's first and last byte
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    asked: asyncio.Event = field(default_factory=asyncio.Event)  # set by the first GET
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers_seen.append(dict(request.headers))
        size = len(self.body)
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        start, last = (int(match.group(1)), min(int(match.group(2)), size - 1)) if match else (0, size - 1)
        headers = {"Content-Length": str(last - start + 1), "Accept-Ranges": "bytes"}
        if match:
            headers["Content-Range"] = f"bytes {start}-{last}/{size}"
        response = web.StreamResponse(status=206 if match else 200, headers=headers)
        if request.method == "GET" and request.headers.get("Range") != "bytes=0-0":
            self.gets.append((start, last))
            self.asked.set()
            await self.gate.wait()
        await response.prepare(request)
        if request.method == "GET":
            await response.write(self.body[start : last + 1])
        await response.write_eof()
        return response


@dataclass
class Daemon:
    storage: Storage
    manager: DownloadManager


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    storage = Storage(tmp_path / "storage")
    await storage.open()
    backend = Backend(timeout=10, retry=RetryPolicy(attempts=2, initial_backoff=0.01))
    manager = DownloadManager(
        storage, GarbageCollector(storage, GCPolicy()), backend, host_ip="127.0.0.1", hostname="t"
    )
    try:
        yield Daemon(storage, manager)
    finally:
        await manager.close()
        await backend.close()
        await storage.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    served = Origin(seeded_bytes("test_ranges_jobs-1", 6 * PIECE + 12345))
    app = web.Application()
    app.router.add_route("*", "/file", served.handle)
    async with serving(app) as port:
        served.url = f"http://127.0.0.1:{port}/file"
        try:
            yield served
        finally:
            served.gate.set()


async def fetch(daemon: Daemon, request: DownloadRequest) -> tuple[Started, list[PieceDone]]:
    events = [event async for event in daemon.manager.download(request)]
    started = events[0]
    assert isinstance(started, Started)
    return started, [event for event in events[1:] if isinstance(event, PieceDone)]


async def until_finished(storage: Storage, task_id: str) -> None:
    async with asyncio.timeout(30):
        while (task := await storage.get_task(task_id)) is None or task.state is not TaskState.SUCCEEDED:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):  # a change may come between the look and the wait
                    await storage.wait_for_change(task_id)


def cut(pieces: list[PieceDone], byte_range: ByteRange) -> bytes:
    ordered = sorted(pieces, key=lambda done: done.piece.offset)
    joined = b"".join(done.content or b"" for done in ordered)
    return joined[byte_range.start - ordered[0].piece.offset :][: byte_range.length]


async def test_a_ranged_job_leaves_a_partial_task_that_later_jobs_complete(daemon: Daemon, origin: Origin) -> None:
    origin.gate.set()
    wanted = ByteRange(PIECE + 10, PIECE)  # pieces 1 and 2
    ranged = DownloadRequest(url=origin.url, request_header={"Range": "bytes=4194314-8388617"}, need_piece_content=True)
    started, pieces = await fetch(daemon, ranged)
    assert started.range == wanted
    assert [done.piece.number for done in pieces] == [1, 2]
    assert cut(pieces, wanted) == origin.body[wanted.start : wanted.end]
    assert origin.gets == [(PIECE, 3 * PIECE - 1)]
    assert ranged.request_header["Range"] not in {seen.get("Range") for seen in origin.headers_seen}
    task = await daemon.storage.get_task(started.task_id)
    assert task is not None and task.state is TaskState.RUNNING  # partial: recorded, not finished
    assert [piece.number for piece in await daemon.storage.pieces(started.task_id)] == [1, 2]

    # The same pieces again: all local, nothing fetched.
    _, again = await fetch(daemon, DownloadRequest(url=origin.url, range=ByteRange(PIECE, 10)))
    assert [(done.piece.number, done.traffic_type) for done in again] == [(1, TrafficType.LOCAL_PEER)]
    assert len(origin.gets) == 1

    # The whole file: only the pieces around the range come from the origin, and the task is complete.
    _, whole = await fetch(daemon, DownloadRequest(url=origin.url))
    assert origin.gets[1:] == [(0, PIECE - 1), (3 * PIECE, len(origin.body) - 1)]
    traffic = {done.piece.number: done.traffic_type for done in whole}
    assert traffic[1] == traffic[2] == TrafficType.LOCAL_PEER
    assert {traffic[n] for n in (0, 3, 4, 5, 6)} == {TrafficType.BACK_TO_SOURCE}
    await until_finished(daemon.storage, started.task_id)  # the job finishes the task once its last piece is out
    assert daemon.storage.content.path(started.task_id).read_bytes() == origin.body


async def test_a_full_request_joining_a_ranged_job_gets_the_rest_after_it(daemon: Daemon, origin: Origin) -> None:
    ranged = asyncio.create_task(fetch(daemon, DownloadRequest(url=origin.url, range=ByteRange(2 * PIECE, 5))))
    async with asyncio.timeout(30):
        await origin.asked.wait()  # the ranged job has asked the origin for its piece and is held there
    whole = asyncio.create_task(fetch(daemon, DownloadRequest(url=origin.url)))
    for _ in range(50):  # let the full request join the held job (had it not, the outcome would be the same)
        await asyncio.sleep(0)
    origin.gate.set()
    (_, ranged_pieces), (started, whole_pieces) = await asyncio.gather(ranged, whole)
    assert [done.piece.number for done in ranged_pieces] == [2]
    assert sorted(done.piece.number for done in whole_pieces) == list(range(7))
    assert origin.gets == [(2 * PIECE, 3 * PIECE - 1), (0, 2 * PIECE - 1), (3 * PIECE, len(origin.body) - 1)]
    assert daemon.storage.content.path(started.task_id).read_bytes() == origin.body


async def test_a_range_that_selects_nothing_fetches_nothing(daemon: Daemon, origin: Origin) -> None:
    origin.gate.set()
    for request in (
        DownloadRequest(url=origin.url, request_header={"Range": f"bytes={len(origin.body)}-"}),
        DownloadRequest(url=origin.url, range=ByteRange(len(origin.body) - 1, 2)),
    ):
        with pytest.raises(DownloadPrecondition):
            await fetch(daemon, request)
    with pytest.raises(DownloadPrecondition, match="does not start with"):
        await fetch(daemon, DownloadRequest(url=origin.url, request_header={"Range": "items=0-1"}))
    assert origin.gets == []
    assert await daemon.storage.get_task(DownloadRequest(url=origin.url).task_id()) is None
    _, pieces = await fetch(daemon, DownloadRequest(url=origin.url, request_header={"Range": "bytes=-1"}))
    assert [done.piece.number for done in pieces] == [6]
    assert origin.gets == [(6 * PIECE, len(origin.body) - 1)]


async def test_a_ranged_request_with_a_digest_fetches_and_checks_the_whole_file(daemon: Daemon, origin: Origin) -> None:
    origin.gate.set()
    digest = "sha256:" + hashlib.sha256(origin.body).hexdigest()
    started, pieces = await fetch(daemon, DownloadRequest(url=origin.url, range=ByteRange(0, 10), digest=digest))
    assert [done.piece.number for done in pieces] == [0]
    await until_finished(daemon.storage, started.task_id)
    assert sum(last - first + 1 for first, last in origin.gets) == len(origin.body)
