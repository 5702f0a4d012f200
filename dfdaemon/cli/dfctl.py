"""``dfctl``: inspect and steer a running dfdaemon over its unix socket.

Tasks it stores, holds on them (use references), garbage collection and cache usage. Scripts rely on the
grammar and on ``--json``, which prints exactly one JSON document with stable snake_case keys; without it the
output is aligned text for people. A failure is one line on stderr: exit 1 when the daemon refused or could not
be reached, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from dfdaemon.api import dfdaemon_ext_pb2, dfdaemon_ext_pb2_grpc, dfdaemon_pb2, dfdaemon_pb2_grpc
from dfdaemon.cli import preheat
from dfdaemon.cli.args import positive_duration, positive_size
from dfdaemon.cli.channel import daemon_channel
from dfdaemon.download.request import DownloadRequest
from dfdaemon.ids import InvalidTaskId, blob_digest_task_id, is_valid_task_id, normalize_url
from dfdaemon.rpc.download_message import download as download_message
from dfdaemon.units import format_size

# The daemon's default (dfdaemon.config.DEFAULT_SOCKET_PATH), repeated because importing the configuration
# models (pydantic) would double the start-up time of every dfctl call.
DEFAULT_SOCKET_PATH = "/var/run/dragonfly/dfdaemon.sock"
DEFAULT_TIMEOUT_SECONDS = 30.0
_REF_FORMS = "a task id (64 or 128 hex digits), sha256:<hex>, sha512:<hex> or url=URL"

Json = dict[str, Any]
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class Output:
    """What a command prints: ``data`` as JSON with --json, ``text`` otherwise."""

    data: Json
    text: str


class Failure(Exception):
    """A call that failed, already worded as the line dfctl prints after ``dfctl: ``."""


class UsageError(Exception):
    """Arguments that parse one by one but not together; reported like argparse's errors."""


class Daemon:
    """Stubs of the services on the daemon's socket; each call carries the deadline and fails as one line."""

    def __init__(self, channel: grpc.Channel, socket_path: str, timeout: float) -> None:
        self.download = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
        self.use = dfdaemon_ext_pb2_grpc.UseStub(channel)
        self.cache = dfdaemon_ext_pb2_grpc.CacheStub(channel)
        self._socket_path = socket_path
        self._timeout = timeout

    def call(
        self, what: str, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        """Call ``method``; ``what`` names the attempt in the error line, which never spans lines."""
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Failure(f"cannot reach dfdaemon at {self._socket_path}: is it running?") from None
            details = " ".join((exc.details() or "").split())
            raise Failure(f"{what}: {code.name}: {details}") from None


# --------------------------------------------------------------------------- argument types


def _socket_path(text: str) -> str:
    """Accept the ``unix:PATH`` form the daemon logs as well as a plain path."""
    return text.removeprefix("unix:")


def _limit(text: str) -> int:
    """A positive count that fits the request's uint32."""
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 2**32):
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected a positive whole number")
    return int(text)


