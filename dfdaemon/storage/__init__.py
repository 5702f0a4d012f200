"""The cache: metadata in SQLite, one content file per task, references that keep data in use.

Everything the daemon does to the cache goes through ``Storage``. Each operation is at most one SQLite
transaction (on the single database thread) plus the file work it implies (on worker threads); an operation
that changes a task's references or removes it runs under that task's lock.

==========================================  =================================================================
Operation                                   Transaction, and the file work around it
==========================================  =================================================================
``download(id, info)`` (begin)              in-flight download reference; create or resume the task row;
                                            create its content file. Yields a ``TaskWriter``.
``write_piece``                             bytes written at their offset and fdatasync'd, then one insert of
                                            the piece row with the file's size (the piece is visible only then)
``piece_file(id)`` write_at / commit         a writer's open file: bytes written in its thread hops (CRC taken
                                            by the writer as they arrived), invisible until ``commit``
                                            fdatasyncs the file and inserts the batch's rows in one transaction
``finish_task`` / ``fail_task``             the task's state (and size, and a verified blob digest); ``discard``
                                            deletes the file first
``stage_piece`` / ``commit_staged``         bytes written and CRC'd in one thread hop, not synced / one
                                            fdatasync, then one insert of every staged piece (batched)
``piece(id, n)`` / ``pieces(id)``           read only
``read_piece`` / ``read_piece_into``        read and CRC-check the bytes (into a reused buffer); a corrupt
                                            piece's row is deleted
``touch(id)``                               last use of the task
``record_upload(id)`` / ``flush_uses()``    in memory (merged into task reads); every pending use in one
                                            transaction, at most ``USE_FLUSH_DELAY`` later and before GC
``upload(id)`` / ``reading(id)``            in-flight upload / download reference, in memory only
``acquire`` / ``release`` / ``sync``        the holder's holds, all named tasks in one transaction
``keep_alive`` / ``expire_holds``           lease expiries; expiry stamps the task released when it lapsed
``get_task`` / ``list_tasks`` / ``list_holds`` / ``get_references``   read only
``task_ids_for_digests(digests)``           read only: the tasks holding each blob digest (recorded when the
                                            task finished verified, or named by the digest's hex), one query
``gc_view(purge_lapsed=)``                  every task with bytes and references (lapsed leases purged first)
``apply(victims)`` / ``evict(id, states)``  per victim: re-check references, mark evicting (one transaction
                                            that also re-checks holds), delete the file, delete the rows
``delete_task(id, force=)``                 as eviction, refused while referenced; ``force`` drops holds
``record_gc_run`` / ``list_gc_runs``        one GC record (bounded history) / read only
==========================================  =================================================================

A crash between a mark and the file work is finished at the next ``open``.
"""

from dfdaemon.storage.manager import PieceFile, Storage, TaskReader, TaskWriter
from dfdaemon.storage.models import (
    Applied,
    DiskFull,
    Hold,
    InvalidPiece,
    PieceCorrupt,
    PieceNotFound,
    PieceRecord,
    References,
    Refusal,
    StorageError,
    StorageFull,
    SyncResult,
    TaskInfo,
    TaskInUse,
    TaskNotFound,
    TaskRecord,
    TaskState,
    TaskUse,
    TrafficType,
    Usage,
    Victim,
)

__all__ = [
    "Applied",
    "DiskFull",
    "Hold",
    "InvalidPiece",
    "PieceCorrupt",
    "PieceFile",
    "PieceNotFound",
    "PieceRecord",
    "References",
    "Refusal",
    "Storage",
    "StorageError",
    "StorageFull",
    "SyncResult",
    "TaskInUse",
    "TaskInfo",
    "TaskNotFound",
    "TaskReader",
    "TaskRecord",
    "TaskState",
    "TaskUse",
    "TaskWriter",
    "TrafficType",
    "Usage",
    "Victim",
]
