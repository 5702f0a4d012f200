"""Collecting a task's missing pieces from candidate parents.

Each parent's ``SyncPieces`` stream says which pieces it holds (and, for a parent still fetching,
which it gains); a bounded pool of workers fetches each piece once from a parent that has it. A
fetched piece is written (its CRC computed in the same thread hop) while its worker already fetches
the next one; its digests are checked against that CRC, and a ``BatchCommitter`` makes the pieces
written meanwhile durable and visible together, then reports them. A parent that fails or sends bad
bytes is reported and avoided; the piece goes back to the queue for another parent. Collection ends
when every piece is in, or when no usable parent can make progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from dfdaemon import ids
from dfdaemon.download.committer import BatchCommitter, PieceReport
from dfdaemon.download.peering import FetchedPiece, Parent, ParentClient, PieceUnavailable
from dfdaemon.ids import PieceSpan
from dfdaemon.ratelimit import TokenBucket
from dfdaemon.storage import IncomingPiece, PieceRecord, TaskWriter, TrafficType
from dfdaemon.telemetry import metrics, tracing

log = logging.getLogger("dfdaemon.download")

FailureReport = Callable[[int, Parent], Awaitable[None]]


class BadPiece(PieceUnavailable):
    """A parent sent bytes that do not match the piece's digests or place."""


