"""The stub's registry as a unit: parents ranked by upstream's score, the load it counts, blocklists, seed
triggering and the hosts a preheat goes to."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

from scheduler_stub import registry as registry_module
from scheduler_stub.evaluator import Load, Network
from scheduler_stub.registry import (
    CANDIDATE_PARENTS,
    SAMPLED_PEERS,
    Answer,
    InvalidRequest,
    NoHostAvailable,
    NoParentAvailable,
    NotFound,
    PeerState,
    Registry,
    SeedState,
    Task,
)

PIECE = 4 * 1024 * 1024
GBIT = 1_000_000_000
T = TypeVar("T")


def task(task_id: str = "t", pieces: int = 10) -> Task:
    return Task(
        id=task_id, url="http://origin.test/f", content_length=pieces * PIECE, piece_length=PIECE, piece_count=pieces
    )


def host(registry: Registry, name: str, *, max_tx: int = 10 * GBIT, idc: str = "", seed: bool = False) -> None:
    network = Network(idc=idc, max_tx_bandwidth=max_tx)
    registry.announce_host(
        name, f"10.2.0.{len(registry.hosts) + 1}", 4000, name, 1 if seed else 0, None, network=network
    )


def finished_peer(registry: Registry, name: str, task_id: str = "t") -> str:
    """A peer on host ``name`` that fetched the whole task from the source."""
    peer_id = f"peer-{name}"
    schedule = registry.register_peer(peer_id, name, task(task_id), need_back_to_source=True)
    assert schedule.answer is Answer.BACK_TO_SOURCE
    for number in range(10):
        registry.piece_finished(peer_id, number)
    registry.peer_finished(peer_id, succeeded=True)
    return peer_id


def parents_of(registry: Registry, peer_id: str, host_id: str, task_id: str = "t", **kwargs: Any) -> list[str]:
    schedule = registry.register_peer(peer_id, host_id, task(task_id), **kwargs)
    assert schedule.answer is Answer.NORMAL, schedule
    return [view.peer.id for view in schedule.parents]


def test_parents_are_ranked_by_score_and_only_the_best_three_offered() -> None:
    registry = Registry()
    host(registry, "child", idc="dc1")
    host(registry, "silent", max_tx=0)  # announces no bandwidth: 0.05
    host(registry, "slow", max_tx=100_000_000)  # below one reference piece per second: no concurrency score
    host(registry, "fast")  # 0.65
    host(registry, "near", idc="DC1")  # same IDC: 0.85
    for name in ("silent", "slow", "fast", "near"):
        finished_peer(registry, name)
    assert parents_of(registry, "c", "child") == ["peer-near", "peer-fast", "peer-slow"]


def test_ties_go_to_the_parent_with_more_pieces() -> None:
    registry = Registry()
    for name in ("child", "a", "b"):
        host(registry, name)
    finished_peer(registry, "a")
    registry.register_peer("peer-b", "b", task(), need_back_to_source=True)
    registry.piece_finished("peer-b", 0)
    assert parents_of(registry, "c", "child") == ["peer-a", "peer-b"]


def test_each_child_loads_its_parents_host_until_it_ends() -> None:
    registry = Registry()
    for name in ("parent", "child1", "child2"):
        host(registry, name)
    finished_peer(registry, "parent")
    parents_of(registry, "c1", "child1", concurrent_pieces=4)
    one_child = Load(tx_bandwidth=PIECE * 4 * 8, upload_content_length=10 * PIECE, concurrent_upload_pieces=4)
    assert registry.hosts["parent"].load == one_child
    parents_of(registry, "c2", "child2")  # no concurrency given: upstream's 8
    assert registry.hosts["parent"].load == Load(
        tx_bandwidth=PIECE * 12 * 8, upload_content_length=20 * PIECE, concurrent_upload_pieces=12
    )
    registry.peer_finished("c2", succeeded=True)
    assert registry.hosts["parent"].load == one_child
    registry.peer_abandoned("c1")
    assert registry.hosts["parent"].load == Load()
    registry.announce_host("parent", "10.2.0.1", 4000, "parent", 0, None)  # a re-announcement keeps the count
    parents_of(registry, "c3", "child1")
    registry.announce_host("parent", "10.2.0.1", 4000, "parent", 0, None)
    assert registry.hosts["parent"].load.concurrent_upload_pieces == 8


def test_a_busy_parent_ranks_below_an_idle_one() -> None:
    registry = Registry()
    for name in ("busy", "idle", "child", "other"):
        host(registry, name, max_tx=GBIT)
    finished_peer(registry, "busy")
    assert parents_of(registry, "first", "other") == ["peer-busy"]  # the only parent yet: now it carries a child
    finished_peer(registry, "idle")
    assert parents_of(registry, "second", "child") == ["peer-idle", "peer-busy"]


def test_a_failed_parent_is_blocked_for_that_child_only() -> None:
    registry = Registry()
    for name in ("bad", "good", "child", "other"):
        host(registry, name)
    finished_peer(registry, "bad")
    finished_peer(registry, "good")
    assert set(parents_of(registry, "c", "child")) == {"peer-bad", "peer-good"}
    registry.peer_started("c", back_to_source=False)
    registry.piece_failed("c", "peer-bad", 0, temporary=True)
    assert [view.peer.id for view in registry.reschedule_peer("c", []).parents] == ["peer-good"]
    assert registry.hosts["bad"].upload_failures == 1
    assert "peer-bad" in parents_of(registry, "o", "other")
    # Every candidate a reschedule names is blocked too.
    assert registry.reschedule_peer("c", ["peer-good"]).parents == []


def test_no_parent_downstream_of_the_child_and_none_on_its_own_host() -> None:
    registry = Registry()
    for name in ("a", "b", "c"):
        host(registry, name)
    registry.register_peer("pa", "a", task(), need_back_to_source=True)
    assert parents_of(registry, "pb", "b") == ["pa"]
    registry.peer_started("pb", back_to_source=False)
    # pa gives up on the source and asks for parents: pb fetches from pa, so it may not serve pa.
    registry.peers["pa"].state = PeerState.RUNNING
    assert registry.reschedule_peer("pa", []).parents == []
    assert parents_of(registry, "pa2", "a") == ["pb"]  # another peer on a's host may, pb is not its descendant
    assert parents_of(registry, "pc", "c")  # and a third host sees both
    assert "pc" not in parents_of(registry, "pc2", "c")


def test_a_running_normal_peer_without_parents_is_not_offered() -> None:
    registry = Registry()
    for name in ("a", "child"):
        host(registry, name)
    registry.register_peer("pa", "a", task(), need_back_to_source=True)
    registry.peer_started("pa", back_to_source=False)  # running, yet nobody gave it anything
    schedule = registry.register_peer("c", "child", task())
    assert schedule.answer is Answer.BACK_TO_SOURCE


def test_only_fifteen_peers_are_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_sample: Callable[[Sequence[T], int], list[T]] = registry_module.random.sample

    def recording(population: Sequence[T], k: int) -> list[T]:
        sizes.append(k)
        return real_sample(population, k)

    monkeypatch.setattr(registry_module.random, "sample", recording)
    registry = Registry()
    host(registry, "child")
    for number in range(20):
        host(registry, f"h{number}")
        finished_peer(registry, f"h{number}")
    sizes.clear()
    assert len(parents_of(registry, "c", "child")) == CANDIDATE_PARENTS
    assert sizes == [SAMPLED_PEERS]


def test_a_new_task_goes_to_a_seed_and_its_children_wait_for_it() -> None:
    registry = Registry()
    host(registry, "seed", seed=True)
    host(registry, "n1")
    host(registry, "n2")
    first = registry.register_peer("c1", "n1", task())
    assert first.answer is Answer.AWAIT_SEED and first.trigger is not None and first.trigger.id == "seed"
    second = registry.register_peer("c2", "n2", task())
    assert second.answer is Answer.AWAIT_SEED and second.trigger is None  # asked once per task
    assert registry.seed_scheduled("c1", give_up=False) is None
    # The seed's daemon registers the task it was asked for, back to source.
    seeded = registry.register_peer("s", "seed", task(), need_back_to_source=True)
    assert seeded.answer is Answer.BACK_TO_SOURCE
    for child in ("c1", "c2"):
        schedule = registry.seed_scheduled(child, give_up=False)
        assert schedule is not None and [view.peer.id for view in schedule.parents] == ["s"]


def test_a_seed_that_fails_or_is_too_slow_sends_the_children_to_the_source() -> None:
    registry = Registry()
    host(registry, "seed", seed=True)
    host(registry, "n1")
    host(registry, "n2")
    host(registry, "n3")
    assert registry.register_peer("c1", "n1", task()).answer is Answer.AWAIT_SEED
    slow = registry.seed_scheduled("c1", give_up=True)
    assert slow is not None and slow.answer is Answer.BACK_TO_SOURCE
    registry.register_peer("x", "n3", task("other"))
    registry.seed_finished("other", succeeded=False)
    assert registry.tasks["other"].seed is SeedState.FAILED
    assert registry.register_peer("y", "n2", task("other-2")).answer is Answer.AWAIT_SEED
    # A failed seed is not asked again for that task: the next child goes to the source at once.
    registry.peer_abandoned("x")
    assert registry.register_peer("x2", "n2", task("other")).answer is Answer.BACK_TO_SOURCE


def test_a_seed_host_downloading_on_its_own_goes_to_the_source() -> None:
    registry = Registry()
    host(registry, "seed", seed=True)
    assert registry.register_peer("s", "seed", task()).answer is Answer.BACK_TO_SOURCE


def test_preheat_scopes_and_narrowing() -> None:
    registry = Registry()
    for number in range(4):
        host(registry, f"seed{number}", seed=True)
    for number in range(7):
        host(registry, f"peer{number}")

    def chosen(scope: str, **narrowing: Any) -> list[str]:
        return [h.id for h in registry.preheat_hosts(scope, "http://origin.test/f", **narrowing)]

    (single,) = chosen("single_seed_peer")
    assert single.startswith("seed") and chosen("single_seed_peer") == [single]  # the same seed for the same URL
    assert chosen("all_seed_peers") == [f"seed{n}" for n in range(4)]
    assert chosen("all_peers") == [f"peer{n}" for n in range(7)]
    assert chosen("all_peers", ips=["10.2.0.6", "10.2.0.7", "10.9.9.9"]) == ["peer1", "peer2"]
    assert chosen("all_peers", count=2) == ["peer0", "peer1"]
    assert chosen("all_peers", count=50) == [f"peer{n}" for n in range(7)]
    assert chosen("all_peers", percentage=50) == ["peer0", "peer1", "peer2"]  # 3.5 rounded down
    assert chosen("all_peers", percentage=1) == ["peer0"]  # at least one
    assert chosen("all_seed_peers", ips=["10.2.0.2"], count=3) == ["seed1"]  # ips before count
    with pytest.raises(NoHostAvailable, match=r"no peer has the address 10\.9\.9\.9"):
        chosen("all_peers", ips=["10.9.9.9"])
    with pytest.raises(InvalidRequest, match="scope must be one of"):
        chosen("some_peers")


def test_preheat_without_seeds_is_refused() -> None:
    registry = Registry()
    host(registry, "peer")
    with pytest.raises(NoHostAvailable, match="no seed peer"):
        registry.preheat_hosts("single_seed_peer", "http://origin.test/f")


@pytest.mark.parametrize("with_seed", [True, False])
def test_priority_decides_whether_a_new_task_goes_to_the_seed(with_seed: bool) -> None:
    registry = Registry()
    if with_seed:
        host(registry, "seed", seed=True)
    host(registry, "n")
    answers = {}
    for level in (0, 3, 4, 5, 6):
        answers[level] = registry.register_peer(f"p{level}", "n", task(f"t{level}"), priority=level).answer
    if not with_seed:  # without a seed, priority changes nothing: the first peer goes to the source
        assert set(answers.values()) == {Answer.BACK_TO_SOURCE}
        assert registry.register_peer("p1", "n", task("t1"), priority=1).answer is Answer.BACK_TO_SOURCE
        return
    assert answers == {
        0: Answer.AWAIT_SEED,
        3: Answer.BACK_TO_SOURCE,
        4: Answer.AWAIT_SEED,
        5: Answer.AWAIT_SEED,
        6: Answer.AWAIT_SEED,
    }
    with pytest.raises(NoParentAvailable, match="LEVEL1"):
        registry.register_peer("p1", "n", task("t1"), priority=1)
    with pytest.raises(NotFound, match="LEVEL2"):
        registry.register_peer("p2", "n", task("t2"), priority=2)
