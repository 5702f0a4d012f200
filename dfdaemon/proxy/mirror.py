"""A registry mirror (containerd's ``hosts.toml`` points a registry at it).

``GET /v2/<name>/blobs/<digest>`` becomes a P2P download whose task id is the blob's digest, so every
node shares one copy of a layer whatever registry or repository it came from, and the bytes are checked
against the digest. A blob's bytes reach the runtime by ``sendfile`` from its content file as the download's stream
writes them there from the registry, else as its pieces are stored (pieces from peers); the last
``HELD_TAIL`` bytes are held back until the whole blob matched its digest. A blob is never held whole. A blob the
cache holds whole goes out by ``sendfile`` from its content file (see ``cache``). Before any blob is served, the
registry is asked whether this client may read it, unless it is configured public (see ``access``).
Everything else (``/v2/``, manifests, tags, HEAD of an uncached blob) is passed to the registry as is,
status, headers and body included, so auth challenges and errors reach the runtime unchanged. The
registry is the one the runtime names with ``?ns=<host>``, else ``proxy.registryMirror.addr``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web

from dfdaemon import ids
from dfdaemon.admission import Busy
from dfdaemon.backend import BackendError, OriginClient, SourceNotAllowed, SourcePolicy, UnsupportedURL
from dfdaemon.download import DownloadManager, DownloadRequest, InvalidDownload, PieceDone, Started
from dfdaemon.download.source import WrittenBytes
from dfdaemon.ids import InvalidTaskId, PieceSpan, blob_digest_task_id
from dfdaemon.proxy import headers as dragonfly
from dfdaemon.proxy.access import AccessMemory
from dfdaemon.proxy.cache import (
    FileState,
    IntactFiles,
    file_state,
    open_content,
    rotten_pieces,
    send_range,
    write_stored_piece,
)
from dfdaemon.proxy.headers import end_to_end as _forwarded
from dfdaemon.storage import PieceCorrupt, PieceRecord, Storage, StorageFull, TaskRecord, TaskState

if TYPE_CHECKING:
    from dfdaemon.proxy.forward import ForwardProxy
    from dfdaemon.proxy.p2p import P2PResponder

log = logging.getLogger("dfdaemon.proxy")

_BLOB_PATH = re.compile(r"/v2/(?P<name>(?:[^/]+/)*[^/]+)/blobs/(?P<digest>[^/]+)")
# Docker Hub is named "docker.io" in image references, but its API lives elsewhere.
_REGISTRY_ALIASES = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
# Bytes of a blob that reach the client only once the blob is verified (its digest, or its cached pieces' CRCs).
HELD_TAIL = 64 * 1024
_HOST_PORT = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


class UnsatisfiableRange(ValueError):
    """A ``Range`` that selects no byte of the content (416); ``length`` is the content's, when known."""

    def __init__(self, header: str, length: int | None = None) -> None:
        super().__init__(header)
        self.length = length


def upstream_base(ns: str | None, default: str, insecure: frozenset[str]) -> str:
    """The registry's base URL: ``ns`` when the runtime named one (https unless listed insecure), else ``default``."""
    if not ns:
        return default.rstrip("/")
    if not _HOST_PORT.fullmatch(ns):
        raise ValueError(f"ns={ns[:100]!r} is not a registry host")
    host = _REGISTRY_ALIASES.get(ns.lower(), ns.lower())
    scheme = "http" if ns.lower() in insecure else "https"
    ids.normalize_url(f"{scheme}://{host}/")  # a host that looks like one but is no URL host (4300000000) is refused
    return f"{scheme}://{host}"


_BYTE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def range_form(header: str | None) -> tuple[int | None, int | None] | None:
    """The ``(first, last)`` of one ``Range: bytes=`` (``first`` None: a suffix of ``last`` bytes; ``last`` None: to
    the end); None for a header to ignore: several ranges, another unit, a malformed range or one ending before it
    starts, all answered with the whole content as RFC 9110 allows."""
    match = _BYTE_RANGE.fullmatch(header.strip().lower()) if header else None
    if match is None or not (match.group(1) or match.group(2)):
        return None
    first, last = (int(text) if text else None for text in match.groups())
    if first is not None and last is not None and last < first:
        return None
    return first, last


