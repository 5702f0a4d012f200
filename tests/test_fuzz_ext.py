"""Bad input on our extension ``dfdaemon.ext.v1`` (unix socket): ``Use`` (holds, leases) and ``Cache`` (GC,
eviction). What every call must satisfy is said in ``tests/fuzz_rpc_support.py``."""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from dfdaemon.api import common_pb2
from dfdaemon.api import dfdaemon_ext_pb2 as ext_pb2
from tests import fuzz_strategies as fs
from tests.fuzz_rpc_support import (
    CACHE,
    FUZZ_MARKS,
    HOLDER_PREFIX,
    HUNDRED_YEARS,
    INVALID,
    SMALL_PIECE_LENGTH,
    TASK_ID,
    USE,
    Code,
    Env,
    Outcome,
    TaskIdCase,
    check_unknown_method,
    duration,
    expect,
    fuzz,
    long_input_cases,
    resolve,
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


@pytest.mark.parametrize("case", task_id_cases(USE, CACHE))
def test_listed_task_ids(fuzz_env: Env, case: TaskIdCase) -> None:
    run_listed_task_ids(fuzz_env, case)


@pytest.mark.parametrize("case", task_id_cases(USE, CACHE))
@fuzz(30)
@given(task_id=fs.task_ids())
def test_fuzzed_task_ids(fuzz_env: Env, case: TaskIdCase, task_id: str) -> None:
    run_task_id_case(fuzz_env, case, task_id)


# --------------------------------------------------------------------------- Use


def task_ref(fuzz_env: Env, plan: fs.TaskRefPlan) -> tuple[ext_pb2.TaskRef, str]:
    """The TaskRef for a plan and what it names: "invalid", "absent", "present" or "unknown" (invalid or absent)."""
    if plan.kind == "none":
        return ext_pb2.TaskRef(), "invalid"
    if plan.kind == "task_id":
        task_id = resolve(fuzz_env, plan.value)
        state = "present" if task_id == fuzz_env.known_task else "absent" if TASK_ID.fullmatch(task_id) else "invalid"
        return ext_pb2.TaskRef(task_id=task_id), state
    if plan.kind == "blob_digest":
        digest = plan.value.replace(fs.KNOWN_TASK, fuzz_env.ensure_known())
        match = re.fullmatch(r"(sha256|sha512):([0-9a-f]+)", digest)
        valid = match is not None and len(match.group(2)) == {"sha256": 64, "sha512": 128}[match.group(1)]
        state = "invalid" if not valid else "present" if digest.endswith(fuzz_env.known_task) else "absent"
        return ext_pb2.TaskRef(blob_digest=digest), state
    if plan.value == fs.KNOWN_TASK:
        fuzz_env.ensure_known()
        download = common_pb2.Download(url=fuzz_env.origin.url("small.bin"), piece_length=SMALL_PIECE_LENGTH)
        return ext_pb2.TaskRef(download=download), "present"
    state = "invalid" if plan.value == "" else "unknown"
    return ext_pb2.TaskRef(download=common_pb2.Download(url=plan.value)), state


def ttl_refused(ttl: tuple[int, int] | None) -> bool:
    return ttl is not None and not fs.duration_valid(ttl)


def release_all(fuzz_env: Env, holder: str) -> None:
    if not fs.holder_refused(holder):
        fuzz_env.must(USE + "Sync", ext_pb2.SyncRequest(holder=holder))


def use_expectation(rpc_name: str, holder: str, states: list[str], ttl: tuple[int, int] | None) -> set[grpc.StatusCode]:
    invalid = fs.holder_refused(holder) or ttl_refused(ttl) or "invalid" in states
    if rpc_name in {"Acquire", "Release"} and not states:
        invalid = True
    if invalid:
        return {INVALID}
    if "unknown" in states:
        return {INVALID, Code.NOT_FOUND} if rpc_name == "Acquire" else {INVALID, Code.OK}
    if rpc_name == "Acquire" and "absent" in states:
        return {Code.NOT_FOUND}
    return {Code.OK}


def run_use_case(
    fuzz_env: Env, rpc_name: str, holder: str, refs: list[fs.TaskRefPlan], ttl: tuple[int, int] | None
) -> Outcome:
    built = [task_ref(fuzz_env, ref) for ref in refs]
    messages = [message for message, _ in built]
    states = [state for _, state in built]
    lease = duration(ttl) if ttl is not None else None
    request: Message
    if rpc_name == "Acquire":
        request = ext_pb2.AcquireRequest(holder=holder, tasks=messages, ttl=lease)
    elif rpc_name == "Release":
        request = ext_pb2.ReleaseRequest(holder=holder, tasks=messages)
        ttl = None
    elif rpc_name == "Sync":
        request = ext_pb2.SyncRequest(holder=holder, tasks=messages, ttl=lease)
    else:
        request = ext_pb2.KeepAliveRequest(holder=holder, ttl=lease)
        states = []
    try:
        outcome = fuzz_env.call(USE + rpc_name, request)
        expect(fuzz_env, outcome, rpc_at(USE + rpc_name), use_expectation(rpc_name, holder, states, ttl), request)
        if outcome.code is Code.OK and rpc_name == "Acquire":
            holds = ext_pb2.AcquireResponse.FromString(outcome.responses[0]).holds
            assert {hold.holder for hold in holds} <= {holder}
            if ttl is None:
                assert fuzz_env.known_task in {hold.task_id for hold in holds} or "present" not in states
    finally:
        release_all(fuzz_env, holder)
    return outcome


USE_RPCS = ["Acquire", "Release", "KeepAlive", "Sync"]


@pytest.mark.parametrize("rpc_name", USE_RPCS)
@fuzz(50)
@given(
    holder=fs.holders(),
    refs=fs.task_ref_lists(),
    ttl=fs.mostly(fs.valid_durations(), fs.durations()),
)
def test_fuzzed_use(
    fuzz_env: Env, rpc_name: str, holder: str, refs: list[fs.TaskRefPlan], ttl: tuple[int, int] | None
) -> None:
    run_use_case(fuzz_env, rpc_name, holder, refs, ttl)


@pytest.mark.parametrize("rpc_name", USE_RPCS)
def test_listed_use_inputs(fuzz_env: Env, rpc_name: str) -> None:
    known = [fs.TaskRefPlan("task_id", fs.KNOWN_TASK)]
    for holder in (*fs.REFUSED_HOLDERS, *fs.ACCEPTED_HOLDERS):
        run_use_case(fuzz_env, rpc_name, holder, known, None)
    ttls = [
        (-1, 0),
        (0, 0),
        (0, -1),
        (fs.I64_MIN, -fs.NANOS_MAX),
        (1, -fs.NANOS_MAX),
        (0, 1),
        (HUNDRED_YEARS, 0),
        (HUNDRED_YEARS - 1, fs.NANOS_MAX),
        (HUNDRED_YEARS, 1000),
        (HUNDRED_YEARS + 1, 0),
        (fs.DURATION_MAX_SECONDS, 0),
        (fs.I64_MAX, fs.NANOS_MAX),
    ]
    for ttl in ttls:
        run_use_case(fuzz_env, rpc_name, HOLDER_PREFIX + unique(), known, ttl)
    for refs in ([], [fs.TaskRefPlan("none")], [fs.TaskRefPlan("blob_digest", "sha256:" + "A" * 64)]):
        run_use_case(fuzz_env, rpc_name, HOLDER_PREFIX + unique(), refs, None)
    for task_id in fs.HOSTILE_TASK_IDS:
        run_use_case(fuzz_env, rpc_name, HOLDER_PREFIX + unique(), [*known, fs.TaskRefPlan("task_id", task_id)], None)


@pytest.mark.parametrize("rpc_name", ["Acquire", "KeepAlive", "Sync"])
@pytest.mark.parametrize(
    ("seconds", "valid"),
    [(HUNDRED_YEARS, True), (HUNDRED_YEARS + 1, False), (fs.DURATION_MAX_SECONDS, False), (fs.I64_MAX, False)],
    ids=["100-years", "100-years-and-1s", "duration-max", "i64-max"],
)
def test_long_ttls_leave_holds_listable(fuzz_env: Env, rpc_name: str, seconds: int, valid: bool) -> None:
    """Leases up to 100 years are granted and listed (their expiry fits a Timestamp); longer ones are refused."""
    holder = HOLDER_PREFIX + unique()
    ref = ext_pb2.TaskRef(task_id=fuzz_env.ensure_known())
    long_ttl = Duration(seconds=seconds)
    request: Message
    if rpc_name == "Acquire":
        request = ext_pb2.AcquireRequest(holder=holder, tasks=[ref], ttl=long_ttl)
    elif rpc_name == "KeepAlive":
        fuzz_env.must(USE + "Acquire", ext_pb2.AcquireRequest(holder=holder, tasks=[ref], ttl=Duration(seconds=60)))
        request = ext_pb2.KeepAliveRequest(holder=holder, ttl=long_ttl)
    else:
        request = ext_pb2.SyncRequest(holder=holder, tasks=[ref], ttl=long_ttl)
    try:
        expect(
            fuzz_env,
            fuzz_env.call(USE + rpc_name, request),
            rpc_at(USE + rpc_name),
            {Code.OK} if valid else {INVALID},
            request,
        )
        listing = ext_pb2.ListHoldsRequest(holder=holder)
        outcome = fuzz_env.call(USE + "ListHolds", listing)
        expect(fuzz_env, outcome, rpc_at(USE + "ListHolds"), {Code.OK}, listing)
        holds = ext_pb2.ListHoldsResponse.FromString(outcome.responses[0]).holds
        held = valid or rpc_name == "KeepAlive"  # a refused KeepAlive leaves the 60 s lease as it was
        assert [hold.task_id for hold in holds] == ([fuzz_env.known_task] if held else [])
        if held:
            lease = holds[0].expires_at.ToSeconds() - holds[0].acquired_at.ToSeconds()
            assert abs(lease - (seconds if valid else 60)) <= 5, f"a lease of {lease} s"
        references = ext_pb2.GetReferencesRequest(task_id=fuzz_env.known_task)
        expect(
            fuzz_env,
            fuzz_env.call(USE + "GetReferences", references),
            rpc_at(USE + "GetReferences"),
            {Code.OK},
            references,
        )
    finally:
        fuzz_env.call(USE + "Sync", ext_pb2.SyncRequest(holder=holder))


@pytest.mark.parametrize("rpc_name", ["Acquire", "KeepAlive", "Sync"])
def test_ttl_a_nanosecond_past_100_years_is_refused(fuzz_env: Env, rpc_name: str) -> None:
    run_use_case(
        fuzz_env, rpc_name, HOLDER_PREFIX + unique(), [fs.TaskRefPlan("task_id", fs.KNOWN_TASK)], (HUNDRED_YEARS, 1)
    )


@fuzz(40)
@given(holder=st.none() | fs.holders() | st.sampled_from(fs.HOSTILE_TEXT), task_id=st.none() | fs.task_ids())
def test_fuzzed_list_holds(fuzz_env: Env, holder: str | None, task_id: str | None) -> None:
    request = ext_pb2.ListHoldsRequest()
    if holder is not None:
        request.holder = holder
    if task_id is not None:
        request.task_id = resolve(fuzz_env, task_id)
    valid = task_id is None or TASK_ID.fullmatch(request.task_id)
    expect(
        fuzz_env,
        fuzz_env.call(USE + "ListHolds", request),
        rpc_at(USE + "ListHolds"),
        {Code.OK} if valid else {INVALID},
        request,
    )


# --------------------------------------------------------------------------- Cache


def run_cache_case(fuzz_env: Env, dry_run: bool, limit: int, task_id: str, force: bool) -> None:
    usage = ext_pb2.GetUsageRequest()
    expect(fuzz_env, fuzz_env.call(CACHE + "GetUsage", usage), rpc_at(CACHE + "GetUsage"), {Code.OK}, usage)
    gc = ext_pb2.RunGCRequest(dry_run=dry_run)
    outcome = fuzz_env.call(CACHE + "RunGC", gc)
    expect(fuzz_env, outcome, rpc_at(CACHE + "RunGC"), {Code.OK}, gc)
    assert ext_pb2.GCRun.FromString(outcome.responses[0]).dry_run == dry_run
    runs = ext_pb2.ListGCRunsRequest(limit=limit)
    outcome = fuzz_env.call(CACHE + "ListGCRuns", runs)
    expect(fuzz_env, outcome, rpc_at(CACHE + "ListGCRuns"), {Code.OK}, runs)
    assert 1 <= len(ext_pb2.ListGCRunsResponse.FromString(outcome.responses[0]).runs) <= max(limit, 1)
    run_task_id_case(
        fuzz_env,
        TaskIdCase("evict", CACHE + "EvictTask", lambda t: ext_pb2.EvictTaskRequest(task_id=t, force=force)),
        task_id,
    )


def test_listed_gc_limits(fuzz_env: Env) -> None:
    for limit in (0, 1, 2, fs.I32_MAX, fs.I32_MAX + 1, fs.U32_MAX):
        for dry_run in (True, False):
            run_cache_case(fuzz_env, dry_run, limit, "", False)


@fuzz(30)
@given(
    dry_run=st.booleans(),
    limit=st.sampled_from([0, 1, fs.U32_MAX]) | st.integers(0, fs.U32_MAX),
    task_id=fs.task_ids(),
    force=st.booleans(),
)
def test_fuzzed_cache(fuzz_env: Env, dry_run: bool, limit: int, task_id: str, force: bool) -> None:
    run_cache_case(fuzz_env, dry_run, limit, task_id, force)


@pytest.mark.parametrize(("path", "request_", "code"), long_input_cases(USE, CACHE))
def test_long_input_echoed_in_errors(fuzz_env: Env, path: str, request_: Any, code: grpc.StatusCode) -> None:
    run_long_input(fuzz_env, path, request_, code)


@pytest.mark.parametrize("path", rpc_paths(USE, CACHE))
@fuzz(25)
@given(data=st.data())
def test_mutated_requests(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_mutated(fuzz_env, path, data)


@pytest.mark.parametrize("path", rpc_paths(USE, CACHE))
@fuzz(8)
@given(data=st.data())
def test_undecodable_requests_are_invalid_argument(fuzz_env: Env, path: str, data: st.DataObject) -> None:
    run_undecodable(fuzz_env, path, data)


@pytest.mark.parametrize(("transport", "path"), unknown_methods(USE, CACHE))
def test_unknown_methods_are_unimplemented(fuzz_env: Env, transport: str, path: str) -> None:
    check_unknown_method(fuzz_env, transport, path)
