"""Wire compatibility of our generated API modules with upstream's ``dragonfly-api`` package.

Both sets of modules register ``common.v2.*`` (and the other v2 packages) in protobuf's default
descriptor pool, so neither is imported here: ``wire_descriptors.py`` describes each set in its own
subprocess and this module compares the two JSON documents (see docs/PROTOCOL.md, "Which version
we mirror"). Every message, enum and RPC of upstream's 2.3.x ``common``, ``errordetails``,
``dfdaemon`` and ``scheduler`` files must exist on our side with identical descriptors; the only
accepted difference is our extra ``DfdaemonUpload.DownloadPiece`` and its two messages. Of ``manager``
only what a peer uses is mirrored (``ListSchedulers`` and the messages it carries): upstream's other
manager messages and RPCs may be missing from ours, but whatever we have must be identical.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeAlias

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "tests" / "wire_descriptors.py"
OUR_PREFIX = "dfdaemon.api"
UPSTREAM_PREFIX = "dragonfly_api"

# The JSON document printed by wire_descriptors.py: {"messages": ..., "enums": ..., "services": ...}.
Document: TypeAlias = dict[str, dict[str, Any]]

# Packages mirrored in part: upstream names missing from ours are accepted there.
PARTIAL_PACKAGES: tuple[str, ...] = ("manager.v2.",)

FIELD_ATTRIBUTES: tuple[str, ...] = ("number", "type", "label", "type_name", "optional", "oneof")
METHOD_ATTRIBUTES: tuple[str, ...] = ("path", "input_type", "output_type", "client_streaming", "server_streaming")


def _field(
    number: int,
    type_: str,
    *,
    label: str = "LABEL_OPTIONAL",
    type_name: str = "",
    optional: bool = False,
    oneof: str | None = None,
) -> dict[str, Any]:
    return {
        "number": number,
        "type": type_,
        "label": label,
        "type_name": type_name,
        "optional": optional,
        "oneof": oneof,
    }


# Upstream 2.3.x dropped the unary DfdaemonUpload.DownloadPiece (and its messages); API 2.2.9 has it
# and we serve it. Without an upstream counterpart, these are checked against PROTOCOL.md instead.
DROPPED_UPSTREAM_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "dfdaemon.v2.DfdaemonUpload": {
        "DownloadPiece": {
            "path": "/dfdaemon.v2.DfdaemonUpload/DownloadPiece",
            "input_type": "dfdaemon.v2.DownloadPieceRequest",
            "output_type": "dfdaemon.v2.DownloadPieceResponse",
            "client_streaming": False,
            "server_streaming": False,
        },
    },
}
DROPPED_UPSTREAM_MESSAGES: dict[str, dict[str, dict[str, Any]]] = {
    "dfdaemon.v2.DownloadPieceRequest": {
        "host_id": _field(1, "TYPE_STRING"),
        "task_id": _field(2, "TYPE_STRING"),
        "piece_number": _field(3, "TYPE_UINT32"),
    },
    "dfdaemon.v2.DownloadPieceResponse": {
        "piece": _field(1, "TYPE_MESSAGE", type_name="common.v2.Piece"),
        "digest": _field(2, "TYPE_STRING", optional=True),
    },
}

# Every message and enum PROTOCOL.md names: each must exist on both sides, so that dropping one
# from proto/ (which would only shrink the set of shared messages) fails the comparison.
REQUIRED_MESSAGES: tuple[str, ...] = (
    "common.v2.Download",
    "common.v2.Piece",
    "common.v2.Range",
    "common.v2.Host",
    "common.v2.Peer",
    "common.v2.Task",
    "dfdaemon.v2.DownloadTaskRequest",
    "dfdaemon.v2.DownloadTaskResponse",
    "dfdaemon.v2.DownloadTaskStartedResponse",
    "dfdaemon.v2.DownloadPieceFinishedResponse",
    "dfdaemon.v2.SyncPiecesRequest",
    "dfdaemon.v2.SyncPiecesResponse",
    "dfdaemon.v2.StatTaskRequest",
    "dfdaemon.v2.StatLocalTaskRequest",
    "dfdaemon.v2.StatLocalTaskResponse",
    "dfdaemon.v2.ListLocalTasksRequest",
    "dfdaemon.v2.ListLocalTasksResponse",
    "dfdaemon.v2.DeleteTaskRequest",
    "dfdaemon.v2.DeleteLocalTaskRequest",
    "scheduler.v2.AnnouncePeerRequest",
    "scheduler.v2.RegisterPeerRequest",
    "scheduler.v2.DownloadPeerStartedRequest",
    "scheduler.v2.DownloadPeerBackToSourceStartedRequest",
    "scheduler.v2.ReschedulePeerRequest",
    "scheduler.v2.DownloadPeerFinishedRequest",
    "scheduler.v2.DownloadPeerBackToSourceFinishedRequest",
    "scheduler.v2.DownloadPeerFailedRequest",
    "scheduler.v2.DownloadPeerBackToSourceFailedRequest",
    "scheduler.v2.DownloadPieceFinishedRequest",
    "scheduler.v2.DownloadPieceBackToSourceFinishedRequest",
    "scheduler.v2.DownloadPieceFailedRequest",
    "scheduler.v2.DownloadPieceBackToSourceFailedRequest",
    "scheduler.v2.AnnouncePeerResponse",
    "scheduler.v2.EmptyTaskResponse",
    "scheduler.v2.NormalTaskResponse",
    "scheduler.v2.NeedBackToSourceResponse",
    "scheduler.v2.AnnounceHostRequest",
    "scheduler.v2.StatTaskRequest",
    "scheduler.v2.DeleteTaskRequest",
    "scheduler.v2.DeleteHostRequest",
    "scheduler.v2.ListHostsRequest",
    "errordetails.v2.Backend",
    "common.v2.HuggingFace",
    "common.v2.ModelScope",
    "common.v2.OpenCSG",
    "scheduler.v2.MetadataOnlyResponse",
    "scheduler.v2.PreheatImageRequest",
    "scheduler.v2.PreheatFileRequest",
    "dfdaemon.v2.ListTaskEntriesRequest",
    "dfdaemon.v2.ListTaskEntriesResponse",
    # Manager discovery (issue 15).
    "manager.v2.ListSchedulersRequest",
    "manager.v2.ListSchedulersResponse",
    "manager.v2.Scheduler",
    "manager.v2.SchedulerCluster",
    "manager.v2.SeedPeer",
)
REQUIRED_ENUMS: tuple[str, ...] = (
    "common.v2.TaskType",
    "common.v2.TrafficType",
    "common.v2.Priority",
    "common.v2.SizeScope",
    "common.v2.SchedulingPolicy",
    "manager.v2.SourceType",
)
# Every RPC PROTOCOL.md names, as (service, method).
REQUIRED_METHODS: tuple[tuple[str, str], ...] = (
    ("dfdaemon.v2.DfdaemonUpload", "DownloadTask"),
    ("dfdaemon.v2.DfdaemonUpload", "SyncPieces"),
    ("dfdaemon.v2.DfdaemonUpload", "DownloadPiece"),
    ("dfdaemon.v2.DfdaemonUpload", "StatTask"),
    ("dfdaemon.v2.DfdaemonUpload", "StatLocalTask"),
    ("dfdaemon.v2.DfdaemonUpload", "DeleteTask"),
    ("dfdaemon.v2.DfdaemonDownload", "DownloadTask"),
    ("dfdaemon.v2.DfdaemonDownload", "StatTask"),
    ("dfdaemon.v2.DfdaemonDownload", "StatLocalTask"),
    ("dfdaemon.v2.DfdaemonDownload", "ListLocalTasks"),
    ("dfdaemon.v2.DfdaemonDownload", "DeleteTask"),
    ("dfdaemon.v2.DfdaemonDownload", "DeleteLocalTask"),
    ("dfdaemon.v2.DfdaemonDownload", "DeleteHost"),
    ("scheduler.v2.Scheduler", "AnnouncePeer"),
    ("scheduler.v2.Scheduler", "AnnounceHost"),
    ("scheduler.v2.Scheduler", "StatTask"),
    ("scheduler.v2.Scheduler", "DeleteTask"),
    ("scheduler.v2.Scheduler", "DeleteHost"),
    ("scheduler.v2.Scheduler", "ListHosts"),
    # API 2.3.x additions a peer sees (issue 17): task entries and the preheat RPCs.
    ("dfdaemon.v2.DfdaemonUpload", "ListTaskEntries"),
    ("dfdaemon.v2.DfdaemonDownload", "ListTaskEntries"),
    ("scheduler.v2.Scheduler", "PreheatImage"),
    ("scheduler.v2.Scheduler", "StatImage"),
    ("scheduler.v2.Scheduler", "PreheatFile"),
    ("scheduler.v2.Scheduler", "StatFile"),
    ("manager.v2.Manager", "ListSchedulers"),
)


def _partial(name: str) -> bool:
    return name.startswith(PARTIAL_PACKAGES)


def _side(reference: str) -> str:
    return "theirs" if reference == "upstream" else reference


def _compare_fields(
    message: str, ours: dict[str, Any], theirs: dict[str, Any], reference: str = "upstream"
) -> list[str]:
    """Differences of one message's fields; ``reference`` names where ``theirs`` comes from."""
    problems: list[str] = []
    for name, field in sorted(ours.items()):
        if name not in theirs:
            problems.append(f"{message}.{name}: field {field['number']} is ours only, {reference} has no such field")
            continue
        for attribute in FIELD_ATTRIBUTES:
            if field[attribute] != theirs[name][attribute]:
                problems.append(
                    f"{message}.{name}: {attribute} ours={field[attribute]!r} {_side(reference)}"
                    f"={theirs[name][attribute]!r}"
                )
    for name, field in sorted(theirs.items()):
        if name not in ours:
            problems.append(f"{message}.{name}: {reference} field {field['number']} missing from ours")
    return problems


