"""Shared machinery of the RPC fuzz tests (``tests/test_fuzz_*.py``): the processes, calling and judging.

Real processes (an origin, the scheduler stub, one daemon using it) start once per test module. Every RPC of
``dfdaemon.v2.DfdaemonUpload`` (TCP), ``dfdaemon.v2.DfdaemonDownload``, ``dfdaemon.ext.v1.Use`` and
``dfdaemon.ext.v1.Cache`` (unix socket) and ``scheduler.v2.Scheduler`` (TCP) receives generated messages,
listed hostile values and byte-level mutations of valid requests, sent raw so that even undecodable bytes
reach the server. For every call:

- it ends with an expected status, never UNKNOWN (an exception escaped a servicer) and never by running
  into the client's deadline (a hang); INTERNAL only where the origin (or the download itself) failed;
- a refusal says why, on one line of at most 1024 characters (however long the input it quotes);
- afterwards both processes still run and report SERVING, and nothing changed on disk outside the daemon's
  ``storage.dir`` and the output files the test asked for (a snapshot of the environment's directory tree,
  which also holds the files symlinks point to, is compared after every test).

Every test stands alone: it creates what it needs (``Env.ensure_known`` downloads the known task again if
another test deleted it) and releases the holds it took. The calls each RPC received are printed at the end
of the session (see ``tests/conftest.py``).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import stat
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
import pytest
import yarl
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, assume, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from dfdaemon.api import common_pb2, dfdaemon_pb2, scheduler_pb2
from dfdaemon.api import dfdaemon_ext_pb2 as ext_pb2
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests import fuzz_strategies as fs
from tests.storage_support import seeded_bytes
from tests.support import (
    DaemonProcess,
    OriginProcess,
    SchedulerProcess,
    merge,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
)

# The marks of every fuzz module: the guard runs around each test (see ``guarded``).
FUZZ_MARKS = [
    pytest.mark.slow,
    pytest.mark.usefixtures("fuzz_guard"),
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

# Calls made per RPC (full method path): a tally printed at the end of the session, never asserted on.
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
UPLOAD = "/dfdaemon.v2.DfdaemonUpload/"
DOWNLOAD = "/dfdaemon.v2.DfdaemonDownload/"
USE = "/dfdaemon.ext.v1.Use/"
CACHE = "/dfdaemon.ext.v1.Cache/"
SCHEDULER = "/scheduler.v2.Scheduler/"
# Declared by the mirrored API 2.3 (cache, persistent and persistent-cache tasks, task entries) but served by
# neither the daemon nor the stub.
NOT_SERVED = frozenset(
    path
    for path in RPCS
    if any(word in path.rsplit("/", 1)[1] for word in ("Cache", "Persistent", "Entries"))
    or path.endswith(("/StatImage", "/StatFile"))
)


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


def as_is(data: bytes) -> bytes:
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
    env: Env, outcome: Outcome, rpc: Rpc, allowed: Iterable[grpc.StatusCode], request: object, *, fixed: bool = False
) -> None:
    """Count the call and judge its status; an RPC that refuses everything must refuse this too, alike.

    ``fixed``: the status does not depend on the RPC's implementation (undecodable bytes), ``allowed`` is exact.
    """
    CASES[rpc.path] += 1
    if rpc.path in ENDLESS_STREAMS and outcome.code is Code.DEADLINE_EXCEEDED and outcome.responses:
        outcome = replace(outcome, code=Code.OK, details="")  # the stream was still going: the caller left
    if currently_in_test_context():
        event(f"{rpc.method.name}: {outcome.code.name}")  # shown by --hypothesis-show-statistics
    blanket = env.blanket.get(rpc.path)
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
    # RPCs that answer every request alike: declared by the mirrored API but not served (UNIMPLEMENTED), or
    # turned off by the daemon's configuration (PERMISSION_DENIED). Learnt at start by sending each RPC a valid
    # request; every fuzzed input must then get that same answer.
    blanket: dict[str, grpc.StatusCode] = field(default_factory=dict)

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
                stream = channel.stream_stream(path, request_serializer=as_is, response_deserializer=as_is)
                responses.extend(stream(iter([serialize(item) for item in items]), timeout=timeout))
            else:
                assert isinstance(request, Message | bytes)
                if rpc.method.server_streaming:
                    call = channel.unary_stream(path, request_serializer=as_is, response_deserializer=as_is)
                    responses.extend(call(serialize(request), timeout=timeout))
                else:
                    unary = channel.unary_unary(path, request_serializer=as_is, response_deserializer=as_is)
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


@contextmanager
def fuzz_environment(root: Path) -> Iterator[Env]:
    """An origin, the scheduler stub and one daemon using it, under ``root``; stopped on leaving."""
    files = {
        "small.bin": seeded_bytes("fuzz_rpc_support-1", fs.SMALL_SIZE),
        "empty.bin": b"",
        "slow.bin": seeded_bytes("fuzz_rpc_support-2", 6000),
        "other.bin": seeded_bytes("fuzz_rpc_support-3", 3000),
        # More than gRPC's flow control lets through unread:
        "big.bin": seeded_bytes("fuzz_rpc_support-4", 8 * 1024 * 1024),
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
    """Every path under the environment's directory (the daemon's storage and logs aside), plus /etc/passwd."""
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


@contextmanager
def guarded(env: Env) -> Iterator[None]:
    """Around one test (one batch of examples): afterwards both processes serve, and nothing changed where it
    must not. Only the paths this test created or asked for may change: earlier tests' leave no allowance."""
    env.own.clear()
    env.requested.clear()
    before = snapshot(env)
    yield
    assert_serving(env)
    after = snapshot(env)
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    unexpected = sorted(str(path) for path in changed - env.own - env.requested)
    assert not unexpected, f"paths changed outside storage.dir and the requested outputs: {unexpected[:20]}"


