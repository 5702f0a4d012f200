"""A real OCI registry (the CNCF distribution registry) and real OCI images for tests.

``running_registry`` starts ``docker-registry serve`` on an ephemeral loopback port with a filesystem store in a
temporary directory, optionally behind token authentication served by a small in-process token server. Its JSON
access log is read back to count the blob bytes it served, which is how tests prove a node took layers from a peer
instead of from the registry.

``busybox_image`` and ``filler_image`` build OCI images in memory, deterministically (same call, same digests), and
``push_image`` uploads one through the registry HTTP API.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import random
import re
import secrets
import struct
import subprocess
import tarfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import urllib3
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support import find_binary, stop_process, tail

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

REGISTRY_BINARY = "docker-registry"
BUSYBOX_PATH = Path("/usr/bin/busybox")
BUSYBOX_APPLETS = ("sh", "sleep", "ls", "cat", "true")
IMAGE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TOKEN_SERVICE = "dfdaemon-test-registry"
TOKEN_ISSUER = "dfdaemon-test-token-issuer"
TOKEN_LIFETIME = 300
BASIC_REALM = "dfdaemon-test-registry"

_TAR_BLOCK = 512


class RegistryError(RuntimeError):
    """The registry (or its token server) did not do what a test asked."""


# ---------------------------------------------------------------------------------------------------------------------
# Locating binaries


def registry_skip_reason() -> str | None:
    """Why the real-registry tests cannot run here, or None when they can."""
    if find_binary(REGISTRY_BINARY) is None:
        return f"{REGISTRY_BINARY} not installed (Debian package docker-registry; scripts/setup.sh installs it as root)"
    return None


def _elf_is_static(path: Path) -> bool:
    """True when the ELF file at ``path`` asks for no program interpreter (so it runs without a libc on disk)."""
    with path.open("rb") as fh:
        ident = fh.read(16)
        if ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        endian = "<" if ident[5] == 1 else ">"
        if is64:
            header = fh.read(48)
            phoff = struct.unpack_from(endian + "Q", header, 16)[0]
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 38)
        else:
            header = fh.read(36)
            phoff = struct.unpack_from(endian + "I", header, 12)[0]
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 26)
        pt_interp = 3
        for index in range(phnum):
            fh.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(endian + "I", fh.read(4))
            if p_type == pt_interp:
                return False
    return True


def busybox_skip_reason() -> str | None:
    """Why ``busybox_image`` cannot be built here (no statically linked busybox), or None."""
    if not BUSYBOX_PATH.is_file():
        return f"{BUSYBOX_PATH} not installed (Debian package busybox-static)"
    if not _elf_is_static(BUSYBOX_PATH):
        return f"{BUSYBOX_PATH} is dynamically linked; install the Debian package busybox-static"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# In-memory OCI images


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One content-addressed blob: a config or a layer."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OciImage:
    """An OCI image manifest with its config and layer blobs."""

    manifest: bytes
    config: Blob
    layers: list[Blob]

    media_type = OCI_MANIFEST

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]


def image_architecture() -> str:
    """This machine's architecture in OCI terms."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


@dataclass(frozen=True)
class _TarEntry:
    name: str
    kind: bytes  # tarfile.REGTYPE, DIRTYPE or SYMTYPE
    mode: int
    data: bytes = b""
    target: str = ""


def _build_tar(entries: list[_TarEntry]) -> bytes:
    """A deterministic ustar archive: mtime 0, owner 0:0, no record padding beyond the two end blocks."""
    out = io.BytesIO()
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.type = entry.kind
        info.mode = entry.mode
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.size = len(entry.data) if entry.kind == tarfile.REGTYPE else 0
        info.linkname = entry.target
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))
        if info.size:
            out.write(entry.data)
            out.write(b"\0" * (-info.size % _TAR_BLOCK))
    out.write(b"\0" * (2 * _TAR_BLOCK))
    return out.getvalue()


def _gzip(data: bytes, level: int) -> bytes:
    # mtime 0 and no file name in the header keep the output a function of the input alone.
    return gzip.compress(data, compresslevel=level, mtime=0)