def _holder(text: str) -> str:
    """An empty holder would name nobody; the daemon would refuse it less clearly."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"invalid holder {text!r}: must not be empty")
    return text


def _task_id(text: str) -> str:
    """Task ids become file names on the daemon; a malformed one is refused here with a clearer message."""
    lowered = text.lower()
    if not is_valid_task_id(lowered):
        raise argparse.ArgumentTypeError(f"invalid task id {text!r}: expected 64 or 128 hex digits")
    return lowered


def _is_blob_digest(text: str) -> bool:
    """The same rule the daemon applies to ``sha256:``/``sha512:`` digests, so a bad one fails here first."""
    try:
        blob_digest_task_id(text)
    except InvalidTaskId:
        return False
    return True


def _ref(text: str) -> dfdaemon_ext_pb2.TaskRef:
    """One REF as the TaskRef it names; the url= options are applied once every argument is parsed."""
    if text.startswith("url="):
        url = text.removeprefix("url=")
        try:
            normalize_url(url)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid REF {text!r}: {exc}") from None
        return dfdaemon_ext_pb2.TaskRef(download=download_message(DownloadRequest(url=url)))
    lowered = text.lower()
    if is_valid_task_id(lowered):
        return dfdaemon_ext_pb2.TaskRef(task_id=lowered)
    if _is_blob_digest(lowered):
        return dfdaemon_ext_pb2.TaskRef(blob_digest=lowered)
    raise argparse.ArgumentTypeError(f"invalid REF {text!r}: expected {_REF_FORMS}")


def _task_refs(args: argparse.Namespace) -> list[dfdaemon_ext_pb2.TaskRef]:
    """The REF arguments with --tag and friends applied to every url= ref; on other refs they mean nothing."""
    refs: list[dfdaemon_ext_pb2.TaskRef] = args.refs
    downloads = [ref.download for ref in refs if ref.HasField("download")]
    options = {
        "--tag": args.tag is not None,
        "--application": args.application is not None,
        "--piece-length": args.piece_length is not None,
        "--filtered-query-param": bool(args.filtered_query_params),
    }
    given = [name for name, present in options.items() if present]
    if given and not downloads:
        raise UsageError(f"{', '.join(given)}: only valid with url= refs")
    for download in downloads:
        request = DownloadRequest(
            url=download.url,
            tag=args.tag,
            application=args.application,
            piece_length=args.piece_length,
            filtered_query_params=tuple(args.filtered_query_params),
        )
        download.CopyFrom(download_message(request))
    return refs


def _ttl(seconds: float | None) -> Duration | None:
    """The optional lease as a Duration; None leaves the field unset (a permanent hold, or the previous ttl)."""
    if seconds is None:
        return None
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


# --------------------------------------------------------------------------- rendering


def _short(task_id: str) -> str:
    """Twelve characters identify a task in a message; the whole id would drown it."""
    return task_id if len(task_id) <= 12 else task_id[:12] + "…"


def _is_set(ts: Timestamp) -> bool:
    """An unset timestamp reads as the epoch; no daemon reports that instant."""
    return bool(ts.seconds or ts.nanos)


def _rfc3339(ts: Timestamp) -> str | None:
    return ts.ToJsonString() if _is_set(ts) else None


def _local_time(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S") if _is_set(ts) else "-"


def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, under a header row."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``name  value`` lines with the values aligned."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _task_state(task: dfdaemon_pb2.StatLocalTaskResponse) -> str:
    """The v2 API has no state field; the timestamps tell whether the download finished or failed."""
    if task.HasField("finished_at"):
        return "finished"
    if task.HasField("failed_at"):
        return "failed"
    return "unfinished"


def _content_length(task: dfdaemon_pb2.StatLocalTaskResponse) -> int | None:
    return task.content_length if task.HasField("content_length") else None


def _task_json(task: dfdaemon_pb2.StatLocalTaskResponse) -> Json:
    return {
        "task_id": task.task_id,
        "state": _task_state(task),
        "content_length": _content_length(task),
        "piece_length": task.piece_length if task.HasField("piece_length") else None,
        "uploading_count": task.uploading_count,
        "uploaded_count": task.uploaded_count,
        "response_header": dict(task.response_header),
        "created_at": _rfc3339(task.created_at),
        "updated_at": _rfc3339(task.updated_at),
        "prefetched_at": _rfc3339(task.prefetched_at),
        "failed_at": _rfc3339(task.failed_at),
        "finished_at": _rfc3339(task.finished_at),
    }


def _hold_json(hold: dfdaemon_ext_pb2.Hold) -> Json:
    return {
        "task_id": hold.task_id,
        "holder": hold.holder,
        "acquired_at": _rfc3339(hold.acquired_at),
        "expires_at": _rfc3339(hold.expires_at),
    }


def _holds_table(holds: Iterable[dfdaemon_ext_pb2.Hold], with_task: bool = True) -> str:
    """Holds one per row; ``never`` marks a permanent hold."""
    header = ["TASK ID", "HOLDER", "ACQUIRED", "EXPIRES"]
    rows = [
        [
            hold.task_id,
            hold.holder,
            _local_time(hold.acquired_at),
            _local_time(hold.expires_at) if hold.HasField("expires_at") else "never",
        ]
        for hold in holds
    ]
    return _table(header, rows) if with_task else _table(header[1:], [row[1:] for row in rows])


def _changes_table(changes: Sequence[tuple[str, Iterable[str]]]) -> str:
    """What a release or sync did to each task, one row per task."""
    return _table(["CHANGE", "TASK ID"], [[change, task_id] for change, task_ids in changes for task_id in task_ids])


def _protected_by(skip: dfdaemon_ext_pb2.GCSkip) -> str:
    reasons = list(skip.holders)
    if skip.downloads:
        reasons.append(f"{skip.downloads} download(s)")
    if skip.uploads:
        reasons.append(f"{skip.uploads} upload(s)")
    return ", ".join(reasons) or "-"


def _gc_run_json(run: dfdaemon_ext_pb2.GCRun) -> Json:
    return {
        "id": run.id,
        "trigger": run.trigger,
        "dry_run": run.dry_run,
        "started_at": _rfc3339(run.started_at),
        "finished_at": _rfc3339(run.finished_at),
        "bytes_before": run.bytes_before,
        "bytes_after": run.bytes_after,
        "quota_exceeded_by_data_in_use": run.quota_exceeded_by_data_in_use,
        "evicted": [{"task_id": e.task_id, "reason": e.reason, "bytes": e.bytes} for e in run.evicted],
        "skipped": [
            {
                "task_id": s.task_id,
                "reason": s.reason,
                "holders": list(s.holders),
                "downloads": s.downloads,
                "uploads": s.uploads,
                "bytes": s.bytes,
            }
            for s in run.skipped
        ],
    }


def _gc_run_text(run: dfdaemon_ext_pb2.GCRun) -> str:
    """One run: what started it, the bytes it freed, and every task it evicted or kept, with why."""
    evicted_bytes = sum(e.bytes for e in run.evicted)
    parts = [
        _fields(
            [
                ("gc run", str(run.id)),
                ("trigger", run.trigger),
                ("dry run", "yes" if run.dry_run else "no"),
                ("started", _local_time(run.started_at)),
                ("finished", _local_time(run.finished_at)),
                ("bytes before", format_size(run.bytes_before)),
                ("bytes after", format_size(run.bytes_after)),
                ("evicted", f"{len(run.evicted)} task(s), {format_size(evicted_bytes)} freed on disk"),
                ("skipped", f"{len(run.skipped)} task(s)"),
            ]
        )
    ]
    if run.quota_exceeded_by_data_in_use:
        parts.append("quota exceeded by data in use")
    if run.evicted:
        rows = [[e.task_id, e.reason, format_size(e.bytes)] for e in run.evicted]
        parts.append("evicted:\n" + _indent(_table(["TASK ID", "REASON", "SIZE"], rows)))
    if run.skipped:
        rows = [[s.task_id, s.reason, format_size(s.bytes), _protected_by(s)] for s in run.skipped]
        parts.append("skipped:\n" + _indent(_table(["TASK ID", "REASON", "SIZE", "PROTECTED BY"], rows)))
    return "\n".join(parts)


# --------------------------------------------------------------------------- commands


def _task_ls(args: argparse.Namespace, daemon: Daemon) -> Output:
    reply = daemon.call("task ls", daemon.download.ListLocalTasks, dfdaemon_pb2.ListLocalTasksRequest())
    rows = [
        [
            task.task_id,
            _task_state(task),
            _size(_content_length(task)),
            str(task.uploading_count),
            str(task.uploaded_count),
            _local_time(task.updated_at),
        ]
        for task in reply.tasks
    ]
    text = _table(["TASK ID", "STATE", "SIZE", "UPLOADING", "UPLOADED", "UPDATED"], rows)
    return Output({"tasks": [_task_json(task) for task in reply.tasks]}, text)


def _task_stat(args: argparse.Namespace, daemon: Daemon) -> Output:
    """The task as stored plus everything that keeps GC from collecting it."""
    what = f"task stat {_short(args.id)}"
    task = daemon.call(what, daemon.download.StatLocalTask, dfdaemon_pb2.StatLocalTaskRequest(task_id=args.id))
    refs = daemon.call(what, daemon.use.GetReferences, dfdaemon_ext_pb2.GetReferencesRequest(task_id=args.id))
    data: Json = {
        **_task_json(task),
        "references": {
            "holds": [_hold_json(hold) for hold in refs.holds],
            "downloads": refs.downloads,
            "uploads": refs.uploads,
            "refcount": refs.refcount,
        },
    }
    text = _fields(
        [
            ("task id", task.task_id),
            ("state", _task_state(task)),
            ("content length", _size(_content_length(task))),
            ("piece length", _size(task.piece_length if task.HasField("piece_length") else None)),
            ("uploading", str(task.uploading_count)),
            ("uploaded", str(task.uploaded_count)),
            ("created", _local_time(task.created_at)),
            ("updated", _local_time(task.updated_at)),
            ("finished", _local_time(task.finished_at)),
            ("failed", _local_time(task.failed_at)),
            ("refcount", str(refs.refcount)),
            ("holders", str(len(refs.holds))),
            ("downloads", str(refs.downloads)),
            ("uploads", str(refs.uploads)),
        ]
    )
    if refs.holds:
        text += "\n\n" + _holds_table(refs.holds, with_task=False)
    return Output(data, text)


def _task_rm(args: argparse.Namespace, daemon: Daemon) -> Output:
    """Without --force the daemon refuses a task in use; with it, the holds are dropped first."""
    what = f"task rm {_short(args.id)}"
    if not args.force:
        daemon.call(what, daemon.download.DeleteTask, dfdaemon_pb2.DeleteTaskRequest(task_id=args.id))
        data: Json = {"task_id": args.id, "force": False, "released_holders": [], "bytes": None}
        return Output(data, _fields([("removed", args.id)]))
    request = dfdaemon_ext_pb2.EvictTaskRequest(task_id=args.id, force=True)
    reply = daemon.call(what, daemon.cache.EvictTask, request)
    released = list(reply.released_holders)
    data = {"task_id": args.id, "force": True, "released_holders": released, "bytes": reply.bytes}
    text = _fields(
        [("removed", args.id), ("released holders", ", ".join(released) or "none"), ("freed", format_size(reply.bytes))]
    )
    return Output(data, text)


def _use_acquire(args: argparse.Namespace, daemon: Daemon) -> Output:
    request = dfdaemon_ext_pb2.AcquireRequest(holder=args.holder, tasks=_task_refs(args), ttl=_ttl(args.ttl))
    reply = daemon.call(f"use acquire {args.holder}", daemon.use.Acquire, request)
    data = {"holder": args.holder, "holds": [_hold_json(hold) for hold in reply.holds]}
    return Output(data, _holds_table(reply.holds))


def _use_release(args: argparse.Namespace, daemon: Daemon) -> Output:
    request = dfdaemon_ext_pb2.ReleaseRequest(holder=args.holder, tasks=_task_refs(args))
    reply = daemon.call(f"use release {args.holder}", daemon.use.Release, request)
    data = {"holder": args.holder, "released": list(reply.released)}
    return Output(data, _changes_table([("released", reply.released)]))


def _use_sync(args: argparse.Namespace, daemon: Daemon) -> Output:
    """The holder's complete set: no REF releases everything it holds."""
    request = dfdaemon_ext_pb2.SyncRequest(holder=args.holder, tasks=_task_refs(args), ttl=_ttl(args.ttl))
    reply = daemon.call(f"use sync {args.holder}", daemon.use.Sync, request)
    data = {
        "holder": args.holder,
        "acquired": list(reply.acquired),
        "released": list(reply.released),
        "kept": list(reply.kept),
        "missing": list(reply.missing),
    }
    text = _changes_table(
        [("acquired", reply.acquired), ("released", reply.released), ("kept", reply.kept), ("missing", reply.missing)]
    )
    return Output(data, text)


