"""The committed modules in dfdaemon/api are exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT

API_DIR = REPO_ROOT / "dfdaemon" / "api"

# Version stamps of the generator itself; a newer grpcio-tools may change these and nothing else.
_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
]


def _normalise(text: str) -> str:
    for stamp in _STAMPS:
        text = stamp.sub(lambda m: m.group(1) if m.groups() else "", text)
    return text


def _generated_files(directory: Path) -> dict[str, str]:
    return {
        path.name: _normalise(path.read_text())
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix in {".py", ".pyi"}
    }


def test_committed_api_matches_proto(tmp_path: Path) -> None:
    out = tmp_path / "api"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_proto.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh = _generated_files(out)
    committed = _generated_files(API_DIR)
    assert sorted(fresh) == sorted(committed), "generated file set differs: run scripts/gen_proto.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"dfdaemon/api is stale for {stale}: run scripts/gen_proto.py"


def test_every_proto_has_generated_modules() -> None:
    for proto in sorted((REPO_ROOT / "proto").glob("*.proto")):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (API_DIR / f"{proto.stem}{suffix}").is_file(), f"{proto.stem}{suffix} missing"
