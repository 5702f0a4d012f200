"""A scripted ``scheduler.v2.Scheduler`` on a real gRPC server that records what peers send it.

Tests point a real daemon at it to see the AnnouncePeer stream exactly as the daemon writes it: each stream's
requests in order, whether the peer half-closed after its terminal request, and whether the scheduler closed it.
A script answers each request (or not); after a terminal request the stream is closed once ``release`` is set,
so a test can hold the close back and watch the peer wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from google.protobuf.empty_pb2 import Empty

from dfdaemon.api import common_pb2, scheduler_pb2, scheduler_pb2_grpc

TERMINAL = frozenset(
    {
        "download_peer_finished_request",
        "download_peer_failed_request",
        "download_peer_back_to_source_finished_request",
        "download_peer_back_to_source_failed_request",
    }
)


@dataclass
class Stream:
    """One AnnouncePeer call as the scheduler saw it."""

    requests: list[scheduler_pb2.AnnouncePeerRequest] = field(default_factory=list)
    half_closed: bool = False  # the peer ended its side after the terminal request
    closed: threading.Event = field(default_factory=threading.Event)  # the call ended
    # Whether the call is still up (the peer has not cancelled it), while the scheduler holds it open.
    is_active: Callable[[], bool] = lambda: False

    def kinds(self) -> list[str]:
        return [str(request.WhichOneof("request")) for request in self.requests]

    def all(self, kind: str) -> list[scheduler_pb2.AnnouncePeerRequest]:
        return [request for request in self.requests if request.WhichOneof("request") == kind]


# Answers one request of a stream (None: stay silent).
Script = Callable[[Stream, scheduler_pb2.AnnouncePeerRequest], scheduler_pb2.AnnouncePeerResponse | None]


def back_to_source(
    stream: Stream, request: scheduler_pb2.AnnouncePeerRequest
) -> scheduler_pb2.AnnouncePeerResponse | None:
    """The Go scheduler's answer to a first peer: go to the origin."""
    if request.WhichOneof("request") == "register_peer_request":
        return scheduler_pb2.AnnouncePeerResponse(
            need_back_to_source_response=scheduler_pb2.NeedBackToSourceResponse(description="no parent yet")
        )
    return None


def normal_task(*parents: common_pb2.Peer) -> scheduler_pb2.AnnouncePeerResponse:
    return scheduler_pb2.AnnouncePeerResponse(
        normal_task_response=scheduler_pb2.NormalTaskResponse(candidate_parents=list(parents))
    )


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.hosts: list[common_pb2.Host] = []
        self.streams: list[Stream] = []
        self.release = threading.Event()
        self.release.set()
        self.terminal = threading.Event()  # some stream received its terminal request
        self._lock = threading.Lock()

    def AnnounceHost(self, request: scheduler_pb2.AnnounceHostRequest, context: grpc.ServicerContext) -> Empty:
        with self._lock:
            self.hosts.append(request.host)
        return Empty()

    def DeleteHost(self, request: scheduler_pb2.DeleteHostRequest, context: grpc.ServicerContext) -> Empty:
        return Empty()

    def DeleteTask(self, request: scheduler_pb2.DeleteTaskRequest, context: grpc.ServicerContext) -> Empty:
        return Empty()

    def AnnouncePeer(
        self, request_iterator: Iterator[scheduler_pb2.AnnouncePeerRequest], context: grpc.ServicerContext
    ) -> Iterator[scheduler_pb2.AnnouncePeerResponse]:
        stream = Stream(is_active=context.is_active)
        with self._lock:
            self.streams.append(stream)
        try:
            for request in request_iterator:
                stream.requests.append(request)
                response = self.script(stream, request)
                if response is not None:
                    yield response
                if request.WhichOneof("request") in TERMINAL:
                    self.terminal.set()
                    stream.requests.extend(request_iterator)  # nothing more should come; the peer half-closes
                    stream.half_closed = True
                    self.release.wait(60)
                    return
        except grpc.RpcError:
            return  # the peer cancelled the call
        finally:
            stream.closed.set()


@contextmanager
def recording_scheduler(script: Script = back_to_source) -> Iterator[tuple[RecordingScheduler, str]]:
    """The scheduler and its ``127.0.0.1:port`` address (an ephemeral port)."""
    servicer = RecordingScheduler(script)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        servicer.release.set()
        server.stop(None)
