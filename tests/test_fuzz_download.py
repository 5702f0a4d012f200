"""Bad input on ``dfdaemon.v2.DfdaemonDownload`` (unix socket): task ids, DownloadTask (generated, listed and
hostile origins), DeleteHost, byte-level mutations. What every call must satisfy is said in
``tests/fuzz_rpc_support.py``."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import assume, given
from hypothesis import strategies as st

from dfdaemon.api import common_pb2, dfdaemon_pb2
from dfdaemon.api import dfdaemon_ext_pb2 as ext_pb2
from tests import fuzz_strategies as fs
from tests.fuzz_downloads import SMALL, listed, mixed_case, plan_url, run_download_plan
from tests.fuzz_rpc_support import (
    CACHE,
    DOWNLOAD,
    FUZZ_MARKS,
    HUNDRED_YEARS,
    INVALID,
    NOT_PROBED,
    PRECONDITION,
    SMALL_PIECE_LENGTH,
    Code,
    Env,
    Outcome,
    TaskIdCase,
    as_is,
    assert_serving,
    check_unknown_method,
    expect,
    fuzz,
    fuzz_environment,
    long_input_cases,
    rpc_at,
    rpc_paths,
    run_listed_task_ids,
    run_long_input,
    run_mutated,
    run_task_id_case,
    run_undecodable,
    stays_on_this_machine,
    task_id_cases,
    unique,
    unknown_methods,
)

pytestmark = FUZZ_MARKS


@pytest.mark.parametrize("case", task_id_cases(DOWNLOAD))
def test_listed_task_ids(fuzz_env: Env, case: TaskIdCase) -> None:
    run_listed_task_ids(fuzz_env, case)


@pytest.mark.parametrize("case", task_id_cases(DOWNLOAD))
@fuzz(30)
@given(task_id=fs.task_ids())
def test_fuzzed_task_ids(fuzz_env: Env, case: TaskIdCase, task_id: str) -> None:
    run_task_id_case(fuzz_env, case, task_id)


@fuzz(70)
@given(plan=fs.download_plans())
def test_fuzzed_download_task(fuzz_env: Env, plan: fs.DownloadPlan) -> None:
    assume(stays_on_this_machine(plan_url(fuzz_env, plan)))
    run_download_plan(fuzz_env, DOWNLOAD + "DownloadTask", plan)


DOWNLOAD_CASES = [
    listed(replace(SMALL, byte_range=(0, 0)), {PRECONDITION}, "range-of-length-0"),
    listed(replace(SMALL, byte_range=(fs.SMALL_SIZE - 1, 2)), {PRECONDITION}, "range-past-the-end"),
    listed(replace(SMALL, byte_range=(fs.SMALL_SIZE, 1)), {PRECONDITION}, "range-starting-at-the-end"),
    listed(replace(SMALL, byte_range=(fs.U64_MAX, fs.U64_MAX)), {PRECONDITION}, "range-u64-max"),
    listed(fs.DownloadPlan(target="empty.bin", byte_range=(0, 1)), {PRECONDITION}, "range-of-an-empty-file"),
    listed(replace(SMALL, byte_range=(10, 20), output="new"), {Code.OK}, "range-inside"),
    *(
        listed(fs.DownloadPlan(target="", url=url), {INVALID}, f"refused-url-{n}")
        for n, url in enumerate(fs.REFUSED_URLS)
    ),
    listed(fs.DownloadPlan(target="", url="http://127.0.0.1:1/closed"), {Code.INTERNAL}, "closed-port"),
    listed(fs.DownloadPlan(target="missing.bin"), {Code.INTERNAL}, "origin-404"),
    listed(replace(SMALL, tag=unique(), headers={"X-Huge": "v" * 64 * 1024}), {Code.INTERNAL, Code.OK}, "header-64k"),
    listed(replace(SMALL, task_type=99), {Code.OK, INVALID}, "unknown-task-type"),
    listed(replace(SMALL, task_type=fs.I32_MIN), {Code.OK, INVALID}, "negative-task-type"),
    listed(replace(SMALL, priority=-5), {Code.OK, INVALID}, "unknown-priority"),
    # output_path
    listed(replace(SMALL, output="relative"), {INVALID}, "output-relative"),
    listed(replace(SMALL, output="empty"), {INVALID}, "output-empty"),
    listed(replace(SMALL, output="missing-dir"), {PRECONDITION}, "output-in-a-missing-directory"),
    listed(replace(SMALL, output="parent-is-file"), {PRECONDITION}, "output-under-a-file"),
    listed(replace(SMALL, output="existing"), {PRECONDITION}, "output-existing-file"),
    listed(replace(SMALL, output="existing", overwrite=True), {Code.OK}, "output-existing-file-overwrite"),
    listed(replace(SMALL, output="directory"), {PRECONDITION}, "output-directory"),
    listed(replace(SMALL, output="directory", overwrite=True), {PRECONDITION}, "output-directory-overwrite"),
    listed(replace(SMALL, output="symlink-outside"), {PRECONDITION}, "output-symlink-outside"),
    listed(replace(SMALL, output="symlink-outside", overwrite=True), {Code.OK}, "output-symlink-outside-overwrite"),
    listed(
        replace(SMALL, output="dangling-symlink-outside", overwrite=True),
        {Code.OK},
        "output-dangling-symlink-outside-overwrite",
    ),
    listed(replace(SMALL, output="dotdot-inside"), {Code.OK}, "output-with-dotdot"),
    listed(replace(SMALL, output="nul-byte"), {INVALID}, "output-with-nul"),
    listed(replace(SMALL, tag=unique(), output="long-name"), {INVALID}, "output-name-of-256-bytes"),
    listed(replace(SMALL, tag=unique(), output="long-name-multibyte"), {INVALID}, "output-name-of-128-2-byte-chars"),
    listed(replace(SMALL, tag=unique(), output="long-path"), {INVALID}, "output-path-of-4k"),
    listed(replace(SMALL, output="name-236"), {Code.OK}, "output-name-of-236-bytes"),
    listed(replace(SMALL, output="name-237"), {Code.OK}, "output-name-of-237-bytes"),
    listed(replace(SMALL, output="name-255"), {Code.OK}, "output-name-of-255-bytes"),
    listed(replace(SMALL, output="os-error"), {PRECONDITION}, "output-the-os-refuses"),
    listed(replace(SMALL, output="os-error", overwrite=True), {PRECONDITION}, "output-the-os-refuses-overwrite"),
    listed(
        replace(SMALL, output="os-error", force_hard_link=True, byte_range=(1, 2)),
        {PRECONDITION},
        "output-the-os-refuses-range-copied",
    ),
    listed(
        replace(SMALL, output="os-error", force_hard_link=True),
        {PRECONDITION},
        "output-the-os-refuses-forced-hard-link",
    ),
    # timeout
    listed(replace(SMALL, timeout=(-1, 0)), {INVALID}, "timeout-negative"),
    listed(replace(SMALL, timeout=(0, 0)), {INVALID}, "timeout-zero"),
    listed(
        replace(SMALL, tag=unique(), timeout=(1, -fs.NANOS_MAX)), {Code.DEADLINE_EXCEEDED}, "timeout-1ns-mixed-signs"
    ),
    listed(replace(SMALL, tag=unique(), timeout=(0, 1)), {Code.DEADLINE_EXCEEDED}, "timeout-1ns"),
    listed(replace(SMALL, timeout=(HUNDRED_YEARS, 0)), {Code.OK}, "timeout-100-years"),
    listed(replace(SMALL, timeout=(HUNDRED_YEARS, 1000)), {INVALID}, "timeout-100-years-and-1us"),
    listed(replace(SMALL, timeout=(HUNDRED_YEARS + 1, 0)), {INVALID}, "timeout-100-years-and-1s"),
    listed(replace(SMALL, timeout=(fs.DURATION_MAX_SECONDS, 0)), {INVALID}, "timeout-duration-max"),
    listed(replace(SMALL, timeout=(fs.I64_MAX, 0)), {INVALID}, "timeout-i64-max"),
    listed(replace(SMALL, timeout=(HUNDRED_YEARS, 1)), {INVALID}, "timeout-100-years-and-1ns"),
    # piece_length
    listed(replace(SMALL, piece_length=0), {INVALID}, "piece-length-0"),
    listed(replace(SMALL, piece_length=1), {INVALID}, "piece-length-1"),
    listed(replace(SMALL, piece_length=fs.MIN_PIECE_LENGTH - 1), {INVALID}, "piece-length-1023"),
    listed(replace(SMALL, tag=unique(), piece_length=fs.MIN_PIECE_LENGTH), {Code.OK}, "piece-length-1024"),
    listed(replace(SMALL, tag=unique(), piece_length=fs.MAX_PIECE_LENGTH), {Code.OK}, "piece-length-1-gib"),
    listed(replace(SMALL, piece_length=fs.MAX_PIECE_LENGTH + 1), {INVALID}, "piece-length-1-gib-and-1"),
    listed(replace(SMALL, piece_length=fs.I64_MAX), {INVALID}, "piece-length-i64-max"),
    listed(replace(SMALL, piece_length=2**63), {INVALID}, "piece-length-2**63"),
    listed(replace(SMALL, piece_length=fs.U64_MAX), {INVALID}, "piece-length-u64-max"),
    # digest
    listed(replace(SMALL, digest="md5:0"), {INVALID}, "digest-md5"),
    listed(replace(SMALL, digest="right-sha256", output="new"), {Code.OK}, "digest-right"),
    listed(replace(SMALL, digest="right-sha512"), {Code.OK}, "digest-right-sha512"),
    listed(replace(SMALL, digest="right-crc32"), {Code.OK}, "digest-right-crc32"),
    listed(replace(SMALL, digest="right-sha256-upper-case"), {Code.OK}, "digest-right-upper-case"),
    listed(replace(SMALL, digest="wrong-sha256", output="new"), {PRECONDITION}, "digest-wrong-with-output"),
    listed(replace(SMALL, tag=unique(), digest="wrong-sha256"), {PRECONDITION}, "digest-wrong-without-output"),
    listed(replace(SMALL, tag=unique(), digest="right-sha256", byte_range=(10, 20)), {Code.OK}, "digest-right-range"),
    listed(
        replace(SMALL, tag=unique(), digest="range-sha256", byte_range=(10, 20), output="new"),
        {PRECONDITION},
        "digest-of-the-range-only",
    ),
    listed(replace(SMALL, digest="wrong-sha256", byte_range=(10, 20)), {PRECONDITION}, "digest-wrong-range"),
    listed(fs.DownloadPlan(target="empty.bin", digest="crc32:0"), {Code.OK}, "digest-of-an-empty-file"),
    listed(fs.DownloadPlan(target="empty.bin", digest="wrong-sha256"), {PRECONDITION}, "digest-wrong-empty-file"),
    # request_header
    listed(replace(SMALL, tag=unique(), headers={"Content-Length": "5"}), {INVALID}, "header-content-length"),
    *(
        listed(replace(SMALL, tag=unique(), headers={mixed_case(name): "1"}), {INVALID}, f"header-reserved-{name}")
        for name in fs.RESERVED_HEADERS
    ),
    # A Range header asks for a ranged download unless download.range is set (then it is ignored, as upstream).
    listed(
        replace(SMALL, tag=unique(), headers={"Range": "bytes=1-"}, byte_range=(10, 20), output="new"),
        {Code.OK},
        "header-Range-behind-download-range",
    ),
    listed(replace(SMALL, headers={"range": "bytes=0-"}, output="new"), {Code.OK}, "header-lowercase-range-whole"),
    listed(replace(SMALL, headers={"Range": "bytes=1"}, output="new"), {PRECONDITION}, "header-Range-malformed"),
    listed(replace(SMALL, headers={"Range": "bytes=10-5"}), {PRECONDITION}, "header-Range-reversed"),
    *(
        listed(replace(SMALL, tag=unique(), headers=headers), {INVALID}, f"header-illegal-{name}")
        for name, headers in (
            ("crlf-in-value", {"X-Injected": "v\r\nX-Smuggled: 1"}),
            ("lf-in-value", {"X-Injected": "\n"}),
            ("nul-in-value", {"X-Nul": "a\x00b"}),
            ("empty-name", {"": "v"}),
            ("space-in-name", {"X Bad": "v"}),
            ("colon-in-name", {"X-Bad:": "v"}),
            ("leading-newline-in-name", {"\nX-Bad": "v"}),
            ("non-ascii-name", {"X-\u00e9": "v"}),
            ("one-bad-of-three", {"X-A": "1", "X-B\r": "2", "X-C": "3"}),
        )
    ),
    listed(
        replace(SMALL, tag=unique(), headers={"X-Bad\n": "v"}),
        {INVALID},
        "header-newline-after-the-name",
    ),
    listed(replace(SMALL, tag=unique(), headers={"X-Fuzz": "\x01\x7f a\tb"}), {INVALID}, "header-value-controls"),
    listed(replace(SMALL, tag=unique(), headers={"X-Fuzz": "a\tb c"}), {Code.OK}, "header-value-inner-blanks"),
    listed(replace(SMALL, tag=unique(), headers={"X-Fuzz": ""}), {Code.OK}, "header-value-empty"),
    listed(replace(SMALL, tag=unique(), headers={"X-Fuzz": "\u00e9"}), {INVALID}, "header-value-non-ascii"),
    *(
        listed(replace(SMALL, tag=unique(), headers={"X-Fuzz": value}), {INVALID}, name)
        for name, value in (
            ("header-value-leading-space", " v"),
            ("header-value-trailing-tab", "v\t"),
            ("header-value-vertical-tab", "a\x0bb"),
            ("header-value-form-feed", "a\x0cb"),
        )
    ),
]


@pytest.mark.parametrize(("plan", "expected"), DOWNLOAD_CASES)
def test_listed_downloads(fuzz_env: Env, plan: fs.DownloadPlan, expected: set[grpc.StatusCode]) -> None:
    run_download_plan(fuzz_env, DOWNLOAD + "DownloadTask", plan, expected)


def test_wrong_digest_for_a_cached_task(fuzz_env: Env) -> None:
    """A digest is checked against a task the cache already holds too (no origin involved)."""
    run_download_plan(fuzz_env, DOWNLOAD + "DownloadTask", SMALL, {Code.OK})
    run_download_plan(fuzz_env, DOWNLOAD + "DownloadTask", replace(SMALL, digest="wrong-sha256"), {PRECONDITION})


def test_non_ascii_header_value_is_refused_for_a_cached_task(fuzz_env: Env) -> None:
    """The same header as the case "header-value-non-ascii", for a task the cache already holds."""
    fuzz_env.ensure_known()
    plan = replace(SMALL, piece_length=SMALL_PIECE_LENGTH, headers={"X-Fuzz": "\u00e9"})
    run_download_plan(fuzz_env, DOWNLOAD + "DownloadTask", plan, {INVALID})


def number(piece: common_pb2.Piece) -> int:
    return piece.number


def plant_blob(fuzz_env: Env, registry: str, claimed: str, content: bytes) -> str:
    """Serve ``content`` from the origin as blob ``sha256:<claimed>`` of a registry; returns its URL."""
    blob = fuzz_env.origin.root / "v2" / registry / "blobs" / f"sha256:{claimed}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    fuzz_env.own.update({blob, blob.parent, blob.parent.parent, blob.parent.parent.parent})
    return fuzz_env.origin.url(f"v2/{registry}/blobs/sha256:{claimed}")


def test_blob_digest_task_is_not_cached_with_other_content(fuzz_env: Env) -> None:
    """The task a blob digest names never holds other bytes: the real blob, from another registry, is served."""
    layer = b"the layer a registry would serve " + unique().encode()
    claimed = hashlib.sha256(layer).hexdigest()
    forged = plant_blob(fuzz_env, "forger", claimed, b"other bytes under the layer's name")
    genuine = plant_blob(fuzz_env, "genuine", claimed, layer)
    try:
        # How this call ends is test_blob_digest_task_id_is_checked_against_the_content's business.
        forged_download = common_pb2.Download(url=forged, enable_task_id_based_blob_digest=True)
        fuzz_env.call(DOWNLOAD + "DownloadTask", dfdaemon_pb2.DownloadTaskRequest(download=forged_download))
        # That call may end before the job has checked the content: wait for the task's verdict.
        stat_request = dfdaemon_pb2.StatLocalTaskRequest(task_id=claimed)
        deadline = time.monotonic() + 5
        while True:
            outcome = fuzz_env.call(DOWNLOAD + "StatLocalTask", stat_request)
            expect(fuzz_env, outcome, rpc_at(DOWNLOAD + "StatLocalTask"), {Code.OK, Code.NOT_FOUND}, stat_request)
            if outcome.code is Code.NOT_FOUND:
                break
            answer = dfdaemon_pb2.StatLocalTaskResponse.FromString(outcome.responses[0])
            assert not answer.HasField("finished_at"), "the forged content was cached under the blob's id"
            if answer.HasField("failed_at"):
                break
            assert time.monotonic() < deadline, f"the forged task neither failed nor finished: {answer}"
            time.sleep(0.05)
        download = common_pb2.Download(url=genuine, enable_task_id_based_blob_digest=True, need_piece_content=True)
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
        outcome = fuzz_env.call(DOWNLOAD + "DownloadTask", request)
        expect(fuzz_env, outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.OK}, request)
        responses = [dfdaemon_pb2.DownloadTaskResponse.FromString(raw) for raw in outcome.responses]
        assert {response.task_id for response in responses} == {claimed}
        pieces = sorted((response.download_piece_finished_response.piece for response in responses[1:]), key=number)
        assert b"".join(piece.content for piece in pieces) == layer
    finally:
        fuzz_env.call(CACHE + "EvictTask", ext_pb2.EvictTaskRequest(task_id=claimed, force=True))


def test_blob_digest_task_id_is_checked_against_the_content(fuzz_env: Env) -> None:
    claimed = hashlib.sha256(b"the layer a registry would serve").hexdigest()
    url = plant_blob(fuzz_env, "fuzz", claimed, b"other bytes under the layer's name")
    plan = fs.DownloadPlan(target="", url=url, blob_digest_ids=True, output="new")
    try:
        run_download_plan(fuzz_env, DOWNLOAD + "DownloadTask", plan, {Code.DATA_LOSS})
    finally:
        fuzz_env.call(CACHE + "EvictTask", ext_pb2.EvictTaskRequest(task_id=claimed, force=True))


class _RangeLiar(BaseHTTPRequestHandler):
    """Answers every ranged GET with 206, but for the range one byte further on than the one asked (saying so in
    Content-Range), until ``server.honest`` is set."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body: bytes = self.server.body
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if match is None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        start, end = int(match.group(1)), min(int(match.group(2)), len(body) - 1)
        if not self.server.honest:
            start, end = start + 1, min(end + 1, len(body) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(body[start : end + 1])


def test_a_206_for_another_range_is_an_origin_error(fuzz_env: Env) -> None:
    """An origin answering 206 with a Content-Range other than the one asked for fails the download; no wrong
    piece stays in the cache (the same URL, answered honestly afterwards, gives the real bytes)."""
    content = fuzz_env.files["small.bin"]
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _RangeLiar)
    server.daemon_threads = True
    server.body, server.honest = content, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/liar.bin"
        download = common_pb2.Download(url=url, piece_length=SMALL_PIECE_LENGTH, need_piece_content=True)
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
        outcome = fuzz_env.call(DOWNLOAD + "DownloadTask", request)
        expect(fuzz_env, outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.INTERNAL}, request)
        assert "range" in outcome.details.lower(), outcome.details
        server.honest = True
        outcome = fuzz_env.call(DOWNLOAD + "DownloadTask", request)
        expect(fuzz_env, outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.OK}, request)
        responses = [dfdaemon_pb2.DownloadTaskResponse.FromString(raw) for raw in outcome.responses]
        pieces = sorted((response.download_piece_finished_response.piece for response in responses[1:]), key=number)
        assert b"".join(piece.content for piece in pieces) == content
        task_id = responses[0].task_id
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    fuzz_env.call(CACHE + "EvictTask", ext_pb2.EvictTaskRequest(task_id=task_id, force=True))


