"""A real containerd for tests, driven with ``ctr``.

``running_containerd`` starts ``containerd --config FILE`` as its own process, with its root (content store and
snapshots) under the caller's work directory and its state and sockets under a short temporary directory (unix socket
paths are limited to about 107 bytes). The CRI plugin is off, the debug and metrics listeners are off, so it opens no
TCP port. ``Containerd`` pulls, creates and runs containers with ``ctr``; registry mirrors are written to a hosts
directory (``<hosts_dir>/<registry host>/hosts.toml``) that every pull reads.

``ctr run`` needs runc and working cgroups; when a task cannot start here, ``Containerd.run`` creates the container
record only and says so (its ``task_skip_reason``), since a record alone is what the runtime sync keys on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import SYSTEM_BIN_DIRS, find_binary, stop_process, tail

CONTAINERD_BINARY = "containerd"
CTR_BINARY = "ctr"
RUNC_BINARY = "runc"
SNAPSHOTTER = "native"

# Debian installs runc in sbin, which a non-root PATH may lack.
# Unix socket paths (sun_path) hold 108 bytes with the terminating NUL; containerd also makes "<grpc>.ttrpc".
_MAX_SOCKET_PATH = 100
# Variables ctr and containerd would read instead of our flags.
_ENV_OVERRIDES = ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER")


class ContainerdSupportError(RuntimeError):
    """containerd or ctr did not do what a test asked."""


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _ENV_OVERRIDES}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SYSTEM_BIN_DIRS])  # containerd looks up the shim and runc
    return env


_LOG_LEVEL = re.compile(r"level=(fatal|error|panic)\b")
_LOG_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"(?:.*?error="((?:[^"\\]|\\.)*)")?')


def error_line(log_text: str) -> str:
    """containerd's last fatal or error log line (its msg and error), or its last line, or "(no output)"."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _LOG_LEVEL.search(line):
            match = _LOG_MSG.search(line)
            if match is None:
                return line.strip()
            return ": ".join(part for part in match.groups() if part)
    return lines[-1].strip() if lines else "(no output)"


@functools.cache
def containerd_skip_reason() -> str | None:
    """Why a real containerd cannot run here (missing binaries, not root, or it fails to start), or None."""
    for name in (CONTAINERD_BINARY, CTR_BINARY):
        if find_binary(name) is None:
            return f"{name} not installed (Debian package containerd)"
    if os.geteuid() != 0:
        return "containerd needs root (tests run with euid != 0)"
    workdir = Path(tempfile.mkdtemp(prefix="ctd-probe-"))
    try:
        with running_containerd(workdir, timeout=20.0):
            return None
    except ContainerdSupportError as exc:
        return f"containerd cannot start here: {exc}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hosts_toml(registry_host: str, mirror: str) -> str:
    """A containerd hosts.toml sending pulls of ``registry_host`` to ``mirror`` first, then to the registry (http)."""
    return (
        f"server = {_toml_string('http://' + registry_host)}\n"
        "\n"
        f"[host.{_toml_string(mirror.rstrip('/'))}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )


def _config_toml(root: Path, state: Path, address: str, opt: Path) -> str:
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml_string(str(root))}",
            f"state = {_toml_string(str(state))}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "",
            "[grpc]",
            f"  address = {_toml_string(address)}",
            '  tcp_address = ""',
            "",
            "[ttrpc]",
            f"  address = {_toml_string(address + '.ttrpc')}",
            "",
            "[debug]",
            '  address = ""',
            '  level = "info"',
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_string(str(opt))}",
            "",
        ]
    )


