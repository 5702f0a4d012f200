"""``dfget URL -O PATH``: download a file through the local dfdaemon, as upstream's dfget does.

Everything that can be checked locally is checked before the daemon is contacted, so a typo costs
no download. The daemon is reached over its unix socket only: one health check, then one
``DownloadTask`` stream during which the daemon itself writes the file to ``-O`` (a hard link to its
cache file where it can, else a copy), or, with ``--transfer-from-dfdaemon``, sends the bytes for
dfget to write (always a copy, so evicting the task frees its bytes). dfget says which ``-O`` is.
Whatever goes wrong, the user gets one line (never a traceback) and no partial file is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from dfdaemon.api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, errordetails_pb2
from dfdaemon.cli.args import positive_duration, positive_size
from dfdaemon.cli.channel import daemon_channel
from dfdaemon.cluster.addresses import detect_ip
from dfdaemon.download.request import DownloadRequest
from dfdaemon.ids import filtered_query_params_or_default, parse_file_digest
from dfdaemon.rpc.download_message import download as download_message

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

DEFAULT_ENDPOINT = "/var/run/dragonfly/dfdaemon.sock"
DOWNLOAD_SERVICE = "dfdaemon.v2.DfdaemonDownload"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
HEALTH_TIMEOUT_SECONDS = 5.0
# The daemon enforces --timeout itself; the margin lets its own, more precise error arrive first.
DEADLINE_MARGIN_SECONDS = 10.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line that cannot work, reported before anything is contacted (exit 2)."""


class DfgetError(Exception):
    """A failure the user reads as one line (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage, so a usage error stays one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class Options:
    """The validated command line; paths are absolute."""

    url: str
    output: str
    endpoint: str
    digest: str | None
    tag: str | None
    application: str | None
    headers: dict[str, str]
    filtered_query_params: list[str]
    piece_length: int | None
    timeout: float | None
    disable_back_to_source: bool
    overwrite: bool
    priority: int
    content_for_calculating_task_id: str | None
    progress: bool
    json: bool
    force_hard_link: bool = False
    transfer_from_dfdaemon: bool = False


@dataclass
class Summary:
    """What the stream reported: enough for ``--json`` and to tell a started download from none."""

    started: bool = False
    task_id: str = ""
    peer_id: str = ""
    content_length: int = 0
    pieces: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(common_pb2.TrafficType.keys(), 0)))
    written_as: str = ""  # "hard_link" (shares the cache file's bytes) or "copy"

    def as_json(self, output: str, elapsed: float) -> dict[str, object]:
        """The document ``--json`` prints; its keys are stable for scripts."""
        return {
            "task_id": self.task_id,
            "peer_id": self.peer_id,
            "content_length": self.content_length,
            "output": output,
            "written_as": self.written_as,
            "pieces": dict(self.pieces),
            "elapsed_seconds": round(elapsed, 3),
        }


# --------------------------------------------------------------------------- command line


def _digest(text: str) -> str:
    """``--digest``: checked here so a typo fails before the download, sent in normalised form."""
    try:
        algorithm, value = parse_file_digest(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{algorithm}:{value}"


def _header(text: str) -> tuple[str, str]:
    """``-H 'Name: value'``, as curl and upstream's dfget take it."""
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"invalid header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def _priority(text: str) -> int:
    """``--priority``: upstream's levels, 0 to 6."""
    if not (text.isascii() and text.isdigit()) or int(text) > 6:
        raise argparse.ArgumentTypeError(f"invalid priority {text!r}: a level from 0 to 6")
    return int(text)


