"""The metadata schema upgrades in place: a cache written by the previous version opens with its tasks and holds,
and the blob digests recorded since version 2 find a blob's tasks whatever they are named by.

The version 1 database is built here from that version's own DDL (written out, not imported), so the test fails
if the upgrade path stops matching what older daemons left on disk.
"""

from __future__ import annotations

import hashlib
import sqlite3
import zlib
from pathlib import Path

import pytest

from dfdaemon.ids import pieces_for, task_id
from dfdaemon.storage import Storage, TaskInfo, TaskState
from dfdaemon.storage.content import ContentStore
from dfdaemon.storage.manager import METADATA_FILE
from dfdaemon.storage.metadata import SchemaTooNew
from tests.storage_support import FakeClock, payload

V1_SCHEMA = """
CREATE TABLE tasks (
    id              TEXT PRIMARY KEY,
    state           TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'evicting')),
    url             TEXT NOT NULL DEFAULT '',
    tag             TEXT NOT NULL DEFAULT '',
    application     TEXT NOT NULL DEFAULT '',
    piece_length    INTEGER,
    content_length  INTEGER,
    response_header TEXT NOT NULL DEFAULT '{}',
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    last_used_at    REAL NOT NULL,
    finished_at     REAL,
    failed_at       REAL,
    released_at     REAL,
    uploaded_count  INTEGER NOT NULL DEFAULT 0,
    content_bytes   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE pieces (
    task_id      TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    offset       INTEGER NOT NULL,
    length       INTEGER NOT NULL,
    crc          INTEGER NOT NULL,
    parent_id    TEXT,
    traffic_type INTEGER NOT NULL,
    cost         REAL NOT NULL,
    created_at   REAL NOT NULL,
    PRIMARY KEY (task_id, number)
) WITHOUT ROWID;
CREATE TABLE holds (
    task_id     TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    holder      TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    expires_at  REAL,
    ttl         REAL,
    PRIMARY KEY (task_id, holder)
) WITHOUT ROWID;
CREATE INDEX holds_by_holder ON holds (holder);
CREATE TABLE gc_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dry_run     INTEGER NOT NULL,
    trigger     TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    report      TEXT NOT NULL
);
PRAGMA user_version = 1;
"""

