"""Hostile values and hypothesis strategies for fuzzing the RPCs of the daemon and the scheduler stub.

Everything here is plain data: the test module (``tests/test_fuzz_rpc.py``) turns plans into protobuf
messages against the processes it started, and decides which status each input deserves.

A few generators deliberately stay clear of inputs that trigger a bug already documented by a
strict-xfail case in the test module (their names say which); everything else is fair game.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, replace

from hypothesis import strategies as st

U32_MAX = 2**32 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
U64_MAX = 2**64 - 1
NANOS_MAX = 999_999_999

# The longest ttl the generators use (about 317 years). Longer ones (up to Duration's 10,000 years) store a
# hold whose expiry no Timestamp can carry: see the xfail "huge ttl" cases.
SAFE_TTL_SECONDS = 10**10
# Piece lengths the generators use start here: a request for 1-byte pieces makes one origin request per byte.
MIN_FUZZ_PIECE_LENGTH = 512
# Piece lengths from 2**63 on overflow SQLite: see the xfail "piece_length >= 2**63" cases.
MAX_SAFE_PIECE_LENGTH = I64_MAX

HEX = "0123456789abcdef"

# Stands for the id of the task the fixture keeps in the cache; the tests substitute it.
KNOWN_TASK = "<known-task>"

HOSTILE_TASK_IDS: tuple[str, ...] = (
    "../../etc/passwd",
    "..",
    ".",
    "/",
    "/etc/passwd",
    "",
    "a" * 10 * 1024,
    "0123456789ABCDEF" * 4,
    "0123456789abcdeF" * 4,
    "a" * 63,
    "a" * 65,
    "a" * 127,
    "a" * 129,
    "\x00" * 64,
    "a" * 63 + "\x00",
    "\x00" + "a" * 63,
    "a" * 32 + "\x00" + "a" * 31,
    "a" * 64 + "\n",
    " " + "a" * 63,
    "a" * 32 + "/" + "a" * 31,
    "../" + "a" * 61,
    "a" * 61 + "/..",
    "sha256:" + "a" * 64,
    "g" * 64,
    "%2e%2e%2f" * 7 + "a",
    "..\\..\\boot.ini",
    "\uff41" * 64,
    "a" * 64 + "\u0301",
)

# Holders the daemon refuses today: empty, longer than 512 characters, or with C0 control characters.
REFUSED_HOLDERS: tuple[str, ...] = (
    "",
    "h" * 513,
    "h" * 64 * 1024,
    "container:\x00",
    "line\nbreak",
    "carriage\rreturn",
    "\x1b[2J\x1b[Hscreen",
    "tab\tseparated",
    "\x01",
)

# Holders that pass today's check (1 to 512 characters, none below U+0020) yet are control or invisible
# formatting characters a holder should not carry: see the xfail "holder with control characters" cases.
UNREFUSED_CONTROL_HOLDERS: tuple[str, ...] = ("del\x7f", "nel\x85", "sep\u2028", "bidi\u202e")

# Ids a server may echo in an error message stay below this many UTF-8 bytes: grpc clients drop statuses whose
# metadata passes 8 KiB (sometimes) or 16 KiB (always); the xfail "long input echoed" cases cover longer ones.
ECHO_SAFE_BYTES = 4096

HOSTILE_TEXT: tuple[str, ...] = (
    "",
    "\x00",
    "x" * 2048,
    "../../etc/passwd",
    "\r\n\r\n",
    "%n%s%x",
    "\u202e",
    "\ud7ff\ue000\U0010ffff",
)

# URLs DownloadTask must refuse before any work (INVALID_ARGUMENT): bad schemes, no host, malformed.
REFUSED_URLS: tuple[str, ...] = (
    "",
    "ftp://files.invalid/pub/file.bin",
    "file:///etc/passwd",
    "file://localhost/etc/passwd",
    "gopher://gopher.invalid/1",
    "javascript:alert(1)",
    "data:text/plain;base64,aGVsbG8=",
    "unix:///run/socket",
    "s3://bucket/key",
    "http://",
    "https://",
    "http:///no/host",
    "http://:80/",
    "http://@/",
    "http://[::1",
    "http://[zz::1]/",
    "http://host.invalid:99999/",
    "http://host.invalid:-1/",
    "http://host.invalid:port/",
    "http://\x00/",
    "http://%ff/",
    "http://xn--a/",
    "not a url",
    "//no-scheme.invalid/x",
    "/just/a/path",
)

# URLs with ASCII control characters or a leading space: today they pass validation and fail in the HTTP
# client (see the xfail "URL with control characters" cases). "{origin}" stands for the origin's address.
CONTROL_CHARACTER_URLS: tuple[str, ...] = (
    "\x00http://{origin}/small.bin",
    "http://{origin}/small\x00.bin",
    "http://{origin}/small.bin\n",
    "http://{origin}/small.bin\t",
    "http://{origin}/small\x7f.bin",
    " http://{origin}/small.bin",
)

# What a fuzzed output_path points at (the test creates these in a fresh directory per example).
OUTPUT_KINDS: tuple[str, ...] = (
    "new",
    "relative",
    "empty",
    "missing-dir",
    "existing",
    "directory",
    "symlink-outside",
    "dangling-symlink-outside",
    "parent-is-file",
    "dotdot-inside",
    "nul-byte",
)

# Names of the origin files the fixture serves (and one it does not).
ORIGIN_TARGETS: tuple[str, ...] = ("small.bin", "empty.bin", "missing.bin")


def hex_text(length: int) -> st.SearchStrategy[str]:
    return st.text(HEX, min_size=length, max_size=length)


def task_ids() -> st.SearchStrategy[str]:
    """Task ids: hostile ones, valid but absent ones, near-misses, random text and the fixture's task."""
    near_misses = st.text(HEX + "ABCDEF", min_size=60, max_size=70)
    return st.one_of(
        st.sampled_from(HOSTILE_TASK_IDS),
        hex_text(64),
        hex_text(128),
        near_misses,
        st.text(max_size=80),
        st.just(KNOWN_TASK),
    )


