"""The daemon's lifetime: build its parts, start them in order, report where they listen, stop them in order."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from dfdaemon.admission import Admission
from dfdaemon.backend import Backend, SourcePolicy
from dfdaemon.cluster.host import HostProbe, host_type, system_info
from dfdaemon.cluster.manager import DiscoveryError, PeerIdentity, SchedulerDiscovery
from dfdaemon.config import (
    BackToSourceConfig,
    Config,
    ConfigError,
    DownloadServerConfig,
    MetricsServerConfig,
    ProxyConfig,
    RuntimeConfig,
    check_storage_dir,
)
from dfdaemon.download import DownloadManager
from dfdaemon.download.scheduled import ScheduledFetch
from dfdaemon.gc import GarbageCollector, GCPolicy, publish_usage
from dfdaemon.proxy import MirrorServer, RegistryMirror
from dfdaemon.proxy.forward import forward_proxy
from dfdaemon.ratelimit import Bandwidth, TokenBucket
from dfdaemon.rpc import download, ext, upload
from dfdaemon.rpc.peer_client import GrpcParentClient
from dfdaemon.rpc.scheduler_client import HostInfo, SchedulerClient
from dfdaemon.rpc.servers import BoundServer, add_service, bind, new_server
from dfdaemon.rpc.tls import TLSError, server_credentials
from dfdaemon.runtime.containerd import ContainerdClient
from dfdaemon.runtime.sync import CONTAINER_HOLDER, PINNED_HOLDER, RuntimeSync
from dfdaemon.storage import Storage
from dfdaemon.storage.metadata import SchemaTooNew
from dfdaemon.telemetry.metrics import MetricsServer
from dfdaemon.vortex.server import VortexServer
from dfdaemon.vortex.tls import server_context

log = logging.getLogger("dfdaemon")
# Threads of the loop's default pool for file work alone; each piece a download may have in flight adds more.
_IO_THREADS = 16


class StartupError(Exception):
    """The daemon cannot start; the message is meant for the user as one line."""


@dataclass(frozen=True)
class Endpoints:
    """Where a started daemon listens."""

    upload_address: str
    upload_port: int
    socket_path: Path


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _prepare_socket_path(path: Path) -> None:
    """Create the socket's directory and clear a stale socket file left by a crashed daemon."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"download.server.socketPath: cannot create {str(path.parent)!r}: {exc.strerror}") from None
    if path.exists() or path.is_symlink():
        if _socket_in_use(path):
            raise StartupError(f"download.server.socketPath: {str(path)!r} is in use by another process")
        if not path.is_socket():
            raise StartupError(f"download.server.socketPath: {str(path)!r} exists and is not a socket")
        path.unlink()


def _check_paths(config: Config) -> None:
    """Refuse an unusable storage directory or socket path before anything is created."""
    try:
        check_storage_dir(config)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    _prepare_socket_path(config.socket_path)


