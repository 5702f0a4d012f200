"""Task downloads: from the local cache, from parent peers, or back to source, shared per task.

One ``TaskJob`` per task fetches the missing pieces into storage (holding its in-flight download
reference) and announces each finished piece; every request for that task, concurrent or not,
follows the job and streams the pieces it asked for in completion order. Pieces already on disk
when a request joins are reported as ``LOCAL_PEER``. Output files are written atomically (hard link
when possible, else a copy into a temporary file renamed into place), so a failed download never
leaves a partial file at the requested path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dfdaemon import ids
from dfdaemon.admission import Busy
from dfdaemon.backend import Backend, SourceNotAllowed, SourcePolicy, check_url
from dfdaemon.download.committer import BatchCommitter, PieceReport
from dfdaemon.download.ranges import (
    RangeNotSatisfiable,
    check_range_header,
    covering_pieces,
    effective_range,
    origin_headers,
    range_header,
)
from dfdaemon.download.request import ByteRange as ByteRange
from dfdaemon.download.request import DownloadRequest as DownloadRequest
from dfdaemon.download.source import Origin, RunStream, WrittenBytes, runs
from dfdaemon.gc import GarbageCollector
from dfdaemon.ids import PieceSpan
from dfdaemon.ratelimit import Bandwidth
from dfdaemon.storage import (
    DiskFull,
    PieceRecord,
    Storage,
    TaskInfo,
    TaskRecord,
    TaskState,
    TaskWriter,
    TrafficType,
)
from dfdaemon.telemetry import metrics, tracing

log = logging.getLogger("dfdaemon.download")

TRAFFIC_NAMES = {
    TrafficType.BACK_TO_SOURCE: "back_to_source",
    TrafficType.REMOTE_PEER: "remote_peer",
    TrafficType.LOCAL_PEER: "local_peer",
}


# Headers the daemon sets itself for each origin request; a caller's copy would change what is fetched. A caller's
# ``Range`` is not among them: it says which bytes the caller wants (see ``ranges``) and never reaches the origin.
_RESERVED_HEADERS = {
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "host",
    "te",
    "trailer",
    "upgrade",
    "if-range",
    "accept-encoding",
}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible ASCII, with single spaces or tabs inside but none at either end (what an HTTP client sends as is).
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20\x09\x21-\x7e]*[\x21-\x7e])?)?")


class InvalidDownload(ValueError):
    """A request that can never succeed as given (INVALID_ARGUMENT)."""


class DownloadPrecondition(Exception):
    """A request that cannot succeed in the current state: bad range, existing output (FAILED_PRECONDITION)."""


class RangeOutsideContent(DownloadPrecondition):
    """A range that selects no byte of the task's content (FAILED_PRECONDITION; an HTTP client gets 416)."""

    def __init__(self, message: str, content_length: int) -> None:
        super().__init__(message)
        self.content_length = content_length


class DownloadFailed(Exception):
    """The download itself failed after it started (INTERNAL)."""


class ContentMismatch(DownloadFailed):
    """The bytes are not what the task's name promises (DATA_LOSS); the task is failed and collected."""


@dataclass(frozen=True)
class Started:
    """What the requester will receive, sent before any piece."""

    task_id: str
    peer_id: str
    content_length: int
    range: ByteRange | None
    response_header: dict[str, str]
    pieces: list[PieceSpan]
    is_finished: bool


@dataclass(frozen=True)
class PieceDone:
    piece: PieceRecord
    traffic_type: int
    peer_id: str
    content: bytes | None = None


# Fetches the missing pieces of a job into storage; the default goes back to source.
PieceFetcher = Callable[["TaskJob"], Awaitable[None]]
# Ranges streamed from the origin at once; a fresh task of fewer than 32 pieces is one GET.
_SOURCE_STREAMS = 4


