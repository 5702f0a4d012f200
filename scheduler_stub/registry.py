"""What the scheduler stub knows about the cluster, and how it picks parents: plain records, no protobuf.

Everything lives in memory and dies with the process; peers re-announce themselves, so a restarted stub
relearns the cluster within one announce interval.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

log = logging.getLogger("dfscheduler.registry")

# Upstream's defaults: sample this many peers of the task, offer the best few of them.
SAMPLED_PEERS = 15
CANDIDATE_PARENTS = 3
# Scheduling rounds without a usable parent before the peer is sent back to the source.
SCHEDULE_ATTEMPTS = 4
# A host is forgotten when it misses this many announcements in a row.
MISSED_ANNOUNCEMENTS = 3
DEFAULT_ANNOUNCE_INTERVAL = 300.0


class RegistryError(Exception):
    """A request the registry cannot honour; the servicer maps each kind to a gRPC status."""


class InvalidRequest(RegistryError):
    """The request lacks something it must carry."""


class NotFound(RegistryError):
    """The host, task or peer named is not (or no longer) known."""


class HostNotAnnounced(RegistryError):
    """A peer registered from a host that never announced itself (or was forgotten)."""


class NoParentAvailable(RegistryError):
    """No parent could be found for a peer that may not go back to the source."""


class PeerState(StrEnum):
    """Upstream's peer state names, as ``common.v2.Peer.state`` carries them."""

    PENDING = "Pending"
    RUNNING = "Running"
    BACK_TO_SOURCE = "BackToSource"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


# States in which a peer holds (or is fetching) pieces others can download from it.
SERVING_STATES = frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED})


@dataclass
class Host:
    """A daemon as it announced itself; children reach it through ``ip`` and ``port``."""

    id: str
    ip: str
    port: int
    hostname: str
    type: int
    interval: float
    last_seen: float

    def expires_at(self) -> float:
        return self.last_seen + MISSED_ANNOUNCEMENTS * self.interval


@dataclass
class Task:
    """A file as its peers described it when registering; sizes stay unknown until a peer reports them."""

    id: str
    url: str = ""
    tag: str = ""
    application: str = ""
    content_length: int | None = None
    piece_length: int | None = None
    piece_count: int | None = None


@dataclass
class Peer:
    """One download of a task by one host."""

    id: str
    host_id: str
    task_id: str
    may_back_to_source: bool = True
    state: PeerState = PeerState.PENDING
    finished_pieces: set[int] = field(default_factory=set)
    failing_parents: set[str] = field(default_factory=set)
    schedule_attempts: int = 0


@dataclass(frozen=True)
class PeerView:
    """A peer with its host and task: everything a child needs to reach it."""

    peer: Peer
    host: Host
    task: Task


class Answer(StrEnum):
    """What the scheduler tells a peer to do."""

    EMPTY_TASK = "empty task"
    NORMAL = "normal"
    BACK_TO_SOURCE = "back to source"


@dataclass(frozen=True)
class Schedule:
    """One scheduling decision: the answer kind, the parents to try (NORMAL only) and why."""

    answer: Answer
    parents: list[PeerView] = field(default_factory=list)
    description: str = ""

    def __str__(self) -> str:
        if self.answer is Answer.NORMAL:
            parents = ", ".join(f"{p.peer.id}@{p.host.ip}:{p.host.port}" for p in self.parents)
            return f"normal, parents [{parents}]"
        if self.description:
            return f"{self.answer.value} ({self.description})"
        return self.answer.value


@dataclass(frozen=True)
class TaskStatus:
    """A task with what its peers say about it, for ``StatTask``."""

    task: Task
    state: str
    peer_count: int
    has_available_peer: bool


