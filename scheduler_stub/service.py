"""The ``scheduler.v2.Scheduler`` servicer of the stub: protobuf in, registry calls, protobuf out."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import grpc
from google.protobuf import text_format
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from dfdaemon.api import common_pb2, scheduler_pb2
from dfdaemon.rpc.servers import Context, details
from scheduler_stub import peers, preheat
from scheduler_stub.evaluator import Network
from scheduler_stub.registry import (
    Answer,
    Host,
    HostNotAnnounced,
    InvalidRequest,
    NoHostAvailable,
    NoParentAvailable,
    NotFound,
    PeerView,
    Registry,
    RegistryError,
    Schedule,
    Task,
)

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]

log = logging.getLogger("dfscheduler.service")


RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

_STATUS_OF: dict[type[RegistryError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    HostNotAnnounced: grpc.StatusCode.FAILED_PRECONDITION,
    NoParentAvailable: grpc.StatusCode.FAILED_PRECONDITION,
    NoHostAvailable: grpc.StatusCode.FAILED_PRECONDITION,
}
# How long a child waits for the seed it triggered to register before it goes elsewhere (upstream: about 2 s,
# four scheduling rounds 500 ms apart), and how often it looks.
SEED_WAIT = 2.0
SEED_POLL = 0.05
# The longest a seed may take over a task it was asked for.
SEED_DOWNLOAD_TIMEOUT = 6 * 3600.0


def _debug(rpc: str, arrow: str, message: Message) -> None:
    """Log a whole message on one line, paying for the formatting only when debug logging is on."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s %s", rpc, arrow, text_format.MessageToString(message, as_one_line=True))


