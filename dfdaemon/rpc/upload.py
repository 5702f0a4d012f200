"""``dfdaemon.v2.DfdaemonUpload``: what other peers and schedulers call over TCP."""

from __future__ import annotations

from dfdaemon.api import dfdaemon_pb2

SERVICE = dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonUpload"]


class UploadServicer:
    """Serves pieces to other peers; RPCs not defined here answer UNIMPLEMENTED."""
