"""``dfdaemon --config FILE``: run the peer daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from dfdaemon import __version__
from dfdaemon.config import ConfigError, load_config
from dfdaemon.daemon import Daemon, StartupError
from dfdaemon.telemetry.logs import setup_logging
from dfdaemon.telemetry.tracing import TracingSettings, setup_tracing, shutdown_tracing


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dfdaemon", description="Dragonfly v2 peer daemon that never evicts data in use."
    )
    parser.add_argument("-c", "--config", type=Path, help="path of dfdaemon.yaml (defaults apply when omitted)")
    parser.add_argument("--log-level", choices=["debug", "info", "warn", "error"], help="overrides log.level")
    parser.add_argument("--version", action="version", version=f"dfdaemon {__version__}")
    return parser.parse_args(argv)


async def _serve(daemon: Daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        await stop.wait()
    finally:
        await daemon.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"dfdaemon: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level, config.log.format)
    for warning in config.warnings():
        logging.getLogger("dfdaemon.config").warning(warning)
    tracing = config.tracing
    try:
        setup_tracing(
            TracingSettings(tracing.protocol, tracing.endpoint, tracing.sampling_ratio, tracing.service_name),
            default_service="dfdaemon",
        )
        asyncio.run(_serve(Daemon(config)))
    except (StartupError, ValueError) as exc:
        print(f"dfdaemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
