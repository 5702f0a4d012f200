"""The HTTP forward proxy on ``proxy.server``, beside the registry mirror, as upstream serves both on one port.

A client with ``HTTP_PROXY`` pointing here sends ``GET http://host/path`` (absolute form). A GET whose URL, without
query, matches a ``proxy.rules`` regex (the first that does), or that carries ``X-Dragonfly-Use-P2P: true``, becomes
a P2P task streamed back; every other request is forwarded as it came (method, end-to-end headers, body) and the
origin's answer returned as is. ``CONNECT host:port`` is tunnelled untouched: a small front reads the first request
line of each connection, keeps CONNECT for itself and hands every other connection to the aiohttp server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from dfdaemon.backend import BackendError, PolicyResolver, SourceNotAllowed, SourcePolicy, UnsupportedURL
from dfdaemon.config import ProxyConfig
from dfdaemon.download import DownloadManager
from dfdaemon.ids import DEFAULT_FILTERED_QUERY_PARAMS
from dfdaemon.proxy import headers as dragonfly
from dfdaemon.proxy.auth import CHALLENGE, ProxyCredentials, refusal
from dfdaemon.proxy.p2p import P2PResponder, error_response
from dfdaemon.storage import Storage

log = logging.getLogger("dfdaemon.proxy")

# The longest CONNECT request head the front reads before giving up on it.
_MAX_HEAD = 16 * 1024
_TUNNEL_CHUNK = 256 * 1024
# Seconds a new connection has to send its first request head.
_FIRST_REQUEST_TIMEOUT = 60.0
_CONNECT_LINE = re.compile(rb"CONNECT ([^\s]+) HTTP/1\.[01]\r?\n")
_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Rule:
    """One ``proxy.rules`` entry: which URLs go through the P2P network, and how their task is named."""

    regex: re.Pattern[str]
    use_tls: bool = False
    redirect: str | None = None
    filtered_query_params: tuple[str, ...] = DEFAULT_FILTERED_QUERY_PARAMS


# What X-Dragonfly-Use-P2P uses when no rule matched (upstream's default rule).
_DEFAULT_RULE = Rule(re.compile(".*"))


def matching_rule(rules: list[Rule], url: URL) -> Rule | None:
    """The first rule whose regex is found in the URL without its query and fragment."""
    bare = str(url.with_query(None).with_fragment(None))
    return next((rule for rule in rules if rule.regex.search(bare)), None)


def download_url(url: URL, rule: Rule) -> str:
    """The URL the task fetches: https when the rule says ``useTLS``, another host[:port] when it redirects."""
    if rule.use_tls:
        url = url.with_scheme("https")
    if rule.redirect:
        url = URL.build(
            scheme=url.scheme,
            authority=rule.redirect,
            path=url.raw_path,
            query_string=url.raw_query_string,
            encoded=True,
        )
    return str(url)


class ForwardProxy:
    """Answers absolute-form proxy requests: through the P2P network by rule, else passed to the origin."""

    def __init__(
        self,
        p2p: P2PResponder,
        policy: SourcePolicy,
        *,
        rules: list[Rule],
        prefetch: bool = False,
        disable_back_to_source: bool = False,
        blob_digest_ids: bool = False,
        credentials: ProxyCredentials | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.p2p = p2p
        self.credentials = credentials
        self.policy = policy
        self.rules = rules
        self.prefetch = prefetch
        self.disable_back_to_source = disable_back_to_source
        self.blob_digest_ids = blob_digest_ids
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout)
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._resolvers: dict[bool, PolicyResolver] = {}
        self._tunnels: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tunnels):
            task.cancel()
        for task in list(self._tunnels):
            with contextlib.suppress(BaseException):
                await task
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
        resolvers, self._resolvers = list(self._resolvers.values()), {}
        for resolver in resolvers:
            await resolver.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One absolute-form request (a client leaving mid-answer is routine for a proxy: logged at info)."""
        return await dragonfly.answer_counted(request, self._answer, log, logging.INFO)

    async def _answer(self, request: web.Request) -> tuple[web.StreamResponse, str]:
        """The response, and which way it went: "p2p" (a rule or the Use-P2P header, GET only), "forward" (passed
        to the origin) or "refused"."""
        if self.credentials is not None:
            fields = {name.lower(): value for name, value in request.headers.items()}
            carrier = self.credentials.carrier(fields)
            if carrier is None:
                return error_response("proxy", 407, refusal(fields), {"Proxy-Authenticate": CHALLENGE}), "refused"
            if carrier == "authorization":  # the proxy's credentials: neither the origin nor a peer gets them
                kept = CIMultiDict((name, value) for name, value in request.headers.items() if name.lower() != carrier)
                request = request.clone(headers=kept)
        if request.method == "CONNECT":  # the front tunnels a CONNECT only as a connection's first request
            return error_response("proxy", 400, "CONNECT must be the first request on its connection"), "refused"
        url = request.url
        try:
            hints = dragonfly.parse_dragonfly_headers(request.headers)
        except dragonfly.InvalidDragonflyHeader as exc:
            return error_response("proxy", 400, str(exc)), "refused"
        rule = matching_rule(self.rules, url) or (_DEFAULT_RULE if hints.use_p2p else None)
        if rule is not None and request.method == "GET":
            return await self._p2p(request, url, rule, hints), "p2p"
        return await self._pass(request, str(url)), "forward"

    async def _p2p(
        self, request: web.Request, url: URL, rule: Rule, hints: dragonfly.DragonflyHeaders
    ) -> web.StreamResponse:
        try:
            target = download_url(url, rule)
        except ValueError as exc:
            return error_response("proxy", 400, f"the rule's redirect makes no URL: {exc}")
        download = dragonfly.download_request(
            target,
            request.headers,
            hints,
            filtered_query_params=rule.filtered_query_params,
            blob_digest_ids=self.blob_digest_ids,
            disable_back_to_source=self.disable_back_to_source,
            prefetch=self.prefetch,
            from_network=dragonfly.from_network(request.remote),
            remote_ip=request.remote,
        )
        return await self.p2p.respond(request, download)

    def _resolver(self, from_network: bool) -> PolicyResolver:
        """Resolves names for one kind of client, refusing any address the source policy forbids it."""
        resolver = self._resolvers.get(from_network)
        if resolver is None:
            resolver = self._resolvers[from_network] = PolicyResolver(self.policy, from_network=from_network)
        return resolver

    def _session(self, from_network: bool) -> aiohttp.ClientSession:
        """One pool per kind of client; every address connected to is checked against the source policy."""
        session = self._sessions.get(from_network)
        if session is None or session.closed:
            session = self._sessions[from_network] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, use_dns_cache=False, resolver=self._resolver(from_network)),
                timeout=self._timeout,
                auto_decompress=False,  # bytes pass as the origin sent them
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # clients share nothing
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return session

    async def _pass(self, request: web.Request, url: str) -> web.StreamResponse:
        """Forward the request unchanged and stream the origin's answer back, status and headers included."""
        from_network = dragonfly.from_network(request.remote)
        try:
            await self.policy.check(url, from_network=from_network)
        except SourceNotAllowed as exc:
            return error_response("proxy", 403, str(exc))
        except (BackendError, UnsupportedURL) as exc:
            return error_response("proxy", 400 if isinstance(exc, UnsupportedURL) else 502, str(exc))
        body = request.content if request.body_exists else None
        try:
            async with self._session(from_network).request(
                request.method,
                URL(url, encoded=True),
                headers=dragonfly.end_to_end(request.headers),
                data=body,
                allow_redirects=False,
            ) as answer:
                return await dragonfly.relay(request, answer)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("proxy request %s %s failed: %s", request.method, url, exc or type(exc).__name__)
            return error_response("backend", 502, f"the origin did not answer: {exc or type(exc).__name__}")

    def start_tunnel(self, head: bytes, client: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._tunnel(head, client, writer))
        self._tunnels.add(task)
        task.add_done_callback(self._tunnels.discard)

    async def _tunnel(self, head: bytes, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        """CONNECT host:port: after a 200, bytes pass both ways untouched until both sides are done."""
        peer = to_client.get_extra_info("peername")
        from_network = dragonfly.from_network(peer[0] if isinstance(peer, tuple) else None)
        fields = _head_headers(head)
        if self.credentials is not None and self.credentials.carrier(fields) is None:
            await _refuse(
                to_client, 407, "Proxy Authentication Required", refusal(fields), {"Proxy-Authenticate": CHALLENGE}
            )
            return
        try:
            host, port = _connect_target(head)
            await self.policy.check(f"https://{host}:{port}/", from_network=from_network)
            addresses = await self._resolver(from_network).resolve(host, port, socket.AF_UNSPEC)
            async with asyncio.timeout(10.0):
                origin, to_origin = await asyncio.open_connection(addresses[0]["host"], port)
        except ValueError as exc:
            await _refuse(to_client, 400, "Bad Request", str(exc))
            return
        except SourceNotAllowed as exc:
            await _refuse(to_client, 403, "Forbidden", str(exc))
            return
        except (BackendError, OSError, TimeoutError) as exc:
            await _refuse(to_client, 502, "Bad Gateway", f"cannot reach the target: {exc or type(exc).__name__}")
            return
        try:
            to_client.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(client, to_origin))
                group.create_task(_pipe(origin, to_client))
        except* (ConnectionError, OSError):
            pass  # one side went away: the other is closed below
        finally:
            for writer in (to_origin, to_client):
                writer.close()