def range_span(form: tuple[int | None, int | None], length: int, header: str) -> tuple[int, int]:
    """The inclusive byte span a ``range_form`` selects in ``length`` bytes; UnsatisfiableRange when it selects
    none."""
    first, last = form
    if first is None:  # suffix: the last N bytes
        assert last is not None, "a range form has a first or a last position"
        if last == 0 or length == 0:
            raise UnsatisfiableRange(header, length)
        return max(0, length - last), length - 1
    if first >= length:
        raise UnsatisfiableRange(header, length)
    return first, length - 1 if last is None else min(last, length - 1)


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The inclusive byte span one ``Range: bytes=`` asks for; None for the whole blob (see ``range_form``)."""
    form = range_form(header)
    return None if form is None or header is None else range_span(form, length, header)


def _registry_error(status: int, code: str, message: str) -> web.Response:
    """An error in the registry API's own shape, so a runtime prints the message."""
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(status=status, text=body, content_type="application/json")


def _blob_digest(request: web.Request) -> str | None:
    """The digest a blob request names; None for any other path, or a digest of an algorithm blobs are not checked
    by (the registry answers for those itself)."""
    match = _BLOB_PATH.fullmatch(request.path)
    if match is None:
        return None
    try:
        ids.blob_digest_task_id(match.group("digest"))
    except ids.InvalidTaskId:
        return None
    return match.group("digest")


def _named_digest(request: web.Request) -> str:
    digest = _blob_digest(request)
    assert digest is not None, "only a blob request asks"
    return digest


def _matched_digest(request: web.Request, task: TaskRecord) -> bool:
    """Whether the task's bytes matched the blob's digest: it is the task the digest names (whose download checks
    it), or its completion recorded that digest. A task named by the URL may have been completed by a download that
    had no digest to check (a ``dfget`` of the blob's URL, say)."""
    digest = _named_digest(request)
    if task.digest == digest:
        return True
    try:
        return task.id == blob_digest_task_id(digest)
    except InvalidTaskId:
        return False


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/"))


