"""Doing garbage collection: when to run, measuring, applying a plan, room for downloads, every run recorded.

What a run takes is decided by ``dfdaemon.gc.plan`` over a snapshot the storage gives; a dry run is that plan
reported, a real run applies it through ``Storage.apply`` (which re-checks each victim's references) and then
re-measures, taking the plan's spare candidates one by one while the prediction fell short: eviction writes
metadata, and a task whose content file is hard-linked elsewhere (an output file) frees nothing on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dfdaemon.gc.plan import Eviction, GCPolicy, Limits, Plan, PlanPolicy, Skip, Snapshot, plan, victim
from dfdaemon.storage.manager import Storage
from dfdaemon.storage.models import Applied, DiskFull, StorageFull, Usage
from dfdaemon.telemetry import metrics, tracing

log = logging.getLogger("dfdaemon.gc")


@dataclass
class GCReport:
    """What one run did (or, dry, would do), and why."""

    id: int
    dry_run: bool
    trigger: str
    started_at: float
    finished_at: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    evicted: list[Eviction] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    quota_exceeded_by_data_in_use: bool = False
    # The filesystem's bytes in use before and after (statvfs): what the evictions really gave back to it.
    disk_used_before: int = 0
    disk_used_after: int = 0

    def to_json(self) -> str:
        # Not dataclasses.asdict: it deep-copies every entry, 5x slower for the thousands of skips of a big cache.
        data = {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "evicted": [vars(item) for item in self.evicted],
            "skipped": [vars(item) for item in self.skipped],
            "quota_exceeded_by_data_in_use": self.quota_exceeded_by_data_in_use,
            "disk_used_before": self.disk_used_before,
            "disk_used_after": self.disk_used_after,
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_row(cls, row: Any) -> GCReport:
        data = json.loads(row["report"])
        return cls(
            id=row["id"],
            dry_run=bool(row["dry_run"]),
            trigger=row["trigger"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            bytes_before=data["bytes_before"],
            bytes_after=data["bytes_after"],
            evicted=[Eviction(**item) for item in data["evicted"]],
            skipped=[Skip(**item) for item in data["skipped"]],
            quota_exceeded_by_data_in_use=data["quota_exceeded_by_data_in_use"],
            disk_used_before=data.get("disk_used_before", 0),  # absent from records written before
            disk_used_after=data.get("disk_used_after", 0),
        )


class GarbageCollector:
    """Runs GC for one storage: periodically, on demand, and when the cache crosses its quota or fills its disk."""

    def __init__(self, storage: Storage, policy: GCPolicy) -> None:
        self.storage = storage
        self.policy = policy
        self._run_lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._pressure_task: asyncio.Task[None] | None = None
        self.quota_exceeded_by_data_in_use = False
        # Downloads in progress: task id -> (bytes reserved, bytes the task had when it reserved them).
        self._reservations: dict[str, tuple[int, int]] = {}
        self._reservation_lock = asyncio.Lock()

    # Lifetime

    def start(self) -> None:
        self.storage.add_growth_listener(self._on_growth)
        self._loop_task = asyncio.create_task(self._periodic(), name="gc-periodic")

    async def stop(self) -> None:
        for task in (self._loop_task, self._pressure_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._pressure_task = None

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval)
            try:
                await self.run("interval")
            except Exception:
                log.exception("periodic GC run failed")

    def _on_growth(self) -> None:
        if self._pressure_task is None or self._pressure_task.done():
            self._pressure_task = asyncio.create_task(self._relieve_pressure(), name="gc-quota")

    async def _relieve_pressure(self) -> None:
        """Called after writes: the cheap reading (WAL included, so never too low) spares most of them a checkpoint."""
        limits = await self.limits()
        trigger = ""
        if await self.storage.used_bytes() >= limits.high and await self._measure() >= limits.high:
            trigger = "quota"
        elif PlanPolicy.of(self.policy, limits).disk_over(limits.disk, limits.disk.used):
            trigger = "disk"
        if trigger:
            try:
                await self.run(trigger)
            except Exception:
                log.exception("%s GC run failed", trigger)

    # Accounting

    async def limits(self) -> Limits:
        stat = await asyncio.to_thread(os.statvfs, self.storage.root)
        fs_total, fs_free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
        quota = self.policy.quota_bytes or fs_total
        return Limits(
            quota=quota,
            high=quota * self.policy.high_percent // 100,
            low=quota * self.policy.low_percent // 100,
            fs_total=fs_total,
            fs_free=fs_free,
        )

    async def usage(self) -> Usage:
        limits = await self.limits()
        used = await self.storage.used_bytes()
        held = await self.storage.held_task_ids()
        size = self.storage.task_bytes
        return Usage(
            used_bytes=used,
            quota_bytes=limits.quota,
            high_watermark_bytes=limits.high,
            low_watermark_bytes=limits.low,
            held_bytes=sum(map(size, held)),
            task_count=await self.storage.count_tasks(),
            held_task_count=len(held),
            quota_exceeded_by_data_in_use=self.quota_exceeded_by_data_in_use,
            filesystem_total_bytes=limits.fs_total,
            filesystem_free_bytes=limits.fs_free,
        )

    async def ensure_room(self, nbytes: int, pending: int = 0) -> None:
        """Make room for a download of ``nbytes`` or raise StorageFull: evict candidates, never data in use.

        ``pending`` counts bytes other downloads have reserved but not written yet.
        """
        limits = await self.limits()
        if nbytes > limits.quota:
            raise StorageFull(f"{nbytes} bytes do not fit in a cache quota of {limits.quota} bytes")
        over_quota = await self._measure() + pending + nbytes > limits.quota
        if over_quota or pending + nbytes > limits.fs_free:
            report = await self.run("quota" if over_quota else "disk", reserve=pending + nbytes)
            used, limits = await self._measure(), await self.limits()
            if used + pending + nbytes > limits.quota:
                raise StorageFull(
                    f"{nbytes} bytes do not fit: {used} of the {limits.quota}-byte quota are in use or too recent "
                    f"to collect ({_protection_summary(report)}), {pending} reserved by downloads in progress"
                )
        if nbytes > limits.fs_free:
            raise StorageFull(f"{nbytes} bytes do not fit: the filesystem has {limits.fs_free} bytes free")

    @contextlib.asynccontextmanager
    async def reservation(self, task_id: str, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the quota for a download until it ends, so downloads starting together cannot
        overcommit it: each later one sees what the earlier ones will still write."""
        async with self._reservation_lock:
            pending = sum(
                max(0, reserved - (self.storage.task_bytes(other) - written_before))
                for other, (reserved, written_before) in self._reservations.items()
            )
            await self.ensure_room(nbytes, pending)
            self._reservations[task_id] = (nbytes, self.storage.task_bytes(task_id))
        try:
            yield
        finally:
            self._reservations.pop(task_id, None)

    # Runs

    async def list_runs(self, limit: int = 1) -> list[GCReport]:
        rows = await self.storage.list_gc_runs(max(1, limit))
        return [GCReport.from_row(row) for row in rows]

    async def run(self, trigger: str = "manual", *, dry_run: bool = False, reserve: int = 0) -> GCReport:
        """One GC pass; runs never overlap. ``reserve`` asks for that many bytes below the quota besides."""
        with tracing.span("gc.run", trigger=trigger, dry_run=dry_run) as current:
            async with self._run_lock:
                report = await self._run(trigger, dry_run, reserve)
            run_id = await self.storage.record_gc_run(
                dry_run, trigger, report.started_at, report.finished_at, report.to_json()
            )
            report.id = run_id
            if current.is_recording():  # a pass over a big cache skips thousands of tasks: only for a real span
                current.set_attributes(_span_attributes(report))
        metrics.GC_RUNS.labels(trigger, str(dry_run).lower()).inc()
        if not dry_run:
            for eviction in report.evicted:
                metrics.GC_EVICTED_TASKS.labels(eviction.reason).inc()
                metrics.GC_EVICTED_BYTES.labels(eviction.reason).inc(eviction.bytes)
            publish_usage(await self.usage())
        return report

    async def _measure(self) -> int:
        """The cache's usage as it stands: the metadata's write-ahead log folded in first, so it does not count."""
        with contextlib.suppress(DiskFull):
            await self.storage.compact()
        return await self.storage.used_bytes()

    async def _run(self, trigger: str, dry_run: bool, reserve: int) -> GCReport:
        """Plan over a snapshot; a dry run reports the plan, a real run applies it and reports what happened."""
        now = self.storage.clock()
        used = await self._measure()
        limits = await self.limits()
        policy = PlanPolicy.of(self.policy, limits, reserve)
        # Under no pressure the quiet majority of a big cache can only be spared: the snapshot leaves it out.
        quiet = policy.quiet(now, used, limits.disk)
        tasks = await self.storage.gc_view(purge_lapsed=not dry_run, quiet=quiet)
        decided = plan(Snapshot(tasks, used, limits.disk, partial=quiet is not None), policy, now)
        report = GCReport(
            id=0,
            dry_run=dry_run,
            trigger=trigger,
            started_at=now,
            bytes_before=decided.bytes_before,
            skipped=list(decided.skipped),
            quota_exceeded_by_data_in_use=decided.quota_exceeded_by_data_in_use,
            disk_used_before=limits.disk.used,
        )
        if dry_run:
            report.evicted = [Eviction(item.task_id, item.reason, item.bytes) for item in decided.evict]
            report.bytes_after = decided.bytes_after
            report.disk_used_after = decided.disk_used_after
        else:
            await self._apply(decided, policy, report)
            self.quota_exceeded_by_data_in_use = report.quota_exceeded_by_data_in_use
        if report.quota_exceeded_by_data_in_use:
            protected = sorted({holder for skip in report.skipped for holder in skip.holders})
            log.warning(
                "quota exceeded by data in use: %d bytes used, high watermark %d, held by %s",
                report.bytes_after,
                policy.high,
                ", ".join(protected) or "in-flight work",
            )
        report.finished_at = self.storage.clock()
        return report

    async def _apply(self, decided: Plan, policy: PlanPolicy, report: GCReport) -> None:
        """Evict the plan's victims; when the quota or the disk acts, measure, and go on down the spares while short.

        The prediction ignores what eviction itself writes and counts a hard-linked task's bytes as freed, so the
        measured usage may stay above the target.
        """
        _record(await self.storage.apply(decided.evict), report)
        if decided.pressure or decided.disk_pressure:
            used, disk = await self._measure(), (await self.limits()).disk
            for task in decided.spare:
                reason = policy.short(used, disk, quota_acts=decided.pressure, disk_acts=decided.disk_pressure)
                if not reason:
                    break
                _record(await self.storage.apply([victim(task, reason)]), report)
                used, disk = await self._measure(), (await self.limits()).disk
            report.quota_exceeded_by_data_in_use = decided.pressure and policy.over(used)
            if decided.disk_pressure and disk.used > policy.disk_target(disk):
                log.warning(
                    "the cache's filesystem stays over its low mark: %d of %d bytes in use, nothing more to evict",
                    disk.used,
                    disk.total,
                )
        report.bytes_after = await self._measure()
        report.disk_used_after = (await self.limits()).disk.used


