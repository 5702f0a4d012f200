"""dfget against a fake daemon: a real grpc.aio server on a unix socket, with scripted DownloadTask answers.

The fake runs in a background thread with its own event loop, so dfget's synchronous client can run
in the test's thread (``main``) or as its own process (``python -m dfdaemon.cli.dfget``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration

from dfdaemon.api import common_pb2, dfdaemon_pb2, errordetails_pb2
from dfdaemon.cli.dfget import main
from dfdaemon.config import detect_ip
from dfdaemon.ids import DEFAULT_FILTERED_QUERY_PARAMS
from dfdaemon.rpc.download import SERVICE
from dfdaemon.rpc.servers import HealthReporter, add_service, new_server
from tests.storage_support import seeded_bytes
from tests.support import REPO_ROOT, dfget, run_module, running_daemon, running_origin

CONTENT = bytes(range(256)) * 40  # 10240 bytes: three pieces of 4096, 4096 and 2048
PIECE_LENGTH = 4096
URL = "https://origin.example/files/model.bin?sig=abc"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
Responses = AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]


def _response(**kwargs: Any) -> dfdaemon_pb2.DownloadTaskResponse:
    return dfdaemon_pb2.DownloadTaskResponse(host_id="127.0.0.1-fake", task_id="t" * 64, peer_id="peer-1", **kwargs)


def _pieces(length: int) -> list[common_pb2.Piece]:
    return [
        common_pb2.Piece(number=n, offset=offset, length=min(PIECE_LENGTH, length - offset))
        for n, offset in enumerate(range(0, length, PIECE_LENGTH))
    ]


def _started(length: int) -> dfdaemon_pb2.DownloadTaskResponse:
    return _response(
        download_task_started_response=dfdaemon_pb2.DownloadTaskStartedResponse(
            content_length=length, pieces=_pieces(length)
        )
    )


def _finished(piece: common_pb2.Piece, traffic: common_pb2.TrafficType.ValueType) -> dfdaemon_pb2.DownloadTaskResponse:
    done = common_pb2.Piece()
    done.CopyFrom(piece)
    done.traffic_type = traffic
    return _response(download_piece_finished_response=dfdaemon_pb2.DownloadPieceFinishedResponse(piece=done))


async def _write(path: str, data: bytes) -> None:
    await asyncio.to_thread(Path(path).write_bytes, data)


class Recorder:
    """Base of the fakes: keeps every request so tests can check what dfget sent."""

    def __init__(self) -> None:
        self.requests: list[dfdaemon_pb2.DownloadTaskRequest] = []


class Succeeds(Recorder):
    """Writes the file, then streams started + one finished response per piece, one of each traffic type."""

    async def DownloadTask(self, request: dfdaemon_pb2.DownloadTaskRequest, context: Context) -> Responses:
        self.requests.append(request)
        await _write(request.download.output_path, CONTENT)
        yield _started(len(CONTENT))
        traffic = [common_pb2.LOCAL_PEER, common_pb2.REMOTE_PEER, common_pb2.BACK_TO_SOURCE]
        for piece, kind in zip(_pieces(len(CONTENT)), traffic, strict=True):
            yield _finished(piece, kind)


class FailsMidStream(Recorder):
    """Writes part of the file and one piece, then ends with INTERNAL and the given trailer."""

    def __init__(self, trailer: bytes | None, details: str = "backend error") -> None:
        super().__init__()
        self.trailer = trailer
        self.details = details
        self.partial_written = False

    async def DownloadTask(self, request: dfdaemon_pb2.DownloadTaskRequest, context: Context) -> Responses:
        self.requests.append(request)
        await _write(request.download.output_path, CONTENT[:PIECE_LENGTH])
        self.partial_written = True
        yield _started(len(CONTENT))
        yield _finished(_pieces(len(CONTENT))[0], common_pb2.BACK_TO_SOURCE)
        metadata = ((STATUS_DETAILS_KEY, self.trailer),) if self.trailer is not None else ()
        await context.abort(grpc.StatusCode.INTERNAL, self.details, trailing_metadata=metadata)


class Hangs(Recorder):
    """Writes part of the file, then waits until the client goes away."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = threading.Event()

    async def DownloadTask(self, request: dfdaemon_pb2.DownloadTaskRequest, context: Context) -> Responses:
        self.requests.append(request)
        yield _started(len(CONTENT))
        await _write(request.download.output_path, CONTENT[:PIECE_LENGTH])
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class Unimplemented(Recorder):
    """No DownloadTask: ``add_service`` answers UNIMPLEMENTED, as today's daemon does."""


