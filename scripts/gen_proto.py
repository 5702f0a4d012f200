"""Regenerate the protobuf and gRPC modules in ``dfdaemon/api`` from ``proto/``.

Usage: ``python scripts/gen_proto.py [OUT_DIR]`` (default: ``dfdaemon/api``).
The generated modules import each other relatively so that they live inside
the ``dfdaemon.api`` package instead of on the top level of ``sys.path``.
Type stubs (``*_pb2.pyi``, ``*_pb2_grpc.pyi``) come from mypy-protobuf's plugins.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "dfdaemon" / "api"

# "import common_pb2 as common__pb2" -> "from . import common_pb2 as common__pb2"
_SIBLING_IMPORT = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.MULTILINE)
# In .pyi stubs: "import common_pb2 as _common_pb2" and "from common_pb2 import X"
_SIBLING_FROM = re.compile(r"^from (\w+_pb2) import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def _relativise(path: Path, local_modules: set[str]) -> None:
    text = path.read_text()

    def fix_import(match: re.Match[str]) -> str:
        module, alias = match.group(1), match.group(2) or ""
        if module not in local_modules:
            return match.group(0)
        return f"from . import {module}{alias}"

    def fix_from(match: re.Match[str]) -> str:
        module = match.group(1)
        if module not in local_modules:
            return match.group(0)
        return f"from .{module} import "

    text = _SIBLING_IMPORT.sub(fix_import, text)
    text = _SIBLING_FROM.sub(fix_from, text)
    path.write_text(text)


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugins, installed beside this interpreter."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the test extras (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every file in proto/ and return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = proto_files()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(f.relative_to(PROTO_DIR)) for f in files),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    local_modules = {f"{f.stem}_pb2" for f in files}
    written = sorted(
        p for p in out_dir.iterdir() if p.suffix in {".py", ".pyi"} and p.stem.endswith(("_pb2", "_pb2_grpc"))
    )
    for path in written:
        _relativise(path, local_modules)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf and gRPC modules; regenerate with scripts/gen_proto.py."""\n')
    return written


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out.parent.parent) if out == DEFAULT_OUT else path)


if __name__ == "__main__":
    main()
