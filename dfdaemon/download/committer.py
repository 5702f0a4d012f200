"""Written pieces made durable and visible in batches, then announced: one policy for every way pieces arrive.

A commit is one fdatasync and one transaction, and syncs in quick succession slow the writes beside them, so
pieces wait (briefly) to be committed together. The announcements (to the task's followers, the scheduler, a
collection's bookkeeping) run in one task of their own, batch after batch in order, so the next commit never waits
for them: a commit that waited let dirty pages pile up for one long fdatasync at the end of the download.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dfdaemon.storage import PieceFile, PieceRecord

# Pieces are committed once this many are written, or this long after the first of a batch was.
COMMIT_PIECES = 8
COMMIT_DELAY = 0.1

PieceReport = Callable[[PieceRecord], Awaitable[None]]


class BatchCommitter:
    """Commits a download's written pieces in batches off the hot path; ``announce`` runs for each once it is
    visible. ``pieces`` is how many the download may add: the last of them is committed at once, not after the
    wait. ``on_failure`` (when given) hears at once that a commit or an announcement failed; the failure itself is
    raised by the next ``add``, ``check`` or ``close``.
    """

    def __init__(
        self, file: PieceFile, announce: PieceReport, *, pieces: int, on_failure: Callable[[], None] | None = None
    ) -> None:
        self.file = file
        self.announce = announce
        self.on_failure = on_failure
        self._left = pieces
        self._pending: list[PieceRecord] = []
        self._flushing: asyncio.Task[None] | None = None
        self._committed: asyncio.Queue[list[PieceRecord] | None] = asyncio.Queue()  # None: no more batches
        self._announcing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None  # the first commit or announcement that failed; nothing after it

    def check(self) -> None:
        """Raise the failure of a commit or an announcement, if one failed."""
        for task in (self._flushing, self._announcing):
            if task is not None and task.done():
                self._ended(task)  # (its callback may not have run yet)
        if self._error is not None:
            raise self._error

    def add(self, piece: PieceRecord) -> None:
        self.check()
        self._pending.append(piece)
        self._left -= 1
        if len(self._pending) >= COMMIT_PIECES or self._left <= 0:
            self._kick()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(COMMIT_DELAY, self._kick)

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._error is None and (self._flushing is None or self._flushing.done()):
            self._flushing = self._watched(self._flush())

    def _watched(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(job)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()  # read, so it is never reported as unretrieved
        if error is not None and self._error is None:
            self._error = error
            if self.on_failure is not None:
                self.on_failure()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await self.file.commit(batch)
            if self._announcing is None:
                self._announcing = self._watched(self._announce())
            self._committed.put_nowait(batch)

    async def _announce(self) -> None:
        while (batch := await self._committed.get()) is not None:
            for piece in batch:
                await self.announce(piece)

    async def close(self) -> None:
        """Commit what is left and wait for every announcement; raises a commit's or an announcement's failure."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await asyncio.wait([self._flushing])
        self.check()
        await self._flush()
        if self._announcing is not None:
            self._committed.put_nowait(None)
            await asyncio.wait([self._announcing])
        self.check()

    def abandon(self) -> None:
        """Stop: nothing more is committed or announced (the download failed or was cancelled)."""
        if self._timer is not None:
            self._timer.cancel()
        for task in (self._flushing, self._announcing):
            if task is not None:
                task.cancel()
