"""GC's decision alone: ``plan`` over hand-built snapshots, no database, no files, no clock."""

from __future__ import annotations

import pytest

from dfdaemon.gc import Disk, GCPolicy, Limits, Plan, PlanPolicy, Skip, Snapshot, plan
from dfdaemon.storage import TaskState, TaskUse, Victim

NOW = 100_000.0
# Quota 1000 bytes, high watermark 800, low 600; grace 60 s, TTL 3600 s, stale after 120 s.
POLICY = PlanPolicy(task_ttl=3600, grace_period=60, stale_after=120, quota=1000, high=800, low=600)


def task(
    name: str,
    *,
    size: int = 100,
    idle: float = 1000.0,
    state: TaskState = TaskState.SUCCEEDED,
    finished_ago: float = 1000.0,
    released_ago: float | None = None,
    updated_ago: float = 1000.0,
    holders: tuple[str, ...] = (),
    downloads: int = 0,
    uploads: int = 0,
) -> TaskUse:
    """A task created long ago, last used ``idle`` seconds before NOW."""
    return TaskUse(
        id=name,
        state=state,
        created_at=NOW - 50_000,
        updated_at=NOW - updated_ago,
        last_used_at=NOW - idle,
        finished_at=NOW - finished_ago if state is TaskState.SUCCEEDED else None,
        released_at=None if released_ago is None else NOW - released_ago,
        bytes=size,
        holders=holders,
        downloads=downloads,
        uploads=uploads,
    )


def decide(tasks: list[TaskUse], used: int | None = None, policy: PlanPolicy = POLICY) -> Plan:
    """Plan over ``tasks``; the usage defaults to their bytes alone (no metadata overhead)."""
    total = sum(t.bytes for t in tasks) if used is None else used
    return plan(Snapshot(tasks, total), policy, NOW)


def evicted(result: Plan) -> list[tuple[str, str]]:
    return [(v.task_id, v.reason) for v in result.evict]


def skipped(result: Plan) -> list[tuple[str, str]]:
    return [(s.task_id, s.reason) for s in result.skipped]


def test_empty_cache_plans_nothing() -> None:
    result = decide([], used=400)  # the metadata alone
    assert result == Plan([], [], [], 400, 400, pressure=False, quota_exceeded_by_data_in_use=False)
    # With nothing to take, usage over the watermark can only be reported.
    assert decide([], used=900) == Plan([], [], [], 900, 900, pressure=True, quota_exceeded_by_data_in_use=True)


def test_grace_counts_from_finish_and_from_release() -> None:
    tasks = [
        task("fresh", finished_ago=59),
        task("released", released_ago=30),
        task("settled", finished_ago=61, released_ago=61),
    ]
    result = decide(tasks, used=2000)  # over the quota: only the grace keeps a task
    assert skipped(result) == [("fresh", "grace"), ("released", "grace")]
    assert evicted(result) == [("settled", "quota")]


def test_ttl_takes_idle_tasks_whatever_the_quota() -> None:
    result = decide([task("idle", idle=3601), task("used", idle=3599)])
    assert evicted(result) == [("idle", "ttl")]
    assert not result.pressure
    assert result.bytes_after == 100


def test_failed_and_abandoned_go_a_running_one_with_a_recent_writer_stays() -> None:
    tasks = [
        task("failed", state=TaskState.FAILED, idle=1),
        task("abandoned", state=TaskState.RUNNING, updated_ago=121),
        task("between-pieces", state=TaskState.RUNNING, updated_ago=119),
    ]
    result = decide(tasks)
    assert evicted(result) == [("failed", "failed"), ("abandoned", "stale")]
    assert skipped(result) == [("between-pieces", "downloading")]
    assert [v.state for v in result.evict] == [TaskState.FAILED, TaskState.RUNNING]


def test_quota_takes_least_recently_used_down_to_the_low_watermark() -> None:
    tasks = [task(f"t{i}", idle=1000 - i) for i in range(9)]  # t0 is the least recently used
    result = decide(tasks)  # 900 bytes: over the high watermark (800)
    assert result.pressure
    assert evicted(result) == [("t0", "quota"), ("t1", "quota"), ("t2", "quota")]
    assert result.bytes_after == 600
    assert [t.id for t in result.spare] == [f"t{i}" for i in range(3, 9)]
    assert not result.quota_exceeded_by_data_in_use


def test_the_quota_acts_from_the_high_watermark_on() -> None:
    tasks = [task(f"t{i}", idle=1000 - i) for i in range(8)]
    assert evicted(decide(tasks, used=799)) == []
    assert not decide(tasks, used=799).pressure
    assert evicted(decide(tasks, used=800)) == [("t0", "quota"), ("t1", "quota")]


