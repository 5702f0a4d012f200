"""Client of ``scheduler.v2.Scheduler``: host announcements, one AnnouncePeer stream per download, deletions.

Several schedulers may be known (configured, or named by the manager); upstream's consistent-hash ring picks
the one a task's calls go to, so every peer of a task, ours or upstream's, meets on the same scheduler.
Host-wide calls (AnnounceHost, DeleteHost) go to every scheduler.
Progress reports are best effort: a broken stream is noticed at the next decision or terminal
report, where the download path falls back to the origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import grpc

from dfdaemon.api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from dfdaemon.cluster.host import HostFigures, HostProbe, system_info
from dfdaemon.cluster.ring import HashRing
from dfdaemon.download.peering import (
    BackToSource,
    Decision,
    EmptyTask,
    NormalTask,
    Parent,
    Registration,
    SchedulerUnavailable,
)
from dfdaemon.rpc import convert
from dfdaemon.storage import PieceRecord
from dfdaemon.telemetry.tracing import client_interceptors

log = logging.getLogger("dfdaemon.scheduler")

# How long a peer waits for the scheduler to close the stream after a terminal report.
CLOSE_TIMEOUT = 10.0
# The deadline of a unary scheduler call (AnnounceHost, StatTask, DeleteTask, DeleteHost).
RPC_TIMEOUT = 30.0


@dataclass(frozen=True)
class HostInfo:
    """This daemon as the scheduler sees it."""

    host_id: str
    ip: str
    hostname: str
    port: int
    idc: str = ""
    location: str = ""
    scheduler_cluster_id: int = 0
    proxy_port: int = 0
    # common.v2.Host.type: 0 normal, 1 super seed (``seedPeer``).
    type: int = 0

    def message(self, figures: HostFigures | None = None) -> common_pb2.Host:
        """The ``common.v2.Host`` upstream's peers send; the machine's figures when sampled, else identity only."""
        system = figures.system if figures is not None else system_info()
        host = common_pb2.Host(
            id=self.host_id,
            type=self.type,
            hostname=self.hostname,
            ip=self.ip,
            port=self.port,
            download_port=self.port,
            os=system.os,
            platform=system.platform,
            platform_family=system.platform_family,
            platform_version=system.platform_version,
            kernel_version=system.kernel_version,
            build=common_pb2.Build(git_version=system.build_version, platform=system.build_platform),
            scheduler_cluster_id=self.scheduler_cluster_id,
            proxy_port=self.proxy_port,
            name=self.hostname,
        )
        host.network.CopyFrom(_network(self, figures))
        if figures is not None:
            _fill_figures(host, figures)
        return host


def _network(host: HostInfo, figures: HostFigures | None) -> common_pb2.Network:
    network = common_pb2.Network()
    if host.idc:
        network.idc = host.idc
    if host.location:
        network.location = host.location
    if figures is not None:
        n = figures.network
        network.tcp_connection_count = n.tcp_connection_count
        network.upload_tcp_connection_count = n.upload_tcp_connection_count
        network.max_rx_bandwidth, network.rx_bandwidth = n.max_rx_bandwidth, n.rx_bandwidth
        network.max_tx_bandwidth, network.tx_bandwidth = n.max_tx_bandwidth, n.tx_bandwidth
    return network


def _fill_figures(host: common_pb2.Host, figures: HostFigures) -> None:
    cpu, memory, disk = figures.cpu, figures.memory, figures.disk
    host.cpu.CopyFrom(
        common_pb2.CPU(
            logical_count=cpu.logical_count,
            physical_count=cpu.physical_count,
            percent=cpu.percent,
            process_percent=cpu.process_percent,
            times=common_pb2.CPUTimes(**cpu.times),
        )
    )
    host.memory.CopyFrom(
        common_pb2.Memory(
            total=memory.total,
            available=memory.available,
            used=memory.used,
            used_percent=memory.used_percent,
            process_used_percent=memory.process_used_percent,
            free=memory.free,
        )
    )
    host.disk.CopyFrom(
        common_pb2.Disk(
            total=disk.total,
            free=disk.free,
            used=disk.used,
            used_percent=disk.used_percent,
            inodes_total=disk.inodes_total,
            inodes_used=disk.inodes_used,
            inodes_free=disk.inodes_free,
            inodes_used_percent=disk.inodes_used_percent,
            read_bandwidth=disk.read_bandwidth,
            write_bandwidth=disk.write_bandwidth,
        )
    )


class SchedulerClient:
    """All scheduler traffic of one daemon."""

    def __init__(
        self,
        addresses: list[str],
        host: HostInfo,
        announce_interval: float,
        timeout: float = RPC_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        probe: HostProbe | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one scheduler address is required")
        self.host = host
        self.announce_interval = announce_interval
        self.timeout = timeout
        self.probe = probe
        self._credentials = credentials
        self._ring = HashRing(addresses)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._announcer: asyncio.Task[None] | None = None
        # Set once by delete_host: from then on nothing re-announces the host or registers a download.
        self._left = asyncio.Event()

    @property
    def addresses(self) -> list[str]:
        """The schedulers in use, in ring order."""
        return self._ring.addresses

    def stub(self, address: str) -> scheduler_pb2_grpc.SchedulerAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, interceptors=client_interceptors())
            else:
                channel = grpc.aio.insecure_channel(address, interceptors=client_interceptors())
            self._channels[address] = channel
        return scheduler_pb2_grpc.SchedulerStub(channel)

    def address_for(self, task_id: str) -> str:
        """The scheduler owning ``task_id`` on upstream's ring."""
        return self._ring.pick(task_id)

    def stub_for(self, task_id: str) -> scheduler_pb2_grpc.SchedulerAsyncStub:
        return self.stub(self.address_for(task_id))

    async def set_addresses(self, addresses: list[str]) -> None:
        """Switch to a new scheduler list (the manager's): tasks move as the ring says, a scheduler seen for the
        first time hears this host at once, and channels to dropped schedulers close."""
        if not addresses:
            raise ValueError("at least one scheduler address is required")
        before = set(self.addresses)
        self._ring = HashRing(addresses)
        for address in before - set(addresses):
            channel = self._channels.pop(address, None)
            if channel is not None:
                await channel.close()
        added = [address for address in self.addresses if address not in before]
        if added and not self.left:
            request = await self._announce_request()
            for address in added:
                await self._announce_to(address, request)

    @property
    def left(self) -> bool:
        """Whether this host has left the cluster (``delete_host``); it does not rejoin before a restart."""
        return self._left.is_set()

    def open_session(self, task_id: str, peer_id: str) -> GrpcSchedulerSession:
        """A download's AnnouncePeer session; once the host has left, one whose registration fails at once, so
        the download goes back to source (or fails when it may not) without the schedulers hearing of it."""
        stub = None if self.left else self.stub_for(task_id)
        return GrpcSchedulerSession(stub, self.host.host_id, task_id, peer_id)

    # Host lifetime

    def start(self) -> None:
        self._announcer = asyncio.create_task(self._announce_forever(), name="announce-host")

    async def _announce_forever(self) -> None:
        """Announce every interval until the host leaves; an announcement under way when it does completes first,
        so it cannot reach a scheduler after the DeleteHost and re-add the host."""
        loop = asyncio.get_running_loop()
        while not self.left:
            # One announcement per interval however long sampling the machine takes: schedulers drop a host
            # silent for two intervals.
            next_at = loop.time() + self.announce_interval
            await self.announce_host()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_at):
                    await self._left.wait()

    async def announce_host(self) -> None:
        """Tell every scheduler about this host; one that is down hears again at the next interval."""
        if self.left:
            return
        request = await self._announce_request()
        for address in self.addresses:
            await self._announce_to(address, request)

    async def _announce_request(self) -> scheduler_pb2.AnnounceHostRequest:
        """The host as it is now: the machine is sampled in a thread (psutil reads /proc and /sys)."""
        figures = await asyncio.to_thread(self.probe.sample) if self.probe is not None else None
        return scheduler_pb2.AnnounceHostRequest(
            host=self.host.message(figures), interval=convert.duration(self.announce_interval)
        )

    async def _announce_to(self, address: str, request: scheduler_pb2.AnnounceHostRequest) -> None:
        try:
            await self.stub(address).AnnounceHost(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            log.warning("announcing host to scheduler %s failed: %s", address, exc.details() or exc.code().name)
        except grpc.aio.UsageError:  # the scheduler was dropped from the list while this announcement ran
            log.info("scheduler %s left the list before it heard this host", address)

    async def stat_task(self, task_id: str) -> common_pb2.Task:
        request = scheduler_pb2.StatTaskRequest(host_id=self.host.host_id, task_id=task_id)
        return await self.stub_for(task_id).StatTask(request, timeout=self.timeout)

    async def delete_task(self, task_id: str) -> None:
        """This host no longer has the task: no child may be sent here for it (nothing to say once it left)."""
        if self.left:
            return
        request = scheduler_pb2.DeleteTaskRequest(host_id=self.host.host_id, task_id=task_id)
        try:
            await self.stub_for(task_id).DeleteTask(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            log.warning("telling the scheduler task %s is gone failed: %s", task_id, exc.details() or exc.code().name)

    async def _stop_announcing(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
            self._announcer = None

    async def delete_host(self) -> None:
        """Leave the cluster for good (a second call does nothing): announcements stop first so that none re-adds
        the host afterwards, then every scheduler forgets the host and its peers."""
        if self.left:
            return
        self._left.set()
        if self._announcer is not None:
            await self._announcer
            self._announcer = None
        request = scheduler_pb2.DeleteHostRequest(host_id=self.host.host_id)
        for address in self.addresses:
            try:
                await self.stub(address).DeleteHost(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning("leaving scheduler %s failed: %s", address, exc.details() or exc.code().name)
        log.info("host %s left the cluster: new downloads go back to source without a scheduler", self.host.host_id)

    async def close(self) -> None:
        await self._stop_announcing()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class GrpcSchedulerSession:
    """One AnnouncePeer stream, as the download path's SchedulerSession."""

    def __init__(
        self, stub: scheduler_pb2_grpc.SchedulerAsyncStub | None, host_id: str, task_id: str, peer_id: str
    ) -> None:
        self._stub = stub
        self._host_id, self._task_id, self._peer_id = host_id, task_id, peer_id
        self._call: Any = None
        self._broken = False
        # Pieces finish concurrently; a gRPC stream takes one write at a time.
        self._write_lock = asyncio.Lock()

    async def _send(self, **request: Any) -> None:
        if self._call is None:
            raise SchedulerUnavailable("the session has not registered")
        message = scheduler_pb2.AnnouncePeerRequest(
            host_id=self._host_id, task_id=self._task_id, peer_id=self._peer_id, **request
        )
        # grpc.aio cancels the whole call when a write is cancelled, and reporters are cancelled routinely (the
        # piece collection stops its workers once the last piece is in): the write runs to its end on its own.
        write = asyncio.ensure_future(self._write(message))
        write.add_done_callback(_retrieve)
        try:
            await asyncio.shield(write)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._broken = True
            raise SchedulerUnavailable(f"AnnouncePeer stream broke: {_describe(exc)}") from None

    async def _write(self, message: scheduler_pb2.AnnouncePeerRequest) -> None:
        async with self._write_lock:
            await self._call.write(message)

    async def _report(self, **request: Any) -> None:
        """Progress reports never fail a download; a broken stream shows at the next decision."""
        if self._broken:
            return
        try:
            await self._send(**request)
        except SchedulerUnavailable as exc:
            log.warning("%s", exc)

    async def register(self, registration: Registration) -> None:
        if self._stub is None:
            raise SchedulerUnavailable("this host has left the cluster")
        download = convert.registered_download(registration)
        self._call = self._stub.AnnouncePeer()
        await self._send(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download))

    async def decision(self) -> Decision:
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise SchedulerUnavailable(f"AnnouncePeer failed: {_describe(exc)}") from None
        if response is grpc.aio.EOF:
            raise SchedulerUnavailable("the scheduler closed the AnnouncePeer stream without a decision")
        kind = response.WhichOneof("response")
        if kind == "empty_task_response":
            return EmptyTask()
        if kind == "need_back_to_source_response":
            return BackToSource(response.need_back_to_source_response.description)
        if kind == "normal_task_response":
            return NormalTask(
                [
                    Parent(peer_id=peer.id, host_id=peer.host.id, ip=peer.host.ip, port=peer.host.port)
                    for peer in response.normal_task_response.candidate_parents
                ]
            )
        raise SchedulerUnavailable(f"the scheduler answered with an unknown response {kind!r}")

    async def download_started(self) -> None:
        await self._report(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest())

    async def back_to_source_started(self, description: str) -> None:
        await self._report(
            download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest(
                description=description
            )
        )

    async def piece_finished(self, piece: PieceRecord) -> None:
        await self._report(
            download_piece_finished_request=scheduler_pb2.DownloadPieceFinishedRequest(
                piece=convert.piece(piece, piece.traffic_type)
            )
        )

    async def back_to_source_piece_finished(self, piece: PieceRecord) -> None:
        await self._report(
            download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                piece=convert.piece(piece, piece.traffic_type)
            )
        )

    async def piece_failed(self, number: int, parent_id: str, temporary: bool) -> None:
        failed = scheduler_pb2.DownloadPieceFailedRequest(parent_id=parent_id, temporary=temporary)
        if number >= 0:
            failed.piece_number = number
        await self._report(download_piece_failed_request=failed)

    async def reschedule(self, candidates: list[Parent], description: str) -> None:
        """Ask for new parents; every candidate named is kept from this peer from then on."""
        await self._send(
            reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(
                candidate_parents=[
                    common_pb2.Peer(id=p.peer_id, host=common_pb2.Host(id=p.host_id, ip=p.ip, port=p.port))
                    for p in candidates
                ],
                description=description,
            )
        )

    async def finished(self, *, back_to_source: bool) -> None:
        if back_to_source:
            await self._send(
                download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest()
            )
        else:
            await self._send(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest())
        await self._await_close()

    async def failed(self, description: str, *, back_to_source: bool) -> None:
        try:
            if back_to_source:
                await self._send(
                    download_peer_back_to_source_failed_request=scheduler_pb2.DownloadPeerBackToSourceFailedRequest(
                        description=description
                    )
                )
            else:
                await self._send(
                    download_peer_failed_request=scheduler_pb2.DownloadPeerFailedRequest(description=description)
                )
            await self._await_close()
        except SchedulerUnavailable as exc:
            log.warning("reporting a failed download to the scheduler failed: %s", exc)

    async def _await_close(self) -> None:
        """The scheduler ends the stream after a terminal report; wait for that (bounded)."""
        try:
            async with self._write_lock:
                await self._call.done_writing()
            async with asyncio.timeout(CLOSE_TIMEOUT):
                while await self._call.read() is not grpc.aio.EOF:
                    pass
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            log.info("AnnouncePeer did not close cleanly: %s", _describe(exc))

    async def close(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()


def _retrieve(write: asyncio.Future[None]) -> None:
    """Consume the outcome of a write whose reporter was cancelled; the next write sees a broken stream anyway."""
    if not write.cancelled():
        write.exception()


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
