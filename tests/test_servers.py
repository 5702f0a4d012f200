"""The shared gRPC plumbing: RPCs a servicer lacks answer UNIMPLEMENTED by name; undecodable bytes INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dfdaemon.api import dfdaemon_pb2
from dfdaemon.rpc.servers import SERVER_OPTIONS, BoundServer, add_service, bind, details, new_server

SERVICE = dfdaemon_pb2.DESCRIPTOR.services_by_name["DfdaemonUpload"]


class OnlyStat:
    async def StatLocalTask(
        self, request: dfdaemon_pb2.StatLocalTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> dfdaemon_pb2.StatLocalTaskResponse:
        return dfdaemon_pb2.StatLocalTaskResponse(task_id=request.task_id)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    add_service(server, SERVICE, OnlyStat())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_missing_rpcs_answer_unimplemented_by_name(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/dfdaemon.v2.DfdaemonUpload/DownloadPiece",
            request_serializer=dfdaemon_pb2.DownloadPieceRequest.SerializeToString,
            response_deserializer=dfdaemon_pb2.DownloadPieceResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(dfdaemon_pb2.DownloadPieceRequest())
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert (
            caught.value.details() == "/dfdaemon.v2.DfdaemonUpload/DownloadPiece is not implemented by this server yet"
        )
        stat = channel.unary_unary(
            "/dfdaemon.v2.DfdaemonUpload/StatLocalTask",
            request_serializer=dfdaemon_pb2.StatLocalTaskRequest.SerializeToString,
            response_deserializer=dfdaemon_pb2.StatLocalTaskResponse.FromString,
        )
        assert (await stat(dfdaemon_pb2.StatLocalTaskRequest(task_id="x"))).task_id == "x"


async def test_undecodable_bytes_are_invalid_argument(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        raw = channel.unary_unary("/dfdaemon.v2.DfdaemonUpload/StatLocalTask")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid dfdaemon.v2.StatLocalTaskRequest" in (caught.value.details() or "")


def test_details_are_one_bounded_line() -> None:
    assert details("a\n  b") == "a b"
    long = details("x" * 5000)
    assert len(long) <= 1024 and long.endswith("(5000 characters)")


async def test_bind_answers_zero_for_a_port_already_taken() -> None:
    first = grpc.aio.server(options=SERVER_OPTIONS)
    port = bind(first, "127.0.0.1:0")
    assert port > 0
    await first.start()
    try:
        assert bind(grpc.aio.server(options=SERVER_OPTIONS), f"127.0.0.1:{port}") == 0
    finally:
        await first.stop(0)


async def test_a_bound_server_reports_the_health_it_is_given() -> None:
    server, health = new_server([SERVICE.full_name], lambda s: add_service(s, SERVICE, OnlyStat()))
    part = BoundServer(server, health, bind(server, "127.0.0.1:0"))
    await part.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{part.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for serving, status in [
                (True, health_pb2.HealthCheckResponse.SERVING),
                (False, health_pb2.HealthCheckResponse.NOT_SERVING),
            ]:
                await part.set_serving(serving)
                for name in ("", SERVICE.full_name):
                    assert (await check(health_pb2.HealthCheckRequest(service=name))).status == status
    finally:
        await part.stop(0)