class PieceCollection:
    """One collection of pieces from parents: what is wanted, who has what, and the jobs that move it on.

    Syncs learn which parent holds which piece and offer it to the queue; workers take pieces off the queue
    and fetch each from a parent that has it. A piece is in at most one of queued, busy and done.
    """

    def __init__(
        self,
        task_id: str,
        spans: list[PieceSpan],
        client: ParentClient,
        writer: TaskWriter,
        *,
        piece_timeout: float,
        on_piece: PieceReport,
        on_failure: FailureReport,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        self.task_id = task_id
        self.bandwidth = bandwidth  # download.bandwidthLimit
        self.wanted = {span.number: span for span in spans}
        self.client = client
        self.writer = writer
        self.piece_timeout = piece_timeout
        self.on_piece = on_piece
        self.on_failure = on_failure
        self.available: dict[int, list[Parent]] = {}
        self.done: set[int] = set()
        self.queued: set[int] = set()
        self.busy: set[int] = set()
        self.failed: dict[str, Parent] = {}
        # (parent, piece) pairs that failed on the piece alone: a bad copy, or one the parent no longer has.
        self.bad: set[tuple[str, int]] = set()
        self.open_syncs = 0
        self.last_progress = time.monotonic()
        self.wake = asyncio.Event()
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self._turn = itertools.count()  # spreads the pieces over the parents that hold them
        self.committer: BatchCommitter | None = None  # while ``run`` runs

    @property
    def complete(self) -> bool:
        return self.done >= self.wanted.keys()

    def usable(self, number: int) -> list[Parent]:
        return [
            p
            for p in self.available.get(number, [])
            if p.peer_id not in self.failed and (p.peer_id, number) not in self.bad
        ]

    def offer(self, number: int) -> None:
        """Queue a piece for the workers unless it is already in, queued or being fetched."""
        if number not in self.done and number not in self.queued and number not in self.busy:
            self.queued.add(number)
            self.queue.put_nowait(number)

    async def fail(self, parent: Parent, number: int, reason: str) -> None:
        """Avoid ``parent`` from now on and offer again every piece another parent also holds."""
        if parent.peer_id not in self.failed:
            log.warning("parent %s failed on piece %d of task %s: %s", parent.peer_id, number, self.task_id, reason)
            self.failed[parent.peer_id] = parent
        await self.on_failure(number, parent)
        for other, holders in self.available.items():
            if other not in self.done and any(p.peer_id != parent.peer_id for p in holders):
                self.offer(other)
        self.wake.set()

    async def sync(self, parent: Parent) -> None:
        """Follow one parent's ``SyncPieces``: each wanted piece it holds (or gains) becomes fetchable."""
        try:
            async for span in self.client.sync_pieces(parent, self.task_id, sorted(self.wanted)):
                expected = self.wanted.get(span.number)
                if expected is None or (span.offset, span.length) != (expected.offset, expected.length):
                    continue
                self.available.setdefault(span.number, []).append(parent)
                if parent.peer_id not in self.failed:
                    self.offer(span.number)
                self.wake.set()
        except Exception as exc:
            await self.fail(parent, -1, f"SyncPieces: {exc}")
        finally:
            self.open_syncs -= 1
            self.wake.set()

    async def worker(self) -> None:
        """Fetch queued pieces one at a time, each from the next parent that can serve it.

        A fetched piece is written (and, over vortex, received) by a task of its own while the worker already asks
        for the next one, so a request is in flight while the previous piece lands; each worker waits for its
        previous piece's write before starting the next, so at most two pieces per worker are in flight.
        """
        writing: tuple[asyncio.Task[None], FetchedPiece] | None = None
        try:
            while True:
                number = await self.queue.get()
                self.queued.discard(number)
                candidates = self.usable(number)
                if number in self.done or not candidates:
                    continue
                parent, span = candidates[next(self._turn) % len(candidates)], self.wanted[number]
                started = time.monotonic()
                fetched = await self._fetch(parent, span)
                if fetched is None:
                    continue
                try:
                    if writing is not None:
                        await writing[0]
                except BaseException:
                    fetched.done()
                    raise
                writing = asyncio.create_task(self._stage(parent, span, fetched, started)), fetched
        finally:
            if writing is not None:
                writing[0].cancel()
                await asyncio.gather(writing[0], return_exceptions=True)
                writing[1].done()  # when the write was cancelled before it began

    async def _fetch(self, parent: Parent, span: PieceSpan) -> FetchedPiece | None:
        """One attempt at one piece's bytes; None when it failed (the piece went back to the queue if it could)."""
        self.busy.add(span.number)
        try:
            if self.bandwidth is not None:  # taken before asking, as upstream; not counted in the piece timeout
                await self.bandwidth.acquire(span.length)
            with tracing.span(
                "piece",
                task_id=self.task_id,
                piece_number=span.number,
                piece_length=span.length,
                traffic_type="REMOTE_PEER",
                parent=parent.peer_id,
            ):
                # Not wait_for: a piece that arrives as the timeout fires must not be lost with its buffer.
                async with asyncio.timeout(self.piece_timeout):
                    return await self.client.download_piece(parent, self.task_id, span.number)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(parent, span.number, exc)
            return None

    async def _stage(self, parent: Parent, span: PieceSpan, fetched: FetchedPiece, started: float) -> None:
        """Check the piece's place, write it (its CRC computed on the way, once), check its digests, then queue
        it for the next commit."""
        try:
            check_place(span, fetched)
            # Bytes still arriving are received while they are written: the piece timeout holds for that too.
            async with asyncio.timeout(self.piece_timeout):
                record = await self.writer.stage_piece(
                    span.number,
                    span.offset,
                    fetched.content,
                    parent_id=parent.peer_id,
                    traffic_type=TrafficType.REMOTE_PEER,
                    cost=time.monotonic() - started,
                )
            check_digests(span, fetched, record.crc)
        except Exception as exc:
            await self._failed(parent, span.number, exc)
            return
        finally:
            fetched.done()
        assert self.committer is not None, "pieces are staged only while the collection runs"
        # A failed commit raises here too, ending this worker; ``run``, woken by the committer, stops the collection.
        self.committer.add(record)

    async def _landed(self, record: PieceRecord) -> None:
        """A piece is durable and visible: report it; the workers never wait for this."""
        metrics.DOWNLOAD_BYTES.labels("peer").inc(record.length)
        metrics.PIECE_SECONDS.labels("peer").observe(record.cost)
        await self.on_piece(record)
        self.busy.discard(record.number)
        self.done.add(record.number)
        self.last_progress = time.monotonic()
        self.wake.set()

    async def _failed(self, parent: Parent, number: int, exc: Exception) -> None:
        """A fetch, check or write failed: a piece the parent cannot serve avoids it for that piece, anything
        else avoids the parent; the piece goes back to the queue when another parent has it."""
        self.busy.discard(number)
        if isinstance(exc, PieceUnavailable):
            await self._refused(parent, number, exc)
            return
        await self.fail(parent, number, str(exc) or type(exc).__name__)
        if self.usable(number):
            self.offer(number)

    async def _refused(self, parent: Parent, number: int, reason: PieceUnavailable) -> None:
        """The parent cannot serve this one piece: avoid it for that piece only."""
        log.warning("parent %s cannot serve piece %d of task %s: %s", parent.peer_id, number, self.task_id, reason)
        self.bad.add((parent.peer_id, number))
        await self.on_failure(number, parent)
        if self.usable(number):
            self.offer(number)
        self.wake.set()

    async def run(self, parents: list[Parent], concurrency: int) -> list[Parent]:
        """Sync every parent and run the workers until done or stuck; returns the parents that failed.

        A failed commit or report ends the collection with its error: the local disk, not a parent, failed.
        """
        self.open_syncs = len(parents)
        async with self.writer.piece_file() as file:
            committer = self.committer = BatchCommitter(
                file, self._landed, pieces=len(self.wanted), on_failure=self.wake.set
            )
            tasks = [asyncio.create_task(self.sync(parent)) for parent in parents]
            tasks += [asyncio.create_task(self.worker()) for _ in range(max(1, concurrency))]
            try:
                while not self.complete and not await self._stuck(parents):
                    committer.check()
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), timeout=min(1.0, self.piece_timeout))
                await committer.close()  # nothing is busy by now: this waits for the announcements to end
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                committer.abandon()
                self.committer = None
        return list(self.failed.values())

    async def _stuck(self, parents: list[Parent]) -> bool:
        """Whether no parent can make progress any more; parents silent for too long are failed."""
        if not self.busy and self.queue.empty() and self.open_syncs == 0:
            return True  # every parent told us all it has, and nobody can supply the rest
        if all(p.peer_id in self.failed for p in parents) and not self.busy:
            return True  # (pieces still busy may be written and staged already: let them land first)
        if time.monotonic() - self.last_progress > self.piece_timeout and not self.busy:
            for parent in parents:
                if parent.peer_id not in self.failed:
                    await self.fail(parent, -1, f"no progress for {self.piece_timeout:.0f}s")
            return True
        return False


