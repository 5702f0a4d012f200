"""``manager.v2.Manager/ListSchedulers`` for a single-node cluster: the embedded scheduler names itself.

With ``dfscheduler --manager``, daemons configured with ``manager.addr`` pointing at this scheduler find it the
way they would find schedulers through Dragonfly's manager; the other manager RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from dfdaemon.api import manager_pb2
from dfdaemon.config import detect_ip
from dfdaemon.rpc.servers import Context

SERVICE = manager_pb2.DESCRIPTOR.services_by_name["Manager"]
CLUSTER_ID = 1

log = logging.getLogger("dfscheduler.manager")


def advertised_ip(listen_host: str) -> str:
    """The address peers reach this scheduler at: the listen address, or this host's when listening everywhere."""
    host = listen_host.strip("[]")
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        raise ValueError(f"--manager needs --listen with an IP address, not {listen_host!r}") from None
    return detect_ip() if unspecified else host


class ManagerServicer:
    """Answers every host with the one scheduler of cluster 1: this process (``advertise`` its address once bound)."""

    def __init__(self) -> None:
        self.scheduler = manager_pb2.Scheduler(
            id=1,
            hostname=socket.gethostname(),
            state="active",
            scheduler_cluster_id=CLUSTER_ID,
            scheduler_cluster=manager_pb2.SchedulerCluster(id=CLUSTER_ID, name="embedded"),
        )

    def advertise(self, ip: str, port: int) -> None:
        self.scheduler.ip, self.scheduler.port = ip, port

    async def ListSchedulers(
        self, request: manager_pb2.ListSchedulersRequest, context: Context
    ) -> manager_pb2.ListSchedulersResponse:
        log.info("ListSchedulers from %s (%s)", request.hostname or "?", request.ip or "?")
        return manager_pb2.ListSchedulersResponse(schedulers=[self.scheduler])
