"""Hostile values and hypothesis strategies for fuzzing the RPCs of the daemon and the scheduler stub.

Everything here is plain data: the test module (``tests/test_fuzz_rpc.py``) turns plans into protobuf
messages against the processes it started, and decides which status each input deserves; the daemon's limits
(durations, piece lengths, holders, headers) are spelled out here for that. A few generators stay clear of
inputs that trigger a bug still documented by a strict-xfail case in the test module (their docstrings say
which); everything else is fair game.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, replace
from typing import TypeVar

from hypothesis import strategies as st

T = TypeVar("T")

U32_MAX = 2**32 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
U64_MAX = 2**64 - 1
NANOS_MAX = 999_999_999

# Durations (ttl, download.timeout) must lie in (0, 100 years]; Duration itself reaches 10,000 years.
MAX_DURATION_SECONDS = 100 * 365 * 86400
DURATION_MAX_SECONDS = 315_576_000_000
# download.piece_length must lie in [1 KiB, 1 GiB].
MIN_PIECE_LENGTH = 1024
MAX_PIECE_LENGTH = 1024**3
# Headers the daemon sets itself for each origin request: a caller may not send them (in any case). A Range header
# is no longer among them: it asks for a ranged download (the listed cases cover it).
RESERVED_HEADERS: tuple[str, ...] = (
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "host",
    "te",
    "trailer",
    "upgrade",
    "if-range",
    "accept-encoding",
)
TOKEN_CHARACTERS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible ASCII, inner spaces and tabs allowed, none at either end.
_SENDABLE_VALUE = re.compile(r"(?:[!-~](?:[ \t!-~]*[!-~])?)?")

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

# Holders the daemon refuses: empty, longer than 512 characters, or not printable (``str.isprintable``: control,
# format, private-use, unassigned, separator characters other than the ASCII space).
REFUSED_HOLDERS: tuple[str, ...] = (
    "",
    "h" * 513,
    "\u00e9" * 513,
    "h" * 64 * 1024,
    "container:\x00",
    "line\nbreak",
    "carriage\rreturn",
    "\x1b[2J\x1b[Hscreen",
    "tab\tseparated",
    "\x01",
    "del\x7f",
    "nel\x85",
    "sep\u2028",
    "para\u2029",
    "bidi\u202e",
    "zero\u200bwidth",
    "no\u00a0break",
    "private\ue000",
    "unassigned\U000e0080",
)
# Holders at the edges of what the daemon accepts.
ACCEPTED_HOLDERS: tuple[str, ...] = (
    "h",
    " ",
    "a b",
    "h" * 512,
    "\u00e9" * 512,
    "\U0001f600" * 512,
    "user:\u00e9t\u00e9",
)

HOSTILE_TEXT: tuple[str, ...] = (
    "",
    "\x00",
    "x" * 2048,
    "../../etc/passwd",
    "\r\n\r\n",
    "%n%s%x",
    "\u202e",
    "\ud7ff\ue000\U0010ffff",
    "\u00e9" * 10 * 1024,  # 20 KiB of UTF-8: past gRPC's limits on metadata, were an error to quote it whole
)

# URLs DownloadTask must refuse before any work (INVALID_ARGUMENT): bad schemes, no host, malformed, spaces or
# control characters. "{origin}" stands for the origin's address.
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
    "\x00http://{origin}/small.bin",
    "http://{origin}/small\x00.bin",
    "http://{origin}/small.bin\n",
    "http://{origin}/small.bin\t",
    "http://{origin}/small\x7f.bin",
    " http://{origin}/small.bin",
    "http://{origin}/small.bin ",
    "http://{origin}/small bin",
    "http://{origin}/small.bin\r\nX-Injected: 1",
    "http://{origin}\x1f/small.bin",
    "http://[::1]:99999/",
    "https://[::1",
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
    "long-name",  # a name of 256 bytes and more
    "long-name-multibyte",  # 128 two-byte characters: 256 bytes
    "long-path",  # 4096 bytes and more
    "os-error",  # a path whose checks pass but that the OS will not create
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


def duration_nanos(value: tuple[int, int]) -> int:
    return value[0] * 10**9 + value[1]


def duration_valid(value: tuple[int, int]) -> bool:
    """Whether the daemon accepts a (seconds, nanos) ttl or timeout: more than 0, at most 100 years."""
    return 0 < duration_nanos(value) <= MAX_DURATION_SECONDS * 10**9


def durations() -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos) pairs: negative, zero, mixed signs, tiny, ordinary, the 100-year limit and Duration's
    own limits."""
    special = [
        (0, 0),
        (-1, 0),
        (0, -1),
        (0, 1),
        (1, -NANOS_MAX),
        (-1, NANOS_MAX),
        (I64_MIN, -NANOS_MAX),
        (60, 0),
        (MAX_DURATION_SECONDS, 0),
        (MAX_DURATION_SECONDS - 1, NANOS_MAX),
        (MAX_DURATION_SECONDS, 1000),
        (MAX_DURATION_SECONDS + 1, 0),
        (DURATION_MAX_SECONDS, 0),
        (DURATION_MAX_SECONDS + 1, 0),
        (I64_MAX, NANOS_MAX),
    ]
    nanos = st.integers(-NANOS_MAX, NANOS_MAX)
    return st.one_of(
        st.sampled_from(special),
        st.tuples(st.integers(I64_MIN, I64_MAX), nanos),
        st.tuples(st.integers(-2, MAX_DURATION_SECONDS + 2), nanos),
        st.tuples(st.just(MAX_DURATION_SECONDS), st.integers(-1000, 1000)),
    )


