"""Identifiers, piece arithmetic and digests, byte-compatible with Dragonfly v2.

Everything here is pure: no I/O, no protobuf. Peers that disagree on a single byte of a task
id never find each other, so the task-id rules mirror upstream's exactly, including the URL
canonicalisation its Rust daemon gets from the WHATWG URL parser. Task ids also become file
names, so :func:`validate_task_id` is the gate every id passes before it touches a path.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_to_bytes

import idna
from zlib_ng import zlib_ng

__all__ = [
    "DEFAULT_FILTERED_QUERY_PARAMS",
    "MAX_DEFAULT_PIECE_LENGTH",
    "MAX_PIECE_COUNT",
    "MAX_REQUESTED_PIECE_LENGTH",
    "MIN_DEFAULT_PIECE_LENGTH",
    "MIN_REQUESTED_PIECE_LENGTH",
    "DigestMismatch",
    "FileDigester",
    "InvalidTaskId",
    "InvalidUrl",
    "PieceSpan",
    "QueryRule",
    "blob_digest_from_url",
    "blob_digest_task_id",
    "crc32_update",
    "filtered_query_params_or_default",
    "format_crc32",
    "host_id",
    "is_valid_task_id",
    "iter_pieces",
    "normalize_url",
    "parse_crc32_digest",
    "parse_file_digest",
    "peer_id",
    "piece_count",
    "piece_digest",
    "piece_length_for",
    "piece_metadata_digest",
    "pieces_for",
    "task_blob_digest",
    "task_id",
    "validate_task_id",
]

MIN_DEFAULT_PIECE_LENGTH = 4 * 1024 * 1024
"""Smallest piece length chosen when the request names none (4 MiB)."""

MAX_DEFAULT_PIECE_LENGTH = 64 * 1024 * 1024
"""Largest piece length chosen when the request names none (64 MiB)."""

MIN_REQUESTED_PIECE_LENGTH = 1024
"""Smallest ``piece_length`` a request may ask for (1 KiB): fewer requests to the origin per byte."""

MAX_REQUESTED_PIECE_LENGTH = 1024 * 1024 * 1024
"""Largest ``piece_length`` a request may ask for (1 GiB): enough pieces left to share."""

MAX_PIECE_COUNT = 500
"""Content length is divided by this before rounding up to a power of two."""

_TASK_TYPE_STANDARD = "STANDARD"
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


class InvalidTaskId(ValueError):
    """A string that must not be used as a task id (and so never as a file name)."""


class InvalidUrl(ValueError):
    """A URL that cannot be parsed, so no task id can be derived from it."""


class DigestMismatch(ValueError):
    """Downloaded content does not match the digest the caller asked for."""


# --------------------------------------------------------------------------- task ids

DEFAULT_FILTERED_QUERY_PARAMS: tuple[str, ...] = (
    # S3 presigned URLs
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-User-Agent",
    # GCS signed URLs
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    # OSS
    "OSSAccessKeyId",
    "Expires",
    "Signature",
    "SecurityToken",
    # OBS (its Signature and Expires are already listed above)
    "AccessKeyId",
    "X-Obs-Date",
    "X-Obs-Security-Token",
    # COS
    "q-sign-algorithm",
    "q-ak",
    "q-sign-time",
    "q-key-time",
    "q-header-list",
    "q-url-param-list",
    "q-signature",
    "x-cos-security-token",
    # containerd names the registry namespace in the mirror URL
    "ns",
)
"""Query keys upstream leaves out of task ids when the caller names none (exact case).

Signatures and expiry times change on every presigned URL; without this list two users of
one object would never share a task. Upstream's dfget, its proxy rules (``filteredQueryParams``
defaults to it) and its registry mirror apply it; an explicit list replaces it, never extends it.
"""


def filtered_query_params_or_default(given: Sequence[str]) -> tuple[str, ...]:
    """The caller's list of filtered query keys, or :data:`DEFAULT_FILTERED_QUERY_PARAMS` when it gave none."""
    if isinstance(given, str):
        raise TypeError("filtered query params must be a sequence of keys, not a single string")
    return tuple(given) if given else DEFAULT_FILTERED_QUERY_PARAMS


