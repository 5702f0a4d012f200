"""Vortex packets, byte for byte as upstream's ``vortex-protocol`` lays them out (every integer big-endian).

A packet is a 6-byte header (``id u8``, ``tag u8``, ``length u32``) and ``length`` bytes of value. Only the
packets an ordinary task uses are here: DownloadPiece (child to parent), PieceContent (parent to child; the
piece's raw bytes follow the value and are not counted in ``length``) and Error. Decoders refuse anything whose
lengths do not add up, so a confused or hostile peer costs a clear error, never a huge allocation.
"""

from __future__ import annotations

import random
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size


class Tag(IntEnum):
    DOWNLOAD_PIECE = 0
    PIECE_CONTENT = 1
    CLOSE = 254
    ERROR = 255


class ErrorCode(IntEnum):
    UNKNOWN = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    INTERNAL = 3


# The 64-character lowercase hex task id, then the piece number.
DOWNLOAD_PIECE_SIZE = 68
# Upper bounds a receiver enforces before reading a value: metadata is a few strings of ids and digests.
MAX_METADATA_SIZE = 64 * 1024
MAX_ERROR_SIZE = 64 * 1024

_TASK_ID = re.compile(rb"[0-9a-f]{64}")
_U32 = struct.Struct(">I")
_PIECE_SPAN = struct.Struct(">IQQ")  # number, offset, length
_PIECE_TAIL = struct.Struct(">BQq")  # traffic type, cost (s), created_at (Unix s)
# Fixed bytes of the metadata: the span, two string lengths and the tail (M = 45 + digest + parent id).
METADATA_FIXED_SIZE = _PIECE_SPAN.size + 2 * _U32.size + _PIECE_TAIL.size


class ProtocolError(Exception):
    """Bytes that are no valid vortex packet; the message says what was wrong."""


@dataclass(frozen=True)
class Header:
    tag: int
    length: int
    id: int = 0


def encode_header(tag: int, length: int, packet_id: int | None = None) -> bytes:
    """A header; the id is random as upstream's (receivers ignore it)."""
    return HEADER.pack(random.getrandbits(8) if packet_id is None else packet_id, tag, length)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"a header is {HEADER_SIZE} bytes, got {len(data)}")
    packet_id, tag, length = HEADER.unpack(data)
    return Header(tag=tag, length=length, id=packet_id)


def value_limit(tag: int) -> int:
    """The largest value a receiver accepts for a tag; unknown tags are refused."""
    if tag == Tag.DOWNLOAD_PIECE:
        return DOWNLOAD_PIECE_SIZE
    if tag == Tag.PIECE_CONTENT:
        return _U32.size + MAX_METADATA_SIZE
    if tag == Tag.ERROR:
        return 1 + MAX_ERROR_SIZE
    if tag == Tag.CLOSE:
        return 0
    raise ProtocolError(f"unknown packet tag {tag}")


@dataclass(frozen=True)
class DownloadPiece:
    """A child asks for one piece of a task."""

    task_id: str
    number: int

    def encode(self, packet_id: int | None = None) -> bytes:
        """Header and value: 74 bytes."""
        task = self.task_id.encode("ascii", "replace")
        if not _TASK_ID.fullmatch(task):
            raise ValueError(f"task id {self.task_id!r} is not 64 lowercase hex characters")
        _check_range("piece number", self.number, 32)
        return encode_header(Tag.DOWNLOAD_PIECE, DOWNLOAD_PIECE_SIZE, packet_id) + task + _U32.pack(self.number)

    @classmethod
    def decode(cls, value: bytes | bytearray | memoryview) -> DownloadPiece:
        if len(value) != DOWNLOAD_PIECE_SIZE:
            raise ProtocolError(f"a DownloadPiece value is {DOWNLOAD_PIECE_SIZE} bytes, got {len(value)}")
        task = bytes(value[:64])
        if not _TASK_ID.fullmatch(task):
            raise ProtocolError("the task id of a DownloadPiece is not 64 lowercase hex characters")
        (number,) = _U32.unpack_from(value, 64)
        return cls(task_id=task.decode("ascii"), number=number)


