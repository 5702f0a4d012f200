"""The CLIs' connection to the daemon's socket, traced when OpenTelemetry's environment asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from dfdaemon.rpc.servers import CHANNEL_OPTIONS


@contextmanager
def daemon_channel(socket_path: str, service: str) -> Iterator[grpc.Channel]:
    """A channel to ``unix:socket_path``; with ``OTEL_TRACES_EXPORTER`` set, its calls carry and export a trace.

    Tracing is imported only then: a CLI call without it should start fast.
    """
    with grpc.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS) as channel:
        if os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() in ("", "none"):
            yield channel
            return
        from dfdaemon.telemetry import tracing

        tracing.setup_tracing(tracing.TracingSettings(), default_service=service)
        try:
            yield tracing.instrument_channel(channel)
        finally:
            tracing.shutdown_tracing()