class RegistryMirror:
    """Answers registry API requests for one daemon (the aiohttp handler)."""

    def __init__(
        self,
        storage: Storage,
        downloads: DownloadManager,
        policy: SourcePolicy,
        *,
        default_registry: str,
        insecure_registries: frozenset[str] = frozenset(),
        public_registries: frozenset[str] = frozenset(),
        blobs_by_digest: bool = True,
        disable_back_to_source: bool = False,
        timeout: float = 60.0,
        p2p: P2PResponder | None = None,
        prefetch: bool = False,
    ) -> None:
        """``p2p`` serves the GETs ``X-Dragonfly-Use-P2P`` sends through the P2P network that are not blobs."""
        self.storage = storage
        self.downloads = downloads
        self.policy = policy
        self.default_registry = default_registry
        self.insecure_registries = frozenset(host.lower() for host in insecure_registries)
        # Registries whose blobs any client may read: served from the cache without asking the registry first.
        self.public_registries = frozenset(host.lower() for host in public_registries)
        self.access = AccessMemory()
        self.intact = IntactFiles()
        self.blobs_by_digest = blobs_by_digest
        self.disable_back_to_source = disable_back_to_source
        self.p2p = p2p
        self.prefetch = prefetch
        # The back-to-source policy holds at connect time here too; redirects are the runtime's to follow (they
        # may lead to storage the registry signs for it).
        self.client = OriginClient(policy, timeout=timeout, pass_through=True)

    async def close(self) -> None:
        await self.client.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One registry request; a transfer that broke off is a warning (the runtime's pull fails)."""
        return await dragonfly.answer_counted(request, self._answer, log, logging.WARNING)

    async def _answer(self, request: web.Request) -> tuple[web.StreamResponse, str]:
        """The response, and which way it went: "blob" (P2P or cache), "registry" (passed on) or "refused"."""
        if not (request.path == "/v2" or request.path.startswith("/v2/")):
            return _registry_error(404, "NOT_FOUND", "this is a registry mirror: only /v2/ paths are served"), "refused"
        if _has_dot_segment(request.path) or _has_dot_segment(request.raw_path.split("?", 1)[0]):
            return _registry_error(
                400, "NAME_INVALID", "a path with . or .. segments is not a registry path"
            ), "refused"
        if request.method not in ("GET", "HEAD"):
            response = _registry_error(405, "UNSUPPORTED", "the mirror serves pulls only (GET and HEAD)")
            response.headers["Allow"] = "GET, HEAD"
            return response, "refused"
        try:
            hints = dragonfly.parse_dragonfly_headers(request.headers)
            base = self._registry(request, hints)
        except ValueError as exc:
            return _registry_error(400, "UNSUPPORTED", str(exc)), "refused"
        digest = _blob_digest(request)
        # A blob's URL is spelled from the decoded path, so that its task is named (and checked) the same way however
        # the runtime escaped the digest.
        path = request.path if digest is not None else request.raw_path.split("?", 1)[0]
        query = [(key, value) for key, value in request.query.items() if key != "ns"]
        url = base + path + (f"?{urlencode(query)}" if query else "")
        from_network = dragonfly.from_network(request.remote)
        try:
            await self.policy.check(url, from_network=from_network)
        except SourceNotAllowed as exc:
            return _registry_error(403, "DENIED", str(exc)), "refused"
        except BackendError as exc:
            return _registry_error(502, "UNAVAILABLE", str(exc)), "refused"
        except UnsupportedURL as exc:
            return _registry_error(400, "UNSUPPORTED", str(exc)), "refused"
        if request.method == "GET" and (digest is not None or hints.use_p2p):
            download = self._download(request, url, hints, from_network, digest)
            if digest is not None:  # however the headers name its task, a blob is checked against its digest
                return await self._blob_get(request, base, download), "blob"
            if self.p2p is not None:
                return await self.p2p.respond(request, download), "p2p"
        if digest is not None and request.method == "HEAD":
            task_id = self._download(request, url, hints, from_network, digest).task_id()
            cached = await self._cached_blob_head(request, base, url, task_id)
            if cached is not None:
                return cached, "blob"
        return await self._pass(request, url), "registry"

    def _registry(self, request: web.Request, hints: dragonfly.DragonflyHeaders) -> str:
        """The registry's base URL: ``X-Dragonfly-Registry`` (a URL, or a host like ``ns``), else ``ns``, else the
        configured one, in upstream's order."""
        if hints.registry and hints.registry.startswith(("http://", "https://")):
            return hints.registry.rstrip("/")
        return upstream_base(hints.registry or request.query.get("ns"), self.default_registry, self.insecure_registries)

    def _download(
        self, request: web.Request, url: str, hints: dragonfly.DragonflyHeaders, from_network: bool, digest: str | None
    ) -> DownloadRequest:
        """The download as the headers shape it (upstream's filtered query keys dropped from the task id unless they
        say otherwise; the task named by the URL, or by the digest with ``enableTaskIDBasedBlobDigest``); a blob's
        bytes are checked against its ``digest``, and only the client's credentials go on to the registry."""
        authorization = request.headers.get("Authorization")
        download = dragonfly.download_request(
            url,
            request.headers,
            hints,
            filtered_query_params=(),
            blob_digest_ids=self.blobs_by_digest,
            disable_back_to_source=self.disable_back_to_source,
            prefetch=self.prefetch,
            from_network=from_network,
            remote_ip=request.remote,
        )
        return dataclasses.replace(
            download,
            digest=digest,
            request_header={"Authorization": authorization} if authorization else {},
        )

    async def _blob_get(self, request: web.Request, base: str, download: DownloadRequest) -> web.StreamResponse:
        """A blob: from the cache, or through the P2P network as it arrives, to clients the registry lets read it."""
        confirming = self._confirming(request, base, download.url)  # asked while the blob is looked up
        try:
            return await self._blob(request, download, download.task_id(), confirming)
        finally:
            _abandon(confirming)

    def _confirming(self, request: web.Request, base: str, url: str) -> asyncio.Task[int | None] | None:
        """Ask the registry whether this client may read the blob; None when there is no need to ask.

        The cache is shared by every client of the node, so a blob one client pulled with credentials must not
        reach another without them; a public registry, or a yes remembered for this credential, needs no question.
        """
        registry = urlsplit(base).netloc.lower()
        if registry in self.public_registries:
            return None
        match = _BLOB_PATH.fullmatch(request.path)
        assert match is not None, "only a blob request asks"
        key = self.access.key(registry, match.group("name"), request.headers.get("Authorization"))
        if self.access.allowed(key):
            return None
        return asyncio.create_task(self._ask(request, url, key))

    async def _ask(self, request: web.Request, url: str, key: tuple[str, str, str]) -> int | None:
        """HEAD the blob at the registry as the client: None (and remembered) when it may read it, else the status."""
        headers = _forwarded(request.headers)
        from_network = dragonfly.from_network(request.remote)
        async with self.client.request("HEAD", url, headers, from_network=from_network, follow_redirects=False) as got:
            status = got.status
        if status >= 400:
            return status
        self.access.remember(key)
        return None

    async def _denial(
        self, request: web.Request, url: str, confirming: asyncio.Task[int | None] | None
    ) -> web.StreamResponse | None:
        """None when the client may read the blob; else what the registry answers it (its 401 and challenge)."""
        if confirming is None:
            return None
        try:
            status = await confirming
        except SourceNotAllowed as exc:
            return _registry_error(403, "DENIED", str(exc))
        except (aiohttp.ClientError, TimeoutError, BackendError) as exc:
            log.warning("could not ask the registry whether %s may be read: %s", url, exc or type(exc).__name__)
            return _registry_error(
                502, "UNAVAILABLE", "the registry did not confirm that this client may read the blob"
            )
        if status is None:
            return None
        return await self._pass(request, url, refusals_only=True)

    async def _cached_blob_head(
        self, request: web.Request, base: str, url: str, task_id: str
    ) -> web.StreamResponse | None:
        task = await self.storage.get_task(task_id)
        if task is None or task.state is not TaskState.SUCCEEDED or task.content_length is None:
            return None
        if not _matched_digest(request, task):
            return None
        denial = await self._denial(request, url, self._confirming(request, base, url))
        return denial or web.Response(status=200, headers=self._blob_headers(request, task_id, task.content_length))

    @staticmethod
    def _blob_headers(request: web.Request, task_id: str, length: int) -> dict[str, str]:
        digest = _named_digest(request)
        return {
            dragonfly.TASK_ID: task_id,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Docker-Content-Digest": digest,
            "Etag": f'"{digest}"',
            "Accept-Ranges": "bytes",
        }

    @classmethod
    def _blob_response(
        cls, request: web.Request, task_id: str, length: int, span: tuple[int, int] | None
    ) -> web.StreamResponse:
        """The response for a blob, or for the inclusive ``span`` of it (206)."""
        if span is None:
            return web.StreamResponse(status=200, headers=cls._blob_headers(request, task_id, length))
        first, last = span
        headers = cls._blob_headers(request, task_id, last - first + 1)
        headers["Content-Range"] = f"bytes {first}-{last}/{length}"
        return web.StreamResponse(status=206, headers=headers)

    async def _pass(self, request: web.Request, url: str, *, refusals_only: bool = False) -> web.StreamResponse:
        """Send the request to the registry and its answer back, byte for byte.

        With ``refusals_only`` (a blob's refusal shown as the registry sent it) an answer that is not an error is
        not passed on: blob bytes reach the runtime only through the digest-checked P2P path.
        """
        from_network = dragonfly.from_network(request.remote)
        async with contextlib.AsyncExitStack() as stack:
            try:
                answer = await stack.enter_async_context(
                    self.client.request(  # GET or HEAD: no body
                        request.method,
                        url,
                        _forwarded(request.headers),
                        from_network=from_network,
                        follow_redirects=False,
                    )
                )
            except SourceNotAllowed as exc:
                return _registry_error(403, "DENIED", str(exc))
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("registry request %s %s failed: %s", request.method, url, exc or type(exc).__name__)
                return _registry_error(502, "UNAVAILABLE", f"the registry did not answer: {type(exc).__name__}")
            return await self._relay(request, answer, refusals_only)

    @staticmethod
    async def _relay(request: web.Request, answer: aiohttp.ClientResponse, refusals_only: bool) -> web.StreamResponse:
        """Send the registry's answer to the runtime as it arrives."""
        if refusals_only and answer.status < 400:
            return _registry_error(502, "UNAVAILABLE", f"the registry refused the blob, then answered {answer.status}")
        return await dragonfly.relay(request, answer)

    async def _blob(
        self,
        request: web.Request,
        download: DownloadRequest,
        task_id: str,
        confirming: asyncio.Task[int | None] | None,
    ) -> web.StreamResponse:
        url = download.url
        cached = await self._from_cache(request, url, task_id, confirming)
        if cached is not None:
            return cached
        with self.downloads.tap(task_id) as tap:  # taken before the download starts: no early byte is missed
            events = self.downloads.download(download)
            try:
                started = await anext(events)
            except Exception as exc:
                await events.aclose()
                return await self._refusal(request, url, task_id, exc)
            assert isinstance(started, Started)
            if started.task_id != task_id:  # the URL did not name the task: never serve other bytes under its digest
                await events.aclose()
                return _registry_error(400, "DIGEST_INVALID", f"the request does not name task {task_id} exactly")
            denial = await self._denial(request, url, confirming)  # the download may be another client's
            if denial is not None:
                await events.aclose()
                return denial
            return await self._stream(request, _Arrivals(events, tap), started)

    async def _from_cache(
        self, request: web.Request, url: str, task_id: str, confirming: asyncio.Task[int | None] | None
    ) -> web.StreamResponse | None:
        """Serve a blob the cache holds whole straight from its file; None when it does not (the download path then
        fetches, or fails, as it would for any task)."""
        async with self.storage.reading(task_id):  # from here on GC leaves the task alone
            task = await self.storage.get_task(task_id)
            if task is None or task.state is not TaskState.SUCCEEDED or task.content_length is None:
                return None
            if not _matched_digest(request, task):
                return None  # the download path checks the bytes before their last ones go out
            pieces = await self.storage.pieces(task_id)
            if sum(piece.length for piece in pieces) != task.content_length:
                return None  # a piece was dropped as corrupt: the download path decides what happens
            denial = await self._denial(request, url, confirming)
            if denial is not None:
                return denial
            length = task.content_length
            try:
                span = parse_range(request.headers.get("Range"), length)
            except UnsatisfiableRange:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{length}"})
            try:
                content, state = await asyncio.to_thread(open_content, self.storage.content.path(task_id))
            except OSError as exc:
                log.warning("cached blob %s cannot be opened: %s", task_id, exc)
                return None
            try:
                response = await self._send_file(request, content, state, task_id, pieces, span)
            finally:
                content.close()
        await self.storage.touch(task_id)
        return response

    async def _send_file(
        self,
        request: web.Request,
        content: BinaryIO,
        state: FileState,
        task_id: str,
        pieces: list[PieceRecord],
        span: tuple[int, int] | None,
    ) -> web.StreamResponse:
        """The blob's bytes (or ``span`` of them) from its content file, CRC-checked unless known intact as it is."""
        length = pieces[-1].offset + pieces[-1].length if pieces else 0
        first, last = span if span is not None else (0, length - 1)
        response = self._blob_response(request, task_id, length, span)
        try:
            await response.prepare(request)
            if self.intact.intact(task_id, state):
                await send_range(request, content, first, last + 1 - first)
            else:
                await self._send_checked(request, content, task_id, pieces, first, last + 1)
                if span is None:
                    self.intact.remember(task_id, state)
            await response.write_eof()
        except PieceCorrupt as exc:
            log.error("%s; the connection is cut", exc)
            if request.transport is not None:
                request.transport.abort()  # the status went out already: a failed, never a short, blob
        return response

    async def _send_checked(
        self, request: web.Request, content: BinaryIO, task_id: str, pieces: list[PieceRecord], first: int, end: int
    ) -> None:
        """Send bytes ``first`` to ``end`` by sendfile while their pieces' CRCs are checked; the last ``HELD_TAIL``
        bytes wait for the check, so rotten bytes never reach the client complete."""
        covered = [piece for piece in pieces if piece.offset < end and piece.offset + piece.length > first]
        checking = asyncio.create_task(asyncio.to_thread(rotten_pieces, Path(content.name), covered))
        held_from = max(first, end - HELD_TAIL)
        try:
            await send_range(request, content, first, held_from - first)
            rotten = await checking
        finally:
            checking.cancel()  # the thread runs to its end; its result is not wanted once the client left
        if rotten:
            with contextlib.suppress(PieceCorrupt):
                await self.storage.read_piece(task_id, rotten[0].number)  # drops the piece, logs it
            # A finished task keeps its state when a piece is dropped; discarded, the next request fetches it anew.
            await self.storage.fail_task(task_id, discard=True)
            raise PieceCorrupt(f"cached blob {task_id} failed its CRC check in piece {rotten[0].number}")
        await send_range(request, content, held_from, end - held_from)

    async def _refusal(self, request: web.Request, url: str, task_id: str, error: Exception) -> web.StreamResponse:
        """Answer a blob download that failed before its first byte."""
        if isinstance(error, BackendError) and error.status_code is not None and 400 <= error.status_code < 500:
            # The registry refused (401 challenge, 404, ...): let the runtime see its own answer, and only a refusal.
            return await self._pass(request, url, refusals_only=True)
        if isinstance(error, Busy | StorageFull):
            response = _registry_error(503, "TOOMANYREQUESTS", str(error))
            response.headers["Retry-After"] = "5"
            return response
        if isinstance(error, SourceNotAllowed):
            return _registry_error(403, "DENIED", str(error))
        if isinstance(error, InvalidDownload | UnsupportedURL):
            return _registry_error(400, "UNSUPPORTED", str(error))
        log.warning("blob %s through the P2P network failed: %s", task_id, error)
        return _registry_error(502, "UNAVAILABLE", f"blob {task_id} could not be fetched: {error}")

    async def _stream(self, request: web.Request, arrivals: _Arrivals, started: Started) -> web.StreamResponse:
        length = started.content_length
        try:
            span = parse_range(request.headers.get("Range"), length)
        except UnsatisfiableRange:
            await arrivals.events.aclose()
            return web.Response(status=416, headers={"Content-Range": f"bytes */{length}"})
        first, last = span if span is not None else (0, length - 1)
        response = self._blob_response(request, started.task_id, length, span)
        following = asyncio.create_task(arrivals.follow())
        try:
            await response.prepare(request)
            wanted = [p for p in started.pieces if p.offset <= last and p.offset + p.length > first]
            await self._send_in_order(request, response, arrivals, started.task_id, wanted, first, last + 1)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # The status is sent already: break the connection so the runtime sees a failed, not a short, blob.
            log.warning("streaming blob %s broke off: %s", started.task_id, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            following.cancel()
            with contextlib.suppress(BaseException):
                await following
        return response

    async def _send_in_order(
        self,
        request: web.Request,
        response: web.StreamResponse,
        arrivals: _Arrivals,
        task_id: str,
        wanted: list[PieceSpan],
        first: int,
        end: int,
    ) -> None:
        """Send bytes ``first`` to ``end`` in order: by sendfile as the registry's land in the content file, else as
        their pieces are stored.

        The last ``HELD_TAIL`` bytes are held back until the whole blob has matched its digest: a forged blob never
        reaches the client complete, whatever the client checks itself.
        """
        held_from = max(first, end - HELD_TAIL)
        position, index = first, 0
        content = await asyncio.to_thread(self.storage.content.path(task_id).open, "rb")
        try:
            while position < held_from:
                arrivals.written.wake.clear()
                while wanted[index].offset + wanted[index].length <= position:
                    index += 1
                written = arrivals.written.end_from(position)
                if written is not None:
                    stop = min(written, held_from)
                    await send_range(request, content, position, stop - position)
                    position = stop
                elif wanted[index].number in arrivals.arrived:
                    position = await write_stored_piece(
                        response, self.storage, task_id, wanted[index], position, held_from
                    )
                else:
                    arrivals.check()
                    await arrivals.written.wake.wait()
            await arrivals.finished()  # the rest of the download checks the whole blob against its digest
            await send_range(request, content, position, end - position)  # the file just matched the digest
        finally:
            content.close()
        await response.write_eof()
        with contextlib.suppress(OSError):  # the file just matched the blob's digest: intact as it is now
            self.intact.remember(task_id, await asyncio.to_thread(file_state, self.storage.content.path(task_id)))


def _abandon(task: asyncio.Task[int | None] | None) -> None:
    """Cancel a question no longer needed; its outcome is read, so a failure is not reported as unretrieved."""
    if task is not None:
        task.cancel()
        task.add_done_callback(lambda done: done.cancelled() or done.exception())


class _Arrivals:
    """Follows a blob's download for one response: which pieces are stored, and how the download ended.

    Runs as its own task, which alone iterates (and closes) the download's events; each event wakes the response.
    """

    def __init__(self, events: AsyncGenerator[Started | PieceDone, None], written: WrittenBytes) -> None:
        self.events = events
        self.written = written
        self.arrived: set[int] = set()
        self.done = asyncio.Event()
        self.error: Exception | None = None

    async def follow(self) -> None:
        try:
            async with contextlib.aclosing(self.events):
                async for event in self.events:
                    if isinstance(event, PieceDone):
                        self.arrived.add(event.piece.number)
                        self.written.wake.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()
            self.written.wake.set()

    def check(self) -> None:
        """Raise how the download failed, once it has; a download that ended has nothing more to wait for."""
        if self.done.is_set():
            raise self.error or RuntimeError("the blob's download ended without the bytes asked for")

    async def finished(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error


class MirrorServer:
    """The HTTP server around a :class:`RegistryMirror` and, when given, the forward proxy on the same port.

    Requests in absolute form (``GET http://host/path``) and CONNECT go to the forward proxy, the rest to the mirror,
    as upstream tells them apart.
    """

    def __init__(self, mirror: RegistryMirror, forward: ForwardProxy | None = None) -> None:
        self.mirror = mirror
        self.forward = forward
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.forward is not None and (request.method == "CONNECT" or request.message.url.absolute):
            return await self.forward.handle(request)
        return await self.mirror.handle(request)

    async def start(self, ip: str, port: int) -> int:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
        except OSError:
            sock.close()
            raise
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        if self.forward is None:
            await web.SockSite(self._runner, sock, shutdown_timeout=1.0).start()
        else:
            self._server = await self._front(sock)
        return int(sock.getsockname()[1])

    async def _front(self, sock: socket.socket) -> asyncio.Server:
        """Listen through the forward proxy's front, which keeps CONNECT and hands the rest to aiohttp."""
        from dfdaemon.proxy.forward import Front  # the forward proxy builds on this module

        assert self._runner is not None and self._runner.server is not None and self.forward is not None
        http, forward = self._runner.server, self.forward
        sock.listen(128)
        return await asyncio.get_running_loop().create_server(lambda: Front(http, forward), sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.forward is not None:
            await self.forward.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.mirror.close()
