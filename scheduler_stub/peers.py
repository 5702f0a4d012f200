"""The scheduler calling peers: ``DfdaemonUpload.DownloadTask`` on a seed (for a new task) or on any host (preheat).

The call is read to its end, which is when the peer has the whole task; the scheduler learns the peer's progress
through that peer's own AnnouncePeer stream, so the messages here only say whether it worked.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import grpc

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS

log = logging.getLogger("dfscheduler.peers")


@dataclass(frozen=True)
class Outcome:
    """How one DownloadTask call ended: ``error`` is empty when the peer has the task."""

    address: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def address(ip: str, port: int) -> str:
    """``ip:port`` as gRPC wants it, IPv6 in brackets."""
    try:
        bracket = ipaddress.ip_address(ip).version == 6
    except ValueError:
        bracket = False
    return f"[{ip}]:{port}" if bracket else f"{ip}:{port}"


@dataclass(frozen=True)
class Target:
    """A peer's upload server, and the mutual TLS identity to call it with (None: plaintext)."""

    ip: str
    port: int
    credentials: grpc.ChannelCredentials | None = None

    def channel(self) -> grpc.aio.Channel:
        where = address(self.ip, self.port)
        if self.credentials is None:
            return grpc.aio.insecure_channel(where, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(where, self.credentials, options=CHANNEL_OPTIONS)


async def download_task(peer: Target, download: common_pb2.Download, deadline: float | None) -> Outcome:
    """Ask ``peer`` to download ``download`` into its cache and wait until it has, at most ``deadline`` seconds."""
    target = address(peer.ip, peer.port)
    async with peer.channel() as channel:
        call = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel).DownloadTask(
            dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=deadline
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            outcome = Outcome(target, f"{error.code().name}: {error.details()}")
            log.warning("DownloadTask of %s on %s failed: %s", download.url, target, outcome.error)
            return outcome
    log.info("DownloadTask of %s on %s finished", download.url, target)
    return Outcome(target)
