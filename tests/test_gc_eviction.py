"""Eviction against the references it must respect, one interleaving at a time (mutants of ``Storage.evict`` and
``Storage.references`` that survived the broader tests)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from dfdaemon.storage import DiskFull, Storage, TaskInfo, TaskInUse, TaskNotFound, TaskState, Victim
from tests.storage_support import FakeClock, fill, payload, read_all

KB = 1000


async def test_an_upload_starting_during_an_eviction_waits_and_finds_the_task_gone(
    storage: Storage, clock: FakeClock
) -> None:
    """The eviction holds the task's lock from its reference check to the deletion, so an upload arriving
    meanwhile cannot slip in between: it waits, then gets NOT_FOUND, and never holds a reader on deleted bytes."""
    task = await fill(storage, "contested", 100 * KB)
    eviction = asyncio.create_task(storage.evict(task.id, [TaskState.SUCCEEDED]))
    await asyncio.sleep(0)  # the eviction has taken the lock and waits on its first read
    with pytest.raises(TaskNotFound):
        async with storage.upload(task.id):
            pass
    assert await eviction == 100 * KB
    assert await storage.get_task(task.id) is None


async def test_an_upload_begun_before_an_eviction_refuses_it(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "serving", 100 * KB)
    async with storage.upload(task.id):
        assert await storage.evict(task.id, [TaskState.SUCCEEDED]) is None
    assert await read_all(storage, task.id) == payload("serving", 100 * KB)


async def test_a_refusal_names_the_task_and_what_holds_it(storage: Storage, clock: FakeClock) -> None:
    task = await fill(storage, "pinned", 10 * KB)
    await storage.acquire("container:default/web", [task.id])
    with pytest.raises(TaskInUse) as refused:
        await storage.delete_task(task.id)
    assert refused.value.refs.task_id == task.id
    assert refused.value.refs.holders == ["container:default/web"]
    assert str(refused.value) == f"task {task.id} is in use: held by container:default/web"


async def test_a_victim_gone_or_changed_since_it_was_chosen_is_left_alone(storage: Storage, clock: FakeClock) -> None:
    """Chosen as stale while running, the task failed before its eviction: the state it was chosen in is gone, so
    the eviction is refused and the failed task's file is untouched; a task deleted meanwhile is refused too."""
    task = await failed_task(storage, "chosen-running", 100 * KB)
    assert await storage.evict(task, [TaskState.RUNNING]) is None
    assert storage.content.path(task).stat().st_size == 100 * KB
    assert (await storage.require_task(task)).state is TaskState.FAILED
    await storage.delete_task(task)
    assert await storage.evict(task, [TaskState.FAILED]) is None


async def failed_task(storage: Storage, name: str, size: int) -> str:
    task = await fill(storage, name, size, finish=False)
    async with storage.download(task.id, TaskInfo(url=f"http://origin.test/{name}")) as writer:
        await writer.fail()
    return task.id


async def test_a_held_failed_task_keeps_its_file(storage: Storage, clock: FakeClock) -> None:
    held = await failed_task(storage, "failed-but-held", 100 * KB)
    leased = await failed_task(storage, "failed-but-leased", 100 * KB)
    await storage.acquire("user:alice", [held])
    await storage.acquire("job:nightly", [leased], ttl=3600)
    for task in (held, leased):
        assert await storage.evict(task, [TaskState.FAILED]) is None
        assert storage.content.path(task).stat().st_size == 100 * KB


async def test_a_full_disk_frees_a_failed_task_first_and_never_a_finished_one(
    storage: Storage, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed task's bytes go before the metadata write that a full disk refuses; a finished task's stay until
    it is marked evicting."""
    failed = await failed_task(storage, "failed", 100 * KB)
    finished = await fill(storage, "finished", 100 * KB)
    await storage.acquire("user:alice", [(await fill(storage, "held-elsewhere", 10 * KB)).id])  # not failed's hold

    def disk_full(*args: object) -> bool:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(storage.meta, "mark_evicting", disk_full)
    with pytest.raises(DiskFull):
        await storage.evict(failed, [TaskState.FAILED])
    assert not storage.content.path(failed).exists()
    assert storage.task_bytes(failed) == 0  # the accounting follows the file
    with pytest.raises(DiskFull):
        await storage.evict(finished.id, [TaskState.SUCCEEDED])
    assert await read_all(storage, finished.id) == payload("finished", 100 * KB)


async def test_an_applied_eviction_is_logged_with_its_reason_and_bytes(
    storage: Storage, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    task = await fill(storage, "idle", 10 * KB)
    with caplog.at_level(logging.INFO, logger="dfdaemon.storage"):
        applied = await storage.apply([Victim(task.id, TaskState.SUCCEEDED, "ttl", 10 * KB)])
    assert [victim.task_id for victim in applied.evicted] == [task.id]
    assert f"evicted task {task.id} reason=ttl bytes={10 * KB}" in [record.getMessage() for record in caplog.records]


async def test_each_upload_counts_until_it_ends_and_its_end_wakes_waiters(storage: Storage, clock: FakeClock) -> None:
    """Two uploads of one task: the first ending leaves the second's reference (the task cannot be evicted), and
    each end wakes whoever waits on the task."""
    task = await fill(storage, "served-twice", 10 * KB)
    async with storage.upload(task.id):
        async with storage.upload(task.id):  # the first to end
            waiter = asyncio.create_task(storage.wait_for_change(task.id))
            await asyncio.sleep(0)  # the waiter is waiting
        await asyncio.sleep(0)  # one turn of the loop: the released reference has set the task's event
        assert waiter.done()
        assert storage.in_flight(task.id) == (0, 1)
        assert await storage.evict(task.id, [TaskState.SUCCEEDED]) is None
    assert storage.in_flight(task.id) == (0, 0)
    assert await storage.evict(task.id, [TaskState.SUCCEEDED]) == 10 * KB
