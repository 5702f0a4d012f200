"""A small asyncio client for containerd's gRPC API: containers, images, their blobs, and events.

It speaks to containerd over its unix socket with grpc.aio and the minimal protos in ``proto/containerd_*.proto``
(field numbers and method paths as containerd 1.6 serves them). Every call but ``namespaces`` names a containerd
namespace in the ``containerd-namespace`` request metadata, as containerd's own client does.

The PyPI ``containerd`` package is not used: its generated modules (1.5.3, made by an old protoc) fail to import
under protobuf >= 4 ("Descriptors cannot be created directly"), and this project runs protobuf 7.

What an image "consists of" is worked out the way containerd resolves it for this host: the image record's target;
when that is an index (OCI index or Docker manifest list), the child manifests for this host's platform that the
content store holds; and every such manifest's config and layers, listed whether or not the layer blobs themselves
are still in the content store. The JSON part is the pure function ``parse_manifest``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform as _platform
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from dfdaemon.api import (
    containerd_containers_pb2,
    containerd_containers_pb2_grpc,
    containerd_content_pb2,
    containerd_content_pb2_grpc,
    containerd_events_pb2,
    containerd_events_pb2_grpc,
    containerd_images_pb2,
    containerd_images_pb2_grpc,
    containerd_namespaces_pb2,
    containerd_namespaces_pb2_grpc,
)

NAMESPACE_METADATA = "containerd-namespace"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# The event topics the runtime sync reacts to, and the containerd filter expressions (any one matching is enough).
EVENT_TOPICS = ("/containers/", "/tasks/", "/images/")
EVENT_FILTERS = tuple(f'topic~="^{topic}"' for topic in EVENT_TOPICS)

# Manifests and indexes are small JSON documents; a bigger blob under such a name is not one.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
# Indexes may nest (an index naming an index); containerd follows them, to a sane depth.
MAX_INDEX_DEPTH = 4
# Replies to List carry every container's full OCI spec, which the minimal protos keep as unknown fields.
MAX_RECEIVE_BYTES = 128 * 1024 * 1024
# Parsing a manifest this big or bigger happens in a worker thread.
_PARSE_IN_THREAD_BYTES = 64 * 1024

_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_DIGEST_ENCODING = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}


class ContainerdError(Exception):
    """containerd could not be asked (socket missing or refusing, permission, timeout) or replied unexpectedly."""


class ImageNotFound(ContainerdError):
    """The namespace has no image record of that name."""


@dataclass(frozen=True)
class RuntimeContainer:
    """One container record (running or not) in one containerd namespace."""

    namespace: str
    id: str
    image: str  # the reference of the image the container was made from


@dataclass(frozen=True)
class RuntimeEvent:
    """One containerd event: its namespace and topic, e.g. "/containers/create" or "/tasks/start"."""

    namespace: str
    topic: str


# ---------------------------------------------------------------------------------------------------------------------
# Manifests: pure functions


@dataclass(frozen=True)
class Platform:
    """An OCI platform: os, GOARCH-style architecture and optional variant."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


# platform.machine() and loose spellings -> (GOARCH, variant)
_MACHINES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "x86": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}
# On an arm host of a variant, images of these older variants run too.
_ARM_RUNS = {"v8": ("v8", "v7", "v6", "v5"), "v7": ("v7", "v6", "v5"), "v6": ("v6", "v5"), "v5": ("v5",)}


def host_platform(machine: str | None = None) -> Platform:
    """This host's platform (linux and the architecture of ``platform.machine()``), as containerd names it."""
    raw = (machine if machine is not None else _platform.machine()).lower()
    architecture, variant = _MACHINES.get(raw, (raw, ""))
    return Platform("linux", architecture, variant)


def _normalized(platform: Platform) -> Platform:
    architecture, variant = platform.architecture.lower(), platform.variant.lower()
    mapped = _MACHINES.get(architecture)
    if mapped is not None:
        architecture, default_variant = mapped
        variant = variant or default_variant
    if architecture == "arm64" and variant in ("", "8", "v8"):
        variant = ""
    elif architecture == "arm" and variant in ("", "7"):
        variant = "v7"
    elif architecture == "amd64" and variant == "v1":
        variant = ""
    return Platform(platform.os.lower(), architecture, variant)


