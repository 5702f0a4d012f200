"""The vortex codec against upstream's layout: PROTOCOL.md's worked bytes, round trips, and refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfdaemon.vortex.codec import (
    DOWNLOAD_PIECE_SIZE,
    MAX_METADATA_SIZE,
    DownloadPiece,
    Error,
    ErrorCode,
    PieceMetadata,
    ProtocolError,
    Tag,
    decode_header,
    value_limit,
)

TASK_A = "a" * 64


def test_download_piece_matches_the_worked_bytes() -> None:
    encoded = DownloadPiece(TASK_A, 7).encode(packet_id=0x2A)
    expected = bytes.fromhex("2a 00 00000044") + b"\x61" * 64 + bytes.fromhex("00000007")
    assert encoded == expected
    assert len(encoded) == 74
    header = decode_header(encoded[:6])
    assert (header.id, header.tag, header.length) == (0x2A, Tag.DOWNLOAD_PIECE, DOWNLOAD_PIECE_SIZE)
    assert DownloadPiece.decode(encoded[6:]) == DownloadPiece(TASK_A, 7)


WORKED_PIECE_CONTENT = bytes.fromhex(
    "01 00000040"
    "0000003c"
    "00000007"
    "0000000001c00000"
    "0000000000400000"
    "0000000f"
    "6372633332 3a 323839383832323138"
    "00000000"
    "01"
    "0000000000000000"
    "000000006955b900"
)


def test_piece_content_header_matches_the_worked_bytes() -> None:
    metadata = PieceMetadata(
        number=7, offset=29360128, length=4194304, digest="crc32:289882218", cost=0, created_at=1767225600
    )
    encoded = metadata.encode(packet_id=0x99)
    assert encoded[0] == 0x99  # any id
    assert encoded[1:] == WORKED_PIECE_CONTENT
    header = decode_header(encoded[:6])
    assert (header.tag, header.length) == (Tag.PIECE_CONTENT, 64)
    assert PieceMetadata.decode(encoded[6:]) == metadata


def test_error_packet_layout() -> None:
    encoded = Error(ErrorCode.NOT_FOUND, f"piece {TASK_A}-7 not found").encode(packet_id=1)
    message = f"piece {TASK_A}-7 not found".encode()
    assert encoded == bytes([1, 255]) + (1 + len(message)).to_bytes(4, "big") + b"\x02" + message
    assert Error.decode(encoded[6:]) == Error(2, f"piece {TASK_A}-7 not found")


task_ids = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(task_ids, u32)
def test_download_piece_round_trips(task_id: str, number: int) -> None:
    encoded = DownloadPiece(task_id, number).encode()
    assert DownloadPiece.decode(encoded[6:]) == DownloadPiece(task_id, number)


@given(
    st.builds(
        PieceMetadata,
        number=u32,
        offset=u64,
        length=u64,
        digest=st.text(max_size=40),
        parent_id=st.text(max_size=200),
        traffic_type=st.integers(0, 255),
        cost=u64,
        created_at=st.integers(-(2**63), 2**63 - 1),
    )
)
def test_piece_metadata_round_trips(metadata: PieceMetadata) -> None:
    encoded = metadata.encode()
    digest, parent = metadata.digest.encode(), metadata.parent_id.encode()
    assert decode_header(encoded[:6]).length == 49 + len(digest) + len(parent) == len(encoded) - 6
    assert PieceMetadata.decode(encoded[6:]) == metadata


@given(st.integers(0, 255), st.text(max_size=300))
def test_error_round_trips(code: int, message: str) -> None:
    assert Error.decode(Error(code, message).encode()[6:]) == Error(code, message)


def test_metadata_decoder_ignores_bytes_left_in_the_metadata() -> None:
    value = bytearray(WORKED_PIECE_CONTENT[5:])
    value[0:4] = (0x3C + 3).to_bytes(4, "big")
    value += b"\x00\x01\x02"
    assert PieceMetadata.decode(bytes(value)).digest == "crc32:289882218"


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 24, 30, 40, 63])
def test_truncated_metadata_is_refused(cut: int) -> None:
    value = WORKED_PIECE_CONTENT[5:][:cut]
    with pytest.raises(ProtocolError):
        PieceMetadata.decode(value)


def test_metadata_whose_length_does_not_match_its_value_is_refused() -> None:
    value = bytearray(WORKED_PIECE_CONTENT[5:])
    with pytest.raises(ProtocolError, match="says 60 bytes but 61 follow"):
        PieceMetadata.decode(bytes(value) + b"\x00")


def test_a_string_length_running_past_the_metadata_is_refused() -> None:
    value = bytearray(WORKED_PIECE_CONTENT[5:])
    value[24:28] = (10_000).to_bytes(4, "big")  # the digest length
    with pytest.raises(ProtocolError, match="ends inside its digest"):
        PieceMetadata.decode(bytes(value))


def test_a_digest_that_is_not_utf8_is_refused() -> None:
    value = bytearray(WORKED_PIECE_CONTENT[5:])
    value[28] = 0xFF
    with pytest.raises(ProtocolError, match="not UTF-8"):
        PieceMetadata.decode(bytes(value))


@pytest.mark.parametrize(
    "value",
    [b"", b"a" * 64, b"a" * 64 + b"\x00\x00\x00\x07\x00", b"A" * 64 + b"\x00\x00\x00\x07", b"g" * 64 + b"\x00" * 4],
)
def test_download_piece_decoder_refuses_garbage(value: bytes) -> None:
    with pytest.raises(ProtocolError):
        DownloadPiece.decode(value)


def test_headers_and_limits() -> None:
    with pytest.raises(ProtocolError):
        decode_header(b"\x00\x00\x00")
    assert value_limit(Tag.DOWNLOAD_PIECE) == 68
    assert value_limit(Tag.PIECE_CONTENT) == 4 + MAX_METADATA_SIZE
    with pytest.raises(ProtocolError, match="unknown packet tag 9"):
        value_limit(9)
    with pytest.raises(ProtocolError, match="no code"):
        Error.decode(b"")


def test_encoders_refuse_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="lowercase hex"):
        DownloadPiece("A" * 64, 1).encode()
    with pytest.raises(ValueError, match="piece number"):
        DownloadPiece(TASK_A, 2**32).encode()
    with pytest.raises(ValueError, match="offset"):
        PieceMetadata(number=0, offset=-1, length=0, digest="").encode()
    with pytest.raises(ValueError, match="exceeds"):
        PieceMetadata(number=0, offset=0, length=0, digest="x" * MAX_METADATA_SIZE).encode()