@dataclass(frozen=True)
class PieceMetadata:
    """What a parent says about the piece whose ``length`` raw bytes follow the PieceContent value."""

    number: int
    offset: int
    length: int
    digest: str
    parent_id: str = ""
    traffic_type: int = 1  # upstream always sends REMOTE_PEER
    cost: int = 0  # whole seconds
    created_at: int = 0  # Unix seconds

    def encode(self, packet_id: int | None = None) -> bytes:
        """Header and value (``M u32`` then the metadata); the piece's bytes are sent after this."""
        for name, field, bits in (
            ("number", self.number, 32),
            ("offset", self.offset, 64),
            ("length", self.length, 64),
            ("traffic type", self.traffic_type, 8),
            ("cost", self.cost, 64),
        ):
            _check_range(name, field, bits)
        if not -(2**63) <= self.created_at < 2**63:
            raise ValueError(f"created_at {self.created_at} does not fit an i64")
        digest, parent = self.digest.encode(), self.parent_id.encode()
        metadata = b"".join(
            (
                _PIECE_SPAN.pack(self.number, self.offset, self.length),
                _U32.pack(len(digest)),
                digest,
                _U32.pack(len(parent)),
                parent,
                _PIECE_TAIL.pack(self.traffic_type, self.cost, self.created_at),
            )
        )
        if len(metadata) > MAX_METADATA_SIZE:
            raise ValueError(f"piece metadata of {len(metadata)} bytes exceeds {MAX_METADATA_SIZE}")
        value = _U32.pack(len(metadata)) + metadata
        return encode_header(Tag.PIECE_CONTENT, len(value), packet_id) + value

    @classmethod
    def decode(cls, value: bytes | bytearray | memoryview) -> PieceMetadata:
        """Decode a PieceContent value; bytes past the known fields inside the metadata are ignored."""
        view = memoryview(value)
        if len(view) < _U32.size:
            raise ProtocolError("a PieceContent value is shorter than its metadata length")
        (size,) = _U32.unpack_from(view)
        if size != len(view) - _U32.size:
            raise ProtocolError(f"PieceContent metadata says {size} bytes but {len(view) - _U32.size} follow")
        reader = _Reader(view[_U32.size :])
        number, offset, length = reader.unpack(_PIECE_SPAN)
        digest = reader.text("digest")
        parent_id = reader.text("parent id")
        traffic_type, cost, created_at = reader.unpack(_PIECE_TAIL)
        return cls(number, offset, length, digest, parent_id, traffic_type, cost, created_at)


@dataclass(frozen=True)
class Error:
    """A parent's refusal: a code and a message."""

    code: int
    message: str

    def encode(self, packet_id: int | None = None) -> bytes:
        _check_range("error code", self.code, 8)
        # Cut to the limit on a character boundary, so the receiver can still decode it.
        message = self.message.encode()[:MAX_ERROR_SIZE].decode(errors="ignore").encode()
        return encode_header(Tag.ERROR, 1 + len(message), packet_id) + bytes((self.code,)) + message

    @classmethod
    def decode(cls, value: bytes | bytearray | memoryview) -> Error:
        if not value:
            raise ProtocolError("an Error value has no code")
        try:
            message = bytes(value[1:]).decode()
        except UnicodeDecodeError:
            raise ProtocolError("an Error message is not UTF-8") from None
        return cls(code=value[0], message=message)

    @property
    def code_name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"


class _Reader:
    """Reads fields off a metadata buffer, refusing to run past its end."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.position = 0

    def take(self, size: int, what: str) -> memoryview:
        if self.position + size > len(self.view):
            raise ProtocolError(f"PieceContent metadata ends inside its {what}")
        part = self.view[self.position : self.position + size]
        self.position += size
        return part

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return tuple(layout.unpack(self.take(layout.size, "fixed fields")))

    def text(self, what: str) -> str:
        (size,) = _U32.unpack(self.take(_U32.size, f"{what} length"))
        try:
            return bytes(self.take(size, what)).decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"the {what} of a PieceContent is not UTF-8") from None


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name} {value} does not fit {bits} unsigned bits")
