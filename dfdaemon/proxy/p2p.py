"""Answers an HTTP GET with a P2P task's bytes, in order, as the task's pieces land.

Used by the forward proxy for URLs its rules (or ``X-Dragonfly-Use-P2P``) send through the P2P network, and by the
registry mirror when the headers name a task other than the blob's digest. A ``Range`` becomes the download's
range, so only the covering pieces are needed; with prefetch on, the whole task is then fetched in the background
and later requests are served from the cache. Pieces are read back from storage one at a time: the task is never
held whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator

from aiohttp import web

from dfdaemon.admission import Busy
from dfdaemon.backend import BackendError, SourceNotAllowed, UnsupportedURL
from dfdaemon.download import DownloadManager, DownloadRequest, InvalidDownload, PieceDone, Started
from dfdaemon.download.manager import ByteRange, DownloadPrecondition, RangeOutsideContent
from dfdaemon.proxy import headers as dragonfly
from dfdaemon.proxy.cache import write_stored_piece
from dfdaemon.proxy.mirror import UnsatisfiableRange, range_form, range_span
from dfdaemon.storage import Storage, StorageFull

log = logging.getLogger("dfdaemon.proxy")


def error_response(kind: str, status: int, message: str, extra: dict[str, str] | None = None) -> web.Response:
    """A plain-text error naming where it arose (``X-Dragonfly-Error-Type``: backend, proxy or dfdaemon)."""
    response = web.Response(status=status, text=message + "\n", headers=extra)
    response.headers[dragonfly.ERROR_TYPE] = kind
    return response


def failure_response(error: Exception) -> web.Response:
    """The answer to a download that failed before its first byte, as upstream classifies it."""
    if isinstance(error, BackendError):
        status = error.status_code if error.status_code is not None and error.status_code >= 400 else 502
        return error_response("backend", status, f"the origin failed: {error.message}")
    if isinstance(error, SourceNotAllowed):
        return error_response("proxy", 403, str(error))
    if isinstance(error, RangeOutsideContent):
        return error_response("proxy", 416, str(error), {"Content-Range": f"bytes */{error.content_length}"})
    if isinstance(error, InvalidDownload | UnsupportedURL | DownloadPrecondition):
        return error_response("proxy", 400, str(error))
    if isinstance(error, Busy | StorageFull):
        return error_response("dfdaemon", 503, str(error), {"Retry-After": "5"})
    log.warning("P2P download failed: %s", error)
    return error_response("dfdaemon", 500, f"the download failed: {error}")


# The largest byte position a range may name (content lengths are signed 64-bit, as upstream's).
_MAX_POSITION = 2**63 - 1


class P2PResponder:
    """Streams P2P downloads to HTTP clients."""

    def __init__(self, storage: Storage, downloads: DownloadManager, *, server_ip: str) -> None:
        self.storage = storage
        self.downloads = downloads
        self.server_ip = server_ip

    async def respond(self, request: web.Request, download: DownloadRequest) -> web.StreamResponse:
        """Answer ``request`` with the task ``download`` names: 200 with every byte, or 206 with its ``Range``.

        A ranged download with ``prefetch`` set goes on to fetch the whole task in the background (the manager's)."""
        try:
            download = await self._ranged(request.headers.get("Range"), download)
        except UnsatisfiableRange as exc:
            extra = None if exc.length is None else {"Content-Range": f"bytes */{exc.length}"}
            return error_response("proxy", 416, f"the range {exc} selects no byte of the content", extra)
        except Exception as exc:
            return failure_response(exc)
        events = self.downloads.download(download)
        try:
            started = await anext(events)
        except Exception as exc:
            await events.aclose()
            return failure_response(exc)
        assert isinstance(started, Started)
        span = None if started.range is None else (started.range.start, started.range.end - 1)
        response = web.StreamResponse(
            status=206 if span is not None else 200,
            headers=dragonfly.response_headers(started, self.server_ip, span),
        )
        try:
            await response.prepare(request)
            await self._send(response, events, started, span)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # The status is out: break the connection so the client sees a failed transfer, not a short one.
            log.warning("streaming task %s broke off: %s", started.task_id, exc)
            if request.transport is not None:
                request.transport.abort()
        finally:
            await events.aclose()
        return response

    async def _ranged(self, header: str | None, download: DownloadRequest) -> DownloadRequest:
        """The download limited to the client's ``Range``; several ranges, another unit or a malformed header get
        the whole content, as RFC 9110 allows (the mirror reads ranges the same way).

        The range is cut here when the content's length is known (from the cache). The range of a task not cached
        here goes to the download as its ``Range`` header instead, resolved once the download has the length: the
        origin is asked for it once, not twice. The download then reads a suffix longer than the content as all of
        it, as this reading does (RFC 9110), not as a refusal (upstream's gRPC reading).
        """
        form = range_form(header)
        if form is None or header is None:
            return download
        first, last = form
        length = await self._stored_length(download)
        if length is None:
            if (first is None and last == 0) or (first is not None and first > _MAX_POSITION):
                raise UnsatisfiableRange(header)  # no byte of any content: the last 0, or past any end
            end = "" if last is None else str(min(last, _MAX_POSITION))  # (a suffix's ``last`` is its length)
            wanted = f"bytes=-{end}" if first is None else f"bytes={first}-{end}"
            return dataclasses.replace(
                download, request_header={**download.request_header, "Range": wanted}, long_suffix_is_whole=True
            )
        start, stop = range_span(form, length, header)
        return dataclasses.replace(download, range=ByteRange(start, stop - start + 1))

    async def _stored_length(self, download: DownloadRequest) -> int | None:
        """The content's length when the task is known here; None otherwise."""
        task = await self.storage.get_task(self.downloads.validate(download))
        return None if task is None else task.content_length

    async def _send(
        self,
        response: web.StreamResponse,
        events: AsyncGenerator[Started | PieceDone, None],
        started: Started,
        span: tuple[int, int] | None,
    ) -> None:
        """Write the wanted bytes in offset order, each piece as soon as it and those before it are stored.

        The last piece goes out only once the download has ended, so that what it settles at its end (the output
        file of ``X-Dragonfly-Output-Path``, or a failure) is settled before the client holds the whole body.
        """
        first, last = span if span is not None else (0, started.content_length - 1)
        pending = sorted(started.pieces, key=lambda piece: piece.offset)
        arrived: set[int] = set()
        async for event in events:
            assert isinstance(event, PieceDone)
            arrived.add(event.piece.number)
            while len(pending) > 1 and pending[0].number in arrived:
                await write_stored_piece(response, self.storage, started.task_id, pending.pop(0), first, last + 1)
        missing = [piece.number for piece in pending if piece.number not in arrived]
        if missing:
            raise RuntimeError(f"task {started.task_id} ended without pieces {missing[:10]}")
        for piece in pending:
            await write_stored_piece(response, self.storage, started.task_id, piece, first, last + 1)
        await response.write_eof()
