"""OpenTelemetry tracing for every process of the project: the daemon, the scheduler stub and the CLIs.

The exporter comes from configuration (``tracing.protocol`` / ``tracing.endpoint``, as upstream) or,
where configuration says nothing, from OpenTelemetry's standard environment variables
(``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``...). Off by default: with no exporter no provider is
installed, gRPC calls go uninstrumented, and the spans the code opens are the API's no-ops.
W3C trace context travels in gRPC metadata, so one trace spans a child peer, its parents and the
scheduler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

log = logging.getLogger("dfdaemon.tracing")

tracer = trace.get_tracer("dfdaemon")


@dataclass(frozen=True)
class TracingSettings:
    """Where spans go; empty values defer to the OTEL_* environment."""

    protocol: str = ""  # "grpc", "http", "console", or "" (the environment decides; off when it says nothing)
    endpoint: str = ""
    sampling_ratio: float | None = None
    service_name: str = ""


_provider: TracerProvider | None = None


def _exporter(settings: TracingSettings) -> SpanExporter | None:
    protocol = settings.protocol
    if not protocol:
        chosen = os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip().lower()
        if chosen in ("", "none"):
            return None
        if chosen == "console":
            protocol = "console"
        elif chosen == "otlp":
            wire = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
            )
            protocol = "grpc" if wire == "grpc" else "http"
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={chosen!r} is not supported (use otlp, console or none)")
    endpoint = settings.endpoint or None
    if protocol == "console":
        return ConsoleSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        insecure = True if endpoint and not endpoint.startswith("https://") else None
        return GrpcExporter(endpoint=endpoint, insecure=insecure)
    if protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=endpoint)
    raise ValueError(f"tracing.protocol {protocol!r} is not supported (use grpc, http or console)")


def setup_tracing(settings: TracingSettings, default_service: str) -> bool:
    """Install a tracer provider when an exporter is configured; returns whether tracing is on."""
    global _provider
    exporter = _exporter(settings)
    if exporter is None:
        return False
    service = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or default_service
    sampler = None
    if settings.sampling_ratio is not None:
        sampler = ParentBased(TraceIdRatioBased(settings.sampling_ratio))
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing to %s as service %s", settings.endpoint or settings.protocol or "the OTEL_* endpoint", service)
    return True


def tracing_enabled() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush what is buffered; called once when the process stops."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A span per RPC served, continuing the caller's trace (none when tracing is off).

    The gRPC instrumentation is imported only when tracing is on: it costs every process a tenth of a second.
    """
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors() -> list[Any]:
    """A span per RPC called, carrying the trace to the callee (none when tracing is off)."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


class _ClientCallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _TracingClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For the synchronous CLIs: a client span per call, its W3C context sent in the call's metadata.

    Unlike the instrumentation's own synchronous interceptor, it hands back the original call object, so
    a caller can still cancel a stream and read its trailing metadata.
    """

    def _start(self, details: Any) -> tuple[trace.Span, _ClientCallDetails]:
        current = tracer.start_span(details.method, kind=trace.SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(current))
        metadata = [*(details.metadata or []), *carrier.items()]
        return current, _ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    @staticmethod
    def _end_with(current: trace.Span, call: Any) -> Any:
        if hasattr(call, "add_done_callback"):
            call.add_done_callback(lambda _: current.end())
        elif hasattr(call, "add_callback"):
            call.add_callback(current.end)
        else:
            current.end()
        return call

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        current, details = self._start(client_call_details)
        return self._end_with(current, continuation(details, request))

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        current, details = self._start(client_call_details)
        return self._end_with(current, continuation(details, request))


def instrument_channel(channel: grpc.Channel) -> grpc.Channel:
    """For the synchronous CLIs: trace their calls when tracing is on."""
    return grpc.intercept_channel(channel, _TracingClientInterceptor()) if tracing_enabled() else channel


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A child span of whatever is current, with ``dragonfly.``-prefixed attributes."""
    clean = {f"dragonfly.{key}": value for key, value in attributes.items() if value is not None}
    with tracer.start_as_current_span(name, attributes=clean) as current:
        yield current
