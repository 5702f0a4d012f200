"""Deciding what GC takes: a pure function over plain data, with no database, clock or file behind it.

``plan(snapshot, policy, now)`` marks every task in the snapshot: protected (skipped, with why and by whom),
a victim (with the reason it goes), or spare (a quota candidate kept while the predicted usage allows). A task
is a candidate only when nothing references it (no holder, no download writing it, no upload reading it) and
it is past its grace. Failed and abandoned candidates go first, then those idle longer than the TTL, then,
while the usage is at or above the high watermark (or eats into the reserve), the least recently used until
it is down to the target. When data in use alone keeps the cache over, the plan says so instead of taking it.
The collector applies the victims through ``Storage.apply``, which re-checks each one's references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

from dfdaemon.storage.models import TaskState, TaskUse, Victim

# Least recently used first; ties by task id, so a plan is the same whatever order the snapshot lists tasks in.
_LRU_ORDER = attrgetter("last_used_at", "id")


@dataclass(frozen=True)
class GCPolicy:
    interval: float = 900.0
    task_ttl: float = 21600.0
    grace_period: float = 300.0
    # Bytes; 0 means the filesystem holding the cache is the quota.
    quota_bytes: int = 0
    high_percent: int = 80
    low_percent: int = 60
    # An unfinished task with no writer for this long is abandoned.
    stale_after: float = 120.0


@dataclass(frozen=True)
class Limits:
    """The quota and its watermarks in bytes, and the filesystem's size and free space."""

    quota: int
    high: int
    low: int
    fs_total: int
    fs_free: int


@dataclass(frozen=True)
class Eviction:
    task_id: str
    reason: str
    bytes: int


@dataclass(frozen=True)
class Skip:
    task_id: str
    reason: str
    holders: list[str]
    downloads: int
    uploads: int
    bytes: int


@dataclass(frozen=True)
class PlanPolicy:
    """The rules one plan decides by: times in seconds, sizes in bytes."""

    task_ttl: float
    grace_period: float
    stale_after: float
    quota: int
    high: int
    low: int
    # Bytes a caller needs below the quota besides (a download asking for room).
    reserve: int = 0

    @classmethod
    def of(cls, policy: GCPolicy, limits: Limits, reserve: int = 0) -> PlanPolicy:
        return cls(
            task_ttl=policy.task_ttl,
            grace_period=policy.grace_period,
            stale_after=policy.stale_after,
            quota=limits.quota,
            high=limits.high,
            low=limits.low,
            reserve=reserve,
        )

    @property
    def target(self) -> int:
        """Where quota eviction stops: the low watermark, or lower when the reserve needs it."""
        return min(self.low, self.quota - self.reserve)

    def over(self, used: int) -> bool:
        """Whether ``used`` bytes call for quota eviction."""
        return used >= self.high or used > self.quota - self.reserve


@dataclass(frozen=True)
class Snapshot:
    """The cache at one instant: every task not being evicted (in creation order) and the measured usage."""

    tasks: Sequence[TaskUse]
    used_bytes: int


@dataclass(frozen=True)
class Plan:
    """What to evict and why, what stays and why, and the usage the evictions are expected to leave."""

    evict: list[Victim]  # failed, stale and idle in snapshot order, then the quota's in least-recently-used order
    spare: list[TaskUse]  # the quota's next candidates in order, should the measured usage stay above the target
    skipped: list[Skip]
    bytes_before: int
    bytes_after: int
    pressure: bool  # the quota acts: the usage was over once failed, stale and idle tasks were counted out
    quota_exceeded_by_data_in_use: bool


def plan(snapshot: Snapshot, policy: PlanPolicy, now: float) -> Plan:
    """Decide one GC pass over ``snapshot`` at time ``now``."""
    skipped: list[Skip] = []
    evict: list[Victim] = []
    candidates: list[TaskUse] = []
    for task in snapshot.tasks:
        protected = protection(task, policy, now)
        if protected:
            skipped.append(Skip(task.id, protected, list(task.holders), task.downloads, task.uploads, task.bytes))
        elif reason := _must_go(task, policy, now):
            evict.append(victim(task, reason))
        else:
            candidates.append(task)
    used = snapshot.used_bytes - sum(item.bytes for item in evict)
    pressure = policy.over(used)
    queue = sorted(candidates, key=_LRU_ORDER) if pressure else []
    taken = 0
    while taken < len(queue) and used > policy.target:
        used -= queue[taken].bytes
        taken += 1
    evict.extend(victim(task, "quota") for task in queue[:taken])
    return Plan(
        evict=evict,
        spare=queue[taken:],
        skipped=skipped,
        bytes_before=snapshot.used_bytes,
        bytes_after=used,
        pressure=pressure,
        quota_exceeded_by_data_in_use=pressure and policy.over(used),
    )


def protection(task: TaskUse, policy: PlanPolicy, now: float) -> str:
    """Why a task may not be collected now ("held", "downloading", "uploading", "grace"), or "" when it may."""
    if task.holders:
        return "held"
    if task.downloads:
        return "downloading"
    if task.uploads:
        return "uploading"
    if task.state is TaskState.RUNNING and now - task.updated_at < policy.stale_after:
        return "downloading"  # a writer touched it recently: it is only between pieces
    if task.state is TaskState.SUCCEEDED:
        settled = max(task.finished_at or task.created_at, task.released_at or 0.0)
        if now - settled < policy.grace_period:
            return "grace"
    return ""


def victim(task: TaskUse, reason: str) -> Victim:
    return Victim(task.id, task.state, reason, task.bytes)


def _must_go(task: TaskUse, policy: PlanPolicy, now: float) -> str:
    """Why an unprotected task goes whatever the quota, or "" when only the quota may take it."""
    if task.state is TaskState.FAILED:
        return "failed"
    if task.state is TaskState.RUNNING:
        return "stale"
    if now - task.last_used_at > policy.task_ttl:
        return "ttl"
    return ""