def platform_matches(candidate: Platform, host: Platform) -> bool:
    """True when an image for ``candidate`` is one ``host`` would pull and run (containerd's default matching)."""
    want, have = _normalized(host), _normalized(candidate)
    if have.os != want.os or have.architecture != want.architecture:
        return False
    if have.variant == want.variant:
        return True
    return want.architecture == "arm" and have.variant in _ARM_RUNS.get(want.variant, ())


class ManifestError(ValueError):
    """A blob named as a manifest or index is not one."""


@dataclass(frozen=True)
class ManifestRefs:
    """What one manifest or index names.

    ``manifests``: for an index, its children for the platform (manifests, or nested indexes), with media types.
    ``blobs``: for an image manifest, its config and layer digests.
    """

    kind: str  # "index" or "manifest"
    manifests: tuple[tuple[str, str], ...] = ()
    blobs: tuple[str, ...] = ()


def is_valid_digest(digest: str) -> bool:
    """An OCI digest (``algorithm:encoded``), with the encoding of sha256 and sha512 checked strictly."""
    if not _DIGEST.match(digest):
        return False
    algorithm, _, encoded = digest.partition(":")
    strict = _DIGEST_ENCODING.get(algorithm)
    return strict is None or bool(strict.match(encoded))


def manifest_kind(media_type: str, document: dict[str, Any] | None = None) -> str | None:
    """Whether a blob is an "index", a "manifest" or neither (None): by media type, else by the document's own."""
    for candidate in (media_type, (document or {}).get("mediaType")):
        if candidate in INDEX_MEDIA_TYPES:
            return "index"
        if candidate in MANIFEST_MEDIA_TYPES:
            return "manifest"
    if document is not None and not media_type and not document.get("mediaType"):
        # OCI allows both to be absent; the shape tells them apart.
        if isinstance(document.get("manifests"), list):
            return "index"
        if isinstance(document.get("config"), dict) or isinstance(document.get("layers"), list):
            return "manifest"
    return None


def _descriptor_digest(descriptor: Any, where: str) -> str:
    if not isinstance(descriptor, dict):
        raise ManifestError(f"{where} is not a descriptor object")
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not is_valid_digest(digest):
        raise ManifestError(f"{where} has no valid digest: {digest!r}")
    return digest


def _descriptor_platform(descriptor: dict[str, Any], where: str) -> Platform | None:
    raw = descriptor.get("platform")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}.platform is not an object")
    fields = [raw.get("os", ""), raw.get("architecture", ""), raw.get("variant", "")]
    if not all(isinstance(value, str) for value in fields):
        raise ManifestError(f"{where}.platform has a field that is not a string")
    return Platform(*fields)


