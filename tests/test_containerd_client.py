"""dfdaemon.runtime.containerd against a real containerd (and a real registry), plus its pure manifest parsing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import socket
import tempfile
import threading
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio

from dfdaemon.api import (
    containerd_containers_pb2,
    containerd_content_pb2,
    containerd_content_pb2_grpc,
    containerd_events_pb2,
    containerd_images_pb2,
    containerd_images_pb2_grpc,
    containerd_namespaces_pb2,
    containerd_types_pb2,
)
from dfdaemon.runtime.containerd import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    NAMESPACE_METADATA,
    OCI_INDEX,
    OCI_MANIFEST,
    ContainerdClient,
    ContainerdError,
    ImageNotFound,
    ManifestError,
    Platform,
    RuntimeContainer,
    RuntimeEvent,
    grpc_target,
    host_platform,
    parse_manifest,
    platform_matches,
)
from tests.containerd_support import (
    Containerd,
    containerd_skip_reason,
    error_line,
    find_binary,
    hosts_toml,
    leftover_shims,
    running_containerd,
)
from tests.registry_support import (
    OciImage,
    Registry,
    busybox_image,
    busybox_skip_reason,
    filler_image,
    http_request,
    push_image,
    registry_skip_reason,
    running_registry,
    sha256_digest,
)

HOST = host_platform()
FOREIGN_ARCH = "s390x" if HOST.architecture != "s390x" else "ppc64le"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
EVENT_TIMEOUT = 10.0


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fake_digest(name: str) -> str:
    return _digest(name.encode())


def _descriptor(media_type: str, data_or_digest: bytes | str, size: int = 100, **extra: Any) -> dict[str, Any]:
    if isinstance(data_or_digest, bytes):
        digest, size = _digest(data_or_digest), len(data_or_digest)
    else:
        digest = data_or_digest
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _platform(architecture: str, variant: str = "", os_name: str = "linux") -> dict[str, str]:
    found = {"os": os_name, "architecture": architecture}
    if variant:
        found["variant"] = variant
    return found


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------------------------
# Pure: manifests and platforms


def test_host_platform_names_architectures_as_containerd_does() -> None:
    assert host_platform("x86_64") == Platform("linux", "amd64")
    assert host_platform("aarch64") == Platform("linux", "arm64", "v8")
    assert host_platform("armv7l") == Platform("linux", "arm", "v7")
    assert host_platform("i686") == Platform("linux", "386")
    assert host_platform("riscv64") == Platform("linux", "riscv64")
    assert host_platform() == host_platform(platform.machine())


def test_platform_matching() -> None:
    arm64 = host_platform("aarch64")
    assert platform_matches(Platform("linux", "arm64"), arm64)
    assert platform_matches(Platform("linux", "arm64", "v8"), arm64)
    assert platform_matches(Platform("linux", "aarch64"), arm64)
    assert not platform_matches(Platform("linux", "amd64"), arm64)
    assert not platform_matches(Platform("windows", "arm64"), arm64)
    arm7 = host_platform("armv7l")
    assert platform_matches(Platform("linux", "arm", "v6"), arm7)
    assert platform_matches(Platform("linux", "arm"), arm7)  # no variant means v7
    assert not platform_matches(Platform("linux", "arm", "v8"), arm7)
    amd64 = host_platform("x86_64")
    assert platform_matches(Platform("Linux", "AMD64"), amd64)
    assert not platform_matches(Platform("linux", "amd64", "v3"), amd64)


def test_index_keeps_only_this_platforms_manifests() -> None:
    amd64, arm64, arm7, windows, attestation = (_fake_digest(n) for n in ("amd64", "arm64", "arm7", "win", "att"))
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                _descriptor(OCI_MANIFEST, amd64, platform=_platform("amd64")),
                _descriptor(OCI_MANIFEST, arm64, platform=_platform("arm64", "v8")),
                _descriptor(OCI_MANIFEST, arm7, platform=_platform("arm", "v7")),
                _descriptor(OCI_MANIFEST, windows, platform=_platform("amd64", os_name="windows")),
                _descriptor(OCI_MANIFEST, attestation, platform=_platform("unknown", os_name="unknown")),
                _descriptor("application/vnd.example.sbom+json", _fake_digest("sbom")),
            ],
        }
    )
    refs = parse_manifest(index, OCI_INDEX, platform=host_platform("x86_64"))
    assert refs.kind == "index"
    assert refs.manifests == ((amd64, OCI_MANIFEST),)
    assert refs.blobs == ()
    refs = parse_manifest(index, OCI_INDEX, platform=host_platform("aarch64"))
    assert [digest for digest, _ in refs.manifests] == [arm64]
    refs = parse_manifest(index, "", platform=host_platform("s390x"))  # media type from the document
    assert refs.kind == "index"
    assert refs.manifests == ()


def test_docker_manifest_list_and_manifest() -> None:
    config, layer_a, layer_b = (_fake_digest(n) for n in ("config", "a", "b"))
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": _descriptor(DOCKER_CONFIG, config),
            "layers": [_descriptor(DOCKER_LAYER, layer_a), _descriptor(DOCKER_LAYER, layer_b)],
        }
    )
    refs = parse_manifest(manifest, DOCKER_MANIFEST, platform=HOST)
    assert refs.kind == "manifest"
    assert refs.blobs == (config, layer_a, layer_b)
    assert refs.manifests == ()

    manifest_list = _json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                _descriptor(DOCKER_MANIFEST, manifest, platform=_platform("amd64")),
                _descriptor(DOCKER_MANIFEST, _fake_digest("ppc"), platform=_platform("ppc64le")),
            ],
        }
    )
    refs = parse_manifest(manifest_list, DOCKER_MANIFEST_LIST, platform=host_platform("x86_64"))
    assert refs.manifests == ((_digest(manifest), DOCKER_MANIFEST),)


def test_manifest_kind_from_document_or_shape() -> None:
    config, layer = _fake_digest("config"), _fake_digest("layer")
    oci = {"schemaVersion": 2, "config": _descriptor("", config), "layers": [_descriptor("", layer), {"digest": layer}]}
    # No media type anywhere: the shape decides. Repeated layers are listed once.
    assert parse_manifest(_json(oci), "", platform=HOST).blobs == (config, layer)
    # An unknown descriptor media type: the document's own decides.
    assert parse_manifest(_json({**oci, "mediaType": OCI_MANIFEST}), "text/plain", platform=HOST).kind == "manifest"
    no_platform = {"schemaVersion": 2, "manifests": [_descriptor(OCI_MANIFEST, config)]}
    assert parse_manifest(_json(no_platform), OCI_INDEX, platform=HOST).manifests == ((config, OCI_MANIFEST),)
    nested = {"schemaVersion": 2, "manifests": [_descriptor(OCI_INDEX, layer, platform=_platform(HOST.architecture))]}
    assert parse_manifest(_json(nested), OCI_INDEX, platform=HOST).manifests == ((layer, OCI_INDEX),)


@pytest.mark.parametrize(
    ("data", "media_type", "message"),
    [
        (b"\xff\xfe", OCI_MANIFEST, "not JSON"),
        (b"[1, 2]", OCI_MANIFEST, "not a JSON object"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "", "not an image manifest"),
        (b'{"config": {"digest": "sha256:abc"}, "layers": []}', OCI_MANIFEST, "no valid digest"),
        (b'{"config": "x", "layers": []}', OCI_MANIFEST, "not a descriptor"),
        (b'{"layers": []}', OCI_MANIFEST, "config"),
        (b'{"config": {"digest": "sha256:' + b"0" * 64 + b'"}, "layers": {}}', OCI_MANIFEST, "layers is not a list"),
        (b'{"manifests": {}}', OCI_INDEX, "without a manifests list"),
        (b'{"manifests": [{"digest": "md5:x!"}]}', OCI_INDEX, "no valid digest"),
        (b'{"manifests": [{"digest": "sha256:' + b"0" * 64 + b'", "platform": 3}]}', OCI_INDEX, "platform"),
    ],
)
def test_malformed_manifests_are_rejected(data: bytes, media_type: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, media_type, platform=HOST)


def test_grpc_target_accepts_paths_and_unix_urls() -> None:
    assert grpc_target("/run/containerd/containerd.sock") == "unix:///run/containerd/containerd.sock"
    assert grpc_target("unix:///run/c.sock") == "unix:///run/c.sock"
    assert grpc_target("relative.sock") == "unix:relative.sock"
    with pytest.raises(ValueError, match="no socket path"):
        grpc_target("unix://")


def test_method_paths_are_containerds() -> None:
    services = {
        containerd_containers_pb2.DESCRIPTOR.services_by_name["Containers"].full_name,
        containerd_images_pb2.DESCRIPTOR.services_by_name["Images"].full_name,
        containerd_content_pb2.DESCRIPTOR.services_by_name["Content"].full_name,
        containerd_namespaces_pb2.DESCRIPTOR.services_by_name["Namespaces"].full_name,
        containerd_events_pb2.DESCRIPTOR.services_by_name["Events"].full_name,
    }
    assert services == {
        "containerd.services.containers.v1.Containers",
        "containerd.services.images.v1.Images",
        "containerd.services.content.v1.Content",
        "containerd.services.namespaces.v1.Namespaces",
        "containerd.services.events.v1.Events",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Our protos against the descriptors compiled into the installed containerd


_OUR_FILES = [
    containerd_types_pb2,
    containerd_containers_pb2,
    containerd_images_pb2,
    containerd_content_pb2,
    containerd_namespaces_pb2,
    containerd_events_pb2,
]


def _embedded_descriptors(binary: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The gzipped FileDescriptorProtos a Go protobuf binary registers, by file name (containerd's API only)."""
    data = binary.read_bytes()
    found: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    start = data.find(b"\x1f\x8b\x08")
    while start >= 0:
        with contextlib.suppress(zlib.error, ValueError):
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start : start + (1 << 20)])
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if proto.name.startswith("github.com/containerd/containerd/api/"):
                found[proto.name] = proto
        start = data.find(b"\x1f\x8b\x08", start + 3)
    return found


