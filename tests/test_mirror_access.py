"""Private blobs stay private: the mirror serves a cached blob only to a client the registry lets read it.

A real distribution registry with htpasswd (basic) auth: every user it knows may read every repository, a client
without credentials may read none.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import urllib3

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

REPOSITORY = "team/private"
USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ALICE = basic("alice", USERS["alice"])
BOB = basic("bob", USERS["bob"])


@dataclass
class Private:
    registry: Registry
    daemon: DaemonProcess
    layer: Blob

    @property
    def path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/{self.layer.digest}"

    def pull(self, headers: dict[str, str] | None = None, method: str = "GET") -> urllib3.BaseHTTPResponse:
        url = f"http://127.0.0.1:{self.daemon.proxy_port}{self.path}?{urlencode({'ns': self.registry.host})}"
        return http_request(method, url, headers=headers, timeout=60)

    def direct(self, headers: dict[str, str] | None = None, method: str = "GET") -> urllib3.BaseHTTPResponse:
        return http_request(method, f"{self.registry.url}{self.path}", headers=headers, timeout=60)


@contextmanager
def private_mirror(tmp_path: Path, *, public: bool = False, size: int = 5_000_000) -> Iterator[Private]:
    """A private repository holding one layer of about ``size`` bytes, and a daemon whose mirror fronts its registry
    (as a registry configured public with ``public``)."""
    image = filler_image("private", [size], seed=41)
    with running_registry(tmp_path / "registry", users=USERS) as registry:
        push_image(registry.url, REPOSITORY, "v1", image, headers=ALICE)
        registry_mirror: dict[str, Any] = {"insecureRegistries": [registry.host]}
        if public:
            registry_mirror["publicRegistries"] = [registry.host]
        with running_daemon(
            tmp_path / "daemon", {"proxy": {"enable": True, "registryMirror": registry_mirror}}
        ) as daemon:
            yield Private(registry, daemon, image.layers[0])


def test_a_cached_private_blob_reaches_only_clients_the_registry_lets_read_it(tmp_path: Path) -> None:
    with private_mirror(tmp_path) as private:
        pulled = private.pull(ALICE)
        assert pulled.status == 200 and pulled.data == private.layer.data
        served = private.registry.blob_bytes_served()
        assert served == private.layer.size

        refused, direct = private.pull(), private.direct()  # no credentials at all
        assert refused.status == direct.status == 401
        assert refused.headers["www-authenticate"] == direct.headers["www-authenticate"]
        assert refused.headers["www-authenticate"].startswith("Basic realm=")
        assert refused.json() == direct.json()
        head = private.pull(method="HEAD")
        assert head.status == 401 and head.headers["www-authenticate"] == direct.headers["www-authenticate"]
        wrong = private.pull(basic("bob", "not-bobs-password"))
        assert wrong.status == 401 and wrong.data != private.layer.data

        from_cache = private.pull(BOB)
        assert from_cache.status == 200 and from_cache.data == private.layer.data
        assert private.registry.blob_bytes_served() == served, "the second pull's bytes came from the registry"
        log = private.daemon.log()
        assert "Traceback" not in log and "Error handling request" not in log


def test_a_client_without_access_joining_a_download_in_flight_gets_no_byte_of_it(tmp_path: Path) -> None:
    with private_mirror(tmp_path, size=48_000_000) as private:
        url = f"http://127.0.0.1:{private.daemon.proxy_port}{private.path}?{urlencode({'ns': private.registry.host})}"
        alice = http_request("GET", url, headers=ALICE, timeout=60, stream=True)
        try:
            head = alice.read(64 * 1024)  # alice's download is under way (usually still running below)
            refused = private.pull()
            assert refused.status == 401 and refused.headers["www-authenticate"].startswith("Basic realm=")
            rest = alice.read()
        finally:
            alice.release_conn()
        assert head + rest == private.layer.data
        assert private.pull(BOB).data == private.layer.data


def test_a_yes_is_remembered_per_credential(tmp_path: Path) -> None:
    with private_mirror(tmp_path) as private:
        assert private.pull(ALICE).status == 200
        asked = len(private.registry.request_entries())
        again = private.pull(ALICE)
        assert again.status == 200 and again.data == private.layer.data
        assert len(private.registry.request_entries()) == asked, "alice's yes was not remembered"
        assert private.pull(BOB).status == 200
        assert len(private.registry.request_entries()) == asked + 1, "bob was not asked about exactly once"
        assert private.pull(BOB).status == 200
        assert len(private.registry.request_entries()) == asked + 1


def test_a_registry_configured_public_serves_its_cached_blobs_to_anyone_unasked(tmp_path: Path) -> None:
    with private_mirror(tmp_path, public=True) as private:
        assert private.pull(ALICE).status == 200
        asked = len(private.registry.request_entries())
        anyone = private.pull()
        assert anyone.status == 200 and anyone.data == private.layer.data
        assert len(private.registry.request_entries()) == asked


def test_while_the_registry_is_down_only_a_remembered_yes_opens_the_cache(tmp_path: Path) -> None:
    with private_mirror(tmp_path) as private:
        assert private.pull(ALICE).status == 200
        private.registry.stop()
        remembered = private.pull(ALICE)
        assert remembered.status == 200 and remembered.data == private.layer.data
        unconfirmed = private.pull(BOB)
        assert unconfirmed.status == 502
        assert unconfirmed.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert "Traceback" not in private.daemon.log()
