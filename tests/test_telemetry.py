"""Observability across real processes: one trace over child, parent and scheduler; /metrics; log lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.registry_support import http_request
from tests.storage_support import seeded_bytes
from tests.support import (
    REPO_ROOT,
    DaemonProcess,
    OriginProcess,
    dfctl_json,
    dfget,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
)

MB = 1_000_000
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback, built from opentelemetry-proto: it keeps what it is sent."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    with self.lock:
                        self.spans.append(
                            ReceivedSpan(
                                service=resource.get("service.name", ""),
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                attributes=attributes,
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    servicer = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[OriginProcess]:
    root = tmp_path / "files"
    root.mkdir()
    (root / "blob.bin").write_bytes(seeded_bytes("test_telemetry-1", 9 * MB))
    (root / "a.bin").write_bytes(seeded_bytes("test_telemetry-2", 5 * MB))
    (root / "b.bin").write_bytes(seeded_bytes("test_telemetry-3", 5 * MB))
    with running_origin(root) as running:
        yield running


def test_one_trace_covers_child_parent_and_scheduler(
    receiver: tuple[OtlpReceiver, str], origin: OriginProcess, tmp_path: Path
) -> None:
    collected, endpoint = receiver
    fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    stub_env = {
        **fast_export,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{endpoint}",
        "OTEL_SERVICE_NAME": "dfscheduler",
    }
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler", env=stub_env))
        peers = []
        for name in ("parent", "child"):
            config = {
                "scheduler": {"addrs": [scheduler.address], "announceInterval": "2s"},
                "tracing": {"protocol": "grpc", "endpoint": f"http://{endpoint}", "serviceName": name},
                "log": {"format": "json"},
                "proxy": {"enable": True},
                # Vortex carries no trace context: the trace crosses peers on gRPC DownloadPiece.
                "download": {"protocol": "grpc"},
            }
            peers.append(stack.enter_context(running_daemon(tmp_path / name, config, env=fast_export)))
        wait_for_hosts(scheduler, 2)
        parent, child = peers
        assert dfget(parent, origin.url("blob.bin"), tmp_path / "parent.bin").returncode == 0
        assert dfget(child, origin.url("blob.bin"), tmp_path / "child.bin").returncode == 0
        dfctl_json(parent, "gc", "run")
        refused = http_request("GET", f"http://127.0.0.1:{parent.proxy_port}/v2/library/x/manifests/1?ns=bad/ns")
        assert refused.status == 400
        child_log = child.log()
    # Stopping the processes flushes their spans.

    def spans(service: str, name: str) -> list[ReceivedSpan]:
        with collected.lock:
            return [s for s in collected.spans if s.service == service and s.name == name]

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (
        spans("child", "/dfdaemon.v2.DfdaemonDownload/DownloadTask")
        and spans("dfscheduler", "/scheduler.v2.Scheduler/AnnouncePeer")
    ):
        time.sleep(0.2)

    [root] = spans("child", "/dfdaemon.v2.DfdaemonDownload/DownloadTask")
    trace_id = root.trace_id
    in_trace = [s for s in collected.spans if s.trace_id == trace_id]
    services = {(s.service, s.name) for s in in_trace}
    assert ("child", "/dfdaemon.v2.DfdaemonUpload/DownloadPiece") in services  # client spans
    assert ("parent", "/dfdaemon.v2.DfdaemonUpload/DownloadPiece") in services  # the parent's server spans
    assert ("dfscheduler", "/scheduler.v2.Scheduler/AnnouncePeer") in services
    assert ("child", "task.download") in services
    assert ("child", "schedule") in services

    [task_span] = [s for s in in_trace if s.service == "child" and s.name == "task.download"]
    pieces = [s for s in in_trace if s.service == "child" and s.name == "piece"]
    assert len(pieces) == 3  # 9 MB in 4 MiB pieces
    for piece in pieces:
        assert piece.attributes["dragonfly.task_id"] == task_span.attributes["dragonfly.task_id"]
        assert piece.attributes["dragonfly.traffic_type"] == "REMOTE_PEER"
        assert piece.attributes["dragonfly.parent"].startswith("127.0.0.1-parent-")
        assert piece.attributes["dragonfly.piece_length"] > 0
    assert sorted(p.attributes["dragonfly.piece_number"] for p in pieces) == [0, 1, 2]
    # Each parent-side DownloadPiece span is a child of a child-side client span of the same trace.
    client_ids = {s.span_id for s in in_trace if s.service == "child" and s.name.endswith("/DownloadPiece")}
    served = [s for s in in_trace if s.service == "parent" and s.name == "/dfdaemon.v2.DfdaemonUpload/DownloadPiece"]
    assert served and all(s.parent_span_id in client_ids for s in served)

    [mirror_request] = spans("parent", "proxy.request")
    assert mirror_request.attributes["dragonfly.route"] == "refused"
    assert mirror_request.attributes["http.response.status_code"] == 400
    assert mirror_request.attributes["dragonfly.path"] == "/v2/library/x/manifests/1"

    [gc_run] = spans("parent", "gc.run")
    assert gc_run.attributes["dragonfly.trigger"] == "manual"
    assert "dragonfly.gc.evicted_tasks" in gc_run.attributes

    # JSON log lines inside a span carry its trace id.
    records = [json.loads(line) for line in child_log.splitlines() if line.startswith("{")]
    assert any(r.get("trace_id") == trace_id and "download finished" in r["message"] for r in records)


def scrape(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_move_by_the_right_amounts(origin: OriginProcess, tmp_path: Path) -> None:
    config = {"gc": {"interval": "1h", "policy": {"diskThreshold": "8MB", "gracePeriod": "0s"}}}
    with running_daemon(tmp_path / "d", config) as daemon:
        assert daemon.metrics_port
        before = scrape(daemon)

        def delta(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return scrape(daemon).get(key, 0.0) - before.get(key, 0.0)

        # Copies, not hard links to the cache: evicting a must give its bytes back to the filesystem.
        copy = "--transfer-from-dfdaemon"
        assert dfget(daemon, origin.url("a.bin"), tmp_path / "a1", copy).returncode == 0
        assert delta("dfdaemon_downloads_total", result="success") == 1
        assert delta("dfdaemon_download_bytes_total", source="origin") == 5 * MB
        assert delta("dfdaemon_download_pieces_total", traffic_type="back_to_source") == 2
        assert dfget(daemon, origin.url("a.bin"), tmp_path / "a2", copy).returncode == 0
        assert delta("dfdaemon_download_bytes_total", source="local") == 5 * MB
        assert delta("dfdaemon_download_pieces_total", traffic_type="local_peer") == 2

        # Pulling b does not fit next to a in an 8 MB quota: GC evicts a (least recently used) to make room.
        assert dfget(daemon, origin.url("b.bin"), tmp_path / "b").returncode == 0
        assert delta("dfdaemon_gc_runs_total", trigger="quota", dry_run="false") >= 1
        assert delta("dfdaemon_gc_evicted_tasks_total", reason="quota") == 1
        assert delta("dfdaemon_gc_evicted_bytes_total", reason="quota") == 5 * MB

        failed = dfget(daemon, origin.url("missing.bin"), tmp_path / "missing")
        assert failed.returncode == 1
        assert delta("dfdaemon_downloads_total", result="failure") == 1

        task_id = dfctl_json(daemon, "task", "ls")["tasks"][0]["task_id"]
        dfctl_json(daemon, "use", "acquire", "--holder", "container:default/b", task_id)
        dfctl_json(daemon, "gc", "run")
        after = scrape(daemon)
        assert after[("dfdaemon_cache_tasks", ())] == 1
        assert after[("dfdaemon_held_tasks", ())] == 1
        assert after[("dfdaemon_held_bytes", ())] == 5 * MB
        assert after[("dfdaemon_cache_quota_bytes", ())] == 8 * MB
        assert after[("dfdaemon_cache_high_watermark_bytes", ())] == 6.4 * MB
        assert after[("dfdaemon_quota_exceeded_by_data_in_use", ())] == 0
        assert delta("dfdaemon_gc_runs_total", trigger="manual", dry_run="false") == 1
        assert after[("process_resident_memory_bytes", ())] > 0


def test_cli_honours_the_otel_environment(
    receiver: tuple[OtlpReceiver, str], origin: OriginProcess, tmp_path: Path
) -> None:
    collected, endpoint = receiver
    config = {"tracing": {"protocol": "grpc", "endpoint": f"http://{endpoint}", "serviceName": "peer"}}
    with running_daemon(tmp_path / "d", config, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as daemon:
        out = subprocess.run(
            [sys.executable, "-m", "dfdaemon.cli.dfget", origin.url("a.bin"), "-O", str(tmp_path / "a"),
             "-e", str(daemon.socket_path)],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{endpoint}",
                 "OTEL_SERVICE_NAME": "dfget"},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 15
    name = "/dfdaemon.v2.DfdaemonDownload/DownloadTask"
    while time.monotonic() < deadline:
        with collected.lock:
            client = [s for s in collected.spans if s.service == "dfget" and s.name == name]
            server = [s for s in collected.spans if s.service == "peer" and s.name == name]
        if client and server:
            break
        time.sleep(0.2)
    assert len(client) == 1 and len(server) == 1
    assert server[0].trace_id == client[0].trace_id
    assert server[0].parent_span_id == client[0].span_id
