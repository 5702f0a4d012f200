"""Our extension services (``dfdaemon.ext.v1``): use references, usage and GC."""

from __future__ import annotations

from dfdaemon.api import dfdaemon_ext_pb2

USE_SERVICE = dfdaemon_ext_pb2.DESCRIPTOR.services_by_name["Use"]
CACHE_SERVICE = dfdaemon_ext_pb2.DESCRIPTOR.services_by_name["Cache"]


class UseServicer:
    """Holds on tasks by containers, pods and users."""


class CacheServicer:
    """Usage accounting and garbage collection."""
