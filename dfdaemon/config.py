"""The daemon's configuration: upstream's ``dfdaemon.yaml`` keys (camelCase) plus ours.

Loading validates everything up front and reports the first problem as one line
naming the key, so a typo never turns into a silent default or a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# detect_ip lives with the addresses, where dfget imports it without the configuration models (pydantic).
from dfdaemon.cluster.addresses import detect_ip as detect_ip
from dfdaemon.cluster.addresses import manager_target
from dfdaemon.config_upstream import UnknownKey, ignored_warning, reconcile
from dfdaemon.ids import DEFAULT_FILTERED_QUERY_PARAMS
from dfdaemon.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Port = Annotated[int, Field(ge=0, le=65535)]

DEFAULT_STORAGE_DIR = "/var/lib/dragonfly"
DEFAULT_SOCKET_PATH = "/var/run/dragonfly/dfdaemon.sock"
# Upstream's bandwidth limits by default (bytes per second): high enough never to bind in practice.
DEFAULT_BANDWIDTH_LIMIT = 50_000_000_000
DEFAULT_PREFETCH_BANDWIDTH_LIMIT = 10_000_000_000


class ConfigError(Exception):
    """A configuration problem, worded for a one-line message to the user."""


class _Section(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class HostConfig(_Section):
    """Identity announced to the scheduler; empty values are detected at start."""

    ip: str = ""
    hostname: str = ""
    idc: str = ""
    location: str = ""
    # The scheduler cluster the manager should pick for this host (0: let the manager match by scopes).
    scheduler_cluster_id: Annotated[int, Field(ge=0)] = Field(default=0, alias="schedulerClusterID")


def _octal_mode(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and value.strip().isdigit():
        mode = int(value.strip(), 8)
    else:
        raise ValueError(f'invalid file mode {value!r} (use an octal string such as "0660")')
    if not 0 <= mode <= 0o777:
        raise ValueError(f"invalid file mode {value!r}")
    return mode


class DownloadServerConfig(_Section):
    socket_path: str = DEFAULT_SOCKET_PATH
    # Ours. Upstream leaves the socket world-writable; here only the owner (root) and socketGroup may use it.
    socket_mode: Annotated[int, BeforeValidator(_octal_mode)] = 0o660
    socket_group: str = ""


class BackToSourceConfig(_Section):
    """Ours: where the daemon may fetch from. Empty lists allow everything, except as noted for the network."""

    allowed_schemes: list[Literal["http", "https"]] = ["http", "https"]
    # Host names the origin may have (exact, or ".example.com" for a domain and its subdomains).
    allowed_hosts: list[str] = []
    # Networks (CIDR) the origin's addresses must be in. When empty, requests arriving over the network
    # (the upload server) may not reach loopback, private, link-local or other non-global addresses.
    allowed_networks: list[str] = []

    @model_validator(mode="after")
    def _networks_parse(self) -> BackToSourceConfig:
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"allowedNetworks: {network!r} is not a network (use CIDR, e.g. 10.0.0.0/8)") from None
        return self


class DownloadConfig(_Section):
    server: DownloadServerConfig = DownloadServerConfig()
    piece_timeout: Duration = 120.0
    concurrent_piece_count: Annotated[int, Field(ge=1, le=1024)] = 8
    back_to_source: BackToSourceConfig = BackToSourceConfig()
    # Ours: distinct tasks downloading at once; a new one past this is refused with RESOURCE_EXHAUSTED.
    max_concurrent_tasks: Annotated[int, Field(ge=1)] = 128
    # How pieces come from parents that offer vortex: "tcp" (upstream's default) or "grpc" (DownloadPiece always).
    protocol: Literal["tcp", "grpc"] = "tcp"
    # Bytes per second, shared by every download: pieces from parents and from the origin alike.
    bandwidth_limit: Size = Field(default=DEFAULT_BANDWIDTH_LIMIT, gt=0)
    # Bytes per second from origins (the mirror's cold fetches included); they count against bandwidthLimit too.
    back_to_source_bandwidth_limit: Size = Field(default=DEFAULT_BANDWIDTH_LIMIT, gt=0)


class TLSConfig(_Section):
    """Mutual TLS material (PEM files): ``caCert`` verifies the other side, ``cert``/``key`` present this one."""

    ca_cert: str = ""
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_cert or self.cert or self.key)

    @model_validator(mode="after")
    def _complete(self) -> TLSConfig:
        if self.enabled and not (self.ca_cert and self.cert and self.key):
            raise ValueError("caCert, cert and key must be given together")
        return self


class UploadServerConfig(_Section):
    ip: str = "0.0.0.0"
    port: Port = 4000
    # Ours: DownloadPiece calls admitted at once (working or waiting); more are refused with RESOURCE_EXHAUSTED.
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 512
    # Ours: DeleteTask from the network is refused unless enabled.
    enable_delete_task: bool = False
    ca_cert: str = ""
    cert: str = ""
    key: str = ""

    @property
    def tls(self) -> TLSConfig:
        return TLSConfig(ca_cert=self.ca_cert, cert=self.cert, key=self.key)

    @model_validator(mode="after")
    def _tls_complete(self) -> UploadServerConfig:
        self.tls  # noqa: B018 - validates the three TLS keys together
        return self


class UploadConfig(_Section):
    server: UploadServerConfig = UploadServerConfig()
    # Ours: pieces read and sent at once; the rest of the admitted DownloadPiece calls wait (bounded memory).
    concurrent_piece_count: Annotated[int, Field(ge=1, le=1024)] = 8
    # How this daemon connects to other peers' upload servers (mutual TLS when set).
    client: TLSConfig = TLSConfig()
    # Bytes per second, shared by every piece served (gRPC and vortex); also the transmit bandwidth cap reported
    # to schedulers.
    bandwidth_limit: Size = Field(default=DEFAULT_BANDWIDTH_LIMIT, gt=0)


class SchedulerConfig(_Section):
    """Scheduler endpoints (``addrs`` is ours: empty, and no manager, means back to source only)."""

    addrs: list[str] = []
    announce_interval: Duration = 300.0
    # Upstream's: how long a download waits for each scheduler message before it goes back to source (or fails).
    schedule_timeout: Duration = Field(default=3 * 3600.0, gt=0)
    # Upstream's: scheduler answers one download follows; past this it reports failure and goes back to source.
    max_schedule_count: Annotated[int, Field(ge=1)] = 5


class SeedPeerConfig(_Section):
    """Upstream's seed peer mode: announced as a seed (host id suffix ``-seed``), downloads what schedulers ask."""

    enable: bool = False
    # Upstream's host type names; "super" (host type 1) is upstream's default once the section is given.
    type: Literal["normal", "super"] = "super"


