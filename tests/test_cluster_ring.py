"""Upstream's scheduler ring: SipHash-2-4 vectors, PROTOCOL.md's IPv4 vectors, and IPv6 vectors of our own.

The IPv6 numbers were computed with ``reference_siphash24`` below, a separate pure-Python SipHash-2-4 written
from the paper and checked against the paper's own vector, so the ring's hashing (the ``siphashc`` package)
is compared with an independent implementation rather than with itself.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from siphashc import siphash

from dfdaemon.cluster.ring import HashRing, node_hash, task_hash
from dfdaemon.rpc.scheduler_client import HostInfo, SchedulerClient

_MASK = (1 << 64) - 1


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def reference_siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 as the paper (Aumasson and Bernstein, 2012) defines it."""
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def sip_round() -> None:
        v[0] = (v[0] + v[1]) & _MASK
        v[1] = _rotl(v[1], 13) ^ v[0]
        v[0] = _rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & _MASK
        v[3] = _rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & _MASK
        v[3] = _rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & _MASK
        v[1] = _rotl(v[1], 17) ^ v[2]
        v[2] = _rotl(v[2], 32)

    whole = len(data) // 8 * 8
    words = [struct.unpack_from("<Q", data, i)[0] for i in range(0, whole, 8)]
    words.append(((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little"))
    for word in words:
        v[3] ^= word
        sip_round()
        sip_round()
        v[0] ^= word
    v[2] ^= 0xFF
    for _ in range(4):
        sip_round()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


PAPER_KEY = bytes(range(16))
PAPER_MESSAGE = bytes(range(15))
PAPER_DIGEST = 0xA129CA6149BE45E5  # the paper's appendix A


def test_siphash_matches_the_paper_vector() -> None:
    assert reference_siphash24(PAPER_KEY, PAPER_MESSAGE) == PAPER_DIGEST
    assert siphash(PAPER_KEY, PAPER_MESSAGE) == PAPER_DIGEST


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 31])
def test_siphash_matches_the_reference_on_every_tail_length(length: int) -> None:
    data = bytes(range(100, 100 + length))
    assert siphash(PAPER_KEY, data) == reference_siphash24(PAPER_KEY, data)


# PROTOCOL.md, "Which scheduler owns a task".
IPV4 = {
    "10.0.0.1:8002": 11045254673571024366,
    "10.0.0.2:8002": 4348847603351778578,
    "10.0.0.3:8002": 4589980318568480855,
}
# Computed with reference_siphash24 over u64 LE 1 + 16 octets + port u16 LE + flowinfo u32 0 + scope u32 0.
IPV6 = {
    "[fd00::1]:8002": 2151880730393261331,
    "[fd00::2]:8002": 17219772246076402963,
    "[2001:db8::17]:65003": 16320463009085862728,
}
TASK_KEYS = {
    "27554": 10066931649679665691,
    "06408": 15470567515844578193,
    "00000": 3613695785626336352,
    "00001": 16475690096564924760,
    "00047": 4432500788564861427,
    "abcde": 17639949557903276638,
}


@pytest.mark.parametrize(("address", "expected"), [*IPV4.items(), *IPV6.items()])
def test_node_hashes(address: str, expected: int) -> None:
    assert node_hash(address) == expected


def test_ipv6_vectors_follow_the_documented_layout() -> None:
    ip = ipaddress.ip_address("2001:db8::17")
    data = struct.pack("<Q", 1) + ip.packed + struct.pack("<HII", 65003, 0, 0)
    assert reference_siphash24(bytes(16), data) == IPV6["[2001:db8::17]:65003"]


@pytest.mark.parametrize(("prefix", "expected"), TASK_KEYS.items())
def test_task_key_hashes_use_five_characters(prefix: str, expected: int) -> None:
    assert task_hash(prefix + "f" * 59) == expected
    assert reference_siphash24(bytes(16), prefix.encode() + b"\xff") == expected


@pytest.mark.parametrize(
    ("prefix", "owner"),
    [
        ("27554", "10.0.0.1:8002"),
        ("06408", "10.0.0.2:8002"),  # above every node: wraps to the lowest
        ("00000", "10.0.0.2:8002"),  # below every node
        ("00047", "10.0.0.3:8002"),
    ],
)
def test_ipv4_ring_picks_as_protocol_says(prefix: str, owner: str) -> None:
    ring = HashRing(list(IPV4))
    assert ring.pick(prefix + "0" * 59) == owner


@pytest.mark.parametrize(
    ("prefix", "owner"),
    [
        ("00000", "[2001:db8::17]:65003"),  # 3.6e18 -> next node up
        ("00001", "[fd00::2]:8002"),  # between 2001:db8::17 and fd00::2
        ("abcde", "[fd00::1]:8002"),  # above every node: wraps to the lowest
        ("27554", "[2001:db8::17]:65003"),
    ],
)
def test_ipv6_ring_picks(prefix: str, owner: str) -> None:
    ring = HashRing(list(reversed(IPV6)))
    assert ring.pick(prefix + "9" * 59) == owner


def test_removing_a_scheduler_moves_only_its_tasks() -> None:
    before = HashRing(list(IPV4))
    after = HashRing(["10.0.0.2:8002", "10.0.0.3:8002"])
    for prefix in TASK_KEYS:
        owner = before.pick(prefix)
        if owner != "10.0.0.1:8002":
            assert after.pick(prefix) == owner


def test_an_empty_ring_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        HashRing([])


async def test_scheduler_client_routes_task_calls_by_the_ring() -> None:
    host = HostInfo(host_id="127.0.0.1-ring", ip="127.0.0.1", hostname="ring", port=4000)
    client = SchedulerClient(list(IPV4), host, announce_interval=60, timeout=1)
    try:
        assert client.address_for("27554" + "a" * 59) == "10.0.0.1:8002"
        assert client.address_for("06408" + "a" * 59) == "10.0.0.2:8002"
        await client.set_addresses(["10.0.0.2:8002", "10.0.0.3:8002"])
        assert client.address_for("27554" + "a" * 59) == "10.0.0.2:8002"
    finally:
        await client.close()