def _unary(
    method: Callable[[Any, RequestT, Context], Awaitable[ResponseT]],
) -> Callable[[Any, RequestT, Context], Awaitable[ResponseT]]:
    """Log a unary RPC's request and response, and end it with the status matching a registry error."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: RequestT, context: Context) -> ResponseT:
        _debug(method.__name__, "<-", request)
        try:
            response = await method(self, request, context)
        except RegistryError as error:
            log.debug("%s refused: %s", method.__name__, error)
            await context.abort(_STATUS_OF[type(error)], details(str(error)))
        _debug(method.__name__, "->", response)
        return response

    return wrapper


class SchedulerServicer:
    """Peer scheduling over the registry; RPCs not defined here answer UNIMPLEMENTED by name."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # Mutual TLS towards seeds and peers, when the stub serves with it (set once the server is bound).
        self.peer_credentials: grpc.ChannelCredentials | None = None
        # Seed downloads and preheats run past the RPC that started them; kept here so none is collected mid-way.
        self._background: set[asyncio.Task[Any]] = set()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        """Forget finished background work; a failure is one log line, not a stray traceback."""
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed: %s", task.exception())

    async def close(self) -> None:
        """Stop seed downloads and preheats still running (at shutdown)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def AnnouncePeer(
        self, request_iterator: AsyncIterator[scheduler_pb2.AnnouncePeerRequest], context: Context
    ) -> AsyncIterator[scheduler_pb2.AnnouncePeerResponse]:
        """One download's stream: answer registration and reschedules, record progress, close after the final
        report, which is what the peer waits for. A stream that ends any other way leaves the peer failed."""
        peer_id = ""
        try:
            async for request in request_iterator:
                _debug("AnnouncePeer", "<-", request)
                kind = request.WhichOneof("request")
                if kind == "register_peer_request":
                    schedule = self._register(request)
                    peer_id = request.peer_id
                    if schedule.answer is Answer.AWAIT_SEED:
                        schedule = await self._after_seed(peer_id, schedule, request)
                    yield _answer(schedule)
                elif not peer_id or request.peer_id != peer_id:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        details(f"peer {request.peer_id} has not registered on this stream"),
                    )
                elif kind == "reschedule_peer_request":
                    reschedule = request.reschedule_peer_request
                    given_up = [parent.id for parent in reschedule.candidate_parents]
                    yield _answer(self.registry.reschedule_peer(peer_id, given_up, reschedule.description))
                elif self._report(peer_id, request):
                    return
        except RegistryError as error:
            log.info("AnnouncePeer of peer %s refused: %s", peer_id or "(unregistered)", error)
            await context.abort(_STATUS_OF[type(error)], details(str(error)))
        finally:
            if peer_id:
                self.registry.peer_abandoned(peer_id)

    def _register(self, request: scheduler_pb2.AnnouncePeerRequest) -> Schedule:
        download = request.register_peer_request.download
        task = Task(
            id=request.task_id,
            url=download.url,
            tag=download.tag,
            application=download.application,
            content_length=download.actual_content_length if download.HasField("actual_content_length") else None,
            piece_length=download.actual_piece_length if download.HasField("actual_piece_length") else None,
            piece_count=download.actual_piece_count if download.HasField("actual_piece_count") else None,
        )
        return self.registry.register_peer(
            request.peer_id,
            request.host_id,
            task,
            need_back_to_source=download.need_back_to_source,
            may_back_to_source=not download.disable_back_to_source,
            concurrent_pieces=download.concurrent_piece_count if download.HasField("concurrent_piece_count") else None,
            priority=download.priority,
        )

    async def _after_seed(
        self, peer_id: str, schedule: Schedule, request: scheduler_pb2.AnnouncePeerRequest
    ) -> Schedule:
        """Ask the seed for the task (unless a peer before did), then wait for its peer to register and offer it."""
        if schedule.trigger is not None:
            self._spawn(self._seed(schedule.trigger, request.task_id, request.register_peer_request.download))
        deadline = asyncio.get_running_loop().time() + SEED_WAIT
        while True:
            give_up = asyncio.get_running_loop().time() >= deadline
            answer = self.registry.seed_scheduled(peer_id, give_up)
            if answer is not None:
                return answer
            await asyncio.sleep(SEED_POLL)

    async def _seed(self, seed: Host, task_id: str, child: common_pb2.Download) -> None:
        """The seed downloads the task from the source, as upstream asks it: the child's Download, back to source,
        no output file."""
        download = common_pb2.Download()
        download.CopyFrom(child)
        download.need_back_to_source = True
        download.ClearField("output_path")
        log.info("asking seed peer %s to download task %s", seed.id, task_id)
        succeeded = False
        try:
            target = peers.Target(seed.ip, seed.port, self.peer_credentials)
            succeeded = (await peers.download_task(target, download, SEED_DOWNLOAD_TIMEOUT)).ok
        finally:
            self.registry.seed_finished(task_id, succeeded)

    def _report(self, peer_id: str, request: scheduler_pb2.AnnouncePeerRequest) -> bool:
        """Record one progress report; true when it was the final one."""
        match request.WhichOneof("request"):
            case "download_peer_started_request":
                self.registry.peer_started(peer_id, back_to_source=False)
            case "download_peer_back_to_source_started_request":
                self.registry.peer_started(peer_id, back_to_source=True)
            case "download_piece_finished_request":
                self.registry.piece_finished(peer_id, request.download_piece_finished_request.piece.number)
            case "download_piece_back_to_source_finished_request":
                piece = request.download_piece_back_to_source_finished_request.piece
                self.registry.piece_finished(peer_id, piece.number)
            case "download_piece_failed_request":
                failed = request.download_piece_failed_request
                number = failed.piece_number if failed.HasField("piece_number") else None
                self.registry.piece_failed(peer_id, failed.parent_id, number, failed.temporary)
            case "download_piece_back_to_source_failed_request":
                # The origin failed the peer; no parent is to blame and the peer decides whether to give up.
                return False
            case "download_peer_finished_request" | "download_peer_back_to_source_finished_request":
                self.registry.peer_finished(peer_id, succeeded=True)
                return True
            case "download_peer_failed_request":
                description = request.download_peer_failed_request.description
                self.registry.peer_finished(peer_id, succeeded=False, description=description)
                return True
            case "download_peer_back_to_source_failed_request":
                description = request.download_peer_back_to_source_failed_request.description
                self.registry.peer_finished(peer_id, succeeded=False, description=description)
                return True
            case _:
                raise InvalidRequest("the request carries no report")
        return False

    @_unary
    async def AnnounceHost(self, request: scheduler_pb2.AnnounceHostRequest, context: Context) -> Empty:
        host = request.host
        interval = request.interval.ToNanoseconds() / 1e9 if request.HasField("interval") else None
        network = Network(host.network.idc, host.network.location, host.network.max_tx_bandwidth)
        self.registry.announce_host(
            host.id,
            host.ip,
            host.port,
            host.hostname,
            host.type,
            interval,
            network=network,
            disable_shared=host.disable_shared,
        )
        return Empty()

    @_unary
    async def ListHosts(
        self, request: scheduler_pb2.ListHostsRequest, context: Context
    ) -> scheduler_pb2.ListHostsResponse:
        host_type = request.type if request.HasField("type") else None
        return scheduler_pb2.ListHostsResponse(hosts=[_host(host) for host in self.registry.list_hosts(host_type)])

    @_unary
    async def DeleteHost(self, request: scheduler_pb2.DeleteHostRequest, context: Context) -> Empty:
        self.registry.delete_host(request.host_id)
        return Empty()

    @_unary
    async def StatTask(self, request: scheduler_pb2.StatTaskRequest, context: Context) -> common_pb2.Task:
        status = self.registry.stat_task(request.task_id)
        task = _task(status.task)
        task.state = status.state
        task.peer_count = status.peer_count
        task.has_available_peer = status.has_available_peer
        return task

    @_unary
    async def DeleteTask(self, request: scheduler_pb2.DeleteTaskRequest, context: Context) -> Empty:
        self.registry.delete_task(request.host_id, request.task_id)
        return Empty()

    @_unary
    async def StatPeer(self, request: scheduler_pb2.StatPeerRequest, context: Context) -> common_pb2.Peer:
        return _peer(self.registry.stat_peer(request.peer_id))

    @_unary
    async def PreheatFile(self, request: scheduler_pb2.PreheatFileRequest, context: Context) -> Empty:
        """Checked and answered at once (hosts chosen now, so an empty cluster is refused); the downloads follow."""
        plan = preheat.plan(request)
        hosts = plan.hosts(self.registry, request.url)
        log.info("preheat file %s on %d host(s) (%s)", request.url, len(hosts), plan.scope)
        self._spawn(preheat.preheat(self.registry, plan, [request.url], self.peer_credentials))
        return Empty()

    @_unary
    async def PreheatImage(self, request: scheduler_pb2.PreheatImageRequest, context: Context) -> Empty:
        """Checked and answered at once; the manifest is resolved and every layer preheated afterwards."""
        plan = preheat.plan(request)
        plan.hosts(self.registry, request.url)
        log.info("preheat image %s (%s)", request.url, plan.scope)
        self._spawn(self._preheat_image(request, plan))
        return Empty()

    async def _preheat_image(self, request: scheduler_pb2.PreheatImageRequest, plan: preheat.Plan) -> None:
        try:
            image = await preheat.resolve_image(
                request.url,
                request.platform or preheat.default_platform(),
                dict(request.header),
                request.username,
                request.password,
                verify_tls=not request.insecure_skip_verify,
            )
        except (preheat.ManifestError, aiohttp.ClientError, TimeoutError) as error:
            log.warning("preheat image %s failed: %s", request.url, error)
            return
        log.info("preheat image %s: %d layer(s)", request.url, len(image.layers))
        await preheat.preheat(self.registry, plan, image.layers, self.peer_credentials, image.headers)

    @_unary
    async def DeletePeer(self, request: scheduler_pb2.DeletePeerRequest, context: Context) -> Empty:
        self.registry.delete_peer(request.peer_id)
        return Empty()


def _answer(schedule: Schedule) -> scheduler_pb2.AnnouncePeerResponse:
    if schedule.answer is Answer.EMPTY_TASK:
        response = scheduler_pb2.AnnouncePeerResponse(empty_task_response=scheduler_pb2.EmptyTaskResponse())
    elif schedule.answer is Answer.NORMAL:
        normal = scheduler_pb2.NormalTaskResponse(candidate_parents=[_peer(parent) for parent in schedule.parents])
        response = scheduler_pb2.AnnouncePeerResponse(normal_task_response=normal)
    else:
        back = scheduler_pb2.NeedBackToSourceResponse(description=schedule.description)
        response = scheduler_pb2.AnnouncePeerResponse(need_back_to_source_response=back)
    _debug("AnnouncePeer", "->", response)
    return response


def _peer(view: PeerView) -> common_pb2.Peer:
    return common_pb2.Peer(id=view.peer.id, state=view.peer.state.value, task=_task(view.task), host=_host(view.host))


def _task(task: Task) -> common_pb2.Task:
    return common_pb2.Task(
        id=task.id,
        type=common_pb2.STANDARD,
        url=task.url,
        tag=task.tag or None,
        application=task.application or None,
        content_length=task.content_length or 0,
        piece_count=task.piece_count or 0,
    )


def _host(host: Host) -> common_pb2.Host:
    network = common_pb2.Network(
        idc=host.network.idc or None,
        location=host.network.location or None,
        max_tx_bandwidth=host.network.max_tx_bandwidth,
    )
    return common_pb2.Host(
        id=host.id,
        type=host.type,
        hostname=host.hostname,
        ip=host.ip,
        port=host.port,
        network=network,
        disable_shared=host.disable_shared,
    )
