"""The seed scenario with real containerd: images pulled through the daemon's mirror, a running busybox kept by GC.

A distribution registry holds a busybox image (the real static busybox in a layer) and filler images. containerd
pulls them through the daemon's registry mirror into a 50 MB cache; a busybox container runs; the fillers push the
cache over its high watermark. The daemon learns from containerd itself that the container uses busybox's blobs,
so GC keeps them, names the container in its record, and evicts fillers least-recently-used first. Once the
container is removed and the grace period has passed, busybox's blobs are ordinary cache again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dfdaemon.download.scheduled import SMALL_DOWNLOAD_LIMIT
from tests.containerd_support import Containerd, containerd_skip_reason, running_containerd
from tests.registry_support import (
    OciImage,
    Registry,
    busybox_image,
    busybox_skip_reason,
    fetch_token,
    filler_image,
    http_request,
    push_image,
    registry_skip_reason,
    running_registry,
)
from tests.support import (
    DaemonProcess,
    SchedulerProcess,
    dfctl_json,
    peer_config,
    run_dfctl,
    running_daemon,
    running_scheduler,
    wait_for_hosts,
    wait_for_line,
)

GRACE = 0.3  # short, so that waiting past it costs little; every wait below is longer
FILLER_LAYERS = [6_000_000, 6_000_000]


def _skip_reason() -> str | None:
    return registry_skip_reason() or busybox_skip_reason() or containerd_skip_reason()


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


@dataclass
class Node:
    """One machine: a daemon with its mirror, and a containerd that pulls through it."""

    daemon: DaemonProcess
    containerd: Containerd

    def holds(self, holder: str) -> set[str]:
        return {hold["task_id"] for hold in dfctl_json(self.daemon, "use", "ls", "--holder", holder)["holds"]}

    def cached(self, task_id: str) -> bool:
        return (self.daemon.storage_dir / "content" / "tasks" / task_id[:3] / task_id).exists()

    def content_digest(self, task_id: str) -> str:
        path = self.daemon.storage_dir / "content" / "tasks" / task_id[:3] / task_id
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def mirror_counts(node: Node) -> str:
    """The daemon's registry-mirror request counters, as Prometheus text lines."""
    text = http_request("GET", f"http://127.0.0.1:{node.daemon.metrics_port}/metrics").data.decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("dfdaemon_proxy_requests_total{"))


def blob_tasks(registry: Registry, repository: str, image: OciImage) -> dict[str, str]:
    """Task id -> blob digest of an image pulled through the mirror. The mirror names a blob's task by its URL at the
    registry, as upstream does by default (and a Rust peer would); the id is derived here by hand from the formula."""
    urls = {f"http://{registry.host}/v2/{repository}/blobs/{blob.digest}": blob.digest for blob in image.blobs}
    return {hashlib.sha256(url.encode() + b"STANDARD").hexdigest(): digest for url, digest in urls.items()}


def task_ids(registry: Registry, repository: str, image: OciImage) -> list[str]:
    return list(blob_tasks(registry, repository, image))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting until {what}")


def run_container(containerd: Containerd, ref: str, container_id: str) -> None:
    """Run ``ref`` as ``container_id`` and show its task is RUNNING: a container record alone (what ``run`` falls back
    to where runc cannot start a task) would leave a running container untested."""
    assert containerd.run(ref, container_id), f"no task could start: {containerd.task_skip_reason}"
    rows = [line.split() for line in containerd.ctr("tasks", "ls").stdout.splitlines()[1:]]
    status = {row[0]: row[-1] for row in rows if row}
    assert status.get(container_id) == "RUNNING", status