def piece_numbers() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, 4, 5, 6, 7, I32_MAX, I32_MAX + 1, U32_MAX - 1, U32_MAX]),
        st.integers(0, U32_MAX),
    )


def durations(max_seconds: int = SAFE_TTL_SECONDS) -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos) pairs: negative, zero, mixed signs, tiny, ordinary and very long."""
    special = [
        (0, 0),
        (-1, 0),
        (0, -1),
        (0, 1),
        (1, -NANOS_MAX),
        (-1, NANOS_MAX),
        (I64_MIN, -NANOS_MAX),
        (60, 0),
        (max_seconds, NANOS_MAX),
    ]
    return st.one_of(
        st.sampled_from(special),
        st.tuples(st.integers(I64_MIN, max_seconds), st.integers(-NANOS_MAX, NANOS_MAX)),
    )


def echo_safe(text: str) -> bool:
    return len(text.encode()) <= ECHO_SAFE_BYTES


def holders() -> st.SearchStrategy[str]:
    """Holders: ones the daemon refuses, and printable text (no control or line-separator characters)."""
    printable = st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"))
    return st.one_of(
        st.sampled_from(REFUSED_HOLDERS),
        st.text(printable, min_size=1, max_size=40),
        st.text(printable, min_size=500, max_size=520),
    )


def holder_refused(holder: str) -> bool:
    """Whether today's daemon answers INVALID_ARGUMENT for this holder."""
    return not holder or len(holder) > 512 or any(ord(ch) < 32 for ch in holder)


def blob_digests() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "",
                "sha256:",
                "sha256:" + "A" * 64,
                "sha256:" + "a" * 63,
                "sha256:" + "a" * 65,
                "sha512:" + "a" * 64,
                "md5:" + "a" * 32,
                "sha256:../../etc/passwd",
                "sha256:" + "\x00" * 64,
                "sha256:" + KNOWN_TASK,
            ]
        ),
        hex_text(64).map(lambda value: "sha256:" + value),
        hex_text(128).map(lambda value: "sha512:" + value),
        st.text(max_size=80),
    )


@dataclass(frozen=True)
class TaskRefPlan:
    """One ``dfdaemon.ext.v1.TaskRef``: ``kind`` is "task_id", "blob_digest", "download" or "none"."""

    kind: str
    value: str = ""


def task_refs() -> st.SearchStrategy[TaskRefPlan]:
    download_urls = st.one_of(st.sampled_from(REFUSED_URLS[:6]), st.text(max_size=40), st.just(KNOWN_TASK))
    return st.one_of(
        st.builds(TaskRefPlan, st.just("task_id"), task_ids()),
        st.builds(TaskRefPlan, st.just("blob_digest"), blob_digests()),
        st.builds(TaskRefPlan, st.just("download"), download_urls),
        st.just(TaskRefPlan("none")),
    )


