"""Vortex between real daemons: pieces over TCP from the parent's content file, checked by the child's CRC.

The parent advertises its vortex port in SyncPieces; a child fetches over vortex unless its
``download.protocol`` is ``grpc``. The parent's ``dfdaemon_vortex_upload_pieces_total`` counter says which
path served the pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import ssl
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from dfdaemon.download.peering import ParentUnavailable
from dfdaemon.vortex.client import VortexClient
from dfdaemon.vortex.codec import HEADER_SIZE, DownloadPiece, Error, ErrorCode, PieceMetadata, Tag, decode_header
from tests import test_security
from tests.storage_support import received, seeded_bytes
from tests.support import (
    DaemonProcess,
    OriginProcess,
    dfget,
    merge,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_line,
)

MB = 1_000_000
SIZE = 200 * MB + 13
pytestmark = pytest.mark.slow
pki = test_security.pki


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("vortex-origin")
    with (root / "big.bin").open("wb") as f:
        for _ in range(SIZE // MB):
            f.write(seeded_bytes("test_vortex_process-1", MB))
        f.write(seeded_bytes("test_vortex_process-2", SIZE % MB))
    with running_origin(root) as running:
        yield running


def pair(
    stack: ExitStack,
    tmp_path: Path,
    child_extra: dict[str, object] | None = None,
    extra: dict[str, object] | None = None,
    scheduler_args: list[str] | None = None,
) -> tuple[DaemonProcess, DaemonProcess]:
    """A scheduler stub with a parent and a child daemon, both announced."""
    scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler", args=scheduler_args))
    base = merge(peer_config(scheduler), {"download": {"pieceTimeout": "60s"}, **(extra or {})})
    parent = stack.enter_context(running_daemon(tmp_path / "parent", base))
    child = stack.enter_context(running_daemon(tmp_path / "child", merge(base, child_extra or {})))
    for name in ("parent", "child"):
        wait_for_line(scheduler.log_path, rf"host \S+-{name} joined", scheduler.proc)
    return parent, child


def fetch(daemon: DaemonProcess, url: str, output: Path) -> dict[str, object]:
    result = dfget(daemon, url, output, "--json")
    assert result.returncode == 0, f"{result.stderr}\n{daemon.log()[-3000:]}"
    report: dict[str, object] = json.loads(result.stdout)
    return report


def counter(daemon: DaemonProcess, name: str, labels: str = "") -> float:
    """A counter from the daemon's /metrics (0 when it has not moved yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def vortex_served(daemon: DaemonProcess) -> float:
    return counter(daemon, "dfdaemon_vortex_upload_pieces_total", '{result="served"}')


def test_two_daemons_exchange_a_large_task_over_vortex(origin: OriginProcess, tmp_path: Path) -> None:
    with ExitStack() as stack:
        parent, child = pair(stack, tmp_path)
        assert parent.vortex_port and parent.vortex_port != parent.upload_port
        first = fetch(parent, origin.url("big.bin"), tmp_path / "first")
        served_before = origin.bytes_served("big.bin")
        second = fetch(child, origin.url("big.bin"), tmp_path / "second")
        pieces = second["pieces"]
        assert isinstance(pieces, dict)
        assert pieces["REMOTE_PEER"] == sum(first["pieces"].values()) > 40  # type: ignore[attr-defined]
        assert pieces["BACK_TO_SOURCE"] == 0
        assert origin.bytes_served("big.bin") == served_before
        assert vortex_served(parent) == pieces["REMOTE_PEER"]
    assert sha256(tmp_path / "second") == sha256(origin.root / "big.bin")


def test_a_child_set_to_grpc_fetches_with_download_piece(origin: OriginProcess, tmp_path: Path) -> None:
    with ExitStack() as stack:
        parent, child = pair(stack, tmp_path, {"download": {"protocol": "grpc"}})
        fetch(parent, origin.url("big.bin"), tmp_path / "first")
        report = fetch(child, origin.url("big.bin"), tmp_path / "second")
        remote = report["pieces"]["REMOTE_PEER"]  # type: ignore[index]
        assert remote > 40
        assert vortex_served(parent) == 0
        assert counter(parent, "dfdaemon_upload_pieces_total") == remote
    assert sha256(tmp_path / "second") == sha256(origin.root / "big.bin")


