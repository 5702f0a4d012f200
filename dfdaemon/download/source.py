"""Back to source as one stream: pieces cut from the origin's body as it arrives, committed in batches.

Each run of consecutive missing pieces is one GET on a pooled connection. Bytes are copied into a reused piece
buffer; a full piece is written, CRC'd and (for a blob) hashed in one thread hop while the next piece fills the
other buffer. Written pieces become visible in batches: the file is synced, their rows committed in one
transaction, then each is announced. A broken connection resumes at the byte where it broke, after a backoff.
Followers may tap the bytes as they arrive (the registry mirror does), before any piece is complete.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dfdaemon import ids
from dfdaemon.backend import Backend, BackendError
from dfdaemon.ids import PieceSpan
from dfdaemon.storage import PieceFile, PieceRecord, TrafficType
from dfdaemon.telemetry import tracing

log = logging.getLogger("dfdaemon.download")

# Pieces are committed once this many are written, or this long after the first of a batch was.
COMMIT_PIECES = 8
COMMIT_DELAY = 0.1
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
    """A blob's digest fed its pieces in offset order, by the stream as it writes them or read back from disk.

    Whichever side holds piece ``next`` first feeds it; a piece is never fed twice. Thread-safe: both sides feed
    from worker threads.
    """

    def __init__(self, digester: ids.FileDigester) -> None:
        self.digester = digester
        self.next = 0
        self._lock = threading.Lock()

    def feed(self, number: int, data: memoryview) -> None:
        with self._lock:
            if number == self.next:
                self.digester.update(data)
                self.next += 1

    def feed_from_file(self, path: Path, span: PieceSpan) -> None:
        """Feed a stored piece the stream did not feed (one from a parent, or stored before a resume)."""
        with self._lock:
            if span.number != self.next:
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
            self.next += 1


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


class RunStream:
    """One run of consecutive pieces from one GET (resumed after breaks), cut into pieces as bytes arrive."""

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
        size = max(span.length for span in spans)
        self._buffers = (bytearray(size), bytearray(size))
        self._current = 0
        self._index = 0
        self._filled = 0
        self._piece_started = 0.0
        self._writing: asyncio.Task[PieceRecord] | None = None

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
            await self._settle()
        finally:
            if self._writing is not None and not self._writing.done():
                self._writing.cancel()  # its thread hop runs on; the file waits for it before it closes

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

    async def _cut(self, view: memoryview) -> None:
        """Copy arriving bytes into the current piece's buffer; a full piece goes to be written."""
        while view:
            span = self.spans[self._index]
            if self._filled == 0:
                self._piece_started = time.monotonic()
            take = min(len(view), span.length - self._filled)
            self._buffers[self._current][self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == span.length:
                await self._write(span)

    async def _write(self, span: PieceSpan) -> None:
        """Hand a full piece to a thread (after the previous one, which frees the other buffer)."""
        await self._settle()
        data = memoryview(self._buffers[self._current])[: span.length]
        digest = self.digest
        self._writing = asyncio.create_task(
            self.file.write(
                span.number,
                span.offset,
                data,
                traffic_type=TrafficType.BACK_TO_SOURCE,
                started=self._piece_started,
                also=None if digest is None else lambda bytes_: digest.feed(span.number, bytes_),
            )
        )
        self._current ^= 1
        self._index += 1
        self._filled = 0

    async def _settle(self) -> None:
        """Wait for the piece being written and queue it for the next commit."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            self.committer.add(await writing)


def runs(spans: list[PieceSpan]) -> list[list[PieceSpan]]:
    """Consecutive pieces grouped: each group is one stream from the origin."""
    groups: list[list[PieceSpan]] = []
    for span in spans:
        if groups and groups[-1][-1].number + 1 == span.number:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups
