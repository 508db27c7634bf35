"""Group commit: one thread owns the ledger's write connection and commits callers' operations in groups.

Callers enqueue an operation and get a `Ticket`. The writer takes everything queued (up to
``max_group`` operations), runs them in one ``BEGIN IMMEDIATE ... COMMIT`` (one fsync with
synchronous=FULL), each inside its own SAVEPOINT so that a failing operation is rolled back
alone, and settles the tickets only after COMMIT: a result means the write is durable.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from typing import Any, Callable, Generic, TypeVar

from stampline.errors import StamplineError

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

log = logging.getLogger(__name__)


class Ticket(Generic[T]):
    """A result that one thread settles once and others wait for.

    A pre-acquired lock rather than a `concurrent.futures.Future`, whose condition variable
    runs several Python-level lock operations per result: the line settles thousands a second.
    """

    __slots__ = ("_settled", "_done", "_value", "_error")

    def __init__(self) -> None:
        self._settled = threading.Lock()
        self._settled.acquire()
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def set_result(self, value: T) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: T | None, error: BaseException | None) -> None:
        if self._done:  # the first outcome stands
            raise StamplineError("a ticket is settled once.")
        self._done = True
        self._value, self._error = value, error
        self._settled.release()

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        """Wait until settled; raise the operation's exception, or return its value."""
        with self._settled:  # acquired once settled, released for any other waiter
            pass
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Fanout(Ticket[list[BaseException | None]]):
    """The ticket of an op done for several callers: the op returns one error (None: done) per
    caller, in order, and each caller's own ticket is settled from it."""

    __slots__ = ("_tickets",)

    def __init__(self, tickets: list[Ticket[None]]) -> None:
        super().__init__()
        self._tickets = tickets

    def set_result(self, value: list[BaseException | None]) -> None:
        super().set_result(value)
        if not isinstance(value, list) or len(value) != len(self._tickets):
            failure = StamplineError("the ledger returned no outcome for some records.")
            value = [failure] * len(self._tickets)
        for ticket, error in zip(self._tickets, value):
            settle(ticket, None, error)

    def set_exception(self, error: BaseException) -> None:
        super().set_exception(error)
        for ticket in self._tickets:
            settle(ticket, None, error)


def settle(ticket: Ticket[Any], value: Any, error: BaseException | None) -> None:
    """Settle ``ticket``, whatever it does: a ticket that refuses (settled already, a bug) is
    logged, and the settling thread goes on to the next."""
    try:
        if error is None:
            ticket.set_result(value)
        else:
            ticket.set_exception(error)
    except Exception:
        log.exception("a ledger ticket could not be settled")


class GroupCommitWriter:
    def __init__(self, conn: sqlite3.Connection, max_group: int = 512, name: str = "ledger-writer") -> None:
        self._conn = conn
        self._max_group = max_group
        self._queue: queue.SimpleQueue[tuple[Operation, Ticket[Any] | None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.groups = 0  # committed transactions, for tests and statistics
        self.failures: list[BaseException] = []  # of posted operations, in order
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[sqlite3.Connection], T], ticket: Ticket[T] | None = None) -> Ticket[T]:
        """Queue ``op``; its ticket (``ticket`` if given) is settled once the op is durable or failed.

        ``op`` must keep no state outside SQLite: it may run twice before its commit (see `_commit`).
        """
        ticket = Ticket() if ticket is None else ticket
        self._put(op, ticket)
        return ticket

    def post(self, op: Operation) -> None:
        """Queue ``op`` without waiting for it; a failure is logged and kept in `failures`."""
        self._put(op, None)

    def _put(self, op: Operation, ticket: Ticket[Any] | None) -> None:
        with self._lock:  # nothing can be queued behind the stop marker
            if self._closed:
                raise StamplineError("the ledger is closed.")
            self._queue.put((op, ticket))

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
        try:
            self._serve()
        except BaseException:  # a bug: refuse new work and answer everything queued, rather than hang
            log.exception("the ledger writer stopped")
            with self._lock:
                self._closed = True
            failure = StamplineError("the ledger writer stopped; see the log.")
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None and item[1] is not None:
                    settle(item[1], None, failure)

    def _serve(self) -> None:
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
            self._commit(group)
            if stop:
                return

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
