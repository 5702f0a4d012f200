"""Ranged downloads between real processes: only the pieces covering the range move, from the origin or a peer.

The origin here serves files that exist only as a seed: each MiB block is seeded random bytes computed when it is
asked for, so a 1 GB file costs neither memory nor disk on the origin's side, and a piece from the wrong place
changes every digest. It counts the body bytes it sends per path.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.download.ranges import ByteRange, covering_pieces
from tests.support import (
    DaemonProcess,
    cluster,
    dfget,
    merge,
    peer_config,
    running_daemon,
    running_scheduler,
    wait_for_hosts,
)

MB = 1_000_000
BLOCK = 1024 * 1024
pytestmark = pytest.mark.slow


def block(seed: str, index: int) -> bytes:
    return random.Random(f"{seed}:{index}").randbytes(BLOCK)


def seeded_slice(seed: str, start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of the file named by ``seed`` (its size only bounds the caller)."""
    first, last = start // BLOCK, (start + length - 1) // BLOCK
    joined = b"".join(block(seed, index) for index in range(first, last + 1))
    return joined[start - first * BLOCK : start - first * BLOCK + length]


def seeded_sha256(seed: str, size: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, size, BLOCK):
        digest.update(block(seed, start // BLOCK)[: min(BLOCK, size - start)])
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


class SeededOrigin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files  # name (also its seed) -> size
        self.lock = threading.Lock()
        self.served: dict[str, int] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def bytes_served(self, name: str) -> int:
        with self.lock:
            return self.served.get(name, 0)


class _Handler(BaseHTTPRequestHandler):
    server: SeededOrigin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        name = self.path.lstrip("/")
        size = self.server.files.get(name)
        if size is None:
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, size - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if match else HTTPStatus.OK)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not head:
            self._send(name, start, end + 1)

    def _send(self, name: str, start: int, end: int) -> None:
        position = start
        while position < end:
            index = position // BLOCK
            chunk = block(name, index)[position - index * BLOCK : min(BLOCK, end - index * BLOCK)]
            self.wfile.write(chunk)
            with self.server.lock:
                self.server.served[name] = self.server.served.get(name, 0) + len(chunk)
            position += len(chunk)


@contextmanager
def seeded_origin(files: dict[str, int]) -> Iterator[SeededOrigin]:
    origin = SeededOrigin(files)
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.shutdown()
        origin.server_close()
        thread.join(10)


@dataclass
class Downloaded:
    started: dfdaemon_pb2.DownloadTaskStartedResponse
    task_id: str
    pieces: list[common_pb2.Piece]

    def content(self, byte_range: ByteRange) -> bytes:
        """The range cut from the pieces' contents (the request must have asked for piece content)."""
        ordered = sorted(self.pieces, key=lambda piece: piece.offset)
        joined = b"".join(piece.content for piece in ordered)
        offset = byte_range.start - ordered[0].offset
        return joined[offset : offset + byte_range.length]


def download_task(daemon: DaemonProcess, download: common_pb2.Download) -> Downloaded:
    options = [("grpc.max_receive_message_length", 64 * BLOCK + BLOCK)]  # pieces with their content
    with grpc.insecure_channel(f"unix://{daemon.socket_path}", options=options) as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        responses = list(stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=120))
    started = responses[0].download_task_started_response
    pieces = [r.download_piece_finished_response.piece for r in responses[1:]]
    return Downloaded(started, responses[0].task_id, pieces)


def upload_bytes(daemon: DaemonProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^dfdaemon_upload_bytes_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def covered(size: int, byte_range: ByteRange) -> list[ids.PieceSpan]:
    return covering_pieces(size, ids.piece_length_for(size), byte_range)


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Path]:
    """A test directory whose gigabyte of cache and output goes afterwards (pytest keeps recent ones); the logs
    stay."""
    yield tmp_path
    shutil.rmtree(tmp_path / "daemon" / "storage", ignore_errors=True)
    for output in tmp_path.glob("*.bin"):
        output.unlink()


def test_a_ranged_dfget_of_a_1_gb_file_fetches_only_its_pieces_and_a_full_one_only_the_rest(roomy: Path) -> None:
    tmp_path = roomy
    size = 10**9
    piece = ids.piece_length_for(size)
    # 10 MB starting just before a piece boundary: four pieces, neither end aligned.
    wanted = ByteRange(3 * piece - 1000, 10 * MB)
    spans = covered(size, wanted)
    assert len(spans) == 4
    with seeded_origin({"big.bin": size}) as origin, running_daemon(tmp_path / "daemon") as daemon:
        url = origin.url("big.bin")
        part = tmp_path / "part.bin"
        result = dfget(daemon, url, part, "-H", f"Range: bytes={wanted.start}-{wanted.end - 1}")
        assert result.returncode == 0, result.stderr
        assert part.read_bytes() == seeded_slice("big.bin", wanted.start, wanted.length)
        assert origin.bytes_served("big.bin") == sum(span.length for span in spans)  # the covering pieces only

        whole = tmp_path / "whole.bin"
        result = dfget(daemon, url, whole)
        assert result.returncode == 0, result.stderr
        # The pieces the range brought are not fetched again: the origin sent the file exactly once in all.
        assert origin.bytes_served("big.bin") == size
        assert whole.stat().st_size == size
        assert file_sha256(whole) == seeded_sha256("big.bin", size)


