"""The forward proxy on ``proxy.server``, driven by curl and urllib as real clients, daemons as their own processes.

A rule-matching GET goes through the P2P network (two daemons, one origin fetch); anything else is forwarded as it
came; CONNECT reaches a loopback TLS server untouched, trusted by its own test CA.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from dfdaemon import ids
from dfdaemon.proxy.forward import Rule, download_url, matching_rule
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, peer_config, running_daemon, running_origin, running_scheduler

MB = 1_000_000
# Over 4 MiB, so the download asks the scheduler (smaller ones go straight to the origin).
P2P_SIZE = 9 * MB + 123
PROXY_CONFIG = {"proxy": {"enable": True, "rules": [{"regex": r"/p2p/"}]}}
CURL = shutil.which("curl")


@dataclass
class Proxies:
    origin: OriginProcess
    daemons: list[DaemonProcess]

    def proxy(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.daemons[index].proxy_port}"


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxies]:
    work = tmp_path_factory.mktemp("forward")
    root = work / "origin"
    (root / "p2p").mkdir(parents=True)
    (root / "direct").mkdir()
    (root / "p2p" / "shared.bin").write_bytes(seeded_bytes("forward-shared", P2P_SIZE))
    (root / "direct" / "plain.txt").write_bytes(b"not a task\n")
    (root / "p2p" / "counted.bin").write_bytes(seeded_bytes("forward-counted", 1000))  # each test its own file
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(root))
        scheduler = stack.enter_context(running_scheduler(work / "scheduler"))
        daemons = [
            stack.enter_context(running_daemon(work / f"peer{i}", {**peer_config(scheduler), **PROXY_CONFIG}))
            for i in range(2)
        ]
        yield Proxies(origin, daemons)


def through(proxy: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` with urllib through ``proxy``: status, headers, body (an HTTP error is an answer too)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None, "curl is installed by scripts/setup.sh"
    return subprocess.run([CURL, "-sS", "--max-time", "60", *args], capture_output=True, timeout=90)


def test_a_rule_sends_a_get_through_the_p2p_network_so_two_daemons_fetch_the_origin_once(
    proxies: Proxies, tmp_path: Path
) -> None:
    url = proxies.origin.url("p2p/shared.bin")
    expected = hashlib.sha256((proxies.origin.root / "p2p" / "shared.bin").read_bytes()).hexdigest()

    first = curl("-x", proxies.proxy(0), "-o", str(tmp_path / "first"), "-D", str(tmp_path / "head"), url)
    assert first.returncode == 0, first.stderr
    assert hashlib.sha256((tmp_path / "first").read_bytes()).hexdigest() == expected
    head = (tmp_path / "head").read_text().lower()
    assert f"x-dragonfly-task-id: {ids.task_id(url, filtered_query_params=ids.DEFAULT_FILTERED_QUERY_PARAMS)}" in head

    status, headers, body = through(proxies.proxy(1), url)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == expected
    assert headers["X-Dragonfly-Server-IP"] == "127.0.0.1"
    # The second daemon took the pieces from the first: the origin sent the file once.
    assert proxies.origin.bytes_served("p2p/shared.bin") == P2P_SIZE


def test_an_origin_refusal_on_the_p2p_path_keeps_its_status_and_says_backend(proxies: Proxies) -> None:
    status, headers, _ = through(proxies.proxy(), proxies.origin.url("p2p/absent.bin"))
    assert status == 404
    assert headers["X-Dragonfly-Error-Type"] == "backend"


def test_a_url_no_rule_matches_is_passed_through_unchanged(proxies: Proxies) -> None:
    url = proxies.origin.url("direct/plain.txt")
    status, headers, body = through(proxies.proxy(), url)
    assert (status, body) == (200, b"not a task\n")
    assert "X-Dragonfly-Task-ID" not in headers
    missing = through(proxies.proxy(), proxies.origin.url("direct/absent"))
    assert missing[0] == 404  # the origin's own answer


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers every request with what it received, as JSON, with a status and header of its own."""

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        seen = {"method": self.command, "path": self.path, "body": body, "headers": dict(self.headers.items())}
        data = json.dumps(seen).encode()
        self.send_response(201)
        self.send_header("X-Echo", "yes")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _echo

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler], context: ssl.SSLContext | None = None) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_other_methods_pass_with_their_body_and_headers_and_the_origins_status(proxies: Proxies) -> None:
    with serving(_Echo) as port:
        url = f"http://127.0.0.1:{port}/p2p/upload?x=1"  # matches the rule, but only a GET goes through P2P
        out = curl("-x", proxies.proxy(), "-i", "-X", "POST", "-H", "X-Custom: kept", "--data-binary", "payload", url)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201")
    assert b"x-echo: yes" in head.lower()
    seen = json.loads(body)
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/p2p/upload?x=1", "payload")
    assert seen["headers"]["X-Custom"] == "kept"
    assert "Proxy-Connection" not in seen["headers"]  # hop-by-hop headers stay with the proxy


