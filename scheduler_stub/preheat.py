"""Preheat: put files, or every layer of an image, into chosen peers' caches before anyone asks for them.

``PreheatFile`` and ``PreheatImage`` answer at once; the work goes on here. An image URL is a registry manifest
URL (``http(s)://registry/v2/<repository>/manifests/<tag or digest>``): the manifest is fetched (through the
registry's token challenge when it sends one), an index or manifest list is narrowed to the requested platform,
and each layer blob becomes one file preheat with the same credentials. Every chosen host is asked for every URL
with ``DfdaemonUpload.DownloadTask``; those downloads register with this scheduler like any other, so the first
goes to a seed or the source and the rest fetch from it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform as host_platform
import re
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc

from dfdaemon.api import common_pb2, scheduler_pb2
from scheduler_stub import peers
from scheduler_stub.registry import SINGLE_SEED_PEER, Host, InvalidRequest, Registry, RegistryError

log = logging.getLogger("dfscheduler.preheat")

DEFAULT_TIMEOUT = 30 * 60.0
DEFAULT_CONCURRENT_PEERS = 50
MANIFEST_TIMEOUT = 60.0

_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_ACCEPT = ", ".join((*_INDEX_TYPES, *_MANIFEST_TYPES))
_MANIFEST_URL = re.compile(r"^(?P<base>https?://[^/]+)/v2/(?P<repository>.+)/manifests/(?P<reference>[^/]+)$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}

PreheatRequest = scheduler_pb2.PreheatFileRequest | scheduler_pb2.PreheatImageRequest


class ManifestError(Exception):
    """The image's manifest could not be fetched or understood."""


@dataclass(frozen=True)
class Plan:
    """A preheat as requested: where it goes and the Download each chosen host is given (URL filled per file)."""

    scope: str
    ips: tuple[str, ...]
    count: int | None
    percentage: int | None
    download: common_pb2.Download
    timeout: float
    concurrent_peers: int

    def hosts(self, registry: Registry, url: str) -> list[Host]:
        return registry.preheat_hosts(self.scope, url, self.ips, self.count, self.percentage)


def plan(request: PreheatRequest) -> Plan:
    """Check a preheat request and read it into a Plan; InvalidRequest names what is wrong."""
    if not _MANIFEST_URL.match(request.url) and isinstance(request, scheduler_pb2.PreheatImageRequest):
        raise InvalidRequest(
            f"url must be a manifest URL (http(s)://REGISTRY/v2/NAME/manifests/REF), not {request.url!r}"
        )
    if not request.url.startswith(("http://", "https://")):
        raise InvalidRequest(f"url must be http(s)://..., not {request.url!r}")
    if request.HasField("percentage") and request.percentage > 100:
        raise InvalidRequest(f"percentage must be at most 100, not {request.percentage}")
    if request.HasField("count") and request.count == 0:
        raise InvalidRequest("count must be at least 1")
    if request.HasField("timeout") and request.timeout.ToNanoseconds() <= 0:
        raise InvalidRequest("timeout must be positive")
    download = common_pb2.Download(
        type=common_pb2.STANDARD,
        tag=request.tag if request.HasField("tag") else None,
        application=request.application if request.HasField("application") else None,
        priority=request.priority,
        filtered_query_params=list(request.filtered_query_params),
        request_header=dict(request.header),
    )
    if request.HasField("piece_length"):
        download.piece_length = request.piece_length
    return Plan(
        scope=request.scope or SINGLE_SEED_PEER,
        ips=tuple(request.ips),
        count=request.count if request.HasField("count") else None,
        percentage=request.percentage if request.HasField("percentage") else None,
        download=download,
        timeout=request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else DEFAULT_TIMEOUT,
        concurrent_peers=request.concurrent_peer_count
        if request.concurrent_peer_count > 0
        else DEFAULT_CONCURRENT_PEERS,
    )


