"""The benchmark scripts still run end to end on small inputs; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.registry_support import registry_skip_reason
from tests.support import REPO_ROOT


def run_script(*args: str, timeout: float) -> list[str]:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def ratio_table(lines: list[str], rows: tuple[str, ...]) -> dict[str, str]:
    """The rows of a ``benchmark measured against ratio ideal`` table, by name, each with a numeric ratio."""
    header = next((i for i, line in enumerate(lines) if line.split()[:2] == ["benchmark", "measured"]), None)
    assert header is not None, "\n".join(lines)
    assert lines[header].split() == ["benchmark", "measured", "against", "ratio", "ideal"]
    ratio_end = lines[header].index("ratio") + len("ratio")  # the ratio column is right-aligned
    found = {}
    for name in rows:
        row = next((line for line in lines[header + 1 :] if line.startswith(name)), None)
        assert row is not None, f"no row {name!r} in:\n" + "\n".join(lines)
        float(row[:ratio_end].split()[-1])  # raises unless the ratio is a number
        found[name] = row
    return found


def test_bench_gc_runs_on_a_small_cache() -> None:
    lines = run_script("scripts/bench_gc.py", "--tasks", "200", timeout=300)
    header = next((line for line in lines if line.split()[:2] == ["tasks", "held"]), None)
    assert header is not None, "\n".join(lines)
    for column in ("no-evict pass s", "evict pass s", "ms/evict", "dry run s", "peak RSS MiB"):
        assert column in header


@pytest.mark.slow
def test_bench_p2p_quick_prints_its_table() -> None:
    lines = run_script("scripts/bench_p2p.py", "--quick", "--peers", "3", timeout=180)
    ratio_table(
        lines,
        (
            "piece throughput: vortex / raw TCP",
            "piece throughput: DownloadPiece / raw TCP",
            "dfget P2P / direct HTTP",
            "dfget back-to-source / direct HTTP",
            "peak RSS / file size, P2P child daemon",
            "origin bytes / file size, 3 peers at once",
            "RSS after 50 / after 5 downloads",
        ),
    )


@pytest.mark.slow
def test_bench_p2p_floors_quick_prints_the_floors_beside_dfget() -> None:
    lines = run_script("scripts/bench_p2p.py", "--quick", "floors", timeout=120)
    ratio_table(
        lines,
        (
            "dfget P2P / direct HTTP",
            "dfget back-to-source / direct HTTP, CRCed and synced",
            "direct HTTP, CRCed and synced / direct HTTP",
            "dfget P2P / bare vortex receiver",
            "bare vortex receiver / direct HTTP",
            "bare receiver, unsynced / direct HTTP",
        ),
    )
    assert not any(line.startswith("piece throughput") for line in lines), "floors runs dfget, not throughput"


@pytest.mark.slow
def test_bench_tracing_quick_prints_its_table() -> None:
    lines = run_script("scripts/bench_tracing.py", "--quick", timeout=120)
    rows = ratio_table(
        lines, ("(a) tracing off", "(b) on, samplingRatio 0 / (a)", "(c) on, all sampled, OTLP/gRPC / (a)")
    )
    for name, row in rows.items():
        assert row[len(name) :].split()[1] == "MB/s", row
    assert any(line.startswith("note: b/a = ") for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(registry_skip_reason() is not None, reason=str(registry_skip_reason()))
def test_bench_mirror_quick_prints_its_table() -> None:
    # The script itself fails unless every blob through the mirror hashes to its digest and the cached fetch took
    # nothing from the registry.
    lines = run_script("scripts/bench_mirror.py", "--quick", timeout=120)
    ratio_table(
        lines,
        (
            "cold: mirror / direct",
            "cached: mirror / direct",
            "first-byte: mirror cold / direct",
            "first-byte: mirror cold / whole fetch",
            "memory: daemon peak RSS after cold / blob",
            "memory: daemon peak RSS after cached / blob",
        ),
    )


def test_bench_storage_writes_quick_prints_its_table() -> None:
    lines = run_script("scripts/bench_storage_writes.py", "--quick", timeout=120)
    ratio_table(lines, ("write calls: 256 KiB / 2 MiB", "warm memory / settled memory", "crc: zlib-ng / zlib"))
