"""The real-registry test infrastructure: images built in memory, pushed to and pulled from a real registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_support import (
    OCI_MANIFEST,
    OciImage,
    Registry,
    RegistryError,
    TokenSigner,
    busybox_image,
    busybox_skip_reason,
    fetch_token,
    filler_image,
    http_request,
    push_image,
    registry_skip_reason,
    running_registry,
)


def _require_registry() -> None:
    reason = registry_skip_reason()
    if reason is not None:
        pytest.skip(reason)


def _require_busybox() -> None:
    reason = busybox_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    _require_registry()
    with running_registry(tmp_path / "registry") as running:
        yield running


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[Registry]:
    _require_registry()
    with running_registry(tmp_path / "registry", token_auth=True) as running:
        yield running


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _pull_and_check(registry: Registry, repository: str, tag: str, image: OciImage, auth: dict[str, str]) -> int:
    """Fetch the manifest and every blob, check their digests, and return the blob bytes fetched."""
    url = f"{registry.url}/v2/{repository}/manifests/{tag}"
    manifest = http_request("GET", url, headers={**auth, "Accept": OCI_MANIFEST})
    assert manifest.status == 200, manifest.data
    assert manifest.headers["Content-Type"] == OCI_MANIFEST
    assert _sha256(manifest.data) == image.manifest_digest
    assert manifest.headers["Docker-Content-Digest"] == image.manifest_digest
    document = json.loads(manifest.data)
    assert [layer["digest"] for layer in document["layers"]] == [layer.digest for layer in image.layers]
    fetched = 0
    for blob in image.blobs:
        response = http_request("GET", f"{registry.url}/v2/{repository}/blobs/{blob.digest}", headers=auth)
        assert response.status == 200, response.data[:500]
        assert _sha256(response.data) == blob.digest
        assert len(response.data) == blob.size
        fetched += len(response.data)
    return fetched


def test_push_then_pull_gives_the_same_digests_and_the_log_counts_exact_bytes(registry: Registry) -> None:
    _require_busybox()
    busybox = busybox_image()
    filler = filler_image("filler", [300_000, 70_000], seed=7)
    push_image(registry.url, "library/busybox", "latest", busybox)
    push_image(registry.url, "test/filler", "v1", filler)
    push_image(registry.url, "test/filler", "v1", filler)  # blobs already there: skipped, manifest re-put
    assert registry.blob_bytes_served() == 0  # uploads and HEADs are not served blob bytes
    assert registry.blob_requests() == []

    layer = filler.layers[0]
    one = http_request("GET", f"{registry.url}/v2/test/filler/blobs/{layer.digest}")
    assert one.status == 200
    assert registry.blob_bytes_served() == layer.size
    assert registry.blob_requests() == [f"/v2/test/filler/blobs/{layer.digest}"]

    fetched = _pull_and_check(registry, "library/busybox", "latest", busybox, {})
    fetched += _pull_and_check(registry, "test/filler", "v1", filler, {})

    assert registry.blob_bytes_served() == layer.size + fetched
    assert len(registry.blob_requests()) == 1 + len(busybox.blobs) + len(filler.blobs)


def test_missing_tag_is_404_with_the_registry_json_error(registry: Registry) -> None:
    push_image(registry.url, "test/filler", "v1", filler_image("filler", [10_000], seed=1))
    response = http_request("GET", f"{registry.url}/v2/test/filler/manifests/nope", headers={"Accept": OCI_MANIFEST})
    assert response.status == 404
    errors = response.json()["errors"]
    assert errors[0]["code"] == "MANIFEST_UNKNOWN"
    missing_blob = http_request("GET", f"{registry.url}/v2/test/filler/blobs/sha256:{'0' * 64}")
    assert missing_blob.status == 404
    assert missing_blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert registry.blob_bytes_served() == 0  # an error body is not blob data
    assert registry.blob_requests() == [f"/v2/test/filler/blobs/sha256:{'0' * 64}"]


def test_token_auth_challenges_anonymous_requests_and_accepts_fetched_tokens(token_registry: Registry) -> None:
    registry = token_registry
    assert registry.token_realm is not None
    image = filler_image("private", [50_000], seed=3)
    with pytest.raises(RegistryError, match="401"):
        push_image(registry.url, "team/app", "v1", image)
    push_token = fetch_token(registry, "repository:team/app:pull,push")
    push_image(registry.url, "team/app", "v1", image, headers={"Authorization": f"Bearer {push_token}"})

    anonymous = http_request("GET", f"{registry.url}/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert anonymous.status == 401
    challenge = anonymous.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{registry.token_realm}"')
    assert f'service="{registry.token_service}"' in challenge
    assert 'scope="repository:team/app:pull"' in challenge

    pull_token = fetch_token(registry, "repository:team/app:pull")
    pull = {"Authorization": f"Bearer {pull_token}"}
    fetched = _pull_and_check(registry, "team/app", "v1", image, pull)
    # A pull-only token does not allow pushing.
    denied = http_request("POST", f"{registry.url}/v2/team/app/blobs/uploads/", headers=pull)
    assert denied.status == 401
    # A token for another repository does not open this one.
    other = fetch_token(registry, "repository:team/other:pull")
    manifest_url = f"{registry.url}/v2/team/app/manifests/v1"
    wrong = http_request("GET", manifest_url, headers={"Authorization": f"Bearer {other}"})
    assert wrong.status == 401
    # A token signed by a key the registry does not trust is refused.
    pull_app = [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    forged = TokenSigner.generate().sign("anonymous", pull_app)
    refused = http_request("GET", manifest_url, headers={"Authorization": f"Bearer {forged}"})
    assert refused.status == 401

    assert any("scope=repository" in request for request in registry.token_requests)
    assert registry.blob_bytes_served() == fetched


def test_images_are_deterministic_and_well_formed() -> None:
    first = filler_image("a", [100_000, 1_000_000], seed=11)
    again = filler_image("a", [100_000, 1_000_000], seed=11)
    assert first.manifest_digest == again.manifest_digest
    assert [blob.digest for blob in first.blobs] == [blob.digest for blob in again.blobs]
    renamed = filler_image("b", [100_000, 1_000_000], seed=11)
    assert [layer.digest for layer in renamed.layers] == [layer.digest for layer in first.layers]
    assert renamed.manifest_digest != first.manifest_digest
    reseeded = filler_image("a", [100_000, 1_000_000], seed=12)
    assert reseeded.layers[0].digest != first.layers[0].digest
    for layer, size in zip(first.layers, [100_000, 1_000_000], strict=True):
        assert size - 600 <= layer.size <= size

    config = json.loads(first.config.data)
    diff_ids = [_sha256(gzip.decompress(layer.data)) for layer in first.layers]
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    assert config["os"] == "linux"
    manifest = json.loads(first.manifest)
    assert manifest["mediaType"] == first.media_type == OCI_MANIFEST
    assert manifest["config"] == first.config.descriptor()
    assert manifest["layers"] == [layer.descriptor() for layer in first.layers]

    _require_busybox()
    assert busybox_image().manifest_digest == busybox_image().manifest_digest


def test_busybox_layer_runs(tmp_path: Path) -> None:
    _require_busybox()
    image = busybox_image()
    assert len(image.layers) == 1
    config = json.loads(image.config.data)
    assert config["config"]["Cmd"] == ["/bin/sleep", "3600"]
    assert any(env.startswith("PATH=") for env in config["config"]["Env"])
    raw = gzip.decompress(image.layers[0].data)
    assert config["rootfs"]["diff_ids"] == [_sha256(raw)]

    root = tmp_path / "rootfs"
    with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
        members = {member.name: member for member in archive.getmembers()}
        assert members["bin/busybox"].mode == 0o755
        for applet in ("sh", "sleep", "ls", "cat", "true"):
            assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
        archive.extractall(root, filter="data")
    assert subprocess.run([root / "bin" / "busybox", "true"], timeout=10).returncode == 0
    # The applet symlinks work too (busybox picks the applet from argv[0]).
    listing = subprocess.run([root / "bin" / "ls", root / "bin"], capture_output=True, text=True, timeout=10)
    assert listing.returncode == 0
    assert "busybox" in listing.stdout.split()
