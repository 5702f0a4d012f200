"""``dfscheduler --listen HOST:PORT``: run the scheduler stub until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from dfdaemon.config import TLSConfig
from dfdaemon.rpc.servers import add_service, new_server
from dfdaemon.rpc.tls import TLSError, server_credentials
from dfdaemon.telemetry.logs import setup_logging
from dfdaemon.telemetry.tracing import TracingSettings, setup_tracing, shutdown_tracing
from scheduler_stub.registry import Registry
from scheduler_stub.service import SERVICE, SchedulerServicer

log = logging.getLogger("dfscheduler")

# Every answer already ignores silent hosts; the sweep only reclaims their memory while nobody asks.
SWEEP_SECONDS = 5.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dfscheduler", description="Scheduler stub speaking scheduler.v2.")
    parser.add_argument("--listen", default="127.0.0.1:8002", help="HOST:PORT to listen on; port 0 picks a free one")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    tls = parser.add_argument_group("mutual TLS (all three together)")
    tls.add_argument("--ca-cert", default="", help="PEM CA that peers' client certificates must be signed by")
    tls.add_argument("--cert", default="", help="PEM certificate this scheduler presents")
    tls.add_argument("--key", default="", help="PEM key of --cert")
    return parser.parse_args(argv)


async def _sweep(registry: Registry) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        registry.expire_hosts()


async def _serve(listen: str, tls: TLSConfig) -> int:
    registry = Registry()
    server, health = new_server([SERVICE.full_name], lambda s: add_service(s, SERVICE, SchedulerServicer(registry)))
    try:
        if tls.enabled:
            port = int(server.add_secure_port(listen, server_credentials(tls)))
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
    await server.start()
    sweep = asyncio.create_task(_sweep(registry))
    await health.set_serving(True)
    host = listen.rsplit(":", 1)[0]
    log.info("scheduler listening on %s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.set_serving(False)
    await server.stop(5.0)
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
        return asyncio.run(_serve(args.listen, tls))
    except ValueError as exc:
        print(f"dfscheduler: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())