class ManagerConfig(_Section):
    """Dragonfly's manager, which names the schedulers (upstream's ``manager.addr``, e.g. http://manager:65003)."""

    addr: str = ""

    @field_validator("addr")
    @classmethod
    def _addr_is_manager(cls, addr: str) -> str:
        if addr:
            manager_target(addr)
        return addr


class DynconfigConfig(_Section):
    # How often the scheduler list is asked of the manager again.
    refresh_interval: Duration = Field(default=60.0, gt=0)


class StorageServerConfig(_Section):
    """The vortex TCP piece server; an empty ``ip`` means the upload server's, port 0 picks a free one."""

    ip: str = ""
    tcp_port: Port = 4005

    @field_validator("ip")
    @classmethod
    def _ip_is_address(cls, ip: str) -> str:
        if ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"{ip!r} is not an IP address") from None
        return ip


class StorageConfig(_Section):
    dir: str = DEFAULT_STORAGE_DIR
    server: StorageServerConfig = StorageServerConfig()
    # Here the default is true: holders (use references) must survive restarts.
    keep: bool = True


class GCPolicyConfig(_Section):
    task_ttl: Duration = Field(default=21600.0, alias="taskTTL")
    # Percent of the quota, and of the filesystem holding the cache: past the high mark of either (the filesystem
    # filled by anything), GC evicts down to the low one. Upstream's older ``dist*`` spellings are accepted too.
    disk_high_threshold_percent: Annotated[int, Field(ge=1, le=100)] = Field(
        default=80, validation_alias=AliasChoices("diskHighThresholdPercent", "distHighThresholdPercent")
    )
    disk_low_threshold_percent: Annotated[int, Field(ge=0, le=100)] = Field(
        default=60, validation_alias=AliasChoices("diskLowThresholdPercent", "distLowThresholdPercent")
    )
    # Non-zero: the cache quota in bytes over the cache's own files; zero: the filesystem is the limit.
    disk_threshold: Size = Field(default=0, validation_alias=AliasChoices("diskThreshold", "distThreshold"))
    # Ours: how long after a task finishes or is released before it may be collected.
    grace_period: Duration = 300.0

    @model_validator(mode="after")
    def _watermarks_ordered(self) -> GCPolicyConfig:
        if self.disk_low_threshold_percent >= self.disk_high_threshold_percent:
            raise ValueError("diskLowThresholdPercent must be lower than diskHighThresholdPercent")
        return self


