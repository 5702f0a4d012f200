"""Back to source as one stream: pieces cut from the origin's body as it arrives, committed in batches.

Each run of consecutive missing pieces is one GET on a pooled connection (a long run a few ranges in parallel).
Each chunk is CRC'd as it arrives (and, for a blob, hashed in the same pass) and copied into a reused 1 MiB
segment buffer; a full segment is written in one thread hop while more bytes arrive.
Written pieces become visible in batches: the file is synced, their rows committed in one transaction, then each
is announced. A broken connection resumes at the byte where it broke, after a backoff. Followers may tap the
bytes as they arrive (the registry mirror does), before any piece is complete.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dfdaemon import ids
from dfdaemon.backend import Backend, BackendError
from dfdaemon.ids import PieceSpan
from dfdaemon.ratelimit import TokenBucket
from dfdaemon.storage import PieceFile, PieceRecord, TrafficType
from dfdaemon.telemetry import tracing

log = logging.getLogger("dfdaemon.download")

# Pieces are committed once this many are written, or this long after the first of a batch was.
COMMIT_PIECES = 8
COMMIT_DELAY = 0.1
# A stream copies arriving bytes into segments of this size, from a pool of this many reused buffers. Measured on
# 2 cores: 4 MiB writes cost three times the kernel time of 1 MiB ones; 256 KiB ones cost thread hops.
SEGMENT = 1024 * 1024
SEGMENT_BUFFERS = 6
# A run of missing pieces is split into parallel ranges only where each gets at least this many pieces.
MIN_STREAM_PIECES = 16
# Bytes a tap holds for a follower that reads slower than the origin sends; past this it reads from storage.
TAP_LIMIT = 64 * 1024 * 1024

Publish = Callable[[int, bytes], None]
PieceReport = Callable[[PieceRecord], Awaitable[None]]


class ByteTap:
    """A task's bytes as the origin sends them, offered to one follower by absolute offset.

    A follower that falls behind by more than ``limit`` bytes is cut off (``overflowed``) and reads the rest from
    storage, so a slow client never holds the download back nor grows memory without bound.
    """

    def __init__(self, limit: int = TAP_LIMIT) -> None:
        self.limit = limit
        self.overflowed = False
        self.wake = asyncio.Event()
        self._chunks: dict[int, bytes] = {}
        self._held = 0

    def offer(self, offset: int, chunk: bytes) -> None:
        if self.overflowed:
            return
        if self._held + len(chunk) > self.limit:
            self.overflowed = True
            self._chunks.clear()
            self._held = 0
        else:
            self._chunks[offset] = chunk
            self._held += len(chunk)
        self.wake.set()

    def take(self, position: int) -> bytes | None:
        """The bytes held from ``position`` on (one chunk's worth), if any; those wholly before it are dropped."""
        chunk = self._chunks.pop(position, None)
        if chunk is not None:
            self._held -= len(chunk)
            return chunk
        found = None
        for offset in [offset for offset in self._chunks if offset < position]:
            stale = self._chunks.pop(offset)
            self._held -= len(stale)
            if offset + len(stale) > position:
                found = stale[position - offset :]
        return found


class InOrderDigest:
    """A blob's digest fed its bytes in offset order, by the stream as it writes them or read back from disk.

    Whichever side holds the bytes at ``position`` first feeds them; no byte is fed twice. Thread-safe: both sides
    feed from worker threads.
    """

    def __init__(self, digester: ids.FileDigester) -> None:
        self.digester = digester
        self.position = 0
        self._lock = threading.Lock()

    def feed(self, offset: int, data: memoryview) -> None:
        with self._lock:
            if offset == self.position:
                self.digester.update(data)
                self.position += len(data)

    def feed_from_file(self, path: Path, span: PieceSpan) -> None:
        """Feed a stored piece the stream did not feed (one from a parent, or stored before a resume)."""
        with self._lock:
            if span.offset != self.position:
                return
            with path.open("rb") as f:
                f.seek(span.offset)
                remaining = span.length
                while remaining:
                    chunk = f.read(min(remaining, 1024 * 1024))
                    if not chunk:
                        raise BackendError(f"cache file ended {remaining} bytes early while hashing it")
                    self.digester.update(chunk)
                    remaining -= len(chunk)
            self.position += span.length


class BatchCommitter:
    """Commits written pieces in batches off the hot path; ``announce`` runs for each once it is visible."""

    def __init__(self, file: PieceFile, announce: PieceReport) -> None:
        self.file = file
        self.announce = announce
        self._pending: list[PieceRecord] = []
        self._flushing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, piece: PieceRecord) -> None:
        if self._flushing is not None and self._flushing.done() and self._flushing.exception() is not None:
            raise self._flushing.exception()  # type: ignore[misc]
        self._pending.append(piece)
        if len(self._pending) >= COMMIT_PIECES:
            self._kick()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(COMMIT_DELAY, self._kick)

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await self.file.commit(batch)
            for piece in batch:
                await self.announce(piece)

    async def close(self) -> None:
        """Commit what is left; raises the first commit failure."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await self._flushing
        await self._flush()

    def abandon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._flushing is not None:
            self._flushing.cancel()


@dataclass(frozen=True)
class Origin:
    """Where a task's bytes come from, and how to ask."""

    backend: Backend
    url: str
    headers: Mapping[str, str]
    from_network: bool
    attempts: int
    # The buckets bytes from the origin take from (back to source, download), per chunk as it arrives.
    limits: tuple[TokenBucket, ...] = ()


