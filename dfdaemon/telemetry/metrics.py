"""Prometheus metrics of the daemon, served on ``metrics.server`` (``/metrics``, upstream's port 4002).

Counters move where the work happens (downloads, uploads, GC); cache gauges are refreshed from the
storage by the daemon. Names follow Prometheus conventions: ``dfdaemon_`` prefix, base units,
``_total`` on counters.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

log = logging.getLogger("dfdaemon.metrics")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

DOWNLOADS = Counter("dfdaemon_downloads_total", "DownloadTask requests by result.", ["result"], registry=REGISTRY)
DOWNLOAD_PIECES = Counter(
    "dfdaemon_download_pieces_total",
    "Pieces delivered to DownloadTask callers, by where they came from.",
    ["traffic_type"],
    registry=REGISTRY,
)
DOWNLOAD_BYTES = Counter(
    "dfdaemon_download_bytes_total",
    "Bytes brought into the cache or served from it, by source (origin, peer, local).",
    ["source"],
    registry=REGISTRY,
)
PIECE_SECONDS = Histogram(
    "dfdaemon_piece_download_duration_seconds",
    "Time to fetch and store one piece, by source.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
UPLOAD_PIECES = Counter("dfdaemon_upload_pieces_total", "Pieces served to other peers.", registry=REGISTRY)
UPLOAD_BYTES = Counter("dfdaemon_upload_bytes_total", "Bytes served to other peers.", registry=REGISTRY)

CACHE_TASKS = Gauge("dfdaemon_cache_tasks", "Tasks in the cache.", registry=REGISTRY)
CACHE_BYTES = Gauge("dfdaemon_cache_bytes", "The cache's own bytes (content and metadata).", registry=REGISTRY)
QUOTA_BYTES = Gauge("dfdaemon_cache_quota_bytes", "The cache quota.", registry=REGISTRY)
HIGH_WATERMARK_BYTES = Gauge("dfdaemon_cache_high_watermark_bytes", "GC starts above this.", registry=REGISTRY)
LOW_WATERMARK_BYTES = Gauge("dfdaemon_cache_low_watermark_bytes", "GC evicts down to this.", registry=REGISTRY)
HELD_TASKS = Gauge("dfdaemon_held_tasks", "Tasks with at least one holder.", registry=REGISTRY)
HELD_BYTES = Gauge("dfdaemon_held_bytes", "Bytes of the tasks with holders.", registry=REGISTRY)
QUOTA_EXCEEDED = Gauge(
    "dfdaemon_quota_exceeded_by_data_in_use",
    "1 when data in use alone keeps the cache above its high watermark.",
    registry=REGISTRY,
)

GC_RUNS = Counter("dfdaemon_gc_runs_total", "GC runs by trigger.", ["trigger", "dry_run"], registry=REGISTRY)
GC_EVICTED_TASKS = Counter(
    "dfdaemon_gc_evicted_tasks_total", "Tasks GC evicted, by reason.", ["reason"], registry=REGISTRY
)
GC_EVICTED_BYTES = Counter(
    "dfdaemon_gc_evicted_bytes_total", "Bytes GC evicted, by reason.", ["reason"], registry=REGISTRY
)


PROXY_REQUESTS = Counter(
    "dfdaemon_proxy_requests_total",
    "Registry mirror and forward proxy requests, by route (blob, registry, p2p, forward, refused) and HTTP status.",
    ["route", "status"],
    registry=REGISTRY,
)


class MetricsServer:
    """The ``/metrics`` HTTP endpoint, in a thread of its own (Prometheus' own server)."""

    def __init__(self, ip: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=ip, registry=REGISTRY)
        self.port = int(self._server.server_address[1])
        log.info("metrics server listening on %s:%d", ip, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
