"""The metadata store: tasks, pieces, holds and GC runs in SQLite (WAL, one writer).

Every method is synchronous and must run on the storage layer's single database thread; each state
change that must survive a crash is one transaction. The store is the single source of truth.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dfdaemon.storage.models import Hold, PieceRecord, Quiet, TaskInfo, TaskRecord, TaskState

SCHEMA_VERSION = 2

# The GC run records kept in the metadata (which counts against the quota) stay below this many bytes.
GC_RUNS_MAX_BYTES = 16 * 1024 * 1024

_SCHEMA_V1 = """
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
"""

# A blob task's verified OCI digest (``sha256:<hex>``), so that a blob named by its URL is found by its digest.
_SCHEMA_V2 = """
ALTER TABLE tasks ADD COLUMN digest TEXT;
CREATE INDEX tasks_by_digest ON tasks (digest);
"""

# Index i upgrades a database from version i to i + 1.
_MIGRATIONS: list[str] = [_SCHEMA_V1, _SCHEMA_V2]

_TASK_COLUMNS = (
    "id, state, url, tag, application, piece_length, content_length, response_header, created_at, updated_at, "
    "last_used_at, finished_at, failed_at, released_at, uploaded_count, content_bytes, digest"
)


class SchemaTooNew(Exception):
    """The database was written by a newer version of the daemon."""


def _task(row: sqlite3.Row, piece_count: int = 0) -> TaskRecord:
    return TaskRecord(
        id=row["id"],
        state=TaskState(row["state"]),
        url=row["url"],
        tag=row["tag"],
        application=row["application"],
        piece_length=row["piece_length"],
        content_length=row["content_length"],
        response_header=json.loads(row["response_header"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_used_at=row["last_used_at"],
        finished_at=row["finished_at"],
        failed_at=row["failed_at"],
        released_at=row["released_at"],
        uploaded_count=row["uploaded_count"],
        content_bytes=row["content_bytes"],
        piece_count=piece_count,
        digest=row["digest"],
    )


def _piece(row: sqlite3.Row) -> PieceRecord:
    return PieceRecord(**dict(row))  # the columns are named after the record's fields


def _hold(row: sqlite3.Row) -> Hold:
    return Hold(**dict(row))


class MetadataStore:
    """SQLite-backed metadata. Not thread-safe by design: one thread owns it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA journal_size_limit=4194304")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of change (BEGIN IMMEDIATE: the single writer takes the lock up front)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"metadata schema version {version} is newer than this daemon's {SCHEMA_VERSION}")
        for target in range(version, SCHEMA_VERSION):
            with self.transaction() as db:
                _run_script(db, _MIGRATIONS[target])
                db.execute(f"PRAGMA user_version = {target + 1}")

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it, so it stops counting against the quota."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # Tasks

    def get_task(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        count = self._db.execute("SELECT COUNT(*) FROM pieces WHERE task_id = ?", (task_id,)).fetchone()[0]
        return _task(row, count)

    def list_tasks(self) -> list[TaskRecord]:
        counts = dict(self._db.execute("SELECT task_id, COUNT(*) FROM pieces GROUP BY task_id").fetchall())
        rows = self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY created_at").fetchall()
        return [_task(row, counts.get(row["id"], 0)) for row in rows]

    def task_time_rows(
        self, quiet: Quiet | None = None, busy: Sequence[str] = ()
    ) -> list[tuple[str, str, float, float, float, float | None, float | None]]:
        """Every task not being evicted, with only the columns GC decides by: id, state (as stored), created,
        updated, last used, finished and released times, as plain tuples in creation order: one narrow scan of the
        table in rowid order (rows are inserted when tasks are created, so no sort), no object per row.

        With ``quiet``, the tasks it describes are left out unless a hold (live or lapsed) names them or they are
        ``busy`` (transfers in flight, which only the caller knows).
        """
        columns = "id, state, created_at, updated_at, last_used_at, finished_at, released_at"
        query = f"SELECT {columns} FROM tasks WHERE state != 'evicting' ORDER BY rowid"
        params: tuple[Any, ...] = ()
        if quiet is not None:
            # Two legs: a scan that compares times only, and index lookups for the held and busy tasks (testing
            # every row of the scan against the holds would cost more than the rest of it).
            leg = f"SELECT rowid AS creation, {columns} FROM tasks WHERE state != 'evicting'"
            query = (
                f"SELECT {columns} FROM ({leg} AND (state != 'succeeded' OR last_used_at <= ?"
                " OR MAX(COALESCE(finished_at, created_at), COALESCE(released_at, 0)) >= ?)"
                f" UNION {leg} AND id IN (SELECT task_id FROM holds UNION ALL SELECT value FROM json_each(?)))"
                " ORDER BY creation"
            )
            params = (quiet.used_since, quiet.settled_before, json.dumps(list(busy)))
        cursor = self._db.cursor()
        cursor.row_factory = None  # plain tuples: no sqlite3.Row per task
        return cursor.execute(query, params).fetchall()

    def gc_rows(
        self, now: float, quiet: Quiet | None, busy: Sequence[str]
    ) -> tuple[list[tuple[str, str, float, float, float, float | None, float | None]], list[tuple[str, str]]]:
        """What a GC snapshot is built from, read in one call on the database thread (so at one instant): the
        tasks' ``task_time_rows`` and every live hold as a plain (task id, holder) pair, by holder."""
        cursor = self._db.cursor()
        cursor.row_factory = None
        cursor.execute(
            "SELECT task_id, holder FROM holds WHERE expires_at IS NULL OR expires_at > ? ORDER BY holder, task_id",
            (now,),
        )
        return self.task_time_rows(quiet, busy), cursor.fetchall()

    def held_task_ids(self, now: float) -> list[str]:
        """The tasks at least one live hold names, as plain ids (no ``Hold`` per row)."""
        cursor = self._db.cursor()
        cursor.row_factory = None
        cursor.execute("SELECT DISTINCT task_id FROM holds WHERE expires_at IS NULL OR expires_at > ?", (now,))
        return [task_id for (task_id,) in cursor]

    def count_tasks(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM tasks WHERE state != 'evicting'").fetchone()[0])

    def create_or_resume_task(self, task_id: str, info: TaskInfo, now: float) -> TaskRecord:
        """Insert a running task, or mark an existing one running again (a failed or partial task resumes)."""
        with self.transaction() as db:
            existing = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if existing is None:
                db.execute(
                    "INSERT INTO tasks (id, state, url, tag, application, piece_length, content_length,"
                    " response_header, created_at, updated_at, last_used_at)"
                    " VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        task_id,
                        info.url,
                        info.tag,
                        info.application,
                        info.piece_length,
                        info.content_length,
                        json.dumps(info.response_header, sort_keys=True),
                        now,
                        now,
                        now,
                    ),
                )
            elif existing["state"] != TaskState.SUCCEEDED:
                db.execute(
                    "UPDATE tasks SET state = 'running', failed_at = NULL, updated_at = ?, last_used_at = ?,"
                    " url = ?, tag = ?, application = ?,"
                    " piece_length = COALESCE(?, piece_length), content_length = COALESCE(?, content_length),"
                    " response_header = ? WHERE id = ?",
                    (
                        now,
                        now,
                        info.url,
                        info.tag,
                        info.application,
                        info.piece_length,
                        info.content_length,
                        json.dumps(info.response_header, sort_keys=True),
                        task_id,
                    ),
                )
        task = self.get_task(task_id)
        assert task is not None
        return task

    def finish_task(self, task_id: str, content_bytes: int, now: float, digest: str | None = None) -> None:
        """Mark a task succeeded; ``digest`` is the blob digest its content was just verified against."""
        with self.transaction() as db:
            db.execute(
                "UPDATE tasks SET state = 'succeeded', finished_at = ?, updated_at = ?, last_used_at = ?,"
                " content_bytes = ?, digest = COALESCE(?, digest) WHERE id = ?",
                (now, now, now, content_bytes, digest, task_id),
            )

    def task_ids_for_digests(self, digests: Sequence[str], hex_ids: Sequence[str]) -> list[tuple[str, str | None]]:
        """(id, digest) of the tasks not being evicted that hold one of ``digests`` or are named ``hex_ids``.

        One statement, so one consistent snapshot; the lists go in as JSON, whatever their length.
        """
        rows = self._db.execute(
            "SELECT id, digest FROM tasks WHERE state != 'evicting' AND (digest IN (SELECT value FROM json_each(?))"
            " OR id IN (SELECT value FROM json_each(?))) ORDER BY id",
            (json.dumps(list(digests)), json.dumps(list(hex_ids))),
        )
        return [(row[0], row[1]) for row in rows]

    def fail_task(self, task_id: str, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE tasks SET state = 'failed', failed_at = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                (now, now, task_id),
            )

    def touch_task(self, task_id: str, now: float, uploaded: bool = False) -> None:
        """Record a use (a download hit or an upload) for TTL and least-recently-used ordering."""
        with self.transaction() as db:
            db.execute(
                "UPDATE tasks SET last_used_at = ?, uploaded_count = uploaded_count + ? WHERE id = ?",
                (now, 1 if uploaded else 0, task_id),
            )

    def record_uses(self, uses: Sequence[tuple[str, float, int]]) -> None:
        """Apply batched uses (task id, last use, uploads) in one transaction; a later use never moves back."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE tasks SET last_used_at = MAX(last_used_at, ?), uploaded_count = uploaded_count + ?"
                " WHERE id = ?",
                [(used_at, uploads, task_id) for task_id, used_at, uploads in uses],
            )

    def mark_evicting(self, task_id: str, expected_states: Iterable[TaskState], now: float) -> bool:
        """Mark a task evicting only if it is still in an expected state and no live hold names it.

        The check and the mark are one transaction, so an acquire cannot slip in between.
        """
        states = [state.value for state in expected_states]
        marks = ",".join("?" for _ in states)
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE tasks SET state = 'evicting', updated_at = ? WHERE id = ? AND state IN ({marks})"
                " AND NOT EXISTS (SELECT 1 FROM holds WHERE holds.task_id = tasks.id"
                " AND (holds.expires_at IS NULL OR holds.expires_at > ?))",
                (now, task_id, *states, now),
            )
            return cursor.rowcount == 1

    def force_mark_evicting(self, task_id: str, now: float) -> list[str]:
        """Drop a task's holds and mark it evicting; returns the holders whose live holds were dropped."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT holder FROM holds WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)", (task_id, now)
            )
            holders = [row[0] for row in rows]
            db.execute("DELETE FROM holds WHERE task_id = ?", (task_id,))
            db.execute("UPDATE tasks SET state = 'evicting', updated_at = ? WHERE id = ?", (now, task_id))
        return holders

    def delete_task(self, task_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))

    def evicting_task_ids(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT id FROM tasks WHERE state = 'evicting'")]

    def set_content_bytes(self, task_id: str, content_bytes: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE tasks SET content_bytes = ? WHERE id = ?", (content_bytes, task_id))

    def fail_missing(self, task_id: str, now: float) -> None:
        """The content file vanished: forget its pieces and mark the task failed."""
        with self.transaction() as db:
            db.execute("DELETE FROM pieces WHERE task_id = ?", (task_id,))
            db.execute(
                "UPDATE tasks SET state = 'failed', failed_at = ?, updated_at = ?, content_bytes = 0 WHERE id = ?",
                (now, now, task_id),
            )

    # Pieces

    def add_pieces(self, task_id: str, pieces: Sequence[PieceRecord], content_bytes: int, now: float) -> None:
        """Make written pieces visible and account the task's grown file, in one transaction."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO pieces (task_id, number, offset, length, crc, parent_id, traffic_type, cost,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        task_id,
                        piece.number,
                        piece.offset,
                        piece.length,
                        piece.crc,
                        piece.parent_id,
                        piece.traffic_type,
                        piece.cost,
                        piece.created_at,
                    )
                    for piece in pieces
                ],
            )
            db.execute(
                "UPDATE tasks SET updated_at = ?, content_bytes = MAX(content_bytes, ?) WHERE id = ?",
                (now, content_bytes, task_id),
            )

    def remove_piece(self, task_id: str, number: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM pieces WHERE task_id = ? AND number = ?", (task_id, number))

    def get_piece(self, task_id: str, number: int) -> PieceRecord | None:
        row = self._db.execute("SELECT * FROM pieces WHERE task_id = ? AND number = ?", (task_id, number)).fetchone()
        return None if row is None else _piece(row)

    def list_pieces(self, task_id: str) -> list[PieceRecord]:
        rows = self._db.execute("SELECT * FROM pieces WHERE task_id = ? ORDER BY number", (task_id,)).fetchall()
        return [_piece(row) for row in rows]

    # Holds

    def live_holds(self, now: float, task_id: str | None = None, holder: str | None = None) -> list[Hold]:
        clauses = ["(expires_at IS NULL OR expires_at > ?)"]
        params: list[Any] = [now]
        if task_id is not None:
            clauses.append("task_id = ?")
            params.append(task_id)
        if holder is not None:
            clauses.append("holder = ?")
            params.append(holder)
        rows = self._db.execute(
            f"SELECT * FROM holds WHERE {' AND '.join(clauses)} ORDER BY holder, task_id", params
        ).fetchall()
        return [_hold(row) for row in rows]

    def acquire(self, holder: str, task_ids: list[str], ttl: float | None, now: float) -> list[str]:
        """Hold every task or none; returns ids that are absent or being evicted (nothing acquired then)."""
        expires = None if ttl is None else now + ttl
        with self.transaction() as db:
            unavailable = [
                task_id
                for task_id in task_ids
                if db.execute("SELECT 1 FROM tasks WHERE id = ? AND state != 'evicting'", (task_id,)).fetchone() is None
            ]
            if unavailable:
                return unavailable
            for task_id in task_ids:
                db.execute(
                    "INSERT INTO holds (task_id, holder, acquired_at, expires_at, ttl) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (task_id, holder) DO UPDATE SET expires_at = excluded.expires_at, ttl = excluded.ttl,"
                    " acquired_at = CASE WHEN holds.expires_at IS NOT NULL AND holds.expires_at <= excluded.acquired_at"
                    " THEN excluded.acquired_at ELSE holds.acquired_at END",
                    (task_id, holder, now, expires, ttl),
                )
        return []

    def release(self, holder: str, task_ids: list[str], now: float) -> list[str]:
        """Remove the holder's holds on these tasks; returns the ids whose hold was live (a lapsed one is not)."""
        released = []
        with self.transaction() as db:
            for task_id in task_ids:
                row = db.execute(
                    "SELECT expires_at FROM holds WHERE task_id = ? AND holder = ?", (task_id, holder)
                ).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM holds WHERE task_id = ? AND holder = ?", (task_id, holder))
                if row["expires_at"] is None or row["expires_at"] > now:
                    released.append(task_id)
                    db.execute("UPDATE tasks SET released_at = ?, last_used_at = ? WHERE id = ?", (now, now, task_id))
                else:  # as a GC purge would: the task counts as released when its lease lapsed
                    db.execute(
                        "UPDATE tasks SET released_at = MAX(COALESCE(released_at, 0), ?) WHERE id = ?",
                        (row["expires_at"], task_id),
                    )
        return released

    def keep_alive(self, holder: str, ttl: float | None, now: float) -> None:
        """Extend the holder's live leases (by ``ttl``, or by each hold's own ttl); a lapsed lease stays lapsed."""
        with self.transaction() as db:
            if ttl is None:
                db.execute(
                    "UPDATE holds SET expires_at = ? + ttl WHERE holder = ? AND ttl IS NOT NULL AND expires_at > ?",
                    (now, holder, now),
                )
            else:
                db.execute(
                    "UPDATE holds SET expires_at = ?, ttl = ? WHERE holder = ? AND ttl IS NOT NULL AND expires_at > ?",
                    (now + ttl, ttl, holder, now),
                )

    def holder_task_ids(self, holder: str, now: float) -> list[str]:
        """The tasks the holder holds now (lapsed leases excluded)."""
        rows = self._db.execute(
            "SELECT task_id FROM holds WHERE holder = ? AND (expires_at IS NULL OR expires_at > ?)", (holder, now)
        )
        return [row[0] for row in rows]

    def expired_holds(self, now: float) -> list[Hold]:
        """Lapsed leases not yet purged (read only: what a dry run must treat as released)."""
        rows = self._db.execute("SELECT * FROM holds WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        return [_hold(row) for row in rows]

    def expire_holds(self, now: float) -> list[Hold]:
        """Delete lapsed leases, stamping their tasks released at the moment each lapsed."""
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM holds WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)).fetchall()
            for row in rows:
                db.execute("DELETE FROM holds WHERE task_id = ? AND holder = ?", (row["task_id"], row["holder"]))
                db.execute(
                    "UPDATE tasks SET released_at = MAX(COALESCE(released_at, 0), ?) WHERE id = ?",
                    (row["expires_at"], row["task_id"]),
                )
        return [_hold(row) for row in rows]

    # GC runs

    def record_gc_run(self, dry_run: bool, trigger: str, started_at: float, finished_at: float, report: str) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO gc_runs (dry_run, trigger, started_at, finished_at, report) VALUES (?, ?, ?, ?, ?)",
                (int(dry_run), trigger, started_at, finished_at, report),
            )
            run_id = int(cursor.lastrowid or 0)
            # Keep the record bounded: the newest 1000 runs, and no more than GC_RUNS_MAX_BYTES of reports (a run
            # over a big cache lists thousands of skipped tasks); the newest run is always kept.
            db.execute("DELETE FROM gc_runs WHERE id <= ?", (run_id - 1000,))
            db.execute(
                "DELETE FROM gc_runs WHERE id < ? AND id <= (SELECT MAX(id) FROM (SELECT id,"
                " SUM(LENGTH(CAST(report AS BLOB))) OVER (ORDER BY id DESC) AS newer FROM gc_runs) WHERE newer > ?)",
                (run_id, GC_RUNS_MAX_BYTES),
            )
        return run_id

    def list_gc_runs(self, limit: int) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM gc_runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run DDL statements one by one inside the caller's transaction (executescript would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)
