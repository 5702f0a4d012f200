"""A hostile parent: a real process that the scheduler stub offers as a parent, and that lies about one piece.

It announces itself to the scheduler, registers as a succeeded peer of one task, and serves that task's pieces
(cut from a local copy of the file) over gRPC ``DfdaemonUpload`` (``SyncPieces``, ``DownloadPiece``) and, with
``--vortex``, over vortex TCP (advertised in every ``SyncPiecesResponse``, as a real parent does). Every piece
is served correctly except ``--piece``, which gets the ``--behaviour``:

- ``bad-byte``: one byte flipped under the digest of the true bytes;
- ``wrong-digest``: the true bytes under a digest that is not theirs;
- ``short`` / ``long``: one byte fewer / more than the piece, under their own digest;
- ``wrong-number`` / ``wrong-offset``: the true bytes, metadata naming another piece number / offset;
- ``stall``: ``--pause-after`` bytes of the piece (vortex; gRPC sends nothing), then nothing, forever;
- ``reset``: ``--pause-after`` bytes, then the connection is reset (gRPC: the process dies mid-call);
- ``garbage``: bytes that are no valid frame (vortex: an unknown packet tag; gRPC: an unparsable response).

With ``--progress-file``, the misbehaving piece's first ``--pause-after`` bytes are written to the socket, then
the file is created, then the parent stalls: a test waits for the file and kills the process, so the kill lands
after those bytes left and before the rest. Lines ``hostile parent serving on PORT`` and ``... vortex on PORT``
tell the test it is ready. Run: ``python -m tests.hostile_parent --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from google.protobuf.message import Message

from dfdaemon import ids
from dfdaemon.api import common_pb2, dfdaemon_pb2, scheduler_pb2, scheduler_pb2_grpc
from dfdaemon.vortex import codec
from tests.support import REPO_ROOT, SchedulerProcess, stop_process, wait_for_line

BEHAVIOURS = ("bad-byte", "wrong-digest", "short", "long", "wrong-number", "wrong-offset", "stall", "reset", "garbage")
UPLOAD_SERVICE = "dfdaemon.v2.DfdaemonUpload"
HOST_ID = "hostile-host"
PEER_ID = "hostile-peer"

log = logging.getLogger("hostile-parent")


@dataclass(frozen=True)
class Piece:
    """What the parent claims about one piece, and the bytes it sends under that claim."""

    number: int
    offset: int
    length: int
    digest: str
    content: bytes


class Hostile:
    """The task's pieces, the behaviour of the one that lies, and how far to go before stalling or resetting."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.data = Path(args.file).read_bytes()
        self.spans = ids.pieces_for(len(self.data), args.piece_length)
        self.task_id: str = args.task_id
        self.behaviour: str = args.behaviour
        self.target: int = args.piece
        self.pause_after: int = args.pause_after
        self.progress_file = Path(args.progress_file) if args.progress_file else None

    def true_piece(self, number: int) -> Piece:
        span = self.spans[number]
        content = self.data[span.offset : span.end]
        return Piece(number, span.offset, span.length, ids.piece_digest(content), content)

    def claimed_piece(self, number: int) -> Piece:
        """The piece as this parent presents it: true, except the target under the content-level behaviours."""
        piece = self.true_piece(number)
        if number != self.target:
            return piece
        content = piece.content
        match self.behaviour:
            case "bad-byte":
                middle = len(content) // 2
                return replace(
                    piece, content=content[:middle] + bytes([content[middle] ^ 0x01]) + content[middle + 1 :]
                )
            case "wrong-digest":
                return replace(piece, digest=ids.piece_digest(content + b"x"))
            case "short":
                return _resized(piece, content[:-1])
            case "long":
                return _resized(piece, content + b"\0")
            case "wrong-number":
                return replace(piece, number=number + 1)
            case "wrong-offset":
                return replace(piece, offset=piece.offset + 1)
        return piece

    def lies_on_the_wire(self, number: int) -> bool:
        """Whether this piece's answer breaks the transport rather than its content."""
        return number == self.target and self.behaviour in ("stall", "reset", "garbage")

    async def paused(self) -> None:
        """The first bytes of the piece are out: tell the test, then wait for it to kill this process."""
        if self.progress_file is not None:
            self.progress_file.write_text(f"{self.pause_after}\n")
        log.info("hostile parent paused on piece %d after %d bytes", self.target, self.pause_after)
        await asyncio.Event().wait()


