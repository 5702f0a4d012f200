"""upload.bandwidthLimit in real processes: announced to the scheduler as the host's ceiling, and bytes still right.

The scheduler stub runs in this process (its own servicer, wrapped to keep each host's last AnnounceHost, since
its ListHosts does not return network figures); the daemons and the origin are their own processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

from dfdaemon.api import common_pb2, scheduler_pb2
from dfdaemon.rpc.servers import Context, add_service, new_server
from scheduler_stub.registry import Registry
from scheduler_stub.service import SERVICE, SchedulerServicer
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, dfget, running_daemon, running_origin

pytestmark = pytest.mark.slow

LIMIT = 2_000_000  # bytes per second: a 6 MiB file takes the parent a few seconds to serve
SIZE = 6 * 1024 * 1024 + 17  # above the small-download limit: the child asks the scheduler, which names the parent


class RecordingStub(SchedulerServicer):
    """The scheduler stub, keeping the host each daemon last announced."""

    def __init__(self) -> None:
        super().__init__(Registry())
        self.hosts: dict[str, common_pb2.Host] = {}
        self.announced = asyncio.Event()

    async def AnnounceHost(self, request: scheduler_pb2.AnnounceHostRequest, context: Context) -> Empty:
        self.hosts[request.host.hostname] = request.host
        self.announced.set()
        return await super().AnnounceHost(request, context)


@pytest.fixture
async def stub() -> AsyncIterator[tuple[RecordingStub, str]]:
    servicer = RecordingStub()
    server, health = new_server([SERVICE.full_name], lambda s: add_service(s, SERVICE, servicer))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set_serving(True)
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def announced(stub: RecordingStub, *hostnames: str) -> None:
    async with asyncio.timeout(30):
        while not set(hostnames) <= stub.hosts.keys():
            stub.announced.clear()
            await stub.announced.wait()


async def fetch(daemon: DaemonProcess, url: str, output: Path) -> dict[str, object]:
    result = await asyncio.to_thread(dfget, daemon, url, output, "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


async def test_a_limited_parent_announces_its_limit_and_serves_the_right_bytes(
    stub: tuple[RecordingStub, str], tmp_path: Path
) -> None:
    servicer, address = stub
    content = seeded_bytes("test_bandwidth_process-1", SIZE)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "model.bin").write_bytes(content)
    peer = {"scheduler": {"addrs": [address], "announceInterval": "1s"}}
    stack = ExitStack()
    try:
        # Blocking start-ups in threads: the daemons announce themselves to the stub on this loop while starting.
        origin = await asyncio.to_thread(stack.enter_context, running_origin(tmp_path / "files"))
        parent_config = {**peer, "upload": {"bandwidthLimit": f"{LIMIT // 1_000_000}MB"}}
        parent = await asyncio.to_thread(stack.enter_context, running_daemon(tmp_path / "parent", parent_config))
        child = await asyncio.to_thread(stack.enter_context, running_daemon(tmp_path / "child", peer))
        await announced(servicer, "parent", "child")

        await fetch(parent, origin.url("model.bin"), tmp_path / "parent.bin")
        summary = await fetch(child, origin.url("model.bin"), tmp_path / "child.bin")
        served = await asyncio.to_thread(origin.bytes_served, "model.bin")
    finally:
        await asyncio.to_thread(stack.close)

    expected = hashlib.sha256(content).hexdigest()
    assert hashlib.sha256((tmp_path / "child.bin").read_bytes()).hexdigest() == expected
    assert hashlib.sha256((tmp_path / "parent.bin").read_bytes()).hexdigest() == expected
    pieces = summary["pieces"]
    assert isinstance(pieces, dict) and pieces["REMOTE_PEER"] > 0 and pieces["BACK_TO_SOURCE"] == 0
    assert served == SIZE  # the origin was asked once: the child's bytes all came through the limited parent
    # Loopback has no link speed: the announced ceiling is the limit, in bits per second as upstream reports it.
    assert servicer.hosts["parent"].network.max_tx_bandwidth == LIMIT * 8
    assert servicer.hosts["child"].network.max_tx_bandwidth == 50_000_000_000 * 8