class RunStream:
    """One run of consecutive pieces from one GET (resumed after breaks), cut into pieces as bytes arrive.

    Each chunk is copied at once into a segment buffer from a small pool (so the chunk's memory is reused at once),
    CRC'd and, for a blob, fed to its digest; a full segment is written in one thread hop while the next fills.
    A piece is queued for commit once all its segments are written.
    """

    def __init__(
        self,
        origin: Origin,
        spans: list[PieceSpan],
        file: PieceFile,
        committer: BatchCommitter,
        publish: Publish,
        digest: InOrderDigest | None,
    ) -> None:
        self.origin = origin
        self.spans = spans
        self.file = file
        self.committer = committer
        self.publish = publish
        self.digest = digest
        self._index = 0
        self._filled = 0
        self._crc = 0
        self._piece_started = 0.0
        self._free: asyncio.Queue[bytearray] = asyncio.Queue()
        for _ in range(SEGMENT_BUFFERS):
            self._free.put_nowait(bytearray(SEGMENT))
        self._buffer: bytearray | None = None
        self._segment_offset = 0
        self._segment_fill = 0
        self._segments: list[asyncio.Task[None]] = []  # the current piece's
        self._writes: collections.deque[asyncio.Task[None]] = collections.deque()

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
            while self._writes:
                await self._writes.popleft()
        finally:
            for write in [*self._writes, *self._segments]:  # thread hops run on; the file waits for them
                if write.done() and not write.cancelled():
                    write.exception()  # the failure that ended the stream first is the one raised
                write.cancel()

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
                async for chunk in body:
                    self.publish(position, chunk)
                    position += len(chunk)
                    await self._cut(memoryview(chunk))
                    for limit in origin.limits:
                        await limit.acquire(len(chunk))

    async def _cut(self, view: memoryview) -> None:
        """Copy arriving bytes into segment buffers, CRC'd on the way; full segments and pieces move on."""
        while view:
            span = self.spans[self._index]
            if self._buffer is None:
                self._buffer = await self._free.get()
                self._segment_offset, self._segment_fill = span.offset + self._filled, 0
                if self._filled == 0:
                    self._piece_started = time.monotonic()
            take = min(len(view), span.length - self._filled, SEGMENT - self._segment_fill)
            part = view[:take]
            self._buffer[self._segment_fill : self._segment_fill + take] = part
            self._crc = zlib.crc32(part, self._crc)
            if self.digest is not None:  # one stream in byte order: the digest takes the bytes as they come
                self.digest.feed(span.offset + self._filled, part)
            self._segment_fill += take
            self._filled += take
            view = view[take:]
            if self._segment_fill == SEGMENT or self._filled == span.length:
                self._write_segment()
            if self._filled == span.length:
                await self._piece_complete(span)

    def _write_segment(self) -> None:
        buffer, self._buffer = self._buffer, None
        assert buffer is not None
        segment = asyncio.create_task(self._segment(buffer, self._segment_offset, self._segment_fill))
        # Its failure reaches the stream through the piece's commit; a stream already ending may never await it.
        segment.add_done_callback(_outcome_read)
        self._segments.append(segment)

    async def _segment(self, buffer: bytearray, offset: int, length: int) -> None:
        """Write one segment in one thread hop, then give its buffer back."""
        try:
            await self.file.hop(functools.partial(self.file.write_at, offset, memoryview(buffer)[:length]))
        finally:
            self._free.put_nowait(buffer)

    async def _piece_complete(self, span: PieceSpan) -> None:
        segments, crc, started = self._segments, self._crc, self._piece_started
        self._segments, self._crc, self._filled = [], 0, 0
        self._index += 1
        self._writes.append(asyncio.create_task(self._commit_when_written(span, segments, crc, started)))
        while self._writes and self._writes[0].done():
            await self._writes.popleft()  # raises the failure of a write

    async def _commit_when_written(
        self, span: PieceSpan, segments: list[asyncio.Task[None]], crc: int, started: float
    ) -> None:
        """Queue a piece for commit once every segment of it is written.

        Every segment's outcome is read (a failed write must not go unreported because an earlier one failed),
        and shielded: a segment's buffer goes back to the pool only once its thread hop is over."""
        outcomes = await asyncio.gather(*(asyncio.shield(segment) for segment in segments), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self.committer.add(
            self.file.piece(span.number, span.offset, span.length, crc, TrafficType.BACK_TO_SOURCE, started)
        )


def _outcome_read(task: asyncio.Task[None]) -> None:
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
