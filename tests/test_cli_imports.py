"""The CLIs start fast: importing one must not pull in the daemon's machinery.

Tests and users start ``dfget`` and ``dfctl`` hundreds of times; the origin client (aiohttp), storage, GC, the
download manager, the configuration models and tracing together once tripled their start-up time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

HEAVY = (
    "aiohttp",
    "dfdaemon.storage",
    "dfdaemon.gc",
    "dfdaemon.download.manager",
    "dfdaemon.config",
    "dfdaemon.telemetry.tracing",
    "pydantic",
    "rich",
)


def _modules_after_import(module: str) -> set[str]:
    script = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True
    )
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("cli", ["dfdaemon.cli.dfget", "dfdaemon.cli.dfctl"])
def test_cli_imports_nothing_heavy(cli: str) -> None:
    loaded = _modules_after_import(cli)
    assert cli in loaded
    assert sorted(name for name in HEAVY if name in loaded) == []


def test_the_probe_sees_heavy_imports() -> None:
    """The probe itself works: the download manager, which the daemon imports, brings in what the CLIs must not."""
    loaded = _modules_after_import("dfdaemon.download.manager")
    assert {"aiohttp", "dfdaemon.storage", "dfdaemon.gc", "dfdaemon.download.manager"} <= loaded
