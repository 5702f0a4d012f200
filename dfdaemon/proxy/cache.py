"""Bytes of a cached blob to a client by ``sendfile``, and the CRC check that runs beside it.

A cache hit must cost no more than reading the file: the kernel copies the bytes from the page cache to the socket,
and Python only checks, in one worker thread, that the pieces still match the CRCs they were stored with.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from dfdaemon.storage import PieceRecord

# A CRC check reads a piece this much at a time into one reused buffer.
_CHECK_CHUNK = 1024 * 1024


async def send_range(request: web.Request, content: BinaryIO, offset: int, count: int) -> None:
    """Send ``count`` bytes of ``content`` from ``offset`` after what the response wrote so far.

    ``loop.sendfile`` waits for the transport's buffer to drain first, so the order of the body holds; under TLS it
    falls back to reading and writing.
    """
    if count <= 0:
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client left")
    await asyncio.get_running_loop().sendfile(transport, content, offset, count)


def rotten_pieces(path: Path, pieces: Sequence[PieceRecord]) -> list[PieceRecord]:
    """The pieces whose bytes in ``path`` no longer match their stored CRC (blocking: run it in a thread)."""
    rotten: list[PieceRecord] = []
    buffer = bytearray(_CHECK_CHUNK)
    with path.open("rb", buffering=0) as f:
        for piece in pieces:
            crc, position, end = 0, piece.offset, piece.offset + piece.length
            while position < end:
                view = memoryview(buffer)[: min(_CHECK_CHUNK, end - position)]
                read = os.preadv(f.fileno(), [view], position)
                if read == 0:
                    break
                crc = zlib.crc32(view[:read], crc)
                position += read
            if position != end or crc != piece.crc:
                rotten.append(piece)
    return rotten