class GCConfig(_Section):
    interval: Duration = 900.0
    policy: GCPolicyConfig = GCPolicyConfig()


class MetricsServerConfig(_Section):
    ip: str = "0.0.0.0"
    port: Port = 4002


class MetricsConfig(_Section):
    enable: bool = True
    server: MetricsServerConfig = MetricsServerConfig()


class TracingConfig(_Section):
    """Upstream's keys; empty defers to OpenTelemetry's OTEL_* environment (off when that says nothing too)."""

    protocol: Literal["", "grpc", "http", "console"] = ""
    endpoint: str = ""
    # Ours: the share of new traces recorded (a caller's sampling decision is always followed).
    sampling_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    service_name: str = ""


class BasicAuthConfig(_Section):
    """Credentials the forward proxy asks of its clients; both empty, as in upstream's documented example: none."""

    username: str = ""
    password: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.username or self.password)

    @model_validator(mode="after")
    def _complete(self) -> BasicAuthConfig:
        if self.enabled and not (self.username and self.password):
            raise ValueError("username and password must be given together")
        if ":" in self.username:
            raise ValueError("a Basic username cannot contain ':'")
        return self


class ProxyServerConfig(_Section):
    # Ours: loopback by default (upstream listens on 0.0.0.0); the mirror is meant for the node's own runtime.
    ip: str = "127.0.0.1"
    port: Port = 4001
    basic_auth: BasicAuthConfig | None = None


class RegistryMirrorConfig(_Section):
    """Where registry requests go when they do not name their registry with ``?ns=``."""

    addr: str = "https://index.docker.io"
    enable_task_id_based_blob_digest: bool = Field(default=False, alias="enableTaskIDBasedBlobDigest")
    # Ours: registries (host[:port]) reached over plain HTTP when named by ``ns``, like Docker's insecure-registries.
    insecure_registries: list[str] = []
    # Ours: registries (host[:port]) whose blobs any client may read; the cache serves them without first asking
    # the registry whether this client may (which it does for every other registry).
    public_registries: list[str] = []

    @model_validator(mode="after")
    def _addr_is_url(self) -> RegistryMirrorConfig:
        if not self.addr.startswith(("http://", "https://")):
            raise ValueError(f"addr: {self.addr!r} is not an http(s) URL")
        return self


class ProxyRuleConfig(_Section):
    """One ``proxy.rules`` entry: GETs whose URL (without query) matches ``regex`` go through the P2P network."""

    regex: str
    use_tls: bool = Field(default=False, alias="useTLS")
    redirect: str | None = None
    # Upstream's default: the query keys of presigned URLs (S3, GCS, OSS, OBS, COS) and ``ns``.
    filtered_query_params: list[str] = list(DEFAULT_FILTERED_QUERY_PARAMS)

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, regex: str) -> str:
        try:
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f"{regex!r} is not a regular expression: {exc}") from None
        return regex


