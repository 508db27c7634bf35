"""Group commit: one thread owns the ledger's write connection and commits callers' operations in groups.

Callers enqueue an operation and get a Future. The writer takes everything queued (up to
``max_group`` operations), runs them in one ``BEGIN IMMEDIATE ... COMMIT`` (one fsync with
synchronous=FULL), each inside its own SAVEPOINT so that a failing operation is rolled back
alone, and resolves the futures only after COMMIT: a result means the write is durable.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from stampline.errors import StamplineError

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

log = logging.getLogger(__name__)


class GroupCommitWriter:
    def __init__(self, conn: sqlite3.Connection, max_group: int = 512, name: str = "ledger-writer") -> None:
        self._conn = conn
        self._max_group = max_group
        self._queue: queue.SimpleQueue[tuple[Operation, Future[Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.groups = 0  # committed transactions, for tests and statistics
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:  # nothing can be queued behind the stop marker
            if self._closed:
                raise StamplineError("the ledger is closed.")
            self._queue.put((op, future))
        return future

    def close(self) -> None:
        """Commit everything queued, then stop the thread and close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group, stop = [item], False
            while len(group) < self._max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            self._commit([(op, f) for op, f in group if f.set_running_or_notify_cancel()])
            if stop:
                return

    def _commit(self, group: list[tuple[Operation, Future[Any]]]) -> None:
        conn = self._conn
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in group:
                conn.execute("SAVEPOINT op")
                try:
                    result = op(conn)
                except Exception as exc:
                    if not conn.in_transaction:  # SQLite abandoned the whole transaction (I/O error, full disk)
                        raise
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, None, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((future, result, None))
            conn.execute("COMMIT")
        except Exception as exc:
            log.exception("ledger group commit failed")
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            failure = StamplineError(f"the ledger could not commit: {exc}.")
            own = {id(f): e for f, _, e in results if e is not None}
            for _, future in group:
                future.set_exception(own.get(id(future), failure))
            return
        self.groups += 1
        for future, result, error in results:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
