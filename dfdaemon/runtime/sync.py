"""Keep the cache's holds equal to what the container runtime uses.

Every container record (running, or created and not yet removed: kubelet counts both) gets one holder,
``container:<namespace>/<id>``, that holds exactly the blobs of its image: config and layers, found by digest
(every task whose content matched it: the mirror names a blob by its URL, so one pulled from two repositories
is two tasks, both held; or by the digest's hex with ``enableTaskIDBasedBlobDigest``). A blob the cache lacks
is reported missing under its digest-named id. Manifests and indexes are looked up too, but the mirror passes
them through, so they are cached only when something else put them there. A container's set is
fixed when the sync first sees it: its root filesystem never changes, so a tag later pulled to a new
digest must not move its holds. Pinned images follow their reference and get ``pinned:<ref>``.
Holders whose container is gone are released, and GC's grace period runs from then. Holds carry no
lease: they end only when containerd says the container is gone, never because containerd was
unreachable for a while. A sync runs every ``runtime.syncInterval`` and soon after any container,
task or image event; the periodic one repairs whatever an event stream missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dfdaemon import ids
from dfdaemon.runtime.containerd import EVENT_TOPICS, ContainerdError, ImageNotFound, RuntimeContainer, RuntimeEvent
from dfdaemon.storage import Storage

log = logging.getLogger("dfdaemon.runtime")

CONTAINER_HOLDER = "container:"
PINNED_HOLDER = "pinned:"


class Runtime(Protocol):
    """What the sync needs from a container runtime."""

    async def containers(self) -> list[RuntimeContainer]: ...

    async def namespaces(self) -> list[str]: ...

    async def image_digests(self, namespace: str, image: str) -> list[str]: ...

    def events(self) -> AsyncIterator[RuntimeEvent]: ...

    async def close(self) -> None: ...


def container_holder(namespace: str, container_id: str) -> str:
    return f"{CONTAINER_HOLDER}{namespace}/{container_id}"


def pinned_holder(image: str) -> str:
    return f"{PINNED_HOLDER}{image}"


def task_ids_of(digests: Iterable[str], held: Mapping[str, list[str]]) -> list[str]:
    """The tasks holding the blobs (``held`` as ``Storage.task_ids_for_digests`` answers); a blob no task holds
    stands as its digest-named id, so the sync reports it missing, unless its algorithm names no task."""
    found = []
    for digest in digests:
        if digest in held:
            found.extend(held[digest])
            continue
        with contextlib.suppress(ids.InvalidTaskId):
            found.append(ids.blob_digest_task_id(digest))
    return sorted(set(found))


@dataclass(frozen=True)
class _Blobs:
    """What a holder is to hold: its image's blobs by digest (the tasks holding them are looked up each pass, so a
    blob cached later is held then), plus the tasks it held already when a restarted daemon first saw it."""

    digests: tuple[str, ...]
    task_ids: frozenset[str] = frozenset()


@dataclass
class SyncReport:
    """One pass: what each holder holds now, and what it would hold but the cache does not have."""

    held: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)


class RuntimeSync:
    """Runs the sync loop and the event watch for one runtime."""

    def __init__(
        self,
        storage: Storage,
        runtime: Runtime,
        *,
        interval: float,
        pinned_images: list[str] | None = None,
        settle: float = 0.2,
    ) -> None:
        self.storage = storage
        self.runtime = runtime
        self.interval = interval
        self.pinned_images = list(dict.fromkeys(pinned_images or []))
        self.settle = settle
        self.last_report: SyncReport | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Each live container's blobs as first resolved (after a restart: that resolution plus what it held).
        self._container_blobs: dict[str, _Blobs] = {}
        self._reachable = True

    def start(self) -> None:
        """Run the loop (its first sync after an event or ``interval``: call ``sync_once`` first) and the watch."""
        self._tasks = [
            asyncio.create_task(self._periodic(), name="runtime-sync"),
            asyncio.create_task(self._watch(), name="runtime-events"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def trigger(self) -> None:
        """Ask for a sync soon (events call this)."""
        self._wake.set()

    async def sync_once(self) -> SyncReport:
        """Make the runtime holders match containerd now; raises ContainerdError when it cannot be asked."""
        async with self._lock:
            holds: dict[str, set[str]] = {}
            for hold in await self.storage.all_live_holds():
                if hold.holder.startswith((CONTAINER_HOLDER, PINNED_HOLDER)):
                    holds.setdefault(hold.holder, set()).add(hold.task_id)
            wanted = await self._wanted(holds)
            held = await self.storage.task_ids_for_digests(
                digest for blobs in wanted.values() if blobs is not None for digest in blobs.digests
            )
            report = SyncReport()
            current = set(holds)
            for holder, blobs in wanted.items():
                if blobs is None:
                    report.unresolved.append(holder)
                    continue
                result = await self.storage.sync(holder, sorted(set(task_ids_of(blobs.digests, held)) | blobs.task_ids))
                report.held[holder] = sorted(result.acquired + result.kept)
                if result.missing:
                    report.missing[holder] = result.missing
                if result.acquired or result.released:
                    log.info(
                        "%s now holds %d tasks (+%d, -%d)",
                        holder,
                        len(report.held[holder]),
                        len(result.acquired),
                        len(result.released),
                    )
            for holder in set(self._container_blobs) - wanted.keys():
                del self._container_blobs[holder]
            for holder in sorted(current - wanted.keys()):
                result = await self.storage.sync(holder, [])
                report.released.append(holder)
                log.info("%s is gone: released its %d holds", holder, len(result.released))
            self.last_report = report
            return report

    async def _wanted(self, holds: dict[str, set[str]]) -> dict[str, _Blobs | None]:
        """Holder -> its blobs; None when an image cannot be resolved now (its holds are left as they are)."""
        wanted: dict[str, _Blobs | None] = {}
        images: dict[tuple[str, str], list[str] | None] = {}  # each image resolved once per pass
        for container in await self.runtime.containers():
            holder = container_holder(container.namespace, container.id)
            if holder not in self._container_blobs:
                key = (container.namespace, container.image)
                if key not in images:
                    # An image record removed while its container lives on still keeps what the container held.
                    images[key] = await self._digests(holder, container.namespace, container.image, keep_if_absent=True)
                digests = images[key]
                if digests is not None:
                    self._container_blobs[holder] = _Blobs(tuple(digests), frozenset(holds.get(holder, ())))
            wanted[holder] = self._container_blobs.get(holder)
        if self.pinned_images:
            namespaces = await self.runtime.namespaces()
            for image in self.pinned_images:
                holder = pinned_holder(image)
                found = [await self._digests(holder, ns, image, keep_if_absent=False) for ns in namespaces]
                wanted[holder] = None if None in found else _Blobs(tuple(sorted({d for ds in found if ds for d in ds})))
        return wanted

    async def _digests(self, holder: str, namespace: str, image: str, *, keep_if_absent: bool) -> list[str] | None:
        """The digests of an image's blobs; None when they cannot be known now."""
        if not image:
            return []
        try:
            return await self.runtime.image_digests(namespace, image)
        except ImageNotFound:
            return None if keep_if_absent else []
        except ContainerdError as exc:
            log.warning("cannot resolve image %s of %s: %s", image, holder, exc)
            return None

    async def sync_logged(self) -> SyncReport | None:
        """``sync_once``, with one warning when containerd stops answering and one line when it is back."""
        try:
            report = await self.sync_once()
        except ContainerdError as exc:
            if self._reachable:
                log.warning("runtime sync: containerd does not answer, holds left as they are: %s", exc)
            else:
                log.debug("runtime sync: containerd still does not answer: %s", exc)
            self._reachable = False
            return None
        if not self._reachable:
            log.info("runtime sync: containerd answers again; %d holders", len(report.held))
        self._reachable = True
        return report

    async def _periodic(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            # Let a burst of events (create, start, ...) settle into one sync.
            await asyncio.sleep(self.settle)
            self._wake.clear()
            try:
                await self.sync_logged()
            except Exception:
                log.exception("runtime sync failed")

    async def _watch(self) -> None:
        backoff = 0.5
        while True:
            try:
                async for event in self.runtime.events():
                    backoff = 0.5
                    if event.topic.startswith(EVENT_TOPICS):
                        self.trigger()
            except ContainerdError as exc:
                log.debug("containerd event stream ended: %s", exc)
            except Exception:
                log.exception("containerd event stream failed")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.interval, 30.0)
            self.trigger()  # events may have been missed while the stream was down
