"""The benchmark scripts still run: a tiny cache through the whole script, no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gc_runs_on_a_small_cache() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench_gc.py", "--tasks", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    header = next((line for line in result.stdout.splitlines() if line.split()[:2] == ["tasks", "held"]), None)
    assert header is not None, result.stdout
    for column in ("no-evict pass s", "evict pass s", "ms/evict", "dry run s", "peak RSS MiB"):
        assert column in header