class TaskJob:
    """The one download of a task in this daemon, followed by every request for it.

    A job fetches the pieces its first request needs (``target``; None for all of them): a ranged request's job
    fetches only the pieces covering the range and leaves the task partial, its pieces recorded for later jobs.
    A request needing pieces outside a running job's target waits for that job to end and starts the next.
    """

    def __init__(self, task_id: str, peer_id: str, request: DownloadRequest) -> None:
        self.task_id = task_id
        self.peer_id = peer_id
        self.request = request
        self.content_length = 0
        self.piece_length = 0
        self.response_header: dict[str, str] = {}
        self.done: dict[int, tuple[PieceRecord, int]] = {}
        self.ready = False
        self.finished = False  # the task is complete here
        self.ended = False  # the job fetched its target (the task may still be partial)
        self.target: set[int] | None = None
        # The first request's range (download.range, or its Range header converted), as upstream forwards it to
        # the scheduler.
        self.range: ByteRange | None = None
        self.error: BaseException | None = None
        self.changed = asyncio.Condition()
        self.runner: asyncio.Task[None] | None = None
        self.accepts_ranges = True
        # Set while pieces are being fetched: where they go, and a blob's digest fed in offset order.
        self.writer: TaskWriter | None = None
        self.digest: ids.FileDigester | None = None

    @property
    def pieces(self) -> list[PieceSpan]:
        return ids.pieces_for(self.content_length, self.piece_length)

    def missing_pieces(self) -> list[PieceSpan]:
        """The pieces of the target not yet stored: what the job still fetches."""
        target = self.target
        return [
            span for span in self.pieces if span.number not in self.done and (target is None or span.number in target)
        ]

    def covers(self, numbers: set[int]) -> bool:
        """Whether the job has or fetches every one of these pieces."""
        return self.target is None or numbers <= self.target | self.done.keys()

    async def announce(
        self, *, ready: bool = False, finished: bool = False, ended: bool = False, error: BaseException | None = None
    ) -> None:
        async with self.changed:
            self.ready = self.ready or ready
            self.finished = self.finished or finished
            self.ended = self.ended or ended or finished
            if error is not None:
                self.error = error
            self.changed.notify_all()

    async def piece_done(self, piece: PieceRecord, traffic_type: int) -> None:
        async with self.changed:
            self.done[piece.number] = (piece, traffic_type)
            self.changed.notify_all()


