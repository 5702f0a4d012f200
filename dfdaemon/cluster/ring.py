"""Which scheduler owns a task, computed exactly as upstream's peers do so that mixed clusters agree.

Upstream keeps a consistent-hash ring with one entry per scheduler (no virtual nodes) hashed with SipHash-2-4 under
the all-zero key. A scheduler's entry hashes its socket address as Rust's ``Hash`` for ``SocketAddr`` feeds it to
the hasher; a task's key is the first five characters of its id followed by the ``0xFF`` byte Rust appends to a
hashed ``str``. The task goes to the first entry at or after its key's hash, wrapping to the first.
"""

from __future__ import annotations

import bisect
import ipaddress
import struct

from siphashc import siphash

from dfdaemon.cluster.addresses import split_address

_ZERO_KEY = bytes(16)
# How many leading task-id characters choose the scheduler.
TASK_KEY_LENGTH = 5


def node_hash(address: str) -> int:
    """The ring position of a scheduler at ``address`` (IP:PORT). A host name (static ``scheduler.addrs`` only:
    the manager lists addresses) hashes its text, which only peers of this daemon share."""
    try:
        ip, port = split_address(address)
    except ValueError:
        return siphash(_ZERO_KEY, address.encode())
    if isinstance(ip, ipaddress.IPv4Address):
        data = struct.pack("<Q", 0) + ip.packed + struct.pack("<H", port)
    else:
        # Rust's SocketAddrV6 also hashes its flow info and scope id, both zero for a configured address.
        data = struct.pack("<Q", 1) + ip.packed + struct.pack("<HII", port, 0, 0)
    return siphash(_ZERO_KEY, data)


def task_hash(task_id: str) -> int:
    """The ring position of a task: its id's first five characters and Rust's ``str`` terminator byte."""
    return siphash(_ZERO_KEY, task_id[:TASK_KEY_LENGTH].encode("ascii") + b"\xff")


class HashRing:
    """The schedulers of one cluster on upstream's ring; immutable, rebuilt when the list changes."""

    def __init__(self, addresses: list[str]) -> None:
        if not addresses:
            raise ValueError("the ring needs at least one scheduler")
        nodes = sorted((node_hash(address), address) for address in dict.fromkeys(addresses))
        self._hashes = [position for position, _ in nodes]
        self.addresses = [address for _, address in nodes]

    def pick(self, task_id: str) -> str:
        """The scheduler owning ``task_id``: the first node at or after its hash, wrapping around."""
        index = bisect.bisect_left(self._hashes, task_hash(task_id))
        return self.addresses[index % len(self.addresses)]
