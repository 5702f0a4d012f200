"""Client side of other peers: SyncPieces over gRPC, pieces over vortex TCP where offered, else DownloadPiece.

A parent that serves vortex says so in every SyncPiecesResponse (``ip`` and ``tcp_port``); the client
remembers that per parent and fetches that parent's pieces over vortex unless ``download.protocol`` is
``grpc``. One gRPC channel per parent address.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dfdaemon.api import dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.config import TLSConfig
from dfdaemon.download.peering import FetchedPiece, Parent, ParentUnavailable, PieceUnavailable
from dfdaemon.ids import PieceSpan
from dfdaemon.rpc.servers import CHANNEL_OPTIONS
from dfdaemon.rpc.tls import channel_credentials
from dfdaemon.telemetry.tracing import client_interceptors
from dfdaemon.vortex.client import VortexClient
from dfdaemon.vortex.tls import client_context

# Answers about one piece only: the parent is fine, that piece must come from elsewhere.
_PIECE_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS}


class GrpcParentClient:
    """Talks to parents: gRPC (one channel per parent address), and vortex TCP for parents that offer it."""

    def __init__(
        self, host_id: str, tls: TLSConfig | None = None, *, use_vortex: bool = True, piece_timeout: float = 360.0
    ) -> None:
        self.host_id = host_id
        secure = tls if tls is not None and tls.enabled else None
        # Built on first use (inside the event loop); mutual TLS when upload.client has certificates.
        self.credentials = channel_credentials(secure) if secure is not None else None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.vortex: VortexClient | None = None
        if use_vortex:
            context = client_context(secure) if secure is not None else None
            self.vortex = VortexClient(piece_timeout=piece_timeout, ssl_context=context)
        # Parent address -> (ip, tcp_port) its SyncPieces answers advertised for vortex.
        self._vortex_endpoints: dict[str, tuple[str, int]] = {}

    def _stub(self, parent: Parent) -> dfdaemon_pb2_grpc.DfdaemonUploadAsyncStub:
        channel = self._channels.get(parent.address)
        if channel is None:
            if self.credentials is not None:
                channel = grpc.aio.secure_channel(
                    parent.address, self.credentials, options=CHANNEL_OPTIONS, interceptors=client_interceptors()
                )
            else:
                channel = grpc.aio.insecure_channel(
                    parent.address, options=CHANNEL_OPTIONS, interceptors=client_interceptors()
                )
            self._channels[parent.address] = channel
        return dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def sync_pieces(self, parent: Parent, task_id: str, interested: list[int]) -> AsyncIterator[PieceSpan]:
        request = dfdaemon_pb2.SyncPiecesRequest(
            host_id=self.host_id, task_id=task_id, interested_piece_numbers=interested
        )
        call = self._stub(parent).SyncPieces(request)
        try:
            async for response in call:
                if response.HasField("tcp_port") and 0 < response.tcp_port < 65536:
                    self._vortex_endpoints[parent.address] = (response.ip or parent.ip, response.tcp_port)
                yield PieceSpan(number=response.number, offset=response.offset, length=response.length)
        finally:
            call.cancel()

    async def download_piece(self, parent: Parent, task_id: str, number: int) -> FetchedPiece:
        """Over vortex when the parent advertised a port for it (and vortex is on), else gRPC DownloadPiece."""
        endpoint = self._vortex_endpoints.get(parent.address)
        if self.vortex is not None and endpoint is not None:
            return await self.vortex.download_piece(*endpoint, task_id, number)
        return await self._download_piece_grpc(parent, task_id, number)

    async def _download_piece_grpc(self, parent: Parent, task_id: str, number: int) -> FetchedPiece:
        request = dfdaemon_pb2.DownloadPieceRequest(host_id=self.host_id, task_id=task_id, piece_number=number)
        try:
            response = await self._stub(parent).DownloadPiece(request)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            if exc.code() in _PIECE_CODES:
                raise PieceUnavailable(reason) from None
            raise ParentUnavailable(reason) from None
        if response is None:  # grpc hands back None for bytes that do not parse (and logs it)
            raise ParentUnavailable("the parent's DownloadPiece answer does not parse")
        piece = response.piece
        return FetchedPiece(
            number=piece.number,
            offset=piece.offset,
            length=piece.length,
            digest=piece.digest,
            metadata_digest=response.digest if response.HasField("digest") else None,
            content=piece.content,
        )