@dataclass
class Containerd:
    """A running containerd; see ``running_containerd``."""

    address: str
    hosts_dir: Path
    root: Path
    state: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    ctr_binary: str
    task_skip_reason: str | None = None
    _mirrors: dict[str, str] = field(default_factory=dict)

    # -- ctr

    def ctr(
        self, *args: str, namespace: str = "default", timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address ADDRESS -n NAMESPACE ARGS...``; raises with ctr's stderr when it fails (and check)."""
        command = [self.ctr_binary, "--address", self.address, "--namespace", namespace, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
        if check and result.returncode != 0:
            stderr = " ".join(result.stderr.split()) or "(no stderr)"
            raise ContainerdSupportError(f"ctr {' '.join(args)} (namespace {namespace}) failed: {stderr}")
        return result

    # -- registries

    def set_mirror(self, registry_host: str, mirror: str | None) -> None:
        """Send later pulls of ``registry_host`` to ``mirror`` first (None: straight to the registry, plain http)."""
        directory = self.hosts_dir / registry_host
        if mirror is None:
            shutil.rmtree(directory, ignore_errors=True)
            self._mirrors.pop(registry_host, None)
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(hosts_toml(registry_host, mirror))
        self._mirrors[registry_host] = mirror

    @property
    def mirrors(self) -> dict[str, str]:
        return dict(self._mirrors)

    def pull(self, ref: str, namespace: str = "default", *, timeout: float = 120.0) -> None:
        """Pull and unpack ``ref`` (a full reference, e.g. ``127.0.0.1:5000/repo:tag``) through the hosts directory.

        A registry with a mirror (``set_mirror``) is asked through the mirror first; any other registry is asked
        directly over plain http. ctr itself fetches, with the same resolver containerd's CRI plugin uses.
        """
        self.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(self.hosts_dir),
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            ref,
            namespace=namespace,
            timeout=timeout,
        )

    def remove_image(self, ref: str, namespace: str = "default") -> None:
        self.ctr("images", "rm", "--sync", ref, namespace=namespace)

    # -- containers

    def create(self, ref: str, container_id: str, namespace: str = "default") -> None:
        """A container record (and its snapshot) for the pulled image ``ref``; no task."""
        self.ctr("containers", "create", "--snapshotter", SNAPSHOTTER, ref, container_id, namespace=namespace)

    def run(self, ref: str, container_id: str, namespace: str = "default") -> bool:
        """A container with a running task (the image's command, detached); True when the task runs.

        When no task can start here, the container record is created without one, ``task_skip_reason`` says why, and
        this returns False.
        """
        if self.task_skip_reason is None:
            result = self.ctr(
                "run",
                "--detach",
                "--null-io",
                "--snapshotter",
                SNAPSHOTTER,
                # runc's state and the IO fifos default to host-wide directories that other containerds share.
                "--runc-root",
                str(self.runc_root),
                "--fifo-dir",
                str(self.fifo_dir),
                ref,
                container_id,
                namespace=namespace,
                check=False,
            )
            if result.returncode == 0:
                return True
            self.task_skip_reason = " ".join(result.stderr.split()) or f"ctr run exited with {result.returncode}"
            with contextlib.suppress(ContainerdSupportError):
                self.stop_and_remove(container_id, namespace)
        self.create(ref, container_id, namespace)
        return False

    def stop_and_remove(self, container_id: str, namespace: str = "default") -> None:
        """Kill and delete the container's task, if any, then delete the container record and its snapshot."""
        tasks = self.ctr("tasks", "ls", "--quiet", namespace=namespace).stdout.split()
        if container_id in tasks:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", container_id, namespace=namespace, check=False)
            self.ctr("tasks", "delete", "--force", container_id, namespace=namespace)
        self.ctr("containers", "delete", container_id, namespace=namespace)

    def namespaces(self) -> list[str]:
        return self.ctr("namespaces", "ls", "--quiet").stdout.split()

    @property
    def runc_root(self) -> Path:
        return self.state / "runc"

    @property
    def fifo_dir(self) -> Path:
        return self.state / "fifo"

    # -- lifecycle

    def _remove_everything_running(self) -> None:
        """Best effort: kill and delete every task, so that no shim or container process outlives the test.

        A containerd the test stopped itself cannot be asked (ctr would wait for it); its shims are killed later.
        """
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ContainerdSupportError, subprocess.TimeoutExpired):
            for namespace in self.namespaces():
                for task in self.ctr("tasks", "ls", "--quiet", namespace=namespace, timeout=10).stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=namespace, timeout=10, check=False)
                    self.ctr("tasks", "delete", "--force", task, namespace=namespace, timeout=10, check=False)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop containerd (SIGTERM, then SIGKILL); returns its exit status."""
        return stop_process(self.process, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# Leftover processes and mounts


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (ppid, argv) of every process we can see."""
    found: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may hold spaces; the parent pid follows it.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        found[int(entry.name)] = (ppid, [arg.decode(errors="replace") for arg in argv if arg])
    return found