def test_download_timeout_expiring_while_the_client_reads(fuzz_env: Env) -> None:
    """A client that reads slowly: the daemon blocks handing it pieces when its download.timeout passes."""
    download = common_pb2.Download(
        url=fuzz_env.origin.url("big.bin"), piece_length=1024 * 1024, need_piece_content=True, tag=unique()
    )
    fuzz_env.must(DOWNLOAD + "DownloadTask", dfdaemon_pb2.DownloadTaskRequest(download=download))  # cached: no origin
    download.timeout.CopyFrom(Duration(nanos=500_000_000))
    request = dfdaemon_pb2.DownloadTaskRequest(download=download)
    stream = fuzz_env.channels["unix"].unary_stream(
        DOWNLOAD + "DownloadTask", request_serializer=as_is, response_deserializer=as_is
    )
    deadline, started = 6.0, time.monotonic()
    responses: list[bytes] = []
    call = stream(request.SerializeToString(), timeout=deadline)
    try:
        responses.append(next(call))
        time.sleep(2)  # meanwhile the daemon fills gRPC's windows and waits to send more
        responses.extend(call)
        outcome = Outcome(Code.OK, "", tuple(responses), time.monotonic() - started, deadline)
    except grpc.RpcError as error:
        failed = cast(grpc.Call, error)
        outcome = Outcome(failed.code(), failed.details() or "", tuple(responses), time.monotonic() - started, deadline)
    finally:
        call.cancel()
    expect(fuzz_env, outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.DEADLINE_EXCEEDED}, request)