class QueryRule(enum.Enum):
    """How the query of a task-id URL is canonicalised; peers must agree on it to share tasks."""

    FORM = "form"
    """Released Rust clients (through 1.5.1): the remaining pairs, in their order, re-encoded as
    ``application/x-www-form-urlencoded``; applied whether or not a filter was given."""

    GO_SORTED = "go-sorted"
    """Upstream's main branch after client 1.5.1 (the Go scheduler's rule): with a filter, the
    remaining pairs sorted by key (repeated keys keep their order), escaped as Go's
    ``url.QueryEscape``; with no filter the query is left as the URL parser serialised it."""


_TASK_ID = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")


def is_valid_task_id(s: str) -> bool:
    """Tell whether ``s`` is safe to use as a task id and as a file name.

    Accepted: lowercase hex of 64 characters (sha256 ids, also sha256 blob digests) or 128
    characters (sha512 blob digests). Anything else, such as ``..`` or ``/``, is refused.
    """
    return isinstance(s, str) and _TASK_ID.fullmatch(s) is not None


def validate_task_id(s: str) -> str:
    """Return ``s`` unchanged if it is a valid task id, else raise :class:`InvalidTaskId`."""
    if is_valid_task_id(s):
        return s
    shown = repr(s[:80]) if isinstance(s, str) else type(s).__name__
    raise InvalidTaskId(f"invalid task id {shown}: expected 64 (sha256) or 128 (sha512) lowercase hex characters")


def task_id(
    url: str,
    *,
    tag: str | None = None,
    application: str | None = None,
    piece_length: int | None = None,
    filtered_query_params: Sequence[str] = (),
    content_for_calculating_task_id: str | None = None,
    enable_task_id_based_blob_digest: bool = False,
    query_rule: QueryRule = QueryRule.FORM,
) -> str:
    """Compute a STANDARD task's id the way every Dragonfly peer and scheduler does.

    Precedence follows upstream: explicit content first, then the OCI blob digest (when
    enabled and the URL is a blob URL), then the canonical URL plus tag, application and
    the *requested* piece length. ``filtered_query_params`` is used as given: callers that
    follow upstream's defaults pass it through :func:`filtered_query_params_or_default`.
    """
    if content_for_calculating_task_id is not None:
        return hashlib.sha256(content_for_calculating_task_id.encode("utf-8")).hexdigest()

    if enable_task_id_based_blob_digest:
        digest = blob_digest_from_url(url)
        if digest is not None:
            return blob_digest_task_id(digest)

    if piece_length is not None and piece_length < 0:
        raise ValueError(f"piece_length must not be negative, got {piece_length}")

    hasher = hashlib.sha256(normalize_url(url, filtered_query_params, query_rule).encode("utf-8"))
    if tag:
        hasher.update(tag.encode("utf-8"))
    if application:
        hasher.update(application.encode("utf-8"))
    if piece_length is not None:
        hasher.update(str(piece_length).encode("ascii"))
    hasher.update(_TASK_TYPE_STANDARD.encode("ascii"))
    return hasher.hexdigest()


_BLOB_URL = re.compile(r"[^:]*://.*/v2/.*/blobs/(?P<digest>[^?#]+)(?:[?#].*)?", re.DOTALL)


def blob_digest_from_url(url: str) -> str | None:
    """Return the ``<alg>:<hex>`` part of an OCI blob URL, or None for any other URL.

    The digest is returned unvalidated; :func:`blob_digest_task_id` decides whether it is usable.
    """
    match = _BLOB_URL.fullmatch(url)
    return match.group("digest") if match else None


_BLOB_DIGEST = re.compile(r"(?P<alg>sha256|sha512):(?P<hex>[0-9a-f]+)")
_BLOB_HEX_LENGTH = {"sha256": 64, "sha512": 128}


def blob_digest_task_id(digest: str) -> str:
    """Turn an OCI blob digest (``sha256:<hex>`` / ``sha512:<hex>``) into its task id, the hex.

    One blob then has one task id whatever registry served it. Raises :class:`InvalidTaskId`
    for any other algorithm, a wrong length or non-lowercase hex.
    """
    match = _BLOB_DIGEST.fullmatch(digest)
    if match is None or len(match.group("hex")) != _BLOB_HEX_LENGTH[match.group("alg")]:
        raise InvalidTaskId(
            f"invalid blob digest {digest[:160]!r}: expected sha256:<64 lowercase hex> or sha512:<128 lowercase hex>"
        )
    return validate_task_id(match.group("hex"))


