"""Bad input on the scheduler stub's ``scheduler.v2.Scheduler`` (TCP): hosts, lookups, AnnouncePeer streams
checked against a model of the stub, byte-level mutations. What every call must satisfy is said in
``tests/fuzz_rpc_support.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import assume, given
from hypothesis import strategies as st

from dfdaemon.api import common_pb2, errordetails_pb2, scheduler_pb2
from tests import fuzz_strategies as fs
from tests.fuzz_rpc_support import (
    DAEMON_HOST_ID,
    FUZZ_HOST,
    FUZZ_MARKS,
    INVALID,
    LONG,
    PRECONDITION,
    SCHEDULER,
    Code,
    Env,
    TaskIdCase,
    check_unknown_method,
    duration,
    expect,
    fuzz,
    long_input_cases,
    rpc_at,
    rpc_paths,
    run_listed_task_ids,
    run_long_input,
    run_mutated,
    run_task_id_case,
    run_undecodable,
    task_id_cases,
    unique,
    unknown_methods,
)

pytestmark = FUZZ_MARKS


@pytest.mark.parametrize("case", task_id_cases(SCHEDULER))
def test_listed_task_ids(fuzz_env: Env, case: TaskIdCase) -> None:
    run_listed_task_ids(fuzz_env, case)


@pytest.mark.parametrize("case", task_id_cases(SCHEDULER))
@fuzz(30)
@given(task_id=fs.task_ids())
def test_fuzzed_task_ids(fuzz_env: Env, case: TaskIdCase, task_id: str) -> None:
    run_task_id_case(fuzz_env, case, task_id)


# --------------------------------------------------------------------------- scheduler: unary RPCs

scheduler_ids = st.one_of(
    st.sampled_from(fs.HOSTILE_TEXT),
    st.text(max_size=24),
    st.text(max_size=1024),
    st.sampled_from([LONG, "\u00e9" * 10 * 1024, "line\n" * 4096]),
)


@fuzz(50)
@given(
    host_id=scheduler_ids,
    ip=st.one_of(st.sampled_from(fs.HOSTILE_TEXT), st.ip_addresses().map(str), st.text(max_size=20)),
    port=st.integers(fs.I32_MIN, fs.I32_MAX),
    host_type=st.integers(0, fs.U32_MAX),
    hostname=scheduler_ids,
    interval=st.none() | fs.durations(),
)
def test_fuzzed_announce_host(
    fuzz_env: Env, host_id: str, ip: str, port: int, host_type: int, hostname: str, interval: tuple[int, int] | None
) -> None:
    assume(host_id not in {FUZZ_HOST, DAEMON_HOST_ID})
    host = common_pb2.Host(id=host_id, ip=ip, port=port, type=host_type, hostname=hostname)
    request = scheduler_pb2.AnnounceHostRequest(host=host)
    if interval is not None:
        request.interval.CopyFrom(duration(interval))
    refused = not host_id or not ip
    expect(
        fuzz_env,
        fuzz_env.call(SCHEDULER + "AnnounceHost", request),
        rpc_at(SCHEDULER + "AnnounceHost"),
        {INVALID} if refused else {Code.OK},
        request,
    )
    listing = scheduler_pb2.ListHostsRequest(type=host_type)
    outcome = fuzz_env.call(SCHEDULER + "ListHosts", listing)
    expect(fuzz_env, outcome, rpc_at(SCHEDULER + "ListHosts"), {Code.OK}, listing)
    hosts = scheduler_pb2.ListHostsResponse.FromString(outcome.responses[0]).hosts
    assert all(listed.type == host_type for listed in hosts)
    if not refused and (interval is None or interval[0] * 10**9 + interval[1] >= 10**9):
        assert host_id in {listed.id for listed in hosts}
    if host_id:
        fuzz_env.must(SCHEDULER + "DeleteHost", scheduler_pb2.DeleteHostRequest(host_id=host_id))


@fuzz(50)
@given(
    host_id=scheduler_ids,
    task_id=scheduler_ids,
    peer_id=scheduler_ids,
    host_type=st.none() | st.integers(0, fs.U32_MAX),
)
def test_fuzzed_scheduler_lookups(
    fuzz_env: Env, host_id: str, task_id: str, peer_id: str, host_type: int | None
) -> None:
    assume(host_id not in {FUZZ_HOST, DAEMON_HOST_ID})
    cases: list[tuple[str, Message, set[grpc.StatusCode]]] = [
        (
            "StatPeer",
            scheduler_pb2.StatPeerRequest(host_id=host_id, task_id=task_id, peer_id=peer_id),
            {Code.OK, Code.NOT_FOUND},
        ),
        (
            "DeletePeer",
            scheduler_pb2.DeletePeerRequest(host_id=host_id, task_id=task_id, peer_id=peer_id),
            {INVALID} if not peer_id else {Code.OK},
        ),
        ("StatTask", scheduler_pb2.StatTaskRequest(host_id=host_id, task_id=task_id), {Code.OK, Code.NOT_FOUND}),
        (
            "DeleteTask",
            scheduler_pb2.DeleteTaskRequest(host_id=host_id, task_id=task_id),
            {INVALID} if not (host_id and task_id) else {Code.OK},
        ),
        ("DeleteHost", scheduler_pb2.DeleteHostRequest(host_id=host_id), {INVALID} if not host_id else {Code.OK}),
        ("ListHosts", scheduler_pb2.ListHostsRequest(type=host_type), {Code.OK}),
    ]
    for name, request, allowed in cases:
        expect(fuzz_env, fuzz_env.call(SCHEDULER + name, request), rpc_at(SCHEDULER + name), allowed, request)


# --------------------------------------------------------------------------- scheduler: AnnouncePeer streams


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def unknown_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def announce_message(step: fs.AnnounceStep, registered_peer: str, nonce: str) -> bytes:
    """One AnnouncePeerRequest: the header, then the member the step names (with fuzzed fields).

    Task ids get the stream's nonce (an empty one stays empty): the stub remembers tasks across streams.
    """
    header = scheduler_pb2.AnnouncePeerRequest(
        host_id=FUZZ_HOST if step.host == "announced" else step.host,
        task_id=f"{step.task}#{nonce}" if step.task else "",
        peer_id=registered_peer if step.peer == "registered" else step.peer,
    )
    piece = common_pb2.Piece(
        number=step.number,
        parent_id=step.text,
        offset=step.number,
        length=step.number,
        digest=step.text,
        traffic_type=common_pb2.TrafficType.ValueType(step.number % 7 - 3),
    )
    kind = step.kind
    if kind == "register_peer_request":
        download = common_pb2.Download(
            url=step.text, disable_back_to_source=step.flag, need_back_to_source=step.number % 2 == 0
        )
        if step.number % 3 == 0:
            download.actual_content_length = step.number % 5
        header.register_peer_request.download.CopyFrom(download)
    elif kind == "download_peer_started_request":
        header.download_peer_started_request.SetInParent()
    elif kind == "download_peer_back_to_source_started_request":
        header.download_peer_back_to_source_started_request.description = step.text
    elif kind == "reschedule_peer_request":
        parent = common_pb2.Peer(id=step.text, state=step.text)
        header.reschedule_peer_request.candidate_parents.append(parent)
        header.reschedule_peer_request.description = step.text
    elif kind == "download_peer_finished_request":
        header.download_peer_finished_request.SetInParent()
    elif kind == "download_peer_back_to_source_finished_request":
        header.download_peer_back_to_source_finished_request.SetInParent()
    elif kind == "download_peer_failed_request":
        header.download_peer_failed_request.description = step.text
    elif kind == "download_peer_back_to_source_failed_request":
        header.download_peer_back_to_source_failed_request.description = step.text
    elif kind == "download_piece_finished_request":
        header.download_piece_finished_request.piece.CopyFrom(piece)
    elif kind == "download_piece_back_to_source_finished_request":
        header.download_piece_back_to_source_finished_request.piece.CopyFrom(piece)
    elif kind == "download_piece_failed_request":
        failed = header.download_piece_failed_request
        failed.piece_number, failed.parent_id, failed.temporary = step.number, step.text, step.flag
    elif kind == "download_piece_back_to_source_failed_request":
        origin_failed = header.download_piece_back_to_source_failed_request
        origin_failed.piece_number = step.number
        if step.flag:
            backend = errordetails_pb2.Backend(
                message=step.text, header={step.text: step.text}, status_code=step.number % 1000
            )
            origin_failed.backend.CopyFrom(backend)
        else:
            origin_failed.unknown.message = step.text
    raw = header.SerializeToString()
    if kind == "unknown":
        raw += unknown_field(16 + step.number % 1000, step.garbage)
    return raw


def simulate_announce(steps: Sequence[fs.AnnounceStep], registered_peer: str) -> tuple[set[grpc.StatusCode], int]:
    """What the stub answers a stream: the status, and how many responses come before an OK end.

    Every fuzzed peer lives on the one fuzz host, so no other fuzzed peer is ever its parent: a peer that may
    go back to source is sent there, one that may not gets empty parent lists until its 4th attempt fails.
    """
    current: str | None = None
    may_back_to_source, attempts, answers = True, 0, 0
    content_lengths: dict[str, int] = {}  # what registrations in this stream said about each task
    for item in steps:
        peer = registered_peer if item.peer == "registered" else item.peer
        host = FUZZ_HOST if item.host == "announced" else item.host
        if item.kind == "register_peer_request":
            if not peer or not host or not item.task:
                return {INVALID}, answers
            if host != FUZZ_HOST:
                return {PRECONDITION}, answers
            if item.number % 3 == 0:
                content_lengths[item.task] = item.number % 5
            current, may_back_to_source, answers = peer, not item.flag, answers + 1
            attempts = 0 if content_lengths.get(item.task) == 0 or may_back_to_source else 1
            continue
        if current is None or peer != current:
            return {PRECONDITION}, answers
        if item.kind == "reschedule_peer_request":
            attempts += 1
            if attempts >= 4 and not may_back_to_source:
                return {PRECONDITION}, answers
            answers += 1
        elif item.kind in fs.TERMINAL_KINDS:
            return {Code.OK}, answers
        elif item.kind in {"none", "unknown"}:
            return {INVALID}, answers
    return {Code.OK}, answers


def run_announce_stream(fuzz_env: Env, steps: Sequence[fs.AnnounceStep]) -> None:
    fuzz_env.announce_fuzz_host()
    nonce = unique()
    registered_peer = f"fuzz-peer-{nonce}"
    messages = [announce_message(item, registered_peer, nonce) for item in steps]
    expected, answers = simulate_announce(steps, registered_peer)
    outcome = fuzz_env.call(SCHEDULER + "AnnouncePeer", messages)
    shown = [scheduler_pb2.AnnouncePeerRequest.FromString(raw) for raw in messages]
    expect(fuzz_env, outcome, rpc_at(SCHEDULER + "AnnouncePeer"), expected, shown)
    if outcome.code is Code.OK:
        assert len(outcome.responses) == answers, f"{len(outcome.responses)} answers, expected {answers}"
        for raw in outcome.responses:
            assert scheduler_pb2.AnnouncePeerResponse.FromString(raw).WhichOneof("response") is not None


def announce_step(kind: str, peer: str = "registered", host: str = "announced", **changes: Any) -> fs.AnnounceStep:
    base = fs.AnnounceStep(kind, peer, host, task="fuzz-task", number=1, text="", flag=False, garbage=b"\x01")
    return replace(base, **changes)


REGISTER = announce_step("register_peer_request")
ANNOUNCE_CASES = {
    "empty-stream": [],
    "missing-register": [
        announce_step("download_peer_started_request"),
        announce_step("download_peer_finished_request"),
    ],
    "only-a-terminal-report": [announce_step("download_peer_finished_request")],
    "garbage-oneof-first": [announce_step("unknown")],
    "no-oneof-first": [announce_step("none")],
    "garbage-oneof-after-register": [REGISTER, announce_step("unknown", number=3)],
    "no-oneof-after-register": [REGISTER, announce_step("none")],
    "wrong-peer-id": [REGISTER, announce_step("download_peer_started_request", peer="someone-else")],
    "empty-peer-id": [REGISTER, announce_step("download_piece_finished_request", peer="")],
    "register-empty-ids": [announce_step("register_peer_request", peer="", host="", task="")],
    "register-empty-task": [announce_step("register_peer_request", task="")],
    "register-unannounced-host": [announce_step("register_peer_request", host="never-announced")],
    "register-10k-ids": [announce_step("register_peer_request", task="t" * 10 * 1024, peer="p" * 10 * 1024)],
    "register-nul-ids": [announce_step("register_peer_request", task="\x00", peer="\x00")],
    "reports-after-the-terminal-one": [
        REGISTER,
        announce_step("download_peer_failed_request"),
        announce_step("download_peer_started_request"),
    ],
    "reschedule-without-source": [announce_step("register_peer_request", flag=True)]
    + [announce_step("reschedule_peer_request")] * 4,
    "pieces-out-of-range": [
        REGISTER,
        announce_step("download_piece_finished_request", number=fs.U32_MAX),
        announce_step("download_piece_back_to_source_failed_request", number=fs.U32_MAX, flag=True),
        announce_step("download_piece_failed_request", number=fs.U32_MAX, text="no-such-parent"),
        announce_step("download_peer_back_to_source_finished_request"),
    ],
}


@pytest.mark.parametrize("name", list(ANNOUNCE_CASES))
def test_listed_announce_streams(fuzz_env: Env, name: str) -> None:
    run_announce_stream(fuzz_env, ANNOUNCE_CASES[name])


@fuzz(80)
@given(steps=fs.announce_streams())
def test_fuzzed_announce_peer_streams(fuzz_env: Env, steps: list[fs.AnnounceStep]) -> None:
    run_announce_stream(fuzz_env, steps)


@pytest.mark.parametrize(("path", "request_", "code"), long_input_cases(SCHEDULER))
def test_long_input_echoed_in_errors(fuzz_env: Env, path: str, request_: Any, code: grpc.StatusCode) -> None:
    run_long_input(fuzz_env, path, request_, code)


@pytest.mark.parametrize("path", rpc_paths(SCHEDULER))
@fuzz(25)
@given(data=st.data())
def test_mutated_requests(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(fuzz_env, path, data)


@pytest.mark.parametrize("path", rpc_paths(SCHEDULER))
@fuzz(8)
@given(data=st.data())
def test_undecodable_requests_are_invalid_argument(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_undecodable(fuzz_env, path, data)


@pytest.mark.parametrize(("transport", "path"), unknown_methods(SCHEDULER))
def test_unknown_methods_are_unimplemented(fuzz_env: Env, transport: str, path: str) -> None:
    check_unknown_method(fuzz_env, transport, path)
