"""The task id a real daemon reports for a DownloadTask equals one computed here from the request's fields.

The expected ids come from a small formula written out in this file (PROTOCOL.md, "Identifiers"):
``sha256(U + tag + application + str(piece_length) + "STANDARD")``, each optional part skipped when
unset, ``U`` the URL without its filtered query pairs; ``sha256(content)`` when
``content_for_calculating_task_id`` is set. It never calls ``dfdaemon.ids``, so a daemon that
dropped or mangled any of these fields on the way from the RPC to the id fails here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, OriginProcess, running_daemon, running_origin

MiB = 1024 * 1024
CONTENT = seeded_bytes("test_task_id_rpc-1", 3000)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("origin") / "files"
    root.mkdir()
    (root / "a.bin").write_bytes(CONTENT)
    (root / "b.bin").write_bytes(CONTENT)
    with running_origin(root) as running:
        yield running


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dfdaemon_pb2_grpc.DfdaemonDownloadStub]:
    with running_daemon(tmp_path_factory.mktemp("daemon")) as daemon:
        yield _stub(daemon)


def _stub(daemon: DaemonProcess) -> dfdaemon_pb2_grpc.DfdaemonDownloadStub:
    channel = grpc.insecure_channel(f"unix:{daemon.socket_path}", options=CHANNEL_OPTIONS)
    return dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)


@dataclass(frozen=True)
class Case:
    """One request: a file, its query pairs (plain ASCII, so form encoding leaves them as they are) and the id parts."""

    name: str = "a.bin"
    query: tuple[tuple[str, str], ...] = ()
    tag: str | None = None
    application: str | None = None
    filtered: tuple[str, ...] = ()
    piece_length: int | None = None
    content: str | None = None

    def url(self, origin: OriginProcess) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.query)
        return origin.url(self.name) + (f"?{query}" if query else "")

    def expected_id(self, origin: OriginProcess) -> str:
        if self.content is not None:
            return hashlib.sha256(self.content.encode()).hexdigest()
        kept = "&".join(f"{k}={v}" for k, v in self.query if k not in self.filtered)
        text = origin.url(self.name) + (f"?{kept}" if kept else "")
        text += (self.tag or "") + (self.application or "")
        text += "" if self.piece_length is None else str(self.piece_length)
        return hashlib.sha256(f"{text}STANDARD".encode()).hexdigest()

    def download(self, origin: OriginProcess) -> common_pb2.Download:
        message = common_pb2.Download(url=self.url(origin), filtered_query_params=self.filtered)
        for name, value in (
            ("tag", self.tag),
            ("application", self.application),
            ("piece_length", self.piece_length),
            ("content_for_calculating_task_id", self.content),
        ):
            if value is not None:
                setattr(message, name, value)
        return message


CASES = {
    "plain": Case(),
    "other url": Case(name="b.bin"),
    "query kept": Case(query=(("v", "1"), ("w", "2"))),
    "tag": Case(tag="nightly"),
    "application": Case(application="trainer"),
    "tag and application": Case(tag="nightly", application="trainer"),
    "filtered key dropped": Case(query=(("sig", "abc"), ("v", "1")), filtered=("sig",)),
    "other signature, same task": Case(query=(("sig", "xyz"), ("v", "1")), filtered=("sig",)),
    "every key filtered": Case(query=(("X-Amz-Date", "1"),), filtered=("X-Amz-Date",)),
    "filter names an absent key": Case(query=(("v", "1"), ("w", "2")), filtered=("sig",)),
    "piece length": Case(piece_length=4 * MiB),
    "other piece length": Case(piece_length=8 * MiB),
    "all parts": Case(
        query=(("sig", "1"), ("v", "2")), tag="t", application="app", filtered=("sig",), piece_length=4 * MiB
    ),
    "content for task id": Case(tag="ignored", content="This is a test file"),
}


def _reported_ids(stub: dfdaemon_pb2_grpc.DfdaemonDownloadStub, download: common_pb2.Download) -> set[str]:
    responses = list(stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=60))
    assert responses and responses[0].HasField("download_task_started_response")
    return {response.task_id for response in responses}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reported_task_id_matches_the_request_fields(
    stub: dfdaemon_pb2_grpc.DfdaemonDownloadStub, origin: OriginProcess, case: Case
) -> None:
    assert _reported_ids(stub, case.download(origin)) == {case.expected_id(origin)}


def test_the_cases_name_distinct_tasks_where_their_fields_differ(origin: OriginProcess) -> None:
    """Guards the formula above: only the pairs meant to collide do."""
    ids = {name: case.expected_id(origin) for name, case in CASES.items()}
    assert ids["filtered key dropped"] == ids["other signature, same task"]
    assert ids["filtered key dropped"] != ids["query kept"]
    assert ids["every key filtered"] == ids["plain"]
    assert ids["filter names an absent key"] == ids["query kept"]
    colliding = ("other signature, same task", "every key filtered", "filter names an absent key")
    distinct = {ids[name] for name in CASES if name not in colliding}
    assert len(distinct) == len(CASES) - len(colliding)


def test_unserved_api_2_3_rpc_is_unimplemented_naming_the_method(
    stub: dfdaemon_pb2_grpc.DfdaemonDownloadStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListTaskEntries(dfdaemon_pb2.ListTaskEntriesRequest(task_id="0" * 64, url="http://x/"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "/dfdaemon.v2.DfdaemonDownload/ListTaskEntries" in (caught.value.details() or "")


def test_model_hub_download_is_unimplemented_with_the_reason(stub: dfdaemon_pb2_grpc.DfdaemonDownloadStub) -> None:
    download = common_pb2.Download(
        url="hf://org/model/weights.bin", hugging_face=common_pb2.HuggingFace(revision="main")
    )
    with pytest.raises(grpc.RpcError) as caught:
        _reported_ids(stub, download)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "Hugging Face downloads" in (caught.value.details() or "")
