"""Deciding what GC takes: a pure function over plain data, with no database, clock or file behind it.

``plan(snapshot, policy, now)`` marks every task in the snapshot: protected (skipped, with why and by whom),
a victim (with the reason it goes), or spare (a quota candidate kept while the predicted usage allows). A task
is a candidate only when nothing references it (no holder, no download writing it, no upload reading it) and
it is past its grace. Failed and abandoned candidates go first, then those idle longer than the TTL, then,
while the usage is at or above the high watermark (or eats into the reserve), the least recently used until
it is down to the target. The filesystem holding the cache is a second input: when it is filled past its high
mark, by the cache or by anything else, the least recently used go (reason "disk") until the cache's share brings
it under its low mark. When data in use alone keeps the cache over, the plan says so instead of taking it.
The collector applies the victims through ``Storage.apply``, which re-checks each one's references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

from dfdaemon.storage.models import Quiet, TaskState, TaskUse, Victim

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

    @property
    def disk(self) -> Disk:
        return Disk(self.fs_total, self.fs_free)


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
    # Bytes a caller needs below the quota (and on the filesystem) besides (a download asking for room).
    reserve: int = 0
    # The filesystem's marks, in percent of its size: above the high one it is under pressure.
    disk_high_percent: int = 80
    disk_low_percent: int = 60

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
            disk_high_percent=policy.high_percent,
            disk_low_percent=policy.low_percent,
        )

    @property
    def target(self) -> int:
        """Where quota eviction stops: the low watermark, or lower when the reserve needs it."""
        return min(self.low, self.quota - self.reserve)

    def over(self, used: int) -> bool:
        """Whether ``used`` bytes call for quota eviction."""
        return used >= self.high or used > self.quota - self.reserve

    def disk_target(self, disk: Disk) -> int:
        """Filesystem bytes in use where disk eviction stops: the low mark, or lower when the reserve needs it."""
        return min(disk.total * self.disk_low_percent // 100, disk.total - self.reserve)

    def disk_over(self, disk: Disk, used: int) -> bool:
        """Whether ``used`` bytes in use on the filesystem call for disk eviction."""
        return used >= disk.total * self.disk_high_percent // 100 or used > disk.total - self.reserve

    def quiet(self, now: float, used: int, disk: Disk | None) -> Quiet | None:
        """Which tasks a snapshot may leave out at ``now``, or None when ``used`` or the filesystem calls for
        eviction (every candidate counts then). A one-second margin on each limit leaves the tasks near it to the
        plan's own comparison."""
        if self.over(used) or (disk is not None and self.disk_over(disk, disk.used)):
            return None
        return Quiet(settled_before=now - self.grace_period - 1.0, used_since=now - self.task_ttl + 1.0)

    def short(self, used: int, disk: Disk | None, *, quota_acts: bool, disk_acts: bool) -> str:
        """Why eviction must go on ("quota", "disk"), or "" once whatever acts is at its target."""
        if quota_acts and used > self.target:
            return "quota"
        if disk_acts and disk is not None and disk.used > self.disk_target(disk):
            return "disk"
        return ""


@dataclass(frozen=True)
class Disk:
    """The filesystem holding the cache, as ``statvfs`` reads it: its size and the bytes still available."""

    total: int
    free: int

    @property
    def used(self) -> int:
        return self.total - self.free


@dataclass(frozen=True)
class Snapshot:
    """The cache at one instant: every task not being evicted (in creation order), the measured usage and,
    when known, the filesystem it lives on (None leaves disk pressure out).

    ``partial``: the tasks ``PlanPolicy.quiet`` describes were left out, which only a plan under no pressure
    can do without.
    """

    tasks: Sequence[TaskUse]
    used_bytes: int
    disk: Disk | None = None
    partial: bool = False


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
    disk_pressure: bool = False  # the filesystem was over its high mark once those were counted out
    disk_used_after: int = 0  # the filesystem's bytes in use the evictions are expected to leave (0: unknown)


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
    used, disk = snapshot.used_bytes, snapshot.disk
    for item in evict:
        used, disk = _without(item.bytes, used, disk)
    pressure = policy.over(used)
    disk_pressure = disk is not None and policy.disk_over(disk, disk.used)
    if snapshot.partial and (pressure or disk_pressure):
        raise ValueError("a partial snapshot cannot be planned under quota or disk pressure")
    queue = sorted(candidates, key=_LRU_ORDER) if pressure or disk_pressure else []
    taken = 0
    while taken < len(queue) and (reason := policy.short(used, disk, quota_acts=pressure, disk_acts=disk_pressure)):
        evict.append(victim(queue[taken], reason))
        used, disk = _without(queue[taken].bytes, used, disk)
        taken += 1
    return Plan(
        evict=evict,
        spare=queue[taken:],
        skipped=skipped,
        bytes_before=snapshot.used_bytes,
        bytes_after=used,
        pressure=pressure,
        quota_exceeded_by_data_in_use=pressure and policy.over(used),
        disk_pressure=disk_pressure,
        disk_used_after=disk.used if disk is not None else 0,
    )


def _without(size: int, used: int, disk: Disk | None) -> tuple[int, Disk | None]:
    """The usage and the filesystem predicted once a task of ``size`` bytes is gone."""
    return used - size, None if disk is None else Disk(disk.total, min(disk.total, disk.free + size))


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
