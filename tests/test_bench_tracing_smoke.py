"""The tracing benchmark still runs end to end on a small file; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROWS = (
    "(a) tracing off",
    "(b) on, samplingRatio 0 / (a)",
    "(c) on, all sampled, OTLP/gRPC / (a)",
)


@pytest.mark.slow
def test_bench_tracing_quick_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench_tracing.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.split()[:2] == ["benchmark", "measured"]), None)
    assert header is not None, result.stdout
    assert lines[header].split() == ["benchmark", "measured", "against", "ratio", "ideal"]
    ratio_end = lines[header].index("ratio") + len("ratio")  # the ratio column is right-aligned
    table = lines[header + 1 :]
    for name in ROWS:
        row = next((line for line in table if line.startswith(name)), None)
        assert row is not None, f"no row {name!r} in:\n{result.stdout}"
        assert row[len(name) :].split()[1] == "MB/s", row
        assert _is_number(row[:ratio_end].split()[-1]), row
    assert any(line.startswith("note: b/a = ") for line in table), result.stdout


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
