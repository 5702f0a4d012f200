"""This machine's figures as a scheduler weighs them: CPU, memory, the storage filesystem, the network, the build.

The Go scheduler scores a parent mostly by the transmit bandwidth it reports (``max_tx_bandwidth`` minus
``tx_bandwidth``); a host reporting none is chosen last. Every figure here comes from the running machine through
``psutil``; sampling reads ``/proc`` and ``/sys``, so callers on the event loop run ``HostProbe.sample`` in a thread.
Rates are measured between two samples; the first sample reports zero.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import ipaddress
import os
import platform
import time
from dataclasses import dataclass

import psutil

# ``common.v2.Host.type`` as upstream numbers its host types: 0 a normal peer, 1 a super seed peer.
HOST_TYPES = {"normal": 0, "super": 1}

# Upstream's default upload.bandwidthLimit (50 GB/s): the cap when none is configured.
DEFAULT_UPLOAD_LIMIT = 50 * 1000**3
# The CPU time fields common.v2.CPUTimes carries, in its order.
CPU_TIME_FIELDS = ("user", "system", "idle", "nice", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")


def host_type(seed_peer: bool, seed_peer_type: str) -> int:
    """The type a daemon announces: its ``seedPeer.type`` when ``seedPeer.enable``, else normal (as upstream)."""
    return HOST_TYPES[seed_peer_type] if seed_peer else HOST_TYPES["normal"]


@dataclass(frozen=True)
class SystemInfo:
    os: str
    platform: str
    platform_family: str
    platform_version: str
    kernel_version: str
    build_version: str
    build_platform: str


@dataclass(frozen=True)
class CPUFigures:
    logical_count: int
    physical_count: int
    percent: float
    process_percent: float
    times: dict[str, float]


@dataclass(frozen=True)
class MemoryFigures:
    total: int
    available: int
    used: int
    used_percent: float
    process_used_percent: float
    free: int


@dataclass(frozen=True)
class NetworkFigures:
    """Bandwidths in bits per second, as upstream reports them."""

    tcp_connection_count: int
    upload_tcp_connection_count: int
    max_rx_bandwidth: int
    max_tx_bandwidth: int
    rx_bandwidth: int
    tx_bandwidth: int


@dataclass(frozen=True)
class DiskFigures:
    """The filesystem holding the cache; read/write bandwidths are this process's bytes per second."""

    total: int
    free: int
    used: int
    used_percent: float
    inodes_total: int
    inodes_used: int
    inodes_free: int
    inodes_used_percent: float
    read_bandwidth: int
    write_bandwidth: int


@dataclass(frozen=True)
class HostFigures:
    system: SystemInfo
    cpu: CPUFigures
    memory: MemoryFigures
    network: NetworkFigures
    disk: DiskFigures


@functools.cache
def system_info() -> SystemInfo:
    """What does not change while the daemon runs: the OS, its distribution and this build (read once)."""
    release: dict[str, str] = {}
    with contextlib.suppress(OSError):
        release = platform.freedesktop_os_release()
    try:
        version = importlib.metadata.version("dfdaemon-py")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    system = platform.system().lower()
    return SystemInfo(
        os=system,
        platform=release.get("ID", system),
        platform_family=release.get("ID_LIKE", release.get("ID", system)).split()[0],
        platform_version=release.get("VERSION_ID", ""),
        kernel_version=platform.release(),
        build_version=version,
        build_platform=f"{platform.machine()}-{system}",
    )


def interface_of(ip: str) -> str | None:
    """The network interface carrying ``ip``; None when no interface has it (an address behind NAT, say)."""
    try:
        wanted = ipaddress.ip_address(ip)
    except ValueError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(address.address.split("%")[0]) == wanted:
                    return name
    return None


def max_bandwidth(interface: str | None, limit: int) -> int:
    """Bits per second: the interface's link speed capped by the upload limit (bytes/s); the limit alone when the
    link speed is unknown (loopback and many virtual interfaces report none)."""
    cap = limit * 8
    if interface is None:
        return cap
    stats = psutil.net_if_stats().get(interface)
    if stats is None or stats.speed <= 0:
        return cap
    return min(stats.speed * 1_000_000, cap)