class Daemon:
    """One peer daemon: builds its parts, then starts and stops them in order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.endpoints: Endpoints | None = None
        self.storage = Storage(config.storage_dir, keep=config.storage.keep)
        self.gc = GarbageCollector(self.storage, gc_policy(config))
        source_policy = _source_policy(config.download.back_to_source)
        self.backend = Backend(timeout=config.download.piece_timeout, policy=source_policy)
        self.host_ip, self.hostname = config.host_ip(), config.hostname()
        self.downloads = DownloadManager(
            self.storage,
            self.gc,
            self.backend,
            host_ip=self.host_ip,
            hostname=self.hostname,
            concurrent_piece_count=config.download.concurrent_piece_count,
            max_concurrent_tasks=config.download.max_concurrent_tasks,
            source_policy=source_policy,
            seed=config.seed_peer.enable,
            bandwidth=bandwidth(config),
        )
        self.membership = download.Membership()
        try:
            self.parents = GrpcParentClient(
                self.downloads.host_id,
                config.upload.client,
                use_vortex=config.download.protocol == "tcp",
                piece_timeout=config.download.piece_timeout,
            )
        except TLSError as exc:
            raise StartupError(f"upload.client: {exc}") from None
        self.scheduler: SchedulerClient | None = None
        self.discovery: SchedulerDiscovery | None = None
        self.metrics: _Metrics | None = None
        self.mirror: MirrorServer | None = None
        self.vortex: VortexServer | None = None
        self.runtime_sync: RuntimeSync | None = None
        self._servers: list[BoundServer] = []
        self._storage_open = False

    async def start(self) -> Endpoints:
        """Storage first, then what guards it (runtime holds, GC), metrics, the servers, the mirror, the scheduler."""
        socket_path = self.config.socket_path
        # File work, and sockets read by the threads that write their bytes, share the loop's default pool. A piece
        # from a parent holds a thread while its bytes arrive (and for a TLS handshake), not while it connects or
        # the parent makes it wait: room for several downloads' pieces in flight besides the file work (threads
        # start only when needed).
        threads = _IO_THREADS + 4 * self.config.download.concurrent_piece_count
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="dfdaemon-io"))
        _check_paths(self.config)
        await self._open_storage()
        self.runtime_sync = await _start_runtime_sync(self.config.runtime, self.storage)
        self.gc.start()
        if self.config.metrics.enable:
            self.metrics = _Metrics(self.config.metrics.server, self.gc)
        self.vortex, vortex_port = await _start_vortex(self.config, self.storage, self.downloads.bandwidth.upload)
        upload_server = _upload_server(
            self.config, self.storage, self.downloads, self.membership, self.host_ip, vortex_port
        )
        download_server = _download_server(self.config, self.storage, self.gc, self.downloads, self.membership)
        self._servers = [upload_server, download_server]
        for server in self._servers:
            await server.start()
        for server in self._servers:
            await server.set_serving(True)
        await asyncio.to_thread(_secure_socket, self.config.download.server, socket_path)
        self.mirror = await _start_mirror(self.config.proxy, self.storage, self.downloads)
        self.endpoints = _endpoints(self.config.upload.server.ip, upload_server.port, socket_path)
        host = _host_info(self.config, self.downloads.host_id, self.host_ip, self.hostname, upload_server.port)
        self.membership.host = host
        await self._find_schedulers(host)
        log.info("upload server listening on %s", self.endpoints.upload_address)
        log.info("download server listening on unix:%s", socket_path)
        return self.endpoints

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within ``grace`` seconds, stop the rest, remove the socket."""
        for server in self._servers:
            await server.set_serving(False)
        for server in reversed(self._servers):
            await server.stop(grace)
        self._servers = []
        if self.vortex is not None:
            await self.vortex.stop()
            self.vortex = None
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        if self.mirror is not None:
            await self.mirror.stop()
            self.mirror = None
        if self.runtime_sync is not None:
            await _stop_runtime_sync(self.runtime_sync)
            self.runtime_sync = None
        await self.downloads.close()
        await self.backend.close()
        await self.parents.close()
        if self.discovery is not None:
            await self.discovery.close()
            self.discovery = None
        await self._leave_scheduler()
        await self.gc.stop()
        if self._storage_open:
            await self.storage.close()
            self._storage_open = False
        if self.endpoints is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoints.socket_path)
            self.endpoints = None
            log.info("stopped")

    async def _open_storage(self) -> None:
        try:
            await self.storage.open()
        except (sqlite3.DatabaseError, SchemaTooNew) as exc:
            raise StartupError(f"storage.dir: cannot open the metadata store: {exc}") from None
        self._storage_open = True

    async def _find_schedulers(self, host: HostInfo) -> None:
        """The manager's schedulers when it answers (kept current from then on), else ``scheduler.addrs`` with a
        warning: upstream refuses to start without its manager, this daemon carries on."""
        addresses = self.config.scheduler.addrs
        if self.config.manager.addr:
            system = await asyncio.to_thread(system_info)  # reads os-release and package metadata once
            self.discovery = SchedulerDiscovery(
                self.config.manager.addr,
                PeerIdentity(
                    hostname=host.hostname,
                    ip=host.ip,
                    idc=host.idc,
                    location=host.location,
                    version=system.build_version,
                    scheduler_cluster_id=host.scheduler_cluster_id,
                    seed=self.config.seed_peer.enable,
                ),
                refresh_interval=self.config.dynconfig.refresh_interval,
                scheduler_credentials=self.parents.credentials,
            )
            try:
                addresses = await self.discovery.discover()
            except DiscoveryError as exc:
                fallback = ", ".join(addresses) or "none, so back to source only"
                log.warning("%s; using scheduler.addrs (%s) until the manager answers", exc, fallback)
            self.discovery.start(lambda found: self._use_schedulers(host, found))
        if addresses:
            await self._use_schedulers(host, addresses)

    async def _use_schedulers(self, host: HostInfo, addresses: list[str]) -> None:
        if self.scheduler is not None:
            await self.scheduler.set_addresses(addresses)
            return
        probe = await asyncio.to_thread(
            HostProbe, host.ip, self.config.storage.dir, host.port, self.config.upload.bandwidth_limit
        )
        self._join_scheduler(host, addresses, probe)

    def _join_scheduler(self, host: HostInfo, addresses: list[str], probe: HostProbe) -> None:
        """Announce this host and route downloads through the scheduler; deletions are reported to it."""
        config = self.config.scheduler
        self.scheduler = SchedulerClient(
            addresses,
            host,
            announce_interval=config.announce_interval,
            credentials=self.parents.credentials,  # upload.client's mutual TLS serves the scheduler too
            probe=probe,
        )
        self.downloads.fetch_missing = ScheduledFetch(
            self.downloads,
            self.scheduler,
            self.parents,
            self.config.download.piece_timeout,
            schedule_timeout=config.schedule_timeout,
            max_schedule_count=config.max_schedule_count,
        )
        self.storage.add_deletion_listener(self.scheduler.delete_task)
        self.scheduler.start()
        self.membership.scheduler = self.scheduler
        log.info("scheduling through %s", ", ".join(addresses))

    async def _leave_scheduler(self) -> None:
        if self.scheduler is None:
            return
        self.membership.scheduler = None
        await self.scheduler.delete_host()
        await self.scheduler.close()
        self.scheduler = None


