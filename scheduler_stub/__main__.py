"""``dfscheduler --listen HOST:PORT [--manager]``: run the scheduler stub until SIGTERM or SIGINT.

With ``--manager`` the same port also answers the manager's ``ListSchedulers`` naming this scheduler, so daemons
can be set up with ``manager.addr`` as in a real cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc

from dfdaemon.config import TLSConfig
from dfdaemon.rpc.servers import add_service, new_server
from dfdaemon.rpc.tls import TLSError, channel_credentials, server_credentials
from dfdaemon.telemetry.logs import setup_logging
from dfdaemon.telemetry.tracing import TracingSettings, setup_tracing, shutdown_tracing
from scheduler_stub import manager
from scheduler_stub.registry import Registry
from scheduler_stub.service import SERVICE, SchedulerServicer

log = logging.getLogger("dfscheduler")

# Every answer already ignores silent hosts; the sweep only reclaims their memory while nobody asks.
SWEEP_SECONDS = 5.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dfscheduler", description="Scheduler stub speaking scheduler.v2.")
    parser.add_argument("--listen", default="127.0.0.1:8002", help="HOST:PORT to listen on; port 0 picks a free one")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    parser.add_argument(
        "--manager",
        action="store_true",
        help="also serve manager.v2 ListSchedulers naming this scheduler (a single-node cluster's manager)",
    )
    tls = parser.add_argument_group("mutual TLS (all three together)")
    tls.add_argument("--ca-cert", default="", help="PEM CA that peers' client certificates must be signed by")
    tls.add_argument("--cert", default="", help="PEM certificate this scheduler presents")
    tls.add_argument("--key", default="", help="PEM key of --cert")
    return parser.parse_args(argv)


async def _sweep(registry: Registry) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        registry.expire_hosts()


async def _serve(listen: str, tls: TLSConfig, as_manager: bool) -> int:
    registry = Registry()
    scheduler = SchedulerServicer(registry)
    manager_servicer = manager.ManagerServicer()  # told its address once the port is bound

    def register(server: grpc.aio.Server) -> None:
        add_service(server, SERVICE, scheduler)
        if as_manager:
            add_service(server, manager.SERVICE, manager_servicer)

    services = [SERVICE.full_name, *([manager.SERVICE.full_name] if as_manager else [])]
    server, health = new_server(services, register)
    try:
        if tls.enabled:
            port = int(server.add_secure_port(listen, server_credentials(tls)))
            # The same identity when calling seeds and peers: their upload servers ask for a client certificate.
            scheduler.peer_credentials = channel_credentials(tls)
        else:
            port = int(server.add_insecure_port(listen))
    except TLSError as exc:
        print(f"dfscheduler: {exc}", file=sys.stderr)
        return 1
    except RuntimeError:
        port = 0
    if port == 0:
        print(f"dfscheduler: cannot listen on {listen}", file=sys.stderr)
        return 1
    host = listen.rsplit(":", 1)[0]
    if as_manager:
        manager_servicer.advertise(manager.advertised_ip(host), port)
    await server.start()
    sweep = asyncio.create_task(_sweep(registry))
    await health.set_serving(True)
    log.info("scheduler listening on %s:%d", host, port)
    if as_manager:
        log.info("manager role on: daemons may use manager.addr http://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.set_serving(False)
    await server.stop(5.0)
    await scheduler.close()
    sweep.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if ":" not in args.listen:
        print(f"dfscheduler: --listen must be HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    try:
        setup_tracing(TracingSettings(), default_service="dfscheduler")  # OpenTelemetry's OTEL_* environment
        if len({bool(args.ca_cert), bool(args.cert), bool(args.key)}) > 1:
            raise ValueError("--ca-cert, --cert and --key go together")
        tls = TLSConfig(ca_cert=args.ca_cert, cert=args.cert, key=args.key)
        return asyncio.run(_serve(args.listen, tls, args.manager))
    except ValueError as exc:
        print(f"dfscheduler: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())
