"""The scheduler-driven fetch of one task: the AnnouncePeer flow from registration to the terminal report.

Register, then follow the scheduler's decision: nothing to fetch (empty task), pieces from candidate
parents (each piece reported; failing parents reported and, when parents run out, a reschedule), or
back to source (each piece reported as such). When the scheduler cannot be reached the download goes
back to source by itself, unless the request forbids it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from dfdaemon.download.manager import DownloadFailed
from dfdaemon.download.parents import collect_from_parents
from dfdaemon.download.peering import (
    BackToSource,
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

# After this many rounds of parents that could not finish the task, stop asking and go back to source.
MAX_RESCHEDULES = 5


class ScheduledFetch:
    """Fetches a job's missing pieces the way the scheduler decides."""

    def __init__(
        self, manager: DownloadManager, scheduler: Scheduler, parents: ParentClient, piece_timeout: float
    ) -> None:
        self.manager = manager
        self.scheduler = scheduler
        self.parents = parents
        self.piece_timeout = piece_timeout

    async def __call__(self, job: TaskJob) -> None:
        session = self.scheduler.open_session(job.task_id, job.peer_id)
        try:
            await self._follow(job, session)
        except SchedulerUnavailable as exc:
            if job.request.disable_back_to_source:
                raise DownloadFailed(f"the scheduler is unavailable ({exc}) and back to source is disabled") from None
            log.warning("scheduler unavailable for task %s (%s); going back to source", job.task_id, exc)
            await self.manager.back_to_source(job)
        finally:
            await session.close()

    def _registration(self, job: TaskJob) -> Registration:
        request = job.request
        return Registration(
            task_id=job.task_id,
            peer_id=job.peer_id,
            url=request.url,
            tag=request.tag,
            application=request.application,
            piece_length=request.piece_length,
            filtered_query_params=request.filtered_query_params,
            request_header=request.request_header,
            content_length=job.content_length,
            actual_piece_length=job.piece_length,
            piece_count=len(job.pieces),
            concurrent_piece_count=request.concurrent_piece_count or self.manager.concurrent_piece_count,
            need_back_to_source=request.need_back_to_source,
            disable_back_to_source=request.disable_back_to_source,
            priority=request.priority,
        )

    async def _follow(self, job: TaskJob, session: SchedulerSession) -> None:
        with tracing.span("schedule.register", task_id=job.task_id, peer_id=job.peer_id):
            await session.register(self._registration(job))
        started = False
        for attempt in range(MAX_RESCHEDULES + 1):
            with tracing.span("schedule", task_id=job.task_id, attempt=attempt) as current:
                decision = await session.decision()
                current.set_attribute("dragonfly.decision", type(decision).__name__)
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
            failed = await self._from_parents(job, session, decision.parents)
            if not job.missing_pieces():
                await session.finished(back_to_source=False)
                return
            await session.reschedule(failed, f"{len(job.missing_pieces())} pieces still missing")
        if job.request.disable_back_to_source:
            await session.failed("parents could not supply the task", back_to_source=False)
            raise DownloadFailed("no parent could supply the task and back to source is disabled")
        await self._back_to_source(job, session, "rescheduling did not find parents with the task")

    async def _from_parents(self, job: TaskJob, session: SchedulerSession, parents: list[Parent]) -> list[Parent]:
        writer = job.writer
        assert writer is not None, "pieces are fetched only while the job holds its writer"

        pending: set[asyncio.Task[None]] = set()

        async def record(piece: PieceRecord) -> None:
            await job.piece_done(piece, piece.traffic_type)
            await session.piece_finished(piece)

        async def on_piece(piece: PieceRecord) -> None:
            # The collection cancels its workers once the last piece is in; a piece already stored must still be
            # counted and reported, so that runs on its own and the collection's end waits for it.
            report = asyncio.ensure_future(record(piece))
            pending.add(report)
            report.add_done_callback(pending.discard)
            await asyncio.shield(report)

        async def on_failure(number: int, parent: Parent) -> None:
            # Temporary, as upstream always says: the scheduler then keeps this parent from this peer.
            await session.piece_failed(number, parent.peer_id, temporary=True)

        try:
            return await collect_from_parents(
                job.task_id,
                job.missing_pieces(),
                parents,
                self.parents,
                writer,
                concurrency=job.request.concurrent_piece_count or self.manager.concurrent_piece_count,
                piece_timeout=self.piece_timeout,
                on_piece=on_piece,
                on_failure=on_failure,
            )
        finally:
            await asyncio.gather(*pending)

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