def leftover_shims(address: str) -> list[int]:
    """Pids of containerd shims started for the containerd at ``address``."""
    shims = []
    for pid, (_, argv) in _processes().items():
        if argv and "containerd-shim" in Path(argv[0]).name and address in argv:
            shims.append(pid)
    return shims


def _descendants(roots: list[int]) -> list[int]:
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    pending = list(roots)
    while pending:
        pid = pending.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.append(child)
                pending.append(child)
    return found


def _kill_leftovers(address: str, state: Path) -> None:
    shims = leftover_shims(address)
    # Containers' processes are the shims' children (a shim is their subreaper); kill them first.
    for pid in [*_descendants(shims), *shims]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    # A killed shim leaves its socket in a host-wide directory; each task's bundle names it.
    for record in state.glob("io.containerd.runtime.v2.task/*/*/address"):
        with contextlib.suppress(OSError):
            socket_path = Path(record.read_text().strip().removeprefix("unix://"))
            if socket_path.is_socket():
                socket_path.unlink()


def _unmount_under(*directories: Path) -> None:
    """Lazily unmount whatever containerd left mounted below ``directories`` (rootfs bind mounts of dead tasks)."""
    prefixes = [str(directory.resolve()) + os.sep for directory in directories]
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            if any(point.startswith(prefix) for prefix in prefixes):
                points.append(point)
    umount = find_binary("umount")
    for point in sorted(points, key=len, reverse=True):
        if umount is not None:
            subprocess.run([umount, "-l", point], capture_output=True, timeout=10, check=False)


# ---------------------------------------------------------------------------------------------------------------------
# Starting containerd


def _wait_ready(containerd: Containerd, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if containerd.process.poll() is not None:
            raise ContainerdSupportError(
                f"{error_line(containerd.log_path.read_text(errors='replace'))} "
                f"(containerd exited with {containerd.process.returncode})"
            )
        if Path(containerd.address).exists():
            result = containerd.ctr("version", timeout=10, check=False)
            if result.returncode == 0:
                return
            last = " ".join(result.stderr.split())
        time.sleep(0.05)
    raise ContainerdSupportError(
        f"containerd did not answer within {timeout:g}s: {last or error_line(tail(containerd.log_path))}"
    )


@contextlib.contextmanager
def running_containerd(
    workdir: Path, *, mirrors: dict[str, str] | None = None, timeout: float = 30.0
) -> Iterator[Containerd]:
    """Run a containerd with its root, config, log and hosts directory under ``workdir``.

    ``mirrors`` maps a registry host (``127.0.0.1:5000``) to a mirror URL (``http://127.0.0.1:4001``) that pulls of
    that registry go to first (see ``Containerd.set_mirror``). On exit every task is killed, containerd is stopped, and
    leftover shims and container processes are killed.
    """
    binary = find_binary(CONTAINERD_BINARY)
    ctr_binary = find_binary(CTR_BINARY)
    if binary is None or ctr_binary is None:
        raise ContainerdSupportError("containerd or ctr is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    root, opt, hosts_dir = workdir / "containerd-root", workdir / "containerd-opt", workdir / "containerd-hosts"
    for directory in (root, opt, hosts_dir):
        directory.mkdir(exist_ok=True)
    log_path = workdir / "containerd.log"
    short = Path(tempfile.mkdtemp(prefix="ctd-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, short, ignore_errors=True)
        state, address = short / "state", str(short / "c.sock")
        if len(address) + len(".ttrpc") > _MAX_SOCKET_PATH:
            raise ContainerdSupportError(f"the temporary directory's path is too long for a unix socket: {address}")
        config_path = workdir / "containerd.toml"
        config_path.write_text(_config_toml(root, state, address, opt))
        log_file = stack.enter_context(log_path.open("wb"))
        process = subprocess.Popen(
            [binary, "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=_env(),
            start_new_session=True,
        )
        containerd = Containerd(
            address=address,
            hosts_dir=hosts_dir,
            root=root,
            state=state,
            log_path=log_path,
            process=process,
            ctr_binary=ctr_binary,
        )
        # Run last to first: unmount and remove files only once nothing is left running.
        stack.callback(_unmount_under, state, root)
        stack.callback(_kill_leftovers, address, state)
        stack.callback(containerd.stop)
        _wait_ready(containerd, timeout)
        stack.callback(containerd._remove_everything_running)
        for registry_host, mirror in (mirrors or {}).items():
            containerd.set_mirror(registry_host, mirror)
        yield containerd