def _messages(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def collect(scope: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            collect(name, nested)

    for file in files:
        for message in file.message_type:
            collect(file.package, message)
    return found


def _methods(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, descriptor_pb2.MethodDescriptorProto]:
    return {
        f"/{file.package}.{service.name}/{method.name}": method
        for file in files
        for service in file.service
        for method in service.method
    }


def test_protos_match_the_installed_containerd() -> None:
    binary = find_binary("containerd")
    if binary is None:
        pytest.skip("containerd not installed")
    theirs = list(_embedded_descriptors(Path(binary)).values())
    if not theirs:
        pytest.skip(f"{binary} carries no containerd API descriptors")
    ours: list[descriptor_pb2.FileDescriptorProto] = []
    for module in _OUR_FILES:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        ours.append(proto)
    their_messages, problems = _messages(theirs), []
    for name, message in _messages(ours).items():
        other = their_messages.get(name)
        if other is None:
            problems.append(f"{name}: no such message in containerd")
            continue
        their_fields = {field.name: field for field in other.field}
        for field in message.field:
            match = their_fields.get(field.name)
            ours_shape = (field.number, field.type, field.label, field.type_name)
            theirs_shape = None if match is None else (match.number, match.type, match.label, match.type_name)
            if ours_shape != theirs_shape:
                problems.append(f"{name}.{field.name}: ours {ours_shape}, containerd's {theirs_shape}")
    their_methods = _methods(theirs)
    for path, method in _methods(ours).items():
        other_method = their_methods.get(path)
        shape = (method.input_type, method.output_type, method.client_streaming, method.server_streaming)
        other_shape = (
            None
            if other_method is None
            else (
                other_method.input_type,
                other_method.output_type,
                other_method.client_streaming,
                other_method.server_streaming,
            )
        )
        if shape != other_shape:
            problems.append(f"{path}: ours {shape}, containerd's {other_shape}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------------
# The client against a fake content store (absent blobs, nesting, corruption)


class _FakeImages(containerd_images_pb2_grpc.ImagesServicer):
    def __init__(self, images: dict[str, tuple[str, str]], seen: list[str]) -> None:
        self.images, self.seen = images, seen

    async def Get(
        self, request: containerd_images_pb2.GetImageRequest, context: Any
    ) -> containerd_images_pb2.GetImageResponse:
        self.seen.append(dict(context.invocation_metadata()).get(NAMESPACE_METADATA, ""))
        if request.name not in self.images:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"image {request.name!r}: not found")
        digest, media_type = self.images[request.name]
        target = containerd_types_pb2.Descriptor(media_type=media_type, digest=digest, size=1)
        return containerd_images_pb2.GetImageResponse(
            image=containerd_images_pb2.Image(name=request.name, target=target)
        )


class _FakeContent(containerd_content_pb2_grpc.ContentServicer):
    def __init__(self, blobs: dict[str, bytes], seen: list[str]) -> None:
        self.blobs, self.seen = blobs, seen

    async def Read(self, request: containerd_content_pb2.ReadContentRequest, context: Any) -> AsyncIterator[Any]:
        self.seen.append(dict(context.invocation_metadata()).get(NAMESPACE_METADATA, ""))
        if request.digest not in self.blobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        data = self.blobs[request.digest]
        half = len(data) // 2  # two messages, as containerd splits big blobs
        yield containerd_content_pb2.ReadContentResponse(offset=0, data=data[:half])
        yield containerd_content_pb2.ReadContentResponse(offset=half, data=data[half:])


@dataclass
class _FakeStore:
    address: str
    images: dict[str, tuple[str, str]]
    blobs: dict[str, bytes]
    namespaces_seen: list[str]

    def add(self, data: bytes) -> str:
        self.blobs[_digest(data)] = data
        return _digest(data)


@pytest.fixture
async def fake_store() -> AsyncIterator[_FakeStore]:
    directory = tempfile.mkdtemp(prefix="ctd-fake-")
    store = _FakeStore(address=os.path.join(directory, "c.sock"), images={}, blobs={}, namespaces_seen=[])
    server = aio.server()
    containerd_images_pb2_grpc.add_ImagesServicer_to_server(_FakeImages(store.images, store.namespaces_seen), server)
    containerd_content_pb2_grpc.add_ContentServicer_to_server(_FakeContent(store.blobs, store.namespaces_seen), server)
    server.add_insecure_port(f"unix://{store.address}")
    await server.start()
    try:
        yield store
    finally:
        await server.stop(None)
        with contextlib.suppress(OSError):
            os.unlink(store.address)
        os.rmdir(directory)


def _manifest(config: str, *layers: str) -> bytes:
    return _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer) for layer in layers],
        }
    )


