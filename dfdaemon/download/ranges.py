"""Ranged downloads: which bytes a request asks for, and which pieces hold them.

A request names its bytes with ``Download.range`` or, when that is unset, with an HTTP ``Range`` header among its
request headers, converted as upstream does once the content's length is known: RFC 9110 byte ranges parsed
strictly (no blanks around the ``=``, no leading zeros or signs), an end past the content clipped to its last
byte, a suffix ``-N`` counted from the end (one longer than the content refused, as upstream does, or all of it for
the forward proxy's HTTP clients, as RFC 9110 reads it), and of several ranges only the first. Any header that does
not parse or select a byte is refused (FAILED_PRECONDITION). The header never reaches the origin: every origin
request asks for the bytes the daemon needs. A ranged request shares the whole file's task id, so the pieces it
fetches serve any later request of that file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dfdaemon import ids
from dfdaemon.ids import PieceSpan

RANGE_HEADER = "range"
_UNIT = "bytes="
# One decimal number as the strict parser takes it: no sign, no leading zero (except "0" itself).
_NUMBER = re.compile(r"0|[1-9][0-9]*")
_MAX_U64 = 2**64 - 1


class RangeNotSatisfiable(ValueError):
    """A ``Range`` header that does not parse, or selects no byte of the content (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes from ``start`` (``common.v2.Range``)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        """First byte after the range."""
        return self.start + self.length


@dataclass(frozen=True)
class _Spec:
    """One range of a header before the content's length is known: ``first-last``, ``first-`` or ``-suffix``."""

    first: int | None
    last: int | None


def range_header(headers: Mapping[str, str]) -> str | None:
    """The value of the request's ``Range`` header, whatever its case; None without one."""
    for name, value in headers.items():
        if name.lower() == RANGE_HEADER:
            return value
    return None


def origin_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers as the origin gets them: without ``Range``, which each origin request sets itself."""
    return {name: value for name, value in headers.items() if name.lower() != RANGE_HEADER}


def check_range_header(value: str) -> None:
    """Refuse a header that can never parse, before any work is done for it."""
    _parse(value)


def resolve(value: str, content_length: int, *, long_suffix_is_whole: bool = False) -> ByteRange:
    """The first range a ``Range`` header selects in content of ``content_length`` bytes; a suffix longer than
    the content is refused unless ``long_suffix_is_whole`` (then it selects all of it, as RFC 9110 reads it)."""
    ranges = [_bounds(spec, value, content_length, long_suffix_is_whole) for spec in _parse(value)]
    for i, (first, last) in enumerate(ranges):
        if first > last:
            raise RangeNotSatisfiable(f"Range {value!r} selects no byte of the {content_length}-byte content")
        for other_first, other_last in ranges[i + 1 :]:
            if first <= other_last and other_first <= last:
                raise RangeNotSatisfiable(f"Range {value!r} has overlapping ranges")
    first, last = ranges[0]
    return ByteRange(first, last - first + 1)


def effective_range(
    byte_range: ByteRange | None, headers: Mapping[str, str], content_length: int, *, long_suffix_is_whole: bool = False
) -> ByteRange | None:
    """The bytes a request asks for: ``Download.range`` when set, else its ``Range`` header, else all (None)."""
    if byte_range is not None:
        return byte_range
    value = range_header(headers)
    return None if value is None else resolve(value, content_length, long_suffix_is_whole=long_suffix_is_whole)


def covering_pieces(content_length: int, piece_length: int, byte_range: ByteRange | None) -> list[PieceSpan]:
    """The pieces that hold the range (every piece without one); a range past the content is refused."""
    if byte_range is None:
        return ids.pieces_for(content_length, piece_length)
    if byte_range.length <= 0:
        raise RangeNotSatisfiable("download.range.length must be positive")
    if byte_range.end > content_length:
        raise RangeNotSatisfiable(
            f"download.range {byte_range.start}+{byte_range.length} is past the end of "
            f"the {content_length}-byte content"
        )
    return ids.pieces_for(content_length, piece_length, byte_range.start, byte_range.length)


def _parse(value: str) -> list[_Spec]:
    """The ranges of a header, syntax only (a strict RFC 9110 reading, as upstream's parser does)."""
    unit, separator, rest = value.partition(_UNIT)
    if unit or not separator:
        raise RangeNotSatisfiable(f"Range {value[:100]!r} does not start with {_UNIT!r}")
    if rest[:1].isspace():
        raise RangeNotSatisfiable(f"Range {value[:100]!r} has blanks after {_UNIT!r}")
    return [_spec(part, value) for part in rest.split(",")]


def _spec(part: str, value: str) -> _Spec:
    # One blank may lead a range after a comma; none may trail it or sit inside it.
    if part[-1:].isspace() or sum(char.isspace() for char in part) > 1:
        raise RangeNotSatisfiable(f"Range {value[:100]!r} has blanks inside a range")
    first, dash, last = part.strip().partition("-")
    if not dash:
        raise RangeNotSatisfiable(f"Range {value[:100]!r} has a range without '-'")
    if not first:
        suffix = _number(last, value)
        if suffix == 0:
            raise RangeNotSatisfiable(f"Range {value[:100]!r} asks for the last 0 bytes")
        return _Spec(None, suffix)
    return _Spec(_number(first, value), _number(last, value) if last else None)


def _number(text: str, value: str) -> int:
    if not _NUMBER.fullmatch(text) or int(text) > _MAX_U64:
        raise RangeNotSatisfiable(f"Range {value[:100]!r} has a bad position {text[:30]!r}")
    return int(text)


def _bounds(spec: _Spec, value: str, content_length: int, long_suffix_is_whole: bool) -> tuple[int, int]:
    """The inclusive byte positions of one range in the content: an end past it clipped, a suffix counted back."""
    last_byte = max(content_length - 1, 0)
    if spec.first is None:
        assert spec.last is not None
        if spec.last > content_length and not (long_suffix_is_whole and content_length):
            raise RangeNotSatisfiable(f"Range {value[:100]!r} asks for more than the {content_length}-byte content")
        return max(content_length - spec.last, 0), last_byte
    return spec.first, last_byte if spec.last is None else min(spec.last, last_byte)