class DownloadManager:
    """Runs downloads for the daemon: validation, sharing per task, fetching, output files."""

    def __init__(
        self,
        storage: Storage,
        gc: GarbageCollector,
        backend: Backend,
        *,
        host_ip: str,
        hostname: str,
        concurrent_piece_count: int = 8,
        piece_attempts: int = 3,
        source_policy: SourcePolicy | None = None,
        max_concurrent_tasks: int = 128,
        seed: bool = False,
        bandwidth: Bandwidth | None = None,
    ) -> None:
        self.storage = storage
        # The daemon's bandwidth limits (upstream's defaults, which never bind, when not given).
        self.bandwidth = bandwidth or Bandwidth.of()
        self.gc = gc
        self.backend = backend
        self.host_ip = host_ip
        self.hostname = hostname
        self.seed = seed  # a seed peer's host and peer ids end in "-seed", as upstream's
        self.host_id = ids.host_id(host_ip, hostname, seed)
        self.concurrent_piece_count = concurrent_piece_count
        self.piece_attempts = piece_attempts
        self.source_policy = source_policy or SourcePolicy()
        self.max_concurrent_tasks = max_concurrent_tasks
        self.fetch_missing: PieceFetcher = self.back_to_source
        self._jobs: dict[str, TaskJob] = {}
        self._taps: dict[str, set[WrittenBytes]] = {}
        self._prefetches: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        for prefetch in list(self._prefetches.values()):
            prefetch.cancel()
            with contextlib.suppress(BaseException):
                await prefetch
        for job in list(self._jobs.values()):
            if job.runner is not None:
                job.runner.cancel()
                with contextlib.suppress(BaseException):
                    await job.runner

    @contextlib.contextmanager
    def tap(self, task_id: str) -> Iterator[WrittenBytes]:
        """Where the task's bytes from the origin are written, as they land, while this is open (see
        ``WrittenBytes``); for the mirror."""
        tap = WrittenBytes()
        self._taps.setdefault(task_id, set()).add(tap)
        try:
            yield tap
        finally:
            taps = self._taps[task_id]
            taps.discard(tap)
            if not taps:
                del self._taps[task_id]

    def _publish(self, task_id: str, offset: int, length: int) -> None:
        for tap in self._taps.get(task_id, ()):
            tap.add(offset, length)

    def _followed(self, task_id: str) -> bool:
        return task_id in self._taps

    # Requests

    def validate(self, request: DownloadRequest) -> str:
        """Check what can be checked before any work and return the task id."""
        if not request.url:
            raise InvalidDownload("download.url is required")
        try:
            check_url(request.url)
        except ValueError as exc:
            raise InvalidDownload(str(exc)) from None
        _check_range(request)
        if request.digest is not None:
            try:
                ids.parse_file_digest(request.digest)
            except ValueError as exc:
                raise InvalidDownload(f"download.digest: {exc}") from None
        low, high = ids.MIN_REQUESTED_PIECE_LENGTH, ids.MAX_REQUESTED_PIECE_LENGTH
        if request.piece_length is not None and not low <= request.piece_length <= high:
            raise InvalidDownload(f"download.piece_length must be between {low} and {high} bytes")
        _check_headers(request.request_header)
        if request.output_path is not None:
            _check_output_path(request.output_path, request.overwrite)
        try:
            return request.task_id()
        except ValueError as exc:
            raise InvalidDownload(str(exc)) from None

    async def download(self, request: DownloadRequest) -> AsyncGenerator[Started | PieceDone, None]:
        """Stream one request: a Started, then its pieces in completion order; the output file last."""
        result = "failure"
        try:
            # Closed explicitly, so that an abandoned request lets go of the task at once.
            async with contextlib.aclosing(self._download(request)) as events:
                async for event in events:
                    if isinstance(event, Started) and request.prefetch and event.range is not None:
                        self._prefetch(event.task_id, request)
                    if isinstance(event, PieceDone):
                        metrics.DOWNLOAD_PIECES.labels(TRAFFIC_NAMES[event.traffic_type]).inc()
                        if event.traffic_type == TrafficType.LOCAL_PEER:
                            metrics.DOWNLOAD_BYTES.labels("local").inc(event.piece.length)
                    yield event
            result = "success"
        finally:
            metrics.DOWNLOADS.labels(result).inc()

    def _prefetch(self, task_id: str, request: DownloadRequest) -> None:
        """Fetch the whole task of a ranged request in the background, once per task at a time (upstream's prefetch)."""
        if task_id in self._prefetches:
            return
        whole = dataclasses.replace(
            request,
            range=None,
            prefetch=False,
            is_prefetch=True,
            output_path=None,
            request_header=origin_headers(request.request_header),
        )
        prefetch = asyncio.create_task(self._run_prefetch(task_id, whole), name=f"prefetch-{task_id[:12]}")
        self._prefetches[task_id] = prefetch
        prefetch.add_done_callback(lambda _: self._prefetches.pop(task_id, None))

    async def prefetched(self, task_id: str) -> None:
        """Wait until the background prefetch of ``task_id``, if one is running, has ended (however it ended)."""
        running = self._prefetches.get(task_id)
        if running is not None:
            await asyncio.wait([running])

    async def _run_prefetch(self, task_id: str, request: DownloadRequest) -> None:
        try:
            async with contextlib.aclosing(self.download(request)) as events:
                async for _ in events:
                    pass
            log.info("prefetch finished task=%s", task_id)
        except Exception as exc:
            log.warning("prefetch failed task=%s error=%s", task_id, exc)

    async def _download(self, request: DownloadRequest) -> AsyncGenerator[Started | PieceDone, None]:
        task_id = await self._admit(request)
        peer_id = ids.peer_id(self.host_ip, self.hostname, self.seed)
        # The timeout bounds the daemon's own waits, never the hand-over of a response to gRPC (a cancellation
        # there would look like the client leaving and end the call without a status).
        deadline = None if request.timeout is None else asyncio.get_running_loop().time() + request.timeout
        # From before the first look at the cache until the output is written, the task is in use.
        async with self.storage.reading(task_id):
            async with asyncio.timeout_at(deadline):
                job, byte_range, wanted = await self._join(task_id, peer_id, request)
            async with job.changed:
                numbers = {piece.number for piece in wanted}
                local = numbers & job.done.keys()
                is_finished = job.finished
            yield Started(
                task_id=task_id,
                peer_id=peer_id,
                content_length=job.content_length,
                range=byte_range,
                response_header=job.response_header,
                pieces=wanted,
                is_finished=is_finished,
            )
            async with contextlib.aclosing(self._follow(job, request, peer_id, numbers, local, deadline)) as pieces:
                async for piece in pieces:
                    yield piece
            async with asyncio.timeout_at(deadline):
                await self._deliver(job, request, byte_range)
            await self.storage.touch(task_id)

    async def _join(
        self, task_id: str, peer_id: str, request: DownloadRequest
    ) -> tuple[TaskJob, ByteRange | None, list[PieceSpan]]:
        """The job that has or fetches every piece the request needs, with the request's range and its pieces.

        A running job fetching other pieces (another range) is let finish first; the next job then fetches
        only what is still missing."""
        while True:
            job = self._job(task_id, peer_id, request)
            await self._until_ready(job)
            byte_range = _resolve_range(request, job.content_length)
            wanted = _covering(job, byte_range)
            needed = {span.number for span in (job.pieces if _needs_whole_task(request) else wanted)}
            if job.covers(needed):
                return job, byte_range, wanted
            runner = job.runner
            assert runner is not None
            await asyncio.wait({runner})

    async def _admit(self, request: DownloadRequest) -> str:
        """Everything a request must pass before it may start or join a job; returns the task id."""
        task_id = self.validate(request)
        if request.from_network and request.output_path is not None:
            raise SourceNotAllowed("a download requested over the network may not write an output file")
        await self.source_policy.check(request.url, from_network=request.from_network)
        return task_id

    async def _follow(
        self,
        job: TaskJob,
        request: DownloadRequest,
        peer_id: str,
        wanted: set[int],
        local: set[int],
        deadline: float | None,
    ) -> AsyncGenerator[PieceDone, None]:
        """One request's pieces in the order the job stores them; those stored before it joined are LOCAL_PEER."""
        remaining = set(wanted)
        while remaining:
            async with asyncio.timeout_at(deadline):
                await self._wait(job, lambda: bool(remaining & job.done.keys()) or job.ended)
            for number in sorted(remaining & job.done.keys(), key=lambda n: job.done[n][0].created_at):
                piece, traffic = job.done[number]
                remaining.discard(number)
                if number in local:
                    traffic = TrafficType.LOCAL_PEER
                content = None
                if request.need_piece_content:
                    async with asyncio.timeout_at(deadline):
                        _, content = await self.storage.read_piece(job.task_id, number)
                yield PieceDone(piece, traffic, peer_id, content)
            if job.ended and remaining - job.done.keys():
                missing = sorted(remaining - job.done.keys())
                raise DownloadFailed(f"task {job.task_id} ended without pieces {missing}")

    async def _deliver(self, job: TaskJob, request: DownloadRequest, byte_range: ByteRange | None) -> None:
        """What a request asks for once it has its pieces: the whole file's digest checked, an output file."""
        if _needs_whole_task(request):
            # A digest covers the whole file (and a blob's content is checked when the task completes),
            # so a ranged request waits for the rest of the task too.
            await self._wait(job, lambda: job.ended)
            if not job.finished:
                raise DownloadFailed(f"task {job.task_id} ended incomplete")
        if request.digest is not None and not (job.digest is not None and request.digest == _blob_digest(job.request)):
            # (the blob digest this job's download checked as the bytes landed is not read again)
            await asyncio.to_thread(_verify_digest, self.storage.content.path(job.task_id), request.digest)
        if request.output_path is not None:
            await asyncio.to_thread(
                _write_output,
                self.storage.content.path(job.task_id),
                Path(request.output_path),
                byte_range,
                job.content_length,
                request.overwrite,
                request.force_hard_link,
            )

    async def _until_ready(self, job: TaskJob) -> None:
        """Until the job knows the content's length and its piece length."""
        await self._wait(job, lambda: job.ready)

    async def _wait(self, job: TaskJob, predicate: Callable[[], bool]) -> None:
        async with job.changed:
            await job.changed.wait_for(lambda: predicate() or job.error is not None)
            if job.error is not None and not predicate():
                raise job.error

    def _job(self, task_id: str, peer_id: str, request: DownloadRequest) -> TaskJob:
        job = self._jobs.get(task_id)
        if job is None or (job.runner is not None and job.runner.done() and job.error is not None):
            if len(self._jobs) >= self.max_concurrent_tasks:
                raise Busy(f"{self.max_concurrent_tasks} tasks are already downloading; try again later")
            job = TaskJob(task_id, peer_id, request)
            self._jobs[task_id] = job
            job.runner = asyncio.create_task(self._run(job), name=f"download-{task_id[:12]}")
        return job

    # The job

    async def _run(self, job: TaskJob) -> None:
        started = time.monotonic()
        try:
            with tracing.span("task.download", task_id=job.task_id, url=job.request.url) as current:
                fetched = await self._run_job(job)
                current.set_attribute("dragonfly.content_length", job.content_length)
            if fetched:
                log.info(
                    "download finished task=%s bytes=%d seconds=%.3f",
                    job.task_id,
                    job.content_length,
                    time.monotonic() - started,
                )
        except asyncio.CancelledError:
            await job.announce(error=DownloadFailed("the daemon is shutting down"))
            raise
        except Exception as exc:
            error = _root_cause(exc)
            log.warning("download failed task=%s error=%s", job.task_id, error)
            await job.announce(error=error)
            if isinstance(error, DiskFull):
                await self._collect_after_disk_full(job.task_id)
        finally:
            if self._jobs.get(job.task_id) is job:
                del self._jobs[job.task_id]

    async def _collect_after_disk_full(self, task_id: str, patience: float = 5.0) -> None:
        """Free the disk: once the requesters have let go of the failed task, GC collects it and what else may go."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                while any(self.storage.in_flight(task_id)):
                    await self.storage.wait_for_change(task_id)
        await self.gc.run("disk-full")

    async def _run_job(self, job: TaskJob) -> bool:
        """Fetch the job's target into storage, completing the task when nothing else is missing; returns False
        when it was already complete (a cache hit). A partial task stays unfinished, its pieces recorded."""
        existing = await self.storage.get_task(job.task_id)
        if existing is not None and existing.state is TaskState.SUCCEEDED and existing.content_length is not None:
            await self._load_local(job, existing)
            await job.announce(ready=True, finished=True)
            return False
        if job.request.disable_back_to_source and self.fetch_missing == self.back_to_source:
            raise DownloadFailed("back to source is disabled and no scheduler is configured")
        stored = await self._size_up(job, existing)
        _aim(job)
        if job.target == set():  # its first request's range selects nothing: that request fails, nothing is kept
            await job.announce(ready=True, ended=True)
            return False
        missing = [p for p in job.missing_pieces() if p.number not in stored]
        async with (
            self.gc.reservation(job.task_id, sum(p.length for p in missing)),
            self.storage.download(job.task_id, _task_info(job)) as writer,
        ):
            log.info(
                "download started task=%s url=%s bytes=%d range=%s fetching=%d",
                job.task_id,
                job.request.url,
                job.content_length,
                "all" if job.range is None else f"{job.range.start}+{job.range.length}",
                sum(p.length for p in missing),
            )
            for piece in stored.values():
                job.done[piece.number] = (piece, TrafficType.LOCAL_PEER)
            await self._fill(job, writer)
            complete = len(job.done) == len(job.pieces)
            if complete:
                await writer.finish(digest=_blob_digest(job.request))
        await job.announce(finished=complete, ended=True)
        return True

    async def _size_up(self, job: TaskJob, existing: TaskRecord | None) -> dict[int, PieceRecord]:
        """Learn the content's length from the origin and fix the piece length; returns the pieces still usable.

        An unfinished task of the same length keeps its piece length, so the pieces it already has count.
        """
        request = job.request
        headers = origin_headers(request.request_header)
        info = await self.backend.stat(request.url, headers, from_network=request.from_network)
        piece_length = request.piece_length or ids.piece_length_for(info.content_length)
        if existing is not None and existing.piece_length and existing.content_length == info.content_length:
            piece_length = existing.piece_length
        job.content_length, job.piece_length, job.response_header = info.content_length, piece_length, info.headers
        job.accepts_ranges = info.accepts_ranges
        reusable = (
            existing is not None
            and existing.content_length == info.content_length
            and existing.piece_length == piece_length
        )
        return {p.number: p for p in await self.storage.pieces(job.task_id)} if reusable else {}

    async def _fill(self, job: TaskJob, writer: TaskWriter) -> None:
        """Fetch the missing pieces through ``writer``, checking a blob's digest as they land; fail it on error."""
        job.writer = writer
        blob = _blob_digest(job.request)
        job.digest = ids.FileDigester(blob) if blob is not None else None
        await job.announce(ready=True)
        hashing = asyncio.create_task(self._hash_in_order(job, job.digest)) if job.digest is not None else None
        try:
            if job.missing_pieces():
                await self.fetch_missing(job)
            short = [span.number for span in job.missing_pieces()]
            if short:  # a fetch that returned short must not leave the hashing waiting
                raise DownloadFailed(f"task {job.task_id} ended without pieces {short[:10]}")
            if hashing is not None:
                digester = await hashing
                if not digester.matches():
                    raise ContentMismatch(
                        f"the origin's content is not blob {blob} (it hashes to {digester.hexdigest()})"
                    )
        except ContentMismatch:
            await writer.fail(discard=True)  # forged bytes must never be served again, nor reused
            raise
        except BaseException:
            await writer.fail()
            raise
        finally:
            if hashing is not None and not hashing.done():
                hashing.cancel()
                with contextlib.suppress(BaseException):
                    await hashing

    async def _hash_in_order(self, job: TaskJob, digest: ids.FileDigester) -> ids.FileDigester:
        """Hash a blob in offset order as its pieces land, each read back from the page cache once committed.

        A task of its own, in a thread of its own: hashing (the costliest pass over a blob's bytes) runs beside the
        thread that receives and writes them, on the other core. On 2 cores this took a cold 256 MiB blob through
        the mirror from 0.73 s to 0.61 s (bench_mirror) against hashing in the writing thread.
        """
        path = self.storage.content.path(job.task_id)
        for span in job.pieces:
            async with job.changed:
                await job.changed.wait_for(functools.partial(job.done.__contains__, span.number))
            await asyncio.to_thread(_hash_bytes, digest, path, span.offset, span.length)
        return digest

    async def _load_local(self, job: TaskJob, task: TaskRecord) -> None:
        job.content_length = task.content_length or 0
        job.piece_length = task.piece_length or ids.piece_length_for(job.content_length)
        job.response_header = task.response_header
        for piece in await self.storage.pieces(task.id):
            job.done[piece.number] = (piece, TrafficType.LOCAL_PEER)

    async def back_to_source(self, job: TaskJob, on_piece: PieceReport | None = None) -> None:
        """Fetch every missing piece from the origin, one stream per run of missing pieces.

        Each piece is committed in a batch, then announced to followers and passed to ``on_piece``.
        """
        writer = job.writer
        assert writer is not None, "pieces are fetched only while the job holds its writer"
        request = job.request
        headers = origin_headers(request.request_header)
        limits = self.bandwidth.source
        if request.is_prefetch and self.bandwidth.prefetch is not None:
            limits = (*limits, self.bandwidth.prefetch)
        origin = Origin(self.backend, request.url, headers, request.from_network, self.piece_attempts, limits)

        async def announce(piece: PieceRecord) -> None:
            metrics.DOWNLOAD_BYTES.labels("origin").inc(piece.length)
            metrics.PIECE_SECONDS.labels("origin").observe(piece.cost)
            await job.piece_done(piece, TrafficType.BACK_TO_SOURCE)
            if on_piece is not None:
                await on_piece(piece)

        publish = functools.partial(self._publish, job.task_id)
        followed = functools.partial(self._followed, job.task_id)
        async with writer.piece_file() as file:
            missing = job.missing_pieces()
            committer = BatchCommitter(file, announce, pieces=len(missing))
            try:
                # A client following the bytes, and a blob's digest, take them in order: one stream serves them best.
                # An origin without ranges sends its whole body each time: then the runs go one after another.
                ordered = job.task_id in self._taps or job.digest is not None or not job.accepts_ranges
                streams = 1 if ordered else _SOURCE_STREAMS
                limit = asyncio.Semaphore(streams)

                async def one(spans: list[PieceSpan]) -> None:
                    async with limit:
                        await RunStream(origin, spans, file, committer, publish, followed).run()

                async with asyncio.TaskGroup() as group:
                    for spans in runs(missing, streams):
                        group.create_task(one(spans))
                await committer.close()
            finally:
                committer.abandon()