class Registry:
    """Hosts, tasks and peers of the cluster, and the parent selection upstream's scheduler performs.

    Queries and reports first forget hosts that stopped announcing, so no answer ever points at one of them;
    a periodic ``expire_hosts`` only reclaims memory while nobody asks.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.hosts: dict[str, Host] = {}
        self.tasks: dict[str, Task] = {}
        self.peers: dict[str, Peer] = {}

    # Hosts

    def announce_host(
        self, host_id: str, ip: str, port: int, hostname: str, host_type: int, interval: float | None
    ) -> Host:
        """Register or refresh a host; its announce ``interval`` decides when silence means it is gone."""
        if not host_id:
            raise InvalidRequest("host.id is required")
        if not ip:
            raise InvalidRequest(f"host {host_id} has no ip")
        now = self._expire()
        known = host_id in self.hosts
        every = interval if interval is not None and interval > 0 else DEFAULT_ANNOUNCE_INTERVAL
        host = Host(host_id, ip, port, hostname, host_type, every, now)
        self.hosts[host_id] = host
        if not known:
            log.info("host %s joined at %s:%d (announces every %gs)", host_id, ip, port, host.interval)
        return host

    def list_hosts(self, host_type: int | None = None) -> list[Host]:
        self._expire()
        return [host for host in self.hosts.values() if host_type is None or host.type == host_type]

    def delete_host(self, host_id: str) -> None:
        """Forget a host leaving the cluster, with every peer on it."""
        if not host_id:
            raise InvalidRequest("host_id is required")
        self._expire()
        if self.hosts.pop(host_id, None) is not None:
            log.info("host %s left", host_id)
        self._drop_peers(peer for peer in self.peers.values() if peer.host_id == host_id)

    def expire_hosts(self) -> None:
        self._expire()

    def _expire(self) -> float:
        """Forget every host silent for three of its intervals, with its peers; returns the time it judged by."""
        now = self._clock()
        for host in [host for host in self.hosts.values() if host.expires_at() <= now]:
            del self.hosts[host.id]
            log.info("host %s forgotten: no announcement for %.1fs", host.id, now - host.last_seen)
            self._drop_peers(peer for peer in self.peers.values() if peer.host_id == host.id)
        return now

    # Tasks

    def stat_task(self, task_id: str) -> TaskStatus:
        self._expire()
        task = self._task(task_id)
        peers = self._peers_of(task_id)
        states = {peer.state for peer in peers}
        if PeerState.SUCCEEDED in states:
            state = "Succeeded"
        elif states & {PeerState.RUNNING, PeerState.BACK_TO_SOURCE}:
            state = "Running"
        elif PeerState.PENDING in states:
            state = "Pending"
        else:
            state = "Failed"
        available = any(peer.state in SERVING_STATES for peer in peers)
        return TaskStatus(task, state, len(peers), available)

    def delete_task(self, host_id: str, task_id: str) -> None:
        """A host deleted its copy of a task: none of its peers of that task may be offered as a parent again."""
        if not host_id or not task_id:
            raise InvalidRequest("host_id and task_id are required")
        self._expire()
        self._drop_peers(peer for peer in self._peers_of(task_id) if peer.host_id == host_id)

    # Peers

    def stat_peer(self, peer_id: str) -> PeerView:
        self._expire()
        return self._view(self._peer(peer_id))

    def delete_peer(self, peer_id: str) -> None:
        if not peer_id:
            raise InvalidRequest("peer_id is required")
        self._expire()
        self._drop_peers([self.peers[peer_id]] if peer_id in self.peers else [])

    def register_peer(
        self,
        peer_id: str,
        host_id: str,
        task: Task,
        *,
        need_back_to_source: bool = False,
        may_back_to_source: bool = True,
    ) -> Schedule:
        """Record a new download and decide how it starts; registering an existing peer id starts it afresh."""
        if not peer_id or not host_id or not task.id:
            raise InvalidRequest("host_id, task_id and peer_id are required")
        self._expire()
        if host_id not in self.hosts:
            raise HostNotAnnounced(f"host {host_id} has not announced itself")
        self._drop_peers([self.peers[peer_id]] if peer_id in self.peers else [])
        known = self.tasks.setdefault(task.id, task)
        if known is not task:
            _merge_task(known, task)
        peer = Peer(peer_id, host_id, task.id, may_back_to_source=may_back_to_source)
        self.peers[peer_id] = peer
        if known.content_length == 0:
            schedule = Schedule(Answer.EMPTY_TASK)
        elif need_back_to_source and may_back_to_source:
            schedule = self._to_source(peer, "the peer asked to download from the source")
        else:
            parents = self._candidates(peer)
            if parents:
                schedule = Schedule(Answer.NORMAL, parents)
            elif may_back_to_source:
                schedule = self._to_source(peer, "no peer of the task can serve it yet")
            else:
                schedule = self._retry_later(peer)
        log.info("register peer %s of task %s on host %s: %s", peer_id, task.id, host_id, schedule)
        return schedule

    def reschedule_peer(self, peer_id: str, given_up: Iterable[str], reason: str = "") -> Schedule:
        """Offer fresh parents, excluding the ones the peer gave up on; back to source once attempts run out."""
        self._expire()
        peer = self._peer(peer_id)
        peer.failing_parents.update(parent for parent in given_up if parent)
        parents = self._candidates(peer)
        schedule = Schedule(Answer.NORMAL, parents) if parents else self._retry_later(peer)
        log.info("reschedule peer %s of task %s (%s): %s", peer_id, peer.task_id, reason or "no reason", schedule)
        return schedule

    def _retry_later(self, peer: Peer) -> Schedule:
        """A round without a usable parent: an empty parent list the peer answers with a reschedule, until the
        attempts run out and the source (or, when the peer may not go there, a failure) is the only way left."""
        peer.schedule_attempts += 1
        if peer.schedule_attempts < SCHEDULE_ATTEMPTS:
            return Schedule(Answer.NORMAL)
        if not peer.may_back_to_source:
            raise NoParentAvailable(
                f"no parent for peer {peer.id} after {peer.schedule_attempts} attempts and back to source is disabled"
            )
        return self._to_source(peer, f"no usable parent after {peer.schedule_attempts} scheduling attempts")

    def _to_source(self, peer: Peer, reason: str) -> Schedule:
        """Send a peer to the origin. It counts as a parent at once, so peers registering before its first report
        wait for its pieces instead of hitting the origin too."""
        peer.state = PeerState.BACK_TO_SOURCE
        return Schedule(Answer.BACK_TO_SOURCE, description=reason)

    def peer_started(self, peer_id: str, back_to_source: bool) -> None:
        self._expire()
        self._peer(peer_id).state = PeerState.BACK_TO_SOURCE if back_to_source else PeerState.RUNNING

    def piece_finished(self, peer_id: str, number: int) -> None:
        self._expire()
        self._peer(peer_id).finished_pieces.add(number)

    def piece_failed(self, peer_id: str, parent_id: str, number: int | None = None, temporary: bool = False) -> None:
        """The peer could not fetch a piece from ``parent_id``: never offer that parent to it again.

        Logged with key=value fields, the record tests (and operators) read to see who blamed whom for what.
        """
        self._expire()
        peer = self._peer(peer_id)
        if parent_id:
            peer.failing_parents.add(parent_id)
        log.info(
            "piece failed: task=%s peer=%s parent=%s piece=%s temporary=%s",
            peer.task_id,
            peer_id,
            parent_id or "-",
            "-" if number is None else number,
            "true" if temporary else "false",
        )

    def peer_finished(self, peer_id: str, succeeded: bool, description: str = "") -> None:
        """The terminal report of a download: a succeeded peer serves later children, a failed one never does."""
        self._expire()
        peer = self._peer(peer_id)
        peer.state = PeerState.SUCCEEDED if succeeded else PeerState.FAILED
        log.info(
            "peer %s of task %s %s%s",
            peer_id,
            peer.task_id,
            "succeeded" if succeeded else "failed",
            f": {description}" if description else "",
        )

    def peer_abandoned(self, peer_id: str) -> None:
        """The stream ended without a terminal report: the download cannot be trusted to serve anyone."""
        peer = self.peers.get(peer_id)
        if peer is not None and peer.state not in {PeerState.SUCCEEDED, PeerState.FAILED}:
            peer.state = PeerState.FAILED
            log.info("peer %s of task %s failed: its stream ended without a final report", peer_id, peer.task_id)

    # Internals

    def _candidates(self, child: Peer) -> list[PeerView]:
        """Up to 3 parents out of 15 sampled serving peers of the task: succeeded first, then the most pieces.

        Never the child's own host (it would download from itself), never a parent it reported failing; peers of
        hosts that went away were forgotten with their host.
        """
        eligible = [
            peer
            for peer in self._peers_of(child.task_id)
            if peer.state in SERVING_STATES and peer.host_id != child.host_id and peer.id not in child.failing_parents
        ]
        sampled = random.sample(eligible, min(SAMPLED_PEERS, len(eligible)))
        sampled.sort(key=lambda peer: (peer.state is not PeerState.SUCCEEDED, -len(peer.finished_pieces)))
        return [self._view(peer) for peer in sampled[:CANDIDATE_PARENTS]]

    def _drop_peers(self, peers: Iterable[Peer]) -> None:
        """Forget peers, and every task left without a peer."""
        orphans = set()
        for peer in list(peers):
            del self.peers[peer.id]
            orphans.add(peer.task_id)
        for task_id in orphans - {peer.task_id for peer in self.peers.values()}:
            del self.tasks[task_id]

    def _peers_of(self, task_id: str) -> list[Peer]:
        return [peer for peer in self.peers.values() if peer.task_id == task_id]

    def _view(self, peer: Peer) -> PeerView:
        return PeerView(peer, self.hosts[peer.host_id], self.tasks[peer.task_id])

    def _peer(self, peer_id: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise NotFound(f"peer {peer_id} is not known")
        return peer

    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} is not known")
        return task


def _merge_task(known: Task, reported: Task) -> None:
    """Keep what earlier peers said about a task, filling in what a later peer knows better."""
    for name in ("url", "tag", "application", "content_length", "piece_length", "piece_count"):
        value = getattr(reported, name)
        if value not in (None, ""):
            setattr(known, name, value)