def _host_info(config: Config, host_id: str, ip: str, hostname: str, port: int) -> HostInfo:
    proxy_port = config.proxy.server.port if config.proxy.enable else 0
    return HostInfo(
        host_id=host_id,
        ip=ip,
        hostname=hostname,
        port=port,
        idc=config.host.idc,
        location=config.host.location,
        scheduler_cluster_id=config.host.scheduler_cluster_id,
        proxy_port=proxy_port,
        type=host_type(config.seed_peer.enable, config.seed_peer.type),
    )


def gc_policy(config: Config) -> GCPolicy:
    policy = config.gc.policy
    return GCPolicy(
        interval=config.gc.interval,
        task_ttl=policy.task_ttl,
        grace_period=policy.grace_period,
        quota_bytes=policy.disk_threshold,
        high_percent=policy.disk_high_threshold_percent,
        low_percent=policy.disk_low_threshold_percent,
        stale_after=config.download.piece_timeout,
    )


def _source_policy(config: BackToSourceConfig) -> SourcePolicy:
    return SourcePolicy(
        allowed_schemes=tuple(config.allowed_schemes),
        allowed_hosts=tuple(config.allowed_hosts),
        allowed_networks=tuple(config.allowed_networks),
    )


def _endpoints(ip: str, port: int, socket_path: Path) -> Endpoints:
    address = ip if ":" not in ip else f"[{ip}]"
    return Endpoints(upload_address=f"{address}:{port}", upload_port=port, socket_path=socket_path)


def bandwidth(config: Config) -> Bandwidth:
    """The limits every transfer of the daemon shares, one bucket per direction."""
    return Bandwidth.of(
        upload=config.upload.bandwidth_limit,
        download=config.download.bandwidth_limit,
        back_to_source=config.download.back_to_source_bandwidth_limit,
        prefetch=config.proxy.prefetch_bandwidth_limit,
    )


async def _start_vortex(config: Config, storage: Storage, limit: TokenBucket | None) -> tuple[VortexServer, int]:
    """The vortex TCP piece server, with upload.server's mutual TLS when that has certificates."""
    server_cfg, upload_cfg = config.storage.server, config.upload.server
    ip = server_cfg.ip or upload_cfg.ip
    try:
        context = server_context(upload_cfg.tls) if upload_cfg.tls.enabled else None
    except TLSError as exc:
        raise StartupError(f"upload.server: {exc}") from None
    server = VortexServer(storage, config.download.piece_timeout, context, limit)
    try:
        port = await server.start(ip, server_cfg.tcp_port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio rewords the bind error
        raise StartupError(f"storage.server: cannot listen on {ip}:{server_cfg.tcp_port}: {reason}") from None
    log.info("vortex server listening on %s:%d", f"[{ip}]" if ":" in ip else ip, port)
    return server, port


def _upload_server(
    config: Config,
    storage: Storage,
    downloads: DownloadManager,
    membership: download.Membership,
    host_ip: str,
    tcp_port: int,
) -> BoundServer:
    """The TCP server other peers call: plaintext, or mutual TLS when upload.server has certificates."""
    server_cfg = config.upload.server
    servicer = upload.UploadServicer(
        storage,
        downloads,
        membership,
        host_ip,
        config.download.piece_timeout,
        Admission("DownloadPiece", config.upload.concurrent_piece_count, server_cfg.max_concurrent_requests),
        enable_delete_task=server_cfg.enable_delete_task,
        sync_host_interval=config.scheduler.announce_interval,
        tcp_port=tcp_port,
        bandwidth=downloads.bandwidth.upload,
    )
    server, health = new_server([upload.SERVICE.full_name], lambda s: add_service(s, upload.SERVICE, servicer))
    credentials = None
    if server_cfg.tls.enabled:
        try:
            credentials = server_credentials(server_cfg.tls)
        except TLSError as exc:
            raise StartupError(f"upload.server: {exc}") from None
    wanted = f"{server_cfg.ip}:{server_cfg.port}"
    port = bind(server, wanted, credentials)
    if port == 0:
        raise StartupError(f"upload.server: cannot listen on {wanted} (address in use or not available)")
    return BoundServer(server, health, port)


def _download_server(
    config: Config, storage: Storage, gc: GarbageCollector, downloads: DownloadManager, membership: download.Membership
) -> BoundServer:
    """The unix-socket server for local clients: downloads, tasks, holds, usage and GC."""
    reserved = (CONTAINER_HOLDER, PINNED_HOLDER) if config.runtime.containerd.address else ()
    servicers = [
        (download.SERVICE, download.DownloadServicer(storage, downloads, membership)),
        (ext.USE_SERVICE, ext.UseServicer(storage, reserved)),
        (ext.CACHE_SERVICE, ext.CacheServicer(storage, gc)),
    ]

    def register(server: grpc.aio.Server) -> None:
        for service, servicer in servicers:
            add_service(server, service, servicer)

    server, health = new_server([service.full_name for service, _ in servicers], register)
    if bind(server, f"unix:{config.socket_path}") == 0:
        raise StartupError(f"download.server.socketPath: cannot listen on {str(config.socket_path)!r}")
    return BoundServer(server, health, 0)


def _secure_socket(config: DownloadServerConfig, socket_path: Path) -> None:
    """Give the socket its mode and group: only root and that group may ask this daemon for anything."""
    os.chmod(socket_path, config.socket_mode)
    if config.socket_group:
        group = config.socket_group
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"download.server.socketGroup: no group named {group!r}") from None
        os.chown(socket_path, -1, gid)


