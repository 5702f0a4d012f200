"""Upstream's ``X-Dragonfly-*`` headers on the forward proxy and the registry mirror: the task ids they lead to are
computed here independently with ``ids.task_id``, and the behaviour they ask for (ranges, prefetch, output files,
forced P2P) is checked against the origin's bytes and its byte counter."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.proxy import headers as dragonfly
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, dfctl_json, running_daemon, running_origin

MB = 1_000_000
MIB = 1024 * 1024
SIZE = 9 * MB + 7  # three 4 MiB pieces
DEFAULT = ids.DEFAULT_FILTERED_QUERY_PARAMS


@dataclass
class Node:
    origin: OriginProcess
    daemon: DaemonProcess

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.daemon.proxy_port}"

    def content(self, name: str) -> bytes:
        return (self.origin.root / name).read_bytes()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("headers")
    root = work / "origin"
    (root / "files").mkdir(parents=True)
    (root / "other").mkdir()
    names = ("tagged", "filtered", "sized", "content", "ranged", "prefetched", "grpc", "written", "forced", "asked")
    for name in (*names, "beyond", "ignored", "tail", "longtail", "notail"):
        (root / "files" / f"{name}.bin").write_bytes(seeded_bytes(f"headers-{name}", SIZE))
    (root / "other" / "forced.bin").write_bytes(seeded_bytes("headers-other", 5 * MB))
    blob = seeded_bytes("headers-blob", 2 * MB)
    blobs = root / "v2" / "library" / "app" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"sha256:{hashlib.sha256(blob).hexdigest()}").write_bytes(blob)
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(root))
        config = {"proxy": {"enable": True, "rules": [{"regex": r"/files/"}]}}
        daemon = stack.enter_context(running_daemon(work / "daemon", config))
        yield Node(origin, daemon)


def get(proxy: str | None, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET through ``proxy`` (None: straight to ``url``); status, headers, body, an HTTP error being an answer too."""
    handler = urllib.request.ProxyHandler({"http": proxy} if proxy else {})
    opener = urllib.request.build_opener(handler)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting until {what}")


def _parsed(**headers: str) -> dragonfly.DragonflyHeaders:
    return dragonfly.parse_dragonfly_headers(CIMultiDictProxy(CIMultiDict(headers)))


def test_header_values_are_read_as_upstream_reads_them() -> None:
    hints = _parsed(
        **{
            "x-dragonfly-use-p2p": "TRUE",
            "X-Dragonfly-Prefetch": "false",
            "X-Dragonfly-Priority": "three",
            "X-Dragonfly-Filtered-Query-Params": "Signature, Expires",
            "X-Dragonfly-Piece-Length": "8mib",
            "X-Dragonfly-Force-Hard-Link": "yes",
        }
    )
    assert hints.use_p2p is True
    assert hints.prefetch is False
    assert hints.priority == dragonfly.DEFAULT_PRIORITY  # not a number: upstream's default
    assert hints.filtered_query_params == ("Signature", "Expires")
    assert hints.piece_length == 8 * MIB
    assert hints.force_hard_link is False  # only "true" is true
    assert _parsed().prefetch is None and _parsed().enable_task_id_based_blob_digest is None


@pytest.mark.parametrize("value", ["1mib", "lots", "-4mib"])
def test_a_piece_length_under_4mib_or_not_a_size_is_refused(value: str) -> None:
    with pytest.raises(dragonfly.InvalidDragonflyHeader, match="X-Dragonfly-Piece-Length"):
        _parsed(**{"X-Dragonfly-Piece-Length": value})


def test_prefetch_only_for_a_ranged_request_and_the_header_wins_over_the_config() -> None:
    ranged = CIMultiDictProxy(CIMultiDict({"Range": "bytes=0-9"}))
    assert dragonfly.wants_prefetch(ranged, _parsed(), default=True)
    assert not dragonfly.wants_prefetch(ranged, _parsed(**{"X-Dragonfly-Prefetch": "false"}), default=True)
    assert dragonfly.wants_prefetch(ranged, _parsed(**{"X-Dragonfly-Prefetch": "true"}), default=False)
    assert not dragonfly.wants_prefetch(CIMultiDictProxy(CIMultiDict()), _parsed(), default=True)


def test_tag_and_application_name_the_task_as_upstream(node: Node) -> None:
    url = node.origin.url("files/tagged.bin")
    plain = get(node.proxy, url)
    tagged = get(node.proxy, url, {"X-Dragonfly-Tag": "t1", "X-Dragonfly-Application": "app"})
    assert plain[0] == tagged[0] == 200
    assert plain[1]["X-Dragonfly-Task-ID"] == ids.task_id(url, filtered_query_params=DEFAULT)
    assert tagged[1]["X-Dragonfly-Task-ID"] == ids.task_id(
        url, tag="t1", application="app", filtered_query_params=DEFAULT
    )
    assert tagged[2] == plain[2] == node.content("files/tagged.bin")
    # The first answer came from the origin, the second repeated nothing: a finished local task says so.
    assert "X-Dragonfly-Task-Download-Finished" not in plain[1]
    assert get(node.proxy, url)[1]["X-Dragonfly-Task-Download-Finished"] == "true"