class FakeDaemon:
    """A grpc.aio server with health on a unix socket, run on its own event loop in a thread."""

    def __init__(self, socket_path: Path, servicer: object) -> None:
        self.socket_path = socket_path
        self.servicer = servicer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health: HealthReporter | None = None

    def _call(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout=15)

    async def _start(self) -> None:
        self._server, self._health = new_server(
            [SERVICE.full_name], lambda server: add_service(server, SERVICE, self.servicer)
        )
        self._server.add_insecure_port(f"unix:{self.socket_path}")
        await self._server.start()
        await self._health.set_serving(True)

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def set_serving(self, serving: bool) -> None:
        assert self._health is not None
        self._call(self._health.set_serving(serving))

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self._loop.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[object], FakeDaemon]]:
    """Start a fake daemon with the given servicer on ``tmp_path/d.sock``; stopped after the test."""
    started: list[FakeDaemon] = []

    def start(servicer: object) -> FakeDaemon:
        daemon = FakeDaemon(tmp_path / "d.sock", servicer)
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _dfget_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dfdaemon.cli.dfget", *argv]


# --------------------------------------------------------------------------- the request


def test_request_carries_every_flag(
    serve: Callable[[object], FakeDaemon],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = Succeeds()
    serve(fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.bin").write_bytes(b"old")
    sha = "AB" * 32
    code, out, err = _run(
        capsys,
        URL,
        "-O",
        "out.bin",
        "-e",
        "d.sock",
        "--digest",
        f"sha256:{sha}",
        "--tag",
        "v1",
        "--application",
        "trainer",
        "-H",
        "Authorization: Bearer token",
        "--header",
        "X-Range-Note:  a: b ",
        "--filtered-query-param",
        "sig",
        "--filtered-query-param",
        "expires",
        "--piece-length",
        "4MiB",
        "--timeout",
        "1m30s",
        "--disable-back-to-source",
        "--overwrite",
        "--priority",
        "3",
        "--force-hard-link",
        "--content-for-calculating-task-id",
        "model-v1",
    )
    # The fake daemon writes a new file: dfget says -O is a copy, not a link to the cache.
    assert (code, out, err) == (0, f"{tmp_path / 'out.bin'}: copy\n", "")
    assert (tmp_path / "out.bin").read_bytes() == CONTENT
    [request] = fake.requests
    download = request.download
    assert download.url == URL
    assert download.output_path == str(tmp_path / "out.bin")
    assert download.digest == f"sha256:{sha.lower()}"
    assert (download.tag, download.application) == ("v1", "trainer")
    assert dict(download.request_header) == {"Authorization": "Bearer token", "X-Range-Note": "a: b"}
    assert list(download.filtered_query_params) == ["sig", "expires"]
    assert download.HasField("piece_length") and download.piece_length == 4 * 1024 * 1024
    assert download.HasField("timeout") and download.timeout.ToTimedelta().total_seconds() == 90
    assert download.overwrite and download.disable_back_to_source
    assert download.type == common_pb2.STANDARD
    # Exactly these fields and no other: each set field can change the task id or what the daemon does.
    assert download == common_pb2.Download(
        url=URL,
        output_path=str(tmp_path / "out.bin"),
        digest=f"sha256:{sha.lower()}",
        tag="v1",
        application="trainer",
        request_header={"Authorization": "Bearer token", "X-Range-Note": "a: b"},
        filtered_query_params=["sig", "expires"],
        piece_length=4 * 1024 * 1024,
        timeout=Duration(seconds=90),
        disable_back_to_source=True,
        overwrite=True,
        priority=common_pb2.LEVEL3,
        force_hard_link=True,
        content_for_calculating_task_id="model-v1",
        remote_ip=detect_ip(),
    )


def test_optional_fields_stay_unset(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = Succeeds()
    daemon = serve(fake)
    code, _, err = _run(capsys, "http://origin.example/f", "-O", str(tmp_path / "f"), "-e", str(daemon.socket_path))
    assert (code, err) == (0, "")
    download = fake.requests[0].download
    for name in ("digest", "tag", "application", "piece_length", "timeout", "content_for_calculating_task_id"):
        assert not download.HasField(name), name  # presence changes the task id
    assert not download.overwrite and not download.disable_back_to_source
    assert not download.request_header
    # Without --filtered-query-param, upstream's dfget sends its default list of signing keys.
    assert tuple(download.filtered_query_params) == DEFAULT_FILTERED_QUERY_PARAMS
    assert download == common_pb2.Download(
        url="http://origin.example/f",
        output_path=str(tmp_path / "f"),
        filtered_query_params=DEFAULT_FILTERED_QUERY_PARAMS,
        priority=common_pb2.LEVEL6,  # upstream dfget's default
        remote_ip=detect_ip(),  # the client's address, as upstream's dfget sends it
    )


def test_json_output(serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = serve(Succeeds())
    output = tmp_path / "model.bin"
    code, out, err = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path), "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    elapsed = document.pop("elapsed_seconds")
    assert isinstance(elapsed, float) and elapsed >= 0
    assert document == {
        "task_id": "t" * 64,
        "peer_id": "peer-1",
        "content_length": len(CONTENT),
        "output": str(output),
        "written_as": "copy",
        "pieces": {"BACK_TO_SOURCE": 1, "REMOTE_PEER": 1, "LOCAL_PEER": 1},
    }


# --------------------------------------------------------------------------- failures


def _backend(encoding: str) -> bytes:
    backend = errordetails_pb2.Backend(message="Not Found", header={"content-type": "text/plain"}, status_code=404)
    if encoding == "json":  # what upstream's daemon sends
        return json.dumps(
            {"message": "Not Found", "header": {"content-type": "text/plain"}, "status_code": 404}
        ).encode()
    if encoding == "proto-json":
        return json_format.MessageToJson(backend).encode()
    return backend.SerializeToString()


@pytest.mark.parametrize("encoding", ["json", "proto-json", "protobuf"])
def test_origin_failure_names_the_status_and_removes_the_partial_file(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    fake = FailsMidStream(_backend(encoding))
    daemon = serve(fake)
    output = tmp_path / "f"
    code, out, err = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path), "--json")
    assert fake.partial_written
    assert (code, out, err) == (1, "", "dfget: origin answered 404: Not Found\n")
    assert not output.exists()


def test_daemon_failure_without_origin_details(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve(FailsMidStream(None, details="disk full:\nno space left"))
    output = tmp_path / "f"
    code, _, err = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path))
    assert (code, err) == (1, "dfget: download failed: INTERNAL: disk full: no space left\n")
    assert not output.exists()


def test_unimplemented_download_task(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve(Unimplemented())
    output = tmp_path / "f"
    code, _, err = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path))
    assert code == 1
    assert err == (
        "dfget: the daemon does not serve DownloadTask: "
        "/dfdaemon.v2.DfdaemonDownload/DownloadTask is not implemented by this server yet\n"
    )
    assert not output.exists()


