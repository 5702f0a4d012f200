"""The ``Range`` header conversion and the pieces a range covers, as upstream computes them.

Vectors: upstream dfdaemon parses the header with the ``http-range-header`` crate (0.4.2 in its Cargo.lock) and
takes the first range; the cases below are that crate's documented examples and RFC 9110's, with the results
worked out by hand from the crate's rules (end clipped to the last byte, suffix counted back, strict numbers).
"""

from __future__ import annotations

import pytest

from dfdaemon.download.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    check_range_header,
    covering_pieces,
    effective_range,
    origin_headers,
    range_header,
    resolve,
)
from dfdaemon.ids import PieceSpan

SIZE = 10_000
MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-499", ByteRange(0, 500)),  # RFC 9110 14.1.2 examples
        ("bytes=500-999", ByteRange(500, 500)),
        ("bytes=-500", ByteRange(9500, 500)),
        ("bytes=9500-", ByteRange(9500, 500)),
        ("bytes=0-0,-1", ByteRange(0, 1)),  # several ranges: the first
        ("bytes=0-15, 20-30", ByteRange(0, 16)),  # one blank after a comma is allowed
        ("bytes=20-30,0-15", ByteRange(20, 11)),  # out of order, not overlapping: still the first
        ("bytes=0-20000", ByteRange(0, SIZE)),  # an end past the content is clipped to its last byte
        ("bytes=9999-9999", ByteRange(9999, 1)),
        ("bytes=-10000", ByteRange(0, SIZE)),  # a suffix of the whole content
        ("bytes=0-18446744073709551615", ByteRange(0, SIZE)),  # u64::MAX parses
    ],
)
def test_range_header_resolves_as_upstream(header: str, expected: ByteRange) -> None:
    check_range_header(header)
    assert resolve(header, SIZE) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-15 ",  # trailing blank
        "bytes= 0-15",  # blank after '='
        "bytes=00-15",  # leading zero
        "bytes=+0-15",  # sign
        "bytes=-12-15",  # negative start reads as a suffix with a bad end
        "bytes=1",  # no dash
        "bytes=-",  # neither end
        "bytes=-0",  # a zero suffix
        "bytes=0-5,",  # an empty range
        "bytes=0 -5",  # a blank inside a range
        "bytes=0-18446744073709551616",  # past u64
        "Bytes=0-5",  # the unit is case-sensitive
        "items=0-5",
        "0-5",
        "",
    ],
)
def test_malformed_range_headers_are_refused_before_any_work(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        check_range_header(header)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=10000-",  # starts past the content
        "bytes=20000-30000",
        "bytes=10-5",  # reversed
        "bytes=-10001",  # a suffix longer than the content
        "bytes=0-15, 10-20",  # overlapping ranges
    ],
)
def test_range_headers_selecting_nothing_are_refused_once_the_length_is_known(header: str) -> None:
    check_range_header(header)  # syntax alone is fine
    with pytest.raises(RangeNotSatisfiable):
        resolve(header, SIZE)


def test_a_long_suffix_is_all_of_the_content_when_asked_to_read_it_as_rfc_9110_does() -> None:
    assert resolve("bytes=-10001", SIZE, long_suffix_is_whole=True) == ByteRange(0, SIZE)
    assert resolve("bytes=-500", SIZE, long_suffix_is_whole=True) == ByteRange(9500, 500)
    assert effective_range(None, {"Range": "bytes=-20000"}, SIZE, long_suffix_is_whole=True) == ByteRange(0, SIZE)
    with pytest.raises(RangeNotSatisfiable):  # empty content has no byte to select
        resolve("bytes=-1", 0, long_suffix_is_whole=True)
    with pytest.raises(RangeNotSatisfiable):  # the rest of the reading stays strict
        resolve("bytes=10000-", SIZE, long_suffix_is_whole=True)


def test_download_range_wins_over_the_header_and_the_header_is_found_in_any_case() -> None:
    headers = {"X-Other": "1", "rAnGe": "bytes=100-199"}
    assert range_header(headers) == "bytes=100-199"
    assert effective_range(None, headers, SIZE) == ByteRange(100, 100)
    assert effective_range(ByteRange(5, 6), {"Range": "not a range"}, SIZE) == ByteRange(5, 6)
    assert effective_range(None, {"X-Other": "1"}, SIZE) is None


def test_the_origin_never_gets_the_callers_range() -> None:
    assert origin_headers({"Authorization": "Bearer t", "RANGE": "bytes=0-1"}) == {"Authorization": "Bearer t"}


def test_a_range_covers_the_pieces_it_overlaps_as_upstream_calculate_interested() -> None:
    # 10 MB from an unaligned start in 4 MiB pieces of a 1 GB file: pieces 2 to 4.
    content, piece = 10**9, 4 * MIB
    start, length = 3 * piece - 1000, 10 * 10**6
    covering = covering_pieces(content, piece, ByteRange(start, length))
    assert [span.number for span in covering] == [2, 3, 4, 5]
    assert covering[0].offset <= start and covering[-1].end >= start + length
    assert covering_pieces(content, piece, ByteRange(0, 1)) == [PieceSpan(0, 0, piece)]
    last = covering_pieces(content, piece, ByteRange(content - 1, 1))
    assert last == [PieceSpan(238, 238 * piece, content - 238 * piece)]  # the short last piece
    assert len(covering_pieces(content, piece, None)) == 239


@pytest.mark.parametrize("byte_range", [ByteRange(0, 0), ByteRange(9_999, 2), ByteRange(10_000, 1)])
def test_a_download_range_past_the_content_or_empty_is_refused(byte_range: ByteRange) -> None:
    with pytest.raises(RangeNotSatisfiable):
        covering_pieces(SIZE, 4096, byte_range)