async def test_index_children_count_only_when_present(fake_store: _FakeStore) -> None:
    config, layer = _fake_digest("config"), _fake_digest("layer")  # neither is in the store: still listed
    present = fake_store.add(_manifest(config, layer))
    absent = _fake_digest("absent manifest")
    foreign = fake_store.add(_manifest(_fake_digest("foreign config")))
    here = _platform(HOST.architecture, HOST.variant)
    inner = fake_store.add(
        _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [_descriptor(OCI_MANIFEST, present)]})
    )
    index = fake_store.add(
        _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    _descriptor(OCI_MANIFEST, absent, platform=here),
                    _descriptor(OCI_INDEX, inner, platform=here),
                    _descriptor(OCI_MANIFEST, foreign, platform=_platform(FOREIGN_ARCH)),
                ],
            }
        )
    )
    fake_store.images["example.com/app:1"] = (index, OCI_INDEX)
    fake_store.images["example.com/gone:1"] = (_fake_digest("gone"), OCI_MANIFEST)
    async with ContainerdClient(fake_store.address, timeout=5) as client:
        assert await client.image_digests("k8s.io", "example.com/app:1") == [index, inner, present, config, layer]
        # The image record names a target the content store lost: the target alone.
        assert await client.image_digests("k8s.io", "example.com/gone:1") == [_fake_digest("gone")]
    assert set(fake_store.namespaces_seen) == {"k8s.io"}