def header_values() -> st.SearchStrategy[str]:
    """Header values HTTP allows: visible ASCII with inner spaces, up to 64 KiB."""
    visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
    return st.one_of(
        st.lists(visible, max_size=4).map(" ".join).map(str.strip),
        st.sampled_from(["v" * 64 * 1024, "*/*", "bytes=0-0", "gzip, identity"]),
    )


def request_headers() -> st.SearchStrategy[dict[str, str]]:
    """Legal extra headers. Illegal names or values, and framing headers (Content-Length, a lower-case
    range), are bugs documented by xfail cases and are not generated here."""
    names = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20).map(
        lambda name: "X-Fuzz-" + name
    )
    return st.dictionaries(names, header_values(), max_size=3)


@dataclass(frozen=True)
class DownloadPlan:
    """The choices behind one fuzzed ``common.v2.Download``; the test builds the message from it."""

    target: str  # an ORIGIN_TARGETS name on the origin, or "" to use ``url`` as it is
    url: str = ""
    query: str | None = None
    tag: str | None = None
    application: str | None = None
    piece_length: int | None = None
    digest: str | None = None  # "right-sha256", "right-crc32" and "wrong-sha256" are resolved by the test
    byte_range: tuple[int, int] | None = None
    output: str | None = None  # one of OUTPUT_KINDS
    overwrite: bool = False
    timeout: tuple[int, int] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    task_type: int = 0
    priority: int = 0
    need_piece_content: bool = False
    disable_back_to_source: bool = False
    need_back_to_source: bool = False
    force_hard_link: bool = False
    prefetch: bool = False
    filtered_query_params: tuple[str, ...] = ()
    content_for_task_id: str | None = None
    concurrent_piece_count: int | None = None
    remote_ip: str | None = None
    certificate_chain: tuple[bytes, ...] = ()
    blob_digest_ids: bool = False


SMALL_SIZE = 5000  # bytes of small.bin, which the fixture serves

DIGESTS: tuple[str, ...] = (
    "right-sha256",
    "right-crc32",
    "wrong-sha256",
    "crc32:0",
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    "sha256:",
    "sha256:" + "0" * 63,
    "sha512:" + "0" * 64,
    "crc32:-1",
    "crc32:4294967296",
    "CRC32:1",
    "",
)


def byte_ranges() -> st.SearchStrategy[tuple[int, int]]:
    edges = [0, 1, SMALL_SIZE - 1, SMALL_SIZE, SMALL_SIZE + 1, I64_MAX, U64_MAX]
    return st.one_of(
        st.tuples(st.sampled_from(edges), st.sampled_from(edges)),
        st.tuples(st.integers(0, SMALL_SIZE + 10), st.integers(0, SMALL_SIZE + 10)),
        st.tuples(st.integers(0, U64_MAX), st.integers(0, U64_MAX)),
    )


def enum_values() -> st.SearchStrategy[int]:
    """Known and unknown values of an open enum (any int32 can be put on the wire)."""
    return st.one_of(st.sampled_from([0, 1, 2, 3, 6, 7, 99, I32_MAX, -1, I32_MIN]), st.integers(I32_MIN, I32_MAX))


def piece_lengths() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1024, 4096, SMALL_SIZE, SMALL_SIZE + 1, 4 * 1024 * 1024, MAX_SAFE_PIECE_LENGTH]),
        st.integers(MIN_FUZZ_PIECE_LENGTH, MAX_SAFE_PIECE_LENGTH),
    )


