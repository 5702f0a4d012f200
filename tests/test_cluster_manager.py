"""SchedulerDiscovery against an in-process manager and health-checked schedulers: which schedulers are kept,
and that a failed refresh keeps the last good list."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dfdaemon.api import manager_pb2
from dfdaemon.cluster.manager import DiscoveryError, PeerIdentity, SchedulerDiscovery
from dfdaemon.rpc.servers import Context, add_service

MANAGER = manager_pb2.DESCRIPTOR.services_by_name["Manager"]
IDENTITY = PeerIdentity(hostname="peer", ip="127.0.0.1", idc="idc-a", scheduler_cluster_id=0)


class FakeManager:
    def __init__(self) -> None:
        self.schedulers: list[manager_pb2.Scheduler] = []
        self.down = False
        self.requests: asyncio.Queue[manager_pb2.ListSchedulersRequest] = asyncio.Queue()

    async def ListSchedulers(
        self, request: manager_pb2.ListSchedulersRequest, context: Context
    ) -> manager_pb2.ListSchedulersResponse:
        await self.requests.put(request)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "manager database is down")
        return manager_pb2.ListSchedulersResponse(schedulers=self.schedulers)


def entry(address: str, cluster: int) -> manager_pb2.Scheduler:
    ip, port = address.rsplit(":", 1)
    return manager_pb2.Scheduler(ip=ip, port=int(port), scheduler_cluster_id=cluster)


def closed_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def healthy_server(status: health_pb2.HealthCheckResponse.ServingStatus) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def schedulers() -> AsyncIterator[list[str]]:
    """Three serving schedulers and one that answers NOT_SERVING (the last)."""
    statuses = [health_pb2.HealthCheckResponse.SERVING] * 3 + [health_pb2.HealthCheckResponse.NOT_SERVING]
    started = [await healthy_server(status) for status in statuses]
    yield [address for _, address in started]
    for server, _ in started:
        await server.stop(None)


@pytest.fixture
async def manager() -> AsyncIterator[tuple[FakeManager, str]]:
    server = grpc.aio.server()
    fake = FakeManager()
    add_service(server, MANAGER, fake)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"http://127.0.0.1:{port}"
    await server.stop(None)


async def test_keeps_the_healthy_schedulers_of_the_first_healthy_ones_cluster(
    manager: tuple[FakeManager, str], schedulers: list[str]
) -> None:
    fake, addr = manager
    a, b, c, not_serving = schedulers
    fake.schedulers = [entry(closed_address(), 5), entry(not_serving, 3), entry(a, 1), entry(c, 2), entry(b, 1)]
    discovery = SchedulerDiscovery(addr, IDENTITY, refresh_interval=60)
    try:
        assert await discovery.discover() == [a, b]
    finally:
        await discovery.close()
    request = fake.requests.get_nowait()
    assert request.source_type == manager_pb2.PEER_SOURCE
    assert (request.hostname, request.ip, request.idc, request.HasField("location")) == (
        "peer",
        "127.0.0.1",
        "idc-a",
        False,
    )


async def test_a_failed_refresh_keeps_the_last_list_and_a_new_list_is_announced(
    manager: tuple[FakeManager, str], schedulers: list[str]
) -> None:
    fake, addr = manager
    a, b, _, _ = schedulers
    fake.schedulers = [entry(a, 1), entry(b, 1)]
    discovery = SchedulerDiscovery(addr, IDENTITY, refresh_interval=0.05)
    changes: asyncio.Queue[list[str]] = asyncio.Queue()
    try:
        assert await discovery.discover() == [a, b]
        await fake.requests.get()
        fake.down = True
        discovery.start(changes.put)
        for _ in range(3):  # three refreshes the manager refused
            await asyncio.wait_for(fake.requests.get(), 10)
        assert discovery.addresses == [a, b] and changes.empty()
        fake.schedulers, fake.down = [entry(b, 1)], False
        assert await asyncio.wait_for(changes.get(), 10) == [b]
        assert discovery.addresses == [b]
    finally:
        await discovery.close()


async def test_no_healthy_scheduler_is_a_discovery_error(
    manager: tuple[FakeManager, str], schedulers: list[str]
) -> None:
    fake, addr = manager
    fake.schedulers = [entry(schedulers[3], 1), entry(closed_address(), 1)]
    discovery = SchedulerDiscovery(addr, IDENTITY, refresh_interval=60)
    try:
        with pytest.raises(DiscoveryError, match=r"named 2 schedulers, none healthy"):
            await discovery.discover()
    finally:
        await discovery.close()


async def test_unreachable_manager_is_a_discovery_error_naming_it() -> None:
    addr = f"http://{closed_address()}"
    discovery = SchedulerDiscovery(addr, IDENTITY, refresh_interval=60, timeout=5)
    try:
        with pytest.raises(DiscoveryError, match=rf"^manager {addr}: UNAVAILABLE"):
            await discovery.discover()
    finally:
        await discovery.close()
