"""Hand-offs between threads: a ticket for one result, and an inbox that one thread serves in batches.

The ledger's writer and the issuance desk are both one thread serving many callers: callers put
work in the inbox and wait on a ticket; the serving thread takes whatever is queued as a batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Generic, Iterator, TypeVar

from stampline.errors import StamplineError

T = TypeVar("T")

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


class Inbox(Generic[T]):
    """A queue that one thread serves in batches. What `put` accepted before `close` is served;
    after `close` (or `refuse_rest`), `put` refuses with ``closed``, one sentence."""

    def __init__(self, closed: str) -> None:
        self._queue: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._closed_message = closed

    def put(self, item: T) -> None:
        with self._lock:  # nothing can be queued behind the stop marker
            if self._closed:
                raise StamplineError(self._closed_message)
            self._queue.put(item)

    def close(self) -> bool:
        """Stop taking work; the serving thread finishes what is queued. False if closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._queue.put(None)
            return True

    def batches(self, limit: int) -> Iterator[list[T]]:
        """For the serving thread: each batch is everything queued (at most ``limit``), waiting
        for the first item; ends after the last batch before `close`."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < limit:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            yield batch
            if stop:
                return

    def refuse_rest(self) -> list[T]:
        """For a serving thread that cannot go on: close, and take everything still queued so
        that it can be answered."""
        with self._lock:
            self._closed = True
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rest
            if item is not None:
                rest.append(item)