def _image_from_layers(layer_tars: list[bytes], level: int, extra_config: dict[str, Any]) -> OciImage:
    layers = [Blob(OCI_LAYER_GZIP, _gzip(tar, level)) for tar in layer_tars]
    config_doc: dict[str, Any] = {
        "architecture": image_architecture(),
        "os": "linux",
        "config": {"Env": [IMAGE_PATH_ENV], "Cmd": ["/bin/sleep", "3600"], "WorkingDir": "/", **extra_config},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar) for tar in layer_tars]},
        "history": [{"created_by": "tests/registry_support.py"} for _ in layer_tars],
    }
    config = Blob(OCI_CONFIG, json.dumps(config_doc, sort_keys=True, separators=(",", ":")).encode())
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    manifest = json.dumps(manifest_doc, separators=(",", ":")).encode()
    return OciImage(manifest=manifest, config=config, layers=layers)


def busybox_image() -> OciImage:
    """A runnable one-layer image: the static busybox as ``/bin/busybox`` with a few applet symlinks.

    Its command is ``/bin/sleep 3600``. Raises RegistryError when no static busybox is installed.
    """
    reason = busybox_skip_reason()
    if reason is not None:
        raise RegistryError(reason)
    entries = [
        _TarEntry("bin", tarfile.DIRTYPE, 0o755),
        _TarEntry("bin/busybox", tarfile.REGTYPE, 0o755, data=BUSYBOX_PATH.read_bytes()),
        *(_TarEntry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, target="busybox") for applet in BUSYBOX_APPLETS),
    ]
    return _image_from_layers([_build_tar(entries)], level=6, extra_config={})


# A stored (level 0) gzip member: 10-byte header, 8-byte trailer and 5 bytes per deflate block of at most 64 KiB.
_GZIP_FIXED_OVERHEAD = 18
_GZIP_STORED_BLOCK = 65_535