def holders() -> st.SearchStrategy[str]:
    """Holders: listed refused and edge ones, printable text, and text of any characters (often not printable)."""
    printable = st.characters(categories=("L", "M", "N", "P", "S"))
    anything = st.characters(exclude_categories=["Cs"])
    return st.one_of(
        st.text(printable, min_size=1, max_size=40),
        st.text(printable, min_size=1, max_size=40),
        st.sampled_from(ACCEPTED_HOLDERS),
        st.sampled_from(REFUSED_HOLDERS),
        st.text(anything, min_size=1, max_size=40),
        st.text(printable, min_size=505, max_size=520),
    )


def holder_refused(holder: str) -> bool:
    """Whether the daemon answers INVALID_ARGUMENT for this holder: 1 to 512 printable characters are accepted."""
    return not holder or len(holder) > 512 or not holder.isprintable()


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


def task_ref_lists() -> st.SearchStrategy[list[TaskRefPlan]]:
    """Lists of references: any, or only ones naming the fixture's task (which Acquire grants)."""
    known = st.sampled_from(
        [
            TaskRefPlan("task_id", KNOWN_TASK),
            TaskRefPlan("download", KNOWN_TASK),
            TaskRefPlan("blob_digest", "sha256:" + KNOWN_TASK),
        ]
    )
    return st.one_of(st.lists(task_refs(), max_size=4), st.lists(known, min_size=1, max_size=3))


def header_refused(name: str, value: str) -> bool:
    """Whether the daemon refuses a request header up front: a name that is no HTTP token, a value that is not
    printable ASCII or has blanks at either end, or a header the daemon sets itself."""
    return (
        _TOKEN.fullmatch(name) is None or _SENDABLE_VALUE.fullmatch(value) is None or name.lower() in RESERVED_HEADERS
    )


def legal_header_names() -> st.SearchStrategy[str]:
    return st.text(TOKEN_CHARACTERS, min_size=1, max_size=20).map(lambda name: "X-Fuzz-" + name)


def legal_header_values() -> st.SearchStrategy[str]:
    """Values the daemon passes on: visible ASCII with inner blanks."""
    sendable = st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t")
    return st.text(sendable, max_size=30).map(lambda value: value.strip(" \t"))


def header_names() -> st.SearchStrategy[str]:
    """Token names (mostly), headers the daemon reserves (in any case), and names that are no token."""
    legal = legal_header_names()
    reserved = st.sampled_from(RESERVED_HEADERS).flatmap(
        lambda name: st.tuples(*(st.sampled_from([ch, ch.upper()]) for ch in name)).map("".join)
    )
    listed = st.sampled_from(["", "X Bad", "X-Bad:", "X-Bad\r", "\nX-Bad", "X-B\nad", "X-Bad\x00", "\u00dcml", "(x)"])
    illegal = st.text(max_size=12).filter(lambda name: _TOKEN.fullmatch(name) is None)
    return st.one_of(legal, legal, legal, reserved, listed, illegal)


def header_values() -> st.SearchStrategy[str]:
    """Values the daemon passes on (``legal_header_values``), up to 64 KiB, and values it refuses."""
    clean = legal_header_values()
    breaking = st.tuples(clean, st.sampled_from("\r\n\0"), clean).map("".join)
    return st.one_of(
        clean,
        clean,
        clean,
        st.sampled_from(["v" * 64 * 1024, "*/*", "bytes=0-0", "gzip, identity", "a\tb", "\x01\x7f"]),
        breaking,
        st.sampled_from(["v\r\nX-Smuggled: 1", "\n", "\r", "\0", "a\x00b", " v", "v\t", "a\x0bb", "\u00e9", "\x1f"]),
    )