def _use_keepalive(args: argparse.Namespace, daemon: Daemon) -> Output:
    request = dfdaemon_ext_pb2.KeepAliveRequest(holder=args.holder, ttl=_ttl(args.ttl))
    reply = daemon.call(f"use keepalive {args.holder}", daemon.use.KeepAlive, request)
    data = {"holder": args.holder, "holds": [_hold_json(hold) for hold in reply.holds]}
    return Output(data, _holds_table(reply.holds))


def _use_ls(args: argparse.Namespace, daemon: Daemon) -> Output:
    request = dfdaemon_ext_pb2.ListHoldsRequest(holder=args.holder, task_id=args.task)
    reply = daemon.call("use ls", daemon.use.ListHolds, request)
    return Output({"holds": [_hold_json(hold) for hold in reply.holds]}, _holds_table(reply.holds))


def _gc_run(args: argparse.Namespace, daemon: Daemon) -> Output:
    run = daemon.call("gc run", daemon.cache.RunGC, dfdaemon_ext_pb2.RunGCRequest(dry_run=args.dry_run))
    return Output(_gc_run_json(run), _gc_run_text(run))


def _gc_report(args: argparse.Namespace, daemon: Daemon) -> Output:
    request = dfdaemon_ext_pb2.ListGCRunsRequest(limit=args.limit)
    reply = daemon.call("gc report", daemon.cache.ListGCRuns, request)
    text = "\n\n".join(_gc_run_text(run) for run in reply.runs) or "no gc runs recorded"
    return Output({"runs": [_gc_run_json(run) for run in reply.runs]}, text)


