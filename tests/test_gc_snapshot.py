"""The partial snapshot a GC pass under no pressure plans over: it leaves out exactly the quiet tasks (finished,
unreferenced, past the grace, within the TTL) and the plan over it is the plan over the whole cache."""

from __future__ import annotations

from dfdaemon.gc import GarbageCollector, GCPolicy, Limits, PlanPolicy, Snapshot, plan
from dfdaemon.storage import Storage, TaskInfo, TaskUse
from dfdaemon.storage.models import Quiet
from tests.storage_support import FakeClock, fill, make_id

KB = 1000
GRACE = 60.0
TTL = 3600.0
# Far above what the test's tasks use: nothing calls for quota or disk eviction.
ROOMY = Limits(quota=10**12, high=8 * 10**11, low=6 * 10**11, fs_total=10**13, fs_free=10**13)
POLICY = PlanPolicy.of(GCPolicy(grace_period=GRACE, task_ttl=TTL, stale_after=120), ROOMY)


async def a_cache_of_every_kind(storage: Storage, clock: FakeClock) -> tuple[set[str], set[str], str]:
    """Tasks of every kind GC tells apart: (the quiet ones, every other one, the one to keep an upload open on)."""
    await fill(storage, "idle-past-ttl", 5 * KB)
    clock.advance(TTL)
    quiet = {(await fill(storage, f"quiet-{i}", 5 * KB)).id for i in range(3)}
    held = await fill(storage, "held", 5 * KB)
    await storage.acquire("container:default/app", [held.id])
    leased = await fill(storage, "leased", 5 * KB)
    uploading = await fill(storage, "uploading", 5 * KB)
    abandoned = await fill(storage, "abandoned", 5 * KB, finish=False)
    failed = make_id("failed")
    async with storage.download(failed, TaskInfo(url="http://origin.test/failed")) as writer:
        await writer.write_piece(0, 0, b"abc")
        await writer.fail()
    clock.advance(GRACE + 100)
    near_grace = await fill(storage, "settled-on-the-margin", 5 * KB)
    await storage.acquire("runtime:lease", [leased.id], ttl=GRACE)
    clock.advance(GRACE + 0.5)  # the lease lapsed half a second ago; near_grace is past its grace by as much
    fresh = await fill(storage, "fresh", 5 * KB)
    others = {held.id, leased.id, uploading.id, abandoned.id, failed, near_grace.id, fresh.id, make_id("idle-past-ttl")}
    return quiet, others, uploading.id


def by_id(tasks: list[TaskUse]) -> dict[str, TaskUse]:
    return {task.id: task for task in tasks}


async def test_the_snapshot_leaves_out_only_quiet_tasks(storage: Storage, clock: FakeClock) -> None:
    quiet, others, uploading = await a_cache_of_every_kind(storage, clock)
    async with storage.upload(uploading):
        whole = await storage.gc_view(purge_lapsed=False)
        partial = await storage.gc_view(purge_lapsed=False, quiet=POLICY.quiet(clock(), 0, ROOMY.disk))
    assert set(by_id(whole)) == quiet | others
    # Each task in the partial view is the very row of the whole one, in the same (creation) order.
    assert [task for task in whole if task.id in others] == partial


async def test_the_plan_over_a_partial_snapshot_is_the_plan_over_the_whole(storage: Storage, clock: FakeClock) -> None:
    _, _, uploading = await a_cache_of_every_kind(storage, clock)
    now, used = clock(), await storage.used_bytes()
    quiet = POLICY.quiet(now, used, ROOMY.disk)
    assert quiet is not None
    async with storage.upload(uploading):
        whole = plan(Snapshot(await storage.gc_view(purge_lapsed=False), used, ROOMY.disk), POLICY, now)
        view = await storage.gc_view(purge_lapsed=False, quiet=quiet)
    assert plan(Snapshot(view, used, ROOMY.disk, partial=True), POLICY, now) == whole
    # The plan finds every kind but the quiet ones: what goes whatever the quota, and what is protected and why.
    assert sorted(victim.reason for victim in whole.evict) == ["failed", "stale", "ttl"]
    assert sorted(skip.reason for skip in whole.skipped) == ["grace", "grace", "held", "uploading"]


async def test_a_real_run_under_no_pressure_takes_what_must_go(storage: Storage, clock: FakeClock) -> None:
    """The collector's own pass (lapsed leases purged, so the leased task's grace comes from its release stamp)."""
    quiet, _, uploading = await a_cache_of_every_kind(storage, clock)
    async with storage.upload(uploading):
        report = await storage_collector(storage).run()
    assert sorted(e.reason for e in report.evicted) == ["failed", "stale", "ttl"]
    assert sorted(s.reason for s in report.skipped) == ["grace", "grace", "held", "uploading"]
    assert {task.id for task in await storage.list_tasks()} >= quiet


def storage_collector(storage: Storage) -> GarbageCollector:
    return GarbageCollector(storage, GCPolicy(grace_period=GRACE, task_ttl=TTL, stale_after=120, quota_bytes=10**12))


def test_quiet_is_none_when_the_quota_or_the_disk_calls_for_eviction() -> None:
    now = 1_000_000.0
    assert POLICY.quiet(now, 8 * 10**11, None) is None  # at the high watermark
    assert POLICY.quiet(now, 0, ROOMY.disk) == Quiet(settled_before=now - GRACE - 1.0, used_since=now - TTL + 1.0)
    full_disk = Limits(10**12, 8 * 10**11, 6 * 10**11, fs_total=1000, fs_free=100).disk
    assert POLICY.quiet(now, 0, full_disk) is None  # 90% of the filesystem in use, its high mark 80%
