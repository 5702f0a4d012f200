"""The back-to-source policy holds where it matters, when the connection is opened, and the client reuses its pool.

Two loopback servers stand in for an allowed origin (127.0.0.1) and an internal service the policy forbids
(127.0.0.2), both on one port so a host name can move between them; a resolver double plays the DNS server.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from dfdaemon.backend import Backend, BackendError, OriginClient, SourceNotAllowed, SourcePolicy, check_url
from dfdaemon.backend.policy import UnsupportedURL
from tests.storage_support import seeded_bytes

ALLOWED, FORBIDDEN = "127.0.0.1", "127.0.0.2"
BODY = seeded_bytes("test_origin_policy-1", 3 * 1024 * 1024 + 17)
ONLY_ALLOWED = SourcePolicy(allowed_networks=(f"{ALLOWED}/32",))


class ScriptedResolver(AbstractResolver):
    """Answers each name from a script: the next listed address per lookup, the last one for ever after."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = {name: list(answers) for name, answers in script.items()}
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        answers = self.script.get(host)
        if not answers:
            raise OSError(f"no such host {host}")
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0)]

    async def close(self) -> None:
        pass


@dataclass
class Server:
    """A loopback HTTP server that records every request and every connection it accepted."""

    address: str
    requests: list[str] = field(default_factory=list)
    connections: list[object] = field(default_factory=list)  # transports, kept so none is mistaken for another
    redirects: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if request.transport not in self.connections:
            self.connections.append(request.transport)
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        if request.path != "/file.bin":
            raise web.HTTPNotFound(headers={"X-Origin": "said no"})
        return _ranged(request)


def _ranged(request: web.Request) -> web.Response:
    """``BODY`` with single-range support, as an origin serves a file."""
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if request.http_range.start is None and request.http_range.stop is None:
        return web.Response(body=BODY, headers=headers)
    start, stop = request.http_range.start or 0, min(request.http_range.stop or len(BODY), len(BODY))
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(BODY)}"
    return web.Response(status=206, body=BODY[start:stop], headers=headers)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server, int]]:
    """An allowed and a forbidden server on one port."""
    for _ in range(20):
        forbidden_sock = _bound(FORBIDDEN, 0)
        port = forbidden_sock.getsockname()[1]
        try:
            allowed_sock = _bound(ALLOWED, port)
        except OSError:
            forbidden_sock.close()
            continue
        break
    else:
        pytest.fail("no port free on both loopback addresses")
    allowed, forbidden = Server(ALLOWED), Server(FORBIDDEN)
    runners = []
    for server, sock in ((allowed, allowed_sock), (forbidden, forbidden_sock)):
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", server.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
    yield allowed, forbidden, port
    for runner in runners:
        await runner.cleanup()


