"""Bad input on ``dfdaemon.v2.DfdaemonUpload`` (TCP): task ids, piece numbers, DownloadTask from the network,
byte-level mutations. What every call must satisfy is said in ``tests/fuzz_rpc_support.py``."""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import replace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dfdaemon.api import common_pb2, dfdaemon_pb2
from tests import fuzz_strategies as fs
from tests.fuzz_downloads import SMALL, plan_url, run_download_plan
from tests.fuzz_rpc_support import (
    DOWNLOAD,
    FUZZ_MARKS,
    INVALID,
    PRECONDITION,
    SMALL_PIECE_LENGTH,
    UPLOAD,
    Code,
    Env,
    TaskIdCase,
    as_is,
    check_unknown_method,
    expect,
    fuzz,
    rpc_at,
    rpc_paths,
    run_listed_task_ids,
    run_mutated,
    run_task_id_case,
    run_undecodable,
    stays_on_this_machine,
    task_id_cases,
    unknown_methods,
)

pytestmark = FUZZ_MARKS


@pytest.mark.parametrize("case", task_id_cases(UPLOAD))
def test_listed_task_ids(fuzz_env: Env, case: TaskIdCase) -> None:
    run_listed_task_ids(fuzz_env, case)


@pytest.mark.parametrize("case", task_id_cases(UPLOAD))
@fuzz(30)
@given(task_id=fs.task_ids())
def test_fuzzed_task_ids(fuzz_env: Env, case: TaskIdCase, task_id: str) -> None:
    run_task_id_case(fuzz_env, case, task_id)


def piece_metadata_digest(number: int, offset: int, length: int, digest: str) -> str:
    header = struct.pack(">IQQ", number, offset, length)
    return f"crc32:{zlib.crc32(digest.encode(), zlib.crc32(header))}"