def test_failed_bytes_count_before_the_quota_decides() -> None:
    tasks = [task("failed", state=TaskState.FAILED, size=200), *(task(f"t{i}", idle=1000 - i) for i in range(7))]
    result = decide(tasks)  # 900 bytes, 700 once the failed task is gone: under the high watermark
    assert evicted(result) == [("failed", "failed")]
    assert not result.pressure
    assert result.bytes_after == 700


def test_reserve_lowers_the_target_below_the_high_watermark() -> None:
    tasks = [task(f"t{i}", idle=1000 - i) for i in range(5)]  # 500 bytes: under the high watermark
    assert evicted(decide(tasks)) == []
    reserved = PlanPolicy(**{**vars(POLICY), "reserve": 700})  # room for 700: at most 300 may stay
    result = decide(tasks, policy=reserved)
    assert evicted(result) == [("t0", "quota"), ("t1", "quota")]
    assert result.bytes_after == 300
    assert not result.quota_exceeded_by_data_in_use


def test_references_protect_and_are_named() -> None:
    tasks = [
        task("held", holders=("container:a", "runtime:b"), downloads=1),
        task("downloading", downloads=2, size=50),
        task("uploading", uploads=3, idle=99_999),
        task("free"),
    ]
    result = decide(tasks, used=5000)
    assert result.skipped == [
        Skip("held", "held", ["container:a", "runtime:b"], 1, 0, 100),
        Skip("downloading", "downloading", [], 2, 0, 50),
        Skip("uploading", "uploading", [], 0, 3, 100),
    ]
    assert evicted(result) == [("free", "quota")]


def test_quota_exceeded_by_data_in_use_is_reported_not_violated() -> None:
    tasks = [task(f"held-{i}", size=300, holders=("container:db",)) for i in range(3)]
    tasks.append(task("loose", size=100))
    result = decide(tasks)
    assert evicted(result) == [("loose", "quota")]
    assert result.bytes_after == 900
    assert result.pressure and result.quota_exceeded_by_data_in_use
    assert result.spare == []


def test_ties_in_last_use_go_by_task_id() -> None:
    tasks = [task(name, idle=500) for name in ("c", "a", "d", "b", "e", "f", "g", "h", "i")]
    assert evicted(decide(tasks)) == [("a", "quota"), ("b", "quota"), ("c", "quota")]


def test_victims_carry_the_state_and_bytes_they_were_chosen_in() -> None:
    result = decide([task("big", size=2000, idle=10)])
    assert result.evict == [Victim("big", TaskState.SUCCEEDED, "quota", 2000)]
    assert result.bytes_after == 0


# Disk pressure: the filesystem holding the cache, 10_000 bytes, high mark 80% (8000), low 60% (6000).
# The quota (1000 bytes) stays out of the way: POLICY_DISK's quota is as large as the filesystem.
POLICY_DISK = PlanPolicy(task_ttl=3600, grace_period=60, stale_after=120, quota=10_000, high=8000, low=6000)


def decide_disk(tasks: list[TaskUse], free: int, policy: PlanPolicy = POLICY_DISK) -> Plan:
    return plan(Snapshot(tasks, sum(t.bytes for t in tasks), Disk(total=10_000, free=free)), policy, NOW)


def test_disk_filled_from_outside_evicts_least_recently_used_down_to_the_low_mark() -> None:
    # The cache holds 500 bytes; something else filled the filesystem to 8200 bytes in use.
    tasks = [task(f"t{i}", idle=1000.0 - i, size=100) for i in range(5)]  # t0 least recently used
    result = decide_disk(tasks, free=1800)
    # Only 500 bytes are the cache's: all five go, and the filesystem is still over its low mark.
    assert evicted(result) == [(f"t{i}", "disk") for i in range(5)]
    assert result.disk_pressure and not result.pressure
    assert result.disk_used_after == 7700
    assert not result.quota_exceeded_by_data_in_use  # the quota is not what is over


def test_disk_eviction_stops_at_the_low_mark_and_keeps_the_rest_spare() -> None:
    tasks = [task(f"t{i}", idle=1000.0 - i, size=1000) for i in range(5)]
    result = decide_disk(tasks, free=1500)  # 8500 in use: 2500 must go to reach 6000
    assert evicted(result) == [("t0", "disk"), ("t1", "disk"), ("t2", "disk")]
    assert [t.id for t in result.spare] == ["t3", "t4"]
    assert result.disk_used_after == 5500


def test_disk_below_the_high_mark_takes_nothing() -> None:
    tasks = [task(f"t{i}", size=1000) for i in range(3)]
    result = decide_disk(tasks, free=2001)  # 7999 in use: just under 8000
    assert evicted(result) == [] and result.spare == []
    assert not result.disk_pressure
    assert decide_disk(tasks, free=2000).disk_pressure  # at the mark it acts