def _span_attributes(report: GCReport) -> dict[str, Any]:
    """What a run's span says of it: counts, bytes, and every holder that kept a task."""
    return {
        "dragonfly.gc.evicted_tasks": len(report.evicted),
        "dragonfly.gc.evicted_bytes": sum(e.bytes for e in report.evicted),
        "dragonfly.gc.skipped_tasks": len(report.skipped),
        "dragonfly.gc.protected_by": sorted({holder for skip in report.skipped for holder in skip.holders}),
        "dragonfly.gc.bytes_before": report.bytes_before,
        "dragonfly.gc.bytes_after": report.bytes_after,
    }


def _record(applied: Applied, report: GCReport) -> None:
    """Add what an eviction batch did to the report: a victim a reference kept becomes a "referenced" skip."""
    report.evicted.extend(Eviction(item.task_id, item.reason, item.bytes) for item in applied.evicted)
    for refusal in applied.refused:
        refs, chosen = refusal.references, refusal.victim
        report.skipped.append(
            Skip(chosen.task_id, "referenced", refs.holders, refs.downloads, refs.uploads, chosen.bytes)
        )


def _protection_summary(report: GCReport) -> str:
    """What kept the bytes a GC run could not free: "held 5 MB, in flight 2 MB, within the grace period 1 MB"."""
    totals: dict[str, int] = {}
    for skip in report.skipped:
        kind = {"held": "held", "grace": "within the grace period"}.get(skip.reason, "in flight")
        totals[kind] = totals.get(kind, 0) + skip.bytes
    return ", ".join(f"{kind} {size} bytes" for kind, size in totals.items()) or "nothing left to evict"


def publish_usage(usage: Usage) -> None:
    """Set the cache gauges from one usage reading."""
    metrics.CACHE_TASKS.set(usage.task_count)
    metrics.CACHE_BYTES.set(usage.used_bytes)
    metrics.QUOTA_BYTES.set(usage.quota_bytes)
    metrics.HIGH_WATERMARK_BYTES.set(usage.high_watermark_bytes)
    metrics.LOW_WATERMARK_BYTES.set(usage.low_watermark_bytes)
    metrics.HELD_TASKS.set(usage.held_task_count)
    metrics.HELD_BYTES.set(usage.held_bytes)
    metrics.QUOTA_EXCEEDED.set(1 if usage.quota_exceeded_by_data_in_use else 0)
