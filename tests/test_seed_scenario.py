"""The seed report's scenario end to end in real processes: a 50 MB cache never loses the running image.

Upstream's GC emptied a small cache, the busybox image of a running container included. Here the
image's layers are held by ``container:busybox`` while other images push the cache over its high
watermark; GC evicts the others least-recently-used first and records who protected the image.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, dfctl_json, dfget, running_daemon, running_origin

MB = 1_000_000
GRACE_SECONDS = 0.3  # short, so that waiting past it costs little; every wait below is longer
QUOTA = {"gc": {"interval": "1h", "policy": {"diskThreshold": "50MB", "gracePeriod": f"{GRACE_SECONDS}s"}}}
BUSYBOX = {"busybox-layer-0": 2 * MB, "busybox-layer-1": 2 * MB, "busybox-config": 1 * MB}
OTHERS = {f"image-{i}-layer": 5 * MB for i in range(10)}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("seed-origin") / "files"
    root.mkdir()
    for name, size in {**BUSYBOX, **OTHERS, "huge": 46 * MB, "held-0": 15 * MB, "held-1": 15 * MB,
                       "held-2": 15 * MB, "extra": 10 * MB}.items():  # fmt: skip
        (root / name).write_bytes(seeded_bytes(name, size))
    with running_origin(root) as running:
        yield running


def fetch(daemon: DaemonProcess, origin: OriginProcess, name: str, out_dir: Path) -> str:
    out = dfget(daemon, origin.url(name), out_dir / name, "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["task_id"])


def verified_bytes(daemon: DaemonProcess, url: str) -> tuple[bytes, set[int]]:
    """Every piece of a cached task read back through the daemon (each read re-checks the piece's CRC)."""
    channel = grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS)
    request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=url, need_piece_content=True))
    responses = list(dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel).DownloadTask(request, timeout=60))
    pieces = sorted((r.download_piece_finished_response.piece for r in responses[1:]), key=lambda piece: piece.number)
    return b"".join(p.content for p in pieces), {p.traffic_type for p in pieces}


def test_busybox_survives_gc_and_goes_once_released(origin: OriginProcess, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with running_daemon(tmp_path / "daemon", QUOTA) as daemon:
        busybox = {name: fetch(daemon, origin, name, out_dir) for name in BUSYBOX}
        held = dfctl_json(daemon, "use", "acquire", "--holder", "container:busybox", *busybox.values())
        assert len(held["holds"]) == 3

        others = {}
        for name in OTHERS:  # each pull older than the grace period by the time the next one lands
            time.sleep(GRACE_SECONDS + 0.1)
            others[name] = fetch(daemon, origin, name, out_dir)
        time.sleep(0.5)  # the quota-triggered GC runs in the background after a write crosses the watermark

        runs = dfctl_json(daemon, "gc", "report", "--limit", "50")["runs"]
        quota_runs = [run for run in runs if run["trigger"] == "quota" and run["evicted"]]
        assert quota_runs, runs
        for run in quota_runs:
            assert run["bytes_after"] <= 30 * MB or run["quota_exceeded_by_data_in_use"]
            protected = {s["task_id"]: s for s in run["skipped"]}
            for task_id in busybox.values():
                assert protected[task_id]["reason"] == "held"
                assert protected[task_id]["holders"] == ["container:busybox"]
        # Least recently used first: evictions happen in pull order.
        evicted = [e["task_id"] for run in reversed(runs) for e in run["evicted"]]
        pulled = list(others.values())
        assert evicted == pulled[: len(evicted)]
        assert len(evicted) >= 3

        cached = {t["task_id"] for t in dfctl_json(daemon, "task", "ls")["tasks"]}
        assert set(busybox.values()) <= cached
        for name in BUSYBOX:
            data, traffic = verified_bytes(daemon, origin.url(name))
            assert hashlib.sha256(data).digest() == hashlib.sha256((origin.root / name).read_bytes()).digest()
            assert traffic == {common_pb2.LOCAL_PEER}
        usage = dfctl_json(daemon, "usage")
        assert usage["used_bytes"] <= 50 * MB

        # The container is gone: after the grace period nothing protects the image any more.
        dfctl_json(daemon, "use", "release", "--holder", "container:busybox", *busybox.values())
        time.sleep(GRACE_SECONDS + 0.1)
        fetch(daemon, origin, "huge", out_dir)  # 46 MB: only room if the busybox layers go too
        runs = dfctl_json(daemon, "gc", "report", "--limit", "5")["runs"]
        freed = {e["task_id"]: e["reason"] for run in runs for e in run["evicted"]}
        assert all(freed.get(task_id) == "quota" for task_id in busybox.values()), freed
        cached = {t["task_id"] for t in dfctl_json(daemon, "task", "ls")["tasks"]}
        assert not set(busybox.values()) & cached


def test_data_in_use_over_the_quota_is_reported_not_evicted(origin: OriginProcess, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with running_daemon(tmp_path / "daemon", QUOTA) as daemon:
        held = []
        for i in range(3):  # pinned as they are pulled, as a runtime does
            held.append(fetch(daemon, origin, f"held-{i}", out_dir))
            dfctl_json(daemon, "use", "acquire", "--holder", "pod:default/db", held[-1])
        time.sleep(GRACE_SECONDS + 0.1)
        run = dfctl_json(daemon, "gc", "run")
        assert run["evicted"] == []
        assert run["quota_exceeded_by_data_in_use"] is True
        assert {s["task_id"] for s in run["skipped"]} == set(held)
        assert dfctl_json(daemon, "usage")["quota_exceeded_by_data_in_use"] is True

        refused = dfget(daemon, origin.url("extra"), out_dir / "extra")
        assert refused.returncode == 1
        assert "RESOURCE_EXHAUSTED" in refused.stderr
        assert not (out_dir / "extra").exists()
        assert {t["task_id"] for t in dfctl_json(daemon, "task", "ls")["tasks"]} == set(held)
