"""A stand-in for Dragonfly's manager, built from upstream's PyPI ``dragonfly-api`` bindings, run as its own process.

Usage: ``python tests/manager_server.py --scheduler CLUSTER_ID/IP:PORT [...]``. It answers
``manager.v2.Manager/ListSchedulers`` with the given schedulers in the given order, logs each request it gets as
one JSON line (``ListSchedulers {...}``), and prints ``manager listening on HOST:PORT`` once it serves. Upstream's
modules register the same ``common.v2`` names as ours in protobuf's default pool, hence a process of its own.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
from dragonfly_api import manager_pb2, manager_pb2_grpc
from google.protobuf.json_format import MessageToDict


class Manager(manager_pb2_grpc.ManagerServicer):
    def __init__(self, schedulers: list[Any]) -> None:
        self.schedulers = schedulers

    def ListSchedulers(self, request: Any, context: grpc.ServicerContext) -> Any:
        fields = MessageToDict(request, preserving_proto_field_name=True, use_integers_for_enums=True)
        print("ListSchedulers", json.dumps(fields, sort_keys=True), flush=True)
        return manager_pb2.ListSchedulersResponse(schedulers=self.schedulers)


def _scheduler(number: int, spec: str) -> Any:
    cluster, address = spec.split("/", 1)
    ip, port = address.rsplit(":", 1)
    ip = ip.strip("[]")
    return manager_pb2.Scheduler(
        id=number,
        hostname=f"scheduler-{number}",
        ip=ip,
        port=int(port),
        state="active",
        scheduler_cluster_id=int(cluster),
        scheduler_cluster=manager_pb2.SchedulerCluster(id=int(cluster), name=f"cluster-{cluster}"),
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="manager_server")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--scheduler", action="append", default=[], help="CLUSTER_ID/IP:PORT")
    args = parser.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    schedulers = [_scheduler(number, spec) for number, spec in enumerate(args.scheduler, start=1)]
    manager_pb2_grpc.add_ManagerServicer_to_server(Manager(schedulers), server)
    port = server.add_insecure_port(args.listen)
    server.start()
    print(f"manager listening on {args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