def _check_range(request: DownloadRequest) -> None:
    """A zero-length range, or a ``Range`` header that can never parse, fails before any work."""
    if request.range is not None:
        if request.range.length == 0:
            raise DownloadPrecondition("download.range.length must be positive")
        return
    value = range_header(request.request_header)
    if value is not None:
        try:
            check_range_header(value)
        except RangeNotSatisfiable as exc:
            raise DownloadPrecondition(str(exc)) from None


def _resolve_range(request: DownloadRequest, content_length: int) -> ByteRange | None:
    """The range a request asks for in the task's content (FAILED_PRECONDITION when it selects nothing)."""
    try:
        return effective_range(
            request.range, request.request_header, content_length, long_suffix_is_whole=request.long_suffix_is_whole
        )
    except RangeNotSatisfiable as exc:
        raise RangeOutsideContent(str(exc), content_length) from None


def _covering(job: TaskJob, byte_range: ByteRange | None) -> list[PieceSpan]:
    """The job's pieces that hold ``byte_range`` (all without one)."""
    try:
        return covering_pieces(job.content_length, job.piece_length, byte_range)
    except RangeNotSatisfiable as exc:
        raise RangeOutsideContent(str(exc), job.content_length) from None


def _needs_whole_task(request: DownloadRequest) -> bool:
    """A digest covers the whole file, so a request with one needs every piece, whatever its range."""
    return request.digest is not None or _blob_digest(request) is not None


