"""Helpers for tests that run the real programs as separate processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from aiohttp import web

from dfdaemon.api import scheduler_pb2, scheduler_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
# Debian installs some programs in sbin, which a non-root PATH may lack.
SYSTEM_BIN_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")


def find_binary(name: str) -> str | None:
    """The path of ``name`` on PATH or in the usual system bin directories, or None."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_BIN_DIRS]))


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for a failure message."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Ask a process to stop (``sig``), kill it if it does not within ``timeout``; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def wait_for_line(log_path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> re.Match[str]:
    """Wait until the process logs a line matching ``pattern``; fail with its log if it exits first."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text() if log_path.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before logging {pattern!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {pattern!r}:\n{log_path.read_text()}")


class SignalledProcess(subprocess.Popen[bytes]):
    """A child process that remembers whether the test itself SIGKILLed it (``kill()`` or ``send_signal``)."""

    killed_by_test = False

    def send_signal(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self.killed_by_test = True
        super().send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


TRACEBACK = "Traceback (most recent call last)"


def check_exit(proc: SignalledProcess, killed_by_test: bool, status: int, log_path: Path) -> None:
    """Fail unless a daemon exited 0 without logging a traceback; one the test SIGKILLed only must not have logged
    a traceback before it died."""
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    where = f"dfdaemon (pid {proc.pid}, log {log_path.name})"
    assert TRACEBACK not in log, f"{where} logged a traceback:\n{log[log.index(TRACEBACK) :][:4000]}"
    if not killed_by_test:
        assert status == 0, f"{where} exited with {status}:\n{tail(log_path)}"


@dataclass
class DaemonProcess:
    proc: SignalledProcess
    config_path: Path
    log_path: Path
    storage_dir: Path
    socket_path: Path
    upload_port: int
    metrics_port: int | None = None
    proxy_port: int | None = None
    vortex_port: int | None = None

    @property
    def upload_address(self) -> str:
        return f"127.0.0.1:{self.upload_port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        return stop_process(self.proc, sig, timeout)


def daemon_config(workdir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config on loopback, an ephemeral port and directories under ``workdir``."""
    base: dict[str, Any] = {
        "host": {"ip": "127.0.0.1", "hostname": workdir.name},
        "upload": {"server": {"ip": "127.0.0.1", "port": 0}},
        "download": {"server": {"socketPath": str(workdir / "dfdaemon.sock")}},
        "storage": {"dir": str(workdir / "storage"), "server": {"tcpPort": 0}},
        "metrics": {"server": {"ip": "127.0.0.1", "port": 0}},
        # The registry mirror only where a test asks for it ("proxy": {"enable": True}): it costs start-up time.
        "proxy": {"enable": False, "server": {"ip": "127.0.0.1", "port": 0}},
    }
    return merge(base, extra or {})


