"""A blob the mirror's cache holds whole: served from its file (sendfile), any range of it, and never once it rotted."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import urllib3

from dfdaemon import ids
from tests.registry_support import (
    Blob,
    Registry,
    filler_image,
    http_request,
    push_image,
    registry_skip_reason,
    running_registry,
)
from tests.support import DaemonProcess, running_daemon

pytestmark = pytest.mark.skipif(registry_skip_reason() is not None, reason=str(registry_skip_reason()))

MIB = 1024 * 1024
REPOSITORY = "library/cached"


@dataclass
class Cached:
    registry: Registry
    daemon: DaemonProcess
    layer: Blob

    @property
    def path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/{self.layer.digest}"

    def get(self, headers: dict[str, str] | None = None, *, stream: bool = False) -> urllib3.BaseHTTPResponse:
        query = urlencode({"ns": self.registry.host})
        url = f"http://127.0.0.1:{self.daemon.proxy_port}{self.path}?{query}"
        return http_request("GET", url, headers=headers, stream=stream, timeout=60)

    def content_file(self) -> Path:
        """The blob's task file: named by the blob's URL at the registry (``enableTaskIDBasedBlobDigest`` unset)."""
        task_id = hashlib.sha256(f"http://{self.registry.host}{self.path}STANDARD".encode()).hexdigest()
        assert task_id == ids.task_id(f"http://{self.registry.host}{self.path}")
        return self.daemon.storage_dir / "content" / "tasks" / task_id[:3] / task_id


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[Cached]:
    """A 9 MB layer (three 4 MiB pieces) pulled once through the mirror, so the daemon's cache holds it whole."""
    image = filler_image("cached", [9_000_000], seed=31)
    with running_registry(tmp_path / "registry") as registry:
        push_image(registry.url, REPOSITORY, "v1", image)
        config = {"proxy": {"enable": True, "registryMirror": {"insecureRegistries": [registry.host]}}}
        with running_daemon(tmp_path / "daemon", config) as daemon:
            blob = Cached(registry, daemon, image.layers[0])
            first = blob.get()
            assert first.status == 200 and first.data == blob.layer.data
            yield blob


def test_any_range_of_a_cached_blob_comes_from_the_cache_byte_exact(cached: Cached) -> None:
    data, size = cached.layer.data, cached.layer.size
    before = cached.registry.blob_bytes_served()
    whole = cached.get()
    assert whole.status == 200 and whole.data == data
    assert whole.headers["docker-content-digest"] == cached.layer.digest
    spans = {
        "bytes=0-0": (0, 0),
        "bytes=4194303-4194304": (4194303, 4194304),  # the last byte of a piece and the first of the next
        "bytes=1000-8400000": (1000, 8400000),  # three pieces, cut at both ends
        f"bytes={size - 70_000}-": (size - 70_000, size - 1),  # more than the held tail, within the last piece
        "bytes=-5": (size - 5, size - 1),
        f"bytes=-{size + 10}": (0, size - 1),  # a suffix longer than the blob is the whole blob
    }
    for header, (first, last) in spans.items():
        got = cached.get({"Range": header})
        assert got.status == 206, header
        assert got.data == data[first : last + 1], header
        assert got.headers["content-range"] == f"bytes {first}-{last}/{size}", header
        assert int(got.headers["content-length"]) == last - first + 1, header
    unsatisfiable = cached.get({"Range": f"bytes={size}-"})
    assert unsatisfiable.status == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    assert cached.registry.blob_bytes_served() == before, "a cached blob's bytes came from the registry"


def test_a_cached_blob_whose_bytes_rotted_never_reaches_a_client_whole_and_is_fetched_again(cached: Cached) -> None:
    data, size = cached.layer.data, cached.layer.size
    content = cached.content_file()
    with content.open("r+b") as f:  # one byte of the first piece changes on disk
        f.seek(1234)
        f.write(bytes([data[1234] ^ 0xFF]))
    received = bytearray()
    response = cached.get(stream=True)
    assert response.status == 200
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for chunk in response.stream(64 * 1024, decode_content=False):
            received += chunk
    response.release_conn()
    assert len(received) < size

    before = cached.registry.blob_bytes_served()
    again = cached.get()
    assert again.status == 200
    assert "sha256:" + hashlib.sha256(again.data).hexdigest() == cached.layer.digest
    assert cached.registry.blob_bytes_served() - before == size  # the rotten copy was dropped, not served again
    assert content.read_bytes() == data
    log = cached.daemon.log()
    assert "failed its CRC check" in log
    assert "Traceback" not in log and "Error handling request" not in log