def _aim(job: TaskJob) -> None:
    """Fix what a job fetches: the pieces its first request needs (None for all), and that request's range with
    its ``Range`` header converted. A range that selects nothing fetches nothing; that request fails on it, and a
    later one starts a job of its own."""
    try:
        job.range = _resolve_range(job.request, job.content_length)
        covering = None if job.range is None else {span.number for span in _covering(job, job.range)}
    except DownloadPrecondition:
        job.range, covering = None, set()
    job.target = None if _needs_whole_task(job.request) else covering


def _hash_bytes(digest: ids.FileDigester, path: Path, offset: int, length: int) -> None:
    """Feed ``length`` bytes of a content file from ``offset`` to a digest (blocking: run it in a thread)."""
    with path.open("rb") as f:
        f.seek(offset)
        remaining = length
        while remaining:
            chunk = f.read(min(remaining, 1024 * 1024))
            if not chunk:
                raise DownloadFailed(f"cache file ended {remaining} bytes early while hashing it")
            digest.update(chunk)
            remaining -= len(chunk)


def _task_info(job: TaskJob) -> TaskInfo:
    """What storage records of a task when its download starts."""
    request = job.request
    return TaskInfo(
        url=request.url,
        tag=request.tag or "",
        application=request.application or "",
        piece_length=job.piece_length,
        content_length=job.content_length,
        response_header=job.response_header,
    )