def _filler_payload_size(target: int) -> int:
    """The file size whose one-file tar, stored in gzip, comes closest to ``target`` bytes without going over."""
    tar_overhead = 3 * _TAR_BLOCK  # one header block and the two end blocks
    payload = max(0, target - tar_overhead - _GZIP_FIXED_OVERHEAD - 5 * (target // _GZIP_STORED_BLOCK + 1))
    return payload - payload % _TAR_BLOCK


def filler_image(name: str, layer_sizes: list[int], seed: int) -> OciImage:
    """An image whose layers are gzip tars of one incompressible file each, each layer about ``layer_sizes[i]`` bytes.

    Content comes from ``random.Random(seed)``, so the same arguments give the same digests. The layers depend on the
    seed and the sizes only; ``name`` goes into the config (a label), so two names with one seed share layer blobs but
    not manifests. Random bytes do not compress, so the layers are gzip with stored blocks: valid and fast to build.
    """
    rng = random.Random(seed)
    tars = []
    for index, size in enumerate(layer_sizes):
        size_left, parts = _filler_payload_size(size), []
        while size_left:  # randbytes takes at most 2**28 - 1 bytes at a time
            parts.append(rng.randbytes(min(size_left, 1 << 27)))
            size_left -= len(parts[-1])
        payload = b"".join(parts)
        tars.append(_build_tar([_TarEntry(f"filler-{index}.bin", tarfile.REGTYPE, 0o644, data=payload)]))
    return _image_from_layers(tars, level=0, extra_config={"Labels": {"org.dfdaemon.test.name": name}})


# ---------------------------------------------------------------------------------------------------------------------
# Pushing


def http_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    fields: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    stream: bool = False,
) -> urllib3.BaseHTTPResponse:
    """One exchange as the tests need it: the raw answer, no retries and no redirect followed. ``fields`` go into
    the query string of a GET or HEAD; with ``stream`` the body is left to read (then ``release_conn``)."""
    return urllib3.request(
        method,
        url,
        headers=dict(headers or {}),
        body=body,
        fields=fields,
        timeout=timeout,
        retries=False,
        redirect=False,
        preload_content=not stream,
    )


def _raise_for(response: urllib3.BaseHTTPResponse, what: str, expected: tuple[int, ...]) -> None:
    if response.status not in expected:
        body = response.data[:500].decode(errors="replace")
        raise RegistryError(f"{what}: {response.url} gave {response.status}: {body}")


def _with_query(location: str, key: str, value: str) -> str:
    separator = "&" if "?" in location else "?"
    return f"{location}{separator}{key}={urllib.parse.quote(value, safe=':')}"


def push_image(
    registry_url: str,
    repository: str,
    tag: str,
    image: OciImage,
    *,
    headers: dict[str, str] | None = None,
) -> None:
    """Upload ``image`` as ``repository:tag`` (blobs first, skipping those the registry already has)."""
    base = registry_url.rstrip("/")
    auth = dict(headers or {})
    for blob in image.blobs:
        head = http_request("HEAD", f"{base}/v2/{repository}/blobs/{blob.digest}", headers=auth, timeout=60)
        if head.status == 200:
            continue
        _raise_for(head, f"checking blob {blob.digest}", (404,))
        started = http_request("POST", f"{base}/v2/{repository}/blobs/uploads/", headers=auth, timeout=60)
        _raise_for(started, "starting a blob upload", (202,))
        location = urllib.parse.urljoin(f"{base}/", started.headers["Location"])
        finished = http_request(
            "PUT",
            _with_query(location, "digest", blob.digest),
            body=blob.data,
            headers={**auth, "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        _raise_for(finished, f"uploading blob {blob.digest}", (201,))
    put = http_request(
        "PUT",
        f"{base}/v2/{repository}/manifests/{tag}",
        body=image.manifest,
        headers={**auth, "Content-Type": image.media_type},
        timeout=60,
    )
    _raise_for(put, f"putting manifest {repository}:{tag}", (201,))


# ---------------------------------------------------------------------------------------------------------------------
# Token authentication


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key id the distribution registry derives for a trusted key (libtrust's format).

    Base32 of the first 240 bits of the SHA-256 of the DER SubjectPublicKeyInfo, in 12 colon-separated groups of 4.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass
class TokenSigner:
    """An EC P-256 key with a self-signed certificate, signing registry bearer tokens (ES256)."""

    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    issuer: str
    service: str

    @classmethod
    def generate(cls, issuer: str = TOKEN_ISSUER, service: str = TOKEN_SERVICE) -> TokenSigner:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM), issuer=issuer, service=service)

    @property
    def key_id(self) -> str:
        return libtrust_key_id(self.key.public_key())

    def sign(self, subject: str, access: list[dict[str, Any]], lifetime: int = TOKEN_LIFETIME) -> str:
        """A compact JWS the registry accepts for ``access`` (a list of {type, name, actions})."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "kid": self.key_id}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        der_signature = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der_signature)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def parse_scopes(scope_params: list[str]) -> list[dict[str, Any]]:
    """Turn ``scope`` query values (``repository:NAME:pull,push``, space-separated when several) into access claims."""
    access: list[dict[str, Any]] = []
    for param in scope_params:
        for scope in param.split():
            resource_type, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if not resource_type or not name:
                continue
            access.append({"type": resource_type, "name": name, "actions": [a for a in actions.split(",") if a]})
    return access


class _TokenServer(ThreadingHTTPServer):
    daemon_threads = True
    signer: TokenSigner
    requests_seen: list[str]
    lock: threading.Lock


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenServer

    def do_GET(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query)
        with self.server.lock:
            self.server.requests_seen.append(self.path)
        service = query.get("service", [self.server.signer.service])[0]
        if parsed.path != "/token" or service != self.server.signer.service:
            self._reply(404 if parsed.path != "/token" else 400, {"errors": [{"message": "unknown service or path"}]})
            return
        # Anyone gets what they ask for: these tests are about carrying the token, not about who may have it.
        token = self.server.signer.sign(subject="anonymous", access=parse_scopes(query.get("scope", [])))
        issued = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._reply(200, {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME, "issued_at": issued})

    def _reply(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return


@contextlib.contextmanager
def _token_server(signer: TokenSigner) -> Iterator[_TokenServer]:
    server = _TokenServer(("127.0.0.1", 0), _TokenHandler)
    server.signer = signer
    server.requests_seen = []
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="registry-token-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------------------------------------------------------
# The registry process


_BLOB_PATH = re.compile(r"^/v2/.+/blobs/(?!uploads/)[^/?]+")
_AUTH_FAILED = "error authorizing context"
_SYNC_PARAM = "dfdaemon-test-log-sync"


@dataclass
class Registry:
    """A running distribution registry; see ``running_registry``."""

    host: str
    log_path: Path
    storage_dir: Path
    process: subprocess.Popen[bytes]
    token_realm: str | None = None
    token_service: str | None = None
    token_signer: TokenSigner | None = None
    _token_server: _TokenServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def token_requests(self) -> list[str]:
        """Paths (with query) the token server was asked for, oldest first."""
        if self._token_server is None:
            return []
        with self._token_server.lock:
            return list(self._token_server.requests_seen)

    def log_entries(self) -> list[dict[str, Any]]:
        """The registry's JSON log lines written so far (complete lines only)."""
        entries: list[dict[str, Any]] = []
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n") or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def request_entries(self) -> list[dict[str, Any]]:
        """One log entry per answered HTTP request, once every request made before this call has been logged.

        Answered requests log ``msg`` "response completed" (or "... with error") with ``http.response.status`` and
        ``http.response.written``; requests refused for want of a token log only "error authorizing context: ..."
        (no status; the answer was 401 with the Bearer challenge). Log-sync probes are left out.
        """
        self._sync_log()
        return [
            entry
            for entry in self.log_entries()
            if ("http.response.status" in entry or str(entry.get("msg", "")).startswith(_AUTH_FAILED))
            and _SYNC_PARAM not in entry.get("http.request.uri", "")
        ]

    def blob_requests(self) -> list[str]:
        """URIs of the GET requests for blobs (``/v2/<name>/blobs/<digest>``) the registry answered, any status.

        Includes those refused with 401 and those answered 404; ``blob_bytes_served`` counts only data served.
        """
        return [
            entry["http.request.uri"]
            for entry in self.request_entries()
            if entry.get("http.request.method") == "GET" and _BLOB_PATH.match(entry.get("http.request.uri", ""))
        ]

    def blob_bytes_served(self) -> int:
        """Body bytes the registry wrote for successful (2xx) blob GETs: the layer data it gave out."""
        total = 0
        for entry in self.request_entries():
            if entry.get("http.request.method") != "GET" or not _BLOB_PATH.match(entry.get("http.request.uri", "")):
                continue
            if 200 <= int(entry.get("http.response.status", 0)) < 300:
                total += int(entry.get("http.response.written", 0))
        return total

    def _sync_log(self, timeout: float = 5.0) -> None:
        # The registry logs a request after answering it; a marker request answered later is logged later, so waiting
        # for the marker's line makes every earlier request's line visible.
        marker = uuid.uuid4().hex
        with contextlib.suppress(urllib3.exceptions.HTTPError):
            http_request("GET", f"{self.url}/v2/", fields={_SYNC_PARAM: marker}, timeout=5.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker in entry.get("http.request.uri", "") for entry in self.log_entries()):
                return
            time.sleep(0.02)
        raise RegistryError(f"the registry did not log a request within {timeout}s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the registry process (SIGTERM, then SIGKILL); returns its exit status."""
        return stop_process(self.process, timeout=timeout)


def fetch_token(registry: Registry, scope: str) -> str:
    """A bearer token from ``registry``'s token server for ``scope`` (e.g. ``repository:NAME:pull,push``)."""
    if registry.token_realm is None:
        raise RegistryError("this registry was started without token_auth")
    query = {"service": registry.token_service or "", "scope": scope}
    response = http_request("GET", registry.token_realm, fields=query, timeout=10)
    _raise_for(response, "fetching a token", (200,))
    token = response.json().get("token")
    if not isinstance(token, str):
        raise RegistryError(f"the token server answered without a token: {response.data[:200]!r}")
    return token


def _registry_env() -> dict[str, str]:
    # REGISTRY_* variables override the config file; none from the caller's environment may leak in.
    return {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}


def _wait_ready(process: subprocess.Popen[bytes], log_path: Path, auth: bool, timeout: float) -> str:
    """Wait for the registry to listen and answer ``GET /v2/``; returns ``host:port``."""
    listening = re.compile(r'"msg":"listening on (127\.0\.0\.1:\d+)"')
    deadline = time.monotonic() + timeout
    host: str | None = None
    expected = 401 if auth else 200
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RegistryError(f"{REGISTRY_BINARY} exited with {process.returncode}:\n{tail(log_path)}")
        if host is None:
            match = listening.search(log_path.read_text(errors="replace")) if log_path.exists() else None
            host = match.group(1) if match else None
        if host is not None:
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                if http_request("GET", f"http://{host}/v2/", timeout=2.0).status == expected:
                    return host
        time.sleep(0.02)
    raise RegistryError(f"{REGISTRY_BINARY} was not ready within {timeout}s:\n{tail(log_path)}")


@contextlib.contextmanager
def running_registry(
    workdir: Path, *, token_auth: bool = False, users: Mapping[str, str] | None = None, timeout: float = 20.0
) -> Iterator[Registry]:
    """Run a distribution registry on 127.0.0.1 (ephemeral port) with its files under ``workdir``.

    With ``token_auth`` it demands bearer tokens from a token server this process runs in a thread (see
    ``Registry.token_realm`` and ``fetch_token``); with ``users`` (name to password) it demands HTTP basic auth
    checked against an htpasswd file of their bcrypt hashes. The registry is stopped when the block exits.
    """
    binary = find_binary(REGISTRY_BINARY)
    if binary is None:
        raise RegistryError(registry_skip_reason() or f"{REGISTRY_BINARY} not found")
    workdir.mkdir(parents=True, exist_ok=True)
    storage_dir = workdir / "registry-data"
    storage_dir.mkdir(exist_ok=True)
    log_path = workdir / "registry.log"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": "127.0.0.1:0", "secret": secrets.token_hex(16)},
    }
    with contextlib.ExitStack() as stack:
        signer: TokenSigner | None = None
        server: _TokenServer | None = None
        realm: str | None = None
        if token_auth:
            signer = TokenSigner.generate()
            server = stack.enter_context(_token_server(signer))
            realm = f"http://127.0.0.1:{server.server_address[1]}/token"
            bundle = workdir / "token-signer.pem"
            bundle.write_bytes(signer.cert_pem)
            config["auth"] = {
                "token": {
                    "realm": realm,
                    "service": signer.service,
                    "issuer": signer.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
        if users:
            htpasswd = workdir / "htpasswd"
            htpasswd.write_text(
                "".join(
                    f"{name}:{bcrypt.hashpw(word.encode(), bcrypt.gensalt(4)).decode()}\n"
                    for name, word in users.items()
                )
            )
            config["auth"] = {"htpasswd": {"realm": BASIC_REALM, "path": str(htpasswd)}}
        config_path = workdir / "registry.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # A fresh log per start: the port and the served-bytes counts are read from it.
        log_file = stack.enter_context(log_path.open("wb"))
        process = subprocess.Popen(
            [binary, "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=_registry_env(),
            start_new_session=True,
        )
        registry = Registry(
            host="",
            log_path=log_path,
            storage_dir=storage_dir,
            process=process,
            token_realm=realm,
            token_service=signer.service if signer else None,
            token_signer=signer,
            _token_server=server,
        )
        stack.callback(registry.stop)
        registry.host = _wait_ready(process, log_path, token_auth or bool(users), timeout)
        yield registry