@dataclass
class _Counters:
    at: float
    rx: int
    tx: int
    read: int
    write: int


class HostProbe:
    """Samples the machine; keeps the previous counters so that each sample reports rates since the last one."""

    def __init__(self, ip: str, storage_dir: str, upload_port: int, upload_limit: int | None = None) -> None:
        self.storage_dir = storage_dir
        self.upload_port = upload_port
        self.interface = interface_of(ip)
        self.max_bandwidth = max_bandwidth(self.interface, upload_limit or DEFAULT_UPLOAD_LIMIT)
        self.system = system_info()
        self._process = psutil.Process()
        self._previous: _Counters | None = None

    def sample(self) -> HostFigures:
        """Blocking (reads /proc and /sys): run it in a thread."""
        counters = self._counters()
        previous = self._previous or counters
        self._previous = counters
        elapsed = counters.at - previous.at

        def rate(delta: int) -> int:
            return round(max(delta, 0) / elapsed) if elapsed > 0 else 0

        network = self._network(rate(counters.rx - previous.rx) * 8, rate(counters.tx - previous.tx) * 8)
        disk = self._disk(rate(counters.read - previous.read), rate(counters.write - previous.write))
        return HostFigures(self.system, self._cpu(), self._memory(), network, disk)

    def _counters(self) -> _Counters:
        nics = psutil.net_io_counters(pernic=True)
        nic = nics.get(self.interface) if self.interface is not None else None
        rx, tx = (nic.bytes_recv, nic.bytes_sent) if nic is not None else (0, 0)
        try:
            io = self._process.io_counters()
            read, write = io.read_bytes, io.write_bytes
        except (psutil.Error, AttributeError):  # not every platform has per-process I/O counters
            read, write = 0, 0
        return _Counters(time.monotonic(), rx, tx, read, write)

    def _cpu(self) -> CPUFigures:
        times = psutil.cpu_times()
        return CPUFigures(
            logical_count=psutil.cpu_count(logical=True) or 0,
            physical_count=psutil.cpu_count(logical=False) or 0,
            percent=psutil.cpu_percent(interval=None),
            process_percent=self._process.cpu_percent(interval=None),
            times={name: float(getattr(times, name, 0.0)) for name in CPU_TIME_FIELDS},
        )

    def _memory(self) -> MemoryFigures:
        memory = psutil.virtual_memory()
        return MemoryFigures(
            total=memory.total,
            available=memory.available,
            used=memory.used,
            used_percent=memory.percent,
            process_used_percent=self._process.memory_percent(),
            free=memory.free,
        )

    def _network(self, rx_bandwidth: int, tx_bandwidth: int) -> NetworkFigures:
        try:
            connections = psutil.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            connections = []
        established = [c for c in connections if c.status == psutil.CONN_ESTABLISHED]
        return NetworkFigures(
            tcp_connection_count=len(established),
            upload_tcp_connection_count=sum(1 for c in established if c.laddr and c.laddr.port == self.upload_port),
            max_rx_bandwidth=self.max_bandwidth,
            max_tx_bandwidth=self.max_bandwidth,
            rx_bandwidth=rx_bandwidth,
            tx_bandwidth=tx_bandwidth,
        )

    def _disk(self, read_bandwidth: int, write_bandwidth: int) -> DiskFigures:
        usage = psutil.disk_usage(self.storage_dir)
        stat = os.statvfs(self.storage_dir)
        inodes_used = stat.f_files - stat.f_ffree
        return DiskFigures(
            total=usage.total,
            free=usage.free,
            used=usage.used,
            used_percent=usage.percent,
            inodes_total=stat.f_files,
            inodes_used=inodes_used,
            inodes_free=stat.f_ffree,
            inodes_used_percent=100.0 * inodes_used / stat.f_files if stat.f_files else 0.0,
            read_bandwidth=read_bandwidth,
            write_bandwidth=write_bandwidth,
        )