def node_config(registry: Registry, containerd: Containerd, scheduler: SchedulerProcess | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "gc": {
            "interval": "1h",
            "policy": {
                "diskThreshold": "50MB",
                "gracePeriod": f"{GRACE}s",
                "diskHighThresholdPercent": 80,
                "diskLowThresholdPercent": 60,
            },
        },
        "proxy": {"enable": True, "registryMirror": {"insecureRegistries": [registry.host]}},
        "runtime": {"containerd": {"address": containerd.address}, "syncInterval": "30s"},
    }
    if scheduler is not None:
        config.update(peer_config(scheduler))
    return config


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as running:
        yield running


def start_node(
    stack: ExitStack, workdir: Path, name: str, registry: Registry, scheduler: SchedulerProcess | None
) -> Node:
    """A node under ``workdir``; ``name`` is the daemon's directory, so its hostname (short: its socket lives there)."""
    containerd = stack.enter_context(running_containerd(workdir / f"{name}-containerd"))
    config = node_config(registry, containerd, scheduler)
    daemon = stack.enter_context(running_daemon(workdir / name, config))
    containerd.set_mirror(registry.host, f"http://127.0.0.1:{daemon.proxy_port}")
    return Node(daemon, containerd)


def test_a_running_busybox_survives_gc_and_goes_once_its_container_is_removed(
    registry: Registry, tmp_path: Path
) -> None:
    busybox = busybox_image()
    fillers = [filler_image(f"filler-{i}", FILLER_LAYERS, seed=100 + i) for i in range(6)]
    push_image(registry.url, "library/busybox", "1", busybox)
    for i, image in enumerate(fillers):
        push_image(registry.url, f"library/filler-{i}", "1", image)

    with ExitStack() as stack:
        node = start_node(stack, tmp_path, "node", registry, scheduler=None)
        holder = "container:default/busybox-1"

        node.containerd.pull(f"{registry.host}/library/busybox:1")
        run_container(node.containerd, f"{registry.host}/library/busybox:1", "busybox-1")
        # containerd's own events tell the daemon; no one calls the Use API.
        busybox_tasks = blob_tasks(registry, "library/busybox", busybox)
        wait_until(lambda: node.holds(holder) == set(busybox_tasks), f"{holder} holds busybox's blobs")
        refused = run_dfctl(node.daemon, "task", "rm", list(busybox_tasks)[1])
        assert refused.returncode == 1
        assert holder in refused.stderr

        pulled: dict[str, str] = {}  # filler task id -> digest, image by image in the order the images were pulled
        pull_order: dict[str, int] = {}  # task id -> which pull brought it (blobs of one pull arrive together)
        for i, image in enumerate(fillers[:4]):
            time.sleep(GRACE + 0.5)  # earlier pulls leave their grace period
            node.containerd.pull(f"{registry.host}/library/filler-{i}:1")
            pulled.update(blob_tasks(registry, f"library/filler-{i}", image))
            pull_order.update(dict.fromkeys(task_ids(registry, f"library/filler-{i}", image), i))

        # Every busybox blob is still cached and is still busybox.
        for task_id, digest in busybox_tasks.items():
            assert node.content_digest(task_id) == digest
        runs = dfctl_json(node.daemon, "gc", "report", "--limit", "50")["runs"]
        evicted = [e["task_id"] for run in runs for e in run["evicted"]]
        assert set(evicted) <= set(pulled), "GC evicted something other than filler blobs"
        assert evicted, "the fillers never pushed the cache over its high watermark"
        # Least recently used first: nothing evicted came from a later pull than anything kept.
        kept = [task_id for task_id in pulled if node.cached(task_id)]
        assert max(pull_order[t] for t in evicted) <= min(pull_order[t] for t in kept)
        assert min(pull_order[t] for t in evicted) == 0  # the oldest pull went first
        protections = [
            skip
            for run in runs
            for skip in run["skipped"]
            if skip["task_id"] in busybox_tasks and skip["reason"] == "held"
        ]
        assert protections, "no GC run recorded why busybox stayed"
        assert all(skip["holders"] == [holder] for skip in protections)
        usage = dfctl_json(node.daemon, "usage")
        assert usage["used_bytes"] <= usage["high_watermark_bytes"]

        # The container goes: its holds go, and once the grace period has passed GC may take busybox.
        node.containerd.stop_and_remove("busybox-1")
        wait_until(lambda: not node.holds(holder), f"{holder} released its holds")
        time.sleep(GRACE + 0.5)
        mirror = f"http://127.0.0.1:{node.daemon.proxy_port}"
        for task_id in kept:  # cache hits make the fillers more recently used than busybox
            repository = f"library/filler-{pull_order[task_id]}"  # the mirror asks the registry there first
            response = http_request("GET", f"{mirror}/v2/{repository}/blobs/{pulled[task_id]}?ns={registry.host}")
            assert response.status == 200
        for i in (4, 5):  # over the high watermark again
            node.containerd.pull(f"{registry.host}/library/filler-{i}:1")
        runs = dfctl_json(node.daemon, "gc", "report", "--limit", "50")["runs"]
        busybox_evictions = {e["task_id"]: e["reason"] for run in runs for e in run["evicted"]}
        for task_id in busybox_tasks:
            assert busybox_evictions.get(task_id) == "quota"
            assert not node.cached(task_id)


