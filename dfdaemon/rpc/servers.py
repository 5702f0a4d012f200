"""Building blocks every gRPC server of the project shares.

Message limits that fit a 64 MiB piece, health and reflection on every server,
and a clear ``UNIMPLEMENTED`` answer for RPCs that are declared but not served.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# A 64 MiB piece plus its envelope must fit in one message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024 + 1024 * 1024
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = SERVER_OPTIONS[:2]

_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# Status details travel in HTTP/2 trailers, which clients cap (8 KiB by default): user input echoed in a
# message must not push the real status out of reach.
MAX_DETAILS = 1024


def details(text: str) -> str:
    """A status message on one line, cut to a size every client accepts."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_DETAILS else f"{line[: MAX_DETAILS - 30]}… ({len(line)} characters)"


Context = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(full_method: str) -> Callable[..., Any]:
    async def handler(request: object, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{full_method} is not implemented by this server yet")

    return handler


class _Undecodable:
    """A request whose bytes are no valid message; the handler answers INVALID_ARGUMENT instead of UNKNOWN."""

    def __init__(self, message_name: str, error: Exception) -> None:
        self.reason = f"the request is not a valid {message_name}: {error}"


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return _Undecodable(message_class.DESCRIPTOR.full_name, exc)

    return parse


async def _checked_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details(request.reason))
        yield request


def _guarded(method: MethodDescriptor, implementation: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler so undecodable requests end with INVALID_ARGUMENT before the servicer sees them."""
    streaming_response = inspect.isasyncgenfunction(implementation)

    async def check(request: Any, context: Context) -> Any:
        if method.client_streaming:
            return _checked_stream(request, context)
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details(request.reason))
        return request

    if streaming_response:

        async def stream_handler(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in implementation(await check(request, context), context):
                yield response

        return stream_handler

    async def handler(request: Any, context: Context) -> Any:
        return await implementation(await check(request, context), context)

    return handler


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register ``servicer``'s methods named after the RPCs of ``service``.

    Servicers are plain classes holding only the RPCs they serve; every other RPC of the service answers
    UNIMPLEMENTED naming the method, where grpc's generated base classes would say only "Method not implemented!".
    A request that does not decode answers INVALID_ARGUMENT.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name, None) or _unimplemented(f"/{service.full_name}/{method.name}")
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            _guarded(method, implementation),
            request_deserializer=_lenient(request_class),
            response_serializer=_serializer(response_class),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _serializer(response_class: Any) -> Callable[[Any], bytes]:
    """A message's wire bytes; a servicer that built them itself (``bytes``) has them passed through as they are."""
    serialize = response_class.SerializeToString

    def serializer(response: Any) -> bytes:
        return response if isinstance(response, bytes) else bytes(serialize(response))

    return serializer


class HealthReporter:
    """The ``grpc.health.v1.Health`` service of one server, with the services it reports on."""

    def __init__(self, services: Iterable[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.services = ["", *services]

    def attach(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            await self.servicer.set(name, status)


class _MethodAwarePool:
    """The default descriptor pool, also resolving ``pkg.Service.Method`` symbols.

    The upb-backed pool cannot find a file by a method's name, which ``grpcurl describe`` asks for.
    """

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in service.methods_by_name:
                raise KeyError(symbol) from None
            return service.file


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection for ``services`` plus health and reflection themselves, as grpcurl expects."""
    names = [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=cast(descriptor_pool.DescriptorPool, _MethodAwarePool()))


def new_server(
    services: Iterable[str], register: Callable[[grpc.aio.Server], None]
) -> tuple[grpc.aio.Server, HealthReporter]:
    """A grpc.aio server with our options, the given services, health, reflection and tracing (when on)."""
    from dfdaemon.telemetry.tracing import server_interceptors  # here: the CLIs import this module for its options

    names = list(services)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=server_interceptors())
    register(server)
    reporter = HealthReporter(names)
    reporter.attach(server)
    enable_reflection(server, names)
    return server, reporter


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind and return the port (0 when binding failed); grpc raises on some failures and returns 0 on others."""
    try:
        if credentials is not None:
            return int(server.add_secure_port(address, credentials))
        return int(server.add_insecure_port(address))
    except RuntimeError:
        return 0


class BoundServer:
    """A server bound to its port, with its health service: one part a process starts and stops."""

    def __init__(self, server: grpc.aio.Server, health: HealthReporter, port: int) -> None:
        self.server = server
        self.health = health
        self.port = port

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        await self.health.set_serving(serving)

    async def stop(self, grace: float) -> None:
        """Let calls in flight finish within ``grace`` seconds; new calls are refused at once."""
        await self.server.stop(grace)