def check_piece_numbers(fuzz_env: Env, single: int, interested: list[int]) -> None:
    task = fuzz_env.ensure_known()
    content = fuzz_env.files["small.bin"]
    count = -(-len(content) // SMALL_PIECE_LENGTH)

    request = dfdaemon_pb2.DownloadPieceRequest(host_id="fuzz", task_id=task, piece_number=single)
    outcome = fuzz_env.call(UPLOAD + "DownloadPiece", request)
    expect(
        fuzz_env, outcome, rpc_at(UPLOAD + "DownloadPiece"), {Code.OK} if single < count else {Code.NOT_FOUND}, request
    )
    if outcome.code is Code.OK:
        answer = dfdaemon_pb2.DownloadPieceResponse.FromString(outcome.responses[0])
        offset = single * SMALL_PIECE_LENGTH
        assert answer.piece.content == content[offset : offset + SMALL_PIECE_LENGTH]
        assert answer.piece.digest == f"crc32:{zlib.crc32(answer.piece.content)}"
        metadata = piece_metadata_digest(single, offset, len(answer.piece.content), answer.piece.digest)
        assert answer.digest == metadata

    sync = dfdaemon_pb2.SyncPiecesRequest(host_id="fuzz", task_id=task, interested_piece_numbers=interested)
    outcome = fuzz_env.call(UPLOAD + "SyncPieces", sync)
    past_end = any(number >= count for number in interested)
    expect(fuzz_env, outcome, rpc_at(UPLOAD + "SyncPieces"), {Code.OUT_OF_RANGE} if past_end else {Code.OK}, sync)
    if outcome.code is Code.OK:
        numbers = sorted(dfdaemon_pb2.SyncPiecesResponse.FromString(raw).number for raw in outcome.responses)
        wanted = set(interested) if interested else set(range(count))
        assert numbers == sorted(wanted & set(range(count)))


def test_listed_piece_numbers(fuzz_env: Env) -> None:
    for number in (0, 4, 5, 6, fs.I32_MAX, fs.I32_MAX + 1, fs.U32_MAX - 1, fs.U32_MAX):
        check_piece_numbers(fuzz_env, number, [number])
    check_piece_numbers(fuzz_env, 0, [])
    check_piece_numbers(fuzz_env, 0, [fs.U32_MAX, 0, 0, 4])


@fuzz(60)
@given(single=fs.piece_numbers(), interested=st.lists(fs.piece_numbers(), max_size=6))
def test_fuzzed_piece_numbers(fuzz_env: Env, single: int, interested: list[int]) -> None:
    check_piece_numbers(fuzz_env, single, interested)


def test_sync_pieces_past_the_end_of_a_task_in_progress(fuzz_env: Env) -> None:
    """The piece count is known once the download has started: a piece past it is OUT_OF_RANGE at once."""
    fuzz_env.origin.fault("slow.bin", delay=1)  # every origin request for it waits a second: about 7 s in all
    download = common_pb2.Download(
        url=fuzz_env.origin.url("slow.bin"), piece_length=1024, concurrent_piece_count=1, tag=uuid.uuid4().hex
    )
    stream = fuzz_env.channels["unix"].unary_stream(
        DOWNLOAD + "DownloadTask",
        request_serializer=as_is,
        response_deserializer=dfdaemon_pb2.DownloadTaskResponse.FromString,
    )
    call = stream(dfdaemon_pb2.DownloadTaskRequest(download=download).SerializeToString(), timeout=60)
    try:
        task_id = next(iter(call)).task_id
        request = dfdaemon_pb2.SyncPiecesRequest(host_id="fuzz", task_id=task_id, interested_piece_numbers=[fs.U32_MAX])
        outcome = fuzz_env.call(UPLOAD + "SyncPieces", request, timeout=3.0)
        expect(fuzz_env, outcome, rpc_at(UPLOAD + "SyncPieces"), {Code.OUT_OF_RANGE}, request)
        stat_request = dfdaemon_pb2.StatLocalTaskRequest(task_id=task_id)
        answer = dfdaemon_pb2.StatLocalTaskResponse.FromString(
            fuzz_env.must(DOWNLOAD + "StatLocalTask", stat_request).responses[0]
        )
        assert not answer.HasField("finished_at"), "the task finished already: the case tested nothing"
    finally:
        call.cancel()
        fuzz_env.origin.fault("slow.bin")


@fuzz(35)
@given(plan=fs.download_plans(with_output=False))
def test_fuzzed_download_task_over_tcp(fuzz_env: Env, plan: fs.DownloadPlan) -> None:
    assume(stays_on_this_machine(plan_url(fuzz_env, plan)))
    run_download_plan(fuzz_env, UPLOAD + "DownloadTask", plan)


@pytest.mark.parametrize("overwrite", [False, True])
def test_download_task_over_tcp_writes_no_file(fuzz_env: Env, overwrite: bool) -> None:
    """Peers on the network may not make the daemon write files (a remote arbitrary file write otherwise)."""
    for kind in ("new", "existing", "symlink-outside", "dangling-symlink-outside", "os-error"):
        plan = replace(SMALL, output=kind, overwrite=overwrite)
        outcome = run_download_plan(
            fuzz_env, UPLOAD + "DownloadTask", plan, {INVALID, PRECONDITION, Code.PERMISSION_DENIED}
        )
        assert outcome.code is not Code.OK


@pytest.mark.parametrize("path", rpc_paths(UPLOAD, download_task=False))
@fuzz(25)
@given(data=st.data())
def test_mutated_requests(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(fuzz_env, path, data)


@pytest.mark.parametrize("path", rpc_paths(UPLOAD, download_task=True))
@fuzz(15)
@given(data=st.data())
def test_mutated_download_requests(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(fuzz_env, path, data)


@pytest.mark.parametrize("path", rpc_paths(UPLOAD))
@fuzz(8)
@given(data=st.data())
def test_undecodable_requests_are_invalid_argument(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_undecodable(fuzz_env, path, data)


@pytest.mark.parametrize(("transport", "path"), unknown_methods(UPLOAD))
def test_unknown_methods_are_unimplemented(fuzz_env: Env, transport: str, path: str) -> None:
    check_unknown_method(fuzz_env, transport, path)
