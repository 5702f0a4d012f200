"""A Dragonfly v2 client built only from upstream's published bindings (PyPI ``dragonfly-api``).

It plays the part of an upstream tool (dfget, a container runtime, a Rust child peer) talking to
our daemon, so the interop tests exercise the wire format exactly as upstream encodes and decodes
it. It must never import anything from ``dfdaemon``: both packages register ``common.v2.*`` in
protobuf's default descriptor pool, so they cannot share a process.

Every subcommand prints one JSON document on stdout. A gRPC error prints
``{"error": {"code": NAME, "details": TEXT}}`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc

MAX_MESSAGE_BYTES = 80 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
RPC_ERROR_EXIT = 3
CLIENT_HOST_ID = "127.0.0.1-upstream-client"

Json = dict[str, Any]


def unix_channel(socket_path: str) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)


def tcp_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def traffic_type_name(piece: common_pb2.Piece) -> str | None:
    """The piece's traffic type by name, or None when the field is absent on the wire (it is optional)."""
    if not piece.HasField("traffic_type"):
        return None
    return common_pb2.TrafficType.Name(piece.traffic_type)


def finished_piece_json(piece: common_pb2.Piece) -> Json:
    has_content = piece.HasField("content")
    return {
        "number": piece.number,
        "offset": piece.offset,
        "length": piece.length,
        "digest": piece.digest,
        "traffic_type": traffic_type_name(piece),
        "parent_id": piece.parent_id if piece.HasField("parent_id") else None,
        "has_content": has_content,
        "content_length": len(piece.content) if has_content else None,
        "content_crc32": zlib.crc32(piece.content) if has_content else None,
        "has_cost": piece.HasField("cost"),
        "has_created_at": piece.HasField("created_at"),
    }


def started_json(started: dfdaemon_pb2.DownloadTaskStartedResponse) -> Json:
    return {
        "content_length": started.content_length,
        "range": (
            {"start": started.range.start, "length": started.range.length} if started.HasField("range") else None
        ),
        "response_header": dict(started.response_header),
        "piece_count": len(started.pieces),
        "pieces": [{"number": p.number, "offset": p.offset, "length": p.length} for p in started.pieces],
        "is_finished": started.is_finished,
    }


def stat_json(stat: dfdaemon_pb2.StatLocalTaskResponse) -> Json:
    return {
        "task_id": stat.task_id,
        "piece_length": stat.piece_length if stat.HasField("piece_length") else None,
        "content_length": stat.content_length if stat.HasField("content_length") else None,
        "uploading_count": stat.uploading_count,
        "uploaded_count": stat.uploaded_count,
        "has_created_at": stat.HasField("created_at"),
        "has_updated_at": stat.HasField("updated_at"),
        "has_failed_at": stat.HasField("failed_at"),
        "has_finished_at": stat.HasField("finished_at"),
    }


def command_download(args: argparse.Namespace) -> Json:
    download = common_pb2.Download(
        url=args.url,
        type=common_pb2.STANDARD,
        priority=common_pb2.LEVEL6,
        need_piece_content=args.need_piece_content,
        overwrite=args.overwrite,
    )
    if args.output:
        download.output_path = args.output
    stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(unix_channel(args.socket))  # type: ignore[no-untyped-call]
    request = dfdaemon_pb2.DownloadTaskRequest(download=download)
    started: Json | None = None
    started_count = 0
    kinds: list[str] = []
    pieces: list[Json] = []
    task_ids: list[str] = []
    host_ids: list[str] = []
    peer_ids: list[str] = []
    for response in stub.DownloadTask(request, timeout=args.timeout):
        kind = response.WhichOneof("response") or "none"
        kinds.append(kind)
        task_ids.append(response.task_id)
        host_ids.append(response.host_id)
        peer_ids.append(response.peer_id)
        if kind == "download_task_started_response":
            started_count += 1
            started = started_json(response.download_task_started_response)
        elif kind == "download_piece_finished_response":
            pieces.append(finished_piece_json(response.download_piece_finished_response.piece))
    return {
        "task_id": task_ids[0] if task_ids else None,
        "host_id": host_ids[0] if host_ids else None,
        "peer_id": peer_ids[0] if peer_ids else None,
        "started": started,
        "started_count": started_count,
        "kinds": kinds,
        "pieces": pieces,
        "task_ids": sorted(set(task_ids)),
        "host_ids": sorted(set(host_ids)),
        "peer_ids": sorted(set(peer_ids)),
    }


