"""Bad input on every RPC: hypothesis fuzzing of the daemon's and the scheduler stub's gRPC services.

Real processes (an origin, the scheduler stub, one daemon using it) start once for the module. Every RPC of
``dfdaemon.v2.DfdaemonUpload`` (TCP), ``dfdaemon.v2.DfdaemonDownload``, ``dfdaemon.ext.v1.Use`` and
``dfdaemon.ext.v1.Cache`` (unix socket) and ``scheduler.v2.Scheduler`` (TCP) receives generated messages,
listed hostile values and byte-level mutations of valid requests, sent raw so that even undecodable bytes
reach the server. For every call:

- it ends with an expected status, never UNKNOWN (an exception escaped a servicer) and never by running
  into the client's deadline (a hang); INTERNAL only where the origin (or the download itself) failed;
- a refusal says why, on one line of at most 1024 characters (however long the input it quotes);
- afterwards both processes still run and report SERVING, and nothing changed on disk outside the daemon's
  ``storage.dir`` and the output files the test asked for (a snapshot of the module's directory tree,
  which also holds the files symlinks point to, is compared after every test).

``test_zz_cases_run`` prints how many calls each RPC received.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import os
import re
import stat
import struct
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from dfdaemon.api import common_pb2, dfdaemon_pb2, errordetails_pb2, scheduler_pb2
from dfdaemon.api import dfdaemon_ext_pb2 as ext_pb2
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests import fuzz_strategies as fs
from tests.support import (
    REPO_ROOT,
    DaemonProcess,
    OriginProcess,
    SchedulerProcess,
    merge,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
)

pytestmark = [
    pytest.mark.slow,
    # Hostile inputs are large on purpose (64 KiB holders and headers); hypothesis warns when it shows them.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

Code = grpc.StatusCode

CALL_TIMEOUT = 10.0
# Server streams that go on until the caller leaves (SyncHost: this host now, then every announce interval) are
# called with this short deadline; reaching it after at least one answer is their normal end.
ENDLESS_STREAM_TIMEOUT = 0.5
ENDLESS_STREAMS = frozenset({"/dfdaemon.v2.DfdaemonUpload/SyncHost"})
INVALID = Code.INVALID_ARGUMENT
PRECONDITION = Code.FAILED_PRECONDITION
_FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


def fuzz(examples: int) -> settings:
    """Settings for one batch of examples against the live processes (no per-example deadline)."""
    return settings(_FUZZ, max_examples=examples)


REFUSALS = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE})
ANY_VALID_ANSWER = REFUSALS | {Code.OK, Code.RESOURCE_EXHAUSTED}

FUZZ_HOST = "fuzz-host"  # announced to the scheduler stub by the fixture (and again before each stream)
DAEMON_WORKDIR = "daemon"
DAEMON_HOST_ID = f"127.0.0.1-{DAEMON_WORKDIR}"  # the host id support.daemon_config gives the daemon
HOLDER_PREFIX = "fuzz:"
KEEP = b"a file the daemon must leave alone\n"
SMALL_PIECE_LENGTH = 1024  # the known task: small.bin in 1 KiB pieces
TASK_ID = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")
MAX_DETAILS = 1024  # status details are cut to this many characters, on one line

# Calls made per RPC (full method path), printed by the last test.
CASES: Counter[str] = Counter()

# --------------------------------------------------------------------------- bugs found (strict xfail)


# --------------------------------------------------------------------------- the RPCs


@dataclass(frozen=True)
class Rpc:
    method: MethodDescriptor
    transport: str  # "unix", "tcp" or "scheduler"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def blanket_answer(self) -> grpc.StatusCode | None:
        """UNIMPLEMENTED (declared, not served) or PERMISSION_DENIED (disabled by configuration) for every input."""
        return BLANKET_ANSWERS.get(self.path)


SERVICES = [
    (dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonUpload"], "tcp"),
    (dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonDownload"], "unix"),
    (ext_pb2.DESCRIPTOR.services_by_name["Use"], "unix"),
    (ext_pb2.DESCRIPTOR.services_by_name["Cache"], "unix"),
    (scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"], "scheduler"),
]
RPCS: dict[str, Rpc] = {
    rpc.path: rpc for service, transport in SERVICES for rpc in (Rpc(method, transport) for method in service.methods)
}
# RPCs that answer every request alike: declared by the mirrored API but not served (UNIMPLEMENTED), or turned
# off by the daemon's configuration (PERMISSION_DENIED). The fixture learns them by sending each RPC a valid
# request; every fuzzed input must then get that same answer.
BLANKET_ANSWERS: dict[str, grpc.StatusCode] = {}
UPLOAD = "/dfdaemon.v2.DfdaemonUpload/"
DOWNLOAD = "/dfdaemon.v2.DfdaemonDownload/"
USE = "/dfdaemon.ext.v1.Use/"
CACHE = "/dfdaemon.ext.v1.Cache/"
SCHEDULER = "/scheduler.v2.Scheduler/"


def rpc_at(path: str) -> Rpc:
    return RPCS[path]


# --------------------------------------------------------------------------- calling and judging


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: tuple[bytes, ...]
    seconds: float
    deadline: float


def _raw(data: bytes) -> bytes:
    return data


def serialize(request: Message | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def describe(request: object) -> str:
    if isinstance(request, Message):
        text = f"{type(request).__name__}{{{text_format.MessageToString(request, as_one_line=True)}}}"
    elif isinstance(request, bytes):
        text = f"bytes {request.hex()}"
    elif isinstance(request, list | tuple):
        text = " | ".join(describe(item) for item in request)
    else:
        text = repr(request)
    return text if len(text) <= 400 else f"{text[:400]}... ({len(text)} characters)"


def expect(
    outcome: Outcome, rpc: Rpc, allowed: Iterable[grpc.StatusCode], request: object, *, fixed: bool = False
) -> None:
    """Count the call and judge its status; an RPC that refuses everything must refuse this too, alike.

    ``fixed``: the status does not depend on the RPC's implementation (undecodable bytes), ``allowed`` is exact.
    """
    CASES[rpc.path] += 1
    if rpc.path in ENDLESS_STREAMS and outcome.code is Code.DEADLINE_EXCEEDED and outcome.responses:
        outcome = replace(outcome, code=Code.OK, details="")  # the stream was still going: the caller left
    if currently_in_test_context():
        event(f"{rpc.method.name}: {outcome.code.name}")  # shown by --hypothesis-show-statistics
    blanket = rpc.blanket_answer
    codes = frozenset(allowed)
    if blanket is Code.UNIMPLEMENTED and not fixed:
        codes = frozenset({blanket})
    elif blanket is not None and not fixed:
        codes |= {blanket}  # a disabled RPC may still say what is wrong with the input first
    shown = describe(request)
    assert outcome.code is not Code.UNKNOWN, f"{rpc.path} raised an uncaught exception for {shown}: {outcome.details}"
    if outcome.code is Code.DEADLINE_EXCEEDED:
        assert outcome.seconds < outcome.deadline * 0.9, f"{rpc.path} hung until the client's deadline for {shown}"
    assert outcome.code in codes, (
        f"{rpc.path} answered {outcome.code.name} ({outcome.details!r}) to {shown}; "
        f"expected {' or '.join(sorted(code.name for code in codes))}"
    )
    if outcome.code is not Code.OK:
        assert outcome.details.strip(), f"{rpc.path} answered {outcome.code.name} without saying why to {shown}"
        assert outcome.details == " ".join(outcome.details.split()), (
            f"{rpc.path} answered details that are not one line to {shown}: {outcome.details[:200]!r}"
        )
        assert len(outcome.details) <= MAX_DETAILS, (
            f"{rpc.path} answered {len(outcome.details)} characters of details to {shown}"
        )


# --------------------------------------------------------------------------- the processes


@dataclass
class Env:
    root: Path
    daemon: DaemonProcess
    scheduler: SchedulerProcess
    origin: OriginProcess
    channels: dict[str, grpc.Channel]
    files: dict[str, bytes]
    sandbox: Path  # files outside everything the daemon may write; symlinks in output directories point here
    outputs: Path  # a fresh directory per example that asks for an output file
    own: set[Path] = field(default_factory=set)  # paths the test created itself
    requested: set[Path] = field(default_factory=set)  # output files the daemon was asked to write
    serial: Iterator[int] = field(default_factory=itertools.count)
    known_task: str = ""
    bases: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def outside_file(self) -> Path:
        return self.sandbox / "outside.txt"

    @property
    def outside_absent(self) -> Path:
        return self.sandbox / "never-created.txt"

    def call(
        self, path: str, request: Message | bytes | Sequence[Message | bytes], timeout: float | None = None
    ) -> Outcome:
        """Send raw bytes (serializing messages first) so that any payload reaches the server."""
        if timeout is None:
            timeout = ENDLESS_STREAM_TIMEOUT if path in ENDLESS_STREAMS else CALL_TIMEOUT
        rpc = rpc_at(path)
        channel = self.channels[rpc.transport]
        started = time.monotonic()
        responses: list[bytes] = []
        try:
            if rpc.method.client_streaming:
                items = [request] if isinstance(request, Message | bytes) else list(request)
                stream = channel.stream_stream(path, request_serializer=_raw, response_deserializer=_raw)
                responses.extend(stream(iter([serialize(item) for item in items]), timeout=timeout))
            else:
                assert isinstance(request, Message | bytes)
                if rpc.method.server_streaming:
                    call = channel.unary_stream(path, request_serializer=_raw, response_deserializer=_raw)
                    responses.extend(call(serialize(request), timeout=timeout))
                else:
                    unary = channel.unary_unary(path, request_serializer=_raw, response_deserializer=_raw)
                    responses.append(unary(serialize(request), timeout=timeout))
        except grpc.RpcError as error:
            failed = cast(grpc.Call, error)
            return Outcome(failed.code(), failed.details() or "", tuple(responses), time.monotonic() - started, timeout)
        return Outcome(Code.OK, "", tuple(responses), time.monotonic() - started, timeout)

    def must(self, path: str, request: Message) -> Outcome:
        """A helper call that has to succeed (not counted as a fuzz case)."""
        outcome = self.call(path, request)
        assert outcome.code is Code.OK, (
            f"{path} failed ({outcome.code.name}: {outcome.details}) for {describe(request)}"
        )
        return outcome

    def ensure_known(self) -> str:
        """The task small.bin in 1 KiB pieces, downloaded again whenever a case deleted it."""
        download = common_pb2.Download(url=self.origin.url("small.bin"), piece_length=SMALL_PIECE_LENGTH)
        outcome = self.must(DOWNLOAD + "DownloadTask", dfdaemon_pb2.DownloadTaskRequest(download=download))
        self.known_task = dfdaemon_pb2.DownloadTaskResponse.FromString(outcome.responses[0]).task_id
        return self.known_task

    def announce_fuzz_host(self) -> None:
        host = common_pb2.Host(id=FUZZ_HOST, ip="127.0.0.1", port=1, hostname="fuzz")
        self.must(
            SCHEDULER + "AnnounceHost", scheduler_pb2.AnnounceHostRequest(host=host, interval=Duration(seconds=3600))
        )

    def case_dir(self) -> Path:
        """A fresh directory holding an existing file, a directory and symlinks pointing outside."""
        case = self.outputs / f"case-{next(self.serial)}"
        case.mkdir()
        (case / "existing").write_bytes(KEEP)
        (case / "directory").mkdir()
        (case / "symlink-outside").symlink_to(self.outside_file)
        (case / "dangling-symlink-outside").symlink_to(self.outside_absent)
        self.own.update(case / name for name in ("", *CASE_ENTRIES))
        return case


CASE_ENTRIES = ("existing", "directory", "symlink-outside", "dangling-symlink-outside")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("fuzz-rpc")
    files = {
        "small.bin": os.urandom(fs.SMALL_SIZE),
        "empty.bin": b"",
        "slow.bin": os.urandom(6000),
        "other.bin": os.urandom(3000),
        "big.bin": os.urandom(8 * 1024 * 1024),  # more than gRPC's flow control lets through unread
    }
    origin_root = root / "origin" / "files"
    origin_root.mkdir(parents=True)
    for name, content in files.items():
        (origin_root / name).write_bytes(content)
    sandbox = root / "sandbox"
    sandbox.mkdir()
    (sandbox / "outside.txt").write_bytes(KEEP)
    outputs = root / "outputs"
    outputs.mkdir()
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(origin_root))
        scheduler = stack.enter_context(running_scheduler(root / "scheduler"))
        # A quota of our own (not the filesystem's fill level) keeps GC from evicting anything mid-run.
        config = merge(peer_config(scheduler), {"gc": {"policy": {"diskThreshold": "1GB"}}})
        daemon = stack.enter_context(running_daemon(root / DAEMON_WORKDIR, config))
        channels = {
            "unix": grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS),
            "tcp": grpc.insecure_channel(daemon.upload_address, options=CHANNEL_OPTIONS),
            "scheduler": grpc.insecure_channel(scheduler.address, options=CHANNEL_OPTIONS),
        }
        for channel in channels.values():
            stack.callback(channel.close)
        env = Env(root, daemon, scheduler, origin, channels, files, sandbox, outputs)
        env.announce_fuzz_host()
        env.ensure_known()
        env.bases = base_requests(env)
        learn_blanket_answers(env)
        yield env


def snapshot(env: Env) -> dict[Path, tuple[object, ...]]:
    """Every path under the module's directory (the daemon's storage and logs aside), plus /etc/passwd."""
    seen: dict[Path, tuple[object, ...]] = {}
    storage = env.daemon.storage_dir
    for directory, dirs, files in os.walk(env.root):
        here = Path(directory)
        dirs[:] = [name for name in dirs if here / name != storage]
        for name in [*dirs, *files]:
            path = here / name
            if path.suffix == ".log":
                continue
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                seen[path] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                seen[path] = ("directory",)
            else:
                seen[path] = ("file", stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, info.st_ino)
    for sentinel in (Path("/etc/passwd"),):
        if sentinel.exists():
            info = sentinel.stat()
            seen[sentinel] = ("sentinel", info.st_size, info.st_mtime_ns)
    return seen


def assert_serving(env: Env) -> None:
    assert env.daemon.proc.poll() is None, f"the daemon exited:\n{env.daemon.log()[-4000:]}"
    assert env.scheduler.proc.poll() is None, (
        f"the scheduler stub exited:\n{env.scheduler.log_path.read_text()[-4000:]}"
    )
    for transport, service in (
        ("unix", ""),
        ("unix", "dfdaemon.v2.DfdaemonDownload"),
        ("tcp", "dfdaemon.v2.DfdaemonUpload"),
        ("scheduler", "scheduler.v2.Scheduler"),
    ):
        # Bound by hand: the typed stubs of grpc_health's HealthStub declare no methods.
        check = env.channels[transport].unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        answer = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, f"{transport} {service!r} is not serving"
    env.must(DOWNLOAD + "ListLocalTasks", dfdaemon_pb2.ListLocalTasksRequest())
    env.must(USE + "ListHolds", ext_pb2.ListHoldsRequest())
    env.must(CACHE + "GetUsage", ext_pb2.GetUsageRequest())
    env.must(SCHEDULER + "ListHosts", scheduler_pb2.ListHostsRequest())


@pytest.fixture(autouse=True)
def guard(env: Env) -> Iterator[None]:
    """After each test (one batch of examples): both processes serve, and nothing changed where it must not."""
    before = snapshot(env)
    yield
    assert_serving(env)
    after = snapshot(env)
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    unexpected = sorted(str(path) for path in changed - env.own - env.requested)
    assert not unexpected, f"paths changed outside storage.dir and the requested outputs: {unexpected[:20]}"


# --------------------------------------------------------------------------- task ids


def resolve(env: Env, task_id: str) -> str:
    return env.ensure_known() if task_id == fs.KNOWN_TASK else task_id


@dataclass(frozen=True)
class TaskIdCase:
    name: str
    path: str
    build: Callable[[str], Message]


TASK_ID_CASES = [
    TaskIdCase(
        "Upload.StatLocalTask", UPLOAD + "StatLocalTask", lambda t: dfdaemon_pb2.StatLocalTaskRequest(task_id=t)
    ),
    TaskIdCase("Upload.StatTask", UPLOAD + "StatTask", lambda t: dfdaemon_pb2.StatTaskRequest(task_id=t)),
    TaskIdCase("Upload.DeleteTask", UPLOAD + "DeleteTask", lambda t: dfdaemon_pb2.DeleteTaskRequest(task_id=t)),
    TaskIdCase(
        "Upload.SyncPieces", UPLOAD + "SyncPieces", lambda t: dfdaemon_pb2.SyncPiecesRequest(host_id="fuzz", task_id=t)
    ),
    TaskIdCase(
        "Upload.DownloadPiece",
        UPLOAD + "DownloadPiece",
        lambda t: dfdaemon_pb2.DownloadPieceRequest(host_id="fuzz", task_id=t, piece_number=0),
    ),
    TaskIdCase(
        "Download.StatLocalTask", DOWNLOAD + "StatLocalTask", lambda t: dfdaemon_pb2.StatLocalTaskRequest(task_id=t)
    ),
    TaskIdCase("Download.StatTask", DOWNLOAD + "StatTask", lambda t: dfdaemon_pb2.StatTaskRequest(task_id=t)),
    TaskIdCase("Download.DeleteTask", DOWNLOAD + "DeleteTask", lambda t: dfdaemon_pb2.DeleteTaskRequest(task_id=t)),
    TaskIdCase(
        "Download.DeleteLocalTask",
        DOWNLOAD + "DeleteLocalTask",
        lambda t: dfdaemon_pb2.DeleteLocalTaskRequest(task_id=t, remote_ip="\x00"),
    ),
    TaskIdCase("Use.GetReferences", USE + "GetReferences", lambda t: ext_pb2.GetReferencesRequest(task_id=t)),
    TaskIdCase("Use.ListHolds", USE + "ListHolds", lambda t: ext_pb2.ListHoldsRequest(task_id=t)),
    TaskIdCase("Cache.EvictTask", CACHE + "EvictTask", lambda t: ext_pb2.EvictTaskRequest(task_id=t)),
    TaskIdCase("Cache.EvictTask-force", CACHE + "EvictTask", lambda t: ext_pb2.EvictTaskRequest(task_id=t, force=True)),
    TaskIdCase(
        "Scheduler.StatTask",
        SCHEDULER + "StatTask",
        lambda t: scheduler_pb2.StatTaskRequest(host_id=FUZZ_HOST, task_id=t),
    ),
    TaskIdCase(
        "Scheduler.DeleteTask",
        SCHEDULER + "DeleteTask",
        lambda t: scheduler_pb2.DeleteTaskRequest(host_id=FUZZ_HOST, task_id=t),
    ),
]


def task_id_expectation(env: Env, case: TaskIdCase, task_id: str) -> frozenset[grpc.StatusCode]:
    name = case.path.rsplit("/", 1)[1]
    if case.path.startswith(SCHEDULER):
        if name == "DeleteTask":
            return frozenset({Code.INVALID_ARGUMENT} if not task_id else {Code.OK})
        return frozenset({Code.OK, Code.NOT_FOUND})
    if not TASK_ID.fullmatch(task_id):
        return frozenset({Code.INVALID_ARGUMENT})
    if name == "ListHolds":
        return frozenset({Code.OK})
    if task_id != env.known_task:
        return frozenset({Code.NOT_FOUND})
    if name in {"DeleteTask", "DeleteLocalTask", "EvictTask"}:
        return frozenset({Code.OK, Code.FAILED_PRECONDITION})  # refused while a fuzzed hold still has it
    return frozenset({Code.OK})


def run_task_id_case(env: Env, case: TaskIdCase, task_id: str) -> None:
    task_id = resolve(env, task_id)
    request = case.build(task_id)
    expect(env.call(case.path, request), rpc_at(case.path), task_id_expectation(env, case, task_id), request)


@pytest.mark.parametrize("case", TASK_ID_CASES, ids=lambda case: case.name)
def test_listed_task_ids(env: Env, case: TaskIdCase) -> None:
    for task_id in fs.HOSTILE_TASK_IDS:
        run_task_id_case(env, case, task_id)
    run_task_id_case(env, case, "f" * 64)
    run_task_id_case(env, case, fs.KNOWN_TASK)


@pytest.mark.parametrize("case", TASK_ID_CASES, ids=lambda case: case.name)
@fuzz(30)
@given(task_id=fs.task_ids())
def test_fuzzed_task_ids(env: Env, case: TaskIdCase, task_id: str) -> None:
    run_task_id_case(env, case, task_id)


# --------------------------------------------------------------------------- pieces


def piece_metadata_digest(number: int, offset: int, length: int, digest: str) -> str:
    header = struct.pack(">IQQ", number, offset, length)
    return f"crc32:{zlib.crc32(digest.encode(), zlib.crc32(header))}"


def check_piece_numbers(env: Env, single: int, interested: list[int]) -> None:
    task = env.ensure_known()
    content = env.files["small.bin"]
    count = -(-len(content) // SMALL_PIECE_LENGTH)

    request = dfdaemon_pb2.DownloadPieceRequest(host_id="fuzz", task_id=task, piece_number=single)
    outcome = env.call(UPLOAD + "DownloadPiece", request)
    expect(outcome, rpc_at(UPLOAD + "DownloadPiece"), {Code.OK} if single < count else {Code.NOT_FOUND}, request)
    if outcome.code is Code.OK:
        answer = dfdaemon_pb2.DownloadPieceResponse.FromString(outcome.responses[0])
        offset = single * SMALL_PIECE_LENGTH
        assert answer.piece.content == content[offset : offset + SMALL_PIECE_LENGTH]
        assert answer.piece.digest == f"crc32:{zlib.crc32(answer.piece.content)}"
        metadata = piece_metadata_digest(single, offset, len(answer.piece.content), answer.piece.digest)
        assert answer.digest == metadata

    sync = dfdaemon_pb2.SyncPiecesRequest(host_id="fuzz", task_id=task, interested_piece_numbers=interested)
    outcome = env.call(UPLOAD + "SyncPieces", sync)
    past_end = any(number >= count for number in interested)
    expect(outcome, rpc_at(UPLOAD + "SyncPieces"), {Code.OUT_OF_RANGE} if past_end else {Code.OK}, sync)
    if outcome.code is Code.OK:
        numbers = sorted(dfdaemon_pb2.SyncPiecesResponse.FromString(raw).number for raw in outcome.responses)
        wanted = set(interested) if interested else set(range(count))
        assert numbers == sorted(wanted & set(range(count)))


def test_listed_piece_numbers(env: Env) -> None:
    for number in (0, 4, 5, 6, fs.I32_MAX, fs.I32_MAX + 1, fs.U32_MAX - 1, fs.U32_MAX):
        check_piece_numbers(env, number, [number])
    check_piece_numbers(env, 0, [])
    check_piece_numbers(env, 0, [fs.U32_MAX, 0, 0, 4])


@fuzz(60)
@given(single=fs.piece_numbers(), interested=st.lists(fs.piece_numbers(), max_size=6))
def test_fuzzed_piece_numbers(env: Env, single: int, interested: list[int]) -> None:
    check_piece_numbers(env, single, interested)


def test_sync_pieces_past_the_end_of_a_task_in_progress(env: Env) -> None:
    """The piece count is known once the download has started: a piece past it is OUT_OF_RANGE at once."""
    env.origin.fault("slow.bin", delay=1)  # every origin request for it waits a second: about 7 s in all
    download = common_pb2.Download(
        url=env.origin.url("slow.bin"), piece_length=1024, concurrent_piece_count=1, tag=uuid.uuid4().hex
    )
    stream = env.channels["unix"].unary_stream(
        DOWNLOAD + "DownloadTask",
        request_serializer=_raw,
        response_deserializer=dfdaemon_pb2.DownloadTaskResponse.FromString,
    )
    call = stream(dfdaemon_pb2.DownloadTaskRequest(download=download).SerializeToString(), timeout=60)
    try:
        task_id = next(iter(call)).task_id
        request = dfdaemon_pb2.SyncPiecesRequest(host_id="fuzz", task_id=task_id, interested_piece_numbers=[fs.U32_MAX])
        outcome = env.call(UPLOAD + "SyncPieces", request, timeout=3.0)
        expect(outcome, rpc_at(UPLOAD + "SyncPieces"), {Code.OUT_OF_RANGE}, request)
        stat_request = dfdaemon_pb2.StatLocalTaskRequest(task_id=task_id)
        answer = dfdaemon_pb2.StatLocalTaskResponse.FromString(
            env.must(DOWNLOAD + "StatLocalTask", stat_request).responses[0]
        )
        assert not answer.HasField("finished_at"), "the task finished already: the case tested nothing"
    finally:
        call.cancel()
        env.origin.fault("slow.bin")


# --------------------------------------------------------------------------- DownloadTask


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


def url_refused(url: str) -> bool:
    """Whether DownloadTask refuses a URL before any work: empty, spaces or control characters, no http(s)
    scheme, no host, or nothing the HTTP client can parse."""
    if not url or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        return True
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
            return True
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        return True
    return False


def stays_on_this_machine(url: str) -> bool:
    """Refused up front, or aimed at a loopback address (by both parsers): fuzzing must not test the network."""
    if url_refused(url):
        return True
    try:
        hosts = {urlsplit(url).hostname or "", httpx.URL(url).host}
        return all(ipaddress.ip_address(host.strip("[]")).is_loopback for host in hosts)
    except (ValueError, httpx.InvalidURL):
        return False


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
    if refusals:
        return frozenset(refusals | ({INVALID} if url_unknown else set()))

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
    if plan.task_type not in range(4) or plan.priority not in range(7):
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
        expect(outcome, rpc_at(path), allowed, request)
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


@fuzz(70)
@given(plan=fs.download_plans())
def test_fuzzed_download_task(env: Env, plan: fs.DownloadPlan) -> None:
    assume(stays_on_this_machine(plan_url(env, plan)))
    run_download_plan(env, DOWNLOAD + "DownloadTask", plan)


@fuzz(35)
@given(plan=fs.download_plans(with_output=False))
def test_fuzzed_download_task_over_tcp(env: Env, plan: fs.DownloadPlan) -> None:
    assume(stays_on_this_machine(plan_url(env, plan)))
    run_download_plan(env, UPLOAD + "DownloadTask", plan)


def unique() -> str:
    return uuid.uuid4().hex


SMALL = fs.DownloadPlan(target="small.bin")
HUNDRED_YEARS = fs.MAX_DURATION_SECONDS


def listed(plan: fs.DownloadPlan, expected: set[grpc.StatusCode], name: str, bug: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(plan, expected, id=name, marks=marks)


def mixed_case(name: str) -> str:
    return "".join(ch.upper() if n % 2 else ch for n, ch in enumerate(name))


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
    listed(replace(SMALL, digest="wrong-sha256"), {PRECONDITION}, "digest-wrong-cached"),
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
    listed(replace(SMALL, headers={"Range": "bytes=1-"}, output="new"), {INVALID}, "header-Range"),
    listed(replace(SMALL, headers={"range": "bytes=0-"}, output="new"), {INVALID}, "header-lowercase-range"),
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
def test_listed_downloads(env: Env, plan: fs.DownloadPlan, expected: set[grpc.StatusCode]) -> None:
    run_download_plan(env, DOWNLOAD + "DownloadTask", plan, expected)


def test_non_ascii_header_value_is_refused_for_a_cached_task(env: Env) -> None:
    """The same header as the case "header-value-non-ascii", for a task the cache already holds."""
    env.ensure_known()
    plan = replace(SMALL, piece_length=SMALL_PIECE_LENGTH, headers={"X-Fuzz": "\u00e9"})
    run_download_plan(env, DOWNLOAD + "DownloadTask", plan, {INVALID})


@pytest.mark.parametrize("overwrite", [False, True])
def test_download_task_over_tcp_writes_no_file(env: Env, overwrite: bool) -> None:
    """Peers on the network may not make the daemon write files (a remote arbitrary file write otherwise)."""
    for kind in ("new", "existing", "symlink-outside", "dangling-symlink-outside", "os-error"):
        plan = replace(SMALL, output=kind, overwrite=overwrite)
        outcome = run_download_plan(env, UPLOAD + "DownloadTask", plan, {INVALID, PRECONDITION, Code.PERMISSION_DENIED})
        assert outcome.code is not Code.OK


def number(piece: common_pb2.Piece) -> int:
    return piece.number


def plant_blob(env: Env, registry: str, claimed: str, content: bytes) -> str:
    """Serve ``content`` from the origin as blob ``sha256:<claimed>`` of a registry; returns its URL."""
    blob = env.origin.root / "v2" / registry / "blobs" / f"sha256:{claimed}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    env.own.update({blob, blob.parent, blob.parent.parent, blob.parent.parent.parent})
    return env.origin.url(f"v2/{registry}/blobs/sha256:{claimed}")


def test_blob_digest_task_is_not_cached_with_other_content(env: Env) -> None:
    """The task a blob digest names never holds other bytes: the real blob, from another registry, is served."""
    layer = b"the layer a registry would serve " + unique().encode()
    claimed = hashlib.sha256(layer).hexdigest()
    forged = plant_blob(env, "forger", claimed, b"other bytes under the layer's name")
    genuine = plant_blob(env, "genuine", claimed, layer)
    try:
        # How this call ends is test_blob_digest_task_id_is_checked_against_the_content's business.
        forged_download = common_pb2.Download(url=forged, enable_task_id_based_blob_digest=True)
        env.call(DOWNLOAD + "DownloadTask", dfdaemon_pb2.DownloadTaskRequest(download=forged_download))
        # That call may end before the job has checked the content: wait for the task's verdict.
        stat_request = dfdaemon_pb2.StatLocalTaskRequest(task_id=claimed)
        deadline = time.monotonic() + 5
        while True:
            outcome = env.call(DOWNLOAD + "StatLocalTask", stat_request)
            expect(outcome, rpc_at(DOWNLOAD + "StatLocalTask"), {Code.OK, Code.NOT_FOUND}, stat_request)
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
        outcome = env.call(DOWNLOAD + "DownloadTask", request)
        expect(outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.OK}, request)
        responses = [dfdaemon_pb2.DownloadTaskResponse.FromString(raw) for raw in outcome.responses]
        assert {response.task_id for response in responses} == {claimed}
        pieces = sorted((response.download_piece_finished_response.piece for response in responses[1:]), key=number)
        assert b"".join(piece.content for piece in pieces) == layer
    finally:
        env.call(CACHE + "EvictTask", ext_pb2.EvictTaskRequest(task_id=claimed, force=True))


def test_blob_digest_task_id_is_checked_against_the_content(env: Env) -> None:
    claimed = hashlib.sha256(b"the layer a registry would serve").hexdigest()
    url = plant_blob(env, "fuzz", claimed, b"other bytes under the layer's name")
    plan = fs.DownloadPlan(target="", url=url, blob_digest_ids=True, output="new")
    try:
        run_download_plan(env, DOWNLOAD + "DownloadTask", plan, {Code.DATA_LOSS})
    finally:
        env.call(CACHE + "EvictTask", ext_pb2.EvictTaskRequest(task_id=claimed, force=True))


class _RangeLiar(BaseHTTPRequestHandler):
    """Answers every ranged GET with 206 and the right number of bytes, but always from the start of the file
    (saying so in Content-Range), until ``server.honest`` is set."""

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
            start, end = 0, end - start
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(body[start : end + 1])


def test_a_206_for_another_range_is_an_origin_error(env: Env) -> None:
    """An origin answering 206 with a Content-Range other than the one asked for fails the download; no wrong
    piece stays in the cache (the same URL, answered honestly afterwards, gives the real bytes)."""
    content = env.files["small.bin"]
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _RangeLiar)
    server.daemon_threads = True
    server.body, server.honest = content, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/liar.bin"
        download = common_pb2.Download(url=url, piece_length=SMALL_PIECE_LENGTH, need_piece_content=True)
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
        outcome = env.call(DOWNLOAD + "DownloadTask", request)
        expect(outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.INTERNAL}, request)
        assert "range" in outcome.details.lower(), outcome.details
        server.honest = True
        outcome = env.call(DOWNLOAD + "DownloadTask", request)
        expect(outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.OK}, request)
        responses = [dfdaemon_pb2.DownloadTaskResponse.FromString(raw) for raw in outcome.responses]
        pieces = sorted((response.download_piece_finished_response.piece for response in responses[1:]), key=number)
        assert b"".join(piece.content for piece in pieces) == content
        task_id = responses[0].task_id
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    env.call(CACHE + "EvictTask", ext_pb2.EvictTaskRequest(task_id=task_id, force=True))


def test_download_timeout_expiring_while_the_client_reads(env: Env) -> None:
    """A client that reads slowly: the daemon blocks handing it pieces when its download.timeout passes."""
    download = common_pb2.Download(
        url=env.origin.url("big.bin"), piece_length=1024 * 1024, need_piece_content=True, tag=unique()
    )
    env.must(DOWNLOAD + "DownloadTask", dfdaemon_pb2.DownloadTaskRequest(download=download))  # cached: no origin
    download.timeout.CopyFrom(Duration(nanos=500_000_000))
    request = dfdaemon_pb2.DownloadTaskRequest(download=download)
    stream = env.channels["unix"].unary_stream(
        DOWNLOAD + "DownloadTask", request_serializer=_raw, response_deserializer=_raw
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
    expect(outcome, rpc_at(DOWNLOAD + "DownloadTask"), {Code.DEADLINE_EXCEEDED}, request)


LONG = "x" * 20 * 1024  # past grpc's 16 KiB hard limit on metadata, were it echoed in full


def long_input_cases() -> list[Any]:
    def announce(**fields: Any) -> list[scheduler_pb2.AnnouncePeerRequest]:
        return [scheduler_pb2.AnnouncePeerRequest(**fields)]

    def download(**fields: Any) -> dfdaemon_pb2.DownloadTaskRequest:
        return dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(**fields))

    register = scheduler_pb2.RegisterPeerRequest()
    started = scheduler_pb2.DownloadPeerStartedRequest()
    cases = [
        ("scheduler-StatTask", SCHEDULER + "StatTask", scheduler_pb2.StatTaskRequest(task_id=LONG), Code.NOT_FOUND),
        ("scheduler-StatPeer", SCHEDULER + "StatPeer", scheduler_pb2.StatPeerRequest(peer_id=LONG), Code.NOT_FOUND),
        (
            "scheduler-AnnounceHost-without-ip",
            SCHEDULER + "AnnounceHost",
            scheduler_pb2.AnnounceHostRequest(host=common_pb2.Host(id=LONG)),
            INVALID,
        ),
        (
            "scheduler-AnnouncePeer-unannounced-host",
            SCHEDULER + "AnnouncePeer",
            announce(host_id=LONG, task_id="t", peer_id="p", register_peer_request=register),
            PRECONDITION,
        ),
        (
            "scheduler-AnnouncePeer-unregistered-peer",
            SCHEDULER + "AnnouncePeer",
            announce(peer_id=LONG, download_peer_started_request=started),
            PRECONDITION,
        ),
        (
            "scheduler-AnnouncePeer-lines",
            SCHEDULER + "AnnouncePeer",
            announce(peer_id="a\nb\r\n\tc" * 2000, download_peer_started_request=started),
            PRECONDITION,
        ),
        (
            "daemon-DownloadTask-ftp-url",
            DOWNLOAD + "DownloadTask",
            download(url="ftp://files.invalid/" + LONG),
            INVALID,
        ),
        ("daemon-DownloadTask-url-with-space", DOWNLOAD + "DownloadTask", download(url="http://a b/" + LONG), INVALID),
        ("daemon-DownloadTask-digest", DOWNLOAD + "DownloadTask", download(url="http://a/", digest=LONG), INVALID),
        ("daemon-DownloadTask-origin-404", DOWNLOAD + "DownloadTask", "origin-404", Code.INTERNAL),
        ("daemon-StatLocalTask", DOWNLOAD + "StatLocalTask", dfdaemon_pb2.StatLocalTaskRequest(task_id=LONG), INVALID),
        ("daemon-Acquire", USE + "Acquire", ext_pb2.AcquireRequest(holder=LONG), INVALID),
    ]
    return [pytest.param(path, request, code, id=name) for name, path, request, code in cases]


@pytest.mark.parametrize(("path", "request_", "code"), long_input_cases())
def test_long_input_echoed_in_errors(env: Env, path: str, request_: Any, code: grpc.StatusCode) -> None:
    """Errors quoting a long input keep their status; their details are shortened (``expect`` checks them)."""
    if request_ == "origin-404":
        download = common_pb2.Download(url=env.origin.url("missing-" + LONG))
        request_ = dfdaemon_pb2.DownloadTaskRequest(download=download)
    expect(env.call(path, request_), rpc_at(path), {code}, request_)


# --------------------------------------------------------------------------- Use


def task_ref(env: Env, plan: fs.TaskRefPlan) -> tuple[ext_pb2.TaskRef, str]:
    """The TaskRef for a plan and what it names: "invalid", "absent", "present" or "unknown" (invalid or absent)."""
    if plan.kind == "none":
        return ext_pb2.TaskRef(), "invalid"
    if plan.kind == "task_id":
        task_id = resolve(env, plan.value)
        state = "present" if task_id == env.known_task else "absent" if TASK_ID.fullmatch(task_id) else "invalid"
        return ext_pb2.TaskRef(task_id=task_id), state
    if plan.kind == "blob_digest":
        digest = plan.value.replace(fs.KNOWN_TASK, env.ensure_known())
        match = re.fullmatch(r"(sha256|sha512):([0-9a-f]+)", digest)
        valid = match is not None and len(match.group(2)) == {"sha256": 64, "sha512": 128}[match.group(1)]
        state = "invalid" if not valid else "present" if digest.endswith(env.known_task) else "absent"
        return ext_pb2.TaskRef(blob_digest=digest), state
    if plan.value == fs.KNOWN_TASK:
        env.ensure_known()
        download = common_pb2.Download(url=env.origin.url("small.bin"), piece_length=SMALL_PIECE_LENGTH)
        return ext_pb2.TaskRef(download=download), "present"
    state = "invalid" if plan.value == "" else "unknown"
    return ext_pb2.TaskRef(download=common_pb2.Download(url=plan.value)), state


def duration(value: tuple[int, int]) -> Duration:
    return Duration(seconds=value[0], nanos=value[1])


def ttl_refused(ttl: tuple[int, int] | None) -> bool:
    return ttl is not None and not fs.duration_valid(ttl)


def release_all(env: Env, holder: str) -> None:
    if not fs.holder_refused(holder):
        env.must(USE + "Sync", ext_pb2.SyncRequest(holder=holder))


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
    env: Env, rpc_name: str, holder: str, refs: list[fs.TaskRefPlan], ttl: tuple[int, int] | None
) -> Outcome:
    built = [task_ref(env, ref) for ref in refs]
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
        outcome = env.call(USE + rpc_name, request)
        expect(outcome, rpc_at(USE + rpc_name), use_expectation(rpc_name, holder, states, ttl), request)
        if outcome.code is Code.OK and rpc_name == "Acquire":
            holds = ext_pb2.AcquireResponse.FromString(outcome.responses[0]).holds
            assert {hold.holder for hold in holds} <= {holder}
            if ttl is None:
                assert env.known_task in {hold.task_id for hold in holds} or "present" not in states
    finally:
        release_all(env, holder)
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
    env: Env, rpc_name: str, holder: str, refs: list[fs.TaskRefPlan], ttl: tuple[int, int] | None
) -> None:
    run_use_case(env, rpc_name, holder, refs, ttl)


@pytest.mark.parametrize("rpc_name", USE_RPCS)
def test_listed_use_inputs(env: Env, rpc_name: str) -> None:
    known = [fs.TaskRefPlan("task_id", fs.KNOWN_TASK)]
    for holder in (*fs.REFUSED_HOLDERS, *fs.ACCEPTED_HOLDERS):
        run_use_case(env, rpc_name, holder, known, None)
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
        run_use_case(env, rpc_name, HOLDER_PREFIX + unique(), known, ttl)
    for refs in ([], [fs.TaskRefPlan("none")], [fs.TaskRefPlan("blob_digest", "sha256:" + "A" * 64)]):
        run_use_case(env, rpc_name, HOLDER_PREFIX + unique(), refs, None)
    for task_id in fs.HOSTILE_TASK_IDS:
        run_use_case(env, rpc_name, HOLDER_PREFIX + unique(), [*known, fs.TaskRefPlan("task_id", task_id)], None)


@pytest.mark.parametrize("rpc_name", ["Acquire", "KeepAlive", "Sync"])
@pytest.mark.parametrize(
    ("seconds", "valid"),
    [(HUNDRED_YEARS, True), (HUNDRED_YEARS + 1, False), (fs.DURATION_MAX_SECONDS, False), (fs.I64_MAX, False)],
    ids=["100-years", "100-years-and-1s", "duration-max", "i64-max"],
)
def test_long_ttls_leave_holds_listable(env: Env, rpc_name: str, seconds: int, valid: bool) -> None:
    """Leases up to 100 years are granted and listed (their expiry fits a Timestamp); longer ones are refused."""
    holder = HOLDER_PREFIX + unique()
    ref = ext_pb2.TaskRef(task_id=env.ensure_known())
    long_ttl = Duration(seconds=seconds)
    request: Message
    if rpc_name == "Acquire":
        request = ext_pb2.AcquireRequest(holder=holder, tasks=[ref], ttl=long_ttl)
    elif rpc_name == "KeepAlive":
        env.must(USE + "Acquire", ext_pb2.AcquireRequest(holder=holder, tasks=[ref], ttl=Duration(seconds=60)))
        request = ext_pb2.KeepAliveRequest(holder=holder, ttl=long_ttl)
    else:
        request = ext_pb2.SyncRequest(holder=holder, tasks=[ref], ttl=long_ttl)
    try:
        expect(env.call(USE + rpc_name, request), rpc_at(USE + rpc_name), {Code.OK} if valid else {INVALID}, request)
        listing = ext_pb2.ListHoldsRequest(holder=holder)
        outcome = env.call(USE + "ListHolds", listing)
        expect(outcome, rpc_at(USE + "ListHolds"), {Code.OK}, listing)
        holds = ext_pb2.ListHoldsResponse.FromString(outcome.responses[0]).holds
        held = valid or rpc_name == "KeepAlive"  # a refused KeepAlive leaves the 60 s lease as it was
        assert [hold.task_id for hold in holds] == ([env.known_task] if held else [])
        if held:
            lease = holds[0].expires_at.ToSeconds() - holds[0].acquired_at.ToSeconds()
            assert abs(lease - (seconds if valid else 60)) <= 5, f"a lease of {lease} s"
        references = ext_pb2.GetReferencesRequest(task_id=env.known_task)
        expect(env.call(USE + "GetReferences", references), rpc_at(USE + "GetReferences"), {Code.OK}, references)
    finally:
        env.call(USE + "Sync", ext_pb2.SyncRequest(holder=holder))


@pytest.mark.parametrize("rpc_name", ["Acquire", "KeepAlive", "Sync"])
def test_ttl_a_nanosecond_past_100_years_is_refused(env: Env, rpc_name: str) -> None:
    run_use_case(
        env, rpc_name, HOLDER_PREFIX + unique(), [fs.TaskRefPlan("task_id", fs.KNOWN_TASK)], (HUNDRED_YEARS, 1)
    )


@fuzz(40)
@given(holder=st.none() | fs.holders() | st.sampled_from(fs.HOSTILE_TEXT), task_id=st.none() | fs.task_ids())
def test_fuzzed_list_holds(env: Env, holder: str | None, task_id: str | None) -> None:
    request = ext_pb2.ListHoldsRequest()
    if holder is not None:
        request.holder = holder
    if task_id is not None:
        request.task_id = resolve(env, task_id)
    valid = task_id is None or TASK_ID.fullmatch(request.task_id)
    expect(env.call(USE + "ListHolds", request), rpc_at(USE + "ListHolds"), {Code.OK} if valid else {INVALID}, request)


# --------------------------------------------------------------------------- Cache


def run_cache_case(env: Env, dry_run: bool, limit: int, task_id: str, force: bool) -> None:
    usage = ext_pb2.GetUsageRequest()
    expect(env.call(CACHE + "GetUsage", usage), rpc_at(CACHE + "GetUsage"), {Code.OK}, usage)
    gc = ext_pb2.RunGCRequest(dry_run=dry_run)
    outcome = env.call(CACHE + "RunGC", gc)
    expect(outcome, rpc_at(CACHE + "RunGC"), {Code.OK}, gc)
    assert ext_pb2.GCRun.FromString(outcome.responses[0]).dry_run == dry_run
    runs = ext_pb2.ListGCRunsRequest(limit=limit)
    outcome = env.call(CACHE + "ListGCRuns", runs)
    expect(outcome, rpc_at(CACHE + "ListGCRuns"), {Code.OK}, runs)
    assert 1 <= len(ext_pb2.ListGCRunsResponse.FromString(outcome.responses[0]).runs) <= max(limit, 1)
    run_task_id_case(
        env,
        TaskIdCase("evict", CACHE + "EvictTask", lambda t: ext_pb2.EvictTaskRequest(task_id=t, force=force)),
        task_id,
    )


def test_listed_gc_limits(env: Env) -> None:
    for limit in (0, 1, 2, fs.I32_MAX, fs.I32_MAX + 1, fs.U32_MAX):
        for dry_run in (True, False):
            run_cache_case(env, dry_run, limit, "", False)


@fuzz(30)
@given(
    dry_run=st.booleans(),
    limit=st.sampled_from([0, 1, fs.U32_MAX]) | st.integers(0, fs.U32_MAX),
    task_id=fs.task_ids(),
    force=st.booleans(),
)
def test_fuzzed_cache(env: Env, dry_run: bool, limit: int, task_id: str, force: bool) -> None:
    run_cache_case(env, dry_run, limit, task_id, force)


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
    env: Env, host_id: str, ip: str, port: int, host_type: int, hostname: str, interval: tuple[int, int] | None
) -> None:
    assume(host_id not in {FUZZ_HOST, DAEMON_HOST_ID})
    host = common_pb2.Host(id=host_id, ip=ip, port=port, type=host_type, hostname=hostname)
    request = scheduler_pb2.AnnounceHostRequest(host=host)
    if interval is not None:
        request.interval.CopyFrom(duration(interval))
    refused = not host_id or not ip
    expect(
        env.call(SCHEDULER + "AnnounceHost", request),
        rpc_at(SCHEDULER + "AnnounceHost"),
        {INVALID} if refused else {Code.OK},
        request,
    )
    listing = scheduler_pb2.ListHostsRequest(type=host_type)
    outcome = env.call(SCHEDULER + "ListHosts", listing)
    expect(outcome, rpc_at(SCHEDULER + "ListHosts"), {Code.OK}, listing)
    hosts = scheduler_pb2.ListHostsResponse.FromString(outcome.responses[0]).hosts
    assert all(listed.type == host_type for listed in hosts)
    if not refused and (interval is None or interval[0] * 10**9 + interval[1] >= 10**9):
        assert host_id in {listed.id for listed in hosts}
    if host_id:
        env.must(SCHEDULER + "DeleteHost", scheduler_pb2.DeleteHostRequest(host_id=host_id))


@fuzz(50)
@given(
    host_id=scheduler_ids,
    task_id=scheduler_ids,
    peer_id=scheduler_ids,
    host_type=st.none() | st.integers(0, fs.U32_MAX),
)
def test_fuzzed_scheduler_lookups(env: Env, host_id: str, task_id: str, peer_id: str, host_type: int | None) -> None:
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
        expect(env.call(SCHEDULER + name, request), rpc_at(SCHEDULER + name), allowed, request)


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


def run_announce_stream(env: Env, steps: Sequence[fs.AnnounceStep]) -> None:
    env.announce_fuzz_host()
    nonce = unique()
    registered_peer = f"fuzz-peer-{nonce}"
    messages = [announce_message(item, registered_peer, nonce) for item in steps]
    expected, answers = simulate_announce(steps, registered_peer)
    outcome = env.call(SCHEDULER + "AnnouncePeer", messages)
    shown = [scheduler_pb2.AnnouncePeerRequest.FromString(raw) for raw in messages]
    expect(outcome, rpc_at(SCHEDULER + "AnnouncePeer"), expected, shown)
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
def test_listed_announce_streams(env: Env, name: str) -> None:
    run_announce_stream(env, ANNOUNCE_CASES[name])


@fuzz(80)
@given(steps=fs.announce_streams())
def test_fuzzed_announce_peer_streams(env: Env, steps: list[fs.AnnounceStep]) -> None:
    run_announce_stream(env, steps)


def test_unknown_methods_are_unimplemented(env: Env) -> None:
    for transport, path in (
        ("unix", DOWNLOAD + "NoSuchMethod"),
        ("unix", USE + "NoSuchMethod"),
        ("unix", "/no.such.Service/Method"),
        ("tcp", UPLOAD + "NoSuchMethod"),
        ("scheduler", SCHEDULER + "NoSuchMethod"),
    ):
        unary = env.channels[transport].unary_unary(path, request_serializer=_raw, response_deserializer=_raw)
        with pytest.raises(grpc.RpcError) as caught:
            unary(b"", timeout=CALL_TIMEOUT)
        CASES["(unknown method)"] += 1
        assert cast(grpc.Call, caught.value).code() is Code.UNIMPLEMENTED, path


# --------------------------------------------------------------------------- byte-level mutation


def base_requests(env: Env) -> dict[str, list[Any]]:
    """Valid requests per RPC (a list of messages for the client stream); mutations start from these."""
    known = env.known_task
    absent = "e" * 64
    cached = common_pb2.Download(url=env.origin.url("small.bin"), piece_length=SMALL_PIECE_LENGTH)
    ranged = common_pb2.Download(
        url=env.origin.url("other.bin"),
        tag="mutation",
        range=common_pb2.Range(start=5, length=100),
        need_piece_content=True,
    )
    downloads = [dfdaemon_pb2.DownloadTaskRequest(download=cached), dfdaemon_pb2.DownloadTaskRequest(download=ranged)]
    holder = HOLDER_PREFIX + "mutation"
    refs = [
        ext_pb2.TaskRef(task_id=known),
        ext_pb2.TaskRef(blob_digest="sha256:" + known),
        ext_pb2.TaskRef(download=cached),
    ]
    minute = Duration(seconds=60)

    def peer_request(**member: Any) -> scheduler_pb2.AnnouncePeerRequest:
        return scheduler_pb2.AnnouncePeerRequest(
            host_id=FUZZ_HOST, task_id="fuzz-mutation-task", peer_id="fuzz-mutation-peer", **member
        )

    piece = common_pb2.Piece(number=0, offset=0, length=10, digest="crc32:1", traffic_type=common_pb2.BACK_TO_SOURCE)
    stream = [
        peer_request(
            register_peer_request=scheduler_pb2.RegisterPeerRequest(
                download=common_pb2.Download(url="http://127.0.0.1:1/m")
            )
        ),
        peer_request(
            download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest()
        ),
        peer_request(
            download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                piece=piece
            ),
        ),
        peer_request(
            download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest(),
        ),
    ]
    host = common_pb2.Host(id="fuzz-mutation-host", ip="127.0.0.1", port=1, hostname="mutation")
    bases: dict[str, list[Any]] = {
        UPLOAD + "DownloadTask": downloads,
        UPLOAD + "StatTask": [dfdaemon_pb2.StatTaskRequest(task_id=known, remote_ip="127.0.0.1")],
        UPLOAD + "StatLocalTask": [dfdaemon_pb2.StatLocalTaskRequest(task_id=known)],
        UPLOAD + "DeleteTask": [dfdaemon_pb2.DeleteTaskRequest(task_id=absent)],
        UPLOAD + "SyncPieces": [
            dfdaemon_pb2.SyncPiecesRequest(host_id="fuzz", task_id=known, interested_piece_numbers=[0, 3])
        ],
        UPLOAD + "DownloadPiece": [dfdaemon_pb2.DownloadPieceRequest(host_id="fuzz", task_id=known, piece_number=1)],
        UPLOAD + "SyncHost": [dfdaemon_pb2.SyncHostRequest(host_id="fuzz", peer_id="fuzz-peer")],
        DOWNLOAD + "DownloadTask": downloads,
        DOWNLOAD + "StatTask": [dfdaemon_pb2.StatTaskRequest(task_id=known)],
        DOWNLOAD + "StatLocalTask": [dfdaemon_pb2.StatLocalTaskRequest(task_id=known, remote_ip="127.0.0.1")],
        DOWNLOAD + "ListLocalTasks": [
            dfdaemon_pb2.ListLocalTasksRequest(),
            dfdaemon_pb2.ListLocalTasksRequest(remote_ip="::1"),
        ],
        DOWNLOAD + "DeleteTask": [dfdaemon_pb2.DeleteTaskRequest(task_id=absent)],
        DOWNLOAD + "DeleteLocalTask": [dfdaemon_pb2.DeleteLocalTaskRequest(task_id=absent)],
        DOWNLOAD + "DeleteHost": [Empty()],
        USE + "Acquire": [ext_pb2.AcquireRequest(holder=holder, tasks=refs, ttl=minute)],
        USE + "Release": [ext_pb2.ReleaseRequest(holder=holder, tasks=refs)],
        USE + "KeepAlive": [ext_pb2.KeepAliveRequest(holder=holder, ttl=minute)],
        USE + "Sync": [ext_pb2.SyncRequest(holder=holder, tasks=refs[:1], ttl=minute)],
        USE + "ListHolds": [ext_pb2.ListHoldsRequest(holder=holder, task_id=known)],
        USE + "GetReferences": [ext_pb2.GetReferencesRequest(task_id=known)],
        CACHE + "GetUsage": [ext_pb2.GetUsageRequest()],
        CACHE + "RunGC": [ext_pb2.RunGCRequest(dry_run=True)],
        CACHE + "ListGCRuns": [ext_pb2.ListGCRunsRequest(limit=3)],
        CACHE + "EvictTask": [ext_pb2.EvictTaskRequest(task_id=absent, force=True)],
        SCHEDULER + "AnnouncePeer": [stream],
        SCHEDULER + "StatPeer": [scheduler_pb2.StatPeerRequest(peer_id="fuzz-mutation-peer")],
        SCHEDULER + "DeletePeer": [scheduler_pb2.DeletePeerRequest(peer_id="fuzz-mutation-peer")],
        SCHEDULER + "StatTask": [scheduler_pb2.StatTaskRequest(host_id=FUZZ_HOST, task_id="fuzz-mutation-task")],
        SCHEDULER + "DeleteTask": [scheduler_pb2.DeleteTaskRequest(host_id=FUZZ_HOST, task_id="fuzz-mutation-task")],
        SCHEDULER + "AnnounceHost": [scheduler_pb2.AnnounceHostRequest(host=host, interval=minute)],
        SCHEDULER + "ListHosts": [scheduler_pb2.ListHostsRequest(type=0)],
        SCHEDULER + "DeleteHost": [scheduler_pb2.DeleteHostRequest(host_id="fuzz-mutation-gone")],
    }
    assert set(bases) == set(RPCS), "every RPC needs a valid request to mutate"
    return bases


# RPCs whose valid request changes the whole daemon: DeleteHost takes it out of the cluster (no scheduler from then
# on). They are not probed by the fixture, so that most cases run with the scheduler; their mutations come late.
NOT_PROBED = frozenset({"/dfdaemon.v2.DfdaemonDownload/DeleteHost"})


def learn_blanket_answers(env: Env) -> None:
    """Which RPCs refuse even a valid request, and how (see BLANKET_ANSWERS)."""
    BLANKET_ANSWERS.clear()
    for path, bases in env.bases.items():
        if path in NOT_PROBED:
            continue
        outcome = env.call(path, bases[0])
        if outcome.code in {Code.UNIMPLEMENTED, Code.PERMISSION_DENIED}:
            BLANKET_ANSWERS[path] = outcome.code


def decode(rpc: Rpc, raw: bytes) -> Message | None:
    try:
        return rpc.request_class.FromString(raw)
    except DecodeError:
        return None


def sendable(rpc: Rpc, message: Message) -> bool:
    """Keep decodable mutations away from the network, from writing files anywhere and from the hosts the
    fixture relies on."""
    if isinstance(message, dfdaemon_pb2.DownloadTaskRequest):
        download = message.download
        return (
            not download.HasField("output_path")  # outputs have their own cases, in directories made for them
            and stays_on_this_machine(download.url)
        )
    if isinstance(message, scheduler_pb2.AnnounceHostRequest | scheduler_pb2.DeleteHostRequest):
        host_id = message.host.id if isinstance(message, scheduler_pb2.AnnounceHostRequest) else message.host_id
        return host_id not in {FUZZ_HOST, DAEMON_HOST_ID}
    return True


def mutated_payload(env: Env, rpc: Rpc, data: st.DataObject, decodable: bool) -> bytes | list[bytes]:
    """Mutations of the RPC's valid requests: all decodable (and ``sendable``), or not decodable.

    An undecodable stream starts with 0 to 2 valid registrations (answered first), then the undecodable message,
    then anything: whatever follows, the stream must end INVALID_ARGUMENT.
    """
    bases = env.bases[rpc.path]
    if not rpc.method.client_streaming:
        strategy = fs.mutated([serialize(base) for base in bases])
        if not decodable:
            strategy = st.one_of(st.just(b"\xff"), strategy)  # a truncated varint: never decodes
        payload = data.draw(strategy, label="payload")
        message = decode(rpc, payload)
        assume((message is not None and sendable(rpc, message)) if decodable else message is None)
        return payload
    stream = [serialize(item) for item in bases[0]]
    if not decodable:
        registrations = data.draw(st.integers(0, 2), label="registrations")
        broken = data.draw(st.one_of(st.just(b"\xff"), fs.mutated(stream)), label="undecodable")
        assume(decode(rpc, broken) is None)
        rest = data.draw(st.lists(fs.mutated(stream), max_size=3), label="rest")
        return [stream[0]] * registrations + [broken, *rest]
    chosen = data.draw(st.lists(st.sampled_from(stream), min_size=1, max_size=6), label="messages")
    flips = data.draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)), label="mutate")
    messages = [data.draw(fs.mutations(raw)) if flip else raw for raw, flip in zip(chosen, flips, strict=True)]
    assume(all((message := decode(rpc, raw)) is not None and sendable(rpc, message) for raw in messages))
    return messages


def mutation_expectation(rpc: Rpc) -> set[grpc.StatusCode]:
    allowed = set(ANY_VALID_ANSWER)
    if rpc.method.name == "DownloadTask":
        allowed |= {Code.INTERNAL, Code.DEADLINE_EXCEEDED}  # origin failures; the caller's own timeout
    if rpc.path == UPLOAD + "DownloadTask":
        allowed.add(Code.PERMISSION_DENIED)  # network callers are kept from internal origins
    return allowed


NON_DOWNLOAD_RPCS = sorted(path for path in RPCS if not path.endswith("/DownloadTask"))
DOWNLOAD_RPCS = sorted(path for path in RPCS if path.endswith("/DownloadTask"))


@pytest.mark.parametrize("path", NON_DOWNLOAD_RPCS)
@fuzz(25)
@given(data=st.data())
def test_mutated_requests(env: Env, path: str, data: st.DataObject) -> None:
    rpc = rpc_at(path)
    payload = mutated_payload(env, rpc, data, decodable=True)
    expect(env.call(path, payload), rpc, mutation_expectation(rpc), payload)
    if path.startswith(USE):
        env.must(USE + "Sync", ext_pb2.SyncRequest(holder=HOLDER_PREFIX + "mutation"))


@pytest.mark.parametrize("path", DOWNLOAD_RPCS)
@fuzz(15)
@given(data=st.data())
def test_mutated_download_requests(env: Env, path: str, data: st.DataObject) -> None:
    rpc = rpc_at(path)
    payload = mutated_payload(env, rpc, data, decodable=True)
    expect(env.call(path, payload), rpc, mutation_expectation(rpc), payload)


@pytest.mark.parametrize("path", sorted(RPCS))
@fuzz(8)
@given(data=st.data())
def test_undecodable_requests_are_invalid_argument(env: Env, path: str, data: st.DataObject) -> None:
    """Bytes that are no valid request: INVALID_ARGUMENT on every RPC, even those declared but not served or
    turned off (the request is refused before the servicer is chosen)."""
    rpc = rpc_at(path)
    if path == SCHEDULER + "AnnouncePeer":
        env.announce_fuzz_host()  # the registrations before the undecodable message need the host
    payload = mutated_payload(env, rpc, data, decodable=False)
    expect(env.call(path, payload), rpc, {INVALID}, payload, fixed=True)


# --------------------------------------------------------------------------- the count


def test_zz_cases_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """Print the calls each RPC received (runs last: pytest keeps the file's order)."""
    if not CASES:
        pytest.skip("no fuzz case ran in this session")
    width = max(len(path) for path in CASES)
    lines = [f"{path:<{width}}  {CASES[path]:>6}" for path in sorted(CASES)]
    lines.append(f"{'total':<{width}}  {sum(CASES.values()):>6}")
    with capsys.disabled():
        print("\nfuzz cases per RPC:\n" + "\n".join(lines))