def request_headers() -> st.SearchStrategy[dict[str, str]]:
    """Extra headers: legal ones, reserved ones and illegal names or values (see ``header_refused``)."""
    return st.dictionaries(header_names(), header_values(), max_size=3)


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
    "right-sha512",
    "right-sha256-upper-case",
    "range-sha256",
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
    edges = [0, 1, MIN_PIECE_LENGTH - 1, MIN_PIECE_LENGTH, 4096, SMALL_SIZE, SMALL_SIZE + 1, 4 * 1024 * 1024]
    edges += [MAX_PIECE_LENGTH, MAX_PIECE_LENGTH + 1, I64_MAX, I64_MAX + 1, U64_MAX]
    return st.one_of(
        st.sampled_from(edges),
        st.integers(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
        st.integers(0, U64_MAX),
    )


def piece_length_valid(length: int) -> bool:
    return MIN_PIECE_LENGTH <= length <= MAX_PIECE_LENGTH


def valid_durations() -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos) the daemon accepts, nanos of either sign: 1 ns to 100 years."""

    def forms(nanos: int) -> list[tuple[int, int]]:
        seconds, rest = divmod(nanos, 10**9)
        return [(seconds, rest), (seconds + 1, rest - 10**9)] if rest else [(seconds, 0)]

    return st.integers(1, MAX_DURATION_SECONDS * 10**9).flatmap(lambda nanos: st.sampled_from(forms(nanos)))


# Download timeouts the generators use are refused ones or ones of at least this long: a download.timeout that
# expires while the daemon is handing a response to gRPC leaves the call without a status (see the xfail "timeout
# expiring while the client reads" case); the listed cases cover expiring timeouts where that cannot happen.
MIN_FUZZ_DOWNLOAD_TIMEOUT_SECONDS = 30


def lasting_download_timeouts() -> st.SearchStrategy[tuple[int, int]]:
    """Accepted download timeouts that never expire in a test."""
    seconds = st.integers(MIN_FUZZ_DOWNLOAD_TIMEOUT_SECONDS, MAX_DURATION_SECONDS)
    return st.tuples(seconds, st.integers(-NANOS_MAX, NANOS_MAX)).filter(duration_valid)


def download_timeouts() -> st.SearchStrategy[tuple[int, int]]:
    """Refused download timeouts (zero, negative, past 100 years), and accepted ones that never expire in a test."""
    return st.one_of(lasting_download_timeouts(), durations().filter(lambda value: not duration_valid(value)))


def legal_request_headers() -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(legal_header_names(), legal_header_values(), max_size=3)


def mostly(valid: st.SearchStrategy[T], anything: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    """Unset, valid, or anything."""
    return st.one_of(st.none(), valid, anything)


# Output kinds that can be written (with overwrite where something is there already).
WRITABLE_OUTPUTS: tuple[str, ...] = ("new", "dotdot-inside", "existing", "symlink-outside", "dangling-symlink-outside")
# Digests that parse (the right ones and the wrong ones).
PARSED_DIGESTS: tuple[str, ...] = (
    "right-sha256",
    "right-crc32",
    "right-sha512",
    "right-sha256-upper-case",
    "wrong-sha256",
    "range-sha256",
    "crc32:0",
)


@st.composite
def download_plans(draw: st.DrawFn, with_output: bool = True) -> DownloadPlan:
    """A Download aimed at the fixture's origin (or at a URL refused up front).

    Half the plans are tame (every option valid, so that they get past validation to the origin, the cache, the
    digest and the output), half are wild (every option hostile now and then): a download needs all its options
    valid to get anywhere, and options drawn one by one would rarely all be.
    """
    wild = draw(st.booleans(), label="wild")

    def pick(tame: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> T:
        return draw(hostile if wild else tame)

    targets = [*ORIGIN_TARGETS, "small.bin", "small.bin"]
    target = pick(st.sampled_from(targets), st.sampled_from([*targets, ""]))
    url = draw(st.one_of(st.sampled_from(REFUSED_URLS), st.text(max_size=60))) if target == "" else ""
    optional_text = st.none() | st.text(max_size=20)
    inside = st.integers(0, SMALL_SIZE - 1).flatmap(lambda start: st.tuples(st.just(start), st.integers(1, 50)))
    byte_range = pick(st.none() | inside, mostly(inside, byte_ranges()))
    writable = st.none() | st.sampled_from(WRITABLE_OUTPUTS)
    output = pick(writable, st.none() | st.sampled_from(OUTPUT_KINDS)) if with_output else None
    overwrite = draw(st.booleans()) if wild else output not in {None, "new", "dotdot-inside"} or draw(st.booleans())
    # A forced hard link that the OS refuses ends INTERNAL, not FAILED_PRECONDITION: an xfail case covers it.
    force_hard_link = draw(st.booleans()) and not (output == "os-error" and byte_range is None)
    tame_piece_lengths = st.none() | st.sampled_from([MIN_PIECE_LENGTH, 4096, SMALL_SIZE, MAX_PIECE_LENGTH])
    return DownloadPlan(
        target=target,
        url=url,
        query=draw(st.none() | st.text(string.ascii_letters + string.digits + "=&%+", max_size=20)),
        tag=draw(optional_text),
        application=draw(optional_text),
        piece_length=pick(
            tame_piece_lengths | st.integers(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            mostly(st.integers(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH), piece_lengths()),
        ),
        digest=pick(
            st.none() | st.sampled_from(PARSED_DIGESTS), mostly(st.sampled_from(DIGESTS), st.text(max_size=30))
        ),
        byte_range=byte_range,
        output=output,
        overwrite=overwrite,
        timeout=pick(st.none() | lasting_download_timeouts(), st.none() | download_timeouts()),
        headers=pick(legal_request_headers(), request_headers()),
        task_type=draw(enum_values()),
        priority=draw(enum_values()),
        need_piece_content=draw(st.booleans()),
        disable_back_to_source=pick(st.just(False), st.booleans()),
        need_back_to_source=draw(st.booleans()),
        force_hard_link=force_hard_link,
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
