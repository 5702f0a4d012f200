"""What the scheduler stub knows about the cluster, and how it picks parents: plain records, no protobuf.

Everything lives in memory and dies with the process; peers re-announce themselves, so a restarted stub
relearns the cluster within one announce interval.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from scheduler_stub import evaluator
from scheduler_stub.evaluator import IDLE, NO_NETWORK, Candidate, Load, Network

log = logging.getLogger("dfscheduler.registry")

# Upstream's defaults (filterParentLimit, candidateParentLimit): sample this many peers of the task, offer the best
# few of them.
SAMPLED_PEERS = 15
CANDIDATE_PARENTS = 3
# Scheduling rounds without a usable parent before the peer is sent back to the source.
SCHEDULE_ATTEMPTS = 4
# A host is forgotten when it misses this many announcements in a row, as the Go scheduler does.
MISSED_ANNOUNCEMENTS = 2
DEFAULT_ANNOUNCE_INTERVAL = 300.0
# Pieces a child fetches at once when its registration does not say (upstream's fallback).
DEFAULT_CONCURRENT_PIECES = 8
# common.v2.Priority levels that keep a new task from a seed, as upstream reads them when a seed is at hand: 1 forbids
# the download, 2 refuses it for want of parents, 3 sends the peer to the source itself; 0 and 4 to 6 ask the seed.
FORBIDDEN, NO_PARENT_NO_SEED, SOURCE_NOT_SEED = 1, 2, 3
NORMAL_HOST = evaluator.NORMAL_HOST
# Preheat scopes, as the manager and the scheduler API spell them; the first is the default.
SINGLE_SEED_PEER = "single_seed_peer"
ALL_SEED_PEERS = "all_seed_peers"
ALL_PEERS = "all_peers"
PREHEAT_SCOPES = (SINGLE_SEED_PEER, ALL_SEED_PEERS, ALL_PEERS)


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


class NoHostAvailable(RegistryError):
    """A preheat names hosts the cluster does not have (no seed peer, no peer at those addresses)."""


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
    """A daemon as it announced itself; children reach it through ``ip`` and ``port``.

    ``load`` is the scheduler's own count of what the host is uploading: every child it was offered to as a parent
    adds to it until that child finishes, fails, is rescheduled or goes away.
    """

    id: str
    ip: str
    port: int
    hostname: str
    type: int
    interval: float
    last_seen: float
    network: Network = NO_NETWORK
    disable_shared: bool = False
    load: Load = IDLE
    upload_failures: int = 0

    def expires_at(self) -> float:
        return self.last_seen + MISSED_ANNOUNCEMENTS * self.interval

    @property
    def is_seed(self) -> bool:
        return self.type != NORMAL_HOST


class SeedState(Enum):
    """Where a task stands with the seed peers: not asked, asked to download it, or failed at it."""

    NONE = "none"
    TRIGGERED = "triggered"
    FAILED = "failed"


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
    seed: SeedState = SeedState.NONE


@dataclass
class Peer:
    """One download of a task by one host. ``edges`` are the parents it was last offered, each with the load it
    put on that parent's host; ``blocked`` are the parents it must never be offered again."""

    id: str
    host_id: str
    task_id: str
    may_back_to_source: bool = True
    concurrent_pieces: int = DEFAULT_CONCURRENT_PIECES
    state: PeerState = PeerState.PENDING
    finished_pieces: set[int] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)
    edges: dict[str, tuple[str, Load]] = field(default_factory=dict)
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
    # Not sent: the servicer waits for the seed peer to register (``seed_scheduled``) and answers then.
    AWAIT_SEED = "await seed"


