"""Finding the schedulers through Dragonfly's manager, as upstream's peers do.

``ListSchedulers`` names schedulers of every cluster matching this host; each is health-checked (``grpc.health.v1``,
service ``""``) and the healthy ones of the first healthy scheduler's cluster are kept. The list is asked for again
every ``dynconfig.refreshInterval``; a refresh that fails (manager down, or no scheduler healthy) keeps the last
good list, so a manager outage never takes the schedulers away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from dfdaemon.api import manager_pb2, manager_pb2_grpc
from dfdaemon.cluster.addresses import manager_target

log = logging.getLogger("dfdaemon.manager")

HEALTH_TIMEOUT = 3.0


class DiscoveryError(Exception):
    """No scheduler list this time; worded for a one-line log message."""


@dataclass(frozen=True)
class PeerIdentity:
    """What the manager matches this host against (its scheduler cluster's scopes)."""

    hostname: str
    ip: str
    idc: str = ""
    location: str = ""
    version: str = ""
    scheduler_cluster_id: int = 0
    # A seed peer asks as one (SEED_PEER_SOURCE), as upstream's does.
    seed: bool = False

    def request(self) -> manager_pb2.ListSchedulersRequest:
        request = manager_pb2.ListSchedulersRequest(
            source_type=manager_pb2.SEED_PEER_SOURCE if self.seed else manager_pb2.PEER_SOURCE,
            hostname=self.hostname,
            ip=self.ip,
            version=self.version,
            scheduler_cluster_id=self.scheduler_cluster_id,
        )
        if self.idc:
            request.idc = self.idc
        if self.location:
            request.location = self.location
        return request


def scheduler_address(scheduler: manager_pb2.Scheduler) -> str:
    return f"[{scheduler.ip}]:{scheduler.port}" if ":" in scheduler.ip else f"{scheduler.ip}:{scheduler.port}"


class SchedulerDiscovery:
    """The manager's scheduler list, kept current; ``on_change`` hears every new list."""

    def __init__(
        self,
        manager_addr: str,
        identity: PeerIdentity,
        refresh_interval: float,
        timeout: float = 10.0,
        scheduler_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        target, tls = manager_target(manager_addr)
        self.manager_addr = manager_addr
        self.identity = identity
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self._scheduler_credentials = scheduler_credentials
        self._channel = (
            grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
            if tls
            else grpc.aio.insecure_channel(target)
        )
        self.addresses: list[str] = []
        self._refresher: asyncio.Task[None] | None = None

    async def discover(self) -> list[str]:
        """Ask the manager once; the healthy schedulers of the first healthy one's cluster, or ``DiscoveryError``."""
        stub = manager_pb2_grpc.ManagerStub(self._channel)
        try:
            response = await stub.ListSchedulers(self.identity.request(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise DiscoveryError(f"manager {self.manager_addr}: {exc.code().name}: {exc.details()}") from None
        schedulers = list(response.schedulers)
        healthy = await asyncio.gather(*(self._healthy(scheduler_address(s)) for s in schedulers))
        alive = [s for s, ok in zip(schedulers, healthy, strict=True) if ok]
        if not alive:
            raise DiscoveryError(f"manager {self.manager_addr} named {len(schedulers)} schedulers, none healthy")
        cluster = alive[0].scheduler_cluster_id
        addresses = [scheduler_address(s) for s in alive if s.scheduler_cluster_id == cluster]
        self.addresses = list(dict.fromkeys(addresses))
        return self.addresses

    async def _healthy(self, address: str) -> bool:
        credentials = self._scheduler_credentials
        channel = (
            grpc.aio.secure_channel(address, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(address)
        )
        try:
            # Bound by hand: the typed stubs of grpc_health's HealthStub declare no methods.
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError as exc:
            log.info("scheduler %s failed its health check: %s", address, exc.code().name)
            return False
        finally:
            await channel.close()

    def start(self, on_change: Callable[[list[str]], Awaitable[None]]) -> None:
        self._refresher = asyncio.create_task(self._refresh_forever(on_change), name="scheduler-discovery")

    async def _refresh_forever(self, on_change: Callable[[list[str]], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            previous = self.addresses
            try:
                addresses = await self.discover()
            except DiscoveryError as exc:
                log.warning("refreshing the scheduler list failed, keeping %s: %s", previous or "none", exc)
                continue
            if sorted(addresses) != sorted(previous):
                log.info("schedulers now %s (were %s)", ", ".join(addresses), ", ".join(previous) or "none")
                try:
                    await on_change(addresses)
                except Exception:
                    log.exception("switching to the new scheduler list failed")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self._channel.close()
