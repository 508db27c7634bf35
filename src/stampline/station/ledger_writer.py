"""Group commit: one thread owns the ledger's write connection and commits callers' operations in groups.

Callers enqueue an operation and get a `Ticket`. The writer takes everything queued (up to
``max_group`` operations), runs them in one ``BEGIN IMMEDIATE ... COMMIT`` (one fsync with
synchronous=FULL), so that a failing operation is rolled back alone (see `_commit`), and
settles the tickets only after COMMIT: a result means the write is durable.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any, Callable, TypeVar

from stampline.errors import StamplineError
from stampline.station.handoff import Inbox, Ticket, settle

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

log = logging.getLogger(__name__)


class GroupCommitWriter:
    def __init__(self, conn: sqlite3.Connection, max_group: int = 512, name: str = "ledger-writer") -> None:
        self._conn = conn
        self._max_group = max_group
        self._inbox: Inbox[tuple[Operation, Ticket[Any] | None]] = Inbox("the ledger is closed.")
        self.groups = 0  # committed transactions, for tests and statistics
        self.failures: list[BaseException] = []  # of posted operations, in order
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[sqlite3.Connection], T], ticket: Ticket[T] | None = None) -> Ticket[T]:
        """Queue ``op``; its ticket (``ticket`` if given) is settled once the op is durable or failed.

        ``op`` must keep no state outside SQLite: it may run twice before its commit (see `_commit`).
        """
        ticket = Ticket() if ticket is None else ticket
        self._inbox.put((op, ticket))
        return ticket

    def post(self, op: Operation) -> None:
        """Queue ``op`` without waiting for it; a failure is logged and kept in `failures`."""
        self._inbox.put((op, None))

    def close(self) -> None:
        """Commit everything queued, then stop the thread and close the connection."""
        if self._inbox.close():
            self._thread.join()
            self._conn.close()

    def _run(self) -> None:
        group: list[tuple[Operation, Ticket[Any] | None]] = []
        try:
            for group in self._inbox.batches(self._max_group):
                self._commit(group)
        except BaseException:  # a bug: refuse new work and answer everything queued, rather than hang
            log.exception("the ledger writer stopped")
            failure = StamplineError("the ledger writer stopped; see the log.")
            for _, ticket in group + self._inbox.refuse_rest():
                if ticket is not None and not ticket.done():
                    settle(ticket, None, failure)

    def _commit(self, group: list[tuple[Operation, Ticket[Any] | None]]) -> None:
        """Commit the group; settle each ticket with its op's result or exception.

        The ops run first without savepoints (two statements fewer each: the line's hot path).
        If one fails, the transaction is rolled back and the group runs again, each op in its
        own savepoint, so that only the failing op is lost. An op must therefore be a pure
        function of the connection (no state outside SQLite): it may run twice before a commit.
        """
        results: list[tuple[Any, BaseException | None]] = []
        try:
            if not self._run_group(group, results, isolated=len(group) == 1):
                results.clear()
                self._run_group(group, results, isolated=True)
        except Exception as exc:
            log.exception("ledger group commit failed")
            try:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            failure = StamplineError(f"the ledger could not commit: {exc}.")
            own = [error for _, error in results]  # an op's own refusal, from before the whole group failed
            results = [(None, (own[i] if i < len(own) else None) or failure) for i in range(len(group))]
        else:
            self.groups += 1
        for (_, ticket), (result, error) in zip(group, results):
            if ticket is None:
                if error is not None:
                    log.error("a queued ledger write failed: %s", error)
                    self.failures.append(error)
            else:
                settle(ticket, result, error)

    def _run_group(self, group: list[tuple[Operation, Ticket[Any] | None]],
                   results: list[tuple[Any, BaseException | None]], isolated: bool) -> bool:
        """One transaction over the group, committed, each op's outcome appended to ``results``.
        Not isolated: False as soon as an op fails (rolled back). Isolated: each op in a
        savepoint, its failure kept as its outcome."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        for op, _ in group:
            if isolated:
                conn.execute("SAVEPOINT op")
            try:
                result = op(conn)
            except Exception as exc:
                if not conn.in_transaction:  # SQLite abandoned the whole transaction (I/O error, full disk)
                    raise
                if not isolated:
                    conn.execute("ROLLBACK")
                    return False
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((None, exc))
            else:
                if isolated:
                    conn.execute("RELEASE op")
                results.append((result, None))
        conn.execute("COMMIT")
        return True