def _usage(args: argparse.Namespace, daemon: Daemon) -> Output:
    usage = daemon.call("usage", daemon.cache.GetUsage, dfdaemon_ext_pb2.GetUsageRequest())
    data = {
        "used_bytes": usage.used_bytes,
        "quota_bytes": usage.quota_bytes,
        "high_watermark_bytes": usage.high_watermark_bytes,
        "low_watermark_bytes": usage.low_watermark_bytes,
        "held_bytes": usage.held_bytes,
        "task_count": usage.task_count,
        "held_task_count": usage.held_task_count,
        "quota_exceeded_by_data_in_use": usage.quota_exceeded_by_data_in_use,
        "filesystem_total_bytes": usage.filesystem_total_bytes,
        "filesystem_free_bytes": usage.filesystem_free_bytes,
    }
    text = _fields(
        [
            ("used", format_size(usage.used_bytes)),
            ("quota", format_size(usage.quota_bytes)),
            ("high watermark", format_size(usage.high_watermark_bytes)),
            ("low watermark", format_size(usage.low_watermark_bytes)),
            ("held", f"{format_size(usage.held_bytes)} in {usage.held_task_count} task(s)"),
            ("tasks", str(usage.task_count)),
            ("filesystem total", format_size(usage.filesystem_total_bytes)),
            ("filesystem free", format_size(usage.filesystem_free_bytes)),
        ]
    )
    if usage.quota_exceeded_by_data_in_use:
        text += "\nquota exceeded by data in use"
    return Output(data, text)