async def preheat(
    registry: Registry,
    plan: Plan,
    urls: Iterable[str],
    credentials: grpc.ChannelCredentials | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[peers.Outcome]:
    """Ask the hosts the plan chooses for each URL to download it (with ``credentials`` for mutual TLS); returns
    how each call ended."""
    limit = asyncio.Semaphore(plan.concurrent_peers)

    async def one(host: Host, url: str) -> peers.Outcome:
        download = common_pb2.Download()
        download.CopyFrom(plan.download)
        download.url = url
        download.request_header.update(headers or {})
        async with limit:
            return await peers.download_task(peers.Target(host.ip, host.port, credentials), download, plan.timeout)

    calls: list[Coroutine[Any, Any, peers.Outcome]] = []
    for url in urls:
        try:
            hosts = plan.hosts(registry, url)
        except RegistryError as error:
            log.warning("preheat of %s: %s", url, error)
            continue
        calls.extend(one(host, url) for host in hosts)
    outcomes = list(await asyncio.gather(*calls))
    failed = sum(not outcome.ok for outcome in outcomes)
    log.info("preheat done: %d downloads, %d failed", len(outcomes), failed)
    return outcomes


@dataclass
class Image:
    """What an image preheat fetches: its layer blob URLs and the headers that open them."""

    layers: list[str]
    headers: dict[str, str] = field(default_factory=dict)


def default_platform() -> str:
    machine = host_platform.machine().lower()
    return f"linux/{_ARCHITECTURES.get(machine, machine)}"


async def resolve_image(
    url: str,
    platform: str,
    headers: Mapping[str, str],
    username: str = "",
    password: str = "",
    verify_tls: bool = True,
) -> Image:
    """The layers of the image at manifest ``url`` for ``platform`` (``os/arch[/variant]``)."""
    matched = _MANIFEST_URL.match(url)
    if matched is None:
        raise ManifestError(f"not a manifest URL: {url}")
    base, repository = matched["base"], matched["repository"]
    timeout = aiohttp.ClientTimeout(total=MANIFEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=verify_tls)) as session:
        registry = _RegistrySession(session, dict(headers), username, password)
        manifest = await registry.manifest(url)
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            digest = _platform_digest(manifest, platform)
            manifest = await registry.manifest(f"{base}/v2/{repository}/manifests/{digest}")
        layers = [_digest(layer) for layer in _entries(manifest, "layers")]
        return Image([f"{base}/v2/{repository}/blobs/{digest}" for digest in layers], registry.headers)


def _entries(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    entries = document.get(key)
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ManifestError(f"the manifest has no list of {key}")
    return entries


def _digest(entry: dict[str, Any]) -> str:
    digest = entry.get("digest")
    if not isinstance(digest, str) or not re.fullmatch(r"[a-z0-9]+:[0-9a-f]{32,128}", digest):
        raise ManifestError(f"the manifest names an invalid digest: {digest!r}")
    return digest


def _platform_digest(index: dict[str, Any], platform: str) -> str:
    wanted = platform.split("/")
    for entry in _entries(index, "manifests"):
        described = entry.get("platform")
        if not isinstance(described, dict):
            continue
        have = [described.get("os", ""), described.get("architecture", ""), described.get("variant", "")]
        if have[: len(wanted)] == wanted:
            return _digest(entry)
    raise ManifestError(f"the image has no manifest for platform {platform}")


class _RegistrySession:
    """Manifest GETs that answer a registry's Bearer or Basic challenge once, keeping the credential it earned."""

    def __init__(self, session: aiohttp.ClientSession, headers: dict[str, str], username: str, password: str) -> None:
        self.session = session
        self.headers = headers
        self.basic = aiohttp.BasicAuth(username, password) if username else None

    async def manifest(self, url: str) -> dict[str, Any]:
        status, challenge, body = await self._get(url)
        if status == 401 and challenge:
            await self._authorize(challenge)
            status, challenge, body = await self._get(url)
        if status != 200:
            raise ManifestError(f"{url}: the registry answered {status}: {body[:200].decode(errors='replace')}")
        try:
            parsed = json.loads(body)
        except ValueError:
            raise ManifestError(f"{url}: the manifest is not JSON") from None
        if not isinstance(parsed, dict):
            raise ManifestError(f"{url}: the manifest is not a JSON object")
        return parsed

    async def _get(self, url: str) -> tuple[int, str, bytes]:
        async with self.session.get(url, headers={**self.headers, "Accept": _ACCEPT}) as response:
            return response.status, response.headers.get("WWW-Authenticate", ""), await response.read()

    async def _authorize(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic" and self.basic is not None:
            self.headers["Authorization"] = self.basic.encode()
            return
        if scheme.lower() != "bearer":
            raise ManifestError(f"the registry asks for {scheme} authentication, which needs credentials")
        fields = dict(_CHALLENGE_PARAM.findall(params))
        realm = fields.pop("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise ManifestError(f"the registry's token challenge names no usable realm: {challenge}")
        async with self.session.get(realm, params=fields, auth=self.basic) as response:
            if response.status != 200:
                raise ManifestError(f"the token server {realm} answered {response.status}")
            answer = await response.json(content_type=None)
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise ManifestError(f"the token server {realm} gave no token")
        self.headers["Authorization"] = f"Bearer {token}"