async def test_corrupt_manifest_is_a_containerd_error(fake_store: _FakeStore) -> None:
    broken = fake_store.add(b"{ not json")
    fake_store.images["example.com/broken:1"] = (broken, OCI_MANIFEST)
    mismatched = _fake_digest("something else")
    fake_store.blobs[mismatched] = _manifest(_fake_digest("config"))
    fake_store.images["example.com/mismatch:1"] = (mismatched, OCI_MANIFEST)
    async with ContainerdClient(f"unix://{fake_store.address}", timeout=5) as client:
        with pytest.raises(ContainerdError, match=r"example\.com/broken:1.*not JSON") as raised:
            await client.image_digests("default", "example.com/broken:1")
        assert not isinstance(raised.value, ImageNotFound)
        with pytest.raises(ContainerdError, match="does not match its digest"):
            await client.image_digests("default", "example.com/mismatch:1")
        with pytest.raises(ImageNotFound, match=r"example\.com/none:1"):
            await client.image_digests("default", "example.com/none:1")


# ---------------------------------------------------------------------------------------------------------------------
# Nothing listening


async def test_unreachable_socket_is_a_containerd_error() -> None:
    directory = tempfile.mkdtemp(prefix="ctd-dead-")
    stale = os.path.join(directory, "stale.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(stale)  # the file stays, nobody accepts
    listener.close()
    try:
        for address in (stale, os.path.join(directory, "missing.sock")):
            async with ContainerdClient(address, timeout=5) as client:
                with pytest.raises(ContainerdError, match="unreachable") as raised:
                    await client.containers()
                assert "\n" not in str(raised.value)
                with pytest.raises(ContainerdError, match="unreachable"):
                    await client.image_digests("default", "example.com/app:1")
                with pytest.raises(ContainerdError, match="unreachable"):
                    await anext(aiter(client.events()))
    finally:
        os.unlink(stale)
        os.rmdir(directory)


# ---------------------------------------------------------------------------------------------------------------------
# A real containerd and registry


@dataclass
class Env:
    containerd: Containerd
    registry: Registry
    busybox: OciImage
    ref: str  # busybox, pulled into "default"
    index_ref: str
    index_digest: str
    foreign_digest: str
    docker_ref: str
    docker_list_digest: str
    docker_manifest_digest: str


def _put_manifest(registry: Registry, repository: str, reference: str, body: bytes, media_type: str) -> str:
    response = http_request(
        "PUT", f"{registry.url}/v2/{repository}/manifests/{reference}", body=body, headers={"Content-Type": media_type}
    )
    assert response.status == 201, response.data[:500]
    return sha256_digest(body)


def _push_index_and_docker_images(registry: Registry, busybox: OciImage) -> dict[str, str]:
    """An OCI index (this platform's busybox + a foreign one) and a Docker manifest list of a Docker manifest."""
    repository = "runtime/multi"
    foreign = filler_image("foreign", [2048], seed=7)
    push_image(registry.url, repository, "host", busybox)
    push_image(registry.url, repository, "foreign", foreign)
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                _descriptor(OCI_MANIFEST, busybox.manifest, platform=_platform(HOST.architecture, HOST.variant)),
                _descriptor(OCI_MANIFEST, foreign.manifest, platform=_platform(FOREIGN_ARCH)),
            ],
        }
    )
    index_digest = _put_manifest(registry, repository, "index", index, OCI_INDEX)
    docker_manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {**busybox.config.descriptor(), "mediaType": DOCKER_CONFIG},
            "layers": [{**layer.descriptor(), "mediaType": DOCKER_LAYER} for layer in busybox.layers],
        }
    )
    docker_manifest_digest = _put_manifest(registry, repository, "docker-single", docker_manifest, DOCKER_MANIFEST)
    manifest_list = _json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [_descriptor(DOCKER_MANIFEST, docker_manifest, platform=_platform(HOST.architecture))],
        }
    )
    list_digest = _put_manifest(registry, repository, "docker", manifest_list, DOCKER_MANIFEST_LIST)
    return {
        "index_ref": f"{registry.host}/{repository}:index",
        "index_digest": index_digest,
        "foreign_digest": foreign.manifest_digest,
        "docker_ref": f"{registry.host}/{repository}:docker",
        "docker_list_digest": list_digest,
        "docker_manifest_digest": docker_manifest_digest,
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    reason = containerd_skip_reason() or registry_skip_reason() or busybox_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("containerd-client")
    busybox = busybox_image()
    with running_registry(workdir / "registry") as registry, running_containerd(workdir / "containerd") as containerd:
        push_image(registry.url, "runtime/busybox", "1", busybox)
        ref = f"{registry.host}/runtime/busybox:1"
        containerd.pull(ref)
        yield Env(containerd, registry, busybox, ref, **_push_index_and_docker_images(registry, busybox))


@pytest.fixture
async def client(env: Env) -> AsyncIterator[ContainerdClient]:
    async with ContainerdClient(env.containerd.address, timeout=10) as found:
        yield found


def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking ctr helper off the loop (the event stream must keep reading meanwhile)."""
    return asyncio.to_thread(function, *args, **kwargs)


async def test_containers_lists_created_and_running_in_every_namespace(env: Env, client: ContainerdClient) -> None:
    other = "dfdaemon-b"
    await _call(env.containerd.pull, env.ref, other)
    await _call(env.containerd.create, env.ref, "created-1")
    running = await _call(env.containerd.run, env.ref, "running-1", other)
    try:
        assert other in await client.namespaces()
        listed = await client.containers()
        assert RuntimeContainer("default", "created-1", env.ref) in listed
        assert RuntimeContainer(other, "running-1", env.ref) in listed
        if running:
            tasks = (await _call(env.containerd.ctr, "tasks", "ls", namespace=other)).stdout
            assert "running-1" in tasks and "RUNNING" in tasks
    finally:
        await _call(env.containerd.stop_and_remove, "created-1")
        await _call(env.containerd.stop_and_remove, "running-1", other)
    listed = await client.containers()
    assert not [c for c in listed if c.id in ("created-1", "running-1")]


async def test_image_digests_are_the_pushed_blobs(env: Env, client: ContainerdClient) -> None:
    expected = [env.busybox.manifest_digest, *(blob.digest for blob in env.busybox.blobs)]
    assert await client.image_digests("default", env.ref) == expected


async def test_image_digests_of_an_index_follow_this_platform(env: Env, client: ContainerdClient) -> None:
    await _call(env.containerd.pull, env.index_ref)
    digests = await client.image_digests("default", env.index_ref)
    assert digests == [env.index_digest, env.busybox.manifest_digest, *(b.digest for b in env.busybox.blobs)]
    assert env.foreign_digest not in digests


async def test_image_digests_of_docker_media_types(env: Env, client: ContainerdClient) -> None:
    await _call(env.containerd.pull, env.docker_ref)
    digests = await client.image_digests("default", env.docker_ref)
    blobs = [b.digest for b in env.busybox.blobs]
    assert digests == [env.docker_list_digest, env.docker_manifest_digest, *blobs]


async def test_unknown_image_is_image_not_found(env: Env, client: ContainerdClient) -> None:
    with pytest.raises(ImageNotFound):
        await client.image_digests("default", f"{env.registry.host}/runtime/none:1")
    with pytest.raises(ImageNotFound):
        await client.image_digests("no-such-namespace", env.ref)
    with pytest.raises(ImageNotFound):
        await client.image_digests("default", "")


async def test_removed_image_is_image_not_found(env: Env, client: ContainerdClient) -> None:
    namespace = "dfdaemon-removal"
    await _call(env.containerd.pull, env.ref, namespace)
    assert await client.image_digests(namespace, env.ref)
    await _call(env.containerd.remove_image, env.ref, namespace)
    with pytest.raises(ImageNotFound):
        await client.image_digests(namespace, env.ref)


async def _collect(events: AsyncIterator[RuntimeEvent], into: asyncio.Queue[RuntimeEvent | Exception]) -> None:
    try:
        async for event in events:
            await into.put(event)
    except ContainerdError as exc:
        await into.put(exc)


async def _wait_event(queue: asyncio.Queue[RuntimeEvent | Exception], wanted: RuntimeEvent) -> list[RuntimeEvent]:
    """Events up to and including ``wanted``; fails on a stream error or after EVENT_TIMEOUT."""
    seen: list[RuntimeEvent] = []
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            seen.append(item)
            if item == wanted:
                return seen


async def _subscribed(containerd: Containerd, queue: asyncio.Queue[RuntimeEvent | Exception], ref: str) -> None:
    """Tag an image until its /images/create event arrives: from then on the subscription is live."""
    async with asyncio.timeout(EVENT_TIMEOUT):
        for attempt in range(1000):
            await _call(containerd.ctr, "images", "tag", "--force", ref, f"probe/{attempt}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await _wait_event(queue, RuntimeEvent("default", "/images/create"))
                    return


async def test_events_report_container_and_task_changes(env: Env, client: ContainerdClient) -> None:
    namespace = "dfdaemon-events"
    await _call(env.containerd.pull, env.ref, namespace)
    queue: asyncio.Queue[RuntimeEvent | Exception] = asyncio.Queue()
    collector = asyncio.create_task(_collect(client.events(), queue))
    try:
        await _subscribed(env.containerd, queue, env.ref)
        await _call(env.containerd.create, env.ref, "watched-1", namespace)
        await _wait_event(queue, RuntimeEvent(namespace, "/containers/create"))
        running = await _call(env.containerd.run, env.ref, "watched-2", namespace)
        if running:
            await _wait_event(queue, RuntimeEvent(namespace, "/tasks/start"))
        await _call(env.containerd.stop_and_remove, "watched-1", namespace)
        await _call(env.containerd.stop_and_remove, "watched-2", namespace)
        seen = await _wait_event(queue, RuntimeEvent(namespace, "/containers/delete"))
        seen += await _wait_event(queue, RuntimeEvent(namespace, "/containers/delete"))
        topics = {event.topic for event in seen}
        assert all(topic.startswith(("/containers/", "/tasks/", "/images/")) for topic in topics)
        if running:
            assert {"/tasks/exit", "/tasks/delete"} <= topics
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector


async def test_event_stream_breaks_when_containerd_dies_and_nothing_outlives_it(env: Env, tmp_path: Path) -> None:
    with running_containerd(tmp_path) as containerd:
        await _call(containerd.pull, env.ref)
        running = await _call(containerd.run, env.ref, "left-running")
        async with ContainerdClient(containerd.address, timeout=5) as client:
            queue: asyncio.Queue[RuntimeEvent | Exception] = asyncio.Queue()
            collector = asyncio.create_task(_collect(client.events(), queue))
            await _subscribed(containerd, queue, env.ref)
            containerd.process.kill()  # not a clean shutdown: the task and its shim stay behind
            await _call(containerd.process.wait)
            async with asyncio.timeout(EVENT_TIMEOUT):
                while not isinstance(item := await queue.get(), Exception):
                    pass
            await collector
            assert isinstance(item, ContainerdError)
            assert "\n" not in str(item)
            with pytest.raises(ContainerdError, match="unreachable"):
                await client.namespaces()
        if running:
            assert leftover_shims(containerd.address)
    assert not leftover_shims(containerd.address)


class _MirrorLog(ThreadingHTTPServer):
    daemon_threads = True
    upstream: str
    seen: list[tuple[str, str, dict[str, str]]]


class _LoggingMirror(BaseHTTPRequestHandler):
    """Records each request, then answers it from the registry (the ns parameter dropped)."""

    protocol_version = "HTTP/1.1"
    server: _MirrorLog

    def _relay(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        path = urllib.parse.urlsplit(self.path).path
        forwarded = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        reply = http_request(self.command, self.server.upstream + path, headers=forwarded)
        self.send_response(reply.status)
        for name in ("content-type", "docker-content-digest", "content-range"):
            if name in reply.headers:
                self.send_header(name, reply.headers[name])
        length = reply.headers.get("content-length", "0") if self.command == "HEAD" else str(len(reply.data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.data)

    do_GET = do_HEAD = _relay

    def log_message(self, format: str, *args: Any) -> None:
        return


async def test_pulls_go_through_the_mirror_with_the_registry_as_ns(env: Env) -> None:
    """What containerd 1.6 asks a hosts.toml mirror: /v2/<repo>/... with ?ns=<registry host>, typed Accept."""
    mirror = _MirrorLog(("127.0.0.1", 0), _LoggingMirror)
    mirror.upstream, mirror.seen = env.registry.url, []
    thread = threading.Thread(target=mirror.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    image = filler_image("mirrored", [4096, 8192], seed=11)  # blobs this containerd has not seen yet
    await _call(push_image, env.registry.url, "runtime/mirrored", "1", image)
    try:
        env.containerd.set_mirror(env.registry.host, f"http://127.0.0.1:{mirror.server_address[1]}")
        await _call(env.containerd.pull, f"{env.registry.host}/runtime/mirrored:1")
    finally:
        env.containerd.set_mirror(env.registry.host, None)
        mirror.shutdown()
        mirror.server_close()
        thread.join(5)
    ns = "?ns=" + urllib.parse.quote(env.registry.host, safe="")
    base = "/v2/runtime/mirrored"
    assert mirror.seen and all(path.endswith(ns) for _, path, _ in mirror.seen)
    requests = {(method, path): headers for method, path, headers in mirror.seen}
    head = requests[("HEAD", f"{base}/manifests/1{ns}")]
    assert "application/vnd.oci.image.index.v1+json" in head["Accept"]
    manifest = requests[("GET", f"{base}/manifests/{image.manifest_digest}{ns}")]
    assert manifest["Accept"].startswith(OCI_MANIFEST)
    for blob in image.blobs:
        assert requests[("GET", f"{base}/blobs/{blob.digest}{ns}")]["Accept"].startswith(blob.media_type)
    assert not [headers for headers in requests.values() if "Range" in headers]


def _listening_tcp_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def test_containerd_listens_on_no_tcp_port(env: Env) -> None:
    pid = env.containerd.process.pid
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
    assert not sockets & _listening_tcp_inodes()


def test_support_hosts_toml_and_error_line() -> None:
    text = hosts_toml("127.0.0.1:5000", "http://127.0.0.1:4001/")
    assert text.splitlines()[0] == 'server = "http://127.0.0.1:5000"'
    assert '[host."http://127.0.0.1:4001"]' in text
    assert 'capabilities = ["pull", "resolve"]' in text
    log = (
        'time="t" level=info msg="starting containerd"\n'
        'time="t" level=fatal msg="failed to create listener" error="listen unix /x: bind: permission denied"\n'
    )
    assert error_line(log) == "failed to create listener: listen unix /x: bind: permission denied"
    assert error_line("") == "(no output)"
