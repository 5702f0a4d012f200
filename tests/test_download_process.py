"""DownloadTask through a real daemon process from a real loopback origin: bytes, sharing, errors, quota."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.storage_support import seeded_bytes
from tests.support import REPO_ROOT, DaemonProcess, OriginProcess, dfget, running_daemon, running_origin

MB = 1_000_000


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("origin") / "files"
    root.mkdir()
    (root / "big.bin").write_bytes(seeded_bytes("test_download_process-1", 9 * MB + 123))
    (root / "shared.bin").write_bytes(seeded_bytes("test_download_process-2", 12 * MB + 7))
    (root / "small.txt").write_bytes(seeded_bytes("small", 20_000))
    (root / "empty.bin").write_bytes(b"")
    with running_origin(root) as running:
        yield running


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("daemon"), {"download": {"concurrentPieceCount": 4}}) as running:
        yield running


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stub(daemon: DaemonProcess) -> dfdaemon_pb2_grpc.DfdaemonDownloadStub:
    channel = grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS)
    return dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)


def download(daemon: DaemonProcess, **fields: object) -> list[dfdaemon_pb2.DownloadTaskResponse]:
    request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(**fields))  # type: ignore[arg-type]
    return list(stub(daemon).DownloadTask(request, timeout=60))


def rpc_error(daemon: DaemonProcess, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        download(daemon, **fields)
    return caught.value


def test_back_to_source_then_local_hit(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    out = dfget(daemon, origin.url("big.bin"), tmp_path / "big.bin", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert sha256(tmp_path / "big.bin") == sha256(origin.root / "big.bin")
    assert report["pieces"]["BACK_TO_SOURCE"] == 3  # 9 MB in 4 MiB pieces
    served = origin.bytes_served("big.bin")
    assert 9 * MB + 123 <= served <= 9 * MB + 123 + 1  # the whole file once (plus the one-byte length probe)

    again = dfget(daemon, origin.url("big.bin"), tmp_path / "again.bin", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["pieces"] == {"BACK_TO_SOURCE": 0, "REMOTE_PEER": 0, "LOCAL_PEER": 3}
    assert sha256(tmp_path / "again.bin") == sha256(origin.root / "big.bin")
    assert origin.bytes_served("big.bin") == served  # a cache hit does not touch the origin
    stat = stub(daemon).StatLocalTask(dfdaemon_pb2.StatLocalTaskRequest(task_id=report["task_id"]), timeout=10)
    assert stat.content_length == 9 * MB + 123
    assert stat.HasField("finished_at")


def test_concurrent_requests_share_one_download(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    outputs = [tmp_path / f"shared-{i}.bin" for i in range(4)]
    results: list[subprocess.CompletedProcess[str]] = []

    def run(output: Path) -> None:
        results.append(dfget(daemon, origin.url("shared.bin"), output))

    threads = [threading.Thread(target=run, args=(output,)) for output in outputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result.returncode == 0 for result in results), [r.stderr for r in results]
    expected = sha256(origin.root / "shared.bin")
    assert all(sha256(output) == expected for output in outputs)
    assert origin.bytes_served("shared.bin") <= 1.05 * (12 * MB + 7)


def test_origin_404_is_a_clear_error_and_leaves_no_file(
    daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path
) -> None:
    out = dfget(daemon, origin.url("missing.bin"), tmp_path / "missing.bin")
    assert out.returncode == 1
    assert out.stderr.startswith("dfget: origin answered 404")
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "missing.bin").exists()
    assert list(tmp_path.iterdir()) == []


def test_origin_500_is_retried_then_reported(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    (origin.root / "flaky.bin").write_bytes(seeded_bytes("flaky", 1000))
    origin.fault("flaky.bin", status=500)
    try:
        out = dfget(daemon, origin.url("flaky.bin"), tmp_path / "flaky.bin")
    finally:
        origin.fault("flaky.bin")
    assert out.returncode == 1
    assert "origin answered 500" in out.stderr
    assert not (tmp_path / "flaky.bin").exists()
    retry = dfget(daemon, origin.url("flaky.bin"), tmp_path / "flaky.bin")
    assert retry.returncode == 0, retry.stderr
    assert (tmp_path / "flaky.bin").read_bytes() == seeded_bytes("flaky", 1000)


def test_origin_dropping_the_connection_mid_piece(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    (origin.root / "cut.bin").write_bytes(seeded_bytes("test_download_process-3", 3 * MB))
    origin.fault("cut.bin", cut=100_000)
    try:
        out = dfget(daemon, origin.url("cut.bin"), tmp_path / "cut.bin")
    finally:
        origin.fault("cut.bin")
    assert out.returncode == 1
    assert "dfget: " in out.stderr and "broke" in out.stderr
    assert not (tmp_path / "cut.bin").exists()


def test_digest_is_checked_over_the_whole_file(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    good = "sha256:" + sha256(origin.root / "small.txt")
    ok = dfget(daemon, origin.url("small.txt"), tmp_path / "good.txt", "--digest", good)
    assert ok.returncode == 0, ok.stderr
    bad = "sha256:" + "0" * 64
    wrong = dfget(daemon, origin.url("small.txt"), tmp_path / "bad.txt", "--digest", bad)
    assert wrong.returncode == 1
    assert "digest mismatch" in wrong.stderr
    assert not (tmp_path / "bad.txt").exists()


def test_range_and_piece_content(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    data = seeded_bytes("test_download_process-4", 9 * MB + 123)
    (origin.root / "ranged.bin").write_bytes(data)  # its own file: the shared daemon caches what it fetched
    output = tmp_path / "range.bin"
    responses = download(
        daemon,
        url=origin.url("ranged.bin"),
        range=common_pb2.Range(start=4_000_000, length=2_000_000),
        output_path=str(output),
        need_piece_content=True,
    )
    started = responses[0].download_task_started_response
    assert started.content_length == len(data)
    assert started.range.start == 4_000_000
    assert [p.number for p in started.pieces] == [0, 1]  # 4 MiB pieces overlapping [4e6, 6e6)
    pieces = sorted((r.download_piece_finished_response.piece for r in responses[1:]), key=lambda p: p.number)
    assert b"".join(p.content for p in pieces) == data[: 2 * 4 * 1024 * 1024]
    assert all(p.digest.startswith("crc32:") for p in pieces)
    assert output.read_bytes() == data[4_000_000:6_000_000]


def test_empty_file(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    responses = download(daemon, url=origin.url("empty.bin"), output_path=str(tmp_path / "empty.bin"))
    assert len(responses) == 1
    assert responses[0].download_task_started_response.content_length == 0
    assert (tmp_path / "empty.bin").read_bytes() == b""


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "url is required"),
        ({"url": "ftp://example.com/x"}, grpc.StatusCode.INVALID_ARGUMENT, "unsupported URL scheme"),
        ({"url": "http://"}, grpc.StatusCode.INVALID_ARGUMENT, "no host"),
        ({"output_path": "relative/out.bin"}, grpc.StatusCode.INVALID_ARGUMENT, "must be absolute"),
        ({"output_path": "/nonexistent-dir/x/out.bin"}, grpc.StatusCode.FAILED_PRECONDITION, "does not exist"),
        ({"range": common_pb2.Range(start=0, length=0)}, grpc.StatusCode.FAILED_PRECONDITION, "range"),
        ({"range": common_pb2.Range(start=10**9, length=5)}, grpc.StatusCode.FAILED_PRECONDITION, "past the end"),
        ({"digest": "md5:abc"}, grpc.StatusCode.INVALID_ARGUMENT, "digest"),
    ],
)
def test_bad_requests(
    daemon: DaemonProcess, origin: OriginProcess, fields: dict[str, object], code: grpc.StatusCode, words: str
) -> None:
    request: dict[str, object] = {"url": origin.url("small.txt"), **fields} if fields else {}
    error = rpc_error(daemon, **request)
    assert error.code() == code, error.details()
    assert words in (error.details() or "")


def test_existing_output_needs_overwrite(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    output = tmp_path / "exists.txt"
    output.write_text("mine")
    error = rpc_error(daemon, url=origin.url("small.txt"), output_path=str(output))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert output.read_text() == "mine"
    download(daemon, url=origin.url("small.txt"), output_path=str(output), overwrite=True)
    assert output.read_bytes() == (origin.root / "small.txt").read_bytes()


def test_timeout_is_deadline_exceeded(daemon: DaemonProcess, origin: OriginProcess, tmp_path: Path) -> None:
    (origin.root / "slow.bin").write_bytes(seeded_bytes("slow", 100))
    origin.fault("slow.bin", delay=3)
    try:
        out = dfget(daemon, origin.url("slow.bin"), tmp_path / "slow.bin", "--timeout", "1s")
    finally:
        origin.fault("slow.bin")
    assert out.returncode == 1
    assert "DEADLINE_EXCEEDED" in out.stderr
    assert not (tmp_path / "slow.bin").exists()


def test_a_download_that_cannot_fit_is_resource_exhausted(tmp_path: Path, origin: OriginProcess) -> None:
    config = {"gc": {"policy": {"diskThreshold": "15MB", "gracePeriod": "1h"}}}
    (origin.root / "fit.bin").write_bytes(
        seeded_bytes("test_download_process-5", 9 * MB + 123)
    )  # its own file: the origin counts per file
    with running_daemon(tmp_path / "d", config) as small:
        first = dfget(small, origin.url("fit.bin"), tmp_path / "first.bin", "--json")
        assert first.returncode == 0, first.stderr
        task_id = json.loads(first.stdout)["task_id"]
        held = subprocess.run(
            [sys.executable, "-m", "dfdaemon.cli.dfctl", "-e", str(small.socket_path), "use", "acquire",
             "--holder", "container:default/db", task_id],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
        assert held.returncode == 0, held.stderr
        error = rpc_error(small, url=origin.url("shared.bin"), output_path=str(tmp_path / "second.bin"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in use or too recent to collect (held " in (error.details() or "")
        assert not (tmp_path / "second.bin").exists()
        assert (tmp_path / "first.bin").exists()
        assert sha256(small.storage_dir / "content" / "tasks" / task_id[:3] / task_id) == sha256(
            origin.root / "fit.bin"
        )