@dataclass(frozen=True)
class Schedule:
    """One scheduling decision: the answer kind, the parents to try (NORMAL only) and why. With AWAIT_SEED,
    ``trigger`` is the seed host to ask for the task (None when an earlier peer already asked one)."""

    answer: Answer
    parents: list[PeerView] = field(default_factory=list)
    description: str = ""
    trigger: Host | None = None

    def __str__(self) -> str:
        if self.answer is Answer.NORMAL:
            parents = ", ".join(f"{p.peer.id}@{p.host.ip}:{p.host.port}" for p in self.parents)
            return f"normal, parents [{parents}]"
        if self.answer is Answer.AWAIT_SEED:
            asked = f"asking seed {self.trigger.id}" if self.trigger else "a seed is already asked"
            return f"{self.answer.value} ({asked})"
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
        self,
        host_id: str,
        ip: str,
        port: int,
        hostname: str,
        host_type: int,
        interval: float | None,
        *,
        network: Network = NO_NETWORK,
        disable_shared: bool = False,
    ) -> Host:
        """Register or refresh a host; its announce ``interval`` decides when silence means it is gone. A refresh
        keeps the load the scheduler counted on the host."""
        if not host_id:
            raise InvalidRequest("host.id is required")
        if not ip:
            raise InvalidRequest(f"host {host_id} has no ip")
        now = self._expire()
        known = self.hosts.get(host_id)
        every = interval if interval is not None and interval > 0 else DEFAULT_ANNOUNCE_INTERVAL
        host = Host(host_id, ip, port, hostname, host_type, every, now, network, disable_shared)
        if known is not None:
            host.load, host.upload_failures = known.load, known.upload_failures
        self.hosts[host_id] = host
        if known is None:
            kind = "seed peer" if host.is_seed else "normal"
            log.info("host %s joined at %s:%d (%s, announces every %gs)", host_id, ip, port, kind, host.interval)
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
        """Forget every host silent for two of its intervals, with its peers; returns the time it judged by."""
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
        concurrent_pieces: int | None = None,
        priority: int = 0,
    ) -> Schedule:
        """Record a new download and decide how it starts; registering an existing peer id starts it afresh.

        A task no peer can serve yet goes to a seed peer when the cluster has one (AWAIT_SEED: the caller asks the
        seed, then calls ``seed_scheduled``); the child goes to the source only without one.
        """
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
        peer.concurrent_pieces = concurrent_pieces or DEFAULT_CONCURRENT_PIECES
        self.peers[peer_id] = peer
        if known.content_length == 0:
            schedule = Schedule(Answer.EMPTY_TASK)
        elif need_back_to_source and may_back_to_source:
            schedule = self._to_source(peer, "the peer asked to download from the source")
        else:
            schedule = self._schedule_new(peer, known, priority)
        log.info("register peer %s of task %s on host %s: %s", peer_id, task.id, host_id, schedule)
        return schedule

    def _schedule_new(self, peer: Peer, task: Task, priority: int) -> Schedule:
        parents = self._candidates(peer)
        if parents:
            return Schedule(Answer.NORMAL, parents)
        seed = self._seed_for(peer, task)
        if seed is None:
            return self._no_parent(peer, "no peer of the task can serve it yet")
        if priority == FORBIDDEN:
            raise NoParentAvailable(f"priority LEVEL1: peer {peer.id} is forbidden to download task {task.id}")
        if priority == NO_PARENT_NO_SEED:
            raise NotFound(f"priority LEVEL2: no candidate parent for peer {peer.id}")
        if priority == SOURCE_NOT_SEED:
            return self._no_parent(peer, "priority LEVEL3: the first peer goes to the source itself")
        if task.seed is SeedState.TRIGGERED:
            return Schedule(Answer.AWAIT_SEED)
        task.seed = SeedState.TRIGGERED
        return Schedule(Answer.AWAIT_SEED, trigger=seed)

    def seed_scheduled(self, peer_id: str, give_up: bool) -> Schedule | None:
        """After AWAIT_SEED: parents once the seed's peer registered; the source (or a retry) when the seed failed
        or ``give_up`` says it took too long; None while it is worth waiting."""
        self._expire()
        peer = self._peer(peer_id)
        parents = self._candidates(peer)
        if parents:
            schedule: Schedule | None = Schedule(Answer.NORMAL, parents)
        elif give_up or self._task(peer.task_id).seed is not SeedState.TRIGGERED:
            schedule = self._no_parent(peer, "the seed peer did not start the task")
        else:
            return None
        log.info("schedule peer %s of task %s after the seed: %s", peer_id, peer.task_id, schedule)
        return schedule

    def seed_finished(self, task_id: str, succeeded: bool) -> None:
        """The seed's download ended: a later child of a failed task goes to the source instead of a seed."""
        task = self.tasks.get(task_id)
        if task is not None:
            task.seed = SeedState.NONE if succeeded else SeedState.FAILED

    def _seed_for(self, peer: Peer, task: Task) -> Host | None:
        """The seed to ask for a task: none for a seed's own peer or a task a seed failed at."""
        if self.hosts[peer.host_id].is_seed or task.seed is SeedState.FAILED:
            return None
        seeds = [host for host in self.hosts.values() if host.is_seed]
        return pick(seeds, task.id) if seeds else None

    def _no_parent(self, peer: Peer, reason: str) -> Schedule:
        return self._to_source(peer, reason) if peer.may_back_to_source else self._retry_later(peer)

    def reschedule_peer(self, peer_id: str, given_up: Iterable[str], reason: str = "") -> Schedule:
        """Offer fresh parents, blocking the ones the peer gave up on; back to source once attempts run out."""
        self._expire()
        peer = self._peer(peer_id)
        peer.blocked.update(parent for parent in given_up if parent)
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
        self._detach(peer)
        peer.state = PeerState.BACK_TO_SOURCE
        return Schedule(Answer.BACK_TO_SOURCE, description=reason)

    # Preheat

    def preheat_hosts(
        self, scope: str, key: str, ips: Iterable[str] = (), count: int | None = None, percentage: int | None = None
    ) -> list[Host]:
        """The hosts a preheat goes to: one seed (chosen by ``key``), every seed or every normal peer, the last two
        narrowed by ``ips``, else ``count``, else ``percentage`` (rounded down, at least one), as upstream does."""
        self._expire()
        if scope not in PREHEAT_SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(PREHEAT_SCOPES)}, not {scope!r}")
        seeds = scope != ALL_PEERS
        hosts = sorted((host for host in self.hosts.values() if host.is_seed == seeds), key=lambda host: host.id)
        if not hosts:
            raise NoHostAvailable(f"no {'seed peer' if seeds else 'peer'} has announced itself")
        if scope == SINGLE_SEED_PEER:
            return [pick(hosts, key)]
        wanted = set(ips)
        if wanted:
            chosen = [host for host in hosts if host.ip in wanted]
            if not chosen:
                raise NoHostAvailable(f"no {'seed peer' if seeds else 'peer'} has the address {', '.join(ips)}")
            return chosen
        if count is not None:
            return hosts[:count]
        if percentage is not None:
            return hosts[: max(1 if percentage > 0 else 0, min(len(hosts), len(hosts) * percentage // 100))]
        return hosts

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
            peer.blocked.add(parent_id)
            parent = self.peers.get(parent_id)
            if parent is not None and parent.host_id in self.hosts:
                self.hosts[parent.host_id].upload_failures += 1
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
        self._detach(peer)
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
            self._detach(peer)
            peer.state = PeerState.FAILED
            log.info("peer %s of task %s failed: its stream ended without a final report", peer_id, peer.task_id)

    # Internals

    def _candidates(self, child: Peer) -> list[PeerView]:
        """Upstream's choice: sample 15 peers of the task, keep those that may serve this child, rank them by the
        evaluator's score (ties: more pieces, then fewer upload failures) and offer the best 3.

        The child's previous parents are released first; the new ones carry its load until it ends or moves on.
        """
        self._detach(child)
        others = [peer for peer in self._peers_of(child.task_id) if peer.id != child.id]
        sampled = random.sample(others, min(SAMPLED_PEERS, len(others)))
        child_network = self.hosts[child.host_id].network
        ranked = sorted(
            (self._view(peer) for peer in sampled if self._may_serve(peer, child)),
            key=lambda view: (
                -evaluator.score(_candidate(view), child_network),
                -len(view.peer.finished_pieces),
                view.host.upload_failures,
            ),
        )
        parents = ranked[:CANDIDATE_PARENTS]
        self._attach(child, parents)
        return parents

    def _may_serve(self, parent: Peer, child: Peer) -> bool:
        """Upstream's filter: not blocked, shared, another host, a normal host only once it has something to give,
        and not downstream of the child (no download cycle)."""
        host = self.hosts[parent.host_id]
        if parent.id in child.blocked or host.disable_shared or parent.host_id == child.host_id:
            return False
        if parent.state not in SERVING_STATES:
            return False
        if not host.is_seed and parent.state is PeerState.RUNNING and not parent.edges:
            return False
        return child.id not in self._ancestors(parent)

    def _ancestors(self, peer: Peer) -> set[str]:
        seen: set[str] = set()
        todo = list(peer.edges)
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                known = self.peers.get(current)
                todo.extend(known.edges if known is not None else ())
        return seen

    def _attach(self, child: Peer, parents: list[PeerView]) -> None:
        """Count the child's expected draw on each parent's host, as upstream does when it adds an edge."""
        task = self.tasks[child.task_id]
        piece_length = task.piece_length or 0
        for view in parents:
            load = Load(
                tx_bandwidth=piece_length * child.concurrent_pieces * 8,
                upload_content_length=max(task.content_length or 0, 0),
                concurrent_upload_pieces=child.concurrent_pieces,
            )
            view.host.load = _add(view.host.load, load, 1)
            child.edges[view.peer.id] = (view.host.id, load)

    def _detach(self, child: Peer) -> None:
        for host_id, load in child.edges.values():
            host = self.hosts.get(host_id)
            if host is not None:
                host.load = _add(host.load, load, -1)
        child.edges.clear()

    def _drop_peers(self, peers: Iterable[Peer]) -> None:
        """Forget peers, and every task left without a peer."""
        orphans = set()
        for peer in list(peers):
            self._detach(peer)
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


def _candidate(view: PeerView) -> Candidate:
    return Candidate(
        host_type=view.host.type,
        network=view.host.network,
        load=view.host.load,
        seed_running=view.host.is_seed and view.peer.state is PeerState.RUNNING,
    )


def _add(total: Load, part: Load, sign: int) -> Load:
    return Load(
        tx_bandwidth=max(0, total.tx_bandwidth + sign * part.tx_bandwidth),
        upload_content_length=max(0, total.upload_content_length + sign * part.upload_content_length),
        concurrent_upload_pieces=max(0, total.concurrent_upload_pieces + sign * part.concurrent_upload_pieces),
    )


def pick(hosts: list[Host], key: str) -> Host:
    """One host for ``key``, the same one as long as the hosts stay (rendezvous hashing)."""
    return max(hosts, key=lambda host: hashlib.sha256(f"{key}\0{host.id}".encode()).digest())
