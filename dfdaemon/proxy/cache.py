"""Bytes of a cached blob to a client by ``sendfile``, and the CRC check that runs beside it.

A cache hit must cost no more than reading the file: the kernel copies the bytes from the page cache to the socket.
Python checks, in one worker thread, that the pieces still match the CRCs they were stored with, but only when the
file changed since it was last found intact (or since its download matched the blob's digest): on a loaded 2-core
node that check costs as much CPU as the client's own hashing.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from dfdaemon.ids import PieceSpan, crc32_update
from dfdaemon.storage import PieceRecord, Storage

# A CRC check reads a piece this much at a time into one reused buffer.
_CHECK_CHUNK = 1024 * 1024
# Content files remembered as intact, at most (the least recently served go first).
CHECKED_LIMIT = 4096

# What identifies one state of a file: device, inode, size, modification and change times (ns).
FileState = tuple[int, int, int, int, int]


def open_content(path: Path) -> tuple[BinaryIO, FileState]:
    """Open a content file and say which state of it was opened (blocking: run it in a thread)."""
    content = path.open("rb")
    try:
        stat = os.fstat(content.fileno())
        os.posix_fadvise(content.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read-ahead when not in the page cache
    except OSError:
        content.close()
        raise
    return content, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def file_state(path: Path) -> FileState:
    """The state of a file (blocking: run it in a thread)."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class IntactFiles:
    """Tasks whose content file was found intact, and in which state: the same state needs no new CRC check.

    A write through a hard link, a truncation or a re-created file changes the state (times, size, inode). Linux
    6.13+ gives a file stat'ed since its last change a fine-grained time at the next one, so even a write in the same
    clock tick shows; older kernels may miss a write within one tick of the state being taken.
    """

    def __init__(self, limit: int = CHECKED_LIMIT) -> None:
        self.limit = limit
        self._states: OrderedDict[str, FileState] = OrderedDict()

    def intact(self, task_id: str, state: FileState) -> bool:
        if self._states.get(task_id) != state:
            return False
        self._states.move_to_end(task_id)
        return True

    def remember(self, task_id: str, state: FileState) -> None:
        self._states[task_id] = state
        self._states.move_to_end(task_id)
        while len(self._states) > self.limit:
            self._states.popitem(last=False)


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


async def write_stored_piece(
    response: web.StreamResponse, storage: Storage, task_id: str, piece: PieceSpan, start: int, end: int
) -> int:
    """Write the bytes of a stored piece that fall in ``[start, end)``, read back with their CRC checked (the bytes
    on disk may have changed since they were written); returns the offset that got to."""
    _, data = await storage.read_piece(task_id, piece.number)
    begin, stop = max(start, piece.offset), min(end, piece.offset + piece.length)
    if begin < stop:
        await response.write(memoryview(data)[begin - piece.offset : stop - piece.offset])
    return stop


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
                crc = crc32_update(crc, view[:read])
                position += read
            if position != end or crc != piece.crc:
                rotten.append(piece)
    return rotten
