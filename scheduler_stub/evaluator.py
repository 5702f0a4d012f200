"""Parent scoring as the Go scheduler's default evaluator does it, so the stub ranks parents the way a real
cluster would.

score = 0.6 * load quality + 0.2 * IDC affinity + 0.1 * location affinity + 0.1 * host type, each part in [0, 1].
Load quality = 0.5 * free peak bandwidth + 0.3 * free bandwidth over a 60 s window + 0.2 * concurrency, all three
judged against the ``max_tx_bandwidth`` the parent's host announced (bits/s): a host announcing 0 gets no load
score at all, which is why a daemon must report its NIC speed. The host's current load is the scheduler's own
bookkeeping of the children it sent to that host, not anything the host reports.
"""

from __future__ import annotations

from dataclasses import dataclass

LOAD_WEIGHT = 0.6
IDC_WEIGHT = 0.2
LOCATION_WEIGHT = 0.1
HOST_TYPE_WEIGHT = 0.1

PEAK_BANDWIDTH_WEIGHT = 0.5
BANDWIDTH_DURATION_WEIGHT = 0.3
CONCURRENCY_WEIGHT = 0.2

# Seconds over which the bytes a host is uploading are spread when judging its sustained load.
DURATION_WINDOW = 60
# The piece length upstream assumes when asking how many pieces in flight saturate a host's bandwidth.
REFERENCE_PIECE_LENGTH = 16 * 1024 * 1024
# Location strings are "country|province|city|zone|cluster"; at most this many levels count.
LOCATION_LEVELS = 5
LOCATION_SEPARATOR = "|"

NORMAL_HOST = 0


@dataclass(frozen=True)
class Network:
    """Where a host is and what it can send, as its AnnounceHost said."""

    idc: str = ""
    location: str = ""
    max_tx_bandwidth: int = 0  # bits/s


@dataclass(frozen=True)
class Load:
    """What a host is uploading right now, by the scheduler's count of the children it was given."""

    tx_bandwidth: int = 0  # bits/s: piece length x concurrent pieces x 8 of every child
    upload_content_length: int = 0  # bytes: the content length of every child's task
    concurrent_upload_pieces: int = 0


NO_NETWORK = Network()
IDLE = Load()


@dataclass(frozen=True)
class Candidate:
    """One parent as the evaluator sees it. ``seed_running`` says a seed host's peer is fetching from other peers
    (upstream scores such a seed highest on host type, and a seed peer in any other state lowest)."""

    host_type: int
    network: Network
    load: Load = IDLE
    seed_running: bool = False


def score(parent: Candidate, child: Network) -> float:
    """The parent's score for this child, 0 (worst) to 1 (best)."""
    return (
        LOAD_WEIGHT * load_quality(parent.network.max_tx_bandwidth, parent.load)
        + IDC_WEIGHT * idc_affinity(parent.network.idc, child.idc)
        + LOCATION_WEIGHT * location_affinity(parent.network.location, child.location)
        + HOST_TYPE_WEIGHT * host_type_score(parent)
    )


def load_quality(max_tx_bandwidth: int, load: Load) -> float:
    if max_tx_bandwidth <= 0:
        return 0.0
    peak = max(0.0, 1.0 - load.tx_bandwidth / max_tx_bandwidth)
    if load.upload_content_length == 0:
        duration = 1.0
    else:
        duration = max(0.0, 1.0 - load.upload_content_length * 8 / max_tx_bandwidth / DURATION_WINDOW)
    return (
        PEAK_BANDWIDTH_WEIGHT * peak
        + BANDWIDTH_DURATION_WEIGHT * duration
        + CONCURRENCY_WEIGHT * concurrency(max_tx_bandwidth, load.concurrent_upload_pieces)
    )


def concurrency(max_tx_bandwidth: int, pieces_in_flight: int) -> float:
    """1 while the pieces in flight do not exceed what the bandwidth carries, then falling as 1/overload."""
    saturating = max_tx_bandwidth / REFERENCE_PIECE_LENGTH / 8
    if saturating <= 1.0:
        return 0.0
    if pieces_in_flight <= saturating:
        return 1.0
    return saturating / pieces_in_flight


def idc_affinity(parent: str, child: str) -> float:
    return 1.0 if parent and child and parent.casefold() == child.casefold() else 0.0


def location_affinity(parent: str, child: str) -> float:
    """The share of the leading location levels both hosts have in common."""
    if not parent or not child:
        return 0.0
    if parent.casefold() == child.casefold():
        return 1.0
    matched = 0
    levels = zip(parent.split(LOCATION_SEPARATOR), child.split(LOCATION_SEPARATOR), strict=False)
    for ours, theirs in list(levels)[:LOCATION_LEVELS]:
        if ours.casefold() != theirs.casefold():
            break
        matched += 1
    return matched / LOCATION_LEVELS


def host_type_score(parent: Candidate) -> float:
    """A normal host scores 0.5; a seed scores 1 while its peer is running, else 0."""
    if parent.host_type == NORMAL_HOST:
        return 0.5
    return 1.0 if parent.seed_running else 0.0
