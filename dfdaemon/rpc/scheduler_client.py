"""Client of ``scheduler.v2.Scheduler``: host announcements, one AnnouncePeer stream per download, deletions.

Several scheduler addresses may be configured; rendezvous hashing on the task id picks the one a
task's downloads and deletions go to, so every peer of a task meets on the same scheduler.
Progress reports are best effort: a broken stream is noticed at the next decision or terminal
report, where the download path falls back to the origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import platform
from dataclasses import dataclass
from typing import Any

import grpc

from dfdaemon.api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
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


@dataclass(frozen=True)
class HostInfo:
    """This daemon as the scheduler sees it."""

    host_id: str
    ip: str
    hostname: str
    port: int

    def message(self) -> common_pb2.Host:
        return common_pb2.Host(
            id=self.host_id,
            type=0,
            hostname=self.hostname,
            ip=self.ip,
            port=self.port,
            os=platform.system().lower(),
            platform=platform.platform(),
            kernel_version=platform.release(),
        )


def pick_address(addresses: list[str], task_id: str) -> str:
    """Rendezvous hashing: stable per task, and only a removed scheduler's tasks move elsewhere."""
    return max(addresses, key=lambda address: hashlib.sha256(f"{address}/{task_id}".encode()).digest())


class SchedulerClient:
    """All scheduler traffic of one daemon."""

    def __init__(
        self,
        addresses: list[str],
        host: HostInfo,
        announce_interval: float,
        timeout: float,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one scheduler address is required")
        self.addresses = addresses
        self.host = host
        self.announce_interval = announce_interval
        self.timeout = timeout
        self._channels = {
            address: (
                grpc.aio.secure_channel(address, credentials, interceptors=client_interceptors())
                if credentials is not None
                else grpc.aio.insecure_channel(address, interceptors=client_interceptors())
            )
            for address in addresses
        }
        self._announcer: asyncio.Task[None] | None = None
        # Set once by delete_host: from then on nothing re-announces the host or registers a download.
        self._left = asyncio.Event()

    def stub(self, address: str) -> scheduler_pb2_grpc.SchedulerAsyncStub:
        return scheduler_pb2_grpc.SchedulerStub(self._channels[address])

    def stub_for(self, task_id: str) -> scheduler_pb2_grpc.SchedulerAsyncStub:
        return self.stub(pick_address(self.addresses, task_id))

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
        while not self.left:
            await self.announce_host()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.announce_interval):
                    await self._left.wait()

    async def announce_host(self) -> None:
        """Tell every scheduler about this host; one that is down hears again at the next interval."""
        if self.left:
            return
        request = scheduler_pb2.AnnounceHostRequest(
            host=self.host.message(), interval=convert.duration(self.announce_interval)
        )
        for address in self.addresses:
            try:
                await self.stub(address).AnnounceHost(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning("announcing host to scheduler %s failed: %s", address, exc.details() or exc.code().name)

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

    async def reschedule(self, failed_parents: list[Parent], description: str) -> None:
        await self._send(
            reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(
                candidate_parents=[
                    common_pb2.Peer(id=p.peer_id, host=common_pb2.Host(id=p.host_id, ip=p.ip, port=p.port))
                    for p in failed_parents
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
