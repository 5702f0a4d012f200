"""Back to source through a forward proxy named by the environment, with the source policy still on the origin.

A small forward proxy on loopback logs every request it carries; the origin counts the bytes it served.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from dfdaemon.backend import OriginClient, SourceNotAllowed, SourcePolicy
from tests.storage_support import seeded_bytes
from tests.support import OriginProcess, dfget, running_daemon, running_origin, serving

SIZE = 5 * 1024 * 1024 + 3
# Hop-by-hop headers a proxy does not pass on, and headers aiohttp sets itself.
_NOT_FORWARDED = {"connection", "proxy-connection", "proxy-authorization", "keep-alive", "host", "transfer-encoding"}


@dataclass
class ForwardProxy:
    """An HTTP forward proxy: requests in absolute form are fetched from their origin and passed back."""

    address: str = ""
    log: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.log.append(f"{request.method} {request.url}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(request.method, request.url, headers=headers, allow_redirects=False) as upstream,
        ):
            answer = web.StreamResponse(status=upstream.status)
            answer.headers.update({k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_FORWARDED})
            await answer.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await answer.write(chunk)
            await answer.write_eof()
            return answer


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    forward = ForwardProxy()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward.handle)
    async with serving(app) as port:
        forward.address = f"127.0.0.1:{port}"
        yield forward


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    (root / "blob.bin").write_bytes(seeded_bytes("test_origin_proxy-1", SIZE))
    with running_origin(root) as running:
        yield running


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_dfget_goes_back_to_source_through_the_environments_proxy(
    origin: OriginProcess, proxy: ForwardProxy, tmp_path: Path
) -> None:
    env = {"http_proxy": f"http://{proxy.address}", "no_proxy": "", "HTTP_PROXY": "", "NO_PROXY": ""}
    output = tmp_path / "out.bin"
    with running_daemon(tmp_path / "node", env=env) as daemon:
        done = await asyncio.to_thread(dfget, daemon, origin.url("blob.bin"), output, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert sha256(output) == sha256(origin.root / "blob.bin")
    assert origin.bytes_served("blob.bin") == SIZE
    assert proxy.log, "the daemon reached the origin without its proxy"
    assert all(line.endswith(f"{origin.url('blob.bin')}") for line in proxy.log), proxy.log


async def fetch(client: OriginClient, url: str, *, from_network: bool = False) -> bytes:
    try:
        async with client.request("GET", url, [], from_network=from_network, follow_redirects=True) as response:
            return await response.read()
    finally:
        await client.close()


async def test_no_proxy_hosts_are_reached_directly(origin: OriginProcess, proxy: ForwardProxy) -> None:
    proxies = {"http": f"http://{proxy.address}", "no": "example.com, 127.0.0.0/8"}
    body = await fetch(OriginClient(None, timeout=10, proxies=proxies), origin.url("blob.bin"))
    assert body == (origin.root / "blob.bin").read_bytes()
    assert proxy.log == []


@pytest.mark.parametrize(
    "proxies",
    [{"http": "PROXY"}, {"all": "PROXY"}, {"http": "PROXY", "no": "localhost,.example.com"}],
)
async def test_the_proxy_carries_what_no_proxy_does_not_cover(
    origin: OriginProcess, proxy: ForwardProxy, proxies: dict[str, str]
) -> None:
    proxies = {scheme: value.replace("PROXY", proxy.address) for scheme, value in proxies.items()}
    body = await fetch(OriginClient(None, timeout=10, proxies=proxies), origin.url("blob.bin"))
    assert body == (origin.root / "blob.bin").read_bytes()
    assert proxy.log == [f"GET {origin.url('blob.bin')}"]


async def test_the_policy_checks_the_origin_not_the_proxy(origin: OriginProcess, proxy: ForwardProxy) -> None:
    """The proxy's loopback address is not held against the request; the origin's address is."""
    proxies = {"http": f"http://{proxy.address}"}
    allowed = SourcePolicy(allowed_networks=(f"{origin.address.rsplit(':', 1)[0]}/32",))
    body = await fetch(OriginClient(allowed, timeout=10, proxies=proxies), origin.url("blob.bin"))
    assert len(body) == SIZE
    served = origin.bytes_served("blob.bin")

    elsewhere = SourcePolicy(allowed_networks=("10.0.0.0/8",))
    with pytest.raises(SourceNotAllowed, match=r"back to source to 127\.0\.0\.1 .* not allowed"):
        await fetch(OriginClient(elsewhere, timeout=10, proxies=proxies), origin.url("blob.bin"))
    assert len(proxy.log) == 1, "a refused request reached the proxy"
    assert origin.bytes_served("blob.bin") == served


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("http://127.0.0.1:9/blob", r"127\.0\.0\.1 .* not a public address"),  # a literal internal address
        ("http://localhost:9/blob", r"(127\.0\.0\.1|::1) \(localhost\) .* not a public address"),  # resolves to one
    ],
)
async def test_network_requests_through_the_proxy_never_reach_internal_origins(
    proxy: ForwardProxy, url: str, refusal: str
) -> None:
    client = OriginClient(SourcePolicy(), timeout=10, proxies={"http": f"http://{proxy.address}"})
    with pytest.raises(SourceNotAllowed, match=refusal):
        await fetch(client, url, from_network=True)
    assert proxy.log == []


async def test_an_allowlist_names_the_origins_host(proxy: ForwardProxy) -> None:
    client = OriginClient(
        SourcePolicy(allowed_hosts=(".example.com",)), timeout=10, proxies={"http": f"http://{proxy.address}"}
    )
    with pytest.raises(SourceNotAllowed, match=r"host '127\.0\.0\.1' is not allowed"):
        await fetch(client, "http://127.0.0.1:9/blob")
    assert proxy.log == []