def test_failure_keeps_a_file_the_run_never_touched(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve(Unimplemented())
    output = tmp_path / "f"
    output.write_bytes(b"precious")
    code, _, _ = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path), "--overwrite")
    assert code == 1
    assert output.read_bytes() == b"precious"


def test_failure_removes_an_overwritten_file(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = serve(FailsMidStream(_backend("json")))
    output = tmp_path / "f"
    output.write_bytes(b"old")
    code, _, _ = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path), "--overwrite")
    assert code == 1
    assert not output.exists()  # its bytes were the partial download, not the old file


def test_existing_output_is_refused_before_any_rpc(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = Succeeds()
    daemon = serve(fake)
    output = tmp_path / "f"
    output.write_bytes(b"mine")
    code, _, err = _run(capsys, URL, "-O", str(output), "-e", str(daemon.socket_path))
    assert (code, err) == (1, f"dfget: {output} exists (use --overwrite)\n")
    assert fake.requests == []
    assert output.read_bytes() == b"mine"
    code, _, err = _run(capsys, URL, "-O", str(output), "-e", str(tmp_path / "nobody.sock"))
    assert (code, err) == (1, f"dfget: {output} exists (use --overwrite)\n")


def test_unreachable_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket_path = tmp_path / "nobody.sock"
    code, _, err = _run(capsys, URL, "-O", str(tmp_path / "f"), "-e", str(socket_path))
    assert (code, err) == (1, f"dfget: cannot reach dfdaemon at {socket_path}: is it running?\n")
    assert not (tmp_path / "f").exists()


def test_daemon_not_serving(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = Succeeds()
    daemon = serve(fake)
    daemon.set_serving(False)
    code, _, err = _run(capsys, URL, "-O", str(tmp_path / "f"), "-e", str(daemon.socket_path))
    assert (code, err) == (1, f"dfget: dfdaemon at {daemon.socket_path} is not serving downloads (NOT_SERVING)\n")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([URL], "the following arguments are required: -O/--output"),
        (["origin.example/f", "-O", "f"], "invalid URL 'origin.example/f': it needs a scheme and a host"),
        (["http:///f", "-O", "f"], "invalid URL 'http:///f'"),
        ([URL, "-O", "f", "--digest", "sha256:abc"], "argument --digest: invalid digest 'sha256:abc'"),
        ([URL, "-O", "f", "--digest", "md5:" + "0" * 32], "expected crc32:<decimal>, sha256:<64 hex>"),
        ([URL, "-O", "f", "--digest", "crc32:x"], "argument --digest: invalid crc32 digest"),
        ([URL, "-O", "f", "--piece-length", "4 parsecs"], "argument --piece-length: invalid size '4 parsecs'"),
        ([URL, "-O", "f", "--piece-length", "0"], "argument --piece-length: invalid size '0': must be positive"),
        ([URL, "-O", "f", "--timeout", "soon"], "argument --timeout: invalid duration 'soon'"),
        ([URL, "-O", "f", "-H", "no colon"], "argument -H/--header: invalid header 'no colon': expected 'Name: value'"),
        ([URL, "-O", "missing/f"], "directory "),
        ([URL, "-O", "."], " is a directory"),
        ([URL, "-O", "f", "--bogus"], "unrecognized arguments: --bogus"),
        ([URL, "-O", "f", "--priority", "7"], "argument --priority: invalid priority '7': a level from 0 to 6"),
        ([URL, "-O", "f", "--priority", "high"], "argument --priority: invalid priority 'high'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("dfget: ") and err.count("\n") == 1
    assert expected in err


# --------------------------------------------------------------------------- as a process


def test_process_exit_codes_and_no_traceback(serve: Callable[[object], FakeDaemon], tmp_path: Path) -> None:
    fake = FailsMidStream(_backend("json"))
    daemon = serve(fake)
    output = tmp_path / "f"
    failed = run_module("dfdaemon.cli.dfget", URL, "-O", str(output), "-e", str(daemon.socket_path))
    assert failed.returncode == 1
    assert failed.stderr == "dfget: origin answered 404: Not Found\n"
    assert not output.exists()
    assert len(fake.requests) == 1
    usage = run_module("dfdaemon.cli.dfget", URL)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "Traceback" not in usage.stderr


def test_process_success_is_quiet_without_a_terminal(serve: Callable[[object], FakeDaemon], tmp_path: Path) -> None:
    daemon = serve(Succeeds())
    output = tmp_path / "f"
    done = run_module("dfdaemon.cli.dfget", URL, "-O", str(output), "-e", str(daemon.socket_path), "--json")
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["content_length"] == len(CONTENT)
    assert output.read_bytes() == CONTENT


def _read_terminal(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_bar_only_on_a_terminal(
    serve: Callable[[object], FakeDaemon], tmp_path: Path, no_progress: bool
) -> None:
    daemon = serve(Succeeds())
    argv = [URL, "-O", str(tmp_path / "model.bin"), "-e", str(daemon.socket_path)]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        _dfget_command(*argv, *(["--no-progress"] if no_progress else [])),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        cwd=REPO_ROOT,
    )
    os.close(terminal)
    drawn = _read_terminal(controller)
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    if no_progress:
        assert drawn == ""
    else:
        assert "model.bin" in drawn and "10.2/10.2 kB" in drawn


def test_ctrl_c_cancels_the_stream_and_removes_the_partial_file(
    serve: Callable[[object], FakeDaemon], tmp_path: Path
) -> None:
    fake = Hangs()
    daemon = serve(fake)
    output = tmp_path / "f"
    # Python leaves SIGINT ignored when it starts ignored (as under a non-interactive shell's `&`);
    # restore the default handler so the child sees Ctrl-C as a user would.
    launcher = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['dfget', *sys.argv[1:]]; runpy.run_module('dfdaemon.cli.dfget', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, URL, "-O", str(output), "-e", str(daemon.socket_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 30
    while not (output.exists() and output.stat().st_size == PIECE_LENGTH):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (130, "", "dfget: interrupted\n")
    assert not output.exists()
    assert fake.cancelled.wait(timeout=10)


def test_content_for_calculating_task_id_names_the_task_in_a_real_daemon(tmp_path: Path) -> None:
    """The flag reaches the daemon: the task id it reports is the sha256 of the content string, not of the URL."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "model.bin").write_bytes(seeded_bytes("test_dfget-1", 100_000))
    with running_origin(tmp_path / "files") as origin, running_daemon(tmp_path / "node") as daemon:
        done = dfget(
            daemon,
            origin.url("model.bin"),
            tmp_path / "out.bin",
            "--json",
            "--content-for-calculating-task-id",
            "model-v1",
            "--priority",
            "2",
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["task_id"] == hashlib.sha256(b"model-v1").hexdigest()
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "files" / "model.bin").read_bytes()