@pytest.mark.parametrize(("path", "request_", "code"), long_input_cases(DOWNLOAD))
def test_long_input_echoed_in_errors(fuzz_env: Env, path: str, request_: Any, code: grpc.StatusCode) -> None:
    run_long_input(fuzz_env, path, request_, code)


SHARED_ENV_MUTATIONS = [path for path in rpc_paths(DOWNLOAD, download_task=False) if path not in NOT_PROBED]


@pytest.mark.parametrize("path", SHARED_ENV_MUTATIONS)
@fuzz(25)
@given(data=st.data())
def test_mutated_requests(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(fuzz_env, path, data)


@pytest.fixture
def leaving_env(tmp_path: Path) -> Iterator[Env]:
    """A daemon of its own for RPCs that take it out of the cluster."""
    with fuzz_environment(tmp_path) as leaving:
        yield leaving


@pytest.mark.parametrize("path", sorted(NOT_PROBED))
@fuzz(25)
@given(data=st.data())
def test_mutated_requests_that_leave_the_cluster(leaving_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(leaving_env, path, data)
    assert_serving(leaving_env)


@pytest.mark.parametrize("path", rpc_paths(DOWNLOAD, download_task=True))
@fuzz(15)
@given(data=st.data())
def test_mutated_download_requests(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(fuzz_env, path, data)


@pytest.mark.parametrize("path", rpc_paths(DOWNLOAD))
@fuzz(8)
@given(data=st.data())
def test_undecodable_requests_are_invalid_argument(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_undecodable(fuzz_env, path, data)


@pytest.mark.parametrize(("transport", "path"), unknown_methods(DOWNLOAD, "/no.such.Service/"))
def test_unknown_methods_are_unimplemented(fuzz_env: Env, transport: str, path: str) -> None:
    check_unknown_method(fuzz_env, transport, path)
