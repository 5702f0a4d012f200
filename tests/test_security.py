"""Who may do what: the socket's mode and group, what the network may ask, back-to-source limits, mutual TLS."""

from __future__ import annotations

import datetime
import grp
import ipaddress
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.storage_support import seeded_bytes
from tests.support import (
    REPO_ROOT,
    DaemonProcess,
    OriginProcess,
    daemon_config,
    dfget,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_line,
)

MB = 1_000_000


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("origin") / "files"
    root.mkdir()
    (root / "file.bin").write_bytes(seeded_bytes("test_security-1", 9 * MB))
    with running_origin(root) as running:
        yield running


def upload_stub(daemon: DaemonProcess) -> dfdaemon_pb2_grpc.DfdaemonUploadStub:
    return dfdaemon_pb2_grpc.DfdaemonUploadStub(grpc.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS))


def download_stub(daemon: DaemonProcess) -> dfdaemon_pb2_grpc.DfdaemonDownloadStub:
    channel = grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS)
    return dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)


# The socket


def test_socket_is_not_world_writable_by_default(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        mode = stat.S_IMODE(os.stat(daemon.socket_path).st_mode)
    assert mode == 0o660


def test_socket_mode_and_group_are_configurable(tmp_path: Path) -> None:
    config = {"download": {"server": {"socketMode": "0600", "socketGroup": "daemon"}}}
    with running_daemon(tmp_path, config) as daemon:
        info = os.stat(daemon.socket_path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_gid == grp.getgrnam("daemon").gr_gid


def test_unknown_socket_group_is_a_clear_startup_error(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    config = daemon_config(tmp_path, {"download": {"server": {"socketGroup": "no-such-group-here"}}})
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, "-m", "dfdaemon.cli.daemon", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert (
        out.stderr.strip().splitlines()[-1]
        == "dfdaemon: download.server.socketGroup: no group named 'no-such-group-here'"
    )


# What the network may ask


def test_delete_task_from_the_network_is_off_unless_enabled(tmp_path: Path, origin: OriginProcess) -> None:
    with running_daemon(tmp_path / "off") as daemon:
        assert dfget(daemon, origin.url("file.bin"), tmp_path / "a").returncode == 0
        task_id = (
            download_stub(daemon).ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=10).tasks[0].task_id
        )
        with pytest.raises(grpc.RpcError) as refused:
            upload_stub(daemon).DeleteTask(dfdaemon_pb2.DeleteTaskRequest(task_id=task_id), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "enableDeleteTask" in (refused.value.details() or "")
        assert download_stub(daemon).StatLocalTask(dfdaemon_pb2.StatLocalTaskRequest(task_id=task_id), timeout=10)
    with running_daemon(tmp_path / "on", {"upload": {"server": {"enableDeleteTask": True}}}) as daemon:
        assert dfget(daemon, origin.url("file.bin"), tmp_path / "b").returncode == 0
        task_id = (
            download_stub(daemon).ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=10).tasks[0].task_id
        )
        upload_stub(daemon).DeleteTask(dfdaemon_pb2.DeleteTaskRequest(task_id=task_id), timeout=10)
        assert download_stub(daemon).ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=10).tasks == []


def network_download(
    daemon: DaemonProcess, **fields: object
) -> grpc.RpcError | list[dfdaemon_pb2.DownloadTaskResponse]:
    request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(**fields))  # type: ignore[arg-type]
    try:
        return list(upload_stub(daemon).DownloadTask(request, timeout=30))
    except grpc.RpcError as error:
        return error


def test_network_download_may_not_write_files_or_reach_internal_origins(tmp_path: Path, origin: OriginProcess) -> None:
    served = origin.bytes_served("file.bin")
    with running_daemon(tmp_path / "d") as daemon:
        wrote = network_download(daemon, url=origin.url("file.bin"), output_path=str(tmp_path / "x"))
        assert isinstance(wrote, grpc.RpcError) and wrote.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not (tmp_path / "x").exists()
        internal = network_download(daemon, url=origin.url("file.bin"))
        assert isinstance(internal, grpc.RpcError) and internal.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not a public address" in (internal.details() or "")
        metadata = network_download(daemon, url="http://169.254.169.254/latest/meta-data/")
        assert isinstance(metadata, grpc.RpcError) and metadata.code() == grpc.StatusCode.PERMISSION_DENIED
        assert origin.bytes_served("file.bin") == served
    allowed = {"download": {"backToSource": {"allowedNetworks": ["127.0.0.0/8"]}}}
    with running_daemon(tmp_path / "seed", allowed) as daemon:
        responses = network_download(daemon, url=origin.url("file.bin"))
        assert isinstance(responses, list) and len(responses) == 1 + 3


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ({"allowedSchemes": ["https"]}, "over 'http' is not allowed"),
        ({"allowedHosts": [".example.com"]}, "from host '127.0.0.1' is not allowed"),
        ({"allowedNetworks": ["10.0.0.0/8"]}, "to 127.0.0.1"),
    ],
)
def test_back_to_source_limits_apply_to_local_requests_too(
    tmp_path: Path, origin: OriginProcess, policy: dict[str, object], words: str
) -> None:
    with running_daemon(tmp_path, {"download": {"backToSource": policy}}) as daemon:
        out = dfget(daemon, origin.url("file.bin"), tmp_path / "out")
    assert out.returncode == 1
    assert "PERMISSION_DENIED" in out.stderr and words in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_redirect_must_lead_somewhere_the_policy_allows(tmp_path: Path, origin: OriginProcess) -> None:
    port = origin.address.rsplit(":", 1)[1]
    origin.fault("moved.bin", redirect=origin.url("file.bin"))  # to 127.0.0.1
    moved = f"http://localhost:{port}/moved.bin"
    only_localhost = {"download": {"backToSource": {"allowedHosts": ["localhost"]}}}
    with running_daemon(tmp_path / "strict", only_localhost) as daemon:
        out = dfget(daemon, moved, tmp_path / "strict.bin")
    assert out.returncode == 1
    assert "PERMISSION_DENIED" in out.stderr and "from host '127.0.0.1' is not allowed" in out.stderr
    both = {"download": {"backToSource": {"allowedHosts": ["localhost", "127.0.0.1"]}}}
    with running_daemon(tmp_path / "both", both) as daemon:
        out = dfget(daemon, moved, tmp_path / "both.bin")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "both.bin").read_bytes() == (origin.root / "file.bin").read_bytes()