class _Metrics:
    """The ``/metrics`` endpoint, and the cache gauges kept current between scrapes (GC runs refresh them too)."""

    def __init__(self, config: MetricsServerConfig, gc: GarbageCollector, every: float = 5.0) -> None:
        try:
            self.server = MetricsServer(config.ip, config.port)
        except OSError as exc:
            raise StartupError(f"metrics.server: cannot listen on {config.ip}:{config.port}: {exc.strerror}") from None
        self._gauges = asyncio.create_task(self._refresh(gc, every), name="metrics-gauges")

    @staticmethod
    async def _refresh(gc: GarbageCollector, every: float) -> None:
        while True:
            try:
                publish_usage(await gc.usage())
            except Exception:
                log.exception("refreshing the cache gauges failed")
            await asyncio.sleep(every)

    async def close(self) -> None:
        self._gauges.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._gauges
        self.server.close()


async def _start_runtime_sync(config: RuntimeConfig, storage: Storage) -> RuntimeSync | None:
    """Hold what containerd's containers use; the first pass runs before GC may run at all."""
    if not config.containerd.address:
        return None
    runtime_sync = RuntimeSync(
        storage,
        ContainerdClient(config.containerd.address),
        interval=config.sync_interval,
        pinned_images=config.pinned_images,
    )
    report = await runtime_sync.sync_logged()
    if report is not None:
        log.info("runtime sync: %d holders from containerd at %s", len(report.held), config.containerd.address)
    runtime_sync.start()
    return runtime_sync


async def _stop_runtime_sync(runtime_sync: RuntimeSync) -> None:
    await runtime_sync.stop()
    await runtime_sync.runtime.close()


async def _start_mirror(config: ProxyConfig, storage: Storage, downloads: DownloadManager) -> MirrorServer | None:
    """The registry mirror and forward proxy (``proxy``): blobs and rule-matching GETs through the P2P network."""
    if not config.enable:
        return None
    forward = forward_proxy(config, storage, downloads)
    mirror = RegistryMirror(
        storage,
        downloads,
        downloads.source_policy,
        default_registry=config.registry_mirror.addr,
        insecure_registries=frozenset(config.registry_mirror.insecure_registries),
        public_registries=frozenset(config.registry_mirror.public_registries),
        blobs_by_digest=config.registry_mirror.enable_task_id_based_blob_digest,
        disable_back_to_source=config.disable_back_to_source,
        p2p=forward.p2p,
        prefetch=config.prefetch,
    )
    server = MirrorServer(mirror, forward)
    try:
        port = await server.start(config.server.ip, config.server.port)
    except OSError as exc:
        await mirror.close()
        raise StartupError(
            f"proxy.server: cannot listen on {config.server.ip}:{config.server.port}: {exc.strerror or exc}"
        ) from None
    log.info("proxy server listening on %s:%d", config.server.ip, port)
    return server
