"""``dfscheduler --manager``: the embedded scheduler answers ListSchedulers naming itself, so a daemon set up with
``manager.addr`` (as in a real cluster) finds it through discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import run_module, running_daemon, running_scheduler, wait_for_hosts, wait_for_line

pytestmark = pytest.mark.slow


def test_daemon_discovers_the_embedded_scheduler_through_its_manager_role(tmp_path: Path) -> None:
    with running_scheduler(tmp_path / "scheduler", args=["--manager"]) as scheduler:
        wait_for_line(scheduler.log_path, rf"manager.addr http://{scheduler.address}", scheduler.proc)
        config = {"manager": {"addr": f"http://{scheduler.address}"}, "scheduler": {"announceInterval": "2s"}}
        with running_daemon(tmp_path / "peer", config) as daemon:
            assert f"scheduling through {scheduler.address}\n" in daemon.log()
            assert "scheduler.addrs" not in daemon.log()  # no fallback
            wait_for_hosts(scheduler, 1)
        assert "ListSchedulers from peer (127.0.0.1)" in scheduler.log_path.read_text()


def test_manager_role_needs_an_ip_to_advertise() -> None:
    result = run_module("scheduler_stub", "--listen", "localhost:0", "--manager")
    assert result.returncode == 2
    assert result.stderr.strip() == "dfscheduler: --manager needs --listen with an IP address, not 'localhost'"
