"""scripts/bench_bandwidth.py runs end to end in a few seconds per case; its ratios are printed, not asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO_ROOT
from tests.test_bench_scripts import ratio_table, run_script

pytestmark = pytest.mark.slow


def test_bench_bandwidth_prints_a_ratio_for_each_limit_and_the_unlimited_case() -> None:
    lines = run_script("scripts/bench_bandwidth.py", "--seconds", "4", "--rate", "4MB", timeout=300)
    rows = ratio_table(
        lines,
        ("upload.bandwidthLimit", "download.bandwidthLimit", "download.backToSourceBandwidthLimit", "unlimited"),
    )
    assert "4 MB/s configured" in rows["upload.bandwidthLimit"]
    assert "4 MB/s tested limit" in rows["unlimited"]


def test_bench_bandwidth_refuses_a_bad_rate_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench_bandwidth.py", "--rate", "fast"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--rate: invalid size 'fast'" in result.stderr
    assert "Traceback" not in result.stderr