BLOB = payload("migrated-layer", 3000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HEX_ID = DIGEST.removeprefix("sha256:")  # how a version 1 mirror named the blob's task
NOW = 1_800_000_000.0


def blob_url(repository: str, digest: str = DIGEST) -> str:
    return f"http://registry.test/v2/{repository}/blobs/{digest}"


def write_v1_cache(root: Path) -> None:
    """A cache as a version 1 daemon left it: the blob's task named by its digest, finished and held."""
    root.mkdir(parents=True)
    db = sqlite3.connect(root / METADATA_FILE)
    try:
        db.executescript(V1_SCHEMA)
        db.execute(
            "INSERT INTO tasks (id, state, url, piece_length, content_length, created_at, updated_at, last_used_at,"
            " finished_at, content_bytes) VALUES (?, 'succeeded', ?, ?, ?, ?, ?, ?, ?, ?)",
            (HEX_ID, blob_url("library/old"), len(BLOB), len(BLOB), NOW, NOW, NOW, NOW, len(BLOB)),
        )
        db.execute(
            "INSERT INTO pieces VALUES (?, 0, 0, ?, ?, NULL, 0, 0.0, ?)", (HEX_ID, len(BLOB), zlib.crc32(BLOB), NOW)
        )
        db.execute("INSERT INTO holds VALUES (?, 'container:default/old', ?, NULL, NULL)", (HEX_ID, NOW))
        db.commit()
    finally:
        db.close()
    path = ContentStore(root).path(HEX_ID)
    path.parent.mkdir(parents=True)
    path.write_bytes(BLOB)


async def cache_blob(storage: Storage, url: str, data: bytes, digest: str | None) -> str:
    """Download ``data`` as the task the URL names, finishing it with the digest it was verified against."""
    name = task_id(url)
    async with storage.download(name, TaskInfo(url=url, piece_length=1024)) as writer:
        for piece in pieces_for(len(data), 1024):
            await writer.write_piece(piece.number, piece.offset, data[piece.offset : piece.end])
        await writer.finish(digest=digest)
    return name


def tasks_columns(root: Path) -> tuple[set[str], set[str], int]:
    """The tasks table's columns and indexes, and the schema version, read with a connection of its own."""
    db = sqlite3.connect(root / METADATA_FILE)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
        indexes = {row[1] for row in db.execute("PRAGMA index_list(tasks)")}
        return columns, indexes, int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


async def test_a_version_1_cache_migrates_keeping_its_tasks_holds_and_bytes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write_v1_cache(root)
    columns, _, version = tasks_columns(root)
    assert "digest" not in columns and version == 1
    storage = Storage(root, clock=FakeClock())
    await storage.open()
    try:
        columns, indexes, version = tasks_columns(root)
        assert "digest" in columns and "tasks_by_digest" in indexes and version == 2
        assert storage.meta.schema_version == 2
        task = await storage.get_task(HEX_ID)
        assert task is not None and task.state is TaskState.SUCCEEDED and task.content_length == len(BLOB)
        assert [hold.holder for hold in await storage.list_holds(task_id=HEX_ID)] == ["container:default/old"]
        _, data = await storage.read_piece(HEX_ID, 0)
        assert data == BLOB
        # The digest-named task carries no recorded digest, and is still found by its digest.
        assert await storage.task_ids_for_digests([DIGEST]) == {DIGEST: [HEX_ID]}
    finally:
        await storage.close()


async def test_reopening_a_migrated_cache_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write_v1_cache(root)
    for _ in range(2):
        storage = Storage(root, clock=FakeClock())
        await storage.open()
        try:
            assert storage.meta.schema_version == 2
            assert await storage.task_ids_for_digests([DIGEST]) == {DIGEST: [HEX_ID]}
        finally:
            await storage.close()


async def test_a_cache_from_a_newer_daemon_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write_v1_cache(root)
    db = sqlite3.connect(root / METADATA_FILE)
    db.execute("PRAGMA user_version = 3")
    db.close()
    storage = Storage(root, clock=FakeClock())
    with pytest.raises(SchemaTooNew, match="version 3 is newer"):
        await storage.open()
    await storage.close()


async def test_a_blobs_tasks_are_found_by_digest_whatever_they_are_named_by(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write_v1_cache(root)
    storage = Storage(root, clock=FakeClock())
    await storage.open()
    try:
        library = await cache_blob(storage, blob_url("library/app"), BLOB, DIGEST)
        fork = await cache_blob(storage, blob_url("team/app"), BLOB, DIGEST)
        other = payload("other-layer", 2000)
        other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
        other_id = await cache_blob(storage, blob_url("library/app", other_digest), other, other_digest)
        # Bytes fetched from a blob URL without a digest to check them against are no blob's.
        unchecked = await cache_blob(storage, blob_url("library/unchecked", "sha256:" + "1" * 64), b"x" * 100, None)
        library_task, unchecked_task = await storage.get_task(library), await storage.get_task(unchecked)
        assert library_task is not None and library_task.digest == DIGEST  # what the mirror's cached path reads
        assert unchecked_task is not None and unchecked_task.digest is None
        absent = "sha256:" + "2" * 64
        found = await storage.task_ids_for_digests([DIGEST, other_digest, absent, "sha256:" + "1" * 64, "md5:x"])
        assert found == {DIGEST: sorted([HEX_ID, library, fork]), other_digest: [other_id]}
        assert await storage.task_ids_for_digests([]) == {}
        await storage.delete_task(fork)
        assert await storage.task_ids_for_digests([DIGEST]) == {DIGEST: sorted([HEX_ID, library])}
    finally:
        await storage.close()