def _build_parser() -> _Parser:
    """Upstream dfget's flag names, so users' scripts and habits carry over."""
    parser = _Parser(prog="dfget", description="Download a file through the local dfdaemon (Dragonfly v2 P2P).")
    parser.add_argument("url", metavar="URL", help="what to download, e.g. https://example.com/file")
    parser.add_argument("-O", "--output", required=True, metavar="PATH", help="where the file goes")
    parser.add_argument(
        "-e", "--endpoint", default=DEFAULT_ENDPOINT, metavar="SOCKET", help="dfdaemon's unix socket (%(default)s)"
    )
    parser.add_argument(
        "--digest", type=_digest, metavar="ALG:VALUE", help="crc32:<decimal>, sha256:<hex> or sha512:<hex> of the file"
    )
    parser.add_argument("--tag", help="part of the task id: different tags download separately")
    parser.add_argument("--application", help="part of the task id: the caller's application")
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header for the origin",
    )
    parser.add_argument(
        "--filtered-query-param",
        dest="filtered_query_params",
        action="append",
        default=[],
        metavar="PARAM",
        help="query parameter left out of the task id (repeatable); by default upstream's list of signing keys",
    )
    parser.add_argument(
        "--piece-length", type=positive_size, metavar="SIZE", help="e.g. 4MiB; chosen by the daemon by default"
    )
    parser.add_argument(
        "--timeout", type=positive_duration, metavar="DURATION", help="give up after this long, e.g. 30s or 2h"
    )
    parser.add_argument("--disable-back-to-source", action="store_true", help="only peers, never the origin")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--priority",
        type=_priority,
        default=6,
        metavar="0-6",
        help="scheduling priority level, as upstream's (%(default)s, the default, is the least urgent)",
    )
    parser.add_argument(
        "--content-for-calculating-task-id",
        metavar="TEXT",
        help="the task id is the sha256 of TEXT instead of one computed from the URL, tag and application",
    )
    _add_output_options(parser)
    return parser


def _add_output_options(parser: _Parser) -> None:
    """How -O is written (a link to the cache or a copy) and what dfget prints."""
    link = parser.add_mutually_exclusive_group()
    link.add_argument(
        "--force-hard-link",
        action="store_true",
        help="-O must be a hard link to the cache file (fail if impossible); by default a link where possible",
    )
    link.add_argument(
        "--transfer-from-dfdaemon",
        action="store_true",
        help="the daemon sends the bytes and dfget writes -O: always a copy, never a link to the cache",
    )
    parser.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON document describing the download")