def _blob_digest(request: DownloadRequest) -> str | None:
    """The OCI blob digest the task's content must match as it lands: the blob URL's, when the task is named by it
    or the request's ``digest`` confirms it (the registry mirror's URL-named blobs). The task records it."""
    blob = ids.blob_digest_from_url(request.url)
    if request.enable_task_id_based_blob_digest or (blob is not None and request.digest == blob):
        return blob
    return None


def _root_cause(error: BaseException) -> BaseException:
    """The first real failure inside the exception groups that concurrent piece fetching raises."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _check_headers(headers: dict[str, str]) -> None:
    """Headers go to the origin as given: they must be valid HTTP and may not redefine the daemon's own."""
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise InvalidDownload(f"download.request_header: {name[:100]!r} is not a valid header name")
        if not _HEADER_VALUE.fullmatch(value):
            raise InvalidDownload(
                f"download.request_header: the value of {name!r} must be printable ASCII without surrounding blanks"
            )
        if name.lower() in _RESERVED_HEADERS:
            raise InvalidDownload(f"download.request_header: {name!r} is set by the daemon itself")


def _check_output_path(output_path: str, overwrite: bool) -> None:
    path = Path(output_path)
    if not path.is_absolute():
        raise InvalidDownload(f"download.output_path must be absolute, got {output_path[:200]!r}")
    if "\0" in output_path or len(output_path.encode()) >= 4096 or len(path.name.encode()) > 255:
        raise InvalidDownload("download.output_path is too long or contains NUL")
    if not path.parent.is_dir():
        raise DownloadPrecondition(f"the directory of output_path {output_path!r} does not exist")
    if path.is_dir():
        raise DownloadPrecondition(f"output_path {output_path!r} is a directory")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DownloadPrecondition(f"output_path {output_path!r} exists (set overwrite to replace it)")


