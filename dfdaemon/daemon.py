"""The daemon's lifetime: start its two gRPC servers, report where they listen, drain and clean up on stop."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from dfdaemon.admission import Admission
from dfdaemon.backend import Backend, SourcePolicy
from dfdaemon.config import Config, ConfigError, check_storage_dir
from dfdaemon.download import DownloadManager
from dfdaemon.download.scheduled import ScheduledFetch
from dfdaemon.gc import GarbageCollector, GCPolicy, publish_usage
from dfdaemon.rpc import download, ext, upload
from dfdaemon.rpc.peer_client import GrpcParentClient
from dfdaemon.rpc.scheduler_client import HostInfo, SchedulerClient
from dfdaemon.rpc.servers import HealthReporter, add_service, new_server
from dfdaemon.rpc.tls import TLSError, server_credentials
from dfdaemon.runtime.containerd import ContainerdClient
from dfdaemon.runtime.sync import CONTAINER_HOLDER, PINNED_HOLDER, RuntimeSync
from dfdaemon.storage import Storage
from dfdaemon.storage.metadata import SchemaTooNew
from dfdaemon.telemetry.metrics import MetricsServer
from dfdaemon.vortex.server import VortexServer
from dfdaemon.vortex.tls import server_context

if TYPE_CHECKING:
    from dfdaemon.proxy import MirrorServer

log = logging.getLogger("dfdaemon")


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


class Daemon:
    """One peer daemon: the TCP upload server and the unix-socket download server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._upload_server: grpc.aio.Server | None = None
        self._download_server: grpc.aio.Server | None = None
        self._health: list[HealthReporter] = []
        self.endpoints: Endpoints | None = None
        self.storage = Storage(config.storage_dir, keep=config.storage.keep)
        self.gc = GarbageCollector(self.storage, gc_policy(config))
        back_to_source = config.download.back_to_source
        source_policy = SourcePolicy(
            allowed_schemes=tuple(back_to_source.allowed_schemes),
            allowed_hosts=tuple(back_to_source.allowed_hosts),
            allowed_networks=tuple(back_to_source.allowed_networks),
        )
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
        )
        self.scheduler: SchedulerClient | None = None
        self.membership = download.Membership()
        self.metrics_server: MetricsServer | None = None
        self.vortex: VortexServer | None = None
        self._gauges: asyncio.Task[None] | None = None
        try:
            self.parents = GrpcParentClient(
                self.downloads.host_id,
                config.upload.client,
                use_vortex=config.download.protocol == "tcp",
                piece_timeout=config.download.piece_timeout,
            )
        except TLSError as exc:
            raise StartupError(f"upload.client: {exc}") from None
        self._storage_open = False
        self.mirror: MirrorServer | None = None
        self.runtime_sync: RuntimeSync | None = None

    async def start(self) -> Endpoints:
        try:
            check_storage_dir(self.config)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        socket_path = self.config.socket_path
        _prepare_socket_path(socket_path)
        try:
            await self.storage.open()
        except (sqlite3.DatabaseError, SchemaTooNew) as exc:
            raise StartupError(f"storage.dir: cannot open the metadata store: {exc}") from None
        self._storage_open = True
        await self._start_runtime_sync()
        self.gc.start()
        if self.config.metrics.enable:
            metrics_cfg = self.config.metrics.server
            try:
                self.metrics_server = MetricsServer(metrics_cfg.ip, metrics_cfg.port)
            except OSError as exc:
                raise StartupError(
                    f"metrics.server: cannot listen on {metrics_cfg.ip}:{metrics_cfg.port}: {exc.strerror}"
                ) from None
            self._gauges = asyncio.create_task(self._refresh_gauges(), name="metrics-gauges")
        vortex_port = await self._start_vortex()
        upload_server, upload_health, port = self._upload_server_bound(vortex_port)
        download_server, download_health = self._download_server_bound(socket_path)
        await upload_server.start()
        await download_server.start()
        self._upload_server, self._download_server = upload_server, download_server
        self._health = [upload_health, download_health]
        for reporter in self._health:
            await reporter.set_serving(True)

        await asyncio.to_thread(self._secure_socket, socket_path)
        await self._start_mirror()
        server_cfg = self.config.upload.server
        address = server_cfg.ip if ":" not in server_cfg.ip else f"[{server_cfg.ip}]"
        self.endpoints = Endpoints(upload_address=f"{address}:{port}", upload_port=port, socket_path=socket_path)
        host = HostInfo(host_id=self.downloads.host_id, ip=self.host_ip, hostname=self.hostname, port=port)
        self.membership.host = host
        if self.config.scheduler.addrs:
            self._join_scheduler(host)
        log.info("upload server listening on %s", self.endpoints.upload_address)
        log.info("download server listening on unix:%s", socket_path)
        return self.endpoints

    async def _start_mirror(self) -> None:
        """The registry mirror (``proxy``): blobs through the P2P network, the rest straight to the registry."""
        config = self.config.proxy
        if not config.enable:
            return
        # Imported here: aiohttp costs a quarter of a second of start-up, which a daemon without the mirror skips.
        from dfdaemon.proxy import MirrorServer, RegistryMirror

        mirror = RegistryMirror(
            self.storage,
            self.downloads,
            self.downloads.source_policy,
            default_registry=config.registry_mirror.addr,
            insecure_registries=frozenset(config.registry_mirror.insecure_registries),
            blobs_by_digest=config.registry_mirror.enable_task_id_based_blob_digest,
            disable_back_to_source=config.disable_back_to_source,
        )
        self.mirror = MirrorServer(mirror)
        try:
            port = await self.mirror.start(config.server.ip, config.server.port)
        except OSError as exc:
            await mirror.close()
            self.mirror = None
            raise StartupError(
                f"proxy.server: cannot listen on {config.server.ip}:{config.server.port}: {exc.strerror or exc}"
            ) from None
        log.info("proxy server listening on %s:%d", config.server.ip, port)

    async def _start_runtime_sync(self) -> None:
        """Hold what containerd's containers use; the first pass runs before GC may run at all."""
        config = self.config.runtime
        if not config.containerd.address:
            return
        self.runtime_sync = RuntimeSync(
            self.storage,
            ContainerdClient(config.containerd.address),
            interval=config.sync_interval,
            pinned_images=config.pinned_images,
        )
        report = await self.runtime_sync.sync_logged()
        if report is not None:
            log.info("runtime sync: %d holders from containerd at %s", len(report.held), config.containerd.address)
        self.runtime_sync.start()

    async def _start_vortex(self) -> int:
        """The vortex TCP piece server, with upload.server's mutual TLS when that has certificates."""
        server_cfg, upload_cfg = self.config.storage.server, self.config.upload.server
        ip = server_cfg.ip or upload_cfg.ip
        try:
            context = server_context(upload_cfg.tls) if upload_cfg.tls.enabled else None
        except TLSError as exc:
            raise StartupError(f"upload.server: {exc}") from None
        self.vortex = VortexServer(self.storage, self.config.download.piece_timeout, context)
        try:
            port = await self.vortex.start(ip, server_cfg.tcp_port)
        except OSError as exc:
            self.vortex = None
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio rewords the bind error
            raise StartupError(f"storage.server: cannot listen on {ip}:{server_cfg.tcp_port}: {reason}") from None
        log.info("vortex server listening on %s:%d", f"[{ip}]" if ":" in ip else ip, port)
        return port

    def _upload_server_bound(self, vortex_port: int) -> tuple[grpc.aio.Server, HealthReporter, int]:
        """The TCP server other peers call: plaintext, or mutual TLS when upload.server has certificates."""
        server_cfg = self.config.upload.server
        servicer = upload.UploadServicer(
            self.storage,
            self.downloads,
            self.membership,
            self.host_ip,
            self.config.download.piece_timeout,
            Admission("DownloadPiece", self.config.upload.concurrent_piece_count, server_cfg.max_concurrent_requests),
            enable_delete_task=server_cfg.enable_delete_task,
            sync_host_interval=self.config.scheduler.announce_interval,
            tcp_port=vortex_port,
        )
        server, health = new_server([upload.SERVICE.full_name], lambda s: add_service(s, upload.SERVICE, servicer))
        credentials = None
        if server_cfg.tls.enabled:
            try:
                credentials = server_credentials(server_cfg.tls)
            except TLSError as exc:
                raise StartupError(f"upload.server: {exc}") from None
        wanted = f"{server_cfg.ip}:{server_cfg.port}"
        port = _bind(server, wanted, credentials)
        if port == 0:
            raise StartupError(f"upload.server: cannot listen on {wanted} (address in use or not available)")
        return server, health, port

    def _download_server_bound(self, socket_path: Path) -> tuple[grpc.aio.Server, HealthReporter]:
        """The unix-socket server for local clients: downloads, tasks, holds, usage and GC."""

        def register(server: grpc.aio.Server) -> None:
            add_service(
                server, download.SERVICE, download.DownloadServicer(self.storage, self.downloads, self.membership)
            )
            reserved = (CONTAINER_HOLDER, PINNED_HOLDER) if self.config.runtime.containerd.address else ()
            add_service(server, ext.USE_SERVICE, ext.UseServicer(self.storage, reserved))
            add_service(server, ext.CACHE_SERVICE, ext.CacheServicer(self.storage, self.gc))

        server, health = new_server(
            [download.SERVICE.full_name, ext.USE_SERVICE.full_name, ext.CACHE_SERVICE.full_name], register
        )
        if _bind(server, f"unix:{socket_path}") == 0:
            raise StartupError(f"download.server.socketPath: cannot listen on {str(socket_path)!r}")
        return server, health

    def _secure_socket(self, socket_path: Path) -> None:
        """Give the socket its mode and group: only root and that group may ask this daemon for anything."""
        server_cfg = self.config.download.server
        os.chmod(socket_path, server_cfg.socket_mode)
        if server_cfg.socket_group:
            group = server_cfg.socket_group
            try:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            except KeyError:
                raise StartupError(f"download.server.socketGroup: no group named {group!r}") from None
            os.chown(socket_path, -1, gid)

    async def _refresh_gauges(self, every: float = 5.0) -> None:
        """Keep the cache gauges current between scrapes (GC runs refresh them too)."""
        while True:
            try:
                publish_usage(await self.gc.usage())
            except Exception:
                log.exception("refreshing the cache gauges failed")
            await asyncio.sleep(every)

    def _join_scheduler(self, host: HostInfo) -> None:
        """Announce this host and route downloads through the scheduler; deletions are reported to it."""
        config = self.config.scheduler
        self.scheduler = SchedulerClient(
            config.addrs,
            host,
            announce_interval=config.announce_interval,
            timeout=config.schedule_timeout,
            credentials=self.parents.credentials,  # upload.client's mutual TLS serves the scheduler too
        )
        self.downloads.fetch_missing = ScheduledFetch(
            self.downloads, self.scheduler, self.parents, self.config.download.piece_timeout
        )
        self.storage.add_deletion_listener(self.scheduler.delete_task)
        self.scheduler.start()
        self.membership.scheduler = self.scheduler
        log.info("scheduling through %s", ", ".join(config.addrs))

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within ``grace`` seconds, remove the socket."""
        for reporter in self._health:
            await reporter.set_serving(False)
        for server in (self._download_server, self._upload_server):
            if server is not None:
                await server.stop(grace)
        self._download_server = self._upload_server = None
        if self.vortex is not None:
            await self.vortex.stop()
            self.vortex = None
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
            self._gauges = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.mirror is not None:
            await self.mirror.stop()
            self.mirror = None
        if self.runtime_sync is not None:
            await self.runtime_sync.stop()
            await self.runtime_sync.runtime.close()
            self.runtime_sync = None
        await self.downloads.close()
        await self.backend.close()
        await self.parents.close()
        if self.scheduler is not None:
            self.membership.scheduler = None
            await self.scheduler.delete_host()
            await self.scheduler.close()
            self.scheduler = None
        await self.gc.stop()
        if self._storage_open:
            await self.storage.close()
            self._storage_open = False
        if self.endpoints is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoints.socket_path)
            self.endpoints = None
            log.info("stopped")


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


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind and return the port (0 when binding failed); grpc raises on some failures and returns 0 on others."""
    try:
        if credentials is not None:
            return int(server.add_secure_port(address, credentials))
        return int(server.add_insecure_port(address))
    except RuntimeError:
        return 0