def raw_exchange(port: int, request: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Send ``request`` to a vortex port (over TLS with ``context``) and read until the parent closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        sock = context.wrap_socket(plain, server_hostname="127.0.0.1") if context else plain
        sock.sendall(request)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


def not_found(answer: bytes, task_id: str, number: int) -> bool:
    """Whether ``answer`` is exactly one Error packet with code 2 in upstream's words."""
    header = decode_header(answer[:HEADER_SIZE])
    expected = Error(ErrorCode.NOT_FOUND, f"piece {task_id}-{number} not found")
    return header.tag == Tag.ERROR and Error.decode(answer[HEADER_SIZE:]) == expected


def test_unknown_task_gets_error_not_found_and_garbage_a_closed_connection(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "d") as daemon:
        assert daemon.vortex_port is not None
        answer = raw_exchange(daemon.vortex_port, DownloadPiece("a" * 64, 7).encode())
        assert decode_header(answer[:HEADER_SIZE]).length == len(answer) - HEADER_SIZE
        assert not_found(answer, "a" * 64, 7)
        # A request the parent cannot parse: closed without an answer.
        assert raw_exchange(daemon.vortex_port, b"\x01\x00\x00\x00\x00\x44" + b"Z" * 68) == b""
        assert raw_exchange(daemon.vortex_port, b"\x01\x07\x00\x00\x00\x02xx") == b""
        assert counter(daemon, "dfdaemon_vortex_upload_pieces_total", '{result="not_found"}') == 1


def test_a_piece_corrupted_on_the_parent_is_refused_by_the_child_and_fetched_elsewhere(
    origin: OriginProcess, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        parent, child = pair(stack, tmp_path)
        task_id = str(fetch(parent, origin.url("big.bin"), tmp_path / "first")["task_id"])
        content = parent.storage_dir / "content" / "tasks" / task_id[:3] / task_id
        with content.open("r+b") as f:  # flip bytes inside piece 1 (4 MiB pieces) on the parent's disk
            f.seek(5 * 1024 * 1024)
            f.write(bytes(b ^ 0xFF for b in f.read(64)))
        served = origin.bytes_served("big.bin")
        report = fetch(child, origin.url("big.bin"), tmp_path / "second")
        assert report["pieces"]["BACK_TO_SOURCE"] == 1  # type: ignore[index]
        assert origin.bytes_served("big.bin") - served == 4 * 1024 * 1024
        assert "piece 1 has digest" in child.log()
    assert sha256(tmp_path / "second") == sha256(origin.root / "big.bin")


def test_vortex_is_mutual_tls_when_the_upload_server_is(
    origin: OriginProcess, tmp_path: Path, pki: test_security.Pki
) -> None:
    with ExitStack() as stack:
        parent, child = pair(
            stack, tmp_path, extra=test_security.tls_config(pki), scheduler_args=test_security.tls_scheduler_args(pki)
        )
        assert parent.vortex_port is not None
        request = DownloadPiece("a" * 64, 7).encode()
        # With this peer's certificate the port answers; in plain text it does not speak vortex at all.
        context = ssl.create_default_context(cafile=pki.ca)
        context.load_cert_chain(pki.client_cert, pki.client_key)
        assert not_found(raw_exchange(parent.vortex_port, request, context), "a" * 64, 7)
        plain = raw_exchange(parent.vortex_port, request)
        assert len(plain) < HEADER_SIZE or plain[1] != Tag.ERROR
        fetch(parent, origin.url("big.bin"), tmp_path / "first")
        report = fetch(child, origin.url("big.bin"), tmp_path / "second")
        assert vortex_served(parent) == report["pieces"]["REMOTE_PEER"] > 40  # type: ignore[index]
    assert sha256(tmp_path / "second") == sha256(origin.root / "big.bin")


async def serve_once(answer: bytes) -> tuple[asyncio.Server, int]:
    """A fake parent that reads one request, writes ``answer`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(74)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_parent_closing_mid_piece_is_a_parent_failure_and_the_client_goes_on() -> None:
    content = seeded_bytes("test_vortex_process-3", 1024 * 1024)
    metadata = PieceMetadata(
        number=3, offset=3 * len(content), length=len(content), digest=f"crc32:{zlib.crc32(content)}"
    )
    client = VortexClient(piece_timeout=30)
    broken, broken_port = await serve_once(metadata.encode() + content[: len(content) // 2])
    whole, whole_port = await serve_once(metadata.encode() + content)
    async with broken, whole:
        with pytest.raises(ParentUnavailable, match="closed"):
            await received(await client.download_piece("127.0.0.1", broken_port, "b" * 64, 3))
        fetched = await client.download_piece("127.0.0.1", whole_port, "b" * 64, 3)
        assert (fetched.number, fetched.offset, fetched.length) == (3, 3 * len(content), len(content))
        assert await received(fetched) == content