def task_blob_digest(task_id: str) -> str:
    """The OCI blob digest a blob-named task id stands for (the inverse of :func:`blob_digest_task_id`)."""
    algorithm = next(alg for alg, length in _BLOB_HEX_LENGTH.items() if length == len(validate_task_id(task_id)))
    return f"{algorithm}:{task_id}"


# --------------------------------------------------------------------------- host and peer ids


def host_id(ip: str, hostname: str, seed: bool = False) -> str:
    """Return the host id schedulers know a daemon by: ``{ip}-{hostname}`` (``-seed`` for seed peers)."""
    base = f"{ip}-{hostname}"
    return f"{base}-seed" if seed else base


def peer_id(ip: str, hostname: str, seed: bool = False) -> str:
    """Return a fresh peer id, ``{ip}-{hostname}-{uuid4}``; one is made per download."""
    base = f"{ip}-{hostname}-{uuid.uuid4()}"
    return f"{base}-seed" if seed else base


# --------------------------------------------------------------------------- URL canonicalisation

_SPECIAL_DEFAULT_PORTS: dict[str, int | None] = {
    "http": 80,
    "https": 443,
    "ws": 80,
    "wss": 443,
    "ftp": 21,
    "file": None,
}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_FORM_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789*-._")
# Percent-encode sets of the WHATWG URL standard as upstream's URL parser applies them.
_FRAGMENT_SET = frozenset(b' "<>`')
_PATH_SET = _FRAGMENT_SET | frozenset(b"#?{}")
_USERINFO_SET = _PATH_SET | frozenset(b"/:;=@[\\]^|")
_FORBIDDEN_HOST = frozenset(" #/:<>?@[\\]^|")
_FORBIDDEN_DOMAIN = _FORBIDDEN_HOST | frozenset("%")
_GO_QUERY_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_QUERY_SET = frozenset(b' "#<>')
_SPECIAL_QUERY_SET = _QUERY_SET | frozenset(b"'")
_JOINERS = frozenset("\u200c\u200d")
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
_DOUBLE_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})
_SINGLE_DOT = frozenset({".", "%2e"})


def normalize_url(url: str, filtered_query_params: Sequence[str] = (), query_rule: QueryRule = QueryRule.FORM) -> str:
    """Return the canonical URL string ``U`` that task ids hash.

    Scheme and (special-scheme) host are lowercased, non-ASCII hosts go through IDNA (UTS #46),
    a default port is dropped, dot segments are resolved, and the query is canonicalised by
    ``query_rule`` after dropping the filtered keys (exact, case-sensitive); a query left
    empty loses its ``?``. Finally, as upstream does, a root path ``/`` is trimmed when the
    string ends with it, so ``https://example.com/`` and ``https://example.com`` hash alike
    while ``https://example.com/?a=1`` keeps its slash.
    """
    if isinstance(filtered_query_params, str):
        raise TypeError("filtered_query_params must be a sequence of keys, not a single string")
    try:
        return _normalize_url(url, frozenset(filtered_query_params), query_rule)
    except UnicodeError as exc:
        raise InvalidUrl(f"invalid URL {url[:200]!r}: {exc}") from exc


