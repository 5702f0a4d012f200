"""Content files: one file per task under ``content/tasks/{id[0:3]}/{id}``, pieces at their offsets.

All functions block and are meant to run in a worker thread. Paths are only ever built from
validated task ids, so nothing derived from a request escapes the storage directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from dfdaemon.ids import validate_task_id

_READ_CHUNK = 1024 * 1024
# Buffers one pwritev may take (Linux's IOV_MAX).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
# Bytes per write call. The page cache backs a write with folios up to about its size. On a VM that hands free
# memory back to its host (virtio-balloon free page reporting), the large free blocks are the ones handed back, and
# filling a folio carved from one faults it in from the host: 256 MiB written 1 or 2 MiB per call took 0.4-1.0 s
# of CPU on a 2-core VM, against 0.07-0.08 s written 256 KiB per call (scripts/bench_storage_writes.py).
_WRITE_LIMIT = 256 * 1024
# Bytes a thread receives from a socket and then writes at a time: small enough to stay in the CPU's cache between
# the two, big enough that the thread seldom waits (an ad-hoc measure of dfget back to source, 256 MiB, 5 rounds:
# 0.34 s at 256 KiB, 0.29 s from 512 KiB to 2 MiB).
BLOCK = 512 * 1024
_blocks = threading.local()


def thread_block() -> memoryview:
    """This thread's receive buffer of ``BLOCK`` bytes, made on first use and reused for every piece after."""
    block: memoryview | None = getattr(_blocks, "block", None)
    if block is None:
        block = _blocks.block = memoryview(bytearray(BLOCK))
    return block


class ContentStore:
    """The content directory of one storage root."""

    def __init__(self, root: Path) -> None:
        self.root = root / "content" / "tasks"

    def path(self, task_id: str) -> Path:
        validate_task_id(task_id)
        return self.root / task_id[:3] / task_id

    def create(self, task_id: str) -> None:
        """Make sure the task's file exists (empty for a new task)."""
        path = self.path(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)

    def size(self, task_id: str) -> int:
        """Apparent size of the task's file (what ``du -b`` counts), 0 when it does not exist."""
        try:
            return self.path(task_id).stat().st_size
        except FileNotFoundError:
            return 0

    def sizes(self, task_ids: list[str]) -> dict[str, int | None]:
        """Apparent size of each task's file, None where it is no regular file: one thread hop for a whole cache."""
        result: dict[str, int | None] = {}
        for task_id in task_ids:
            try:
                st = self.path(task_id).stat()
            except FileNotFoundError:
                result[task_id] = None
                continue
            result[task_id] = st.st_size if stat.S_ISREG(st.st_mode) else None
        return result

    def open_for_write(self, task_id: str) -> int:
        return os.open(self.path(task_id), os.O_WRONLY | os.O_CREAT, 0o644)

    def read_piece(self, task_id: str, offset: int, length: int) -> bytes:
        """Read a piece's bytes; short reads (a truncated file) return fewer bytes for the caller's CRC check."""
        fd = os.open(self.path(task_id), os.O_RDONLY)
        try:
            chunks = []
            remaining = length
            position = offset
            while remaining > 0:
                chunk = os.pread(fd, min(remaining, 16 * _READ_CHUNK), position)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
                position += len(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def read_into(self, task_id: str, offset: int, target: memoryview) -> int:
        """Fill ``target`` with the bytes at ``offset``; returns how many there were (fewer when the file is short)."""
        fd = os.open(self.path(task_id), os.O_RDONLY)
        try:
            filled = 0
            while filled < len(target):
                read = os.preadv(fd, [target[filled:]], offset + filled)
                if not read:
                    break
                filled += read
        finally:
            os.close(fd)
        return filled

    def delete(self, task_id: str) -> int:
        """Delete the task's file; returns the bytes the filesystem gets back: its size, or 0 while another hard
        link (an output file) keeps the same bytes on disk."""
        path = self.path(task_id)
        freed = 0
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            freed = st.st_size if st.st_nlink <= 1 else 0
            path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only succeeds when the shard directory became empty
        return freed

    def scan(self) -> Iterator[tuple[Path, str | None]]:
        """Every file under the content root, with the task id its name denotes (None when it is no task id)."""
        if not self.root.is_dir():
            return
        for shard in self.root.iterdir():
            if not shard.is_dir() or shard.is_symlink():
                yield shard, None
                continue
            for entry in shard.iterdir():
                name = entry.name
                valid = entry.is_file() and not entry.is_symlink() and name[:3] == shard.name and _is_task_id(name)
                yield entry, name if valid else None

    def overhead_bytes(self) -> int:
        """Apparent bytes of the directories themselves, as ``du -sb`` counts them."""
        total = 0
        for directory in (self.root.parent, self.root):
            with contextlib.suppress(FileNotFoundError):
                total += directory.stat().st_size
        if self.root.is_dir():
            with os.scandir(self.root) as shards:  # no Path object per shard: GC measures this on every run
                for shard in shards:
                    with contextlib.suppress(FileNotFoundError):
                        total += shard.stat(follow_symlinks=False).st_size
        return total


def write_vector_at(fd: int, offset: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write consecutive chunks at ``offset`` with ``pwritev``, none joined, at most ``_WRITE_LIMIT`` bytes per
    call."""
    batch: list[memoryview] = []
    size = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            take = min(len(view), _WRITE_LIMIT - size)
            batch.append(view[:take])
            size += take
            view = view[take:]
            if size == _WRITE_LIMIT or len(batch) == _IOV_MAX:
                _write_all(fd, batch, offset)
                offset += size
                batch, size = [], 0
    if batch:
        _write_all(fd, batch, offset)


def _write_all(fd: int, views: list[memoryview], offset: int) -> None:
    """``pwritev`` until every view is written; a short write resumes inside the view it stopped in."""
    index = 0
    while index < len(views):
        written = os.pwritev(fd, views[index:], offset)
        offset += written
        while index < len(views) and written >= len(views[index]):
            written -= len(views[index])
            index += 1
        if written:
            views[index] = views[index][written:]


def sync_and_size(fd: int) -> int:
    """Make the written bytes durable before their piece becomes visible; returns the file's size."""
    os.fdatasync(fd)
    return os.fstat(fd).st_size


def _is_task_id(name: str) -> bool:
    try:
        validate_task_id(name)
    except ValueError:
        return False
    return True


def remove_path(path: Path) -> None:
    """Remove an orphan file or directory found by a scan."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            remove_path(child)
        path.rmdir()
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
