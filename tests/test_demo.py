"""The README's main job: the demo cluster walks through P2P and GC and exits cleanly with --once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow


def test_demo_cluster_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--once"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all three copies identical: True; origin bytes / file size = 1.0" in out.stdout
    assert "busybox layers still cached: True" in out.stdout
    assert "container:busybox" in out.stdout
    assert "Traceback" not in out.stderr