def _connect_target(head: bytes) -> tuple[str, int]:
    """The host and port a CONNECT request head names."""
    line = _CONNECT_LINE.match(head)
    target = _AUTHORITY.fullmatch(line.group(1).decode("ascii", "replace")) if line else None
    if target is None or not 0 < int(target.group("port")) < 65536:
        raise ValueError("CONNECT needs host:port (e.g. CONNECT example.com:443 HTTP/1.1)")
    return target.group("host").strip("[]"), int(target.group("port"))


def _head_headers(head: bytes) -> dict[str, str]:
    """The header fields of a request head, names in lower case (the last of a repeated name)."""
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\n")[1:]:
        if not line.strip():
            break
        name, colon, value = line.partition(":")
        if colon:
            fields[name.strip().lower()] = value.strip()
    return fields


async def _refuse(
    writer: asyncio.StreamWriter, status: int, reason: str, message: str, extra: dict[str, str] | None = None
) -> None:
    """Answer a CONNECT that cannot be tunnelled, and close."""
    body = (message + "\n").encode()
    fields = "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
    head = (
        f"HTTP/1.1 {status} {reason}\r\n{dragonfly.ERROR_TYPE}: proxy\r\n{fields}Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(head.encode() + body)
        await writer.drain()
    writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until the source ends, then pass the end on (a half close), so the other direction may finish."""
    while chunk := await source.read(_TUNNEL_CHUNK):
        sink.write(chunk)
        await sink.drain()
    if sink.can_write_eof():
        sink.write_eof()


class Front(asyncio.Protocol):
    """The first bytes of a proxy connection: a CONNECT is tunnelled here, anything else goes to aiohttp."""

    def __init__(self, http: Callable[[], asyncio.Protocol], proxy: ForwardProxy) -> None:
        self._http = http
        self._proxy = proxy
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # A connection that never says what it is would otherwise be held open for good.
        self._idle = asyncio.get_running_loop().call_later(_FIRST_REQUEST_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._head += data
        if not b"CONNECT ".startswith(self._head[:8]):
            self._hand_over()
        elif b"\r\n\r\n" in self._head or b"\n\n" in self._head:
            self._tunnel()
        elif len(self._head) > _MAX_HEAD:
            self._transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n")
            self._transport.close()

    def _hand_over(self) -> None:
        """Give the connection, and what was read of it, to the aiohttp server."""
        assert self._transport is not None and self._idle is not None
        self._idle.cancel()
        protocol = self._http()
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        protocol.data_received(self._head)

    def _tunnel(self) -> None:
        assert self._transport is not None and self._idle is not None
        self._idle.cancel()
        transport, head = self._transport, self._head
        reader = asyncio.StreamReader(limit=_TUNNEL_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, asyncio.get_running_loop())
        end = head.find(b"\r\n\r\n")
        rest = head[end + 4 :] if end >= 0 else head[head.find(b"\n\n") + 2 :]
        if rest:
            reader.feed_data(rest)
        self._proxy.start_tunnel(head, reader, writer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None


def forward_proxy(config: ProxyConfig, storage: Storage, downloads: DownloadManager) -> ForwardProxy:
    """The forward proxy ``proxy`` configures, streaming P2P tasks as this host (``X-Dragonfly-Server-IP``)."""
    rules = [
        Rule(re.compile(rule.regex), rule.use_tls, rule.redirect, tuple(rule.filtered_query_params))
        for rule in config.rules
    ]
    auth = config.server.basic_auth
    return ForwardProxy(
        P2PResponder(storage, downloads, server_ip=downloads.host_ip),
        downloads.source_policy,
        rules=rules,
        prefetch=config.prefetch,
        disable_back_to_source=config.disable_back_to_source,
        blob_digest_ids=config.registry_mirror.enable_task_id_based_blob_digest,
        credentials=ProxyCredentials(auth.username, auth.password) if auth is not None and auth.enabled else None,
    )
