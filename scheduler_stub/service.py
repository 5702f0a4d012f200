"""The ``scheduler.v2.Scheduler`` servicer of the stub."""

from __future__ import annotations

from dfdaemon.api import scheduler_pb2

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]


class SchedulerServicer:
    """Peer scheduling; RPCs not defined here answer UNIMPLEMENTED by name."""