def check_place(span: PieceSpan, fetched: FetchedPiece) -> None:
    """Verify a fetched piece is the one asked for, where it belongs, with all of its bytes."""
    if (fetched.number, fetched.offset, fetched.length) != (span.number, span.offset, span.length):
        raise BadPiece(
            f"piece {span.number}: parent sent #{fetched.number} at {fetched.offset}+{fetched.length}, "
            f"expected {span.offset}+{span.length}"
        )
    sent = fetched.content.length if isinstance(fetched.content, IncomingPiece) else len(fetched.content)
    if sent != span.length:
        raise BadPiece(f"piece {span.number}: parent sent {sent} of {span.length} bytes")


def check_digests(span: PieceSpan, fetched: FetchedPiece, crc: int) -> None:
    """Verify the bytes' CRC (computed while writing them) and the metadata digest against what the parent sent."""
    actual = ids.format_crc32(crc)
    if fetched.digest != actual:
        raise BadPiece(f"piece {span.number} has digest {actual}, the parent sent {fetched.digest}")
    if fetched.metadata_digest is not None:
        expected = ids.piece_metadata_digest(span.number, span.offset, span.length, fetched.digest)
        if fetched.metadata_digest != expected:
            raise BadPiece(f"piece {span.number}: metadata digest {fetched.metadata_digest} != {expected}")


async def collect_from_parents(
    task_id: str,
    spans: list[PieceSpan],
    parents: list[Parent],
    client: ParentClient,
    writer: TaskWriter,
    *,
    concurrency: int,
    piece_timeout: float,
    on_piece: PieceReport,
    on_failure: FailureReport,
    bandwidth: TokenBucket | None = None,
) -> list[Parent]:
    """Fetch ``spans`` from ``parents``; returns the parents that failed. Check ``done`` by the pieces reported."""
    if not spans:
        return []
    collection = PieceCollection(
        task_id,
        spans,
        client,
        writer,
        piece_timeout=piece_timeout,
        on_piece=on_piece,
        on_failure=on_failure,
        bandwidth=bandwidth,
    )
    return await collection.run(parents, concurrency)
