"""The Go scheduler's default parent score, as the stub computes it, and how a real daemon's AnnounceHost fares."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfdaemon.api import scheduler_pb2
from scheduler_stub.evaluator import IDLE, REFERENCE_PIECE_LENGTH, Candidate, Load, Network, score
from tests.support import peer_config, running_daemon, running_scheduler, wait_for_hosts

TEN_GBIT = 10_000_000_000
NO_AFFINITY = Network()


def normal(max_tx: int = TEN_GBIT, load: Load = IDLE, idc: str = "", location: str = "") -> Candidate:
    return Candidate(host_type=0, network=Network(idc, location, max_tx), load=load)


def test_idle_host_with_bandwidth_scores_065_and_one_reporting_none_005() -> None:
    # 0.6 * (0.5 + 0.3 + 0.2) + 0.1 * 0.5: the figures PROTOCOL.md gives for an idle Rust peer and a silent one.
    assert score(normal(), NO_AFFINITY) == pytest.approx(0.65)
    assert score(normal(max_tx=0), NO_AFFINITY) == pytest.approx(0.05)


def test_idc_and_location_affinity() -> None:
    child = Network(idc="IDC-A", location="cn|zj|hz|zone-a|c1")
    assert score(normal(idc="idc-a"), child) == pytest.approx(0.85)  # case does not matter
    assert score(normal(idc="idc-b"), child) == pytest.approx(0.65)
    # Two leading levels of five in common: 0.1 * 2/5.
    assert score(normal(location="cn|zj|nb|zone-b|c2"), child) == pytest.approx(0.69)
    assert score(normal(location="CN|ZJ|HZ|ZONE-A|C1"), child) == pytest.approx(0.75)
    assert score(normal(location="us|ca"), child) == pytest.approx(0.65)
    assert score(normal(idc="idc-a"), NO_AFFINITY) == pytest.approx(0.65)  # a child without an IDC matches none


def test_load_from_bandwidth_in_use_content_and_pieces_in_flight() -> None:
    half_peak = Load(tx_bandwidth=TEN_GBIT // 2)
    assert score(normal(load=half_peak), NO_AFFINITY) == pytest.approx(0.6 * (0.25 + 0.3 + 0.2) + 0.05)
    # Content worth 30 s of the link: half the 60 s window.
    half_window = Load(upload_content_length=TEN_GBIT // 8 * 30)
    assert score(normal(load=half_window), NO_AFFINITY) == pytest.approx(0.6 * (0.5 + 0.15 + 0.2) + 0.05)
    saturated = Load(tx_bandwidth=TEN_GBIT, upload_content_length=TEN_GBIT // 8 * 60)
    assert score(normal(load=saturated), NO_AFFINITY) == pytest.approx(0.6 * 0.2 + 0.05)


def test_concurrency_falls_past_what_the_link_carries() -> None:
    ten_pieces = REFERENCE_PIECE_LENGTH * 8 * 10  # the bandwidth that ten 16 MiB pieces a second fill
    at_capacity = normal(max_tx=ten_pieces, load=Load(concurrent_upload_pieces=10))
    assert score(at_capacity, NO_AFFINITY) == pytest.approx(0.65)
    overloaded = normal(max_tx=ten_pieces, load=Load(concurrent_upload_pieces=20))
    assert score(overloaded, NO_AFFINITY) == pytest.approx(0.6 * (0.5 + 0.3 + 0.1) + 0.05)
    # A link that does not carry even one such piece gets no concurrency score at all.
    assert score(normal(max_tx=REFERENCE_PIECE_LENGTH * 8), NO_AFFINITY) == pytest.approx(0.6 * 0.8 + 0.05)


def test_seed_scores_highest_while_running_and_lowest_otherwise() -> None:
    running = Candidate(host_type=1, network=Network(max_tx_bandwidth=TEN_GBIT), seed_running=True)
    other = Candidate(host_type=1, network=Network(max_tx_bandwidth=TEN_GBIT))
    assert score(running, NO_AFFINITY) == pytest.approx(0.7)
    assert score(other, NO_AFFINITY) == pytest.approx(0.6)


def test_a_real_daemons_announcement_scores_like_an_idle_host_with_its_nic_speed(tmp_path: Path) -> None:
    with (
        running_scheduler(tmp_path / "scheduler") as scheduler,
        running_daemon(tmp_path / "peer", peer_config(scheduler)),
    ):
        wait_for_hosts(scheduler, 1)
        (host,) = scheduler.stub().ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5).hosts
    announced = host.network
    assert announced.max_tx_bandwidth > 0, "the daemon announced no transmit bandwidth"
    daemon = Candidate(host.type, Network(announced.idc, announced.location, announced.max_tx_bandwidth))
    idle = normal(max_tx=announced.max_tx_bandwidth)
    child = NO_AFFINITY
    assert abs(score(daemon, child) - score(idle, child)) <= 0.1
    assert score(daemon, child) > 0.5
