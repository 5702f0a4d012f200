"""``proxy.server.basicAuth`` on a daemon process: proxied requests and CONNECT need the credentials (407 with a
challenge without them), given as ``Proxy-Authorization`` or, as upstream reads them, ``Authorization``; registry
mirror requests do not."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from dfdaemon.proxy.auth import ProxyCredentials
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin
from tests.test_forward_proxy import _Echo, serving

CONFIG = {
    "proxy": {
        "enable": True,
        "rules": [{"regex": r"/p2p/"}],
        "server": {"basicAuth": {"username": "puller", "password": "s3cret:pass"}},
    }
}


@dataclass
class Guarded:
    origin: OriginProcess
    daemon: DaemonProcess

    @property
    def port(self) -> int:
        assert self.daemon.proxy_port is not None
        return self.daemon.proxy_port


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    work = tmp_path_factory.mktemp("proxy-auth")
    root = work / "origin"
    (root / "p2p").mkdir(parents=True)
    (root / "p2p" / "file.bin").write_bytes(b"through the p2p network\n")
    (root / "plain.txt").write_bytes(b"passed to the origin\n")
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(root))
        daemon = stack.enter_context(running_daemon(work / "daemon", CONFIG))
        yield Guarded(origin, daemon)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(proxy: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection to the proxy; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_proxied_gets_without_or_with_wrong_credentials_get_407_with_a_challenge(guarded: Guarded) -> None:
    proxy = f"http://127.0.0.1:{guarded.port}"
    before = guarded.origin.stats()["requests"]
    for url in (guarded.origin.url("p2p/file.bin"), guarded.origin.url("plain.txt")):
        status, headers, body = get(proxy, url)
        assert status == 407 and headers["Proxy-Authenticate"].startswith("Basic realm=")
        assert b"needs credentials" in body
        status, _, body = get(proxy, url, {"Proxy-Authorization": basic("puller", "wrong")})
        assert (status, b"not valid" in body) == (407, True)
    assert guarded.origin.stats()["requests"] == before  # nothing reached the origin


@pytest.mark.parametrize("header", ["Proxy-Authorization", "Authorization"])
def test_the_right_credentials_pass_both_ways(guarded: Guarded, header: str) -> None:
    proxy = f"http://127.0.0.1:{guarded.port}"
    credentials = {header: basic("puller", "s3cret:pass")}  # a colon in the password is the password's
    status, headers, body = get(proxy, guarded.origin.url("p2p/file.bin"), credentials)
    assert (status, body) == (200, b"through the p2p network\n") and "X-Dragonfly-Task-ID" in headers
    assert get(proxy, guarded.origin.url("plain.txt"), credentials)[:3:2] == (200, b"passed to the origin\n")


def test_credentials_in_the_proxy_url_as_http_proxy_gives_them(guarded: Guarded) -> None:
    status, _, body = get(f"http://puller:s3cret%3Apass@127.0.0.1:{guarded.port}", guarded.origin.url("plain.txt"))
    assert (status, body) == (200, b"passed to the origin\n")


def test_connect_needs_the_credentials_too(guarded: Guarded) -> None:
    target = guarded.origin.address
    refused = exchange(guarded.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = refused.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 407") and b"proxy-authenticate: basic realm=" in head
    tunnel = (
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {basic('puller', 's3cret:pass')}\r\n\r\n"
        f"GET /plain.txt HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    answer = exchange(guarded.port, tunnel.encode())
    assert answer.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.")
    assert answer.endswith(b"passed to the origin\n")


def test_registry_mirror_requests_need_no_proxy_credentials(guarded: Guarded) -> None:
    """(An origin-form request is the mirror's: this one is refused by the mirror itself, not the proxy.)"""
    answer = exchange(guarded.port, b"GET /healthy HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404") and b"this is a registry mirror" in answer


def test_credentials_given_in_authorization_go_no_further_but_the_origins_own_do(guarded: Guarded) -> None:
    proxy = f"http://127.0.0.1:{guarded.port}"
    with serving(_Echo) as port:
        url = f"http://127.0.0.1:{port}/echo"
        status, _, body = get(proxy, url, {"Authorization": basic("puller", "s3cret:pass")})
        assert status == 201 and "Authorization" not in json.loads(body)["headers"]
        origin_credentials = {"Proxy-Authorization": basic("puller", "s3cret:pass"), "Authorization": "Bearer origin"}
        status, _, body = get(proxy, url, origin_credentials)
        assert status == 201 and json.loads(body)["headers"]["Authorization"] == "Bearer origin"


def test_every_request_on_a_kept_alive_connection_is_checked(guarded: Guarded) -> None:
    """A second request needs the credentials as the first did; a CONNECT that is not a connection's first is
    never tunnelled."""
    target = guarded.origin.address
    credentials = f"Proxy-Authorization: {basic('puller', 's3cret:pass')}\r\n"
    first = f"GET http://{target}/plain.txt HTTP/1.1\r\nHost: {target}\r\n{credentials}\r\n"
    second = f"GET http://{target}/plain.txt HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    answer = exchange(guarded.port, (first + second).encode())
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 407") == 1
    connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    answer = exchange(guarded.port, (first + connect).encode())
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection Established" not in answer


def test_connect_with_wrong_credentials_is_407(guarded: Guarded) -> None:
    target = guarded.origin.address
    wrong = f"Proxy-Authorization: {basic('puller', 'guess')}\r\n"
    answer = exchange(guarded.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{wrong}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 407") and b"not valid" in answer


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, False),
        ({"proxy-authorization": basic("puller", "pw")}, True),
        ({"authorization": basic("puller", "pw")}, True),
        ({"proxy-authorization": "basic " + basic("puller", "pw").split()[1]}, True),  # the scheme is any case
        ({"proxy-authorization": basic("puller", "pw2")}, False),
        ({"proxy-authorization": basic("pulle", "pw")}, False),
        ({"proxy-authorization": "Basic cHVsbGVycHc="}, False),  # "pullerpw": no colon
        ({"proxy-authorization": "Basic not base64!"}, False),
        ({"proxy-authorization": "Bearer abc"}, False),
        ({"proxy-authorization": basic("x", "y"), "authorization": basic("puller", "pw")}, True),
    ],
)
def test_which_headers_carry_the_credentials(headers: dict[str, str], allowed: bool) -> None:
    assert (ProxyCredentials("puller", "pw").carrier(headers) is not None) is allowed