def release_every_hold(env: Env) -> None:
    """Release whatever any holder holds: a mutated holder name cannot be predicted, and no hold may outlive
    the test that took it."""
    outcome = env.must(USE + "ListHolds", ext_pb2.ListHoldsRequest())
    for holder in sorted({hold.holder for hold in ext_pb2.ListHoldsResponse.FromString(outcome.responses[0]).holds}):
        env.must(USE + "Sync", ext_pb2.SyncRequest(holder=holder))


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
    expect(env, env.call(case.path, request), rpc_at(case.path), task_id_expectation(env, case, task_id), request)


def task_id_cases(*services: str) -> list[Any]:
    """The task-id cases of some services (their path prefixes), as pytest parameters."""
    return [pytest.param(case, id=case.name) for case in TASK_ID_CASES if case.path.startswith(services)]


def run_listed_task_ids(env: Env, case: TaskIdCase) -> None:
    for task_id in fs.HOSTILE_TASK_IDS:
        run_task_id_case(env, case, task_id)
    run_task_id_case(env, case, "f" * 64)
    run_task_id_case(env, case, fs.KNOWN_TASK)


# --------------------------------------------------------------------------- URLs


def url_refused(url: str) -> bool:
    """Whether DownloadTask refuses a URL before any work: empty, spaces or control characters, no http(s)
    scheme, no host, or nothing the HTTP client's URL type (yarl's, as aiohttp uses) can parse."""
    if not url or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        return True
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
            return True
        yarl.URL(url)
    except ValueError:  # yarl's errors, UnicodeError for a bad IDNA name included, are ValueErrors
        return True
    return False


def stays_on_this_machine(url: str) -> bool:
    """Refused up front, or aimed at a loopback address (by both parsers): fuzzing must not test the network."""
    if url_refused(url):
        return True
    try:
        hosts = {urlsplit(url).hostname or "", yarl.URL(url).host or ""}
        return all(ipaddress.ip_address(host.strip("[]")).is_loopback for host in hosts)
    except ValueError:
        return False


# --------------------------------------------------------------------------- small helpers


def unique() -> str:
    return uuid.uuid4().hex


def duration(value: tuple[int, int]) -> Duration:
    return Duration(seconds=value[0], nanos=value[1])


HUNDRED_YEARS = fs.MAX_DURATION_SECONDS


# --------------------------------------------------------------------------- long inputs in errors


LONG = "x" * 20 * 1024  # past grpc's 16 KiB hard limit on metadata, were it echoed in full
ORIGIN_404 = "origin-404"  # stands for a DownloadTask of a missing origin file with a long name


def long_input_cases(*services: str) -> list[Any]:
    """Inputs past gRPC's metadata limit that errors quote, for the RPCs of some services."""

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
        ("daemon-DownloadTask-origin-404", DOWNLOAD + "DownloadTask", ORIGIN_404, Code.INTERNAL),
        ("daemon-StatLocalTask", DOWNLOAD + "StatLocalTask", dfdaemon_pb2.StatLocalTaskRequest(task_id=LONG), INVALID),
        ("daemon-Acquire", USE + "Acquire", ext_pb2.AcquireRequest(holder=LONG), INVALID),
    ]
    return [
        pytest.param(path, request, code, id=name) for name, path, request, code in cases if path.startswith(services)
    ]


def run_long_input(env: Env, path: str, request: Any, code: grpc.StatusCode) -> None:
    """Errors quoting a long input keep their status; their details are shortened (``expect`` checks them)."""
    if request == ORIGIN_404:
        download = common_pb2.Download(url=env.origin.url("missing-" + LONG))
        request = dfdaemon_pb2.DownloadTaskRequest(download=download)
    expect(env, env.call(path, request), rpc_at(path), {code}, request)