def run_module(module: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` to completion, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, **kwargs
    )


@contextmanager
def running_daemon(
    workdir: Path, extra: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> Iterator[DaemonProcess]:
    """Start ``dfdaemon`` as its own process and stop it with SIGTERM afterwards.

    When the body ends without an exception, the test fails if the daemon exited non-zero (a crash, a failed
    shutdown, one killed for not stopping in time) or logged a traceback. A test that ends a daemon on purpose says
    so by SIGKILLing it itself (``daemon.proc.kill()`` or ``daemon.proc.send_signal(signal.SIGKILL)``): then only
    the traceback check applies."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = daemon_config(workdir, extra)
    config_path = workdir / "dfdaemon.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "dfdaemon.log"
    with log_path.open("wb") as log_file:
        proc = SignalledProcess(
            [sys.executable, "-m", "dfdaemon.cli.daemon", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        wait_for_line(log_path, r"download server listening on unix:", proc)
        port = int(wait_for_line(log_path, r"upload server listening on [^\s]+:(\d+)", proc).group(1))
        started = log_path.read_text()  # the optional servers log before the upload server does
        metrics = re.search(r"metrics server listening on [^\s]+:(\d+)", started)
        proxy = re.search(r"proxy server listening on [^\s]+:(\d+)", started)
        vortex = re.search(r"vortex server listening on [^\s]+:(\d+)", started)
        yield DaemonProcess(
            proc=proc,
            config_path=config_path,
            log_path=log_path,
            storage_dir=Path(config["storage"]["dir"]),
            socket_path=Path(config["download"]["server"]["socketPath"]),
            upload_port=port,
            metrics_port=int(metrics.group(1)) if metrics else None,
            proxy_port=int(proxy.group(1)) if proxy else None,
            vortex_port=int(vortex.group(1)) if vortex else None,
        )
    finally:
        killed_by_test = proc.killed_by_test  # before stop_process, whose own SIGKILL (a hung stop) must not count
        status = stop_process(proc)
    check_exit(proc, killed_by_test, status, log_path)


@dataclass
class OriginProcess:
    proc: subprocess.Popen[bytes]
    root: Path
    address: str

    def url(self, name: str) -> str:
        return f"http://{self.address}/{name}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.address}/__stats__", timeout=10) as response:
            return dict(json.load(response))

    def bytes_served(self, name: str) -> int:
        return int(self.stats()["by_path"].get(f"/{name}", 0))

    def fault(self, name: str, **fault: object) -> None:
        query = urllib.parse.urlencode({"path": f"/{name}", **{k: str(v) for k, v in fault.items()}})
        request = urllib.request.Request(f"http://{self.address}/__fault__?{query}", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass


@contextmanager
def running_origin(root: Path) -> Iterator[OriginProcess]:
    """The loopback HTTP origin (scripts/origin.py) serving ``root``, as its own process."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root.parent / f"{root.name}-origin.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "origin.py"), "--dir", str(root)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        address = wait_for_line(log_path, r"origin listening on (\S+)", proc).group(1)
        yield OriginProcess(proc=proc, root=root, address=address)
    finally:
        proc.terminate()
        proc.wait(10)


def run_dfctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``dfctl -e <daemon's socket> args`` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dfdaemon.cli.dfctl", "-e", str(daemon.socket_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )


def dfctl_json(daemon: DaemonProcess, *args: str) -> Any:
    """``dfctl --json args``, which must succeed; its one JSON document."""
    out = run_dfctl(daemon, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def dfget(daemon: DaemonProcess, url: str, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfdaemon.cli.dfget", url, "-O", str(output), "-e", str(daemon.socket_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


@dataclass
class SchedulerProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    channel: grpc.Channel | None = field(default=None, repr=False)

    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        """A stub on the one channel this process's tests share (closed when the scheduler stops)."""
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        return scheduler_pb2_grpc.SchedulerStub(self.channel)


@contextmanager
def running_scheduler(
    workdir: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Iterator[SchedulerProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "scheduler.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_stub", "--listen", "127.0.0.1:0", *(args or [])],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        address = wait_for_line(log_path, r"scheduler listening on (\S+)", proc).group(1)
        scheduler = SchedulerProcess(proc=proc, address=address, log_path=log_path)
        try:
            yield scheduler
        finally:
            if scheduler.channel is not None:
                scheduler.channel.close()
    finally:
        proc.terminate()
        proc.wait(10)


def peer_config(scheduler: SchedulerProcess) -> dict[str, object]:
    return {
        "scheduler": {"addrs": [scheduler.address], "announceInterval": "2s"},
        "download": {"pieceTimeout": "10s", "concurrentPieceCount": 4},
    }


@contextmanager
def cluster(tmp_path: Path, peers: int) -> Iterator[tuple[SchedulerProcess, list[DaemonProcess]]]:
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        daemons = [
            stack.enter_context(running_daemon(tmp_path / f"peer{i}", peer_config(scheduler))) for i in range(peers)
        ]
        wait_for_hosts(scheduler, peers)
        yield scheduler, daemons


def wait_for_hosts(scheduler: SchedulerProcess, count: int) -> None:
    """Until ``count`` hosts announced themselves, asking every 50 ms."""
    deadline = time.monotonic() + 20
    stub = scheduler.stub()
    while time.monotonic() < deadline:
        hosts = stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts
        if len(hosts) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"only {len(hosts)} of {count} hosts announced themselves")


@asynccontextmanager
async def serving(app: web.Application, *, shutdown_timeout: float = 60.0) -> AsyncIterator[int]:
    """``app`` on an ephemeral loopback port (yielded) until the block ends; handlers still running then get
    ``shutdown_timeout`` seconds."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