@st.composite
def download_plans(draw: st.DrawFn, with_output: bool = True) -> DownloadPlan:
    """A Download aimed at the fixture's origin (or at a URL refused up front), with hostile options."""
    target = draw(st.sampled_from([*ORIGIN_TARGETS, "small.bin", "small.bin", ""]))
    url = draw(st.one_of(st.sampled_from(REFUSED_URLS), st.text(max_size=60))) if target == "" else ""
    optional_text = st.none() | st.text(max_size=20)
    return DownloadPlan(
        target=target,
        url=url,
        query=draw(st.none() | st.text(string.ascii_letters + string.digits + "=&%+", max_size=20)),
        tag=draw(optional_text),
        application=draw(optional_text),
        piece_length=draw(st.none() | piece_lengths()),
        digest=draw(st.none() | st.sampled_from(DIGESTS) | st.text(max_size=30)),
        byte_range=draw(st.none() | byte_ranges()),
        output=draw(st.none() | st.sampled_from(OUTPUT_KINDS)) if with_output else None,
        overwrite=draw(st.booleans()),
        timeout=draw(st.none() | durations(I64_MAX)),
        headers=draw(request_headers()),
        task_type=draw(enum_values()),
        priority=draw(enum_values()),
        need_piece_content=draw(st.booleans()),
        disable_back_to_source=draw(st.booleans()),
        need_back_to_source=draw(st.booleans()),
        force_hard_link=draw(st.booleans()),
        prefetch=draw(st.booleans()),
        filtered_query_params=tuple(draw(st.lists(st.text(max_size=8), max_size=3))),
        content_for_task_id=draw(st.none() | st.text(max_size=20)),
        concurrent_piece_count=draw(st.none() | st.sampled_from([0, 1, 2, U32_MAX]) | st.integers(0, U32_MAX)),
        remote_ip=draw(st.none() | st.sampled_from(HOSTILE_TEXT) | st.ip_addresses().map(str)),
        certificate_chain=tuple(draw(st.lists(st.binary(max_size=64), max_size=2))),
        blob_digest_ids=draw(st.booleans()),
    )


# The oneof members of scheduler.v2.AnnouncePeerRequest, plus "none" (no member set) and "unknown" (a field
# number the message does not define).
ANNOUNCE_KINDS: tuple[str, ...] = (
    "register_peer_request",
    "download_peer_started_request",
    "download_peer_back_to_source_started_request",
    "reschedule_peer_request",
    "download_peer_finished_request",
    "download_peer_back_to_source_finished_request",
    "download_peer_failed_request",
    "download_peer_back_to_source_failed_request",
    "download_piece_finished_request",
    "download_piece_back_to_source_finished_request",
    "download_piece_failed_request",
    "download_piece_back_to_source_failed_request",
    "none",
    "unknown",
)
TERMINAL_KINDS = frozenset(
    {
        "download_peer_finished_request",
        "download_peer_back_to_source_finished_request",
        "download_peer_failed_request",
        "download_peer_back_to_source_failed_request",
    }
)


@dataclass(frozen=True)
class AnnounceStep:
    """One AnnouncePeerRequest of a fuzzed stream.

    ``peer`` is "registered" (the peer id the stream registered), "" or any other id; ``host`` is "announced"
    (a host the test announced) or a literal host id. ``number`` and ``text`` fill the member's fields.
    """

    kind: str
    peer: str
    host: str
    task: str
    number: int
    text: str
    flag: bool
    garbage: bytes


def announce_steps() -> st.SearchStrategy[AnnounceStep]:
    ids = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=12))
    return st.builds(
        AnnounceStep,
        kind=st.sampled_from(ANNOUNCE_KINDS),
        peer=st.one_of(st.just("registered"), st.just("registered"), ids),
        host=st.one_of(st.just("announced"), st.just("announced"), ids),
        task=st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(HOSTILE_TEXT)),
        number=st.integers(0, U32_MAX),
        text=st.text(max_size=20),
        flag=st.booleans(),
        garbage=st.binary(max_size=24),
    )


def announce_streams() -> st.SearchStrategy[list[AnnounceStep]]:
    """Streams that mostly start with a registration, and sometimes do not."""
    registration = announce_steps().map(lambda step: replace(step, kind="register_peer_request"))
    register_first = st.builds(lambda first, rest: [first, *rest], registration, st.lists(announce_steps(), max_size=6))
    return st.one_of(register_first, register_first, st.lists(announce_steps(), max_size=5))


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` after 1 to 4 byte-level edits: bit flips, byte sets, insertions, deletions, truncation."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "flip", "set", "insert", "delete", "truncate", "append"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22]))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete" and data:
            del data[position : position + draw(st.integers(1, 8))]
        elif operation == "truncate":
            del data[position:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def mutated(originals: list[bytes]) -> st.SearchStrategy[bytes]:
    """Mutations of valid serialized requests, and now and then bytes from scratch."""
    return st.one_of(
        st.sampled_from(originals).flatmap(mutations),
        st.sampled_from(originals).flatmap(mutations),
        st.binary(max_size=96),
    )
