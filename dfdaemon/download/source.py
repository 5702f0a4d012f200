"""Back to source as one stream: pieces cut from the origin's body as it arrives, committed in batches.

Each run of consecutive missing pieces is one GET on a pooled connection (a long run a few ranges in parallel).
A plain HTTP body of known length is read by a worker thread straight from its socket, one thread hop per piece:
block by block it is received, written and CRCed while still in the CPU's cache (see ``dfdaemon.backend.direct``).
Any other body (TLS, chunked) arrives on the event loop through aiohttp, which only collects the chunks; each
piece's chunks go to a worker thread in one hop that writes them (one vectored write, no copy) and computes the
CRC, while more arrive. A blob's digest is not computed here but by a task of its own, from the page cache, beside
the stream (see ``DownloadManager._hash_in_order``).
Written pieces become visible in batches: the file is synced, their rows committed in one transaction, then each
is announced. A broken connection resumes at the byte where it broke, after a backoff, whichever way either side
read. Followers (the registry mirror) hear of the bytes as they are written, before any piece is complete, and
read them back from the page cache.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dfdaemon.backend import Backend, BackendError
from dfdaemon.backend.direct import DirectBody
from dfdaemon.download.committer import BatchCommitter
from dfdaemon.ids import PieceSpan
from dfdaemon.ratelimit import TokenBucket
from dfdaemon.storage import PieceFile, Progress, TrafficType
from dfdaemon.storage.content import BLOCK
from dfdaemon.telemetry import tracing

log = logging.getLogger("dfdaemon.download")

# A stream writes the bytes of each segment of a piece (the whole piece when it is no longer) in one thread hop;
# this many segments may be waiting for their write while the next one fills. The bytes a stream holds are at most
# SEGMENT * (PENDING_SEGMENTS + 1); with a task's parallel ranges, this bounds the daemon's memory.
SEGMENT = 2 * 1024 * 1024
PENDING_SEGMENTS = 1
# A run of missing pieces is split into parallel ranges only where each gets at least this many pieces.
MIN_STREAM_PIECES = 16

Publish = Callable[[int, int], None]  # bytes at an offset were written


class WrittenBytes:
    """The byte ranges of a task's content file its back-to-source streams have written so far (durable or not),
    for a follower that sends them on as they land (the mirror) by reading them back from the page cache.

    A follower holds no bytes of its own: one slower than the origin only falls behind in the file.
    """

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self._extents: list[list[int]] = []  # [start, end) of each run written, merged where they meet

    def add(self, offset: int, length: int) -> None:
        for extent in self._extents:
            if extent[1] == offset:
                extent[1] += length
                break
        else:
            self._extents.append([offset, offset + length])
        self.wake.set()

    def end_from(self, position: int) -> int | None:
        """Where the written bytes from ``position`` on end, or None when the byte at ``position`` is not written."""
        for start, end in self._extents:
            if start <= position < end:
                return end
        return None


@dataclass(frozen=True)
class Origin:
    """Where a task's bytes come from, and how to ask."""

    backend: Backend
    url: str
    headers: Mapping[str, str]
    from_network: bool
    attempts: int
    # The buckets bytes from the origin take from (back to source, download): per chunk as it arrives through
    # aiohttp, before each hop of a direct read (a tenth of a second's worth of the slowest).
    limits: tuple[TokenBucket, ...] = ()


