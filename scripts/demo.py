"""The local demo: start a daemon on loopback with its state under ``.demo/``, show it is serving, and keep it up.

``--once`` checks the daemon answers (health SERVING on both servers) and exits, for scripted runs.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        match = regex.search(log.read_text())
        if match:
            return match
        if proc.poll() is not None:
            raise SystemExit(f"demo: dfdaemon exited early:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"demo: dfdaemon did not start in {timeout:.0f}s:\n{log.read_text()}")


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="check the daemon answers, then stop")
    args = parser.parse_args()

    state = ROOT / ".demo"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    # Unix socket paths are limited to about 100 bytes, so the socket lives in a short temporary directory.
    sock_dir = Path(tempfile.mkdtemp(prefix="dfdemo-"))
    socket_path = sock_dir / "dfdaemon.sock"
    config = {
        "host": {"ip": "127.0.0.1", "hostname": "demo-peer"},
        "upload": {"server": {"ip": "127.0.0.1", "port": 0}},
        "download": {"server": {"socketPath": str(socket_path)}},
        "storage": {"dir": str(state / "storage")},
    }
    config_path = state / "dfdaemon.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = state / "dfdaemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dfdaemon.cli.daemon", "--config", str(config_path)], stdout=out, stderr=out
        )
    try:
        port = _wait_for(log, r"upload server listening on 127\.0\.0\.1:(\d+)", proc).group(1)
        _wait_for(log, r"download server listening on unix:", proc)
        grpcurl = Path(sys.executable).parent / "grpcurl"
        print(f"dfdaemon is up (log: {log.relative_to(ROOT)})")
        print(f"  upload server   127.0.0.1:{port}   health {_health(f'127.0.0.1:{port}')}")
        print(f"  download socket {socket_path}   health {_health(f'unix:{socket_path}')}")
        print("Inspect it with:")
        print(f"  {grpcurl} -plaintext 127.0.0.1:{port} list")
        print(f"  {grpcurl} -unix -plaintext {socket_path} list")
        if args.once:
            return 0
        print("Ctrl-C stops the demo.")
        with contextlib.suppress(KeyboardInterrupt):
            proc.wait()
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        shutil.rmtree(sock_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