def _test_ca(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A CA and a localhost certificate it signed: the server's context, and the CA file a client trusts."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forward proxy test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_file


def test_connect_tunnels_tls_to_a_loopback_server_untouched(proxies: Proxies, tmp_path: Path) -> None:
    server_context, ca_file = _test_ca(tmp_path)
    with serving(_Echo, server_context) as port:
        url = f"https://localhost:{port}/secret?q=1"
        client = ssl.create_default_context(cafile=str(ca_file))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": proxies.proxy()}), urllib.request.HTTPSHandler(context=client)
        )
        with opener.open(urllib.request.Request(url, data=b"over tls", method="PUT"), timeout=30) as response:
            assert response.status == 201
            seen = json.loads(response.read())
        assert (seen["method"], seen["path"], seen["body"]) == ("PUT", "/secret?q=1", "over tls")

        out = curl("-x", proxies.proxy(), "--cacert", str(ca_file), url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["method"] == "GET"


def test_connect_to_a_port_nothing_listens_on_is_a_502_from_the_proxy(proxies: Proxies) -> None:
    with serving(_Echo) as port:
        pass  # the port is free again
    out = curl("-x", proxies.proxy(), "-o", "/dev/null", "-w", "%{http_connect}", f"https://localhost:{port}/")
    assert out.returncode != 0
    assert out.stdout == b"502"


def test_the_first_rule_found_in_the_url_without_query_wins() -> None:
    first, second = Rule(re.compile(r"/models/")), Rule(re.compile(r"\.bin$"), use_tls=True)
    rules = [first, second]
    assert matching_rule(rules, URL("http://h/models/a.bin?sig=x")) is first
    assert matching_rule(rules, URL("http://h/data/a.bin?sig=x")) is second  # "$" holds without the query
    assert matching_rule(rules, URL("http://h/data/a.txt?x=.bin")) is None


def test_use_tls_and_redirect_change_where_the_task_fetches_from() -> None:
    url = URL("http://example.com/a%20b/file.bin?x=1")
    assert download_url(url, Rule(re.compile(""), use_tls=True)) == "https://example.com/a%20b/file.bin?x=1"
    redirected = Rule(re.compile(""), redirect="mirror.internal:8080")
    assert download_url(url, redirected) == "http://mirror.internal:8080/a%20b/file.bin?x=1"


def test_forward_requests_are_counted_by_route(proxies: Proxies) -> None:
    assert through(proxies.proxy(), proxies.origin.url("direct/plain.txt"))[0] == 200
    assert through(proxies.proxy(), proxies.origin.url("p2p/counted.bin"), {"Range": "bytes=0-9"})[0] == 206
    port = proxies.daemons[0].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert re.search(r'dfdaemon_proxy_requests_total\{route="forward",status="200"\} [1-9]', text)
    assert re.search(r'dfdaemon_proxy_requests_total\{route="p2p",status="206"\} [1-9]', text)


def test_a_connect_without_a_port_is_refused_with_a_clear_400(proxies: Proxies) -> None:
    with socket.create_connection(("127.0.0.1", proxies.daemons[0].proxy_port or 0), timeout=10) as conn:
        conn.sendall(b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"x-dragonfly-error-type: proxy" in head.lower()
    assert b"host:port" in body