def _write_output(
    content: Path, output: Path, byte_range: ByteRange | None, content_length: int, overwrite: bool, force_link: bool
) -> None:
    """Put the task's bytes at ``output``: hard link when whole and possible, else a copy; atomic either way."""
    _check_output_path(str(output), overwrite)
    temporary = output.with_name(f".dfdaemon-{uuid.uuid4().hex[:12]}.tmp")  # short: any legal name still fits
    try:
        linked = False
        if byte_range is None:
            try:
                os.link(content, temporary)
                linked = True
            except OSError as exc:
                if force_link:
                    raise DownloadPrecondition(f"cannot hard-link {output}: {exc.strerror}") from None
        if not linked:
            start, length = (0, content_length) if byte_range is None else (byte_range.start, byte_range.length)
            with content.open("rb") as source, temporary.open("wb") as target:
                source.seek(start)
                _copy_exactly(source, target, length)
                target.flush()
                os.fsync(target.fileno())
        if overwrite:
            os.replace(temporary, output)
        else:
            os.link(temporary, output)  # fails if the path appeared meanwhile: never clobber without overwrite
    except FileExistsError:
        raise DownloadPrecondition(f"output_path {str(output)!r} exists (set overwrite to replace it)") from None
    except OSError as exc:
        raise DownloadPrecondition(f"cannot write output_path {str(output)!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _copy_exactly(source: BinaryIO, target: BinaryIO, length: int) -> None:
    """Copy the next ``length`` bytes of a cache file inside the kernel (none pass through Python); a file that
    ends early is an error."""
    source_fd, target_fd, offset = source.fileno(), target.fileno(), source.tell()
    remaining = length
    while remaining:
        copied = _copy_range(source_fd, target_fd, offset, min(remaining, 1 << 30))
        if not copied:
            raise DownloadFailed(f"cache file ended {remaining} bytes early")
        offset += copied
        remaining -= copied


def _copy_range(source_fd: int, target_fd: int, offset: int, count: int) -> int:
    """``copy_file_range`` (a reflink where the filesystem can), else ``sendfile`` (another filesystem)."""
    try:
        return os.copy_file_range(source_fd, target_fd, count, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    return os.sendfile(target_fd, source_fd, offset, count)


def _verify_digest(path: Path, expected: str) -> None:
    """The caller's expectation of the whole file (``download.digest``)."""
    digester = ids.FileDigester(expected)
    _hash_bytes(digester, path, 0, path.stat().st_size)
    if not digester.matches():
        raise DownloadPrecondition(f"digest mismatch: expected {expected}, got {digester.hexdigest()}")