def _normalize_url(url: str, filtered: frozenset[str], query_rule: QueryRule) -> str:
    raw = url
    url = url.strip(_C0_AND_SPACE).replace("\t", "").replace("\n", "").replace("\r", "")
    scheme_match = _SCHEME.match(url)
    if scheme_match is None:
        raise InvalidUrl(f"invalid URL {raw[:200]!r}: no scheme")
    scheme = scheme_match.group()[:-1].lower()
    rest = url[scheme_match.end() :]

    rest, hash_sign, fragment = rest.partition("#")
    rest, question_mark, query = rest.partition("?")
    special = scheme in _SPECIAL_DEFAULT_PORTS
    if special:
        rest = rest.replace("\\", "/")

    authority: str | None
    if special and scheme != "file":
        rest = rest.lstrip("/")
        authority, slash, path = rest.partition("/")
        path = slash + path
    elif rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        path = slash + path
    else:
        authority, path = (None, rest)
        if scheme == "file":
            authority = ""

    parts = [scheme, ":"]
    if authority is not None:
        parts.append("//")
        parts.append(_authority(authority, scheme, special, raw))

    if special:
        path = _resolve_path(path) if path else "/"
    elif path.startswith("/"):
        path = _resolve_path(path)
    else:
        path = _percent_encode(path, frozenset())
    parts.append(path)

    if question_mark:
        parts.append(_canonical_query(query, filtered, query_rule, special))
    if hash_sign:
        parts.append("#")
        parts.append(_percent_encode(fragment, _FRAGMENT_SET))

    result = "".join(parts)
    if path == "/" and result.endswith("/"):
        result = result.rstrip("/")
    return result


def _authority(authority: str, scheme: str, special: bool, raw: str) -> str:
    """Canonicalise ``userinfo@host:port``."""
    userinfo, at_sign, hostport = authority.rpartition("@")
    out = ""
    if at_sign:
        username, _, password = userinfo.partition(":")
        if username or password:
            out = _percent_encode(username, _USERINFO_SET)
            if password:
                out += ":" + _percent_encode(password, _USERINFO_SET)
            out += "@"

    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: unterminated IPv6 address")
        host, port_part = hostport[: end + 1], hostport[end + 1 :]
        if port_part and not port_part.startswith(":"):
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: junk after IPv6 address")
        port_text = port_part[1:] if port_part else None
    else:
        host, colon, port_text_raw = hostport.partition(":")
        port_text = port_text_raw if colon else None

    host = _host(host, scheme, special, raw)

    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 0xFFFF:
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: invalid port {port_text!r}")
        port = int(port_text)
        if scheme == "file":
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: file URLs take no port")
        if port != _SPECIAL_DEFAULT_PORTS.get(scheme):
            host += f":{port}"
    return out + host


def _host(host: str, scheme: str, special: bool, raw: str) -> str:
    """Canonicalise a host: IPv6 compressed, IPv4 dotted, domains lowercase ASCII."""
    if host.startswith("["):
        try:
            return f"[{_format_ipv6(ipaddress.IPv6Address(host[1:-1]).packed)}]"
        except ValueError as exc:
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: invalid IPv6 address") from exc

    if not special:
        if any(c in _FORBIDDEN_HOST for c in host):
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: forbidden character in host {host!r}")
        return _percent_encode(host, frozenset())

    domain = _domain_to_ascii(unquote_to_bytes(host).decode("utf-8"), raw)
    if any(c in _FORBIDDEN_DOMAIN or ord(c) < 0x20 or ord(c) == 0x7F for c in domain):
        raise InvalidUrl(f"invalid URL {raw[:200]!r}: forbidden character in host {host!r}")
    if not domain:
        if scheme == "file":
            return ""
        raise InvalidUrl(f"invalid URL {raw[:200]!r}: missing host")
    if scheme == "file" and domain == "localhost":
        return ""

    ipv4 = _parse_ipv4(domain, raw)
    return domain if ipv4 is None else str(ipaddress.IPv4Address(ipv4))


def _domain_to_ascii(domain: str, raw: str) -> str:
    """IDNA as the WHATWG URL parser applies it: UTS #46, non-transitional (``ß`` stays ``ß``), no STD3 rules.

    Python's own ``idna`` codec is IDNA 2003 (``faß.de`` becomes ``fass.de``), which would give
    such hosts task ids no upstream peer computes.
    """
    if domain.isascii():
        return domain.lower()
    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
        return ".".join(_label_to_ascii(label) for label in mapped.split("."))
    except idna.IDNAError as exc:
        raise InvalidUrl(f"invalid URL {raw[:200]!r}: invalid host {domain[:100]!r}: {exc}") from exc


