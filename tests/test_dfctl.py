"""dfctl against a real gRPC server on a unix socket whose fake servicers record requests and send canned replies."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from dfdaemon.api import common_pb2, dfdaemon_pb2
from dfdaemon.api import dfdaemon_ext_pb2 as ext
from dfdaemon.cli import dfctl
from dfdaemon.config import DEFAULT_SOCKET_PATH
from dfdaemon.rpc import download
from dfdaemon.rpc import ext as ext_rpc
from dfdaemon.rpc.servers import add_service
from tests.support import run_module

TASK_A = hashlib.sha256(b"layer a").hexdigest()
TASK_B = hashlib.sha256(b"layer b").hexdigest()
TASK_C = hashlib.sha256(b"layer c").hexdigest()
SHA512_HEX = hashlib.sha512(b"model").hexdigest()
MIB = 1024 * 1024
# 2023-11-14T22:13:20Z and five minutes later.
T0 = Timestamp(seconds=1_700_000_000)
T1 = Timestamp(seconds=1_700_000_300, nanos=500_000_000)
LOCAL_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

Reply = Message | tuple[grpc.StatusCode, str]
Handler = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]


class FakeDaemon:
    """Serves every RPC of the socket's services: records the request, answers from ``replies``.

    An RPC without a canned reply answers UNIMPLEMENTED, as the real daemon does for what it does not serve yet.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.replies: dict[str, Reply] = {}
        self.requests: dict[str, list[Message]] = defaultdict(list)

    def __getattr__(self, rpc: str) -> Handler:
        if not rpc[:1].isupper():
            raise AttributeError(rpc)

        async def handle(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            self.requests[rpc].append(request)
            reply = self.replies.get(rpc, (grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not implemented yet"))
            if isinstance(reply, tuple):
                await context.abort(*reply)
            return reply

        return handle

    def only_request(self, rpc: str) -> Any:
        """The single request ``rpc`` received; dfctl makes one call per RPC it needs."""
        assert len(self.requests[rpc]) == 1, dict(self.requests)
        return self.requests[rpc][0]


@pytest.fixture
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FakeDaemon]:
    # A short directory of its own: unix socket paths are limited to about 100 bytes.
    fake = FakeDaemon(tmp_path_factory.mktemp("sock") / "dfdaemon.sock")
    server = grpc.aio.server()
    for service in (download.SERVICE, ext_rpc.USE_SERVICE, ext_rpc.CACHE_SERVICE):
        add_service(server, service, fake)
    server.add_insecure_port(f"unix:{fake.socket_path}")
    await server.start()
    yield fake
    await server.stop(None)


async def run(daemon: FakeDaemon, *argv: str) -> int:
    """dfctl in a worker thread: its sync channel blocks, and the server needs this event loop."""
    return await asyncio.to_thread(dfctl.main, ["-e", str(daemon.socket_path), *argv])


async def run_json(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = await run(daemon, "--json", *argv)
    out = capsys.readouterr()
    assert (code, out.err) == (0, "")
    return json.loads(out.out)


async def run_text(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = await run(daemon, *argv)
    out = capsys.readouterr()
    assert (code, out.err) == (0, "")
    return out.out


def exit_code(argv: list[str]) -> int:
    """main's exit code, also when argparse ends the program with SystemExit."""
    try:
        return dfctl.main(argv)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        return exc.code


def column(table: str, row: int, header: str) -> str:
    """The cell of ``row`` (0 is the header) under ``header``, read by the header's position."""
    lines = table.splitlines()
    start = lines[0].index(header)
    return lines[row][start:].split("  ")[0]


def finished_task() -> dfdaemon_pb2.StatLocalTaskResponse:
    return dfdaemon_pb2.StatLocalTaskResponse(
        task_id=TASK_A,
        piece_length=4 * MIB,
        content_length=5 * MIB,
        response_header={"Content-Type": "application/octet-stream"},
        uploading_count=1,
        uploaded_count=7,
        created_at=T0,
        updated_at=T1,
        finished_at=T1,
    )


def hold(task_id: str, holder: str, expires: bool = False) -> ext.Hold:
    return ext.Hold(task_id=task_id, holder=holder, acquired_at=T0, expires_at=T1 if expires else None)


# --------------------------------------------------------------------------- task


async def test_task_ls_json(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["ListLocalTasks"] = dfdaemon_pb2.ListLocalTasksResponse(
        tasks=[finished_task(), dfdaemon_pb2.StatLocalTaskResponse(task_id=TASK_B, created_at=T0)]
    )
    data = await run_json(daemon, capsys, "task", "ls")
    assert daemon.only_request("ListLocalTasks") == dfdaemon_pb2.ListLocalTasksRequest()
    assert data == {
        "tasks": [
            {
                "task_id": TASK_A,
                "state": "finished",
                "content_length": 5 * MIB,
                "piece_length": 4 * MIB,
                "uploading_count": 1,
                "uploaded_count": 7,
                "response_header": {"Content-Type": "application/octet-stream"},
                "created_at": "2023-11-14T22:13:20Z",
                "updated_at": "2023-11-14T22:18:20.500Z",
                "prefetched_at": None,
                "failed_at": None,
                "finished_at": "2023-11-14T22:18:20.500Z",
            },
            {
                "task_id": TASK_B,
                "state": "unfinished",
                "content_length": None,
                "piece_length": None,
                "uploading_count": 0,
                "uploaded_count": 0,
                "response_header": {},
                "created_at": "2023-11-14T22:13:20Z",
                "updated_at": None,
                "prefetched_at": None,
                "failed_at": None,
                "finished_at": None,
            },
        ]
    }


async def test_task_ls_table(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    failed = dfdaemon_pb2.StatLocalTaskResponse(task_id=TASK_B, failed_at=T1)
    daemon.replies["ListLocalTasks"] = dfdaemon_pb2.ListLocalTasksResponse(tasks=[finished_task(), failed])
    table = await run_text(daemon, capsys, "task", "ls")
    lines = table.splitlines()
    assert lines[0].split() == ["TASK", "ID", "STATE", "SIZE", "UPLOADING", "UPLOADED", "UPDATED"]
    assert len(lines) == 3
    assert [column(table, 1, h) for h in ("TASK ID", "STATE", "SIZE", "UPLOADING", "UPLOADED")] == [
        TASK_A,
        "finished",
        "5.0 MiB",
        "1",
        "7",
    ]
    assert LOCAL_TIME.fullmatch(column(table, 1, "UPDATED"))
    assert [column(table, 2, h) for h in ("TASK ID", "STATE", "SIZE", "UPDATED")] == [TASK_B, "failed", "-", "-"]


async def test_task_stat_adds_references(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["StatLocalTask"] = finished_task()
    daemon.replies["GetReferences"] = ext.TaskReferences(
        task_id=TASK_A,
        holds=[hold(TASK_A, "container:default/abc"), hold(TASK_A, "user:alice", expires=True)],
        downloads=1,
        refcount=3,
    )
    data = await run_json(daemon, capsys, "task", "stat", TASK_A.upper())
    assert daemon.only_request("StatLocalTask").task_id == TASK_A
    assert daemon.only_request("GetReferences").task_id == TASK_A
    assert data["task_id"] == TASK_A
    assert data["state"] == "finished"
    assert data["references"] == {
        "holds": [
            {
                "task_id": TASK_A,
                "holder": "container:default/abc",
                "acquired_at": "2023-11-14T22:13:20Z",
                "expires_at": None,
            },
            {
                "task_id": TASK_A,
                "holder": "user:alice",
                "acquired_at": "2023-11-14T22:13:20Z",
                "expires_at": "2023-11-14T22:18:20.500Z",
            },
        ],
        "downloads": 1,
        "uploads": 0,
        "refcount": 3,
    }

    text = await run_text(daemon, capsys, "task", "stat", TASK_A)
    fields, holds = text.split("\n\n")
    assert re.search(r"^refcount +3$", fields, re.MULTILINE)
    assert re.search(r"^content length +5\.0 MiB$", fields, re.MULTILINE)
    assert holds.splitlines()[0].split() == ["HOLDER", "ACQUIRED", "EXPIRES"]
    assert column(holds, 1, "HOLDER") == "container:default/abc"
    assert column(holds, 1, "EXPIRES") == "never"
    assert LOCAL_TIME.fullmatch(column(holds, 2, "EXPIRES"))


async def test_task_rm_asks_the_daemon_to_delete(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["DeleteTask"] = Empty()
    data = await run_json(daemon, capsys, "task", "rm", TASK_A)
    assert daemon.only_request("DeleteTask").task_id == TASK_A
    assert "EvictTask" not in daemon.requests
    assert data == {"task_id": TASK_A, "force": False, "released_holders": [], "bytes": None}


async def test_task_rm_force_evicts(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["EvictTask"] = ext.EvictTaskResponse(released_holders=["container:default/abc"], bytes=5 * MIB)
    data = await run_json(daemon, capsys, "task", "rm", "--force", TASK_A)
    assert daemon.only_request("EvictTask") == ext.EvictTaskRequest(task_id=TASK_A, force=True)
    assert "DeleteTask" not in daemon.requests
    assert data == {"task_id": TASK_A, "force": True, "released_holders": ["container:default/abc"], "bytes": 5 * MIB}

    text = await run_text(daemon, capsys, "task", "rm", TASK_A, "--force")
    assert re.search(r"^released holders +container:default/abc$", text, re.MULTILINE)
    assert re.search(r"^freed +5\.0 MiB$", text, re.MULTILINE)


async def test_refused_call_is_one_line_and_exit_1(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["DeleteTask"] = (grpc.StatusCode.FAILED_PRECONDITION, "task is held by\ncontainer:default/abc")
    assert await run(daemon, "--json", "task", "rm", TASK_A) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"dfctl: task rm {TASK_A[:12]}…: FAILED_PRECONDITION: task is held by container:default/abc\n"


async def test_unimplemented_rpc_is_reported_by_name(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run(daemon, "gc", "run") == 1
    assert capsys.readouterr().err == "dfctl: gc run: UNIMPLEMENTED: RunGC is not implemented yet\n"


# --------------------------------------------------------------------------- use


async def test_use_acquire_sends_holder_ttl_and_every_kind_of_ref(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["Acquire"] = ext.AcquireResponse(holds=[hold(TASK_A, "container:default/abc", expires=True)])
    url = "https://registry.example/v2/library/app/blobs/sha256:" + TASK_B + "?X-Amz-Signature=s"
    data = await run_json(
        daemon,
        capsys,
        "use",
        "acquire",
        "--holder",
        "container:default/abc",
        "--ttl",
        "10m",
        TASK_A,
        "sha256:" + TASK_B,
        "SHA512:" + SHA512_HEX.upper(),
        "url=" + url,
        "--tag",
        "v1",
        "--application",
        "app",
        "--piece-length",
        "4MiB",
        "--filtered-query-param",
        "X-Amz-Signature",
        "--filtered-query-param",
        "Expires",
    )
    request = daemon.only_request("Acquire")
    assert request.holder == "container:default/abc"
    assert request.ttl == Duration(seconds=600)
    assert [ref.WhichOneof("ref") for ref in request.tasks] == ["task_id", "blob_digest", "blob_digest", "download"]
    assert request.tasks[0].task_id == TASK_A
    assert request.tasks[1].blob_digest == "sha256:" + TASK_B
    assert request.tasks[2].blob_digest == "sha512:" + SHA512_HEX
    # Exactly the fields the options name, nothing more: the daemon computes the task id from what is set.
    assert request.tasks[3].download == common_pb2.Download(
        url=url,
        tag="v1",
        application="app",
        piece_length=4 * MIB,
        filtered_query_params=["X-Amz-Signature", "Expires"],
    )
    assert data == {
        "holder": "container:default/abc",
        "holds": [
            {
                "task_id": TASK_A,
                "holder": "container:default/abc",
                "acquired_at": "2023-11-14T22:13:20Z",
                "expires_at": "2023-11-14T22:18:20.500Z",
            }
        ],
    }


async def test_use_acquire_without_ttl_is_permanent(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["Acquire"] = ext.AcquireResponse(holds=[hold(TASK_A, "user:alice")])
    # Connection options are accepted after the command too.
    assert await run(daemon, "use", "acquire", "--holder", "user:alice", TASK_A, "--timeout", "5s") == 0
    request = daemon.only_request("Acquire")
    assert not request.HasField("ttl")
    assert not request.tasks[0].HasField("download")
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["TASK", "ID", "HOLDER", "ACQUIRED", "EXPIRES"]
    assert [column(table, 1, h) for h in ("TASK ID", "HOLDER", "EXPIRES")] == [TASK_A, "user:alice", "never"]


async def test_use_release(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["Release"] = ext.ReleaseResponse(released=[TASK_A])
    data = await run_json(daemon, capsys, "use", "release", "--holder", "user:alice", TASK_A, "url=https://a.example/f")
    request = daemon.only_request("Release")
    assert request.holder == "user:alice"
    assert request.tasks[0].task_id == TASK_A
    assert request.tasks[1].download == common_pb2.Download(url="https://a.example/f")
    assert data == {"holder": "user:alice", "released": [TASK_A]}


async def test_use_sync_without_refs_releases_all(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["Sync"] = ext.SyncResponse(released=[TASK_A, TASK_B])
    data = await run_json(daemon, capsys, "use", "sync", "--holder", "pod:default/web", "--ttl", "90")
    request = daemon.only_request("Sync")
    assert (request.holder, list(request.tasks), request.ttl) == ("pod:default/web", [], Duration(seconds=90))
    assert data == {
        "holder": "pod:default/web",
        "acquired": [],
        "released": [TASK_A, TASK_B],
        "kept": [],
        "missing": [],
    }


async def test_use_sync_table(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["Sync"] = ext.SyncResponse(acquired=[TASK_B], kept=[TASK_A], missing=[TASK_C])
    table = await run_text(daemon, capsys, "use", "sync", "--holder", "pod:default/web", TASK_A, TASK_B)
    assert not daemon.only_request("Sync").HasField("ttl")
    assert [line.split() for line in table.splitlines()] == [
        ["CHANGE", "TASK", "ID"],
        ["acquired", TASK_B],
        ["kept", TASK_A],
        ["missing", TASK_C],
    ]


async def test_use_keepalive(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["KeepAlive"] = ext.KeepAliveResponse(holds=[hold(TASK_A, "user:alice", expires=True)])
    data = await run_json(daemon, capsys, "use", "keepalive", "--holder", "user:alice", "--ttl", "2h")
    assert daemon.only_request("KeepAlive") == ext.KeepAliveRequest(holder="user:alice", ttl=Duration(seconds=7200))
    assert data["holds"][0]["expires_at"] == "2023-11-14T22:18:20.500Z"


async def test_use_ls_filters(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["ListHolds"] = ext.ListHoldsResponse(holds=[hold(TASK_A, "user:alice")])
    data = await run_json(daemon, capsys, "use", "ls", "--holder", "user:alice", "--task", TASK_A)
    assert daemon.only_request("ListHolds") == ext.ListHoldsRequest(holder="user:alice", task_id=TASK_A)
    assert [h["holder"] for h in data["holds"]] == ["user:alice"]

    daemon.requests.clear()
    table = await run_text(daemon, capsys, "use", "ls")
    request = daemon.only_request("ListHolds")
    assert not request.HasField("holder")
    assert not request.HasField("task_id")
    assert column(table, 1, "HOLDER") == "user:alice"
    assert LOCAL_TIME.fullmatch(column(table, 1, "ACQUIRED"))


# --------------------------------------------------------------------------- gc and usage


def gc_run() -> ext.GCRun:
    return ext.GCRun(
        id=7,
        dry_run=True,
        trigger="manual",
        started_at=T0,
        finished_at=T1,
        bytes_before=300 * MIB,
        bytes_after=100 * MIB,
        evicted=[ext.GCEviction(task_id=TASK_B, reason="quota", bytes=200 * MIB)],
        skipped=[
            ext.GCSkip(
                task_id=TASK_A,
                reason="held",
                holders=["container:default/abc", "user:alice"],
                downloads=2,
                bytes=100 * MIB,
            )
        ],
        quota_exceeded_by_data_in_use=True,
    )


async def test_gc_run_dry_run_json(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["RunGC"] = gc_run()
    data = await run_json(daemon, capsys, "gc", "run", "--dry-run")
    assert daemon.only_request("RunGC") == ext.RunGCRequest(dry_run=True)
    assert data == {
        "id": 7,
        "trigger": "manual",
        "dry_run": True,
        "started_at": "2023-11-14T22:13:20Z",
        "finished_at": "2023-11-14T22:18:20.500Z",
        "bytes_before": 300 * MIB,
        "bytes_after": 100 * MIB,
        "quota_exceeded_by_data_in_use": True,
        "evicted": [{"task_id": TASK_B, "reason": "quota", "bytes": 200 * MIB}],
        "skipped": [
            {
                "task_id": TASK_A,
                "reason": "held",
                "holders": ["container:default/abc", "user:alice"],
                "downloads": 2,
                "uploads": 0,
                "bytes": 100 * MIB,
            }
        ],
    }


async def test_gc_run_without_dry_run(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["RunGC"] = ext.GCRun(id=8, trigger="manual")
    text = await run_text(daemon, capsys, "gc", "run")
    assert daemon.only_request("RunGC") == ext.RunGCRequest(dry_run=False)
    assert re.search(r"^dry run +no$", text, re.MULTILINE)
    assert "quota exceeded" not in text
    assert "evicted:" not in text


async def test_gc_report_text(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["ListGCRuns"] = ext.ListGCRunsResponse(runs=[gc_run(), ext.GCRun(id=6, trigger="interval")])
    text = await run_text(daemon, capsys, "gc", "report", "--limit", "2")
    assert daemon.only_request("ListGCRuns") == ext.ListGCRunsRequest(limit=2)
    newest, older = text.split("\n\n")
    for pattern in (
        r"^gc run +7$",
        r"^trigger +manual$",
        r"^dry run +yes$",
        r"^bytes before +300\.0 MiB$",
        r"^bytes after +100\.0 MiB$",
        r"^quota exceeded by data in use$",
        r"^evicted:$",
        r"^skipped:$",
    ):
        assert re.search(pattern, newest, re.MULTILINE), pattern
    evicted = newest.split("evicted:\n")[1].split("\nskipped:")[0]
    assert [column(evicted, 1, h).strip() for h in ("TASK ID", "REASON", "SIZE")] == [TASK_B, "quota", "200.0 MiB"]
    skipped = newest.split("skipped:\n")[1]
    assert [column(skipped, 1, h).strip() for h in ("TASK ID", "REASON", "SIZE")] == [TASK_A, "held", "100.0 MiB"]
    assert skipped.splitlines()[1].endswith("container:default/abc, user:alice, 2 download(s)")
    assert re.search(r"^trigger +interval$", older, re.MULTILINE)


async def test_gc_report_defaults_to_the_latest_run(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["ListGCRuns"] = ext.ListGCRunsResponse()
    assert await run_json(daemon, capsys, "gc", "report") == {"runs": []}
    assert daemon.only_request("ListGCRuns") == ext.ListGCRunsRequest(limit=1)


async def test_usage(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["GetUsage"] = ext.Usage(
        used_bytes=300 * MIB,
        quota_bytes=256 * MIB,
        high_watermark_bytes=200 * MIB,
        low_watermark_bytes=150 * MIB,
        held_bytes=280 * MIB,
        task_count=4,
        held_task_count=2,
        quota_exceeded_by_data_in_use=True,
        filesystem_total_bytes=100 * 1024 * MIB,
        filesystem_free_bytes=40 * 1024 * MIB,
    )
    assert await run_json(daemon, capsys, "usage") == {
        "used_bytes": 300 * MIB,
        "quota_bytes": 256 * MIB,
        "high_watermark_bytes": 200 * MIB,
        "low_watermark_bytes": 150 * MIB,
        "held_bytes": 280 * MIB,
        "task_count": 4,
        "held_task_count": 2,
        "quota_exceeded_by_data_in_use": True,
        "filesystem_total_bytes": 100 * 1024 * MIB,
        "filesystem_free_bytes": 40 * 1024 * MIB,
    }
    text = await run_text(daemon, capsys, "usage")
    assert re.search(r"^used +300\.0 MiB$", text, re.MULTILINE)
    assert re.search(r"^held +280\.0 MiB in 2 task\(s\)$", text, re.MULTILINE)
    assert re.search(r"^filesystem free +40\.0 GiB$", text, re.MULTILINE)
    assert text.endswith("quota exceeded by data in use\n")


# --------------------------------------------------------------------------- failures and the process


def test_unreachable_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.sock"
    assert dfctl.main(["-e", str(missing), "--json", "usage"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"dfctl: cannot reach dfdaemon at {missing}: is it running?\n"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["use", "acquire", "--holder", "h", "nothex"], "invalid REF 'nothex'"),
        (["use", "acquire", "--holder", "h", "sha256:abc"], "invalid REF 'sha256:abc'"),
        (["use", "release", "--holder", "h", "url=not a url"], "invalid REF 'url=not a url'"),
        (["use", "acquire", "--holder", "h", "--ttl", "5x", TASK_A], "invalid duration '5x'"),
        (["use", "keepalive", "--holder", "h", "--ttl", "0"], "invalid duration '0'"),
        (["use", "acquire", "--holder", "h", "--tag", "v1", TASK_A], "--tag: only valid with url= refs"),
        (["use", "acquire", TASK_A], "--holder"),
        (["use", "acquire", "--holder", "h"], "REF"),
        (["task", "stat", "../etc"], "invalid task id '../etc'"),
        (["gc", "report", "--limit", "0"], "invalid limit '0'"),
        (["--timeout", "soon", "usage"], "invalid duration 'soon'"),
        (["task"], "ACTION"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    assert exit_code(["-e", str(tmp_path / "unused.sock"), *argv]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("dfctl")
    assert out.err.count("\n") == 1
    assert named in out.err


async def test_as_a_process(daemon: FakeDaemon) -> None:
    daemon.replies["GetUsage"] = ext.Usage(used_bytes=5, task_count=1)
    refusal = "task is held by container:default/abc"
    daemon.replies["DeleteTask"] = (grpc.StatusCode.FAILED_PRECONDITION, refusal)
    socket = str(daemon.socket_path)

    ok = await asyncio.to_thread(run_module, "dfdaemon.cli.dfctl", "-e", socket, "--json", "usage")
    assert (ok.returncode, ok.stderr) == (0, "")
    assert json.loads(ok.stdout)["used_bytes"] == 5

    refused = await asyncio.to_thread(run_module, "dfdaemon.cli.dfctl", "-e", socket, "task", "rm", TASK_A)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.splitlines() == [f"dfctl: task rm {TASK_A[:12]}…: FAILED_PRECONDITION: {refusal}"]

    bad = await asyncio.to_thread(
        run_module, "dfdaemon.cli.dfctl", "-e", socket, "use", "acquire", "--holder", "h", "x"
    )
    assert (bad.returncode, bad.stdout, len(bad.stderr.splitlines())) == (2, "", 1)
    assert "Traceback" not in bad.stderr + refused.stderr


def test_default_socket_is_the_daemons() -> None:
    assert dfctl.DEFAULT_SOCKET_PATH == DEFAULT_SOCKET_PATH
