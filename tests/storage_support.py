"""Helpers for storage and GC tests: a controllable clock and filling tasks through the storage API."""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path

from dfdaemon.download.peering import FetchedPiece
from dfdaemon.ids import pieces_for, task_id
from dfdaemon.storage import IncomingPiece, Storage, TaskInfo, TaskRecord


class FakeClock:
    """Wall-clock seconds that only move when the test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_id(name: str) -> str:
    return task_id(f"http://origin.test/{name}")


def seeded_bytes(seed: str, size: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed: no two pieces (or offsets) share content, so
    a piece read from the wrong place changes every digest, and a failing run can be repeated byte for byte."""
    rng = random.Random(seed)
    chunk = 1 << 27  # randbytes is fast but takes fewer than 2**28 bytes per call
    return b"".join(rng.randbytes(min(chunk, size - start)) for start in range(0, size, chunk))


def payload(name: str, size: int) -> bytes:
    """A task's content: seeded random bytes that differ per name."""
    return seeded_bytes(name, size)


async def fill(
    storage: Storage, name: str, size: int, piece_length: int = 64 * 1024, finish: bool = True
) -> TaskRecord:
    """Download ``name`` into the cache piece by piece, the way the download path writes."""
    data = payload(name, size)
    tid = make_id(name)
    info = TaskInfo(url=f"http://origin.test/{name}", piece_length=piece_length, content_length=size)
    async with storage.download(tid, info) as writer:
        for piece in pieces_for(size, piece_length):
            await writer.write_piece(piece.number, piece.offset, data[piece.offset : piece.end])
        if finish:
            return await writer.finish()
    task = await storage.get_task(tid)
    assert task is not None
    return task


async def read_all(storage: Storage, tid: str) -> bytes:
    pieces = await storage.pieces(tid)
    out = b""
    async with storage.upload(tid) as reader:
        for piece in pieces:
            _, data = await reader.read_piece(piece.number)
            out += data
    return out


def du_bytes(path: Path) -> int:
    """What ``du -sb`` says about a directory."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


async def received(fetched: FetchedPiece) -> bytes:
    """A fetched piece's bytes, received in a worker thread as the collector's writer receives them, then done."""
    content = fetched.content
    try:
        if not isinstance(content, IncomingPiece):
            return bytes(content)
        incoming = content

        def take() -> bytes:
            buffer = bytearray(incoming.length)
            view, filled = memoryview(buffer), 0
            while filled < len(buffer):
                filled += incoming.read_into(view[filled:])
            return bytes(buffer)

        return await asyncio.to_thread(take)
    finally:
        fetched.done()