def _compare_messages(ours: Document, theirs: Document) -> list[str]:
    problems: list[str] = []
    for message, fields in sorted(ours["messages"].items()):
        if message in theirs["messages"]:
            problems += _compare_fields(message, fields, theirs["messages"][message])
        elif message in DROPPED_UPSTREAM_MESSAGES:
            problems += _compare_fields(message, fields, DROPPED_UPSTREAM_MESSAGES[message], "PROTOCOL.md")
        else:
            problems.append(f"{message}: message is ours only, upstream has no such message")
    for message in sorted(DROPPED_UPSTREAM_MESSAGES):
        if message not in ours["messages"]:
            problems.append(f"{message}: message missing from ours (PROTOCOL.md requires it)")
    for message in sorted(set(theirs["messages"]) - set(ours["messages"])):
        if _partial(message):
            continue
        problems.append(f"{message}: upstream message missing from ours")
    return problems


def _compare_enums(ours: Document, theirs: Document) -> list[str]:
    problems: list[str] = []
    for enum, values in sorted(ours["enums"].items()):
        if enum not in theirs["enums"]:
            problems.append(f"{enum}: enum is ours only, upstream has no such enum")
            continue
        upstream = theirs["enums"][enum]
        for name, number in sorted(values.items()):
            if name not in upstream:
                problems.append(f"{enum}.{name}: value {number} is ours only")
            elif number != upstream[name]:
                problems.append(f"{enum}.{name}: number ours={number!r} theirs={upstream[name]!r}")
        problems += [f"{enum}.{name}: upstream value missing from ours" for name in sorted(set(upstream) - set(values))]
    problems += [
        f"{enum}: upstream enum missing from ours" for enum in sorted(set(theirs["enums"]) - set(ours["enums"]))
    ]
    return problems