def test_a_range_header_gives_what_download_range_gives(tmp_path: Path) -> None:
    size = 64 * MB + 12345
    wanted = ByteRange(5 * MB + 7, 10 * MB)
    spans = covered(size, wanted)
    results: list[tuple[Downloaded, int]] = []
    with seeded_origin({"header.bin": size}) as origin:
        for name, download in (
            (
                "by-field",
                common_pb2.Download(
                    url=origin.url("header.bin"), range=common_pb2.Range(start=wanted.start, length=wanted.length)
                ),
            ),
            (
                "by-header",
                common_pb2.Download(
                    url=origin.url("header.bin"), request_header={"Range": f"bytes={wanted.start}-{wanted.end - 1}"}
                ),
            ),
        ):
            download.need_piece_content = True
            before = origin.bytes_served("header.bin")
            with running_daemon(tmp_path / name) as daemon:  # a fresh cache each
                results.append((download_task(daemon, download), origin.bytes_served("header.bin") - before))
    (by_field, field_bytes), (by_header, header_bytes) = results
    expected = seeded_slice("header.bin", wanted.start, wanted.length)
    for result in (by_field, by_header):
        assert result.started.range == common_pb2.Range(start=wanted.start, length=wanted.length)
        assert [(p.number, p.offset, p.length) for p in result.started.pieces] == [
            (s.number, s.offset, s.length) for s in spans
        ]
        assert sorted(p.number for p in result.pieces) == [s.number for s in spans]
        assert result.content(wanted) == expected
    assert by_field.task_id == by_header.task_id  # a range never changes the task id
    assert field_bytes == header_bytes == sum(s.length for s in spans)


def test_a_ranged_download_from_a_peer_with_the_whole_task_fetches_only_those_pieces(tmp_path: Path) -> None:
    size = 64 * MB + 12345
    wanted = ByteRange(20 * MB + 3, 10 * MB)
    spans = covered(size, wanted)
    with seeded_origin({"shared.bin": size}) as origin, cluster(tmp_path, 2) as (_, (parent, child)):
        url = origin.url("shared.bin")
        result = dfget(parent, url, tmp_path / "parent.bin")
        assert result.returncode == 0, result.stderr
        assert origin.bytes_served("shared.bin") == size
        uploaded_before = upload_bytes(parent)

        output = tmp_path / "child.bin"
        download = common_pb2.Download(
            url=url, range=common_pb2.Range(start=wanted.start, length=wanted.length), output_path=str(output)
        )
        downloaded = download_task(child, download)

        assert origin.bytes_served("shared.bin") == size  # not one byte more from the origin
        assert sorted(p.number for p in downloaded.pieces) == [s.number for s in spans]
        assert {p.traffic_type for p in downloaded.pieces} == {common_pb2.REMOTE_PEER}
        assert upload_bytes(parent) - uploaded_before == sum(s.length for s in spans)
        assert output.read_bytes() == seeded_slice("shared.bin", wanted.start, wanted.length)


def synced_pieces(daemon: DaemonProcess, task_id: str, interested: list[int]) -> list[int]:
    """The pieces a parent's SyncPieces stream names before it ends (it must end on its own)."""
    with grpc.insecure_channel(daemon.upload_address) as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        request = dfdaemon_pb2.SyncPiecesRequest(host_id="test", task_id=task_id, interested_piece_numbers=interested)
        return sorted(response.number for response in stub.SyncPieces(request, timeout=60))


def test_a_full_download_takes_a_partial_peers_pieces_and_the_rest_from_the_origin(tmp_path: Path) -> None:
    size = 64 * MB + 12345
    wanted = ByteRange(30 * MB, 10 * MB)
    spans = covered(size, wanted)
    # A piece timeout far beyond the test's patience: a parent stream that waited for pieces a partial task will
    # never get would stall the child for all of it.
    slow_timeout = {"download": {"pieceTimeout": "300s"}}
    with ExitStack() as stack:
        origin = stack.enter_context(seeded_origin({"partial.bin": size}))
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        ranged, full = (
            stack.enter_context(running_daemon(tmp_path / name, merge(peer_config(scheduler), slow_timeout)))
            for name in ("ranged", "full")
        )
        wait_for_hosts(scheduler, 2)
        url = origin.url("partial.bin")
        result = dfget(ranged, url, tmp_path / "part.bin", "-H", f"Range: bytes={wanted.start}-{wanted.end - 1}")
        assert result.returncode == 0, result.stderr
        assert origin.bytes_served("partial.bin") == sum(s.length for s in spans)

        task_id = ids.task_id(url)
        every_piece = list(range(ids.piece_count(size, ids.piece_length_for(size))))
        assert synced_pieces(ranged, task_id, every_piece) == [s.number for s in spans]

        whole = tmp_path / "whole.bin"
        result = dfget(full, url, whole)
        assert result.returncode == 0, result.stderr
        assert file_sha256(whole) == seeded_sha256("partial.bin", size)
        assert origin.bytes_served("partial.bin") == size  # the range's pieces came from the partial peer


def test_dfget_transferring_a_range_through_the_stream_writes_exactly_the_range(tmp_path: Path) -> None:
    size = 64 * MB + 12345
    with seeded_origin({"stream.bin": size}) as origin, running_daemon(tmp_path / "daemon") as daemon:
        for start, last in ((4 * MB + 1, 14 * MB), (size - 100, size - 1)):  # across pieces; the file's tail
            output = tmp_path / f"stream-{start}.bin"
            headers = ("-H", f"Range: bytes={start}-{last}")
            result = dfget(daemon, origin.url("stream.bin"), output, "--transfer-from-dfdaemon", *headers)
            assert result.returncode == 0, result.stderr
            assert output.read_bytes() == seeded_slice("stream.bin", start, last - start + 1)
