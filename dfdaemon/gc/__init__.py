"""Garbage collection: a pure plan (``plan``) over a storage snapshot, applied and recorded (``collector``)."""

from dfdaemon.gc.collector import GarbageCollector, GCReport, publish_usage
from dfdaemon.gc.plan import Disk, Eviction, GCPolicy, Limits, Plan, PlanPolicy, Skip, Snapshot, plan

__all__ = [
    "Disk",
    "Eviction",
    "GCPolicy",
    "GCReport",
    "GarbageCollector",
    "Limits",
    "Plan",
    "PlanPolicy",
    "Skip",
    "Snapshot",
    "plan",
    "publish_usage",
]