def test_a_second_node_pulls_the_image_from_the_first_not_the_registry(registry: Registry, tmp_path: Path) -> None:
    busybox = busybox_image()
    filler = filler_image("shared", FILLER_LAYERS, seed=300)
    push_image(registry.url, "library/busybox", "1", busybox)
    push_image(registry.url, "library/shared", "1", filler)

    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        first = start_node(stack, tmp_path, "node-a", registry, scheduler)
        second = start_node(stack, tmp_path, "node-b", registry, scheduler)
        wait_for_hosts(scheduler, 2)

        for ref in ("library/busybox:1", "library/shared:1"):
            first.containerd.pull(f"{registry.host}/{ref}")
        from_registry = registry.blob_bytes_served()
        for image in (busybox, filler):
            assert from_registry >= sum(blob.size for blob in image.blobs)

        for ref in ("library/busybox:1", "library/shared:1"):
            second.containerd.pull(f"{registry.host}/{ref}")
        # Node B asked the registry for manifests and, with HEADs, for the blobs' lengths. Every byte of a large blob
        # came from A; a blob of at most 4 MiB skips the scheduler and comes from the registry, as upstream's does.
        assert any(blob.size > SMALL_DOWNLOAD_LIMIT for image in (busybox, filler) for blob in image.blobs)
        small = sum(
            blob.size for image in (busybox, filler) for blob in image.blobs if blob.size <= SMALL_DOWNLOAD_LIMIT
        )
        assert registry.blob_bytes_served() - from_registry == small, "node B fetched a large blob from the registry"
        for repository, image in (("library/busybox", busybox), ("library/shared", filler)):
            for task_id, digest in blob_tasks(registry, repository, image).items():
                assert second.content_digest(task_id) == digest
        # And it runs there, holding its image on that node.
        run_container(second.containerd, f"{registry.host}/library/busybox:1", "busybox-b")
        wait_until(
            lambda: second.holds("container:default/busybox-b") == set(task_ids(registry, "library/busybox", busybox)),
            "the second node's container holds busybox",
        )