def _compare_services(ours: Document, theirs: Document) -> list[str]:
    problems: list[str] = []
    for service, methods in sorted(ours["services"].items()):
        upstream = theirs["services"].get(service)
        if upstream is None:
            problems.append(f"{service}: service is ours only, upstream has no such service")
            continue
        dropped = DROPPED_UPSTREAM_METHODS.get(service, {})
        for name, method in sorted(methods.items()):
            expected, reference = (upstream[name], "theirs") if name in upstream else (dropped.get(name), "PROTOCOL.md")
            if expected is None:
                problems.append(f"{service}/{name}: method is ours only, upstream has no such method")
                continue
            for attribute in METHOD_ATTRIBUTES:
                if method[attribute] != expected[attribute]:
                    problems.append(
                        f"{service}/{name}: {attribute} ours={method[attribute]!r} {reference}={expected[attribute]!r}"
                    )
    for service, methods in sorted(theirs["services"].items()):
        if _partial(service) and service in ours["services"]:
            continue
        missing = sorted(set(methods) - set(ours["services"].get(service, {})))
        problems += [f"{service}/{name}: upstream method missing from ours" for name in missing]
    return problems


def _check_coverage(ours: Document, theirs: Document) -> list[str]:
    problems: list[str] = []
    for kind, required in (("messages", REQUIRED_MESSAGES), ("enums", REQUIRED_ENUMS)):
        for name in required:
            for side, document in (("ours", ours), ("upstream", theirs)):
                if name not in document[kind]:
                    problems.append(f"{name}: required by PROTOCOL.md but missing from {side} {kind}")
    for service, method in REQUIRED_METHODS:
        if method not in ours["services"].get(service, {}):
            problems.append(f"{service}/{method}: required by PROTOCOL.md but missing from ours")
        dropped = method in DROPPED_UPSTREAM_METHODS.get(service, {})
        if not dropped and method not in theirs["services"].get(service, {}):
            problems.append(f"{service}/{method}: required by PROTOCOL.md but missing upstream")
    return problems


