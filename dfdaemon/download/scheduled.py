"""The scheduler-driven fetch of one task: the AnnouncePeer flow from registration to the terminal report.

Register, then follow the scheduler's decision: nothing to fetch (empty task), pieces from candidate
parents (each piece reported; failing parents reported and, when parents run out, a reschedule naming every
candidate of the round), or back to source (each piece reported as such). As upstream's Rust peer does, a small
download (content or range of at most 4 MiB) that may go back to source skips the scheduler; a scheduler that
cannot be reached, stays silent past ``schedule_timeout`` or answers more than ``max_schedule_count`` times sends
the download back to source by itself, unless the request forbids it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from typing import TYPE_CHECKING

from dfdaemon.download.manager import DownloadFailed
from dfdaemon.download.parents import collect_from_parents
from dfdaemon.download.peering import (
    BackToSource,
    Decision,
    EmptyTask,
    Parent,
    ParentClient,
    Registration,
    Scheduler,
    SchedulerSession,
    SchedulerUnavailable,
)
from dfdaemon.storage import PieceRecord
from dfdaemon.telemetry import tracing

if TYPE_CHECKING:
    from dfdaemon.download.manager import DownloadManager, TaskJob

log = logging.getLogger("dfdaemon.download")

# Upstream's defaults for scheduler.scheduleTimeout and scheduler.maxScheduleCount.
SCHEDULE_TIMEOUT = 3 * 3600.0
MAX_SCHEDULE_COUNT = 5
# Upstream (client 1.4.1+) fetches content or a range no longer than its minimum piece length straight from the
# source when back to source is allowed: a scheduler round trip costs more than such a download saves.
SMALL_DOWNLOAD_LIMIT = 4 * 1024 * 1024


class ScheduledFetch:
    """Fetches a job's missing pieces the way the scheduler decides."""

    def __init__(
        self,
        manager: DownloadManager,
        scheduler: Scheduler,
        parents: ParentClient,
        piece_timeout: float,
        *,
        schedule_timeout: float = SCHEDULE_TIMEOUT,
        max_schedule_count: int = MAX_SCHEDULE_COUNT,
        small_download_limit: int = SMALL_DOWNLOAD_LIMIT,
    ) -> None:
        self.manager = manager
        self.scheduler = scheduler
        self.parents = parents
        self.piece_timeout = piece_timeout
        self.schedule_timeout = schedule_timeout
        self.max_schedule_count = max_schedule_count
        self.small_download_limit = small_download_limit

    async def __call__(self, job: TaskJob) -> None:
        if self._is_small(job):
            log.debug("task %s is small: downloading it from the source without the scheduler", job.task_id)
            await self.manager.back_to_source(job)
            return
        session = self.scheduler.open_session(job.task_id, job.peer_id)
        try:
            await self._follow(job, session)
        except SchedulerUnavailable as exc:
            await session.close()  # the stream is abandoned before the origin is touched, as upstream drops it
            if job.request.disable_back_to_source:
                raise DownloadFailed(f"{exc}, and back to source is disabled") from None
            log.warning("task %s: %s; going back to source", job.task_id, exc)
            await self.manager.back_to_source(job)
        finally:
            await session.close()

    def _is_small(self, job: TaskJob) -> bool:
        """Upstream's rule: the content, or the range asked for, is at most 4 MiB and the source may be used."""
        request, limit = job.request, self.small_download_limit
        if request.disable_back_to_source:
            return False
        return job.content_length <= limit or (job.range is not None and job.range.length <= limit)

    def _registration(self, job: TaskJob) -> Registration:
        return Registration(
            task_id=job.task_id,
            peer_id=job.peer_id,
            download=dataclasses.replace(job.request, range=job.range),  # a Range header travels converted
            content_length=job.content_length,
            actual_piece_length=job.piece_length,
            piece_count=len(job.pieces),
            concurrent_piece_count=job.request.concurrent_piece_count or self.manager.concurrent_piece_count,
        )

    async def _decision(self, job: TaskJob, session: SchedulerSession, count: int) -> Decision:
        """The scheduler's next answer, waited for at most ``schedule_timeout``."""
        with tracing.span("schedule", task_id=job.task_id, attempt=count) as current:
            try:
                async with asyncio.timeout(self.schedule_timeout):
                    decision = await session.decision()
            except TimeoutError:
                raise SchedulerUnavailable(
                    f"the scheduler sent nothing for {self.schedule_timeout:g}s (scheduler.scheduleTimeout)"
                ) from None
            current.set_attribute("dragonfly.decision", type(decision).__name__)
        return decision

    async def _follow(self, job: TaskJob, session: SchedulerSession) -> None:
        with tracing.span("schedule.register", task_id=job.task_id, peer_id=job.peer_id):
            await session.register(self._registration(job))
        started = False
        for count in itertools.count(1):
            decision = await self._decision(job, session, count)
            if count > self.max_schedule_count:
                await session.failed("max schedule count exceeded", back_to_source=False)
                raise SchedulerUnavailable(f"the scheduler answered {count} times (scheduler.maxScheduleCount)")
            if isinstance(decision, EmptyTask):
                await session.download_started()
                await session.finished(back_to_source=False)
                return
            if isinstance(decision, BackToSource):
                await self._back_to_source(job, session, decision.description)
                return
            if not started:
                await session.download_started()
                started = True
            try:
                await self._from_parents(job, session, decision.parents)
            except SchedulerUnavailable:
                raise
            except Exception as exc:  # this peer failed (its disk, a report): the scheduler hears it, as upstream
                await session.failed(str(exc), back_to_source=False)
                raise
            if not job.missing_pieces():
                await session.finished(back_to_source=False)
                return
            # Every candidate of the round, as upstream lists them: the scheduler keeps them all from this peer.
            await session.reschedule(decision.parents, f"{len(job.missing_pieces())} pieces still missing")

    async def _from_parents(self, job: TaskJob, session: SchedulerSession, parents: list[Parent]) -> None:
        writer = job.writer
        assert writer is not None, "pieces are fetched only while the job holds its writer"

        pending: set[asyncio.Future[None]] = set()
        failures: list[BaseException] = []

        def settled(report: asyncio.Future[None]) -> None:
            pending.discard(report)
            error = None if report.cancelled() else report.exception()
            if error is not None:
                failures.append(error)

        async def record(piece: PieceRecord) -> None:
            await job.piece_done(piece, piece.traffic_type)
            await session.piece_finished(piece)

        async def on_piece(piece: PieceRecord) -> None:
            # Reported by a task of its own: the collection's next commit does not wait for the scheduler's stream,
            # and a piece already stored is still counted and reported when the collection cancels its workers once
            # the last piece is in. The reports keep their order (each takes the stream's write lock in turn), and
            # the collection's end waits for them all.
            report = asyncio.ensure_future(record(piece))
            pending.add(report)
            report.add_done_callback(settled)

        async def on_failure(number: int, parent: Parent) -> None:
            # Temporary, as upstream always says: the scheduler then keeps this parent from this peer.
            await session.piece_failed(number, parent.peer_id, temporary=True)

        collected = False
        try:
            await collect_from_parents(
                job.task_id,
                job.missing_pieces(),
                parents,
                self.parents,
                writer,
                concurrency=job.request.concurrent_piece_count or self.manager.concurrent_piece_count,
                piece_timeout=self.piece_timeout,
                on_piece=on_piece,
                on_failure=on_failure,
                bandwidth=self.manager.bandwidth.download,  # download.bandwidthLimit, for pieces from parents
            )
            collected = True
        finally:
            await asyncio.gather(*pending, return_exceptions=True)
            for error in failures[1 if collected else 0 :]:  # the first is raised below unless another error is
                log.warning("reporting a piece of %s failed: %s", job.task_id, error)
        if failures:
            raise failures[0]

    async def _back_to_source(self, job: TaskJob, session: SchedulerSession, description: str) -> None:
        if job.request.disable_back_to_source:
            await session.failed("back to source is disabled for this download", back_to_source=False)
            raise DownloadFailed(f"the scheduler sent the peer back to source ({description}), which is disabled")
        await session.back_to_source_started(description)
        try:
            await self.manager.back_to_source(job, on_piece=session.back_to_source_piece_finished)
        except Exception as exc:
            await session.failed(str(exc), back_to_source=True)
            raise
        await session.finished(back_to_source=True)
