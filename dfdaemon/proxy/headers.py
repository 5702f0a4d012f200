"""Upstream's ``X-Dragonfly-*`` request headers, read once for the registry mirror and the forward proxy alike.

The headers say how a request becomes a P2P task (tag, application, piece length, filtered query parameters, ...)
and the response says which task served it. Values are read as upstream reads them: booleans are ``true`` in any
case, a priority that is not a number falls back to 6; a piece length that does not parse, or is under 4 MiB, is
refused here with a clear 400 (upstream answers such a request with a 500).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from dfdaemon import ids
from dfdaemon.backend import header_text
from dfdaemon.download import DownloadRequest, Started
from dfdaemon.telemetry import metrics, tracing
from dfdaemon.units import parse_size

TAG = "X-Dragonfly-Tag"
APPLICATION = "X-Dragonfly-Application"
PRIORITY = "X-Dragonfly-Priority"
REGISTRY = "X-Dragonfly-Registry"
FILTERED_QUERY_PARAMS = "X-Dragonfly-Filtered-Query-Params"
USE_P2P = "X-Dragonfly-Use-P2P"
PREFETCH = "X-Dragonfly-Prefetch"
OUTPUT_PATH = "X-Dragonfly-Output-Path"
FORCE_HARD_LINK = "X-Dragonfly-Force-Hard-Link"
PIECE_LENGTH = "X-Dragonfly-Piece-Length"
CONTENT_FOR_CALCULATING_TASK_ID = "X-Dragonfly-Content-For-Calculating-Task-ID"
ENABLE_TASK_ID_BASED_BLOB_DIGEST = "X-Dragonfly-Enable-Task-ID-Based-Blob-Digest"
# Response headers.
TASK_ID = "X-Dragonfly-Task-ID"
SERVER_IP = "X-Dragonfly-Server-IP"
TASK_DOWNLOAD_FINISHED = "X-Dragonfly-Task-Download-Finished"
ERROR_TYPE = "X-Dragonfly-Error-Type"

# Upstream's default priority for proxied downloads (common.v2.Priority LEVEL6).
DEFAULT_PRIORITY = 6
# The smallest piece length a request may ask for by header (upstream's MIN_PIECE_LENGTH).
MIN_PIECE_LENGTH = 4 * 1024 * 1024

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus Host, which each hop sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# Headers the daemon sets itself on every origin request of a task, so a client's copy is not passed on.
_SET_BY_DAEMON = frozenset({"content-length", "range", "if-range", "accept-encoding"})
# Origin response headers that describe that one exchange, replaced by the proxy's own.
_EXCHANGE_HEADERS = HOP_BY_HOP | {"content-length", "content-range", "accept-ranges"}


class InvalidDragonflyHeader(ValueError):
    """An ``X-Dragonfly-*`` header with a value that cannot be used (400)."""


@dataclass(frozen=True)
class DragonflyHeaders:
    """The ``X-Dragonfly-*`` request headers of one request; None where a header is absent."""

    tag: str | None = None
    application: str | None = None
    priority: int = DEFAULT_PRIORITY
    registry: str | None = None
    filtered_query_params: tuple[str, ...] | None = None
    use_p2p: bool = False
    prefetch: bool | None = None
    output_path: str | None = None
    force_hard_link: bool = False
    piece_length: int | None = None
    content_for_calculating_task_id: str | None = None
    enable_task_id_based_blob_digest: bool | None = None


def _flag(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() == "true"


def _priority(value: str | None) -> int:
    try:
        return int(value) if value is not None else DEFAULT_PRIORITY
    except ValueError:
        return DEFAULT_PRIORITY


def _piece_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = parse_size(value.strip())
    except ValueError:
        raise InvalidDragonflyHeader(f"{PIECE_LENGTH}: {value[:50]!r} is not a size (e.g. 4mib, 1gib)") from None
    if length < MIN_PIECE_LENGTH:
        raise InvalidDragonflyHeader(f"{PIECE_LENGTH}: {value[:50]!r} is under the minimum of 4mib")
    return length


def parse_dragonfly_headers(headers: Mapping[str, str]) -> DragonflyHeaders:
    """Read the ``X-Dragonfly-*`` headers of a request (a case-insensitive mapping)."""
    filtered = headers.get(FILTERED_QUERY_PARAMS)
    return DragonflyHeaders(
        tag=headers.get(TAG),
        application=headers.get(APPLICATION),
        priority=_priority(headers.get(PRIORITY)),
        registry=headers.get(REGISTRY),
        filtered_query_params=None if filtered is None else tuple(key.strip() for key in filtered.split(",")),
        use_p2p=bool(_flag(headers.get(USE_P2P))),
        prefetch=_flag(headers.get(PREFETCH)),
        output_path=headers.get(OUTPUT_PATH),
        force_hard_link=bool(_flag(headers.get(FORCE_HARD_LINK))),
        piece_length=_piece_length(headers.get(PIECE_LENGTH)),
        content_for_calculating_task_id=headers.get(CONTENT_FOR_CALCULATING_TASK_ID),
        enable_task_id_based_blob_digest=_flag(headers.get(ENABLE_TASK_ID_BASED_BLOB_DIGEST)),
    )


def end_to_end(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The end-to-end headers: without hop-by-hop ones, including those the Connection header names.

    UTF-8 values pass as they came; bytes that are not UTF-8 go on as their Latin-1 reading, since aiohttp
    writes headers as UTF-8 and would otherwise drop them.
    """
    items = list(headers.items())
    named = {
        token.strip().lower() for name, value in items if name.lower() == "connection" for token in value.split(",")
    }
    return [(name, header_text(value)) for name, value in items if name.lower() not in HOP_BY_HOP | named]


