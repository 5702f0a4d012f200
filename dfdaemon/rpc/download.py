"""``dfdaemon.v2.DfdaemonDownload``: what local clients (dfget, runtimes) call over the unix socket."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.empty_pb2 import Empty

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_pb2
from dfdaemon.download import DownloadManager
from dfdaemon.rpc import convert
from dfdaemon.rpc.convert import unary
from dfdaemon.rpc.scheduler_client import HostInfo, SchedulerClient
from dfdaemon.rpc.servers import Context
from dfdaemon.storage import Storage

SERVICE = dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonDownload"]

log = logging.getLogger("dfdaemon.rpc")


@dataclass
class Membership:
    """Where this daemon stands in the cluster; filled in once its servers listen and it has joined."""

    host: HostInfo | None = None
    scheduler: SchedulerClient | None = None


class TaskServicer:
    """The RPCs both services share: a download through this daemon, and the task as local or cluster view."""

    # Whether callers reach this service over the network (the upload server) rather than the local socket.
    from_network = False

    def __init__(self, storage: Storage, downloads: DownloadManager, membership: Membership) -> None:
        self.storage = storage
        self.downloads = downloads
        self.membership = membership

    @unary
    async def StatTask(self, request: dfdaemon_pb2.StatTaskRequest, context: Context) -> common_pb2.Task:
        """The task as the scheduler sees it (peers, pieces); the local record when there is no scheduler."""
        task_id = ids.validate_task_id(request.task_id)
        scheduler = self.membership.scheduler
        if scheduler is not None:
            try:
                return await scheduler.stat_task(task_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("StatTask from the scheduler failed: %s", exc.details() or exc.code().name)
        task = await self.storage.require_task(task_id)
        return convert.local_task(task)

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: Context
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        async for response in download_task(self.downloads, request, context, from_network=self.from_network):
            yield response

    @unary
    async def StatLocalTask(
        self, request: dfdaemon_pb2.StatLocalTaskRequest, context: Context
    ) -> dfdaemon_pb2.StatLocalTaskResponse:
        task = await self.storage.require_task(request.task_id)
        return convert.stat_local_task(task, self.storage.in_flight(task.id)[1])


class DownloadServicer(TaskServicer):
    """Local clients over the unix socket; RPCs not defined here answer UNIMPLEMENTED."""

    @unary
    async def ListLocalTasks(
        self, request: dfdaemon_pb2.ListLocalTasksRequest, context: Context
    ) -> dfdaemon_pb2.ListLocalTasksResponse:
        tasks = await self.storage.list_tasks()
        return dfdaemon_pb2.ListLocalTasksResponse(
            tasks=[convert.stat_local_task(task, self.storage.in_flight(task.id)[1]) for task in tasks]
        )

    @unary
    async def DeleteTask(self, request: dfdaemon_pb2.DeleteTaskRequest, context: Context) -> Empty:
        """Delete locally and tell the scheduler; refused while holders or in-flight work reference the task."""
        await self.storage.delete_task(request.task_id)
        return Empty()

    @unary
    async def DeleteHost(self, request: Empty, context: Context) -> Empty:
        """Leave the cluster for good (until a restart): announcements stop, every scheduler forgets this host and
        its peers, so no peer is sent here any more. Downloads under way finish; new ones skip the scheduler and
        go back to source (or fail when back to source is disabled); the cache still serves local clients."""
        scheduler = self.membership.scheduler
        if scheduler is not None:
            self.membership.scheduler = None
            await scheduler.delete_host()
        return Empty()

    @unary
    async def DeleteLocalTask(self, request: dfdaemon_pb2.DeleteLocalTaskRequest, context: Context) -> Empty:
        await self.storage.delete_task(request.task_id)
        return Empty()


async def download_task(
    downloads: DownloadManager,
    request: dfdaemon_pb2.DownloadTaskRequest,
    context: Context,
    *,
    from_network: bool,
) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
    """Shared by both services: stream one download; any failure ends the stream with its status."""
    if not request.HasField("download"):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "download is required")
    try:
        async for event in downloads.download(convert.download_request(request.download, from_network=from_network)):
            yield convert.download_event(event, downloads.host_id)
    except Exception as error:
        await convert.abort_for(context, error)
