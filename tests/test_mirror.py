"""The registry mirror against a real distribution registry, the daemon running as its own process.

Blob tasks are named as upstream names them by default (``enableTaskIDBasedBlobDigest: false``): from the blob's
URL at the registry. ``url_task_id`` derives that id by hand from the formula every peer uses, so a mirror naming
blobs any other way (say by their digest, as it once did) fails here.
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfdaemon import ids
from tests.registry_support import (
    OCI_MANIFEST,
    OciImage,
    Registry,
    fetch_token,
    filler_image,
    http_request,
    push_image,
    registry_skip_reason,
    running_registry,
)
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, dfctl_json, dfget, running_daemon, running_origin

pytestmark = pytest.mark.skipif(registry_skip_reason() is not None, reason=str(registry_skip_reason()))

MIB = 1024 * 1024
CHUNK = 64 * 1024  # bytes a streaming client reads at a time


def url_task_id(url: str) -> str:
    """A task id as a Rust peer computes it for a URL with no query, tag, application or piece length."""
    return hashlib.sha256(url.encode() + b"STANDARD").hexdigest()


def task_file(daemon: DaemonProcess, task_id: str) -> Path:
    return daemon.storage_dir / "content" / "tasks" / task_id[:3] / task_id


@dataclass
class Mirror:
    registry: Registry
    daemon: DaemonProcess
    image: OciImage

    def url(self, path: str, **query: str) -> str:
        return f"http://127.0.0.1:{self.daemon.proxy_port}{path}" + (f"?{urlencode(query)}" if query else "")

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> urllib3.BaseHTTPResponse:
        return http_request(method, self.url(path, ns=self.registry.host), headers=headers)

    def task_id(self, repository: str, digest: str) -> str:
        """The task of a blob pulled through the mirror: named by its URL at the registry."""
        return url_task_id(f"http://{self.registry.host}/v2/{repository}/blobs/{digest}")


def _mirror_config(registry: Registry) -> dict[str, object]:
    return {"proxy": {"enable": True, "registryMirror": {"insecureRegistries": [registry.host]}}}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    work = tmp_path_factory.mktemp("mirror")
    # Two layers: 6 MB spans two 4 MiB pieces, so in-order streaming across pieces is exercised.
    image = filler_image("mirror", [6_000_000, 300_000], seed=7)
    with running_registry(work / "registry") as registry:
        push_image(registry.url, "library/filler", "v1", image)
        with running_daemon(work / "daemon", _mirror_config(registry)) as daemon:
            yield Mirror(registry, daemon, image)


def test_a_blob_comes_through_the_p2p_path_verified_and_is_then_served_from_the_cache(mirror: Mirror) -> None:
    # An image of its own: the module's blobs may be cached already, by whichever test ran before.
    image = filler_image("first-fetch", [5_000_000], seed=21)  # two 4 MiB pieces
    push_image(mirror.registry.url, "library/first-fetch", "v1", image)
    layer = image.layers[0]
    path = f"/v2/library/first-fetch/blobs/{layer.digest}"
    before = mirror.registry.blob_bytes_served()

    first = mirror.get(path)
    assert first.status == 200
    assert "sha256:" + hashlib.sha256(first.data).hexdigest() == layer.digest
    assert first.headers["docker-content-digest"] == layer.digest
    assert int(first.headers["content-length"]) == layer.size
    # The daemon learns the length with a HEAD, then fetches the pieces: the registry serves the blob once.
    served = mirror.registry.blob_bytes_served() - before
    assert served == layer.size

    again = mirror.get(path)
    assert again.data == first.data
    assert mirror.registry.blob_bytes_served() - before == served, "a cached blob went to the registry again"
    task_id = mirror.task_id("library/first-fetch", layer.digest)
    assert task_id == ids.task_id(f"http://{mirror.registry.host}/v2/library/first-fetch/blobs/{layer.digest}")
    assert task_file(mirror.daemon, task_id).read_bytes() == layer.data
    assert not task_file(mirror.daemon, layer.digest[7:]).exists()
    tasks = {task["task_id"]: task["state"] for task in dfctl_json(mirror.daemon, "task", "ls")["tasks"]}
    assert tasks[task_id] == "finished"


def test_ranges_of_a_blob_are_answered_with_206(mirror: Mirror) -> None:
    layer = mirror.image.layers[0]
    path = f"/v2/library/filler/blobs/{layer.digest}"
    middle = mirror.get(path, {"Range": "bytes=4194000-4194999"})  # crosses the first piece boundary
    assert middle.status == 206
    assert middle.data == layer.data[4194000:4195000]
    assert middle.headers["content-range"] == f"bytes 4194000-4194999/{layer.size}"
    tail = mirror.get(path, {"Range": "bytes=-10"})
    assert (tail.status, tail.data) == (206, layer.data[-10:])
    past = mirror.get(path, {"Range": f"bytes={layer.size}-"})
    assert past.status == 416
    assert past.headers["content-range"] == f"bytes */{layer.size}"


def test_head_of_a_cached_blob_is_answered_without_the_registry(mirror: Mirror) -> None:
    layer = mirror.image.layers[0]
    mirror.get(f"/v2/library/filler/blobs/{layer.digest}")
    seen = len(mirror.registry.request_entries())
    head = mirror.get(f"/v2/library/filler/blobs/{layer.digest}", method="HEAD")
    assert head.status == 200
    assert int(head.headers["content-length"]) == layer.size
    assert head.headers["docker-content-digest"] == layer.digest
    # request_entries leaves its own log-sync probes out: any new entry would be the HEAD reaching the registry.
    assert len(mirror.registry.request_entries()) == seen


def test_manifests_are_passed_through_with_the_registrys_headers(mirror: Mirror) -> None:
    accept = {"Accept": OCI_MANIFEST}
    answer = mirror.get("/v2/library/filler/manifests/v1", accept)
    assert answer.status == 200
    assert answer.data == mirror.image.manifest
    assert answer.headers["docker-content-digest"] == mirror.image.manifest_digest
    assert answer.headers["content-type"] == OCI_MANIFEST
    head = mirror.get("/v2/library/filler/manifests/v1", accept, method="HEAD")
    assert head.status == 200
    assert int(head.headers["content-length"]) == len(mirror.image.manifest)
    assert head.data == b""


def test_the_registrys_404_reaches_the_client_as_the_registry_sent_it(mirror: Mirror) -> None:
    direct = http_request("GET", f"{mirror.registry.url}/v2/library/filler/manifests/no-such-tag")
    through = mirror.get("/v2/library/filler/manifests/no-such-tag")
    assert through.status == direct.status == 404
    assert through.json() == direct.json()
    assert through.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    missing_blob = "sha256:" + "0" * 64
    blob = mirror.get(f"/v2/library/filler/blobs/{missing_blob}")
    assert blob.status == 404
    assert blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_requests_the_mirror_cannot_serve_get_a_registry_style_error(mirror: Mirror) -> None:
    bad_ns = http_request("GET", mirror.url("/v2/library/filler/manifests/v1", ns="evil.example/path"))
    assert bad_ns.status == 400
    assert "not a registry host" in bad_ns.json()["errors"][0]["message"]
    elsewhere = http_request("GET", mirror.url("/admin"))
    assert elsewhere.status == 404


def test_a_token_challenge_passes_through_and_the_token_reaches_the_registry(tmp_path: Path) -> None:
    image = filler_image("private", [200_000], seed=11)
    with running_registry(tmp_path / "registry", token_auth=True) as registry:
        token = fetch_token(registry, "repository:private/app:pull,push")
        push_image(registry.url, "private/app", "v1", image, headers={"Authorization": f"Bearer {token}"})
        with running_daemon(tmp_path / "daemon", _mirror_config(registry)) as daemon:
            mirror = Mirror(registry, daemon, image)
            direct = http_request("GET", f"{registry.url}/v2/private/app/manifests/v1")
            challenged = mirror.get("/v2/private/app/manifests/v1")
            assert challenged.status == direct.status == 401
            assert challenged.headers["www-authenticate"] == direct.headers["www-authenticate"]
            assert challenged.headers["www-authenticate"].startswith(f'Bearer realm="{registry.token_realm}"')

            blob_path = f"/v2/private/app/blobs/{image.layers[0].digest}"
            refused = mirror.get(blob_path)
            assert refused.status == 401
            assert refused.headers["www-authenticate"].startswith("Bearer ")

            authorized = {"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST}
            assert mirror.get("/v2/private/app/manifests/v1", authorized).data == image.manifest
            layer = mirror.get(blob_path, authorized)
            assert layer.status == 200
            assert layer.data == image.layers[0].data


def test_a_cached_blob_is_served_while_the_registry_is_down(tmp_path: Path) -> None:
    image = filler_image("offline", [500_000], seed=12)
    with running_registry(tmp_path / "registry") as registry:
        push_image(registry.url, "library/offline", "v1", image)
        with running_daemon(tmp_path / "daemon", _mirror_config(registry)) as daemon:
            mirror = Mirror(registry, daemon, image)
            path = f"/v2/library/offline/blobs/{image.layers[0].digest}"
            assert mirror.get(path).status == 200
            registry.stop()
            offline = mirror.get(path)
            assert offline.status == 200
            assert offline.data == image.layers[0].data
            manifest = mirror.get("/v2/library/offline/manifests/v1")
            assert manifest.status == 502
            assert manifest.json()["errors"][0]["code"] == "UNAVAILABLE"


@contextmanager
def mirror_of_origin_blob(
    tmp_path: Path,
    content: bytes,
    digest: str,
    *,
    rate: int | None = None,
    repositories: tuple[str, ...] = ("r",),
    by_digest: bool | None = None,
) -> Iterator[Blob]:
    """A daemon whose mirror fronts the loopback origin, which serves ``content`` as blob ``digest`` of each of
    ``repositories`` (the Blob is the first one's); ``by_digest`` sets ``enableTaskIDBasedBlobDigest``.

    With ``rate`` the origin sends at most that many bytes a second and the daemon fetches one piece at a time.
    """
    for repository in repositories:
        blobs = tmp_path / "files" / "v2" / repository / "blobs"
        blobs.mkdir(parents=True)
        (blobs / digest).write_bytes(content)
    path = f"v2/{repositories[0]}/blobs/{digest}"
    with running_origin(tmp_path / "files") as origin:
        registry_mirror: dict[str, Any] = {"insecureRegistries": [origin.address]}
        if by_digest is not None:
            registry_mirror["enableTaskIDBasedBlobDigest"] = by_digest
        config: dict[str, Any] = {"proxy": {"enable": True, "registryMirror": registry_mirror}}
        if rate is not None:
            origin.fault(path, rate=rate)
            config["download"] = {"concurrentPieceCount": 1}
        with running_daemon(tmp_path / "daemon", config) as daemon:
            url = f"http://127.0.0.1:{daemon.proxy_port}/{path}?ns={origin.address}"
            task_id = digest[7:] if by_digest else url_task_id(f"http://{origin.address}/{path}")
            yield Blob(daemon, url, digest, task_id, origin, "/" + path)


@dataclass
class Blob:
    daemon: DaemonProcess
    url: str  # the blob through the mirror
    digest: str
    task_id: str  # as the mirror names it, computed here
    origin: OriginProcess
    path: str  # on the origin

    def origin_bytes(self, path: str | None = None) -> int:
        return int(self.origin.stats()["by_path"].get(path or self.path, 0))


def test_a_blob_streams_to_the_client_as_the_registry_sends_it(tmp_path: Path) -> None:
    data = seeded_bytes("test_mirror-1", 3 * 4 * MIB)  # three pieces from an origin that takes about 3 s to send them
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with mirror_of_origin_blob(tmp_path, data, digest, rate=4_000_000) as blob:
        received = bytearray()
        response = http_request("GET", blob.url, timeout=60, stream=True)
        try:
            assert response.status == 200
            chunks = response.stream(CHUNK)
            received += next(chunks)
            # The client has bytes while the origin has not even sent the first piece: nothing waited for a piece
            # to be stored and read back.
            assert blob.origin_bytes() < 4 * MIB
            for chunk in chunks:
                received += chunk
        finally:
            response.release_conn()
        assert "sha256:" + hashlib.sha256(received).hexdigest() == blob.digest
        assert blob.origin_bytes() == len(data)  # one pass over the blob
        assert task_file(blob.daemon, blob.task_id).read_bytes() == data  # stored as a task too, for peers


def test_a_second_client_and_a_range_during_a_cold_download_get_the_right_bytes(tmp_path: Path) -> None:
    data = seeded_bytes("test_mirror-2", 3 * 4 * MIB)
    with mirror_of_origin_blob(tmp_path, data, "sha256:" + hashlib.sha256(data).hexdigest(), rate=8_000_000) as blob:
        first = http_request("GET", blob.url, timeout=60, stream=True)
        try:
            head = first.read(CHUNK)
            second = http_request("GET", blob.url, timeout=60)  # joins mid-download: stored pieces, then live bytes
            ranged = http_request("GET", blob.url, headers={"Range": "bytes=5000000-9000000"}, timeout=60)
            rest = first.read()
        finally:
            first.release_conn()
        assert head + rest == data
        assert second.status == 200 and second.data == data
        assert ranged.status == 206 and ranged.data == data[5_000_000:9_000_001]
        assert blob.origin_bytes() == len(data)


_PATH_PART = st.text(alphabet=st.sampled_from("abcz09._-/:%?&=~"), max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.one_of(
        _PATH_PART.map(lambda tail: "/v2/" + tail),
        _PATH_PART.map(lambda tail: "/v2/library/filler/blobs/" + tail),
        st.sampled_from(["/v2/library/filler/blobs/sha256:" + "0" * 64, "/v2/library/filler/blobs/sha512:00"]),
        _PATH_PART.map(lambda tail: "/" + tail),
    ),
    ns=st.one_of(st.none(), st.just("registry"), st.text(max_size=30)),
    method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT", "OPTIONS"]),
    range_header=st.one_of(
        st.none(), st.text(max_size=30), st.from_regex(r"bytes=[0-9]{0,8}-[0-9]{0,8}", fullmatch=True)
    ),
)
def test_any_request_gets_an_http_answer_never_a_crash(
    mirror: Mirror, path: str, ns: str | None, method: str, range_header: str | None
) -> None:
    query = {} if ns is None else {"ns": mirror.registry.host if ns == "registry" else ns}
    sendable = range_header is not None and range_header.isprintable() and range_header.strip()
    # UTF-8 on the wire (http.client sends str headers as latin-1, which maps each of these bytes to itself).
    headers = {"Range": range_header.strip().encode().decode("latin-1")} if sendable and range_header else {}
    try:
        response = http_request(method, mirror.url(path, **query), headers=headers)
    except urllib3.exceptions.LocationParseError:
        return  # the client refused to send it
    # 502 is the mirror's answer for a registry it cannot reach (a random ns); 5xx of its own would be a bug.
    assert response.status < 500 or response.status in (502, 503), response.data[:500]
    assert "Traceback" not in mirror.daemon.log()


def test_a_percent_encoded_digest_names_the_same_blob_and_is_counted(mirror: Mirror) -> None:
    layer = mirror.image.layers[1]
    encoded = mirror.get(f"/v2/library/filler/blobs/{layer.digest.replace(':', '%3A')}")
    assert encoded.status == 200
    assert encoded.data == layer.data
    assert encoded.headers["docker-content-digest"] == layer.digest
    # The task is named by the decoded URL: the same task as the plain digest names.
    assert task_file(mirror.daemon, mirror.task_id("library/filler", layer.digest)).read_bytes() == layer.data
    assert mirror.get("/v2/library/filler/manifests/missing").status == 404
    scraped = http_request("GET", f"http://127.0.0.1:{mirror.daemon.metrics_port}/metrics").data.decode()
    assert 'dfdaemon_proxy_requests_total{route="blob",status="200"}' in scraped
    assert 'dfdaemon_proxy_requests_total{route="registry",status="404"}' in scraped


def test_only_pulls_are_served_and_paths_stay_under_v2(mirror: Mirror) -> None:
    pushed = http_request("PUT", mirror.url("/v2/library/filler/manifests/v2", ns=mirror.registry.host), body=b"{}")
    assert pushed.status == 405
    assert pushed.headers["allow"] == "GET, HEAD"
    for path in ("/v2/../admin", "/v2/library/../../secret", "/v2/%2E%2E/admin", "/v2/./x"):
        # http.client sends the path as written (an HTTP client library may resolve the dot segments first).
        connection = http.client.HTTPConnection("127.0.0.1", mirror.daemon.proxy_port, timeout=10)
        try:
            connection.request("GET", f"{path}?ns={mirror.registry.host}")
            assert connection.getresponse().status == 400, path
        finally:
            connection.close()


def test_a_forged_blob_never_reaches_the_client_complete(tmp_path: Path) -> None:
    promised = seeded_bytes("test_mirror-3", 2 * MIB)
    forged = seeded_bytes("test_mirror-4", len(promised))
    with mirror_of_origin_blob(tmp_path, forged, "sha256:" + hashlib.sha256(promised).hexdigest()) as blob:
        received = bytearray()
        response = http_request("GET", blob.url, timeout=60, stream=True)
        with pytest.raises(urllib3.exceptions.ProtocolError):
            for chunk in response.stream(CHUNK, decode_content=False):
                received += chunk
        response.release_conn()
        assert len(received) < len(forged)
        assert blob.origin_bytes() == len(forged)  # the task the assertions below look at was fetched
        states = {task["task_id"]: task["state"] for task in dfctl_json(blob.daemon, "task", "ls")["tasks"]}
        assert states.get(blob.task_id, "gone") in ("gone", "failed")
        content = task_file(blob.daemon, blob.task_id)
        assert not content.exists() or content.stat().st_size == 0, "the forged bytes stayed in the cache"
        assert "Traceback" not in blob.daemon.log()


def test_a_task_of_the_blobs_url_fetched_without_its_digest_is_checked_before_the_mirror_serves_it(
    tmp_path: Path,
) -> None:
    promised = seeded_bytes("test_mirror-7", 2 * MIB)
    forged = seeded_bytes("test_mirror-8", len(promised))
    with mirror_of_origin_blob(tmp_path, forged, "sha256:" + hashlib.sha256(promised).hexdigest()) as blob:
        # dfget names the blob's URL without a digest: the same task as the mirror's, its bytes never checked.
        fetched = dfget(blob.daemon, f"http://{blob.origin.address}{blob.path}", tmp_path / "out")
        assert fetched.returncode == 0, fetched.stderr
        states = {task["task_id"]: task["state"] for task in dfctl_json(blob.daemon, "task", "ls")["tasks"]}
        assert states == {blob.task_id: "finished"}
        received = bytearray()
        response = http_request("GET", blob.url, timeout=60, stream=True)
        with pytest.raises(urllib3.exceptions.ProtocolError):
            for chunk in response.stream(CHUNK, decode_content=False):
                received += chunk
        response.release_conn()
        assert len(received) < len(forged)
        assert blob.origin_bytes() == len(forged)  # the check read the cached copy; the origin was not asked again
        assert "Traceback" not in blob.daemon.log()


def test_a_client_that_leaves_mid_blob_costs_one_log_line(tmp_path: Path) -> None:
    data = seeded_bytes("test_mirror-5", 3 * 4 * MIB)
    with mirror_of_origin_blob(tmp_path, data, "sha256:" + hashlib.sha256(data).hexdigest(), rate=4_000_000) as blob:
        response = http_request("GET", blob.url, timeout=60, stream=True)
        assert response.read(CHUNK)
        response.close()  # leaves mid-blob: the connection goes, unread
        # The download goes on for the cache; the next client gets the whole, verified blob.
        again = http_request("GET", blob.url, timeout=60)
        assert "sha256:" + hashlib.sha256(again.data).hexdigest() == blob.digest
        log = blob.daemon.log()
        assert "Traceback" not in log and "Error handling request" not in log


@pytest.mark.parametrize("by_digest", [None, False, True])
def test_blob_task_ids_follow_enable_task_id_based_blob_digest(tmp_path: Path, by_digest: bool | None) -> None:
    """Unset or false (upstream's default): one task per blob URL, as a Rust peer names it, so two repositories
    holding the blob are two tasks. True: the task is the digest's hex, shared across repositories."""
    data = seeded_bytes("test_mirror-6", 300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with mirror_of_origin_blob(tmp_path, data, digest, repositories=("r", "team/r"), by_digest=by_digest) as blob:
        other_path = f"/v2/team/r/blobs/{digest}"
        other_url = blob.url.replace(blob.path, other_path)
        for url in (blob.url, other_url):
            answer = http_request("GET", url, timeout=60)
            assert answer.status == 200 and answer.data == data
            assert answer.headers["docker-content-digest"] == digest
        stored = {task["task_id"]: task for task in dfctl_json(blob.daemon, "task", "ls")["tasks"]}
        if by_digest:
            assert list(stored) == [digest[7:]] == [blob.task_id]
            assert blob.origin_bytes(other_path) == 0  # the second repository's pull was a cache hit
        else:
            other_id = url_task_id(f"http://{blob.origin.address}{other_path}")
            assert sorted(stored) == sorted([blob.task_id, other_id]) and blob.task_id != other_id
            assert blob.task_id == ids.task_id(f"http://{blob.origin.address}{blob.path}")
            assert blob.origin_bytes(other_path) == len(data)
        assert blob.origin_bytes() == len(data)
        for task_id in stored:
            assert stored[task_id]["state"] == "finished"
            assert task_file(blob.daemon, task_id).read_bytes() == data
        # The Use API's blob digest names every task holding the blob.
        acquired = dfctl_json(blob.daemon, "use", "acquire", "--holder", "user:ops", digest)
        assert sorted(hold["task_id"] for hold in acquired["holds"]) == sorted(stored)