Command = Callable[[argparse.Namespace, Daemon], Output]

COMMANDS: dict[str, Command] = {
    "task ls": _task_ls,
    "task stat": _task_stat,
    "task rm": _task_rm,
    "use acquire": _use_acquire,
    "use release": _use_release,
    "use sync": _use_sync,
    "use keepalive": _use_keepalive,
    "use ls": _use_ls,
    "gc run": _gc_run,
    "gc report": _gc_report,
    "usage": _usage,
}


# --------------------------------------------------------------------------- grammar


def _usage_line(prog: str, message: str) -> str:
    """Usage errors are one line, so a script's log shows what was wrong without the usage dump."""
    return f"{prog}: {message} (see '{prog} --help')\n"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, _usage_line(self.prog, message))


def _add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """-e, --json and --timeout; the command's own copy has no defaults so it never undoes the global one."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "-e",
        "--endpoint",
        type=_socket_path,
        default=default(DEFAULT_SOCKET_PATH),
        metavar="SOCKET",
        help=f"the daemon's unix socket (default {DEFAULT_SOCKET_PATH})",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON document")
    parser.add_argument(
        "--timeout",
        type=positive_duration,
        default=default(DEFAULT_TIMEOUT_SECONDS),
        metavar="SECONDS",
        help=f"deadline of each call: 30s, 5m or plain seconds (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )


def _add_ref_options(parser: argparse.ArgumentParser, nargs: str) -> None:
    parser.add_argument("refs", nargs=nargs, type=_ref, metavar="REF", help=_REF_FORMS)
    url = parser.add_argument_group("options of url= refs (they select the same task as dfget's)")
    url.add_argument("--tag", help="the download's tag")
    url.add_argument("--application", help="the download's application")
    url.add_argument("--piece-length", type=positive_size, metavar="SIZE", help="requested piece length, e.g. 4MiB")
    url.add_argument(
        "--filtered-query-param",
        dest="filtered_query_params",
        action="append",
        default=[],
        metavar="KEY",
        help="query parameter left out of the task id (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    """The whole grammar; every leaf records its key in COMMANDS as ``command``."""
    common = _Parser(add_help=False)
    _add_connection_options(common, defaults=False)
    parser = _Parser(prog="dfctl", description="Inspect and steer a running dfdaemon: tasks, holds, GC, usage.")
    _add_connection_options(parser, defaults=True)
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def leaf(parent: argparse._SubParsersAction[_Parser], command: str, summary: str) -> argparse.ArgumentParser:
        sub = parent.add_parser(command.split()[-1], help=summary, description=summary, parents=[common])
        sub.set_defaults(command=command)
        return sub

    def group(name: str, summary: str) -> argparse._SubParsersAction[_Parser]:
        return groups.add_parser(name, help=summary).add_subparsers(dest="action", metavar="ACTION", required=True)

    task = group("task", "tasks the daemon stores")
    leaf(task, "task ls", "list the tasks the daemon stores")
    leaf(task, "task stat", "show a task and what keeps it from being collected").add_argument(
        "id", type=_task_id, metavar="ID"
    )
    rm = leaf(task, "task rm", "remove a task; refused while it is in use unless --force")
    rm.add_argument("id", type=_task_id, metavar="ID")
    rm.add_argument("--force", action="store_true", help="drop the task's holds first (in-flight work still refuses)")

    use = group("use", "holds that keep tasks from being collected")
    acquire = leaf(use, "use acquire", "hold tasks for a holder")
    acquire.add_argument("--holder", required=True, type=_holder, help="who holds, e.g. container:default/abc")
    acquire.add_argument(
        "--ttl", type=positive_duration, metavar="DURATION", help="a lease renewed by keepalive (default: permanent)"
    )
    _add_ref_options(acquire, "+")
    release = leaf(use, "use release", "release a holder's holds on tasks")
    release.add_argument("--holder", required=True, type=_holder)
    _add_ref_options(release, "+")
    sync = leaf(use, "use sync", "make the given tasks the holder's complete set (none releases all)")
    sync.add_argument("--holder", required=True, type=_holder)
    sync.add_argument(
        "--ttl", type=positive_duration, metavar="DURATION", help="a lease renewed by keepalive (default: permanent)"
    )
    _add_ref_options(sync, "*")
    keepalive = leaf(use, "use keepalive", "renew a holder's leases")
    keepalive.add_argument("--holder", required=True, type=_holder)
    keepalive.add_argument(
        "--ttl", type=positive_duration, metavar="DURATION", help="new lease length (default: the previous one)"
    )
    ls = leaf(use, "use ls", "list holds")
    ls.add_argument("--holder", type=_holder, help="only this holder's holds")
    ls.add_argument("--task", type=_task_id, metavar="ID", help="only the holds on this task")

    gc = group("gc", "garbage collection")
    leaf(gc, "gc run", "collect now").add_argument("--dry-run", action="store_true", help="report without deleting")
    leaf(gc, "gc report", "show what recent runs evicted and kept, and why").add_argument(
        "--limit", type=_limit, default=1, metavar="N", help="the N newest runs (default 1)"
    )

    leaf(groups, "usage", "the cache's bytes against its quota")

    scheduled = group("preheat", "fill peers' caches ahead of use (asks a scheduler, not the daemon)")
    for kind, summary in preheat.SUMMARY.items():
        preheat.add_arguments(leaf(scheduled, f"preheat {kind}", summary), kind)
    return parser


def _preheat(args: argparse.Namespace) -> Output:
    try:
        data, text = preheat.run(args)
    except preheat.PreheatError as exc:
        raise Failure(str(exc)) from None
    return Output(data, text)


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0 on success, 1 when the call failed, 2 on a usage error."""
    args = _parser().parse_args(argv)
    try:
        if args.group == "preheat":
            output = _preheat(args)
        else:
            with daemon_channel(args.endpoint, "dfctl") as channel:
                output = COMMANDS[args.command](args, Daemon(channel, args.endpoint, args.timeout))
    except UsageError as exc:
        sys.stderr.write(_usage_line(f"dfctl {args.command}", str(exc)))
        return 2
    except Failure as exc:
        print(f"dfctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(output.data, indent=2) if args.json else output.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