def test_filtered_query_params_replace_the_rules_list_and_share_one_task(node: Node) -> None:
    base = node.origin.url("files/filtered.bin")
    headers = {"X-Dragonfly-Filtered-Query-Params": "sig"}
    first = get(node.proxy, f"{base}?sig=a&keep=1", headers)
    second = get(node.proxy, f"{base}?sig=b&keep=1", headers)
    expected = ids.task_id(f"{base}?sig=a&keep=1", filtered_query_params=("sig",))
    assert first[1]["X-Dragonfly-Task-ID"] == second[1]["X-Dragonfly-Task-ID"] == expected
    assert second[2] == node.content("files/filtered.bin")
    assert node.origin.bytes_served("files/filtered.bin") == SIZE  # one task, one fetch
    # Without the header the rule's default list applies, which keeps "sig" in the id.
    other = get(node.proxy, f"{base}?sig=c&keep=1")
    assert other[1]["X-Dragonfly-Task-ID"] == ids.task_id(f"{base}?sig=c&keep=1", filtered_query_params=DEFAULT)


def test_piece_length_and_content_for_the_task_id_change_the_id(node: Node) -> None:
    url = node.origin.url("files/sized.bin")
    sized = get(node.proxy, url, {"X-Dragonfly-Piece-Length": "8mib"})
    assert sized[1]["X-Dragonfly-Task-ID"] == ids.task_id(url, piece_length=8 * MIB, filtered_query_params=DEFAULT)
    assert sized[2] == node.content("files/sized.bin")
    named = get(node.proxy, node.origin.url("files/content.bin"), {"X-Dragonfly-Content-For-Calculating-Task-ID": "k"})
    assert named[1]["X-Dragonfly-Task-ID"] == hashlib.sha256(b"k").hexdigest()
    refused = get(node.proxy, url, {"X-Dragonfly-Piece-Length": "1mib"})
    assert refused[0] == 400
    assert refused[1]["X-Dragonfly-Error-Type"] == "proxy"
    assert b"4mib" in refused[2]


def test_use_p2p_forces_a_task_without_a_rule(node: Node) -> None:
    url = node.origin.url("other/forced.bin")
    assert "X-Dragonfly-Task-ID" not in get(node.proxy, url)[1]  # no rule matches: passed through
    forced = get(node.proxy, url, {"X-Dragonfly-Use-P2P": "true"})
    assert forced[1]["X-Dragonfly-Task-ID"] == ids.task_id(url, filtered_query_params=DEFAULT)
    assert forced[2] == node.content("other/forced.bin")


