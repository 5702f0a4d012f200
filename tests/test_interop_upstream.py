"""Our daemon as seen by a client built from upstream's own bindings (PyPI ``dragonfly-api``).

``tests/upstream_client.py`` runs in a subprocess of its own (upstream's generated modules and ours
cannot share a protobuf pool) and prints what it decoded as JSON. The assertions here check that
an upstream tool gets what PROTOCOL.md promises: the DownloadTask stream, StatLocalTask over both
services, ListLocalTasks, SyncPieces as a Rust child sees it, and the status codes of bad requests.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.storage_support import seeded_bytes
from tests.support import REPO_ROOT, DaemonProcess, OriginProcess, cluster, running_daemon, running_origin

pytestmark = pytest.mark.slow

MB = 1_000_000
MIB = 1024 * 1024
PIECE_LENGTH = 4 * MIB
BIG_SIZE = 9 * MB + 123  # three pieces of 4 MiB, the last one short
CLIENT = "tests/upstream_client.py"  # run from the repository root
UNKNOWN_TASK_ID = "0" * 64
BAD_TASK_IDS = ["not-a-task-id", "A" * 64, "0" * 63]

Json = dict[str, Any]


def run_client(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CLIENT, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout
    )


def upstream(*args: str) -> Json:
    """Run the upstream client and return its JSON document; fail on any error."""
    result = run_client(*args)
    assert result.returncode == 0, f"upstream client {args} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    document: Json = json.loads(result.stdout)
    return document


def upstream_error(*args: str) -> Json:
    """Run the upstream client expecting a gRPC error; return ``{"code": ..., "details": ...}``."""
    result = run_client(*args)
    assert result.returncode == 3, f"expected a gRPC error from {args}, got {result.returncode}:\n{result.stdout}"
    error: Json = json.loads(result.stdout)["error"]
    return error


def download(daemon: DaemonProcess, url: str, output: Path, *extra: str) -> Json:
    return upstream("download", "--socket", str(daemon.socket_path), "--url", url, "--output", str(output), *extra)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_pieces_cover(pieces: list[Json], data: bytes) -> None:
    """The pieces are 0..n-1, contiguous over [0, len(data)), each with the CRC-32 of its bytes."""
    ordered = sorted(pieces, key=lambda p: int(p["number"]))
    assert [p["number"] for p in ordered] == list(range(len(ordered)))
    offset = 0
    for piece in ordered:
        assert piece["offset"] == offset, piece
        assert 0 < piece["length"] <= PIECE_LENGTH, piece
        chunk = data[offset : offset + piece["length"]]
        assert piece["digest"] == f"crc32:{zlib.crc32(chunk)}", piece
        offset += piece["length"]
    assert offset == len(data)


def spans(pieces: list[Json]) -> list[tuple[int, int, int]]:
    return sorted((int(p["number"]), int(p["offset"]), int(p["length"])) for p in pieces)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("origin") / "files"
    root.mkdir()
    (root / "big.bin").write_bytes(seeded_bytes("test_interop_upstream-1", BIG_SIZE))
    (root / "shared.bin").write_bytes(seeded_bytes("test_interop_upstream-2", BIG_SIZE))
    (root / "small.txt").write_bytes(b"upstream interop\n" * 100)
    (root / "empty.bin").write_bytes(b"")
    with running_origin(root) as running:
        yield running


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("interop-daemon")) as running:
        yield running


@pytest.fixture(scope="module")
def first_download(
    daemon: DaemonProcess, origin: OriginProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Json, Path]:
    """big.bin fetched once through the daemon by the upstream client: back to source."""
    output = tmp_path_factory.mktemp("first") / "big.bin"
    return download(daemon, origin.url("big.bin"), output), output


def test_download_task_back_to_source(
    first_download: tuple[Json, Path], daemon: DaemonProcess, origin: OriginProcess
) -> None:
    report, output = first_download
    data = (origin.root / "big.bin").read_bytes()
    assert sha256(output.read_bytes()) == sha256(data)

    # Exactly one started response, first, announcing every piece the stream then delivers.
    assert report["started_count"] == 1
    assert report["kinds"][0] == "download_task_started_response"
    assert report["kinds"][1:] == ["download_piece_finished_response"] * 3
    started = report["started"]
    assert started["content_length"] == BIG_SIZE
    assert started["piece_count"] == 3
    assert started["is_finished"] is False
    assert started["range"] is None
    assert spans(started["pieces"]) == spans(report["pieces"])

    pieces = report["pieces"]
    assert_pieces_cover(pieces, data)
    assert [p["length"] for p in sorted(pieces, key=lambda p: int(p["number"]))] == [
        PIECE_LENGTH,
        PIECE_LENGTH,
        BIG_SIZE - 2 * PIECE_LENGTH,
    ]
    for piece in pieces:
        assert piece["traffic_type"] == "BACK_TO_SOURCE", piece
        assert piece["parent_id"] is None
        assert piece["has_content"] is False
        assert piece["has_cost"] and piece["has_created_at"], piece

    # Identifiers as upstream forms them.
    assert len(report["task_ids"]) == 1
    assert len(report["task_id"]) == 64 and int(report["task_id"], 16) >= 0
    assert report["host_ids"] == [f"127.0.0.1-{daemon.storage_dir.parent.name}"]
    assert report["peer_id"].startswith(f"{report['host_id']}-")
    assert origin.bytes_served("big.bin") >= BIG_SIZE


def test_second_download_is_local_with_piece_content(
    first_download: tuple[Json, Path], daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path
) -> None:
    first, _ = first_download
    served = origin.bytes_served("big.bin")
    data = (origin.root / "big.bin").read_bytes()
    report = download(daemon, origin.url("big.bin"), tmp_path / "again.bin", "--need-piece-content")
    assert sha256((tmp_path / "again.bin").read_bytes()) == sha256(data)
    assert origin.bytes_served("big.bin") == served  # a local hit does not touch the origin

    assert report["task_id"] == first["task_id"]
    assert report["peer_id"] != first["peer_id"]  # a new peer for every DownloadTask
    assert report["started"]["is_finished"] is True
    assert report["started"]["content_length"] == BIG_SIZE
    pieces = report["pieces"]
    assert_pieces_cover(pieces, data)
    for piece in pieces:
        assert piece["traffic_type"] == "LOCAL_PEER", piece
        assert piece["has_content"] is True
        assert piece["content_length"] == piece["length"]
        assert piece["digest"] == f"crc32:{piece['content_crc32']}"


def test_every_download_response_names_the_peer(first_download: tuple[Json, Path]) -> None:
    report, _ = first_download
    assert report["peer_id"]
    assert report["peer_ids"] == [report["peer_id"]], report["peer_ids"]


def test_small_file_with_content(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    data = (origin.root / "small.txt").read_bytes()
    report = download(daemon, origin.url("small.txt"), tmp_path / "small.txt", "--need-piece-content")
    assert (tmp_path / "small.txt").read_bytes() == data
    assert report["started"]["content_length"] == len(data)
    assert len(report["pieces"]) == 1
    piece = report["pieces"][0]
    assert piece["traffic_type"] == "BACK_TO_SOURCE"
    assert (piece["offset"], piece["length"]) == (0, len(data))
    assert piece["content_crc32"] == zlib.crc32(data)
    assert piece["digest"] == f"crc32:{zlib.crc32(data)}"


def test_empty_file_ends_after_started(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    report = download(daemon, origin.url("empty.bin"), tmp_path / "empty.bin")
    assert report["kinds"] == ["download_task_started_response"]
    assert report["started"]["content_length"] == 0
    assert report["started"]["piece_count"] == 0
    assert report["pieces"] == []
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_stat_local_task_over_socket_and_tcp_agree(first_download: tuple[Json, Path], daemon: DaemonProcess) -> None:
    task_id = first_download[0]["task_id"]
    over_socket = upstream("stat", "--socket", str(daemon.socket_path), "--task-id", task_id)
    over_tcp = upstream("stat-task-upload", "--address", daemon.upload_address, "--task-id", task_id)
    assert over_socket == over_tcp
    assert over_socket["task_id"] == task_id
    assert over_socket["content_length"] == BIG_SIZE
    assert over_socket["piece_length"] == PIECE_LENGTH
    assert over_socket["has_finished_at"] is True
    assert over_socket["has_failed_at"] is False
    assert over_socket["has_created_at"] and over_socket["has_updated_at"]
    assert over_socket["uploading_count"] == 0


def test_list_local_tasks_lists_the_task(first_download: tuple[Json, Path], daemon: DaemonProcess) -> None:
    task_id = first_download[0]["task_id"]
    listed = upstream("list", "--socket", str(daemon.socket_path))["tasks"]
    matching = [task for task in listed if task["task_id"] == task_id]
    assert len(matching) == 1
    stat = upstream("stat", "--socket", str(daemon.socket_path), "--task-id", task_id)
    assert matching[0] == stat


def test_sync_pieces_over_tcp(first_download: tuple[Json, Path], daemon: DaemonProcess) -> None:
    report, _ = first_download
    task_id = report["task_id"]
    synced = upstream("sync", "--address", daemon.upload_address, "--task-id", task_id)["pieces"]
    assert spans(synced) == spans(report["pieces"])
    for piece in synced:
        assert piece["ip"] == "127.0.0.1", piece
        # The vortex port, which a Rust child >= 1.2.2 needs to fetch the bytes at all (PROTOCOL.md); no QUIC.
        assert piece["tcp_port"] == daemon.vortex_port and piece["has_quic_port"] is False, piece

    one = upstream("sync", "--address", daemon.upload_address, "--task-id", task_id, "--interested", "2")["pieces"]
    assert spans(one) == [s for s in spans(report["pieces"]) if s[0] == 2]


@pytest.mark.parametrize("task_id", BAD_TASK_IDS)
def test_a_malformed_task_id_is_invalid_argument(daemon: DaemonProcess, task_id: str) -> None:
    socket = str(daemon.socket_path)
    for args in (
        ("stat", "--socket", socket, "--task-id", task_id),
        ("stat-task-upload", "--address", daemon.upload_address, "--task-id", task_id),
        ("sync", "--address", daemon.upload_address, "--task-id", task_id),
    ):
        assert upstream_error(*args)["code"] == "INVALID_ARGUMENT", args


def test_an_unknown_task_is_not_found(daemon: DaemonProcess) -> None:
    socket = str(daemon.socket_path)
    for args in (
        ("stat", "--socket", socket, "--task-id", UNKNOWN_TASK_ID),
        ("stat-task-upload", "--address", daemon.upload_address, "--task-id", UNKNOWN_TASK_ID),
        ("sync", "--address", daemon.upload_address, "--task-id", UNKNOWN_TASK_ID),
    ):
        assert upstream_error(*args)["code"] == "NOT_FOUND", args


def test_a_malformed_url_is_invalid_argument(daemon: DaemonProcess, tmp_path: Path) -> None:
    error = upstream_error(
        "download", "--socket", str(daemon.socket_path), "--url", "not a url", "--output", str(tmp_path / "x")
    )
    assert error["code"] == "INVALID_ARGUMENT"
    assert not (tmp_path / "x").exists()


# Two peers and the scheduler stub: the upstream client downloads through the second peer.


def test_upstream_client_gets_remote_peer_pieces(origin: OriginProcess, tmp_path: Path) -> None:
    data = (origin.root / "shared.bin").read_bytes()
    with cluster(tmp_path, 2) as (_, (parent, child)):
        first = download(parent, origin.url("shared.bin"), tmp_path / "parent.bin")
        assert {p["traffic_type"] for p in first["pieces"]} == {"BACK_TO_SOURCE"}
        served = origin.bytes_served("shared.bin")

        second = download(child, origin.url("shared.bin"), tmp_path / "child.bin", "--need-piece-content")
        assert sha256((tmp_path / "child.bin").read_bytes()) == sha256(data)
        # Every piece came from the parent; the origin saw at most the child's one-byte length probe.
        assert origin.bytes_served("shared.bin") <= served + 1

        assert second["task_id"] == first["task_id"]
        assert second["host_id"] != first["host_id"]
        assert second["started"]["is_finished"] is False
        pieces = second["pieces"]
        assert_pieces_cover(pieces, data)
        for piece in pieces:
            assert piece["traffic_type"] == "REMOTE_PEER", piece
            assert piece["parent_id"] == first["peer_id"], piece
            assert piece["content_crc32"] is not None
            assert piece["digest"] == f"crc32:{piece['content_crc32']}"

        # The child now serves the task to upstream children too.
        synced = upstream("sync", "--address", child.upload_address, "--task-id", second["task_id"])["pieces"]
        assert spans(synced) == spans(pieces)
        assert all(p["ip"] == "127.0.0.1" and p["tcp_port"] == child.vortex_port for p in synced)


def test_the_client_imports_only_upstream_bindings() -> None:
    """The client must stay free of our generated modules: they would clash in protobuf's default pool."""
    tree = ast.parse((REPO_ROOT / CLIENT).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None, "no relative imports"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"grpc", "dragonfly_api"}
