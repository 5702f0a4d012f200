"""``dfdaemon.v2.DfdaemonUpload``: what other peers and schedulers call over TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dfdaemon.api import dfdaemon_pb2
from dfdaemon.download import DownloadManager
from dfdaemon.rpc.convert import Context, unary
from dfdaemon.rpc.download import download_task, stat_local_task
from dfdaemon.storage import Storage

SERVICE = dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonUpload"]


class UploadServicer:
    """Serves other peers; RPCs not defined here answer UNIMPLEMENTED."""

    def __init__(self, storage: Storage, downloads: DownloadManager) -> None:
        self.storage = storage
        self.downloads = downloads

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: Context
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        """A seed peer asked (by a scheduler) to fetch a task."""
        async for response in download_task(self.downloads, request, context):
            yield response

    @unary
    async def StatLocalTask(
        self, request: dfdaemon_pb2.StatLocalTaskRequest, context: Context
    ) -> dfdaemon_pb2.StatLocalTaskResponse:
        return await stat_local_task(self.storage, request.task_id)