def test_a_range_is_answered_206_with_the_origins_slice(node: Node) -> None:
    url = node.origin.url("files/ranged.bin")
    status, headers, body = get(node.proxy, url, {"Range": "bytes=5000000-5000099"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 5000000-5000099/{SIZE}"
    assert body == node.content("files/ranged.bin")[5_000_000:5_000_100]
    assert headers["X-Dragonfly-Task-ID"] == ids.task_id(url, filtered_query_params=DEFAULT)
    # Only the piece covering those bytes (the second 4 MiB piece) came from the origin.
    assert node.origin.bytes_served("files/ranged.bin") == 4 * MIB
    suffix = get(node.proxy, url, {"Range": "bytes=-10"})
    assert (suffix[0], suffix[2]) == (206, node.content("files/ranged.bin")[-10:])
    past = get(node.proxy, url, {"Range": f"bytes={SIZE}-"})
    assert (past[0], past[1]["Content-Range"]) == (416, f"bytes */{SIZE}")


def test_a_range_of_a_task_not_cached_asks_the_origin_for_the_length_once(node: Node) -> None:
    """The download resolves the range once it has the length: one request for the length and one GET for the
    covering piece, not a second request for the length by the proxy first."""
    url = node.origin.url("files/asked.bin")
    before = node.origin.stats()["requests"]
    status, headers, body = get(node.proxy, url, {"Range": "bytes=5000000-"})
    assert (status, headers["Content-Range"]) == (206, f"bytes 5000000-{SIZE - 1}/{SIZE}")
    assert body == node.content("files/asked.bin")[5_000_000:]
    assert node.origin.stats()["requests"] - before == 2  # the length, then one ranged GET of pieces 1 and 2


def test_a_suffix_of_a_task_not_cached_asks_the_origin_for_the_length_once(node: Node) -> None:
    url = node.origin.url("files/tail.bin")
    before = node.origin.stats()["requests"]
    status, headers, body = get(node.proxy, url, {"Range": "bytes=-10"})
    assert (status, headers["Content-Range"]) == (206, f"bytes {SIZE - 10}-{SIZE - 1}/{SIZE}")
    assert body == node.content("files/tail.bin")[-10:]
    assert node.origin.stats()["requests"] - before == 2  # the length, then one ranged GET of the last piece


def test_a_suffix_longer_than_a_task_not_cached_gets_all_of_it_and_a_zero_suffix_is_416(node: Node) -> None:
    """RFC 9110: a suffix longer than the content selects all of it (a gRPC download's reading refuses it)."""
    before = node.origin.stats()["requests"]
    status, headers, body = get(node.proxy, node.origin.url("files/longtail.bin"), {"Range": f"bytes=-{SIZE + 1}"})
    assert (status, headers["Content-Range"]) == (206, f"bytes 0-{SIZE - 1}/{SIZE}")
    assert body == node.content("files/longtail.bin")
    assert node.origin.stats()["requests"] - before == 2  # the length, then one GET of every piece
    status, _, _ = get(node.proxy, node.origin.url("files/notail.bin"), {"Range": "bytes=-0"})
    assert status == 416
    assert node.origin.stats()["requests"] - before == 2  # the last 0 bytes of anything: refused before asking


def test_a_range_past_the_end_of_a_task_not_cached_is_416_and_a_malformed_one_gets_everything(node: Node) -> None:
    status, headers, _ = get(node.proxy, node.origin.url("files/beyond.bin"), {"Range": f"bytes={SIZE}-{SIZE + 10}"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{SIZE}")
    status, _, body = get(node.proxy, node.origin.url("files/ignored.bin"), {"Range": "bytes=10-5"})
    assert (status, body) == (200, node.content("files/ignored.bin"))


def _task_finished(daemon: DaemonProcess, task_id: str) -> Callable[[], bool]:
    def finished() -> bool:
        tasks = dfctl_json(daemon, "task", "ls")["tasks"]
        return any(task["task_id"] == task_id and task["state"] == "finished" for task in tasks)

    return finished


def test_prefetch_completes_the_task_so_a_full_request_does_not_reach_the_origin(node: Node) -> None:
    url = node.origin.url("files/prefetched.bin")
    task_id = ids.task_id(url, filtered_query_params=DEFAULT)
    status, _, body = get(node.proxy, url, {"Range": "bytes=0-99", "X-Dragonfly-Prefetch": "true"})
    assert (status, body) == (206, node.content("files/prefetched.bin")[:100])
    wait_until(_task_finished(node.daemon, task_id), "the prefetch finished the whole task")
    served = node.origin.bytes_served("files/prefetched.bin")
    status, headers, body = get(node.proxy, url)
    assert (status, headers["X-Dragonfly-Task-Download-Finished"]) == (200, "true")
    assert body == node.content("files/prefetched.bin")
    assert node.origin.bytes_served("files/prefetched.bin") == served  # zero bytes more from the origin


def test_download_prefetch_over_grpc_completes_the_task_in_the_background(node: Node) -> None:
    url = node.origin.url("files/grpc.bin")
    download = common_pb2.Download(url=url, range=common_pb2.Range(start=10, length=90), prefetch=True)
    with grpc.insecure_channel(f"unix:{node.daemon.socket_path}") as channel:
        stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        ranged = list(stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=60))
        task_id = ranged[0].task_id
        wait_until(_task_finished(node.daemon, task_id), "the prefetch finished the whole task")
        served = node.origin.bytes_served("files/grpc.bin")
        whole = common_pb2.Download(url=url)
        again = list(stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=whole), timeout=60))
    assert again[0].download_task_started_response.is_finished
    assert node.origin.bytes_served("files/grpc.bin") == served


def test_output_path_writes_the_file_as_well(node: Node, tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"
    status, _, body = get(node.proxy, node.origin.url("files/written.bin"), {"X-Dragonfly-Output-Path": str(target)})
    assert status == 200
    assert body == target.read_bytes() == node.content("files/written.bin")


def test_the_mirror_honours_registry_content_and_blob_digest_headers(node: Node) -> None:
    blob = next((node.origin.root / "v2" / "library" / "app" / "blobs").iterdir())
    path = f"/v2/library/app/blobs/{blob.name}"
    mirror = f"http://127.0.0.1:{node.daemon.proxy_port}{path}"
    registry = {"X-Dragonfly-Registry": f"http://{node.origin.address}"}

    status, headers, body = get(None, mirror, registry)
    assert (status, body) == (200, blob.read_bytes())
    assert headers["Docker-Content-Digest"] == blob.name  # the digest-named blob path

    named = get(None, mirror, {**registry, "X-Dragonfly-Content-For-Calculating-Task-ID": "layer"})
    assert (named[0], named[2]) == (200, blob.read_bytes())
    assert named[1]["X-Dragonfly-Task-ID"] == hashlib.sha256(b"layer").hexdigest()

    by_url = get(None, mirror, {**registry, "X-Dragonfly-Enable-Task-ID-Based-Blob-Digest": "false"})
    upstream_url = f"http://{node.origin.address}{path}"
    assert by_url[1]["X-Dragonfly-Task-ID"] == ids.task_id(upstream_url, filtered_query_params=DEFAULT)
    assert by_url[2] == blob.read_bytes()
