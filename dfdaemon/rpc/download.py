"""``dfdaemon.v2.DfdaemonDownload``: what local clients (dfget, runtimes) call over the unix socket."""

from __future__ import annotations

from dfdaemon.api import dfdaemon_pb2

SERVICE = dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonDownload"]


class DownloadServicer:
    """Downloads and local task management; RPCs not defined here answer UNIMPLEMENTED."""
