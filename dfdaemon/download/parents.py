"""Collecting a task's missing pieces from candidate parents.

Each parent's ``SyncPieces`` stream says which pieces it holds (and, for a parent still fetching,
which it gains); a bounded pool of workers fetches each piece once with ``DownloadPiece`` from a
parent that has it, checks the piece's CRC and metadata digest, and writes it. A parent that fails
or sends bad bytes is reported and avoided; the piece goes back to the queue for another parent.
Collection ends when every piece is in, or when no usable parent can make progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dfdaemon import ids
from dfdaemon.download.peering import FetchedPiece, Parent, ParentClient, PieceUnavailable
from dfdaemon.ids import PieceSpan
from dfdaemon.storage import PieceRecord, TaskWriter, TrafficType
from dfdaemon.telemetry import metrics, tracing

log = logging.getLogger("dfdaemon.download")

PieceReport = Callable[[PieceRecord], Awaitable[None]]
FailureReport = Callable[[int, Parent], Awaitable[None]]


class BadPiece(PieceUnavailable):
    """A parent sent bytes that do not match the piece's digests or place."""


@dataclass
class _Collection:
    wanted: dict[int, PieceSpan]
    available: dict[int, list[Parent]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    queued: set[int] = field(default_factory=set)
    busy: set[int] = field(default_factory=set)
    failed: dict[str, Parent] = field(default_factory=dict)
    # (parent, piece) pairs that failed on the piece alone: a bad copy, or one the parent no longer has.
    bad: set[tuple[str, int]] = field(default_factory=set)
    open_syncs: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return self.done >= self.wanted.keys()

    def usable(self, number: int) -> list[Parent]:
        return [
            p
            for p in self.available.get(number, [])
            if p.peer_id not in self.failed and (p.peer_id, number) not in self.bad
        ]


def check_piece(span: PieceSpan, fetched: FetchedPiece) -> None:
    """Verify a fetched piece against its expected place and both of its digests."""
    if (fetched.number, fetched.offset, fetched.length) != (span.number, span.offset, span.length):
        raise BadPiece(
            f"piece {span.number}: parent sent #{fetched.number} at {fetched.offset}+{fetched.length}, "
            f"expected {span.offset}+{span.length}"
        )
    if len(fetched.content) != span.length:
        raise BadPiece(f"piece {span.number}: parent sent {len(fetched.content)} of {span.length} bytes")
    actual = ids.format_crc32(zlib.crc32(fetched.content))
    if fetched.digest != actual:
        raise BadPiece(f"piece {span.number}: content digest {actual} does not match the parent's {fetched.digest}")
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
) -> list[Parent]:
    """Fetch ``spans`` from ``parents``; returns the parents that failed. Check ``done`` by the pieces reported."""
    state = _Collection(wanted={span.number: span for span in spans})
    if not spans:
        return []
    wake = asyncio.Event()
    queue: asyncio.Queue[int] = asyncio.Queue()

    def offer(number: int) -> None:
        if number not in state.done and number not in state.queued and number not in state.busy:
            state.queued.add(number)
            queue.put_nowait(number)

    async def fail(parent: Parent, number: int, reason: str) -> None:
        if parent.peer_id not in state.failed:
            log.warning("parent %s failed on piece %d of task %s: %s", parent.peer_id, number, task_id, reason)
            state.failed[parent.peer_id] = parent
        await on_failure(number, parent)
        for other, holders in state.available.items():
            if other not in state.done and any(p.peer_id != parent.peer_id for p in holders):
                offer(other)
        wake.set()

    async def sync(parent: Parent) -> None:
        try:
            async for span in client.sync_pieces(parent, task_id, sorted(state.wanted)):
                expected = state.wanted.get(span.number)
                if expected is None or (span.offset, span.length) != (expected.offset, expected.length):
                    continue
                state.available.setdefault(span.number, []).append(parent)
                if parent.peer_id not in state.failed:
                    offer(span.number)
                wake.set()
        except Exception as exc:
            await fail(parent, -1, f"SyncPieces: {exc}")
        finally:
            state.open_syncs -= 1
            wake.set()

    counter = itertools.count()

    async def worker() -> None:
        while True:
            number = await queue.get()
            state.queued.discard(number)
            candidates = state.usable(number)
            if number in state.done or not candidates:
                continue
            parent = candidates[next(counter) % len(candidates)]
            span = state.wanted[number]
            state.busy.add(number)
            started = time.monotonic()
            try:
                with tracing.span(
                    "piece",
                    task_id=task_id,
                    piece_number=number,
                    piece_length=span.length,
                    traffic_type="REMOTE_PEER",
                    parent=parent.peer_id,
                ):
                    fetched = await asyncio.wait_for(client.download_piece(parent, task_id, number), piece_timeout)
                    await asyncio.to_thread(check_piece, span, fetched)  # its CRC runs off the event loop
                    record = await writer.write_piece(
                        number,
                        span.offset,
                        fetched.content,
                        parent_id=parent.peer_id,
                        traffic_type=TrafficType.REMOTE_PEER,
                        cost=time.monotonic() - started,
                    )
            except asyncio.CancelledError:
                raise
            except PieceUnavailable as exc:
                state.busy.discard(number)
                log.warning("parent %s cannot serve piece %d of task %s: %s", parent.peer_id, number, task_id, exc)
                state.bad.add((parent.peer_id, number))
                await on_failure(number, parent)
                if state.usable(number):
                    offer(number)
                wake.set()
                continue
            except Exception as exc:
                state.busy.discard(number)
                await fail(parent, number, str(exc) or type(exc).__name__)
                if state.usable(number):
                    offer(number)
                continue
            state.busy.discard(number)
            state.done.add(number)
            state.last_progress = time.monotonic()
            metrics.DOWNLOAD_BYTES.labels("peer").inc(record.length)
            metrics.PIECE_SECONDS.labels("peer").observe(record.cost)
            await on_piece(record)
            wake.set()

    state.open_syncs = len(parents)
    tasks = [asyncio.create_task(sync(parent)) for parent in parents]
    tasks += [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        while not state.complete:
            idle = not state.busy and queue.empty()
            if idle and state.open_syncs == 0:
                break  # every parent told us all it has, and nobody can supply the rest
            if all(p.peer_id in state.failed for p in parents):
                break
            if time.monotonic() - state.last_progress > piece_timeout and not state.busy:
                for parent in parents:
                    if parent.peer_id not in state.failed:
                        await fail(parent, -1, f"no progress for {piece_timeout:.0f}s")
                break
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(1.0, piece_timeout))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return list(state.failed.values())