def _bound(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((ip, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _read_range(backend: Backend, url: str, start: int, length: int, *, from_network: bool = False) -> bytes:
    async with backend.open_range(url, {}, start, length, from_network=from_network) as body:
        return b"".join([chunk async for chunk in body])


# DNS rebinding


@pytest.mark.parametrize(
    ("policy", "from_network", "first_answer", "words"),
    [
        (ONLY_ALLOWED, False, ALLOWED, f"to {FORBIDDEN} (origin.test) is not allowed"),
        (SourcePolicy(), True, "93.184.216.34", "not a public address"),
    ],
    ids=["allowed-networks", "network-request"],
)
async def test_a_name_that_rebinds_to_a_forbidden_address_is_refused_when_connecting(
    servers: tuple[Server, Server, int], policy: SourcePolicy, from_network: bool, first_answer: str, words: str
) -> None:
    _, forbidden, port = servers
    resolver = ScriptedResolver({"origin.test": [first_answer, FORBIDDEN]})
    url = f"http://origin.test:{port}/file.bin"
    await policy.check(url, from_network=from_network, resolver=resolver)  # the name looks fine when checked
    backend = Backend(policy=policy, resolver=resolver)
    try:
        with pytest.raises(SourceNotAllowed, match=re.escape(words)):
            await backend.stat(url, {}, from_network=from_network)
        with pytest.raises(SourceNotAllowed, match=re.escape(words)):
            await _read_range(backend, url, 0, 10, from_network=from_network)
    finally:
        await backend.close()
    assert resolver.lookups.count("origin.test") >= 2  # the connection asked again, and got the forbidden answer
    assert forbidden.requests == []


async def test_the_allowed_origin_is_fetched_byte_exact(servers: tuple[Server, Server, int]) -> None:
    allowed, forbidden, port = servers
    resolver = ScriptedResolver({"origin.test": [ALLOWED]})
    url = f"http://origin.test:{port}/file.bin"
    await ONLY_ALLOWED.check(url, from_network=False, resolver=resolver)
    backend = Backend(policy=ONLY_ALLOWED, resolver=resolver)
    try:
        info = await backend.stat(url, {})
        half = info.content_length // 2
        data = await _read_range(backend, url, 0, half) + await _read_range(backend, url, half, len(BODY) - half)
    finally:
        await backend.close()
    assert info.content_length == len(BODY)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(BODY).hexdigest()
    assert forbidden.requests == [] and allowed.requests


# Redirects


@pytest.mark.parametrize(
    ("target", "policy", "words"),
    [
        (f"http://{FORBIDDEN}:{{port}}/file.bin", ONLY_ALLOWED, f"to {FORBIDDEN} ({FORBIDDEN}) is not allowed"),
        ("http://inside.test:{port}/file.bin", ONLY_ALLOWED, f"to {FORBIDDEN} (inside.test) is not allowed"),
        ("http://inside.test:{port}/file.bin", SourcePolicy(allowed_hosts=("origin.test",)), "from host 'inside.test'"),
    ],
    ids=["literal-address", "name-resolving-inside", "host-not-listed"],
)
async def test_a_redirect_to_a_forbidden_place_is_refused(
    servers: tuple[Server, Server, int], target: str, policy: SourcePolicy, words: str
) -> None:
    allowed, forbidden, port = servers
    allowed.redirects["/moved.bin"] = target.format(port=port)
    resolver = ScriptedResolver({"origin.test": [ALLOWED], "inside.test": [FORBIDDEN]})
    url = f"http://origin.test:{port}/moved.bin"
    await policy.check(url, from_network=False, resolver=resolver)
    backend = Backend(policy=policy, resolver=resolver)
    try:
        with pytest.raises(SourceNotAllowed, match=re.escape(words)):
            await backend.stat(url, {})
    finally:
        await backend.close()
    assert allowed.requests and forbidden.requests == []


async def test_a_redirect_the_policy_allows_is_followed(servers: tuple[Server, Server, int]) -> None:
    allowed, _, port = servers
    allowed.redirects["/moved.bin"] = "/file.bin"
    resolver = ScriptedResolver({"origin.test": [ALLOWED]})
    backend = Backend(policy=ONLY_ALLOWED, resolver=resolver)
    try:
        data = await _read_range(backend, f"http://origin.test:{port}/moved.bin", 5, 1000)
    finally:
        await backend.close()
    assert data == BODY[5:1005]
    assert allowed.requests == ["/moved.bin", "/file.bin"]


async def test_the_mirror_client_refuses_rebinding_and_leaves_redirects_to_its_caller(
    servers: tuple[Server, Server, int],
) -> None:
    allowed, forbidden, port = servers
    allowed.redirects["/v2/"] = "https://auth.invalid/token"
    resolver = ScriptedResolver({"registry.test": [ALLOWED, FORBIDDEN]})
    client = OriginClient(ONLY_ALLOWED, timeout=10, pass_through=True, resolver=resolver)
    try:
        async with client.request(
            "GET", f"http://registry.test:{port}/v2/", [], from_network=False, follow_redirects=False
        ) as response:
            assert (response.status, response.headers["Location"]) == (302, "https://auth.invalid/token")
        await client.close()  # a fresh pool: the next request must connect, and resolve, again
        with pytest.raises(SourceNotAllowed):
            async with client.request(
                "GET", f"http://registry.test:{port}/v2/", [], from_network=False, follow_redirects=False
            ):
                pass
    finally:
        await client.close()
    assert allowed.requests == ["/v2/"] and forbidden.requests == []


# The pool


async def test_ranged_gets_read_to_the_end_share_one_connection(servers: tuple[Server, Server, int]) -> None:
    allowed, _, port = servers
    backend = Backend()
    piece = 256 * 1024
    try:
        pieces = [await _read_range(backend, f"http://{ALLOWED}:{port}/file.bin", n * piece, piece) for n in range(8)]
    finally:
        await backend.close()
    assert b"".join(pieces) == BODY[: 8 * piece]
    assert len(allowed.requests) == 8
    assert len(allowed.connections) == 1


async def test_an_abandoned_range_does_not_poison_the_pool(servers: tuple[Server, Server, int]) -> None:
    allowed, _, port = servers
    url = f"http://{ALLOWED}:{port}/file.bin"
    backend = Backend()
    try:
        async with backend.open_range(url, {}, 0, len(BODY)) as body:
            first = await anext(aiter(body))  # then walk away with most of the body unread
        after = await _read_range(backend, url, 1000, 5000)
        again = await _read_range(backend, url, 7000, 5000)
    finally:
        await backend.close()
    assert first == BODY[: len(first)] and len(first) < len(BODY)
    assert (after, again) == (BODY[1000:6000], BODY[7000:12000])
    assert len(allowed.connections) == 2  # the abandoned connection was closed, the next one reused


async def test_an_origin_refusal_keeps_its_status_and_headers(servers: tuple[Server, Server, int]) -> None:
    allowed, _, port = servers
    backend = Backend()
    try:
        with pytest.raises(BackendError) as caught:
            await backend.stat(f"http://{ALLOWED}:{port}/missing.bin", {})
    finally:
        await backend.close()
    assert caught.value.status_code == 404
    assert caught.value.headers["x-origin"] == "said no"
    assert str(caught.value).startswith("origin answered 404 Not Found for ")
    assert allowed.requests == ["/missing.bin", "/missing.bin"]  # a HEAD, then the ranged GET; no retries


# URLs the client can fetch


@pytest.mark.parametrize(
    "url",
    [
        "http://host.invalid:99999/",
        "http://host.invalid:-1/",
        "http://[::1]:99999/",
        "http://a\\b.invalid/file",
        "http://xn--a/",
        "ftp://files.invalid/file",
        "http:///no/host",
        "http://origin.invalid/a b",
        "http://origin.invalid/a\u202eb",  # a right-to-left override
        "http://origin\u3000.invalid/",  # an ideographic space
        "http://%ff/",
        "http://a{b.invalid/",
    ],
)
def test_urls_the_client_cannot_fetch_are_refused_up_front(url: str) -> None:
    with pytest.raises(UnsupportedURL):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://origin.invalid/file.bin", "https://[::1]:8443/x?y=1", "http://Ünï.example/f", "http://h:/path"],
)
def test_urls_the_client_can_fetch_pass(url: str) -> None:
    check_url(url)