def test_disk_pressure_never_takes_held_in_flight_or_fresh_tasks() -> None:
    tasks = [
        task("held", size=1000, idle=5000.0, holders=("pod-a",)),
        task("up", size=1000, idle=4000.0, uploads=1),
        task("fresh", size=1000, finished_ago=10.0),
        task("idle", size=1000, idle=3000.0),
    ]
    result = decide_disk(tasks, free=500)
    assert evicted(result) == [("idle", "disk")]
    assert skipped(result) == [("held", "held"), ("up", "uploading"), ("fresh", "grace")]
    assert result.disk_used_after == 8500  # data in use keeps it over; nothing else is taken


def test_failed_and_idle_tasks_count_toward_the_disk_before_the_least_recently_used() -> None:
    tasks = [
        task("broken", size=1500, state=TaskState.FAILED),
        task("old", size=1000, idle=7200.0),  # past the TTL
        task("a", size=1000, idle=2000.0),
        task("b", size=1000, idle=1000.0),
    ]
    # 8500 in use; failed and TTL free 2500, which already reaches 6000: no LRU eviction, and no pressure left.
    result = decide_disk(tasks, free=1500)
    assert evicted(result) == [("broken", "failed"), ("old", "ttl")]
    assert not result.disk_pressure and result.spare == []


def test_quota_and_disk_both_over_name_the_quota_first_then_the_disk() -> None:
    # Quota 3000 (high 2400, low 1800) over the cache's 3000 bytes, and the filesystem at 9000 of 10_000.
    policy = PlanPolicy(task_ttl=3600, grace_period=60, stale_after=120, quota=3000, high=2400, low=1800)
    tasks = [task(f"t{i}", idle=1000.0 - i, size=600) for i in range(5)]
    result = decide_disk(tasks, free=1000, policy=policy)
    # The quota needs two gone (3000 -> 1800); the disk then needs 9000 - 1200 - 6000 = 1800 more: three.
    assert evicted(result) == [("t0", "quota"), ("t1", "quota"), ("t2", "disk"), ("t3", "disk"), ("t4", "disk")]
    assert result.pressure and result.disk_pressure


def test_a_reserve_needs_room_on_the_disk_too() -> None:
    tasks = [task(f"t{i}", idle=1000.0 - i, size=1000) for i in range(3)]
    room = PlanPolicy(**{**vars(POLICY_DISK), "reserve": 5000})
    # 7000 in use is under the high mark, but 5000 more will not fit in the 3000 free: evict down to 5000 in use.
    result = decide_disk(tasks, free=3000, policy=room)
    assert evicted(result) == [("t0", "disk"), ("t1", "disk")]
    assert result.disk_used_after == 5000


def test_no_disk_in_the_snapshot_leaves_disk_pressure_out() -> None:
    tasks = [task(f"t{i}", size=100) for i in range(3)]
    result = plan(Snapshot(tasks, 300), POLICY_DISK, NOW)
    assert evicted(result) == [] and not result.disk_pressure and result.disk_used_after == 0


def test_every_time_limit_is_exclusive_at_its_boundary() -> None:
    """Exactly at a limit a task is past it: the grace, a writer's staleness and the TTL each end at their second."""
    tasks = [
        task("grace-ends", finished_ago=60),
        task("grace-runs", finished_ago=59.5),
        task("stale-writer", state=TaskState.RUNNING, updated_ago=120),
        task("live-writer", state=TaskState.RUNNING, updated_ago=119.5),
        task("idle-at-ttl", idle=3600),
        task("idle-past-ttl", idle=3600.5),
    ]
    result = decide(tasks, used=0)  # no pressure: only grace, staleness and the TTL decide
    assert skipped(result) == [("grace-runs", "grace"), ("live-writer", "downloading")]
    assert evicted(result) == [("stale-writer", "stale"), ("idle-past-ttl", "ttl")]


def test_a_policy_built_from_the_configuration_reserves_nothing_unless_asked() -> None:
    gc_policy = GCPolicy(grace_period=60, task_ttl=3600, quota_bytes=1000, stale_after=120)
    limits = Limits(quota=1000, high=800, low=600, fs_total=10**9, fs_free=10**9)
    assert PlanPolicy.of(gc_policy, limits) == POLICY
    assert PlanPolicy.of(gc_policy, limits, reserve=700).target == 300


def test_a_partial_snapshot_under_pressure_is_refused() -> None:
    """Left-out quiet tasks are quota candidates: a plan that needs candidates cannot do without them."""
    tasks = [task("left-in", state=TaskState.FAILED)]
    with pytest.raises(ValueError, match="partial snapshot"):
        plan(Snapshot(tasks, 900, partial=True), POLICY, NOW)  # at the high watermark
    with pytest.raises(ValueError, match="partial snapshot"):
        plan(Snapshot(tasks, 100, Disk(total=1000, free=100), partial=True), POLICY, NOW)  # the disk 90% full
    assert plan(Snapshot(tasks, 100, partial=True), POLICY, NOW) == decide(tasks, used=100)
