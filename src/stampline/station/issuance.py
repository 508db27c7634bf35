"""The issuance desk: one thread between the ports and the CA. CSRs come in; certificates that
passed the CSR policy, were signed through the token and are durable in the ledger go out.

Each port could do this on its own, but every certificate would then cost a dozen hand-offs of
the GIL (policy reads, the token's owner thread, each ledger statement), each a context switch
with eight ports competing. The desk takes whatever requests are queued, applies the policy to
each, has the token sign the accepted ones and hands their ledger records to the writer as one
operation of a few statements. A port waits for its own request only: when
`IssuanceDesk.issue` returns, the certificate is durable in the ledger, and nothing is returned
that the ledger has not got.

The desk applies the policy to one request while the token signs the one before, and waits
for a batch's commit before it takes the next: the policy's question "was this key issued
already?" is then answered by the ledger for earlier batches and by the desk for its own, so
two devices presenting one key are refused before the second is signed.

A CSR the policy refuses is recorded in the ledger's refusals (its reason and its bytes) before
its port hears the refusal, whatever the policy found wrong with it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator

from cryptography import x509

from stampline.errors import StamplineError
from stampline.pki.policy import AcceptedCsr, CsrRefused, check_csr
from stampline.pki.profile import DeviceIssuer, DeviceProfile, IssueRequest
from stampline.station.ledger import Ledger
from stampline.station.ledger_ops import IssuanceRow
from stampline.station.handoff import Inbox, Ticket, settle

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    csr: bytes
    profile: DeviceProfile
    subject: x509.Name
    chip_id: str
    batch_id: int
    device_serial: str
    ticket: Ticket[None] = field(default_factory=Ticket)
    der: bytes = b""


class IssuanceDesk:
    """Issues device certificates for every port of a line; use it as a context manager."""

    def __init__(self, issuer: DeviceIssuer, ledger: Ledger, max_batch: int = 64) -> None:
        self.issuer = issuer
        self.ledger = ledger
        self._max_batch = max_batch
        self._inbox: Inbox[_Request] = Inbox("the issuance desk is closed.")
        self.batches = 0  # recorded in one ledger operation each, for tests and statistics
        self._thread = threading.Thread(target=self._run, name="issuance-desk", daemon=True)
        self._thread.start()

    def issue(self, csr: bytes, profile: DeviceProfile, subject: x509.Name, chip_id: str, batch_id: int,
              device_serial: str) -> bytes:
        """Apply the CSR policy (the CSR must carry ``subject``), sign, record; returns the DER
        once the record is durable.

        Raises `CsrRefused` when the policy refuses the CSR (recorded in the ledger's refusals
        first, with ``recorded`` set, unless the ledger failed), and `StamplineError` when the
        token or the ledger refuses (a second live certificate for the chip, say): then no
        certificate is recorded and nothing is returned.
        """
        request = _Request(bytes(csr), profile, subject, chip_id, batch_id, device_serial)
        self._inbox.put(request)
        request.ticket.result()
        return request.der

    def close(self) -> None:
        """Finish what is queued, then stop."""
        if self._inbox.close():
            self._thread.join()

    def __enter__(self) -> IssuanceDesk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        batch: list[_Request] = []
        try:
            for batch in self._inbox.batches(self._max_batch):
                try:
                    self._serve(batch)
                except Exception as exc:  # this batch's ports hear it, the desk goes on
                    log.exception("the issuance desk failed a batch")
                    error = exc if isinstance(exc, StamplineError) else \
                        StamplineError(f"the issuance desk failed: {type(exc).__name__}.")
                    for request in batch:
                        if not request.ticket.done():
                            settle(request.ticket, None, error)
        except BaseException:  # a bug: refuse new work and answer everything queued, rather than hang
            log.exception("the issuance desk stopped")
            failure = StamplineError("the issuance desk stopped; see the log.")
            for request in batch + self._inbox.refuse_rest():
                if not request.ticket.done():
                    settle(request.ticket, None, failure)

    def _serve(self, batch: list[_Request]) -> None:
        refused: list[tuple[_Request, CsrRefused]] = []
        try:
            self._sign(batch, refused)
        finally:  # whatever became of the batch, each refused CSR is recorded, then its port hears it
            for request, refusal in refused:
                self._record_refusal(request, refusal)

    def _record_refusal(self, request: _Request, refusal: CsrRefused) -> None:
        try:
            self.ledger.record_refusal(request.chip_id, request.batch_id, request.device_serial, "issue",
                                       str(refusal), request.csr)
            refusal.recorded = True
        except Exception:  # the port hears the refusal unrecorded, and records it itself
            log.exception("a refused CSR could not be recorded")
        settle(request.ticket, None, refusal)

    def _sign(self, batch: list[_Request], refused: list[tuple[_Request, CsrRefused]]) -> None:
        accepted: list[tuple[_Request, AcceptedCsr]] = []
        signing: dict[str, str] = {}  # public key SHA-256 -> chip, for keys accepted in this batch

        def issued_to(public_key_sha256: str) -> str | None:
            return signing.get(public_key_sha256) or self.ledger.public_key_issued(public_key_sha256)

        def checked() -> Iterator[IssueRequest]:  # the policy, one request at a time, while the token signs
            for request in batch:
                try:
                    csr = check_csr(request.csr, request.profile, request.subject, issued_to)
                except CsrRefused as refusal:  # answered once recorded
                    refused.append((request, refusal))
                    continue
                except Exception as exc:  # the ledger could not say whether the key was issued: this port hears it
                    request.ticket.set_exception(exc)
                    continue
                accepted.append((request, csr))
                signing[csr.public_key_sha256] = request.chip_id
                yield csr, request.profile, request.chip_id

        try:
            issued = self.issuer.issue_many(checked())
        except Exception as exc:  # the token failed as a whole: every port not yet answered hears why
            answered = {request for request, _ in refused}
            for request in batch:
                if not request.ticket.done() and request not in answered:
                    request.ticket.set_exception(exc)
            return
        if len(issued) != len(accepted):
            raise StamplineError(f"the issuer returned {len(issued)} outcomes for {len(accepted)} certificates.")
        rows, tickets = [], []
        for (request, csr), certificate in zip(accepted, issued):
            if isinstance(certificate, Exception):  # the token refused this one: its port hears why
                request.ticket.set_exception(certificate)
                continue
            request.der = certificate.der
            fields = certificate.fields
            rows.append(IssuanceRow(
                chip_id=request.chip_id, batch_id=request.batch_id, device_serial=request.device_serial,
                der=certificate.der, public_key_sha256=csr.public_key_sha256, cert_serial=certificate.serial_hex,
                subject=certificate.subject, not_before=fields.not_before.timestamp(),
                not_after=fields.not_after.timestamp()))
            tickets.append(request.ticket)
        if not rows:
            return
        self.batches += 1
        try:
            self.ledger.submit_issuances(rows, tickets)
        except Exception:  # the ledger would not take them (closed): say what was signed for nothing
            log.error("signed but not recorded: %s", ", ".join(f"certificate {r.cert_serial} for chip {r.chip_id}"
                                                             for r in rows))
            raise
        for ticket in tickets:  # committed before the next batch's policy asks the ledger
            try:
                ticket.result()
            except Exception:  # its port hears it
                pass