# --------------------------------------------------------------------------- unknown methods

UNKNOWN_METHODS = (
    ("unix", DOWNLOAD + "NoSuchMethod"),
    ("unix", USE + "NoSuchMethod"),
    ("unix", "/no.such.Service/Method"),
    ("tcp", UPLOAD + "NoSuchMethod"),
    ("scheduler", SCHEDULER + "NoSuchMethod"),
)


def check_unknown_method(env: Env, transport: str, path: str) -> None:
    unary = env.channels[transport].unary_unary(path, request_serializer=as_is, response_deserializer=as_is)
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
        # Valid, and refused FAILED_PRECONDITION: no host has that address (so nothing is downloaded).
        SCHEDULER + "PreheatFile": [
            scheduler_pb2.PreheatFileRequest(url="http://127.0.0.1:9/fuzz", scope="all_peers", ips=["192.0.2.1"])
        ],
        SCHEDULER + "PreheatImage": [
            scheduler_pb2.PreheatImageRequest(
                url="http://127.0.0.1:9/v2/fuzz/manifests/1", scope="all_seed_peers", ips=["192.0.2.1"]
            )
        ],
    }
    # The rest of the mirrored API 2.3 (cache and persistent families) is declared but served by neither
    # the daemon nor the stub: any request will do, and learn_blanket_answers must then find UNIMPLEMENTED.
    for path in NOT_SERVED:
        assert path not in bases, f"{path} is served: move it out of NOT_SERVED"
        empty = RPCS[path].request_class()
        bases[path] = [[empty]] if RPCS[path].method.client_streaming else [empty]
    assert set(bases) == set(RPCS), "every RPC needs a valid request to mutate"
    return bases


# RPCs whose valid request changes the whole daemon: DeleteHost takes it out of the cluster (no scheduler from then
# on). They are not probed at start, and their mutations run against a daemon of their own.
NOT_PROBED = frozenset({"/dfdaemon.v2.DfdaemonDownload/DeleteHost"})


def learn_blanket_answers(env: Env) -> None:
    """Which RPCs refuse even a valid request, and how (see ``Env.blanket``)."""
    for path, bases in env.bases.items():
        if path in NOT_PROBED:
            continue
        outcome = env.call(path, bases[0])
        if outcome.code in {Code.UNIMPLEMENTED, Code.PERMISSION_DENIED}:
            env.blanket[path] = outcome.code
    served = sorted(path for path in NOT_SERVED if env.blanket.get(path) is not Code.UNIMPLEMENTED)
    assert not served, f"listed as not served, yet they answered: {served}"


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
    if isinstance(message, scheduler_pb2.PreheatFileRequest | scheduler_pb2.PreheatImageRequest):
        # Only preheats that reach no host: a chosen host would download in the background, under other cases.
        narrowed = bool(message.ips) and all(ip.startswith("192.0.2.") for ip in message.ips)
        return stays_on_this_machine(message.url) and narrowed and message.scope in {"all_peers", "all_seed_peers"}
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


def rpc_paths(*services: str, download_task: bool | None = None) -> list[str]:
    """The RPCs of some services (their path prefixes): all, only DownloadTask, or all but DownloadTask."""
    return sorted(
        path for path in RPCS if path.startswith(services) and download_task in {None, path.endswith("/DownloadTask")}
    )


def unknown_methods(*services: str) -> list[tuple[str, str]]:
    """Methods no server defines, on the channels of some services (their path prefixes)."""
    return [(transport, path) for transport, path in UNKNOWN_METHODS if path.startswith(services)]


def run_mutated(env: Env, path: str, data: st.DataObject) -> None:
    """One decodable mutation of the RPC's valid requests; no hold it took outlives it."""
    rpc = rpc_at(path)
    payload = mutated_payload(env, rpc, data, decodable=True)
    expect(env, env.call(path, payload), rpc, mutation_expectation(rpc), payload)
    if path.startswith(USE):
        release_every_hold(env)


def run_undecodable(env: Env, path: str, data: st.DataObject) -> None:
    """Bytes that are no valid request: INVALID_ARGUMENT on every RPC, even those declared but not served or
    turned off (the request is refused before the servicer is chosen)."""
    rpc = rpc_at(path)
    if path == SCHEDULER + "AnnouncePeer":
        env.announce_fuzz_host()  # the registrations before the undecodable message need the host
    payload = mutated_payload(env, rpc, data, decodable=False)
    # A client stream to an RPC nobody serves is refused before its first message is read, as gRPC itself does.
    unread = path in NOT_SERVED and rpc.method.client_streaming
    expect(env, env.call(path, payload), rpc, {Code.UNIMPLEMENTED} if unread else {INVALID}, payload, fixed=True)
