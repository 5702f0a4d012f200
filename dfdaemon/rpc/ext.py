"""Our extension services (``dfdaemon.ext.v1``): use references, usage and GC."""

from __future__ import annotations

from collections.abc import Iterable

from dfdaemon.api import dfdaemon_ext_pb2 as ext_pb2
from dfdaemon.gc import GarbageCollector
from dfdaemon.rpc import convert
from dfdaemon.rpc.convert import InvalidRequest, unary
from dfdaemon.rpc.servers import Context
from dfdaemon.storage import Storage

USE_SERVICE = ext_pb2.DESCRIPTOR.services_by_name["Use"]
CACHE_SERVICE = ext_pb2.DESCRIPTOR.services_by_name["Cache"]


def _holder(holder: str) -> str:
    if not holder:
        raise InvalidRequest("holder is required (e.g. container:<namespace>/<id> or user:<name>)")
    return holder


async def _task_ids(storage: Storage, refs: Iterable[ext_pb2.TaskRef], allow_empty: bool = False) -> list[str]:
    """The tasks the refs name; a blob digest names every task holding that blob (the mirror's are named by URL),
    or, when none does, its digest-named id (so that a miss is reported as one)."""
    refs = list(refs)
    held = await storage.task_ids_for_digests(ref.blob_digest for ref in refs if ref.WhichOneof("ref") == "blob_digest")
    ids: list[str] = []
    for ref in refs:
        if ref.WhichOneof("ref") == "blob_digest" and ref.blob_digest in held:
            ids.extend(held[ref.blob_digest])
        else:
            ids.append(convert.task_ref_id(ref))
    if not ids and not allow_empty:
        raise InvalidRequest("at least one task is required")
    return ids


class UseServicer:
    """Holds on tasks by containers, pods and users: what keeps data in use out of GC's reach."""

    def __init__(self, storage: Storage, reserved_prefixes: tuple[str, ...] = ()) -> None:
        self.storage = storage
        # Holders the runtime sync owns: it would undo any change made here at its next pass.
        self.reserved_prefixes = reserved_prefixes

    def _holder(self, holder: str) -> str:
        if holder.startswith(self.reserved_prefixes):
            raise convert.Refused(
                f"holder {holder[:200]!r} belongs to the runtime sync (runtime.containerd.address is set); "
                "use another prefix, such as user:"
            )
        return _holder(holder)

    @unary
    async def Acquire(self, request: ext_pb2.AcquireRequest, context: Context) -> ext_pb2.AcquireResponse:
        ttl = convert.duration_seconds(request.ttl, "ttl") if request.HasField("ttl") else None
        holds = await self.storage.acquire(
            self._holder(request.holder), await _task_ids(self.storage, request.tasks), ttl
        )
        return ext_pb2.AcquireResponse(holds=[convert.hold(h) for h in holds])

    @unary
    async def Release(self, request: ext_pb2.ReleaseRequest, context: Context) -> ext_pb2.ReleaseResponse:
        released = await self.storage.release(
            self._holder(request.holder), await _task_ids(self.storage, request.tasks)
        )
        return ext_pb2.ReleaseResponse(released=released)

    @unary
    async def KeepAlive(self, request: ext_pb2.KeepAliveRequest, context: Context) -> ext_pb2.KeepAliveResponse:
        ttl = convert.duration_seconds(request.ttl, "ttl") if request.HasField("ttl") else None
        holds = await self.storage.keep_alive(self._holder(request.holder), ttl)
        return ext_pb2.KeepAliveResponse(holds=[convert.hold(h) for h in holds])

    @unary
    async def Sync(self, request: ext_pb2.SyncRequest, context: Context) -> ext_pb2.SyncResponse:
        ttl = convert.duration_seconds(request.ttl, "ttl") if request.HasField("ttl") else None
        result = await self.storage.sync(
            self._holder(request.holder), await _task_ids(self.storage, request.tasks, allow_empty=True), ttl
        )
        return ext_pb2.SyncResponse(
            acquired=result.acquired, released=result.released, kept=result.kept, missing=result.missing
        )

    @unary
    async def ListHolds(self, request: ext_pb2.ListHoldsRequest, context: Context) -> ext_pb2.ListHoldsResponse:
        holds = await self.storage.list_holds(
            holder=request.holder if request.HasField("holder") else None,
            task_id=request.task_id if request.HasField("task_id") else None,
        )
        return ext_pb2.ListHoldsResponse(holds=[convert.hold(h) for h in holds])

    @unary
    async def GetReferences(self, request: ext_pb2.GetReferencesRequest, context: Context) -> ext_pb2.TaskReferences:
        await self.storage.require_task(request.task_id)
        refs = await self.storage.get_references(request.task_id)
        return ext_pb2.TaskReferences(
            task_id=refs.task_id,
            holds=[convert.hold(h) for h in refs.holds],
            downloads=refs.downloads,
            uploads=refs.uploads,
            refcount=refs.refcount,
        )


class CacheServicer:
    """Usage accounting and garbage collection, run and inspected."""

    def __init__(self, storage: Storage, gc: GarbageCollector) -> None:
        self.storage = storage
        self.gc = gc

    @unary
    async def GetUsage(self, request: ext_pb2.GetUsageRequest, context: Context) -> ext_pb2.Usage:
        return convert.usage(await self.gc.usage())

    @unary
    async def RunGC(self, request: ext_pb2.RunGCRequest, context: Context) -> ext_pb2.GCRun:
        return convert.gc_run(await self.gc.run("manual", dry_run=request.dry_run))

    @unary
    async def ListGCRuns(self, request: ext_pb2.ListGCRunsRequest, context: Context) -> ext_pb2.ListGCRunsResponse:
        runs = await self.gc.list_runs(request.limit or 1)
        return ext_pb2.ListGCRunsResponse(runs=[convert.gc_run(run) for run in runs])

    @unary
    async def EvictTask(self, request: ext_pb2.EvictTaskRequest, context: Context) -> ext_pb2.EvictTaskResponse:
        dropped, freed = await self.storage.delete_task(request.task_id, force=request.force)
        return ext_pb2.EvictTaskResponse(released_holders=dropped, bytes=freed)