class RunStream:
    """One run of consecutive pieces from one GET (resumed after breaks), cut into pieces as bytes arrive.

    A body a worker thread can read from its socket is read one piece per thread hop (``_receive_direct``). For any
    other, the loop only collects the chunks as the connection delivers them. A piece's chunks (or a segment's, for a
    piece longer than ``SEGMENT``) go to a thread in one hop that writes them with one vectored write and continues
    the piece's CRC over them: no copy, no CRC on the event loop. The hops of one stream run one after another
    (each continues the CRC of the one before), at most ``PENDING_SEGMENTS`` waiting while the next segment fills.
    A piece is queued for commit once its last segment is written.
    """

    def __init__(
        self,
        origin: Origin,
        spans: list[PieceSpan],
        file: PieceFile,
        committer: BatchCommitter,
        publish: Publish,
        followed: Callable[[], bool],
    ) -> None:
        self.origin = origin
        self.spans = spans
        self.file = file
        self.committer = committer
        self.publish = publish
        self.followed = followed  # whether anyone follows the bytes now (read from the writing thread too)
        # Bytes one direct hop may take: unlimited but for a bandwidth limit, then a tenth of a second's worth.
        self._allowance = max(BLOCK, min(limit.rate // 10 for limit in origin.limits)) if origin.limits else 1 << 62
        self._index = 0
        self._filled = 0
        self._piece_started = 0.0
        self._chunks: list[memoryview] = []  # the segment filling now
        self._segment_offset = 0
        self._segment_fill = 0
        # The latest segment's hop (or direct read); its result is the piece's CRC so far.
        self._last: asyncio.Future[int] | None = None
        self._pending: collections.deque[asyncio.Task[int]] = collections.deque()
        self._commits: collections.deque[asyncio.Task[None]] = collections.deque()

    async def run(self) -> None:
        end = self.spans[-1].offset + self.spans[-1].length
        failures, delay = 0, self.origin.backend.retry.initial_backoff
        try:
            while (position := self._position(end)) < end:
                before = self._index
                try:
                    await self._receive(position, end)
                except BackendError as exc:
                    failures = 1 if self._index > before else failures + 1
                    if exc.status_code is not None or failures >= self.origin.attempts:
                        raise
                    resume = self._position(end)
                    log.info("the stream of %s broke (%s); resuming at byte %d", self.origin.url, exc, resume)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.origin.backend.retry.max_backoff)
            while self._commits:
                await self._commits.popleft()
        finally:
            for task in [*self._commits, *self._pending]:  # thread hops run on; the file waits for them
                if task.done() and not task.cancelled():
                    task.exception()  # the failure that ended the stream first is the one raised
                task.cancel()

    def _position(self, end: int) -> int:
        """The first byte not yet received."""
        return self.spans[self._index].offset + self._filled if self._index < len(self.spans) else end

    async def _receive(self, position: int, end: int) -> None:
        """Read from ``position`` to ``end`` on one connection, cutting pieces as the bytes arrive."""
        origin = self.origin
        with tracing.span("back_to_source", url=origin.url, range_start=position, range_length=end - position):
            async with origin.backend.open_range(
                origin.url, origin.headers, position, end - position, from_network=origin.from_network
            ) as body:
                direct = body.direct()
                if direct is not None:
                    await self._receive_direct(direct)
                    return
                async for chunk in body:
                    position += len(chunk)
                    await self._cut(memoryview(chunk))
                    for limit in origin.limits:
                        await limit.acquire(len(chunk))

    async def _receive_direct(self, body: DirectBody) -> None:
        """Each remaining piece in one thread hop that reads it from the socket and writes it a block at a time
        (written and CRCed while still in the CPU's cache; see ``PieceFile.receive``).

        A read that breaks leaves the piece's progress (bytes and CRC so far) for the resume, whichever way it reads.
        """
        if self._chunks:  # collected through aiohttp before a break: written before anything after them
            await self._write_segment(continues=self._segment_offset != self.spans[self._index].offset)
        loop = asyncio.get_running_loop()
        written = functools.partial(self._tell, loop)
        while self._index < len(self.spans):
            span = self.spans[self._index]
            if self._filled == 0:
                self._piece_started = time.monotonic()
            crc = await asyncio.shield(self._last) if self._filled and self._last is not None else 0
            progress = Progress(span.offset + self._filled, crc)
            while progress.offset < span.offset + span.length:
                # The whole piece in one hop, unless a bandwidth limit takes it in tenths of a second's worth.
                stop = min(span.offset + span.length, progress.offset + self._allowance)
                for limit in self.origin.limits:
                    await limit.acquire(stop - progress.offset)
                try:
                    await self.file.hop(
                        functools.partial(self.file.receive, progress, stop, body.read_into, written), body.end
                    )
                finally:
                    self._filled = progress.offset - span.offset
                    self._last = loop.create_future()
                    self._last.set_result(progress.crc)
            await self._piece_complete(span)

    def _tell(self, loop: asyncio.AbstractEventLoop, offset: int, block: memoryview) -> None:
        """In the writing thread, after each block of a direct read: followers hear of it, on the loop (which is
        woken only when there are any)."""
        if self.followed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to hear
                loop.call_soon_threadsafe(self.publish, offset, len(block))

    async def _cut(self, view: memoryview) -> None:
        """Collect arriving bytes (views, not copies) into segments; full segments and pieces move on."""
        while view:
            span = self.spans[self._index]
            if not self._chunks:
                self._segment_offset, self._segment_fill = span.offset + self._filled, 0
                if self._filled == 0:
                    self._piece_started = time.monotonic()
            take = min(len(view), span.length - self._filled, SEGMENT - self._segment_fill)
            self._chunks.append(view[:take])
            self._segment_fill += take
            self._filled += take
            view = view[take:]
            if self._filled == span.length:
                await self._write_segment(continues=self._segment_offset != span.offset)
                await self._piece_complete(span)
            elif self._segment_fill == SEGMENT:
                await self._write_segment(continues=self._segment_offset != span.offset)

    async def _write_segment(self, *, continues: bool) -> None:
        """Hand the segment to its thread hop; waits while too many are pending (which bounds memory)."""
        chunks, self._chunks = self._chunks, []
        previous = self._last
        self._last = asyncio.create_task(self._segment(previous, continues, self._segment_offset, chunks))
        # Its failure reaches the stream through the next segment or the piece's commit, whichever comes first.
        self._last.add_done_callback(_outcome_read)
        self._pending.append(self._last)
        while len(self._pending) > PENDING_SEGMENTS:
            await asyncio.shield(self._pending.popleft())

    async def _segment(
        self, previous: asyncio.Future[int] | None, continues: bool, offset: int, chunks: list[memoryview]
    ) -> int:
        """Write one segment after the one before it; returns the piece's CRC up to its end.

        Shielded waits: a cancelled stream does not cut a hop short, so its chunks stay alive until it is over.
        """
        crc = 0
        if previous is not None:
            before = await asyncio.shield(previous)
            crc = before if continues else 0
        crc = await self.file.hop(functools.partial(self.file.write_chunks, offset, chunks, crc))
        self.publish(offset, sum(map(len, chunks)))
        return crc

    async def _piece_complete(self, span: PieceSpan) -> None:
        last, started = self._last, self._piece_started
        assert last is not None
        self._filled = 0
        self._index += 1
        self._commits.append(asyncio.create_task(self._commit_when_written(span, last, started)))
        while self._commits and self._commits[0].done():
            await self._commits.popleft()  # raises the failure of a write

    async def _commit_when_written(self, span: PieceSpan, last: asyncio.Future[int], started: float) -> None:
        """Queue a piece for commit once its last segment is written (each segment waits for the one before)."""
        crc = await asyncio.shield(last)
        self.committer.add(
            self.file.piece(span.number, span.offset, span.length, crc, TrafficType.BACK_TO_SOURCE, started)
        )


def _outcome_read(task: asyncio.Task[int]) -> None:
    if not task.cancelled():
        task.exception()


def runs(spans: list[PieceSpan], streams: int) -> list[list[PieceSpan]]:
    """Consecutive pieces grouped, each group one stream from the origin; a long run is cut into up to
    ``streams`` ranges of at least ``MIN_STREAM_PIECES`` pieces each."""
    groups: list[list[PieceSpan]] = []
    for span in spans:
        if groups and groups[-1][-1].number + 1 == span.number:
            groups[-1].append(span)
        else:
            groups.append([span])
    cut: list[list[PieceSpan]] = []
    for group in groups:
        parts = max(1, min(streams, len(group) // MIN_STREAM_PIECES))
        size = -(-len(group) // parts)
        cut.extend(group[i : i + size] for i in range(0, len(group), size))
    return cut
