"""The cache: metadata in SQLite, one content file per task, references that keep data in use.

Everything the daemon does to the cache goes through ``Storage``. Each operation is at most one SQLite
transaction (on the single database thread) plus the file work it implies (on worker threads); an operation
that changes a task's references or removes it runs under that task's lock.

==========================================  =================================================================
Operation                                   Transaction, and the file work around it
==========================================  =================================================================
``download(id, info)`` (begin)              in-flight download reference; create or resume the task row;
                                            create its content file. Yields a ``TaskWriter``, whose one
                                            ``PieceFile`` (the file held open until the download ends) takes
                                            every piece, from the origin or a parent
``TaskWriter.stage_piece``                  a parent's piece: bytes (held, or an ``IncomingPiece`` received block
                                            by block) written and CRC'd in one thread hop, not synced
``TaskWriter.piece_file()`` write_chunks / receive  the origin stream: a segment's chunks written (vectored) and
                                            CRC'd in one thread hop, or a piece received from the socket block
                                            by block, not synced
``PieceFile.commit``                        one fdatasync, then one insert of every piece written (batched)
``TaskWriter.write_piece``                  stage then commit one piece (durable, then visible)
``finish_task`` / ``fail_task``             the task's state (and size, and a verified blob digest); ``discard``
                                            deletes the file first
``piece(id, n)`` / ``pieces(id)``           read only; from the piece cache (in memory) once the task was read
``upload(id)``                              in-flight upload reference; the task's existence from the cache
``read_piece`` / ``read_piece_into``        read and CRC-check the bytes (into a reused buffer); a corrupt
                                            piece's row is deleted
``touch(id)``                               last use of the task
``record_upload(id)`` / ``flush_uses()``    in memory (merged into task reads); every pending use in one
                                            transaction, at most ``USE_FLUSH_DELAY`` later and before GC
``reading(id)``                             in-flight download reference, in memory only
``acquire`` / ``release`` / ``sync``        the holder's holds, all named tasks in one transaction
``keep_alive`` / ``expire_holds``           lease expiries; expiry stamps the task released when it lapsed
``get_task`` / ``list_tasks`` / ``list_holds`` / ``get_references``   read only
``task_ids_for_digests(digests)``           read only: the tasks holding each blob digest (recorded when the
                                            task finished verified, or named by the digest's hex), one query
``gc_view(purge_lapsed=, quiet=)``          every task with bytes and references (lapsed leases purged first),
                                            or all but the ``quiet`` ones, left out in the query
``apply(victims)`` / ``evict(id, states)``  per victim: re-check references, mark evicting (one transaction
                                            that also re-checks holds), delete the file, delete the rows
``delete_task(id, force=)``                 as eviction, refused while referenced; ``force`` drops holds
``record_gc_run`` / ``list_gc_runs``        one GC record (bounded history) / read only
==========================================  =================================================================

A crash between a mark and the file work is finished at the next ``open``. The piece cache is derived from the
store: pieces join it once committed; a task leaves it when a piece is dropped, or it is evicted, deleted or
discarded; it holds the most recently used tasks, up to ``PIECE_CACHE_PIECES`` pieces in all.
"""

from dfdaemon.storage.manager import IncomingPiece, PieceFile, Progress, Storage, TaskReader, TaskWriter
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
    "IncomingPiece",
    "InvalidPiece",
    "PieceCorrupt",
    "PieceFile",
    "PieceNotFound",
    "PieceRecord",
    "Progress",
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