def parse_manifest(data: bytes, media_type: str, *, platform: Platform) -> ManifestRefs:
    """The digests one manifest or index names.

    For an index (OCI image index or Docker manifest list): the children that are manifests or indexes for
    ``platform`` (a child without a platform is kept: only its content says what it is). For an image manifest (OCI or
    Docker v2 schema 2): the config and the layers, in order. ``media_type`` is the descriptor's; when it is empty or
    unknown the document's own ``mediaType`` (or its shape) decides. Raises ManifestError for anything else.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ManifestError("not a JSON object")
    kind = manifest_kind(media_type, document)
    if kind is None:
        shown = media_type or document.get("mediaType") or "no media type"
        raise ManifestError(f"not an image manifest or index ({shown})")
    if kind == "index":
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("index without a manifests list")
        children: list[tuple[str, str]] = []
        for position, entry in enumerate(entries):
            where = f"manifests[{position}]"
            digest = _descriptor_digest(entry, where)
            child_type = entry.get("mediaType", "")
            if not isinstance(child_type, str):
                raise ManifestError(f"{where}.mediaType is not a string")
            if child_type and manifest_kind(child_type) is None:
                continue  # an artifact or other non-image entry
            child_platform = _descriptor_platform(entry, where)
            if child_platform is not None and not platform_matches(child_platform, platform):
                continue
            children.append((digest, child_type))
        return ManifestRefs(kind="index", manifests=tuple(dict.fromkeys(children)))
    blobs = [_descriptor_digest(document.get("config"), "config")]
    layers = document.get("layers", [])
    if not isinstance(layers, list):
        raise ManifestError("layers is not a list")
    blobs += [_descriptor_digest(layer, f"layers[{position}]") for position, layer in enumerate(layers)]
    return ManifestRefs(kind="manifest", blobs=tuple(dict.fromkeys(blobs)))


def _verified_parse(data: bytes, digest: str, media_type: str, platform: Platform) -> ManifestRefs:
    algorithm, _, encoded = digest.partition(":")
    if algorithm in ("sha256", "sha512") and hashlib.new(algorithm, data).hexdigest() != encoded:
        raise ManifestError("content does not match its digest")
    return parse_manifest(data, media_type, platform=platform)


# ---------------------------------------------------------------------------------------------------------------------
# The client


def grpc_target(address: str) -> str:
    """A gRPC target for a containerd socket given as a path or as ``unix://PATH``."""
    path = address.removeprefix("unix://") if address.startswith("unix://") else address.removeprefix("unix:")
    if not path:
        raise ValueError(f"no socket path in containerd address {address!r}")
    return f"unix://{path}" if path.startswith("/") else f"unix:{path}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ContainerdClient:
    """Reads containers, images and events from one containerd. Create and use it inside the event loop."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.target = grpc_target(address)
        self.address = self.target.removeprefix("unix://").removeprefix("unix:")
        self.timeout = timeout
        self.platform = host_platform()
        self._channel: aio.Channel | None = None

    # -- plumbing

    def _open(self) -> aio.Channel:
        if self._channel is None:
            self._channel = aio.insecure_channel(
                self.target,
                options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)],
            )
        return self._channel

    @staticmethod
    def _metadata(namespace: str) -> tuple[tuple[str, str], ...]:
        return ((NAMESPACE_METADATA, namespace),)

    def _error(self, exc: aio.AioRpcError, what: str) -> ContainerdError:
        code = exc.code()
        detail = _one_line(exc.details() or "")
        if code == grpc.StatusCode.UNAVAILABLE:
            if "permission denied" in detail.lower():
                return ContainerdError(f"no permission to use the containerd socket {self.address} ({what}): {detail}")
            return ContainerdError(f"containerd at {self.address} is unreachable ({what}): {detail}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ContainerdError(f"containerd at {self.address} did not answer {what} within {self.timeout:g}s")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return ContainerdError(f"containerd at {self.address} refused {what}: {detail}")
        return ContainerdError(f"containerd at {self.address} failed {what}: {code.name}: {detail}")

    # -- namespaces and containers

    async def namespaces(self) -> list[str]:
        """Every containerd namespace, sorted."""
        stub = containerd_namespaces_pb2_grpc.NamespacesStub(self._open())
        try:
            reply = await stub.List(containerd_namespaces_pb2.ListNamespacesRequest(), timeout=self.timeout)
        except aio.AioRpcError as exc:
            raise self._error(exc, "listing namespaces") from None
        return sorted({namespace.name for namespace in reply.namespaces})

    async def _containers_in(self, namespace: str) -> list[RuntimeContainer]:
        stub = containerd_containers_pb2_grpc.ContainersStub(self._open())
        try:
            reply = await stub.List(
                containerd_containers_pb2.ListContainersRequest(),
                metadata=self._metadata(namespace),
                timeout=self.timeout,
            )
        except aio.AioRpcError as exc:
            raise self._error(exc, f"listing containers in namespace {namespace!r}") from None
        return [RuntimeContainer(namespace=namespace, id=c.id, image=c.image) for c in reply.containers]

    async def containers(self) -> list[RuntimeContainer]:
        """Every container record in every namespace, whether a task runs for it or not; sorted."""
        namespaces = await self.namespaces()
        found = await asyncio.gather(*(self._containers_in(namespace) for namespace in namespaces))
        return sorted((c for batch in found for c in batch), key=lambda c: (c.namespace, c.id))

    # -- images

    async def _image_target(self, namespace: str, image: str) -> tuple[str, str]:
        if not image:
            raise ImageNotFound(f"no image name given (namespace {namespace!r})")
        stub = containerd_images_pb2_grpc.ImagesStub(self._open())
        try:
            reply = await stub.Get(
                containerd_images_pb2.GetImageRequest(name=image),
                metadata=self._metadata(namespace),
                timeout=self.timeout,
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ImageNotFound(f"image {image!r} not found in namespace {namespace!r}") from None
            raise self._error(exc, f"getting image {image!r} in namespace {namespace!r}") from None
        target = reply.image.target
        if not is_valid_digest(target.digest):
            raise ContainerdError(f"image {image!r} in namespace {namespace!r} has no valid target: {target.digest!r}")
        return target.digest, target.media_type

    async def read_blob(self, namespace: str, digest: str, *, limit: int = MAX_MANIFEST_BYTES) -> bytes | None:
        """The whole blob ``digest`` from the content store of ``namespace``, or None when it is not there."""
        stub = containerd_content_pb2_grpc.ContentStub(self._open())
        call = stub.Read(
            containerd_content_pb2.ReadContentRequest(digest=digest),
            metadata=self._metadata(namespace),
            timeout=self.timeout,
        )
        chunks: list[bytes] = []
        size = 0
        try:
            async for reply in call:
                if reply.offset != size:
                    raise ContainerdError(f"blob {digest}: chunk at offset {reply.offset}, expected {size}")
                size += len(reply.data)
                if size > limit:
                    raise ContainerdError(f"blob {digest} in namespace {namespace!r} is larger than {limit} bytes")
                chunks.append(reply.data)
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(exc, f"reading blob {digest} in namespace {namespace!r}") from None
        finally:
            call.cancel()
        return b"".join(chunks)

    async def _parse(self, data: bytes, digest: str, media_type: str) -> ManifestRefs:
        if len(data) >= _PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(_verified_parse, data, digest, media_type, self.platform)
        return _verified_parse(data, digest, media_type, self.platform)

    async def image_digests(self, namespace: str, image: str) -> list[str]:
        """The digests of the blobs ``image`` in ``namespace`` consists of, for this host: see the module docstring.

        Order: the target first, then each manifest followed by its config and layers. Raises ImageNotFound when the
        namespace has no such image, ContainerdError when a manifest present in the content store is not one.
        """
        target, media_type = await self._image_target(namespace, image)
        found: dict[str, None] = {target: None}
        if manifest_kind(media_type) is None and media_type:
            return list(found)  # not an image manifest or index: nothing more is known to be part of it
        pending: list[tuple[str, str, int]] = [(target, media_type, 0)]
        while pending:
            digest, kind_hint, depth = pending.pop(0)
            data = await self.read_blob(namespace, digest)
            if data is None:
                continue
            try:
                refs = await self._parse(data, digest, kind_hint)
            except ManifestError as exc:
                raise ContainerdError(f"image {image!r} in namespace {namespace!r}: blob {digest}: {exc}") from None
            found[digest] = None
            if refs.kind == "manifest":
                found.update(dict.fromkeys(refs.blobs))
                continue
            if depth >= MAX_INDEX_DEPTH:
                raise ContainerdError(f"image {image!r} in namespace {namespace!r}: indexes nest deeper than {depth}")
            pending += [(child, child_type, depth + 1) for child, child_type in refs.manifests if child not in found]
        # Children of an index are listed once read; a target is listed even when its blob is gone.
        return list(found)

    # -- events

    async def events(self, filters: Iterable[str] = EVENT_FILTERS) -> AsyncIterator[RuntimeEvent]:
        """Events of every namespace, from now on, whose topic starts with /containers/, /tasks/ or /images/.

        Runs until the stream breaks, then raises ContainerdError (also when containerd ends it cleanly). Closing the
        iterator (or cancelling its consumer) ends the subscription.
        """
        stub = containerd_events_pb2_grpc.EventsStub(self._open())
        call = stub.Subscribe(containerd_events_pb2.SubscribeRequest(filters=list(filters)))
        try:
            async for envelope in call:
                yield RuntimeEvent(namespace=envelope.namespace, topic=envelope.topic)
        except aio.AioRpcError as exc:
            raise self._error(exc, "streaming events") from None
        finally:
            call.cancel()
        raise ContainerdError(f"containerd at {self.address} ended the event stream")

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> ContainerdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