def compare(ours: Document, theirs: Document) -> list[str]:
    """Every wire-level difference between our descriptors and upstream's, one readable line each."""
    return [
        *_check_coverage(ours, theirs),
        *_compare_messages(ours, theirs),
        *_compare_enums(ours, theirs),
        *_compare_services(ours, theirs),
    ]


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra_path is not None:
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), *([existing] if existing else [])])
    return env


def _start_describe(prefix: str, extra_path: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), prefix],
        cwd=REPO_ROOT,
        env=_env(extra_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_describe(process: subprocess.Popen[str]) -> Document:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, f"{process.args!r} failed:\n{stderr}"
    document: Document = json.loads(stdout)
    return document


@pytest.fixture(scope="module")
def documents() -> tuple[Document, Document]:
    """(ours, upstream), each described in its own interpreter, both started at once."""
    ours = _start_describe(OUR_PREFIX)
    theirs = _start_describe(UPSTREAM_PREFIX)
    return _finish_describe(ours), _finish_describe(theirs)


def test_wire_compatible_with_upstream(documents: tuple[Document, Document]) -> None:
    ours, theirs = documents
    problems = compare(ours, theirs)
    assert not problems, "wire differences from dragonfly-api:\n" + "\n".join(f"  - {p}" for p in problems)


# Generates the modules from a given proto directory with the project's own generator, so that the
# mutated package gets the same relative sibling imports as dfdaemon/api.
_GENERATE = """
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
import gen_proto

gen_proto.PROTO_DIR = Path(sys.argv[1])
gen_proto.generate(Path(sys.argv[2]))
"""

_PIECE_LENGTH = re.compile(r"(message Piece \{[^}]*?\buint64 length = )4;")


def test_compare_detects_renumbered_field(documents: tuple[Document, Document], tmp_path: Path) -> None:
    _, theirs = documents
    proto_dir = tmp_path / "proto"
    shutil.copytree(REPO_ROOT / "proto", proto_dir)
    common = proto_dir / "common.proto"
    text, count = _PIECE_LENGTH.subn(r"\g<1>14;", common.read_text())
    assert count == 1, "common.v2.Piece.length = 4 not found in proto/common.proto"
    common.write_text(text)

    package = "mutated_api"
    generated = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(proto_dir), str(tmp_path / package)],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, f"generating the mutated modules failed:\n{generated.stderr}"

    mutated = _finish_describe(_start_describe(package, extra_path=tmp_path))
    assert mutated["messages"]["common.v2.Piece"]["length"]["number"] == 14
    problems = compare(mutated, theirs)
    assert "common.v2.Piece.length: number ours=14 theirs=4" in problems, "\n".join(problems)
    assert all(p.startswith("common.v2.Piece.length:") for p in problems), "\n".join(problems)


def test_compare_detects_missing_upstream_field_message_and_method(documents: tuple[Document, Document]) -> None:
    ours, theirs = copy.deepcopy(documents[0]), documents[1]
    del ours["messages"]["common.v2.Download"]["scheduling_policy"]
    del ours["messages"]["scheduler.v2.PreheatFileRequest"]
    del ours["services"]["dfdaemon.v2.DfdaemonDownload"]["ListTaskEntries"]
    del ours["enums"]["common.v2.SchedulingPolicy"]["ALWAYS"]
    problems = compare(ours, theirs)
    for expected in (
        "common.v2.Download.scheduling_policy: upstream field 35 missing from ours",
        "scheduler.v2.PreheatFileRequest: upstream message missing from ours",
        "dfdaemon.v2.DfdaemonDownload/ListTaskEntries: upstream method missing from ours",
        "common.v2.SchedulingPolicy.ALWAYS: upstream value missing from ours",
    ):
        assert expected in problems, "\n".join(problems)


def test_partly_mirrored_manager_is_still_held_to_upstream(documents: tuple[Document, Document]) -> None:
    """Upstream manager RPCs we do not use may be missing; a field of a mirrored manager message may not."""
    ours, theirs = copy.deepcopy(documents[0]), documents[1]
    assert "manager.v2.KeepAliveRequest" in theirs["messages"]
    assert "manager.v2.KeepAliveRequest" not in ours["messages"]
    del ours["messages"]["manager.v2.Scheduler"]["features"]
    ours["messages"]["manager.v2.ListSchedulersRequest"]["ip"]["number"] = 9
    problems = compare(ours, theirs)
    assert sorted(problems) == [
        "manager.v2.ListSchedulersRequest.ip: number ours=9 theirs=3",
        "manager.v2.Scheduler.features: upstream field 11 missing from ours",
    ], "\n".join(problems)