def test_registry_errors_reach_containerd_through_the_mirror(tmp_path: Path) -> None:
    image = filler_image("private", [300_000], seed=400)
    with ExitStack() as stack:
        registry = stack.enter_context(running_registry(tmp_path / "registry", token_auth=True))
        token = fetch_token(registry, "repository:private/app:pull,push")
        push_image(registry.url, "private/app", "1", image, headers={"Authorization": f"Bearer {token}"})
        node = start_node(stack, tmp_path, "node", registry, scheduler=None)

        # 401 with a token challenge: containerd gets a token from the realm and pulls through the mirror.
        node.containerd.pull(f"{registry.host}/private/app:1")
        assert registry.token_requests, "containerd never saw the registry's token challenge"
        for task_id, digest in blob_tasks(registry, "private/app", image).items():
            assert node.content_digest(task_id) == digest
        proxy_log = node.daemon.log()
        assert "Traceback" not in proxy_log
        # The challenge came through the mirror (containerd would also get one from the registry directly).
        assert 'route="registry",status="401"' in mirror_counts(node)

        # 404 for a missing tag: the pull fails with the registry's "not found".
        missing = node.containerd.ctr(
            "images", "pull", "--hosts-dir", str(node.containerd.hosts_dir), "--plain-http",
            f"{registry.host}/private/app:no-such-tag", check=False,
        )  # fmt: skip
        assert missing.returncode != 0
        assert "not found" in missing.stderr
        assert 'route="registry",status="404"' in mirror_counts(node)


def test_a_pinned_image_is_held_without_any_container(registry: Registry, tmp_path: Path) -> None:
    pause = filler_image("pause", [400_000], seed=500)
    push_image(registry.url, "library/pause", "3", pause)
    ref = f"{registry.host}/library/pause:3"
    with ExitStack() as stack:
        containerd = stack.enter_context(running_containerd(tmp_path / "node-containerd"))
        config = node_config(registry, containerd, scheduler=None)
        config["runtime"]["pinnedImages"] = [ref]
        daemon = stack.enter_context(running_daemon(tmp_path / "node", config))
        containerd.set_mirror(registry.host, f"http://127.0.0.1:{daemon.proxy_port}")
        node = Node(daemon, containerd)

        containerd.pull(ref)  # the image event makes the daemon look again
        pause_tasks = task_ids(registry, "library/pause", pause)
        wait_until(lambda: node.holds(f"pinned:{ref}") == set(pause_tasks), "the pinned image is held")
        report = dfctl_json(node.daemon, "gc", "run")
        held = {skip["task_id"]: skip["holders"] for skip in report["skipped"] if skip["reason"] == "held"}
        assert held == {task_id: [f"pinned:{ref}"] for task_id in pause_tasks}


def test_holds_outlive_a_daemon_restart_while_containerd_is_down(registry: Registry, tmp_path: Path) -> None:
    busybox = busybox_image()
    push_image(registry.url, "library/busybox", "1", busybox)
    holder = "container:default/survivor"
    busybox_tasks = blob_tasks(registry, "library/busybox", busybox)
    with ExitStack() as stack:
        containerd = stack.enter_context(running_containerd(tmp_path / "node-containerd"))
        config = node_config(registry, containerd, scheduler=None)
        config["gc"]["policy"]["taskTTL"] = f"{GRACE}s"  # GC would take anything idle that nothing holds
        with running_daemon(tmp_path / "node", config) as daemon:
            containerd.set_mirror(registry.host, f"http://127.0.0.1:{daemon.proxy_port}")
            containerd.pull(f"{registry.host}/library/busybox:1")
            run_container(containerd, f"{registry.host}/library/busybox:1", "survivor")
            node = Node(daemon, containerd)
            wait_until(lambda: node.holds(holder) == set(busybox_tasks), f"{holder} holds busybox")
        containerd.stop()  # the runtime is down while the daemon restarts: nothing may conclude "not in use"
        time.sleep(GRACE + 0.5)
        with running_daemon(tmp_path / "node", config) as daemon:
            node = Node(daemon, containerd)
            wait_for_line(daemon.log_path, r"containerd does not answer", daemon.proc)
            assert node.holds(holder) == set(busybox_tasks)
            run = dfctl_json(daemon, "gc", "run")
            assert not run["evicted"]
            kept = {skip["task_id"]: skip["holders"] for skip in run["skipped"]}
            assert kept == {task_id: [holder] for task_id in busybox_tasks}
            for task_id, digest in busybox_tasks.items():
                assert node.content_digest(task_id) == digest
