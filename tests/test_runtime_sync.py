"""The runtime sync: holds follow containerd's containers and pinned images, over a real Storage on disk.

containerd itself is replaced by ``FakeRuntime`` (the ``Runtime`` protocol: containers, namespaces, image digests and
an event stream fed from an asyncio.Queue); the cache is a real ``Storage`` with a fake wall clock, so GC's grace
after a release can be checked exactly. The last test runs the daemon process against a containerd socket where
nothing listens.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from dfdaemon.gc import GarbageCollector, GCPolicy
from dfdaemon.ids import blob_digest_task_id, pieces_for, task_id
from dfdaemon.runtime.containerd import ContainerdError, ImageNotFound, RuntimeContainer, RuntimeEvent
from dfdaemon.runtime.sync import RuntimeSync, container_holder, pinned_holder, task_ids_of
from dfdaemon.storage import Storage, TaskInfo
from tests.storage_support import FakeClock, payload
from tests.support import dfctl_json, run_dfctl, running_daemon, wait_for_line

KB = 1000
GRACE = 60.0


# --------------------------------------------------------------------------------------------------------------------
# A fake containerd


class FakeRuntime:
    """What RuntimeSync asks containerd, answered from plain data the test changes at will."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], str] = {}  # (namespace, container id) -> image reference
        self.images: dict[tuple[str, str], list[str]] = {}  # (namespace, image reference) -> blob digests
        self.namespace_names: set[str] = set()
        self.broken_images: set[tuple[str, str]] = set()  # image_digests raises ContainerdError for these
        self.containers_error: ContainerdError | None = None
        self.stream: asyncio.Queue[RuntimeEvent | ContainerdError] = asyncio.Queue()
        self.container_calls = 0
        self.subscriptions = 0
        self.streams_closed = 0
        self.closed = False

    # -- changing the fake containerd

    def run(self, namespace: str, container_id: str, image: str) -> None:
        self.namespace_names.add(namespace)
        self.records[(namespace, container_id)] = image

    def remove(self, namespace: str, container_id: str) -> None:
        del self.records[(namespace, container_id)]

    def pull(self, namespace: str, image: str, digests: list[str]) -> None:
        self.namespace_names.add(namespace)
        self.images[(namespace, image)] = digests

    def remove_image(self, namespace: str, image: str) -> None:
        del self.images[(namespace, image)]

    def emit(self, topic: str, namespace: str = "default") -> None:
        self.stream.put_nowait(RuntimeEvent(namespace=namespace, topic=topic))

    def break_stream(self, message: str = "containerd ended the event stream") -> None:
        self.stream.put_nowait(ContainerdError(message))

    # -- the Runtime protocol

    async def containers(self) -> list[RuntimeContainer]:
        self.container_calls += 1
        if self.containers_error is not None:
            raise self.containers_error
        return [RuntimeContainer(ns, cid, image) for (ns, cid), image in sorted(self.records.items())]

    async def namespaces(self) -> list[str]:
        return sorted(self.namespace_names)

    async def image_digests(self, namespace: str, image: str) -> list[str]:
        if (namespace, image) in self.broken_images:
            raise ContainerdError(f"image {image!r} in namespace {namespace!r}: blob is not a manifest")
        try:
            return list(self.images[(namespace, image)])
        except KeyError:
            raise ImageNotFound(f"image {image!r} not found in namespace {namespace!r}") from None

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        self.subscriptions += 1
        try:
            while True:
                item = await self.stream.get()
                if isinstance(item, ContainerdError):
                    raise item
                yield item
        finally:
            self.streams_closed += 1

    async def close(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------------------------------------------------
# Blobs in the cache


_BLOB_SIZE = 10 * KB
_BLOBS: dict[str, bytes] = {}  # digest -> content, for every blob a test names


def digest_of(name: str) -> str:
    """The digest of a blob named ``name`` (its content is deterministic); remembered for ``cache_blob``."""
    data = payload(name, _BLOB_SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _BLOBS[digest] = data
    return digest


def blob_url(digest: str, repository: str = "library/x") -> str:
    return f"http://registry.test/v2/{repository}/blobs/{digest}"


def tid(digest: str, repository: str = "library/x") -> str:
    """The blob's task id as the registry mirror names it by default: from its URL, computed here independently."""
    return task_id(blob_url(digest, repository))


def tids(digests: list[str]) -> list[str]:
    return sorted({tid(d) for d in digests})


def hex_ids(digests: list[str]) -> list[str]:
    """Digest-named task ids (``enableTaskIDBasedBlobDigest``), which also stand for blobs the cache lacks."""
    return sorted({blob_digest_task_id(d) for d in digests})


def image_blobs(name: str, layers: int = 2) -> list[str]:
    """Digests of an image: manifest, config, then layers (the order ContainerdClient.image_digests gives)."""
    return [digest_of(f"{name}/manifest"), digest_of(f"{name}/config")] + [
        digest_of(f"{name}/layer-{i}") for i in range(layers)
    ]


async def cache_blob(
    storage: Storage, digest: str, repository: str = "library/x", *, by_digest: bool = False, piece_length: int = 4 * KB
) -> str:
    """Put the blob into the cache as the registry mirror does: named by its URL with its verified digest recorded,
    or (``by_digest``) named by the digest's hex, recording nothing as a database from before digests were kept."""
    data = _BLOBS[digest]
    name = blob_digest_task_id(digest) if by_digest else tid(digest, repository)
    async with storage.download(name, TaskInfo(url=blob_url(digest, repository), piece_length=piece_length)) as writer:
        for piece in pieces_for(len(data), piece_length):
            await writer.write_piece(piece.number, piece.offset, data[piece.offset : piece.end])
        await writer.finish(digest=None if by_digest else digest)
    return name


async def cache_image(storage: Storage, name: str, layers: int = 2) -> list[str]:
    blobs = image_blobs(name, layers)
    for digest in blobs:
        await cache_blob(storage, digest)
    return blobs


async def holds_by_holder(storage: Storage) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for hold in await storage.all_live_holds():
        out.setdefault(hold.holder, []).append(hold.task_id)
    return {holder: sorted(task_ids) for holder, task_ids in out.items()}


async def eventually(condition: Callable[[], object], within: float = 2.0) -> float:
    """Poll ``condition`` on the loop until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


def make_sync(storage: Storage, runtime: FakeRuntime, pinned_images: list[str] | None = None) -> RuntimeSync:
    return RuntimeSync(storage, runtime, interval=60, pinned_images=pinned_images, settle=0.05)


# --------------------------------------------------------------------------------------------------------------------
# One pass


def test_task_ids_of_takes_the_held_tasks_else_the_digest_name_and_skips_digests_that_name_no_task() -> None:
    good, cached = digest_of("a"), digest_of("b")
    sha512 = "sha512:" + "ab" * 64
    held = {cached: [tid(cached), tid(cached, "other/repo")]}
    digests = [good, "sha384:" + "0" * 96, "sha256:ABC", good, sha512, cached]
    assert task_ids_of(digests, held) == sorted([*hex_ids([good]), "ab" * 64, tid(cached), tid(cached, "other/repo")])


async def test_container_holds_exactly_its_cached_blobs_and_missing_ones_once_they_appear(
    storage: Storage, runtime: FakeRuntime
) -> None:
    nginx = image_blobs("nginx", layers=3)
    other = await cache_image(storage, "redis")  # cached, but no container uses it
    for digest in nginx[:3]:  # manifest, config, first layer; layers 1 and 2 not yet pulled through the cache
        await cache_blob(storage, digest)
    runtime.pull("default", "docker.io/library/nginx:1", nginx)
    runtime.run("default", "web", "docker.io/library/nginx:1")
    sync = make_sync(storage, runtime)
    holder = container_holder("default", "web")
    assert holder == "container:default/web"

    report = await sync.sync_once()
    assert report.held == {holder: tids(nginx[:3])}
    assert report.missing == {holder: hex_ids(nginx[3:])}
    assert report.released == [] and report.unresolved == []
    assert await holds_by_holder(storage) == {holder: tids(nginx[:3])}
    assert not set(tids(other)) & {h.task_id for h in await storage.all_live_holds()}

    await cache_blob(storage, nginx[4])
    report = await sync.sync_once()
    assert report.held == {holder: tids([*nginx[:3], nginx[4]])}
    assert report.missing == {holder: hex_ids([nginx[3]])}
    await cache_blob(storage, nginx[3])
    report = await sync.sync_once()
    assert report.held == {holder: tids(nginx)} and report.missing == {}
    assert await holds_by_holder(storage) == {holder: tids(nginx)}
    assert sync.last_report is report

    # Syncing again changes nothing; a hold is never doubled.
    assert (await sync.sync_once()).held == {holder: tids(nginx)}
    assert len(await storage.list_holds(holder=holder)) == len(nginx)


async def test_a_blob_pulled_from_two_repositories_is_two_tasks_both_held_and_digest_named_tasks_too(
    storage: Storage, runtime: FakeRuntime
) -> None:
    blobs = image_blobs("shared", layers=2)
    names = [await cache_blob(storage, digest) for digest in blobs]
    names.append(await cache_blob(storage, blobs[2], "team/fork"))  # the same layer through another repository
    names.append(await cache_blob(storage, blobs[3], by_digest=True))  # enableTaskIDBasedBlobDigest: true
    assert names == [*(tid(d) for d in blobs), tid(blobs[2], "team/fork"), hex_ids([blobs[3]])[0]]
    assert len(set(names)) == len(blobs) + 2
    runtime.pull("default", "shared:1", blobs)
    runtime.run("default", "c", "shared:1")
    report = await make_sync(storage, runtime).sync_once()
    holder = container_holder("default", "c")
    assert report.held == {holder: sorted(names)} and report.missing == {}
    assert await holds_by_holder(storage) == {holder: sorted(names)}


async def test_two_containers_on_one_image_and_release_with_grace(
    storage: Storage, runtime: FakeRuntime, clock: FakeClock
) -> None:
    blobs = await cache_image(storage, "app")
    runtime.pull("default", "app:1", blobs)
    runtime.run("default", "a", "app:1")
    runtime.run("default", "b", "app:1")
    sync = make_sync(storage, runtime)
    a, b = container_holder("default", "a"), container_holder("default", "b")
    gc = GarbageCollector(storage, GCPolicy(grace_period=GRACE, task_ttl=10 * 86400, quota_bytes=1 * KB))

    await sync.sync_once()
    assert await holds_by_holder(storage) == {a: tids(blobs), b: tids(blobs)}

    clock.advance(1000)  # long past the blobs' own grace after finishing
    runtime.remove("default", "a")
    report = await sync.sync_once()
    assert report.released == [a] and list(report.held) == [b]
    assert await holds_by_holder(storage) == {b: tids(blobs)}
    gc_report = await gc.run(dry_run=True)
    assert gc_report.evicted == []
    assert {(s.task_id, s.reason, tuple(s.holders)) for s in gc_report.skipped} == {
        (t, "held", (b,)) for t in tids(blobs)
    }

    clock.advance(500)
    released_at = clock()
    runtime.remove("default", "b")
    report = await sync.sync_once()
    assert report.released == [b] and report.held == {}
    assert await holds_by_holder(storage) == {}
    tasks = [await storage.get_task(t) for t in tids(blobs)]
    assert {task.released_at for task in tasks if task is not None} == {released_at} and None not in tasks

    # The grace period runs from the release, not from when the blobs were downloaded.
    clock.advance(GRACE - 1)
    gc_report = await gc.run(dry_run=True)
    assert gc_report.evicted == []
    assert sorted((s.task_id, s.reason) for s in gc_report.skipped) == [(t, "grace") for t in tids(blobs)]
    clock.advance(2)
    gc_report = await gc.run(dry_run=True)
    assert sorted((e.task_id, e.reason) for e in gc_report.evicted) == [(t, "quota") for t in tids(blobs)]

    # A later pass has nothing more to release.
    assert (await sync.sync_once()).released == []


async def test_container_whose_image_is_gone_keeps_exactly_what_it_held(storage: Storage, runtime: FakeRuntime) -> None:
    blobs = await cache_image(storage, "old")
    runtime.pull("default", "old:1", blobs[:3])  # one layer is not part of what the record lists
    runtime.run("default", "c", "old:1")
    sync = make_sync(storage, runtime)
    holder = container_holder("default", "c")
    await sync.sync_once()
    assert await holds_by_holder(storage) == {holder: tids(blobs[:3])}

    runtime.remove_image("default", "old:1")  # `ctr image rm` while the container lives on
    report = await sync.sync_once()
    assert report.unresolved == [] and report.released == [] and report.held[holder] == tids(blobs[:3])
    assert await holds_by_holder(storage) == {holder: tids(blobs[:3])}

    # After a restart the sync cannot resolve the image, and keeps exactly what the container held.
    restarted = make_sync(storage, runtime)
    report = await restarted.sync_once()
    assert report.unresolved == [holder] and report.released == [] and holder not in report.held
    assert await holds_by_holder(storage) == {holder: tids(blobs[:3])}

    # A new container on an image that never resolved holds nothing, and is not released either.
    runtime.run("default", "d", "gone:1")
    report = await restarted.sync_once()
    assert sorted(report.unresolved) == [holder, container_holder("default", "d")]
    assert await holds_by_holder(storage) == {holder: tids(blobs[:3])}
    sync = restarted

    runtime.remove("default", "c")
    assert (await sync.sync_once()).released == [holder]
    assert await holds_by_holder(storage) == {}


async def test_image_resolution_error_keeps_that_holder_and_spares_the_others(
    storage: Storage, runtime: FakeRuntime
) -> None:
    one = await cache_image(storage, "one")
    two = await cache_image(storage, "two")
    runtime.pull("default", "one:1", one[:2])
    runtime.pull("k8s.io", "two:1", two)
    runtime.run("default", "x", "one:1")
    runtime.run("k8s.io", "y", "two:1")
    runtime.run("k8s.io", "z", "two:1")
    sync = make_sync(storage, runtime)
    x, y, z = container_holder("default", "x"), container_holder("k8s.io", "y"), container_holder("k8s.io", "z")
    await sync.sync_once()
    assert await holds_by_holder(storage) == {x: tids(one[:2]), y: tids(two), z: tids(two)}

    # A new container w's image cannot be read; meanwhile y goes and the tag z runs is pulled to new blobs.
    runtime.pull("default", "three:1", one)
    runtime.broken_images.add(("default", "three:1"))
    runtime.run("default", "w", "three:1")
    w = container_holder("default", "w")
    runtime.remove("k8s.io", "y")
    runtime.pull("k8s.io", "two:1", two[:3])
    report = await sync.sync_once()
    assert report.unresolved == [w]
    assert report.released == [y]
    # z's root filesystem did not change with the tag: it keeps the blobs it was created from.
    assert report.held == {x: tids(one[:2]), z: tids(two)}
    assert await holds_by_holder(storage) == {x: tids(one[:2]), z: tids(two)}

    runtime.broken_images.clear()
    assert (await sync.sync_once()).held == {w: tids(one), x: tids(one[:2]), z: tids(two)}


async def test_after_a_restart_a_moved_tag_adds_to_what_the_container_held(
    storage: Storage, runtime: FakeRuntime
) -> None:
    blobs = await cache_image(storage, "app")
    runtime.pull("default", "app:1", blobs[:2])
    runtime.run("default", "c", "app:1")
    holder = container_holder("default", "c")
    await make_sync(storage, runtime).sync_once()
    runtime.pull("default", "app:1", blobs[2:])  # the tag moves while the daemon is down
    report = await make_sync(storage, runtime).sync_once()
    # Which blobs the container was created from is unknown now: it keeps the old ones and gains the new.
    assert report.held == {holder: tids(blobs)}


async def test_containers_error_raises_and_changes_no_hold(storage: Storage, runtime: FakeRuntime) -> None:
    blobs = await cache_image(storage, "db")
    runtime.pull("default", "db:1", blobs)
    runtime.run("default", "db", "db:1")
    runtime.run("default", "db2", "db:1")
    sync = make_sync(storage, runtime, pinned_images=["db:1"])
    await sync.sync_once()
    before = await holds_by_holder(storage)
    assert set(before) == {container_holder("default", "db"), container_holder("default", "db2"), "pinned:db:1"}
    first_report = sync.last_report

    runtime.records.clear()
    runtime.images.clear()
    runtime.containers_error = ContainerdError("containerd at /run/containerd/containerd.sock is unreachable")
    with pytest.raises(ContainerdError, match="unreachable"):
        await sync.sync_once()
    assert await holds_by_holder(storage) == before
    assert sync.last_report is first_report

    # containerd answers again: now it says everything is gone, and that is believed.
    runtime.containers_error = None
    report = await sync.sync_once()
    assert report.released == [container_holder("default", "db"), container_holder("default", "db2")]
    assert report.held == {"pinned:db:1": []}  # a configured pin stays wanted, with nothing to hold
    assert await holds_by_holder(storage) == {}


# --------------------------------------------------------------------------------------------------------------------
# Pinned images and other holders


async def test_pinned_image_is_the_union_over_namespaces_and_ignores_container_churn(
    storage: Storage, runtime: FakeRuntime
) -> None:
    pause = "registry.k8s.io/pause:3.9"
    amd = await cache_image(storage, "pause-amd64", layers=1)
    arm = await cache_image(storage, "pause-arm64", layers=1)
    app = await cache_image(storage, "app")
    user = await cache_image(storage, "user-data", layers=0)
    await storage.acquire("user:alice", tids(user + app[:1]))
    runtime.pull("k8s.io", pause, amd)
    runtime.pull("moby", pause, [amd[0], *arm[1:]])  # shares the manifest, differs otherwise
    runtime.pull("default", "app:1", app)
    runtime.namespace_names.add("empty")
    holder = pinned_holder(pause)
    assert holder == "pinned:registry.k8s.io/pause:3.9"
    sync = make_sync(storage, runtime, pinned_images=[pause, pause])

    report = await sync.sync_once()
    union = tids(sorted({*amd, *arm[1:]}))
    assert report.held == {holder: union}

    # Containers come and go, some on the pinned image itself: the pinned holder does not move.
    for round_ in range(3):
        runtime.run("k8s.io", f"sandbox-{round_}", pause)
        runtime.run("default", f"app-{round_}", "app:1")
        await sync.sync_once()
        assert (await holds_by_holder(storage))[holder] == union
        runtime.remove("k8s.io", f"sandbox-{round_}")
        runtime.remove("default", f"app-{round_}")
        report = await sync.sync_once()
        assert holder not in report.released
        assert await holds_by_holder(storage) == {holder: union, "user:alice": tids(user + app[:1])}

    # Gone from one namespace: what the other still has stays held.
    runtime.remove_image("moby", pause)
    assert (await sync.sync_once()).held == {holder: tids(amd)}
    # A namespace failing to answer for it leaves the holds as they are.
    runtime.pull("moby", pause, arm)
    runtime.broken_images.add(("moby", pause))
    report = await sync.sync_once()
    assert report.unresolved == [holder]
    assert (await holds_by_holder(storage))[holder] == tids(amd)
    runtime.broken_images.clear()
    runtime.remove_image("moby", pause)

    # Gone from every namespace: released.
    runtime.remove_image("k8s.io", pause)
    report = await sync.sync_once()
    assert report.held == {holder: []}
    assert await holds_by_holder(storage) == {"user:alice": tids(user + app[:1])}


async def test_holders_that_are_not_the_runtimes_are_never_touched(storage: Storage, runtime: FakeRuntime) -> None:
    blobs = await cache_image(storage, "shared")
    await storage.acquire("user:alice", tids(blobs[:2]))
    await storage.acquire("ci-job-7", tids(blobs), ttl=3600)
    # Names that merely look alike are other holders.
    await storage.acquire("containers:default/x", tids(blobs[:1]))
    await storage.acquire("Container:default/x", tids(blobs[:1]))
    others = await holds_by_holder(storage)
    runtime.pull("default", "shared:1", blobs)
    runtime.run("default", "x", "shared:1")
    sync = make_sync(storage, runtime)

    await sync.sync_once()
    assert await holds_by_holder(storage) == {**others, container_holder("default", "x"): tids(blobs)}
    runtime.remove("default", "x")
    report = await sync.sync_once()
    assert report.released == [container_holder("default", "x")]
    assert await holds_by_holder(storage) == others


async def test_stale_runtime_holders_left_by_an_earlier_run_are_released(
    storage: Storage, runtime: FakeRuntime
) -> None:
    """Holds live in SQLite: after a restart, holders of containers removed meanwhile go on the first pass."""
    blobs = await cache_image(storage, "left")
    await storage.acquire(container_holder("default", "removed-while-down"), tids(blobs))
    await storage.acquire(pinned_holder("no-longer-pinned:1"), tids(blobs[:1]))
    report = await make_sync(storage, runtime).sync_once()
    assert sorted(report.released) == ["container:default/removed-while-down", "pinned:no-longer-pinned:1"]
    assert await holds_by_holder(storage) == {}


# --------------------------------------------------------------------------------------------------------------------
# The loop and the event watch


async def test_event_triggers_a_sync_long_before_the_interval(storage: Storage, runtime: FakeRuntime) -> None:
    blobs = await cache_image(storage, "evt")
    runtime.pull("default", "evt:1", blobs)
    sync = make_sync(storage, runtime)
    holder = container_holder("default", "evt")
    await sync.sync_logged()  # as the daemon does: the first pass, then the loop
    sync.start()
    try:
        await eventually(lambda: sync.last_report is not None and runtime.subscriptions == 1)
        assert sync.last_report is not None and sync.last_report.held == {}
        calls = runtime.container_calls

        # An event of a topic the sync does not follow wakes nothing.
        runtime.emit("/snapshot/prepare")
        await asyncio.sleep(0.3)
        assert runtime.container_calls == calls

        runtime.run("default", "evt", "evt:1")
        runtime.emit("/containers/create")
        took = await eventually(lambda: sync.last_report is not None and holder in sync.last_report.held)
        assert took < 2.0
        assert await holds_by_holder(storage) == {holder: tids(blobs)}

        # A burst of events settles into few syncs, and a task event counts too.
        runtime.remove("default", "evt")
        calls = runtime.container_calls
        for topic in ("/tasks/exit", "/tasks/delete", "/containers/delete", "/images/update"):
            runtime.emit(topic)
        await eventually(lambda: sync.last_report is not None and sync.last_report.released == [holder])
        assert await holds_by_holder(storage) == {}
        await asyncio.sleep(0.2)
        assert runtime.container_calls - calls <= 2
    finally:
        await sync.stop()


async def test_watcher_reconnects_after_the_stream_breaks_and_syncs_again(
    storage: Storage, runtime: FakeRuntime
) -> None:
    blobs = await cache_image(storage, "rec")
    runtime.pull("default", "rec:1", blobs)
    sync = make_sync(storage, runtime)
    holder = container_holder("default", "rec")
    await sync.sync_logged()  # as the daemon does: the first pass, then the loop
    sync.start()
    try:
        await eventually(lambda: sync.last_report is not None and runtime.subscriptions == 1)
        # A container made while the stream is down: its event is lost with the stream.
        runtime.run("default", "rec", "rec:1")
        runtime.break_stream()
        took = await eventually(lambda: sync.last_report is not None and holder in sync.last_report.held, 3.0)
        assert took < 2.0
        assert runtime.subscriptions == 2
        assert await holds_by_holder(storage) == {holder: tids(blobs)}

        # The new subscription delivers events.
        runtime.remove("default", "rec")
        runtime.emit("/containers/delete")
        await eventually(lambda: sync.last_report is not None and sync.last_report.released == [holder])
        assert runtime.subscriptions == 2
    finally:
        await sync.stop()


async def test_failing_periodic_sync_keeps_running(
    storage: Storage, runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = await cache_image(storage, "late")
    runtime.pull("default", "late:1", blobs)
    runtime.run("default", "late", "late:1")
    runtime.containers_error = ContainerdError("containerd is unreachable")
    sync = make_sync(storage, runtime)
    await sync.sync_logged()  # as the daemon does: the first pass, then the loop
    sync.start()
    try:
        await eventually(lambda: runtime.container_calls >= 1 and runtime.subscriptions == 1)
        await asyncio.sleep(0.05)
        assert sync.last_report is None
        warnings = [r for r in caplog.records if "containerd does not answer" in r.getMessage()]
        assert [r.levelname for r in warnings] == ["WARNING"]
        runtime.containers_error = None
        runtime.emit("/containers/create")
        await eventually(lambda: sync.last_report is not None)
        assert await holds_by_holder(storage) == {container_holder("default", "late"): tids(blobs)}
    finally:
        await sync.stop()


async def test_stop_ends_both_tasks_and_the_subscription(storage: Storage, runtime: FakeRuntime) -> None:
    sync = make_sync(storage, runtime)
    await sync.sync_logged()  # as the daemon does: the first pass, then the loop
    sync.start()
    tasks = list(sync._tasks)
    assert sorted(t.get_name() for t in tasks) == ["runtime-events", "runtime-sync"]
    await eventually(lambda: sync.last_report is not None and runtime.subscriptions == 1)
    await asyncio.wait_for(sync.stop(), 2)
    assert all(t.done() for t in tasks) and sync._tasks == []
    assert not any(not t.cancelled() and t.exception() for t in tasks)
    # The event generator is finalized (its finally runs) once the watcher is gone.
    await eventually(lambda: runtime.streams_closed == runtime.subscriptions, 1.0)
    calls = runtime.container_calls
    runtime.emit("/containers/create")
    await asyncio.sleep(0.2)
    assert runtime.container_calls == calls
    await sync.stop()  # a second stop is harmless


# --------------------------------------------------------------------------------------------------------------------
# The daemon process


def stale_socket(path: Path) -> None:
    """A unix socket file nobody listens on (containerd crashed): connecting is refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def test_daemon_runs_without_containerd_and_stops_cleanly(tmp_path: Path) -> None:
    containerd_socket = tmp_path / "containerd.sock"
    stale_socket(containerd_socket)
    extra = {"runtime": {"containerd": {"address": str(containerd_socket)}}}
    with running_daemon(tmp_path / "d", extra) as daemon:
        line = wait_for_line(daemon.log_path, r"(?m)^.*containerd does not answer.*$", daemon.proc, 10).group(0)
        assert "WARNING" in line.upper() and str(containerd_socket) in line

        with grpc.insecure_channel(f"unix:{daemon.socket_path}") as channel:
            # Bound by hand: the typed stubs of grpc_health's HealthStub declare no methods.
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert dfctl_json(daemon, "usage")["held_bytes"] == 0
        # The runtime sync owns container: and pinned: holders; the Use API refuses them, naming why.
        refused = run_dfctl(daemon, "use", "acquire", "--holder", "container:default/manual", "0" * 64)
        assert refused.returncode == 1
        assert "FAILED_PRECONDITION" in refused.stderr and "runtime sync" in refused.stderr
        other = run_dfctl(daemon, "use", "acquire", "--holder", "user:alice", "0" * 64)
        assert "NOT_FOUND" in other.stderr  # an ordinary holder gets as far as looking the task up
        assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    log = daemon.log()
    # Every record is one line (no traceback, no continuation), and the daemon said goodbye.
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", row) for row in log.splitlines()), log
    assert log.splitlines()[-1].endswith("INFO dfdaemon: stopped"), log