def _label_to_ascii(label: str) -> str:
    """Punycode one mapped label after the checks UTS #46 asks for (combining marks, joiners, bidi)."""
    if label.isascii():
        return label
    idna.check_initial_combiner(label)
    for position, char in enumerate(label):
        if char in _JOINERS and not idna.valid_contextj(label, position):
            raise idna.IDNAError(f"joiner U+{ord(char):04X} not allowed at position {position}")
    idna.check_bidi(label)
    return "xn--" + label.encode("punycode").decode("ascii")


def _parse_ipv4(domain: str, raw: str) -> int | None:
    """Parse a host that ends in a number as an IPv4 address (decimal, octal or hex parts)."""
    labels = domain.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    last = labels[-1]
    if not (last.isdigit() or re.fullmatch(r"0[xX][0-9A-Fa-f]*", last)):
        return None
    if len(labels) > 4:
        raise InvalidUrl(f"invalid URL {raw[:200]!r}: IPv4 address with too many parts")
    numbers: list[int] = []
    for label in labels:
        if re.fullmatch(r"0[xX][0-9A-Fa-f]*", label):
            numbers.append(int(label[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]+|[1-9][0-9]*|0", label):
            numbers.append(int(label, 8 if len(label) > 1 and label[0] == "0" else 10))
        else:
            raise InvalidUrl(f"invalid URL {raw[:200]!r}: invalid IPv4 part {label!r}")
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise InvalidUrl(f"invalid URL {raw[:200]!r}: IPv4 part out of range")
    address = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        address += number << (8 * (3 - index))
    return address


def _format_ipv6(packed: bytes) -> str:
    """Serialise IPv6 like the WHATWG URL standard: lowercase, longest zero run (>= 2) as ``::``."""
    pieces = list(struct.unpack(">8H", packed))
    best_start, best_len, start = -1, 1, -1
    for index, piece in enumerate([*pieces, 1]):
        if piece == 0 and start < 0:
            start = index
        elif piece != 0 and start >= 0:
            if index - start > best_len:
                best_start, best_len = start, index - start
            start = -1
    if best_start < 0:
        return ":".join(f"{p:x}" for p in pieces)
    head = ":".join(f"{p:x}" for p in pieces[:best_start])
    tail = ":".join(f"{p:x}" for p in pieces[best_start + best_len :])
    return f"{head}::{tail}"


def _resolve_path(path: str) -> str:
    """Resolve ``.``/``..`` segments (also percent-encoded ones) and percent-encode the rest."""
    out: list[str] = []
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        is_last = index == len(segments) - 1
        lowered = segment.lower()
        if lowered in _DOUBLE_DOT:
            if out:
                out.pop()
            if is_last:
                out.append("")
        elif lowered in _SINGLE_DOT:
            if is_last:
                out.append("")
        else:
            out.append(_percent_encode(segment, _PATH_SET))
    return "/" + "/".join(out)


def _percent_encode(text: str, extra: frozenset[int]) -> str:
    """Percent-encode C0 controls, non-ASCII and the ``extra`` bytes; keep existing ``%XX``."""
    return "".join(f"%{b:02X}" if b < 0x20 or b > 0x7E or b in extra else chr(b) for b in text.encode("utf-8"))


def _canonical_query(query: str, filtered: frozenset[str], rule: QueryRule, special: bool) -> str:
    """The query part of ``U``, ``?`` included, or ``""`` when no pair is left."""
    if rule is QueryRule.GO_SORTED and not filtered:
        return "?" + _percent_encode(query, _SPECIAL_QUERY_SET if special else _QUERY_SET)
    pairs = [(k, v) for k, v in _parse_form(query) if k not in filtered]
    if not pairs:
        return ""
    encode = _form_encode
    if rule is QueryRule.GO_SORTED:
        pairs.sort(key=lambda pair: pair[0])
        encode = _go_query_escape
    return "?" + "&".join(f"{encode(k)}={encode(v)}" for k, v in pairs)


def _parse_form(query: str) -> list[tuple[str, str]]:
    """Decode ``application/x-www-form-urlencoded`` pairs; a bare ``a`` is ``("a", "")``."""
    pairs: list[tuple[str, str]] = []
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((_form_decode(key), _form_decode(value)))
    return pairs


def _form_decode(text: str) -> str:
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", errors="replace")


def _form_encode(text: str) -> str:
    """Form-encode: space as ``+``, bytes outside ``A-Za-z0-9*-._`` as uppercase ``%XX``."""
    return "".join(chr(b) if b in _FORM_SAFE else "+" if b == 0x20 else f"%{b:02X}" for b in text.encode("utf-8"))


def _go_query_escape(text: str) -> str:
    """Go's ``url.QueryEscape``: space as ``+``, bytes outside ``A-Za-z0-9-_.~`` as uppercase ``%XX``."""
    return "".join(chr(b) if b in _GO_QUERY_SAFE else "+" if b == 0x20 else f"%{b:02X}" for b in text.encode("utf-8"))


# --------------------------------------------------------------------------- pieces


@dataclass(frozen=True, slots=True)
class PieceSpan:
    """One piece of a task: its number and the byte span ``[offset, offset + length)``."""

    number: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        """First byte after the piece."""
        return self.offset + self.length


def _next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), as Rust's ``u64::next_power_of_two``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def piece_length_for(content_length: int) -> int:
    """Choose the piece length for content when the request did not ask for one.

    About 500 pieces per task, a power of two, never under 4 MiB nor over 64 MiB.
    """
    if content_length < 0:
        raise ValueError(f"content_length must not be negative, got {content_length}")
    length = _next_power_of_two(content_length // MAX_PIECE_COUNT)
    return max(MIN_DEFAULT_PIECE_LENGTH, min(MAX_DEFAULT_PIECE_LENGTH, length))


def piece_count(content_length: int, piece_length: int) -> int:
    """Number of pieces content of ``content_length`` bytes is cut into (0 for empty content)."""
    _check_piece_args(content_length, piece_length)
    return -(-content_length // piece_length)


def iter_pieces(
    content_length: int,
    piece_length: int,
    range_start: int | None = None,
    range_length: int | None = None,
) -> Iterator[PieceSpan]:
    """Yield the pieces covering the content, or only those overlapping the requested range.

    Piece *n* starts at ``n * piece_length``; the last one is shorter. A range is clipped to
    the content; an empty range (or range starting at/after the end) selects nothing.
    ``range_start`` defaults to 0 and ``range_length`` to the rest of the content.
    """
    _check_piece_args(content_length, piece_length)
    start = 0 if range_start is None else range_start
    if start < 0:
        raise ValueError(f"range_start must not be negative, got {start}")
    if range_length is not None and range_length < 0:
        raise ValueError(f"range_length must not be negative, got {range_length}")
    end = content_length if range_length is None else min(content_length, start + range_length)
    if start >= end:
        return
    for number in range(start // piece_length, -(-end // piece_length)):
        offset = number * piece_length
        yield PieceSpan(number, offset, min(piece_length, content_length - offset))


def pieces_for(
    content_length: int,
    piece_length: int,
    range_start: int | None = None,
    range_length: int | None = None,
) -> list[PieceSpan]:
    """List form of :func:`iter_pieces`."""
    return list(iter_pieces(content_length, piece_length, range_start, range_length))


def _check_piece_args(content_length: int, piece_length: int) -> None:
    if content_length < 0:
        raise ValueError(f"content_length must not be negative, got {content_length}")
    if piece_length <= 0:
        raise ValueError(f"piece_length must be positive, got {piece_length}")


# --------------------------------------------------------------------------- digests

_CRC32_DIGEST = re.compile(r"crc32:(?P<value>0|[1-9][0-9]{0,9})")
_SHA_DIGEST = re.compile(r"(?P<alg>sha256|sha512):(?P<hex>[0-9a-fA-F]+)")

_Bytes = bytes | bytearray | memoryview


def crc32_update(crc: int, chunk: _Bytes) -> int:
    """Fold ``chunk`` into a running CRC-32/IEEE (start from 0), for pieces written in chunks.

    zlib-ng's CRC (carry-less multiply) runs at several times the speed of the system zlib's, with the same
    values, and releases the GIL as zlib does: it is computed over every byte a daemon stores or serves.
    """
    return zlib_ng.crc32(chunk, crc)


def format_crc32(crc: int) -> str:
    """Render a CRC-32 as Dragonfly writes it: ``crc32:`` + unpadded decimal."""
    if not 0 <= crc <= _U32_MAX:
        raise ValueError(f"crc32 value out of range: {crc}")
    return f"crc32:{crc}"


def piece_digest(content: _Bytes) -> str:
    """Digest of a piece's bytes, ``crc32:<decimal>`` (CRC-32/IEEE)."""
    return format_crc32(crc32_update(0, content))


def parse_crc32_digest(s: str) -> int:
    """Return the CRC-32 in a ``crc32:<decimal>`` string; ValueError unless canonical and in range."""
    match = _CRC32_DIGEST.fullmatch(s) if isinstance(s, str) else None
    if match is None or int(match.group("value")) > _U32_MAX:
        raise ValueError(f"invalid crc32 digest {s!r}: expected 'crc32:' and a decimal number 0..4294967295")
    return int(match.group("value"))


def piece_metadata_digest(number: int, offset: int, length: int, digest: str) -> str:
    """Digest a parent sends with a piece: CRC-32 of ``u32be(number) u64be(offset) u64be(length) digest``.

    It lets the child detect a piece whose metadata was mixed up, not only its bytes.
    """
    if not 0 <= number <= _U32_MAX:
        raise ValueError(f"piece number out of u32 range: {number}")
    if not 0 <= offset <= _U64_MAX or not 0 <= length <= _U64_MAX:
        raise ValueError(f"piece offset/length out of u64 range: {offset}/{length}")
    header = struct.pack(">IQQ", number, offset, length)
    return format_crc32(crc32_update(crc32_update(0, header), digest.encode("utf-8")))


def parse_file_digest(s: str) -> tuple[str, str]:
    """Split a whole-file digest into ``(algorithm, value)``; the value is normalised.

    Accepted: ``crc32:<decimal>``, ``sha256:<64 hex>``, ``sha512:<128 hex>`` (hex is returned
    lowercase). Anything else raises ValueError naming the accepted forms.
    """
    if not isinstance(s, str):
        raise ValueError(f"invalid digest {s!r}: expected a string")
    if s.startswith("crc32:"):
        return "crc32", str(parse_crc32_digest(s))
    match = _SHA_DIGEST.fullmatch(s)
    if match is not None and len(match.group("hex")) == _BLOB_HEX_LENGTH[match.group("alg")]:
        return match.group("alg"), match.group("hex").lower()
    raise ValueError(f"invalid digest {s[:200]!r}: expected crc32:<decimal>, sha256:<64 hex> or sha512:<128 hex>")


class _Hasher(Protocol):
    def update(self, data: _Bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32Hasher:
    """CRC-32 with the hashlib interface; its "hexdigest" is the decimal Dragonfly uses."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: _Bytes, /) -> None:
        self._crc = crc32_update(self._crc, data)

    def hexdigest(self) -> str:
        return str(self._crc)


class FileDigester:
    """Check a whole file against ``Download.digest`` while its bytes stream past.

    >>> d = FileDigester("crc32:907060870"); d.update(b"hel"); d.update(b"lo"); d.matches()
    True
    """

    def __init__(self, expected: str) -> None:
        self.algorithm, self.expected = parse_file_digest(expected)
        self._hasher: _Hasher
        if self.algorithm == "crc32":
            self._hasher = _Crc32Hasher()
        else:
            self._hasher = hashlib.new(self.algorithm)

    def update(self, data: _Bytes) -> None:
        """Feed the next bytes of the file, in order."""
        self._hasher.update(data)

    def hexdigest(self) -> str:
        """Value of the digest so far (decimal for crc32, lowercase hex otherwise)."""
        return self._hasher.hexdigest()

    def digest(self) -> str:
        """Digest so far in ``<algorithm>:<value>`` form."""
        return f"{self.algorithm}:{self.hexdigest()}"

    def matches(self) -> bool:
        """Whether the bytes fed so far have the expected digest."""
        return self.hexdigest() == self.expected

    def verify(self) -> None:
        """Raise :class:`DigestMismatch` unless :meth:`matches`."""
        if not self.matches():
            raise DigestMismatch(f"digest mismatch: expected {self.algorithm}:{self.expected}, got {self.digest()}")