# Mutual TLS


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a client certificate, and a rogue CA's client certificate, made for the test."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test-ca", ca_key, "test-ca", ca_key, ca=True)
    paths: dict[str, Path] = {"ca": root / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, issuer, issuer_key in (
        ("server", "test-ca", ca_key),
        ("client", "test-ca", ca_key),
        ("rogue", "rogue-ca", rogue_ca_key),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"peer-{name}", key, issuer, issuer_key, ca=False)
        paths[f"{name}_cert"] = root / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = _write_key(key, root / f"{name}.key")
    return Pki(**paths)


def tls_config(pki: Pki) -> dict[str, object]:
    return {
        "upload": {
            "server": {"caCert": str(pki.ca), "cert": str(pki.server_cert), "key": str(pki.server_key)},
            "client": {"caCert": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)},
        }
    }


def tls_stat(daemon: DaemonProcess, pki: Pki, cert: Path | None, key: Path | None) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(daemon.upload_address, credentials) as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        try:
            stub.StatLocalTask(dfdaemon_pb2.StatLocalTaskRequest(task_id="a" * 64), timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_mutual_tls_refuses_peers_without_a_valid_certificate(tmp_path: Path, pki: Pki) -> None:
    with running_daemon(tmp_path, tls_config(pki)) as daemon:
        # A valid client certificate reaches the servicer (which answers NOT_FOUND for an unknown task).
        assert tls_stat(daemon, pki, pki.client_cert, pki.client_key) == grpc.StatusCode.NOT_FOUND
        assert tls_stat(daemon, pki, None, None) == grpc.StatusCode.UNAVAILABLE
        assert tls_stat(daemon, pki, pki.rogue_cert, pki.rogue_key) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as plaintext:
            upload_stub(daemon).StatLocalTask(dfdaemon_pb2.StatLocalTaskRequest(task_id="a" * 64), timeout=10)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def tls_scheduler_args(pki: Pki) -> list[str]:
    return ["--ca-cert", str(pki.ca), "--cert", str(pki.server_cert), "--key", str(pki.server_key)]


def test_peers_and_scheduler_talk_over_mutual_tls(tmp_path: Path, pki: Pki, origin: OriginProcess) -> None:
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler", args=tls_scheduler_args(pki)))
        config = {**tls_config(pki), "scheduler": {"addrs": [scheduler.address], "announceInterval": "2s"}}
        parent = stack.enter_context(running_daemon(tmp_path / "parent", config))
        child = stack.enter_context(running_daemon(tmp_path / "child", config))
        wait_for_line(scheduler.log_path, r"host \S+-child joined", scheduler.proc)
        wait_for_line(scheduler.log_path, r"host \S+-parent joined", scheduler.proc)
        assert dfget(parent, origin.url("file.bin"), tmp_path / "parent.bin").returncode == 0
        out = dfget(child, origin.url("file.bin"), tmp_path / "child.bin", "--json")
        # A daemon without a client certificate cannot even announce itself.
        plain = stack.enter_context(running_daemon(tmp_path / "stranger", {"scheduler": config["scheduler"]}))
        wait_for_line(plain.log_path, r"announcing host to scheduler \S+ failed", plain.proc)
        assert "stranger joined" not in scheduler.log_path.read_text()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pieces"]["REMOTE_PEER"] == 3
    assert (tmp_path / "child.bin").read_bytes() == (origin.root / "file.bin").read_bytes()


def test_bad_tls_material_is_a_clear_startup_error(tmp_path: Path, pki: Pki) -> None:
    import yaml

    config = daemon_config(
        tmp_path, {"upload": {"server": {"caCert": str(tmp_path / "missing.pem"), "cert": "x", "key": "y"}}}
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, "-m", "dfdaemon.cli.daemon", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("dfdaemon: upload.server: cannot read") and "Traceback" not in out.stderr