def command_stat(args: argparse.Namespace) -> Json:
    stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(unix_channel(args.socket))  # type: ignore[no-untyped-call]
    stat = stub.StatLocalTask(dfdaemon_pb2.StatLocalTaskRequest(task_id=args.task_id), timeout=args.timeout)
    return stat_json(stat)


def command_list(args: argparse.Namespace) -> Json:
    stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(unix_channel(args.socket))  # type: ignore[no-untyped-call]
    listed = stub.ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=args.timeout)
    return {"tasks": [stat_json(task) for task in listed.tasks]}


def command_sync(args: argparse.Namespace) -> Json:
    stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(tcp_channel(args.address))  # type: ignore[no-untyped-call]
    request = dfdaemon_pb2.SyncPiecesRequest(
        host_id=args.host_id, task_id=args.task_id, interested_piece_numbers=args.interested
    )
    responses = [
        {
            "number": response.number,
            "offset": response.offset,
            "length": response.length,
            "ip": response.ip,
            "tcp_port": response.tcp_port if response.HasField("tcp_port") else None,
            "has_quic_port": response.HasField("quic_port"),
        }
        for response in stub.SyncPieces(request, timeout=args.timeout)
    ]
    return {"pieces": responses}


def command_stat_task_upload(args: argparse.Namespace) -> Json:
    stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(tcp_channel(args.address))  # type: ignore[no-untyped-call]
    stat = stub.StatLocalTask(dfdaemon_pb2.StatLocalTaskRequest(task_id=args.task_id), timeout=args.timeout)
    return stat_json(stat)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--timeout", type=float, default=60.0, help="deadline of each RPC in seconds")
    top = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = top.add_subparsers(dest="command", required=True)

    download = commands.add_parser(
        "download", parents=[common], help="DfdaemonDownload.DownloadTask over the unix socket"
    )
    download.add_argument("--socket", required=True)
    download.add_argument("--url", required=True)
    download.add_argument("--output", default="")
    download.add_argument("--need-piece-content", action="store_true")
    download.add_argument("--overwrite", action="store_true")
    download.set_defaults(run=command_download)

    stat = commands.add_parser("stat", parents=[common], help="DfdaemonDownload.StatLocalTask over the unix socket")
    stat.add_argument("--socket", required=True)
    stat.add_argument("--task-id", required=True)
    stat.set_defaults(run=command_stat)

    listing = commands.add_parser("list", parents=[common], help="DfdaemonDownload.ListLocalTasks over the unix socket")
    listing.add_argument("--socket", required=True)
    listing.set_defaults(run=command_list)

    sync = commands.add_parser("sync", parents=[common], help="DfdaemonUpload.SyncPieces over TCP")
    sync.add_argument("--address", required=True)
    sync.add_argument("--task-id", required=True)
    sync.add_argument("--host-id", default=CLIENT_HOST_ID)
    sync.add_argument("--interested", type=int, nargs="*", default=[])
    sync.set_defaults(run=command_sync)

    upload_stat = commands.add_parser(
        "stat-task-upload", parents=[common], help="DfdaemonUpload.StatLocalTask over TCP"
    )
    upload_stat.add_argument("--address", required=True)
    upload_stat.add_argument("--task-id", required=True)
    upload_stat.set_defaults(run=command_stat_task_upload)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run: Callable[[argparse.Namespace], Json] = args.run
    try:
        document = run(args)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        print(json.dumps({"error": {"code": code.name if code is not None else "UNKNOWN", "details": details}}))
        return RPC_ERROR_EXIT
    print(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
