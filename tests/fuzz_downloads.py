"""The oracle of the DownloadTask fuzz tests: what a download plan deserves, and how to run and judge one.

Used by the download (unix socket) and upload (TCP) fuzz modules alike.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2
from tests import fuzz_strategies as fs
from tests.fuzz_rpc_support import (
    CASE_ENTRIES,
    INVALID,
    KEEP,
    PRECONDITION,
    UPLOAD,
    Code,
    Env,
    Outcome,
    duration,
    expect,
    rpc_at,
    url_refused,
)
from tests.support import REPO_ROOT


def parse_digest(text: str) -> tuple[str, str] | None:
    """``download.digest`` as PROTOCOL.md defines it: crc32:<decimal u32>, sha256:<64 hex>, sha512:<128 hex>."""
    crc = re.fullmatch(r"crc32:(0|[1-9][0-9]{0,9})", text)
    if crc and int(crc.group(1)) <= fs.U32_MAX:
        return "crc32", crc.group(1)
    sha = re.fullmatch(r"(sha256|sha512):([0-9a-fA-F]+)", text)
    if sha and len(sha.group(2)) == {"sha256": 64, "sha512": 128}[sha.group(1)]:
        return sha.group(1), sha.group(2).lower()
    return None


def digest_of(algorithm: str, data: bytes) -> str:
    return str(zlib.crc32(data)) if algorithm == "crc32" else hashlib.new(algorithm, data).hexdigest()


def resolve_digest(plan: fs.DownloadPlan, content: bytes | None) -> str | None:
    """The digest a plan names; "right-*" digests cover the whole file, "range-sha256" only the range asked for."""
    data = content if content is not None else b"no such content"
    if plan.digest == "right-sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    if plan.digest == "right-sha256-upper-case":
        return "sha256:" + hashlib.sha256(data).hexdigest().upper()
    if plan.digest == "right-sha512":
        return "sha512:" + hashlib.sha512(data).hexdigest()
    if plan.digest == "right-crc32":
        return f"crc32:{zlib.crc32(data)}"
    if plan.digest == "wrong-sha256":
        return "sha256:" + hashlib.sha256(data + b"!").hexdigest()
    if plan.digest == "range-sha256":
        start, length = plan.byte_range or (0, len(data))
        return "sha256:" + hashlib.sha256(data[start : start + length]).hexdigest()
    return plan.digest


# Output kinds the daemon refuses before any work (INVALID_ARGUMENT): not absolute, NUL, too long.
INVALID_OUTPUTS = frozenset({"relative", "empty", "nul-byte", "long-name", "long-name-multibyte", "long-path"})


def resolve_output(env: Env, plan: fs.DownloadPlan) -> tuple[str | None, Path | None]:
    """The output_path string for a plan, and the case directory it lives in (if any)."""
    if plan.output is None:
        return None, None
    if plan.output == "relative":
        return f"fuzz-relative-output-{uuid.uuid4().hex}", None
    if plan.output == "empty":
        return "", None
    if plan.output == "os-error":
        # Every check passes (/proc is a directory, the file does not exist); creating a file there fails.
        return f"/proc/fuzz-output-{uuid.uuid4().hex}", None
    case = env.case_dir()
    names = {
        "new": "new.out",
        "missing-dir": "missing/x.out",
        "existing": "existing",
        "directory": "directory",
        "symlink-outside": "symlink-outside",
        "dangling-symlink-outside": "dangling-symlink-outside",
        "parent-is-file": "existing/x.out",
        "dotdot-inside": "directory/../dotdot.out",
        "nul-byte": "nul\x00byte.out",
        "long-name": "n" * 256,
        "long-name-multibyte": "\u00e9" * 128,
        "long-path": "/".join(["p" * 200] * 21) + "/x.out",
        "name-236": "n" * 236,
        "name-237": "n" * 237,
        "name-255": "n" * 255,
    }
    return f"{case}/{names[plan.output]}", case


def build_download(env: Env, plan: fs.DownloadPlan, output: str | None) -> common_pb2.Download:
    download = common_pb2.Download(
        url=plan_url(env, plan),
        type=common_pb2.TaskType.ValueType(plan.task_type),
        priority=common_pb2.Priority.ValueType(plan.priority),
        request_header=plan.headers,
        filtered_query_params=list(plan.filtered_query_params),
        need_piece_content=plan.need_piece_content,
        disable_back_to_source=plan.disable_back_to_source,
        need_back_to_source=plan.need_back_to_source,
        force_hard_link=plan.force_hard_link,
        prefetch=plan.prefetch,
        overwrite=plan.overwrite,
        certificate_chain=list(plan.certificate_chain),
        enable_task_id_based_blob_digest=plan.blob_digest_ids,
    )
    for name, value in (("tag", plan.tag), ("application", plan.application), ("remote_ip", plan.remote_ip)):
        if value is not None:
            setattr(download, name, value)
    if plan.content_for_task_id is not None:
        # The id then ignores the URL: keep one id per URL so no case is served another file's bytes.
        download.content_for_calculating_task_id = f"{download.url}|{plan.content_for_task_id}"
    digest = resolve_digest(plan, env.files.get(plan.target))
    if digest is not None:
        download.digest = digest
    if plan.piece_length is not None:
        download.piece_length = plan.piece_length
    if plan.byte_range is not None:
        download.range.CopyFrom(common_pb2.Range(start=plan.byte_range[0], length=plan.byte_range[1]))
    if plan.timeout is not None:
        download.timeout.CopyFrom(duration(plan.timeout))
    if plan.concurrent_piece_count is not None:
        download.concurrent_piece_count = plan.concurrent_piece_count
    if output is not None:
        download.output_path = output
    return download


def plan_url(env: Env, plan: fs.DownloadPlan) -> str:
    url = env.origin.url(plan.target) if plan.target else plan.url.replace("{origin}", env.origin.address)
    if plan.target and plan.query is not None:
        url += "?" + plan.query
    return url


def expected_download(env: Env, plan: fs.DownloadPlan, download: common_pb2.Download) -> frozenset[grpc.StatusCode]:
    """The statuses a download plan deserves: the refusals it earns, else what the origin makes of it."""
    digest = download.digest if download.HasField("digest") else None
    refusals: set[grpc.StatusCode] = set()
    if plan.timeout is not None and not fs.duration_valid(plan.timeout):
        refusals.add(INVALID)
    url_unknown = False  # a URL not refused up front that is not the origin's: the task id or the fetch may fail
    if not plan.target:
        if plan.url in fs.REFUSED_URLS or url_refused(download.url):
            refusals.add(INVALID)
        else:
            url_unknown = True
    if plan.byte_range is not None and plan.byte_range[1] == 0:
        refusals.add(PRECONDITION)
    if digest is not None and parse_digest(digest) is None:
        refusals.add(INVALID)
    if plan.piece_length is not None and not fs.piece_length_valid(plan.piece_length):
        refusals.add(INVALID)
    if any(fs.header_refused(name, value) for name, value in plan.headers.items()):
        refusals.add(INVALID)
    if plan.output in INVALID_OUTPUTS:
        refusals.add(INVALID)
    if plan.output in {"missing-dir", "directory", "parent-is-file"}:
        refusals.add(PRECONDITION)
    if plan.output in {"existing", "symlink-outside", "dangling-symlink-outside"} and not plan.overwrite:
        refusals.add(PRECONDITION)
    unknown_enum = plan.task_type not in range(4) or plan.priority not in range(7)
    if refusals:
        # An unknown URL may fail first, and an unknown enum value may be what is refused first.
        return frozenset(refusals | ({INVALID} if url_unknown or unknown_enum else set()))

    allowed: set[grpc.StatusCode]
    content = env.files.get(plan.target)
    parsed = parse_digest(digest) if digest is not None else None
    if url_unknown:
        allowed = {INVALID, Code.INTERNAL}
    elif content is None:
        allowed = {Code.INTERNAL}  # the origin answers 404
    elif plan.byte_range is not None and sum(plan.byte_range) > len(content):
        allowed = {PRECONDITION}
    elif parsed is not None and digest_of(parsed[0], content) != parsed[1]:
        allowed = {PRECONDITION}  # the digest covers the whole file, with or without a range or an output
    elif plan.output == "os-error":
        allowed = {PRECONDITION}
    else:
        allowed = {Code.OK}
    nanos = timeout_nanos(plan)
    if nanos is not None and nanos < 2 * 10**9:
        allowed.add(Code.DEADLINE_EXCEEDED)  # the caller's own timeout, reported by the daemon
    if plan.disable_back_to_source:
        allowed.add(Code.INTERNAL)  # a task not cached yet has no source left
    if any(len(value) > 60_000 for value in plan.headers.values()):
        allowed.add(Code.INTERNAL)  # the origin refuses a 64 KiB header line (431)
    if unknown_enum:
        allowed.add(INVALID)  # refusing unknown enum values is fine too
    return frozenset(allowed)


def timeout_nanos(plan: fs.DownloadPlan) -> int | None:
    return None if plan.timeout is None else fs.duration_nanos(plan.timeout)


def check_download_stream(env: Env, plan: fs.DownloadPlan, outcome: Outcome) -> None:
    responses = [dfdaemon_pb2.DownloadTaskResponse.FromString(raw) for raw in outcome.responses]
    assert responses and responses[0].HasField("download_task_started_response"), "no started response first"
    started = responses[0].download_task_started_response
    pieces = [response.download_piece_finished_response.piece for response in responses[1:]]
    assert len(pieces) == len(started.pieces), f"{len(started.pieces)} pieces announced, {len(pieces)} streamed"
    assert {response.task_id for response in responses} == {responses[0].task_id}
    content = env.files.get(plan.target)
    if content is not None:
        assert started.content_length == len(content)
        if plan.need_piece_content:
            for piece in pieces:
                assert piece.content == content[piece.offset : piece.offset + piece.length]


def check_case_dir(env: Env, case: Path, output: str, ok: bool) -> None:
    """Only the requested output may have appeared, and only on success; nothing else was touched."""
    entries = set(os.listdir(case))
    target = Path(os.path.normpath(output))
    expected = set(CASE_ENTRIES) | ({target.name} if ok and target.parent == case else set())
    assert entries == expected, f"{case} holds {sorted(entries)}, expected {sorted(expected)}"
    if not (ok and target == case / "existing"):
        assert (case / "existing").read_bytes() == KEEP
    for link, points_to in (("symlink-outside", env.outside_file), ("dangling-symlink-outside", env.outside_absent)):
        if not (ok and target == case / link):
            assert (case / link).is_symlink() and Path(os.readlink(case / link)) == points_to
    assert env.outside_file.read_bytes() == KEEP
    assert not env.outside_absent.exists() and not env.outside_absent.is_symlink()


def run_download_plan(
    env: Env, path: str, plan: fs.DownloadPlan, expected: Iterable[grpc.StatusCode] | None = None
) -> Outcome:
    output, case = resolve_output(env, plan)
    download = build_download(env, plan, output)
    if output:
        env.requested.add(Path(os.path.normpath(output)))
    allowed = frozenset(expected) if expected is not None else expected_download(env, plan, download)
    if path.startswith(UPLOAD):
        # Callers over the network may be kept from some origins (the loopback origin here) by policy.
        allowed |= {Code.PERMISSION_DENIED}
    request = dfdaemon_pb2.DownloadTaskRequest(download=download)
    outcome = env.call(path, request)
    try:
        expect(env, outcome, rpc_at(path), allowed, request)
        if outcome.code is Code.OK:
            check_download_stream(env, plan, outcome)
        content = env.files.get(plan.target)
        if outcome.code is Code.OK and output and content is not None:
            start, length = plan.byte_range or (0, len(content))
            written = Path(output)
            assert not written.is_symlink(), f"the daemon wrote through or kept a symlink at {output}"
            assert written.read_bytes() == content[start : start + length], f"{output} does not hold the content"
        if case is not None and output is not None:
            check_case_dir(env, case, output, outcome.code is Code.OK)
    finally:
        if plan.output == "relative" and output:
            stray = REPO_ROOT / output
            if stray.exists():
                stray.unlink()
                raise AssertionError(f"a relative output_path was written to the daemon's working directory: {stray}")
    return outcome


SMALL = fs.DownloadPlan(target="small.bin")


def listed(plan: fs.DownloadPlan, expected: set[grpc.StatusCode], name: str, bug: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(plan, expected, id=name, marks=marks)


def mixed_case(name: str) -> str:
    return "".join(ch.upper() if n % 2 else ch for n, ch in enumerate(name))
