"""GC's decision alone: ``plan`` over hand-built snapshots, no database, no files, no clock."""

from __future__ import annotations

from dfdaemon.gc import GCPolicy, Limits, Plan, PlanPolicy, Skip, Snapshot, plan
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