class ProxyConfig(_Section):
    """The registry mirror and the HTTP forward proxy, on one port: blobs and rule-matching GETs go through the P2P
    network, everything else straight to the registry or origin."""

    # Ours: set false to run without the mirror.
    enable: bool = True
    server: ProxyServerConfig = ProxyServerConfig()
    registry_mirror: RegistryMirrorConfig = RegistryMirrorConfig()
    # Blobs come only from peers; a blob no peer has fails (upstream's key).
    disable_back_to_source: bool = False
    # Forward proxy: which URLs become P2P tasks (first match wins).
    rules: list[ProxyRuleConfig] = []
    # A ranged GET through the P2P network also fetches the whole task in the background (X-Dragonfly-Prefetch wins).
    prefetch: bool = False
    # Bytes per second for background prefetches (on top of download.bandwidthLimit).
    prefetch_bandwidth_limit: Size = Field(default=DEFAULT_PREFETCH_BANDWIDTH_LIMIT, gt=0)


class ContainerdConfig(_Section):
    # The containerd socket ("/run/containerd/containerd.sock"); empty turns runtime sync off.
    address: str = ""


class RuntimeConfig(_Section):
    """Ours: what the container runtime uses is held in the cache, so GC never evicts a running image."""

    containerd: ContainerdConfig = ContainerdConfig()
    sync_interval: Duration = Field(default=60.0, gt=0)
    # Image references held for good (the sandbox image, containerd's pinned_images).
    pinned_images: list[str] = []


class LogConfig(_Section):
    level: Literal["debug", "info", "warn", "warning", "error"] = "info"
    # Ours: "text" (key=value) or "json", one object per line.
    format: Literal["text", "json"] = "text"


class Config(_Section):
    """The whole ``dfdaemon.yaml``."""

    host: HostConfig = HostConfig()
    download: DownloadConfig = DownloadConfig()
    upload: UploadConfig = UploadConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    seed_peer: SeedPeerConfig = SeedPeerConfig()
    manager: ManagerConfig = ManagerConfig()
    dynconfig: DynconfigConfig = DynconfigConfig()
    storage: StorageConfig = StorageConfig()
    gc: GCConfig = GCConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    log: LogConfig = LogConfig()
    proxy: ProxyConfig = ProxyConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    # Keys of upstream's dfdaemon.yaml that were given and are not acted on here (set by parse_config).
    _upstream_ignored: tuple[str, ...] = PrivateAttr(default=())

    def warnings(self) -> list[str]:
        """Lines to log once at start-up: what in the file this daemon accepted but will not act on."""
        return [ignored_warning(self._upstream_ignored)] if self._upstream_ignored else []

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage.dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.download.server.socket_path)

    def host_ip(self) -> str:
        """The configured IP, or the address this host reaches the network from."""
        return self.host.ip or detect_ip()

    def hostname(self) -> str:
        return self.host.hostname or socket.gethostname()


def _location(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else part)
    return key


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    message = str(first["msg"]).removeprefix("Value error, ")
    if not key:
        return message
    return f"{key}: {message}"


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate already-parsed YAML data; keys only upstream's dfdaemon reads are set aside (``Config.warnings``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    try:
        reconciled = reconcile(data, Config)
        config = Config.model_validate(reconciled.data)
    except UnknownKey as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    config._upstream_ignored = reconciled.ignored
    return config


def load_config(path: Path | None) -> Config:
    """Read and validate a YAML file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    return parse_config(data, str(path))


def check_storage_dir(config: Config) -> None:
    """Fail early when the storage directory cannot be created or written."""
    directory = config.storage_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"storage.dir: {str(directory)!r} is not writable: {reason}") from None