def _check_url(url: str) -> None:
    """The daemon would refuse it too, but only after a round trip and with a vaguer message."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UsageError(f"invalid URL {url!r}: {exc}") from None
    if not parts.scheme or not parts.hostname:
        raise UsageError(f"invalid URL {url!r}: it needs a scheme and a host, e.g. https://example.com/file")


def _check_output(output: str) -> None:
    """The daemon writes ``-O`` itself, so a path it cannot create must be caught here."""
    if os.path.isdir(output):
        raise UsageError(f"{output} is a directory")
    directory = os.path.dirname(output)
    if not os.path.isdir(directory):
        raise UsageError(f"directory {directory} does not exist")


def parse_args(argv: list[str] | None) -> Options:
    """Parse and validate the command line; raises :class:`UsageError`."""
    args = _build_parser().parse_args(argv)
    _check_url(args.url)
    output = os.path.abspath(args.output)
    _check_output(output)
    return Options(
        url=args.url,
        output=output,
        endpoint=os.path.abspath(args.endpoint),
        digest=args.digest,
        tag=args.tag,
        application=args.application,
        headers=dict(args.headers),
        filtered_query_params=list(filtered_query_params_or_default(args.filtered_query_params)),
        piece_length=args.piece_length,
        timeout=args.timeout,
        disable_back_to_source=args.disable_back_to_source,
        overwrite=args.overwrite,
        priority=args.priority,
        content_for_calculating_task_id=args.content_for_calculating_task_id,
        progress=not args.no_progress,
        json=args.json,
        force_hard_link=args.force_hard_link,
        transfer_from_dfdaemon=args.transfer_from_dfdaemon,
    )


# --------------------------------------------------------------------------- talking to the daemon


def _check_health(channel: grpc.Channel, endpoint: str) -> None:
    """Fail fast, naming the socket, when no daemon answers there, rather than with a raw UNAVAILABLE."""
    # Bound by hand: the typed stubs of grpc_health's HealthStub declare no methods.
    check = channel.unary_unary(
        HEALTH_CHECK_METHOD,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        response = check(health_pb2.HealthCheckRequest(service=DOWNLOAD_SERVICE), timeout=HEALTH_TIMEOUT_SECONDS)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise DfgetError(f"cannot reach dfdaemon at {endpoint}: is it running?") from None
        reason = f"{exc.code().name}: {exc.details()}"
        raise DfgetError(f"dfdaemon at {endpoint} failed its health check: {reason}") from None
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        raise DfgetError(f"dfdaemon at {endpoint} is not serving downloads ({status})")


def download_request(options: Options) -> dfdaemon_pb2.DownloadTaskRequest:
    """The request for the command line; flags not given stay unset, since presence changes the task id."""
    request = DownloadRequest(
        url=options.url,
        output_path=None if options.transfer_from_dfdaemon else options.output,
        need_piece_content=options.transfer_from_dfdaemon,
        force_hard_link=options.force_hard_link,
        request_header=options.headers,
        filtered_query_params=tuple(options.filtered_query_params),
        disable_back_to_source=options.disable_back_to_source,
        overwrite=options.overwrite,
        digest=options.digest,
        tag=options.tag,
        application=options.application,
        piece_length=options.piece_length,
        timeout=options.timeout,
        priority=options.priority,
        content_for_calculating_task_id=options.content_for_calculating_task_id,
        remote_ip=detect_ip(),
    )
    return dfdaemon_pb2.DownloadTaskRequest(download=download_message(request))


class _Bar:
    """Where progress goes; this base draws nothing, so dfget without a terminal never imports rich."""

    def size(self, total: int) -> None:
        """The number of bytes the download will bring, once the daemon says."""

    def advance(self, length: int) -> None:
        """``length`` more bytes arrived."""


class _RichBar(_Bar):
    def __init__(self, progress: Progress, bar: TaskID) -> None:
        self._progress, self._bar = progress, bar

    def size(self, total: int) -> None:
        self._progress.update(self._bar, total=total)

    def advance(self, length: int) -> None:
        self._progress.advance(self._bar, length)


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str) -> Iterator[_Bar]:
    """A byte progress bar on stderr when enabled; rich (a tenth of a second to import) only then."""
    if not enabled:
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:
        yield _RichBar(progress, progress.add_task(label, total=None))


def _consume(responses: Iterable[dfdaemon_pb2.DownloadTaskResponse], bar: _Bar, sink: int | None = None) -> Summary:
    """Follow the stream: the started response sizes the bar, each finished piece advances it (and, with a
    ``sink``, its bytes are written there at the piece's offset)."""
    summary = Summary()
    window: tuple[int, int] | None = None  # the requested bytes, [start, end), when the download is ranged
    for response in responses:
        if response.HasField("download_task_started_response"):
            started = response.download_task_started_response
            summary.started = True
            summary.task_id, summary.peer_id = response.task_id, response.peer_id
            summary.content_length = started.content_length
            if started.HasField("range"):
                window = (started.range.start, started.range.start + started.range.length)
            bar.size(started.range.length if window is not None else started.content_length)
        elif response.HasField("download_piece_finished_response"):
            piece = response.download_piece_finished_response.piece
            traffic = common_pb2.TrafficType.Name(piece.traffic_type) if piece.HasField("traffic_type") else "UNKNOWN"
            summary.pieces[traffic] += 1
            start, end = _wanted_part(piece, window)
            if sink is not None:
                _write_piece(sink, piece, start, end, 0 if window is None else window[0])
            bar.advance(end - start)
    return summary


def _wanted_part(piece: common_pb2.Piece, window: tuple[int, int] | None) -> tuple[int, int]:
    """The file offsets ``[start, end)`` of a piece's bytes that were asked for: all, or those in the range."""
    end = piece.offset + piece.length
    return (piece.offset, end) if window is None else (max(piece.offset, window[0]), min(end, window[1]))


def _write_piece(sink: int, piece: common_pb2.Piece, start: int, end: int, base: int) -> None:
    """Write the piece's bytes of file offsets ``[start, end)`` at ``start - base`` (a ranged output starts at 0)."""
    if len(piece.content) != piece.length:
        raise DfgetError(f"download failed: piece {piece.number} came with {len(piece.content)} of its bytes")
    view = memoryview(piece.content)[start - piece.offset : end - piece.offset]
    written = 0
    while written < len(view):
        written += os.pwrite(sink, view[written:], start - base + written)


def _parse_backend(raw: bytes) -> errordetails_pb2.Backend | None:
    """Upstream sends ``errordetails.v2.Backend`` as JSON bytes; protobuf bytes are accepted too."""
    from google.protobuf import json_format  # only failures need it: not imported at start-up

    try:
        return json_format.Parse(raw, errordetails_pb2.Backend(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError):
        pass
    try:
        return errordetails_pb2.Backend.FromString(raw)
    except DecodeError:
        return None


def _origin_failure(exc: grpc.RpcError) -> errordetails_pb2.Backend | None:
    """The origin's answer carried in the status-details trailer, when the failure was the origin's."""
    for item in exc.trailing_metadata() or ():
        if item.key == STATUS_DETAILS_KEY:
            backend = _parse_backend(item.value)
            if backend is not None and backend.HasField("status_code"):
                return backend
    return None


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """The one line a user reads: the origin's status when it failed, else the gRPC status."""
    details = exc.details() or "no details"
    backend = _origin_failure(exc)
    if backend is not None:
        return f"origin answered {backend.status_code}: {backend.message or details}"
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return f"the daemon does not serve DownloadTask: {details}"
    return f"download failed: {exc.code().name}: {details}"


def _stream(channel: grpc.Channel, options: Options) -> Summary:
    """One DownloadTask stream, cancelled on every way out so the daemon stops work nobody awaits."""
    deadline = None if options.timeout is None else options.timeout + DEADLINE_MARGIN_SECONDS
    stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
    call = stub.DownloadTask(download_request(options), timeout=deadline)
    show_bar = options.progress and sys.stderr.isatty()
    with contextlib.ExitStack() as cleanup:
        sink, temporary = _open_transfer(options.output, cleanup) if options.transfer_from_dfdaemon else (None, "")
        try:
            with _progress_bar(show_bar, os.path.basename(options.output)) as bar:
                summary = _consume(call, bar, sink)
        except grpc.RpcError as exc:
            raise DfgetError(describe_rpc_error(exc)) from None
        finally:
            call.cancel()
        if not summary.started:
            raise DfgetError("download failed: the daemon ended the stream without starting the download")
        if sink is not None:
            _place(sink, temporary, options)
    if not os.path.lexists(options.output):
        raise DfgetError(f"download failed: the daemon reported success but did not write {options.output}")
    summary.written_as = "hard_link" if os.stat(options.output).st_nlink > 1 else "copy"
    return summary


def _open_transfer(output: str, cleanup: contextlib.ExitStack) -> tuple[int, str]:
    """A temporary file beside ``output`` for the bytes the daemon sends; closed and removed on the way out."""
    temporary = os.path.join(os.path.dirname(output), f".dfget-{os.getpid()}-{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise DfgetError(f"cannot write beside {output}: {exc.strerror}") from None
    cleanup.callback(_remove_quietly, temporary)
    cleanup.callback(os.close, fd)
    return fd, temporary


def _place(sink: int, temporary: str, options: Options) -> None:
    """Make the transferred bytes durable, then put them at ``-O``: never clobbering without ``--overwrite``."""
    try:
        os.fsync(sink)
        if options.overwrite:
            os.replace(temporary, options.output)
        else:
            os.link(temporary, options.output)
    except FileExistsError:
        raise DfgetError(f"{options.output} exists (use --overwrite)") from None
    except OSError as exc:
        raise DfgetError(f"cannot write {options.output}: {exc.strerror}") from None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


_Stamp = tuple[int, int, int, int] | None


def _stamp(path: str) -> _Stamp:
    """Identity and version of the file at ``path`` (None when absent), to tell whether this run changed it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _remove_partial(path: str, before: _Stamp) -> None:
    """Delete ``-O`` if this run created or rewrote it; a file the run never touched stays."""
    if _stamp(path) not in (None, before):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _download(channel: grpc.Channel, options: Options) -> Summary:
    """Run the download; on any failure, Ctrl-C included, remove what it left at ``-O``."""
    before = _stamp(options.output)
    try:
        return _stream(channel, options)
    except BaseException:
        _remove_partial(options.output, before)
        raise


# --------------------------------------------------------------------------- entry point


def _run(argv: list[str] | None) -> int:
    """Local checks first, then the daemon: a doomed command never costs a download."""
    options = parse_args(argv)
    if os.path.lexists(options.output) and not options.overwrite:
        raise DfgetError(f"{options.output} exists (use --overwrite)")
    with daemon_channel(options.endpoint, "dfget") as channel:
        _check_health(channel, options.endpoint)
        started_at = time.monotonic()
        summary = _download(channel, options)
        elapsed = time.monotonic() - started_at
    if options.json:
        print(json.dumps(summary.as_json(options.output, elapsed)))
    elif summary.written_as == "hard_link":
        print(f"{options.output}: hard link to the cached task (its bytes stay on disk while this file exists)")
    else:
        print(f"{options.output}: copy")
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    """Report on exactly one line: scripts read the last line of stderr."""
    print(f"dfget: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dfget`` console script; returns the exit code."""
    try:
        return _run(argv)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except DfgetError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # the promise is one line, never a traceback
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
