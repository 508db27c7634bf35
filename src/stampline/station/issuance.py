"""The issuance desk: one thread that signs the line's accepted CSRs in batches and records them.

Each port could sign through the token and commit to the ledger on its own, at four thread
hand-offs per certificate (to the token's owner thread and back, to the ledger's writer and
back), each a context switch under the GIL. The desk takes whatever requests are queued, builds
their certificates, has the token sign them in one round trip, and queues their ledger records
together, so that they share one group commit. A port waits for its own record only: when
`IssuanceDesk.issue` returns, the certificate is durable in the ledger, and nothing is ever
returned that the ledger has not got. The CSR policy stays with the port (its own step).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from stampline.errors import StamplineError
from stampline.pki.policy import AcceptedCsr
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.station.ledger import Ledger
from stampline.station.ledger_writer import Ticket


@dataclass(eq=False)
class _Request:
    accepted: AcceptedCsr
    profile: DeviceProfile
    chip_id: str
    batch_id: int
    device_serial: str
    ticket: Ticket[None] = field(default_factory=Ticket)
    der: bytes = b""


class IssuanceDesk:
    """Signs and records device certificates for every port of a line; use it as a context manager."""

    def __init__(self, issuer: DeviceIssuer, ledger: Ledger, max_batch: int = 64) -> None:
        self.issuer = issuer
        self.ledger = ledger
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0  # signed in one trip to the token, for tests and statistics
        self._thread = threading.Thread(target=self._run, name="issuance-desk", daemon=True)
        self._thread.start()

    def issue(self, accepted: AcceptedCsr, profile: DeviceProfile, chip_id: str, batch_id: int,
              device_serial: str) -> bytes:
        """Sign a certificate for an accepted CSR and record it; returns the DER once it is durable.

        Raises what the token or the ledger refused (a second live certificate for the chip, a key
        already certified for another chip): then nothing was recorded and nothing is returned.
        """
        request = _Request(accepted, profile, chip_id, batch_id, device_serial)
        with self._lock:
            if self._closed:
                raise StamplineError("the issuance desk is closed.")
            self._queue.put(request)
        request.ticket.result()
        return request.der

    def close(self) -> None:
        """Finish what is queued, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> IssuanceDesk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        try:
            ders = self.issuer.issue_many([(r.accepted, r.profile, r.chip_id) for r in batch])
        except Exception as exc:  # the token failed: every port in the batch hears why
            for request in batch:
                request.ticket.set_exception(exc)
            return
        self.batches += 1
        for request, der in zip(batch, ders):
            request.der = der
            try:
                self.ledger.submit_issuance(request.chip_id, request.batch_id, request.device_serial, der,
                                            request.accepted.public_key_sha256, request.ticket)
            except Exception as exc:  # refused before it was queued: the ticket is still ours to settle
                request.ticket.set_exception(exc)
