"""GC under disk pressure on a real small filesystem: a tmpfs mounted for the test, a real daemon process on it.

The filesystem is filled from outside the cache (a plain file); GC must evict unheld tasks until the filesystem is
under its low mark, keep held ones, and say why in its record. An output file hard-linked to a cached task keeps
its bytes on the disk after eviction, so that eviction must report 0 bytes freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.storage_support import seeded_bytes
from tests.support import DaemonProcess, dfctl_json, dfget, running_daemon, running_origin

MiB = 1024 * 1024
FS_SIZE = 256 * MiB
HIGH, LOW = FS_SIZE * 80 // 100, FS_SIZE * 60 // 100
TASK_SIZE = 16 * MiB
# How long GC may take to notice, a generous bound for a shared machine; the assertions never depend on it.
DEADLINE = 60.0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 MiB tmpfs, unmounted afterwards whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mountpoint)], check=True, timeout=30)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True, timeout=30)


def fs_used(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bavail) * stat.f_frsize


def fill(path: Path, nbytes: int) -> None:
    """A plain file that is no part of the cache."""
    with path.open("wb") as f:
        for _ in range(nbytes // MiB):
            f.write(b"\xa5" * MiB)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(daemon: DaemonProcess, url: str, output: Path) -> str:
    """dfget one file; returns its task id."""
    done = dfget(daemon, url, output, "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout.splitlines()[-1])["task_id"])


def wait_for_run(daemon: DaemonProcess, predicate: Any) -> dict[str, Any]:
    """The newest GC run matching ``predicate``, polled until it appears."""
    deadline = time.monotonic() + DEADLINE
    while True:
        runs = dfctl_json(daemon, "gc", "report", "--limit", "20")["runs"]
        matching = [run for run in runs if predicate(run)]
        if matching:
            return dict(matching[0])
        assert time.monotonic() < deadline, f"no matching GC run; the daemon logged:\n{daemon.log()[-3000:]}"
        time.sleep(0.2)


def config(storage: Path, interval: str) -> dict[str, Any]:
    return {
        "storage": {"dir": str(storage)},
        "gc": {"interval": interval, "policy": {"gracePeriod": "0s", "taskTTL": "24h"}},
    }


def test_filesystem_filled_from_outside_evicts_unheld_tasks_down_to_the_low_mark(
    tmp_path: Path, small_fs: Path
) -> None:
    with running_origin(tmp_path / "origin") as origin:
        for i in range(7):
            (origin.root / f"f{i}.bin").write_bytes(seeded_bytes("test_disk_pressure-1", TASK_SIZE if i < 6 else MiB))
        # Only the growth listener runs GC here: the periodic run waits an hour.
        with running_daemon(tmp_path / "daemon", config(small_fs / "storage", "1h")) as daemon:
            ids = [download(daemon, origin.url(f"f{i}.bin"), tmp_path / f"f{i}.bin") for i in range(6)]
            dfctl_json(daemon, "use", "acquire", "--holder", "pod:default/trainer", ids[0])  # the oldest, held
            # 97 MiB of cache plus 116 MiB from outside: over the 80% mark; four unheld tasks bring it under 60%.
            fill(small_fs / "outside.bin", 116 * MiB)
            assert fs_used(small_fs) >= HIGH
            download(daemon, origin.url("f6.bin"), tmp_path / "f6.bin")  # the cache grows: GC looks at the disk
            run = wait_for_run(daemon, lambda r: r["trigger"] == "disk" and r["evicted"])

            evicted = {e["task_id"]: e for e in run["evicted"]}
            assert set(evicted) == set(ids[1:5])  # least recently used first, the held one never
            assert {e["reason"] for e in evicted.values()} == {"disk"}
            assert all(e["bytes"] == TASK_SIZE for e in evicted.values())  # each freed its whole file
            assert fs_used(small_fs) < LOW
            held = {s["task_id"]: s for s in run["skipped"]}[ids[0]]
            assert (held["reason"], held["holders"]) == ("held", ["pod:default/trainer"])
            left = {t["task_id"] for t in dfctl_json(daemon, "task", "ls")["tasks"]}
            assert ids[0] in left and ids[5] in left and not left & set(ids[1:5])
            # The held task's bytes are intact.
            again = tmp_path / "again.bin"
            download(daemon, origin.url("f0.bin"), again)
            assert sha256(again) == sha256(origin.root / "f0.bin")
            assert origin.bytes_served("f0.bin") == TASK_SIZE  # served from the cache, not fetched again


def test_evicting_a_task_whose_output_is_a_hard_link_frees_nothing(tmp_path: Path, small_fs: Path) -> None:
    with running_origin(tmp_path / "origin") as origin:
        for name in ("linked.bin", "copied.bin"):
            (origin.root / name).write_bytes(seeded_bytes("test_disk_pressure-2", 2 * TASK_SIZE))
        with running_daemon(tmp_path / "daemon", config(small_fs / "storage", "1s")) as daemon:
            linked_output = small_fs / "linked.bin"  # on the cache's filesystem: the daemon hard-links it
            linked = download(daemon, origin.url("linked.bin"), linked_output)
            assert linked_output.stat().st_nlink == 2
            copied = download(daemon, origin.url("copied.bin"), tmp_path / "copied.bin")  # another filesystem
            # 64 MiB of cache (one of them shared with the output file) plus 150 MiB from outside: over 80%. Counted
            # as the cache's usage before plus the new file: the interval's GC may evict while the file grows.
            cached = fs_used(small_fs)
            fill(small_fs / "outside.bin", 150 * MiB)
            before = cached + (small_fs / "outside.bin").stat().st_blocks * 512
            assert before >= HIGH
            run = wait_for_run(daemon, lambda r: r["trigger"] == "interval" and r["evicted"])

            freed = {e["task_id"]: (e["reason"], e["bytes"]) for e in run["evicted"]}
            assert freed == {linked: ("disk", 0), copied: ("disk", 2 * TASK_SIZE)}
            after = fs_used(small_fs)
            # Only the copied task's bytes left the disk: the linked ones are still there, under the output file.
            assert 2 * TASK_SIZE - 4 * MiB <= before - after <= 2 * TASK_SIZE + 4 * MiB
            assert after > LOW  # nothing evictable is left, and the record says each task was taken for the disk
            assert linked_output.stat().st_nlink == 1
            assert sha256(linked_output) == sha256(origin.root / "linked.bin")


def test_dfget_says_link_or_copy_and_a_transferred_copy_frees_its_bytes(tmp_path: Path, small_fs: Path) -> None:
    with running_origin(tmp_path / "origin") as origin:
        for name in ("a.bin", "b.bin"):
            (origin.root / name).write_bytes(seeded_bytes("test_disk_pressure-3", TASK_SIZE))
        with running_daemon(tmp_path / "daemon", config(small_fs / "storage", "1h")) as daemon:
            linked = dfget(daemon, origin.url("a.bin"), small_fs / "a.bin")
            assert linked.returncode == 0, linked.stderr
            assert "hard link" in linked.stdout and (small_fs / "a.bin").stat().st_nlink == 2
            # Asked for the bytes, dfget writes a copy even on the cache's own filesystem.
            copied = dfget(daemon, origin.url("b.bin"), small_fs / "b.bin", "--transfer-from-dfdaemon", "--json")
            assert copied.returncode == 0, copied.stderr
            document = json.loads(copied.stdout)
            assert document["written_as"] == "copy" and (small_fs / "b.bin").stat().st_nlink == 1
            assert sha256(small_fs / "b.bin") == sha256(origin.root / "b.bin")
            assert not [p.name for p in small_fs.iterdir() if p.name.startswith(".dfget-")]

            before = fs_used(small_fs)
            removed = dfctl_json(daemon, "task", "rm", "--force", document["task_id"])
            assert removed["bytes"] == TASK_SIZE  # no other link: the cache file's bytes really went
            assert before - fs_used(small_fs) >= TASK_SIZE - MiB
            assert sha256(small_fs / "b.bin") == sha256(origin.root / "b.bin")