def from_network(remote: str | None) -> bool:
    """Whether a client is not on this host (a unix socket is on it): the source policy keeps such clients from
    internal origins."""
    if remote is None:
        return True
    try:
        return not ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return not remote.startswith("/")


async def relay(request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """Send an origin's (or registry's) answer back as it arrives: status, end-to-end headers, body."""
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    for name, value in end_to_end(answer.headers):
        response.headers.add(name, value)
    await response.prepare(request)
    if request.method != "HEAD":
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
    await response.write_eof()
    return response


def origin_request_header(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    """The client's headers as every origin request of the task carries them (repeated names joined)."""
    joined: dict[str, str] = {}
    for name, value in end_to_end(headers):
        if name.lower() not in _SET_BY_DAEMON:
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


def wants_prefetch(headers: Mapping[str, str], hints: DragonflyHeaders, default: bool) -> bool:
    """Upstream's rule: only a ranged request prefetches; the header wins over ``proxy.prefetch``."""
    if "Range" not in headers:
        return False
    return default if hints.prefetch is None else hints.prefetch


def download_request(
    url: str,
    headers: CIMultiDictProxy[str],
    hints: DragonflyHeaders,
    *,
    filtered_query_params: tuple[str, ...],
    blob_digest_ids: bool,
    disable_back_to_source: bool,
    prefetch: bool,
    from_network: bool,
    remote_ip: str | None,
) -> DownloadRequest:
    """The download a proxied GET stands for: the rule's or mirror's defaults (``prefetch``: ``proxy.prefetch``),
    overridden by the headers."""
    return DownloadRequest(
        url=url,
        tag=hints.tag,
        application=hints.application,
        priority=hints.priority,
        filtered_query_params=ids.filtered_query_params_or_default(
            hints.filtered_query_params if hints.filtered_query_params is not None else filtered_query_params
        ),
        request_header=origin_request_header(headers),
        piece_length=hints.piece_length,
        output_path=hints.output_path,
        force_hard_link=hints.force_hard_link,
        content_for_calculating_task_id=hints.content_for_calculating_task_id,
        enable_task_id_based_blob_digest=(
            blob_digest_ids
            if hints.enable_task_id_based_blob_digest is None
            else hints.enable_task_id_based_blob_digest
        ),
        disable_back_to_source=disable_back_to_source,
        prefetch=wants_prefetch(headers, hints, prefetch),
        from_network=from_network,
        remote_ip=remote_ip,
    )


def response_headers(started: Started, server_ip: str, span: tuple[int, int] | None) -> dict[str, str]:
    """A P2P answer's headers: the origin's content headers, the length sent, and which task served it."""
    headers = {name: value for name, value in started.response_header.items() if name.lower() not in _EXCHANGE_HEADERS}
    first, last = span if span is not None else (0, started.content_length - 1)
    headers["Content-Length"] = str(max(0, last - first + 1))
    headers["Accept-Ranges"] = "bytes"
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{started.content_length}"
    if started.is_finished:
        headers[TASK_DOWNLOAD_FINISHED] = "true"
    headers[TASK_ID] = started.task_id
    headers[SERVER_IP] = server_ip
    return headers


Answer = Callable[[web.Request], Awaitable[tuple[web.StreamResponse, str]]]


async def answer_counted(request: web.Request, answer: Answer, log: logging.Logger, level: int) -> web.StreamResponse:
    """Answer ``request`` in a ``proxy.request`` span, counted by route and status.

    A client that left, or an answer from upstream that broke off after its status went out, cuts the connection
    so the client sees a failed transfer, never a short one.
    """
    route, status = "refused", "aborted"
    try:
        with tracing.span("proxy.request", method=request.method, path=request.path) as current:
            response, route = await answer(request)
            status = str(response.status)
            current.set_attribute("dragonfly.route", route)
            current.set_attribute("http.response.status_code", response.status)
        return response
    except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
        log.log(level, "%s %s broke off: %s", request.method, request.message.url, exc or type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)  # never sent: the connection is gone
    finally:
        metrics.PROXY_REQUESTS.labels(route, status).inc()
