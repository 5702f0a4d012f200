"""``dfctl preheat file|image URL``: ask a scheduler to fill peers' caches before anyone downloads.

The scheduler answers as soon as it has checked the request and found hosts for it; the downloads go on in the
cluster afterwards (``dfctl task ls`` on a peer shows them arrive). gRPC and the scheduler's messages are imported
only when the command runs, so the rest of dfctl starts without them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dfdaemon.cli.args import positive_duration, positive_size

DEFAULT_SCHEDULER = "127.0.0.1:8002"
SCOPES = ("single_seed_peer", "all_seed_peers", "all_peers")
SUMMARY = {
    "file": "preheat a file: the chosen peers download it into their caches",
    "image": "preheat an image: every layer of the manifest (for one platform) into the chosen peers' caches",
}


class PreheatError(Exception):
    """The scheduler refused or could not be reached; worded as dfctl's one error line."""


def _percentage(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}: must be 1 to 100")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be at least 1")
    return value


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"invalid header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """The options of ``preheat file`` or ``preheat image``: what to fetch, then where it goes."""
    what = "manifest URL: http(s)://REGISTRY/v2/NAME/manifests/TAG" if kind == "image" else "URL of the file"
    parser.add_argument("url", metavar="URL", help=what)
    parser.add_argument(
        "--scheduler", default=DEFAULT_SCHEDULER, metavar="HOST:PORT", help=f"default {DEFAULT_SCHEDULER}"
    )
    tls = parser.add_argument_group("mutual TLS with the scheduler (all three together)")
    tls.add_argument("--ca-cert", default="", help="PEM CA the scheduler's certificate must be signed by")
    tls.add_argument("--cert", default="", help="PEM certificate to present")
    tls.add_argument("--key", default="", help="PEM key of --cert")
    parser.add_argument("--scope", choices=SCOPES, default=SCOPES[0], help=f"which hosts (default {SCOPES[0]})")
    parser.add_argument(
        "--ip", dest="ips", action="append", default=[], metavar="IP", help="only hosts with this IP (repeatable)"
    )
    parser.add_argument("--count", type=_count, metavar="N", help="at most N hosts (when no --ip)")
    parser.add_argument(
        "--percentage", type=_percentage, metavar="PERCENT", help="this share of the hosts (when no --ip or --count)"
    )
    parser.add_argument("--tag", help="the download's tag (part of the task id)")
    parser.add_argument("--application", help="the download's application (part of the task id)")
    parser.add_argument("--piece-length", type=positive_size, metavar="SIZE", help="requested piece length")
    parser.add_argument(
        "--filtered-query-param", dest="filtered_query_params", action="append", default=[], metavar="KEY"
    )
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        type=_header,
        default=[],
        metavar="HEADER",
        help="'Name: value' header",
    )
    parser.add_argument("--download-timeout", type=positive_duration, metavar="DURATION", help="per host download")
    if kind == "image":
        parser.add_argument("--platform", help="os/arch[/variant] of the manifest to take (default: this machine's)")
        parser.add_argument("--username", default="", help="registry user")
        parser.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")


def _request(args: argparse.Namespace) -> Any:
    from google.protobuf.duration_pb2 import Duration

    from dfdaemon.api import scheduler_pb2

    fields: dict[str, Any] = {
        "url": args.url,
        "scope": args.scope,
        "ips": args.ips,
        "tag": args.tag,
        "application": args.application,
        "piece_length": args.piece_length,
        "filtered_query_params": args.filtered_query_params,
        "header": dict(args.headers),
        "count": args.count,
        "percentage": args.percentage,
    }
    if args.download_timeout is not None:
        fields["timeout"] = Duration(seconds=int(args.download_timeout))
    if args.command == "preheat file":
        return scheduler_pb2.PreheatFileRequest(**fields)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    return scheduler_pb2.PreheatImageRequest(
        **fields, platform=args.platform, username=args.username or None, password=password
    )


def _channel(args: argparse.Namespace) -> Any:
    """Plaintext, or mutual TLS when the certificate options are given (all of them)."""
    import grpc

    given = [args.ca_cert, args.cert, args.key]
    if not any(given):
        return grpc.insecure_channel(args.scheduler)
    if not all(given):
        raise PreheatError("--ca-cert, --cert and --key go together")
    try:
        ca, cert, key = (Path(path).read_bytes() for path in given)
    except OSError as exc:
        raise PreheatError(f"cannot read {exc.filename}: {exc.strerror}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(args.scheduler, credentials)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Send the preheat; returns dfctl's JSON document and its text line."""
    import grpc

    from dfdaemon.api import scheduler_pb2_grpc

    request = _request(args)
    with _channel(args) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        method = stub.PreheatFile if args.command == "preheat file" else stub.PreheatImage
        try:
            method(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise PreheatError(f"cannot reach the scheduler at {args.scheduler}: is it running?") from None
            details = " ".join((exc.details() or "").split())
            raise PreheatError(f"{args.command}: {code.name}: {details}") from None
    kind = args.command.split()[-1]
    data = {"kind": kind, "url": args.url, "scope": args.scope, "scheduler": args.scheduler, "accepted": True}
    return data, f"preheat of {kind} {args.url} accepted by {args.scheduler} (scope {args.scope})"
