"""Preheat end to end: ``dfctl preheat`` asks the stub (its own process), the stub asks real daemons, and the data
lands in their caches: a file from the origin, an image's layers from the distribution registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from aiohttp import web
from google.protobuf.duration_pb2 import Duration

from dfdaemon.api import common_pb2, scheduler_pb2
from scheduler_stub import preheat
from scheduler_stub.registry import InvalidRequest
from tests import test_security
from tests.registry_support import (
    OCI_MANIFEST,
    OciImage,
    fetch_token,
    filler_image,
    http_request,
    image_architecture,
    push_image,
    registry_skip_reason,
    running_registry,
)
from tests.storage_support import seeded_bytes
from tests.support import (
    REPO_ROOT,
    DaemonProcess,
    SchedulerProcess,
    dfctl_json,
    dfget,
    merge,
    peer_config,
    running_daemon,
    running_origin,
    running_scheduler,
    serving,
    wait_for_hosts,
    wait_for_line,
)
from tests.test_security import Pki, tls_config, tls_scheduler_args

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
pki = test_security.pki  # the fixture: a test CA with server and client certificates
needs_registry = pytest.mark.skipif(registry_skip_reason() is not None, reason=str(registry_skip_reason()))


def preheat_cli(scheduler: SchedulerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfdaemon.cli.dfctl", "preheat", *args, "--scheduler", scheduler.address],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )


@contextmanager
def preheat_cluster(tmp_path: Path, peers: int) -> Iterator[tuple[SchedulerProcess, list[DaemonProcess]]]:
    """A stub and daemons that take DownloadTask from the network for loopback origins (as preheat needs)."""
    with ExitStack() as stack:
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler"))
        config = merge(peer_config(scheduler), {"download": {"backToSource": {"allowedNetworks": ["127.0.0.0/8"]}}})
        daemons = [stack.enter_context(running_daemon(tmp_path / f"peer{n}", config)) for n in range(peers)]
        wait_for_hosts(scheduler, peers)
        yield scheduler, daemons


def finished_sizes(daemon: DaemonProcess) -> list[int]:
    tasks = dfctl_json(daemon, "task", "ls")["tasks"]
    return sorted(task["content_length"] for task in tasks if task["state"] == "finished")


def wait_for_sizes(daemons: list[DaemonProcess], sizes: list[int], timeout: float = 90.0) -> None:
    """Until every daemon has finished tasks of exactly these sizes."""
    deadline = time.monotonic() + timeout
    while True:
        have = [finished_sizes(daemon) for daemon in daemons]
        if all(found == sorted(sizes) for found in have):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemons hold {have}, expected {sorted(sizes)} each")
        time.sleep(0.3)


def local_read(daemon: DaemonProcess, url: str, output: Path) -> bytes:
    """dfget ``url`` on ``daemon``: every piece must come from its own cache."""
    done = dfget(daemon, url, output, "--json")
    assert done.returncode == 0, done.stderr
    pieces = json.loads(done.stdout)["pieces"]
    assert pieces["LOCAL_PEER"] > 0 and pieces["REMOTE_PEER"] == pieces["BACK_TO_SOURCE"] == 0, pieces
    return output.read_bytes()


def test_preheat_file_to_all_peers_then_every_read_is_local(tmp_path: Path) -> None:
    data = seeded_bytes("test_preheat-file", 10 * 1024 * 1024 + 123)
    with running_origin(tmp_path / "origin") as origin, preheat_cluster(tmp_path, 3) as (scheduler, daemons):
        (origin.root / "model.bin").write_bytes(data)
        url = origin.url("model.bin")
        done = preheat_cli(scheduler, "file", url, "--scope", "all_peers", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "kind": "file",
            "url": url,
            "scope": "all_peers",
            "scheduler": scheduler.address,
            "accepted": True,
        }
        wait_for_sizes(daemons, [len(data)])
        assert origin.bytes_served("model.bin") == len(data)  # the peers shared one download from the origin
        for number, daemon in enumerate(daemons):
            assert local_read(daemon, url, tmp_path / f"out{number}") == data
        assert origin.bytes_served("model.bin") == len(data)


def test_preheat_narrowed_by_count_reaches_only_that_many_peers(tmp_path: Path) -> None:
    data = seeded_bytes("test_preheat-count", 3 * 1024 * 1024)
    with running_origin(tmp_path / "origin") as origin, preheat_cluster(tmp_path, 2) as (scheduler, daemons):
        (origin.root / "one.bin").write_bytes(data)
        done = preheat_cli(scheduler, "file", origin.url("one.bin"), "--scope", "all_peers", "--count", "1")
        assert done.returncode == 0, done.stderr
        assert "accepted by" in done.stdout
        wait_for_line(scheduler.log_path, r"preheat done: 1 downloads, 0 failed", scheduler.proc, timeout=60)
        assert sorted(finished_sizes(daemon) for daemon in daemons) == [[], [len(data)]]


def test_preheat_refusals_are_one_line(tmp_path: Path) -> None:
    with preheat_cluster(tmp_path, 1) as (scheduler, _):
        no_seed = preheat_cli(scheduler, "file", "http://127.0.0.1:9/f")
        assert no_seed.returncode == 1
        assert no_seed.stderr == "dfctl: preheat file: FAILED_PRECONDITION: no seed peer has announced itself\n"
        not_manifest = preheat_cli(scheduler, "image", "http://127.0.0.1:9/f", "--scope", "all_peers")
        assert not_manifest.returncode == 1
        assert not_manifest.stderr.startswith("dfctl: preheat image: INVALID_ARGUMENT: url must be a manifest URL")
        no_ip = preheat_cli(scheduler, "file", "http://127.0.0.1:9/f", "--scope", "all_peers", "--ip", "10.9.9.9")
        assert no_ip.stderr == "dfctl: preheat file: FAILED_PRECONDITION: no peer has the address 10.9.9.9\n"
    usage = preheat_cli(scheduler, "file", "http://127.0.0.1:9/f", "--percentage", "0")
    assert usage.returncode == 2 and "invalid percentage '0'" in usage.stderr
    gone = preheat_cli(scheduler, "file", "http://127.0.0.1:9/f")
    assert gone.returncode == 1 and gone.stderr.startswith("dfctl: cannot reach the scheduler at ")


def push_index(registry_url: str, images: dict[str, OciImage], headers: dict[str, str] | None = None) -> None:
    """``app:multi``, an OCI index naming each image (already pushed) under its ``os/arch`` platform."""
    entries = []
    for platform, image in images.items():
        os_name, architecture = platform.split("/")
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "platform": {"os": os_name, "architecture": architecture},
            }
        )
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    url = f"{registry_url}/v2/app/manifests/multi"
    put = http_request("PUT", url, body=body, headers={**(headers or {}), "Content-Type": OCI_INDEX})
    assert put.status == 201, put.data


def two_platforms() -> tuple[str, OciImage, str, OciImage]:
    ours = f"linux/{image_architecture()}"
    other = "linux/ppc64le" if ours != "linux/ppc64le" else "linux/arm64"
    kib = 1024
    return (
        ours,
        # Layers over 4 MiB: smaller downloads skip the scheduler (and so P2P), as upstream 1.4.1+ does.
        filler_image("ours", [5000 * kib, 4500 * kib], seed=11),
        other,
        filler_image("other", [900 * kib], seed=12),
    )


@needs_registry
def test_preheat_image_caches_every_layer_of_this_platform_on_every_peer(tmp_path: Path) -> None:
    ours, image, other, foreign = two_platforms()
    with running_registry(tmp_path / "registry") as registry, preheat_cluster(tmp_path, 2) as (scheduler, daemons):
        push_image(registry.url, "app", "ours", image)
        push_image(registry.url, "app", "other", foreign)
        push_index(registry.url, {ours: image, other: foreign})
        manifest_url = f"{registry.url}/v2/app/manifests/multi"
        done = preheat_cli(scheduler, "image", manifest_url, "--scope", "all_peers", "--platform", ours)
        assert done.returncode == 0, done.stderr
        wait_for_sizes(daemons, [layer.size for layer in image.layers])
        served = registry.blob_bytes_served()
        assert served == sum(layer.size for layer in image.layers)  # each layer once, the other platform's never
        for layer in image.layers:
            blob_url = f"{registry.url}/v2/app/blobs/{layer.digest}"
            data = local_read(daemons[1], blob_url, tmp_path / layer.digest.replace(":", "-"))
            assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
        assert registry.blob_bytes_served() == served


@needs_registry
async def test_resolving_an_image_answers_the_registrys_token_challenge(tmp_path: Path) -> None:
    ours, image, other, foreign = two_platforms()
    with running_registry(tmp_path / "registry", token_auth=True) as registry:
        token = {"Authorization": f"Bearer {fetch_token(registry, 'repository:app:pull,push')}"}
        push_image(registry.url, "app", "ours", image, headers=token)
        push_image(registry.url, "app", "other", foreign, headers=token)
        push_index(registry.url, {ours: image, other: foreign}, token)
        resolved = await preheat.resolve_image(f"{registry.url}/v2/app/manifests/multi", other, {})
        assert resolved.layers == [f"{registry.url}/v2/app/blobs/{layer.digest}" for layer in foreign.layers]
        assert resolved.headers["Authorization"].startswith("Bearer ")
        with pytest.raises(preheat.ManifestError, match="no manifest for platform windows/amd64"):
            await preheat.resolve_image(f"{registry.url}/v2/app/manifests/multi", "windows/amd64", {})
        single = await preheat.resolve_image(f"{registry.url}/v2/app/manifests/ours", ours, {})
        assert single.layers == [f"{registry.url}/v2/app/blobs/{layer.digest}" for layer in image.layers]
        with pytest.raises(preheat.ManifestError, match="answered 404"):
            await preheat.resolve_image(f"{registry.url}/v2/app/manifests/missing", ours, {})


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"layers": [{"digest": "sha256:../../etc"}]}, "invalid digest"),
        ({"config": {}}, "no list of layers"),
        ({"mediaType": OCI_INDEX, "manifests": [{"digest": "sha256:" + "a" * 64}]}, "no manifest for platform"),
        ([1, 2], "not a JSON object"),
    ],
)
async def test_a_manifest_that_does_not_make_sense_is_refused(document: object, error: str) -> None:
    async def manifest(request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/v2/app/manifests/1", manifest)
    async with serving(app) as port:
        with pytest.raises(preheat.ManifestError, match=error):
            await preheat.resolve_image(f"http://127.0.0.1:{port}/v2/app/manifests/1", "linux/amd64", {})


def test_preheat_over_mutual_tls_reaches_peers_that_demand_certificates(tmp_path: Path, pki: Pki) -> None:
    data = seeded_bytes("test_preheat-tls", 2 * 1024 * 1024)
    with ExitStack() as stack:
        origin = stack.enter_context(running_origin(tmp_path / "origin"))
        (origin.root / "tls.bin").write_bytes(data)
        scheduler = stack.enter_context(running_scheduler(tmp_path / "scheduler", args=tls_scheduler_args(pki)))
        config = merge(
            tls_config(pki),
            {
                "scheduler": {"addrs": [scheduler.address], "announceInterval": "2s"},
                "download": {"backToSource": {"allowedNetworks": ["127.0.0.0/8"]}},
            },
        )
        daemons = [stack.enter_context(running_daemon(tmp_path / f"peer{n}", config)) for n in range(2)]
        for daemon in daemons:
            wait_for_line(scheduler.log_path, rf"host \S+-{daemon.storage_dir.parent.name} joined", scheduler.proc)
        url = origin.url("tls.bin")
        plaintext = preheat_cli(scheduler, "file", url, "--scope", "all_peers")
        assert plaintext.returncode == 1 and "cannot reach the scheduler" in plaintext.stderr
        half = preheat_cli(scheduler, "file", url, "--scope", "all_peers", "--ca-cert", str(pki.ca))
        assert half.stderr == "dfctl: --ca-cert, --cert and --key go together\n"
        certificates = ["--ca-cert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
        done = preheat_cli(scheduler, "file", url, "--scope", "all_peers", *certificates)
        assert done.returncode == 0, done.stderr
        wait_for_sizes(daemons, [len(data)])
        assert local_read(daemons[0], origin.url("tls.bin"), tmp_path / "tls.bin") == data


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (scheduler_pb2.PreheatFileRequest(url="ftp://origin/f"), "url must be http"),
        (scheduler_pb2.PreheatImageRequest(url="http://registry/v2/app/blobs/x"), "url must be a manifest URL"),
        (scheduler_pb2.PreheatFileRequest(url="http://origin/f", percentage=101), "percentage must be at most 100"),
        (scheduler_pb2.PreheatFileRequest(url="http://origin/f", count=0), "count must be at least 1"),
        (scheduler_pb2.PreheatFileRequest(url="http://origin/f", timeout=Duration(seconds=-1)), "timeout must be"),
    ],
)
def test_preheat_requests_that_make_no_sense_are_invalid(request_: preheat.PreheatRequest, error: str) -> None:
    with pytest.raises(InvalidRequest, match=error):
        preheat.plan(request_)


def test_a_preheat_request_becomes_the_download_each_host_is_given() -> None:
    request = scheduler_pb2.PreheatFileRequest(
        url="http://origin/f",
        tag="t",
        application="app",
        piece_length=8 * 1024 * 1024,
        header={"Authorization": "Bearer x"},
        filtered_query_params=["X-Amz-Signature"],
        priority=common_pb2.LEVEL5,
        ips=["10.0.0.1"],
        count=2,
    )
    plan = preheat.plan(request)
    assert (plan.scope, plan.ips, plan.count, plan.percentage) == ("single_seed_peer", ("10.0.0.1",), 2, None)
    assert (plan.timeout, plan.concurrent_peers) == (preheat.DEFAULT_TIMEOUT, preheat.DEFAULT_CONCURRENT_PEERS)
    download = plan.download
    assert (download.tag, download.application, download.piece_length) == ("t", "app", 8 * 1024 * 1024)
    assert dict(download.request_header) == {"Authorization": "Bearer x"}
    assert list(download.filtered_query_params) == ["X-Amz-Signature"]
    assert download.priority == common_pb2.LEVEL5 and not download.need_back_to_source