@dataclass
class HostileParentProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def running_hostile_parent(
    workdir: Path,
    scheduler: SchedulerProcess,
    url: str,
    task_id: str,
    file: Path,
    piece_length: int,
    behaviour: str,
    piece: int,
    *options: str,
) -> Iterator[HostileParentProcess]:
    """Start a hostile parent and wait until the scheduler knows it as a succeeded peer of the task."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "hostile.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_parent", "--scheduler", scheduler.address, "--url", url,
             "--task-id", task_id, "--file", str(file), "--piece-length", str(piece_length),
             "--behaviour", behaviour, "--piece", str(piece), *options],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )  # fmt: skip
    try:
        wait_for_line(log_path, r"hostile parent serving on \d+", proc)
        yield HostileParentProcess(proc, log_path)
    finally:
        stop_process(proc, timeout=5)


def _resized(piece: Piece, content: bytes) -> Piece:
    return replace(piece, length=len(content), digest=ids.piece_digest(content), content=content)


# gRPC DfdaemonUpload


def grpc_handler(hostile: Hostile, tcp_port: int | None) -> grpc.GenericRpcHandler:
    """SyncPieces and DownloadPiece; the garbage behaviour serializes DownloadPiece's answer as noise."""

    async def sync_pieces(
        request: dfdaemon_pb2.SyncPiecesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[dfdaemon_pb2.SyncPiecesResponse]:
        wanted = set(request.interested_piece_numbers) or {span.number for span in hostile.spans}
        for span in hostile.spans:
            if span.number in wanted:
                yield dfdaemon_pb2.SyncPiecesResponse(
                    number=span.number, offset=span.offset, length=span.length, ip="127.0.0.1", tcp_port=tcp_port
                )

    async def download_piece(
        request: dfdaemon_pb2.DownloadPieceRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> dfdaemon_pb2.DownloadPieceResponse | bytes:
        number = request.piece_number
        log.info("DownloadPiece %d over gRPC", number)
        if hostile.lies_on_the_wire(number):
            if hostile.behaviour == "garbage":
                return b"\xff\xff\xff\xff\x0f garbage"
            if hostile.behaviour == "reset":
                log.info("hostile parent resets piece %d by dying", number)
                os._exit(3)
            await hostile.paused()
        piece = hostile.claimed_piece(number)
        true = hostile.true_piece(number)
        return dfdaemon_pb2.DownloadPieceResponse(
            piece=common_pb2.Piece(
                number=piece.number,
                offset=piece.offset,
                length=piece.length,
                digest=piece.digest,
                content=piece.content,
                parent_id=PEER_ID,
            ),
            # The metadata digest of the true piece: only the content-level checks can catch the lie.
            digest=ids.piece_metadata_digest(true.number, true.offset, true.length, true.digest),
        )

    def serialize(response: dfdaemon_pb2.DownloadPieceResponse | bytes) -> bytes:
        return response if isinstance(response, bytes) else response.SerializeToString()

    return grpc.method_handlers_generic_handler(
        UPLOAD_SERVICE,
        {
            "SyncPieces": grpc.unary_stream_rpc_method_handler(
                sync_pieces,
                request_deserializer=dfdaemon_pb2.SyncPiecesRequest.FromString,
                response_serializer=dfdaemon_pb2.SyncPiecesResponse.SerializeToString,
            ),
            "DownloadPiece": grpc.unary_unary_rpc_method_handler(
                download_piece,
                request_deserializer=dfdaemon_pb2.DownloadPieceRequest.FromString,
                response_serializer=serialize,
            ),
        },
    )


# Vortex


async def serve_vortex(hostile: Hostile, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request per connection, as the daemon's client makes them."""
    try:
        header = codec.decode_header(await reader.readexactly(codec.HEADER_SIZE))
        request = codec.DownloadPiece.decode(await reader.readexactly(header.length))
        number = request.number
        log.info("DownloadPiece %d over vortex", number)
        if number >= len(hostile.spans) or request.task_id != hostile.task_id:
            writer.write(codec.Error(codec.ErrorCode.NOT_FOUND, "no such piece").encode())
        elif hostile.lies_on_the_wire(number) and hostile.behaviour == "garbage":
            writer.write(struct.pack(">BBI", 0, 77, 1 << 30) + b"garbage")
        elif hostile.lies_on_the_wire(number):
            await _send_part_then_fail(hostile, writer, hostile.true_piece(number))
        else:
            piece = hostile.claimed_piece(number)
            metadata = codec.PieceMetadata(piece.number, piece.offset, piece.length, piece.digest, PEER_ID)
            writer.write(metadata.encode() + piece.content)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, codec.ProtocolError) as exc:
        log.info("vortex connection ended: %s", exc)
    finally:
        writer.close()


async def _send_part_then_fail(hostile: Hostile, writer: asyncio.StreamWriter, piece: Piece) -> None:
    """The piece's metadata and first bytes, then a reset (``reset``) or silence (``stall``)."""
    metadata = codec.PieceMetadata(piece.number, piece.offset, piece.length, piece.digest, PEER_ID)
    writer.write(metadata.encode() + piece.content[: hostile.pause_after])
    await writer.drain()
    if hostile.behaviour == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        log.info("hostile parent resets piece %d after %d bytes", piece.number, hostile.pause_after)
        writer.transport.abort()
        return
    await hostile.paused()


# Scheduler


async def join_scheduler(address: str, hostile: Hostile, url: str, port: int) -> None:
    """Announce this host and register a peer of the task that finished: the stub then offers it as a parent."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        host = common_pb2.Host(id=HOST_ID, type=0, hostname="hostile", ip="127.0.0.1", port=port)
        interval = scheduler_pb2.AnnounceHostRequest().interval
        interval.FromSeconds(3600)
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host, interval=interval), timeout=10)
        download = common_pb2.Download(
            url=url,
            piece_length=hostile.spans[0].length,
            actual_content_length=len(hostile.data),
            actual_piece_length=hostile.spans[0].length,
            actual_piece_count=len(hostile.spans),
        )
        reports: list[tuple[str, Message]] = [
            ("register_peer_request", scheduler_pb2.RegisterPeerRequest(download=download)),
            ("download_peer_started_request", scheduler_pb2.DownloadPeerStartedRequest()),
            ("download_peer_finished_request", scheduler_pb2.DownloadPeerFinishedRequest()),
        ]
        requests = []
        for field, report in reports:
            request = scheduler_pb2.AnnouncePeerRequest(host_id=HOST_ID, task_id=hostile.task_id, peer_id=PEER_ID)
            getattr(request, field).CopyFrom(report)
            requests.append(request)
        call = stub.AnnouncePeer(iter(requests), timeout=10)
        async for _ in call:
            pass


async def main(args: argparse.Namespace) -> None:
    hostile = Hostile(args)
    vortex_port: int | None = None
    if args.vortex:
        vortex = await asyncio.start_server(lambda r, w: serve_vortex(hostile, r, w), "127.0.0.1", 0)
        vortex_port = vortex.sockets[0].getsockname()[1]
        log.info("hostile parent vortex on %d", vortex_port)
    server = grpc.aio.server(handlers=[grpc_handler(hostile, vortex_port)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await join_scheduler(args.scheduler, hostile, args.url, port)
    log.info("hostile parent serving on %d (%s on piece %d)", port, args.behaviour, args.piece)
    await server.wait_for_termination()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hostile_parent", description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", required=True, help="HOST:PORT of the scheduler stub")
    parser.add_argument("--url", required=True, help="the task's URL, as the children download it")
    parser.add_argument("--task-id", required=True, help="the task id the children compute for it")
    parser.add_argument("--file", required=True, help="a local copy of the task's bytes")
    parser.add_argument("--piece-length", type=int, required=True)
    parser.add_argument("--behaviour", choices=BEHAVIOURS, required=True)
    parser.add_argument("--piece", type=int, default=0, help="the piece that gets the behaviour")
    parser.add_argument("--vortex", action="store_true", help="also serve vortex, and advertise it")
    parser.add_argument("--pause-after", type=int, default=1000, help="bytes of the piece sent before stall/reset")
    parser.add_argument("--progress-file", default="", help="created once --pause-after bytes are out (stall)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
