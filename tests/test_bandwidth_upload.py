"""upload.bandwidthLimit on both upload paths: vortex and gRPC ``DownloadPiece`` take from one bucket per piece.

The bucket runs on a fake clock that never moves, so what each piece took shows as the bucket's debt and the
waits it computed; the bytes are checked against what was stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from dfdaemon import ids
from dfdaemon.admission import Admission
from dfdaemon.api import dfdaemon_pb2
from dfdaemon.download import DownloadManager
from dfdaemon.rpc.download import Membership
from dfdaemon.rpc.servers import Context
from dfdaemon.rpc.upload import UploadServicer
from dfdaemon.storage import Storage
from dfdaemon.vortex.client import VortexClient
from dfdaemon.vortex.server import VortexServer
from tests.storage_support import fill, payload, received
from tests.test_ratelimit import FakeTime, bucket

PIECE = 64 * 1024
PIECES = 4


class FakeContext:
    """The part of a gRPC context ``DownloadPiece`` uses: a callback once the response is sent."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[object], None]] = []

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        for callback in self.callbacks:
            callback(self)


async def test_vortex_pieces_take_their_length_from_the_upload_bucket(storage: Storage) -> None:
    task = await fill(storage, "bandwidth-vortex", PIECES * PIECE, piece_length=PIECE)
    data = payload("bandwidth-vortex", PIECES * PIECE)
    time = FakeTime(advance=False)
    limiter = bucket(2 * PIECE, time)
    server = VortexServer(storage, piece_timeout=30.0, bandwidth=limiter)
    port = await server.start("127.0.0.1", 0)
    client = VortexClient(piece_timeout=30.0)
    try:
        for number in range(PIECES):
            fetched = await client.download_piece("127.0.0.1", port, task.id, number)
            assert await received(fetched) == data[number * PIECE : (number + 1) * PIECE]
    finally:
        await server.stop()
    assert limiter.tokens == 2 * PIECE - PIECES * PIECE
    assert time.sleeps == [PIECE / (2 * PIECE), 2 * PIECE / (2 * PIECE)]  # pieces 3 and 4 waited


async def test_download_piece_takes_its_length_from_the_upload_bucket(storage: Storage) -> None:
    task = await fill(storage, "bandwidth-grpc", PIECES * PIECE, piece_length=PIECE)
    data = payload("bandwidth-grpc", PIECES * PIECE)
    time = FakeTime(advance=False)
    limiter = bucket(PIECE, time)
    servicer = UploadServicer(
        storage,
        cast(DownloadManager, None),  # DownloadPiece reads the cache only
        Membership(),
        "127.0.0.1",
        30.0,
        Admission("DownloadPiece", 2, 8),
        bandwidth=limiter,
    )
    for number in range(PIECES):
        context = FakeContext()
        request = dfdaemon_pb2.DownloadPieceRequest(host_id="child", task_id=task.id, piece_number=number)
        wire = await servicer.DownloadPiece(request, cast(Context, context))
        context.finish()
        piece = dfdaemon_pb2.DownloadPieceResponse.FromString(wire).piece
        assert piece.content == data[number * PIECE : (number + 1) * PIECE]
        assert piece.digest == ids.piece_digest(piece.content)
    assert limiter.tokens == PIECE - PIECES * PIECE
    assert len(time.sleeps) == PIECES - 1
