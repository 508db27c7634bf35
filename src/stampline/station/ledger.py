"""The station's durable ledger: devices, serial numbers, certificates, refusals and steps.

One SQLite file in WAL mode with synchronous=FULL. A certificate is recorded, durably, before it
is written to the device: `Ledger.record_issuance` returns only once its transaction is on disk.
Many port threads write at once through one writer thread that commits them in groups (see
`ledger_writer`); reads use per-thread read-only connections. Every write also appends to the
hash-chained audit trail (see `audit`), which `verify` checks the tables against. A station
killed at any point reopens the file and finds everything that any call returned for.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import ssl
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stampline.errors import StamplineError
from stampline.station import audit
from stampline.station import ledger_ops as ops
from stampline.station import ledger_schema as schema
from stampline.station.ledger_schema import DeviceState
from stampline.station.handoff import Fanout, Ticket
from stampline.station.ledger_writer import GroupCommitWriter

__all__ = ["CertificateRecord", "DeviceRecord", "DeviceState", "Ledger", "LedgerView", "RefusalRecord",
           "StepRecord"]


STEP_OUTCOMES = ("ok", "failed", "skipped")
_CHIP_ID = re.compile(r"[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DeviceRecord:
    chip_id: str
    chip_model: str
    serial: str | None  # formatted, as printed on the label
    serial_template: str | None
    serial_number: int | None  # as allocated by `Ledger.allocate_serial`
    state: DeviceState
    batch_id: int
    port: str
    mfg_fw_version: str
    app_fw_version: str
    provisioned_at: float | None
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> DeviceRecord:
        return cls(**{**dict(row), "state": DeviceState(row["state"])})


@dataclass(frozen=True)
class CertificateRecord:
    cert_serial: str  # lowercase hex, no leading zeros
    chip_id: str
    device_serial: str
    subject: str  # RFC 4514
    public_key_sha256: str  # of the DER SubjectPublicKeyInfo
    der: bytes
    not_before: float
    not_after: float
    issued_at: float
    batch_id: int
    revoked_at: float | None
    revocation_reason: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.der)


@dataclass(frozen=True)
class RefusalRecord:
    id: int
    chip_id: str
    device_serial: str | None
    step: str
    reason: str
    csr_der: bytes | None
    at: float
    batch_id: int


@dataclass(frozen=True)
class StepRecord:
    id: int
    chip_id: str
    batch_id: int
    step: str
    started_at: float
    duration_s: float
    outcome: str
    detail: str


def _chip(chip_id: str) -> str:
    normal = chip_id.strip().lower() if isinstance(chip_id, str) else ""
    if not _CHIP_ID.fullmatch(normal):
        raise StamplineError(f"the chip id {chip_id!r} is not 12 hexadecimal digits.")
    return normal


def _sha256_hex(value: str, what: str) -> str:
    normal = value.strip().lower() if isinstance(value, str) else ""
    if not _SHA256.fullmatch(normal):
        raise StamplineError(f"the {what} is not a SHA-256 in hexadecimal.")
    return normal


def _cert_serial(value: str) -> str:
    try:
        return format(int(value, 16), "x")
    except (TypeError, ValueError):
        raise StamplineError(f"the certificate serial {value!r} is not hexadecimal.") from None


def issuance_row(chip_id: str, batch_id: int, device_serial: str, cert_der: bytes,
                 public_key_sha256: str) -> ops.IssuanceRow:
    """The row the ledger records for a certificate, read from the certificate itself.

    Refused: a DER that is not a certificate, or whose key does not hash to ``public_key_sha256``
    (SHA-256 of the DER SubjectPublicKeyInfo); no device serial.
    """
    chip_id = _chip(chip_id)
    digest = _sha256_hex(public_key_sha256, "public key hash")
    der = bytes(cert_der)
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        fields = {"cert_serial": format(cert.serial_number, "x"), "subject": cert.subject.rfc4514_string(),
                  "not_before": cert.not_valid_before_utc.timestamp(), "not_after": cert.not_valid_after_utc.timestamp()}
    except (ValueError, TypeError):
        raise StamplineError(f"the certificate for chip {chip_id} is not a readable DER X.509 certificate.") from None
    if hashlib.sha256(spki).hexdigest() != digest:
        raise StamplineError(f"the certificate for chip {chip_id} does not hold the public key it was recorded for.")
    if not device_serial:
        raise StamplineError("a certificate must name the device serial.")
    return ops.IssuanceRow(chip_id=chip_id, batch_id=batch_id, device_serial=device_serial, der=der,
                           public_key_sha256=digest, **fields)


def _check_row(row: ops.IssuanceRow) -> None:
    """The cheap checks of a row made elsewhere: normal chip id and key hash, a device serial."""
    if _chip(row.chip_id) != row.chip_id or \
            _sha256_hex(row.public_key_sha256, "public key hash") != row.public_key_sha256:
        raise StamplineError(f"the issuance record for chip {row.chip_id} is not in normal form.")
    if not row.device_serial:
        raise StamplineError("a certificate must name the device serial.")


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")


class LedgerView:
    """Read-only access to a ledger (exports, verification); it never creates or changes the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise StamplineError(f"no ledger at {self._path}.")
        self._init_reads()
        try:
            if not schema.check_schema(self._reader(), self._path):
                raise StamplineError(f"{self._path} is not a stampline ledger.")
        except BaseException:
            self.close()
            raise

    def _init_reads(self) -> None:
        self._readers: dict[threading.Thread, sqlite3.Connection] = {}
        self._readers_lock = threading.Lock()
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, {}
        for conn in readers.values():
            conn.close()

    def __enter__(self) -> LedgerView:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection; each statement sees the latest committed state.

        A connection lives as long as its thread: those of finished threads are closed here.
        """
        if self._closed:
            raise StamplineError(f"the ledger at {self._path} is closed.")
        me = threading.current_thread()
        conn = self._readers.get(me)
        if conn is None:
            conn = schema.connect(self._path, readonly=True)
            with self._readers_lock:
                for thread in [t for t in self._readers if not t.is_alive()]:
                    self._readers.pop(thread).close()
                self._readers[me] = conn
        return conn

    def device(self, chip_id: str) -> DeviceRecord | None:
        row = self._reader().execute("SELECT * FROM devices WHERE chip_id = ?", (_chip(chip_id),)).fetchone()
        return None if row is None else DeviceRecord.from_row(row)

    def live_certificate(self, chip_id: str) -> CertificateRecord | None:
        row = self._reader().execute("SELECT * FROM certificates WHERE chip_id = ? AND revoked_at IS NULL",
                                     (_chip(chip_id),)).fetchone()
        return None if row is None else CertificateRecord(**dict(row))

    def public_key_issued(self, public_key_sha256: str) -> str | None:
        """The chip a certificate for this key was issued to (live or revoked), if any; live first."""
        row = self._reader().execute(
            "SELECT chip_id FROM certificates WHERE public_key_sha256 = ? ORDER BY revoked_at IS NOT NULL LIMIT 1",
            (_sha256_hex(public_key_sha256, "public key hash"),)).fetchone()
        return None if row is None else row[0]

    def certificates(self, include_revoked: bool = True) -> list[CertificateRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self._reader().execute(f"SELECT * FROM certificates{where} ORDER BY issued_at, cert_serial")
        return [CertificateRecord(**dict(row)) for row in rows]

    def refusals(self, chip_id: str | None = None) -> list[RefusalRecord]:
        if chip_id is None:
            rows = self._reader().execute("SELECT * FROM refusals ORDER BY id")
        else:
            rows = self._reader().execute("SELECT * FROM refusals WHERE chip_id = ? ORDER BY id", (_chip(chip_id),))
        return [RefusalRecord(**dict(row)) for row in rows]

    def steps(self, chip_id: str) -> list[StepRecord]:
        rows = self._reader().execute("SELECT * FROM steps WHERE chip_id = ? ORDER BY id", (_chip(chip_id),))
        return [StepRecord(**dict(row)) for row in rows]

    def head(self) -> tuple[int, str]:
        """The audit trail's last (seq, hash): publish it elsewhere to detect a rewritten chain."""
        return audit.head(self._reader())

    def verify(self) -> list[str]:
        """Every problem in the ledger, one sentence each; empty when it is sound."""
        conn = self._reader()
        conn.execute("BEGIN")  # one snapshot, while the writer goes on
        try:
            return audit.verify(conn)
        finally:
            conn.execute("COMMIT")

    def export(self) -> Iterator[dict[str, Any]]:
        """One JSON-ready dict per device, ordered by serial, from one consistent snapshot."""
        conn = schema.connect(self._path, readonly=True)  # its own: the caller may read while iterating
        try:
            conn.execute("BEGIN")
            revoked: dict[str, list[str]] = {}
            for chip_id, serial in conn.execute(
                    "SELECT chip_id, cert_serial FROM certificates WHERE revoked_at IS NOT NULL ORDER BY revoked_at"):
                revoked.setdefault(chip_id, []).append(serial)
            for row in conn.execute(
                    "SELECT d.*, c.cert_serial, c.der FROM devices d LEFT JOIN certificates c"
                    " ON c.chip_id = d.chip_id AND c.revoked_at IS NULL"
                    " ORDER BY d.serial IS NULL, d.serial_number, d.serial, d.chip_id"):
                yield {
                    "serial": row["serial"],
                    "chip_id": row["chip_id"],
                    "chip_model": row["chip_model"],
                    "state": row["state"],
                    "certificate": None if row["der"] is None else ssl.DER_cert_to_PEM_cert(row["der"]),
                    "certificate_serial": row["cert_serial"],
                    "batch": row["batch_id"],
                    "provisioned_at": _iso(row["provisioned_at"]),
                    "mfg_fw_version": row["mfg_fw_version"],
                    "app_fw_version": row["app_fw_version"],
                    "revoked": revoked.get(row["chip_id"], []),
                }
        finally:
            conn.close()


class Ledger(LedgerView):
    """The station's read-write ledger; safe to share between threads. Close it (or use `with`)."""

    def __init__(self, path: str | os.PathLike[str], station_id: str = "station", *, max_group: int = 512) -> None:
        self._path = Path(path)
        self.station_id = station_id
        conn = schema.connect(self._path, readonly=False)
        try:
            schema.prepare_writer(conn, self._path)
        except BaseException:
            conn.close()
            raise
        self._init_reads()
        self._writer = GroupCommitWriter(conn, max_group=max_group)
        weakref.finalize(self, self._writer.close)  # a forgotten close() still commits what is queued, at exit

    @staticmethod
    def open_readonly(path: str | os.PathLike[str]) -> LedgerView:
        return LedgerView(path)

    def close(self) -> None:
        """Commit what is queued, stop the writer and close every connection."""
        super().close()
        self._writer.close()  # last, so that SQLite checkpoints and removes the WAL file

    def __enter__(self) -> Ledger:
        return self

    def _write(self, op: Any, **kwargs: Any) -> Any:
        """Run ``op(conn, **kwargs)`` in the next group commit and wait until it is durable."""
        return self._writer.submit(partial(op, **kwargs)).result()

    def flush(self) -> None:
        """Wait until everything queued so far (fire-and-forget steps too) is committed."""
        self._write(lambda conn: None)
        failures = self._writer.failures
        if failures:
            raise failures.pop(0)

    def open_batch(self, recipe_name: str, recipe_sha256: str, note: str = "") -> int:
        digest = _sha256_hex(recipe_sha256, "recipe hash")
        return int(self._write(ops.open_batch, station_id=self.station_id, recipe_name=recipe_name,
                                   recipe_sha256=digest, note=note))

    def device_seen(self, chip_id: str, chip_model: str, mfg_fw_version: str, app_fw_version: str,
                    port: str, batch_id: int) -> DeviceRecord:
        """Record that a chip is on a port (new or back again); its record says where it stands."""
        row = self._write(ops.device_seen, chip_id=_chip(chip_id), chip_model=chip_model,
                          mfg_fw_version=mfg_fw_version, app_fw_version=app_fw_version, port=port, batch_id=batch_id)
        return DeviceRecord.from_row(row)

    def allocate_serial(self, chip_id: str, template_name: str, start: int = 1) -> int:
        """The chip's serial number under ``template_name``: the same one on every call for a chip.

        A new template's counter starts at ``start``; a larger ``start`` moves an existing counter up.
        """
        if not template_name:
            raise StamplineError("a serial number template needs a name.")
        if start < 0:
            raise StamplineError("serial numbers start at zero or above.")
        return int(self._write(ops.allocate_serial, chip_id=_chip(chip_id), template=template_name, start=start))

    def set_device_serial(self, chip_id: str, serial: str) -> None:
        if not serial:
            raise StamplineError("a device serial cannot be empty.")
        self._write(ops.set_device_serial, chip_id=_chip(chip_id), serial=serial)

    def set_state(self, chip_id: str, state: DeviceState, detail: str = "") -> None:
        try:
            state = DeviceState(state)
        except ValueError:
            raise StamplineError(f"'{state}' is not a device state.") from None
        self._write(ops.set_state, chip_id=_chip(chip_id), state=state, detail=detail)

    def record_step(self, chip_id: str, batch_id: int, step: str, started_at: float, duration_s: float,
                    outcome: str, detail: str = "") -> None:
        """Queue a step record without waiting for it to be durable; `flush` waits (and reports failures)."""
        if outcome not in STEP_OUTCOMES:
            raise StamplineError(f"a step outcome is one of {', '.join(STEP_OUTCOMES)}, not '{outcome}'.")
        self._writer.post(partial(
            ops.record_step, chip_id=_chip(chip_id), batch_id=batch_id, step=step, started_at=float(started_at),
            duration_s=float(duration_s), outcome=outcome, detail=detail))

    def record_issuance(self, chip_id: str, batch_id: int, device_serial: str, cert_der: bytes,
                        public_key_sha256: str) -> None:
        """Record a certificate before it goes to the device; durable when this returns.

        Refused: a chip that already holds a live certificate, a key already certified for
        another chip, a serial other than the chip's, and what `issuance_row` refuses.
        """
        ticket: Ticket[None] = Ticket()
        self.submit_issuances([issuance_row(chip_id, batch_id, device_serial, cert_der, public_key_sha256)],
                              [ticket])
        ticket.result()

    def submit_issuances(self, rows: Sequence[ops.IssuanceRow], tickets: Sequence[Ticket[None]]) -> None:
        """Record several certificates together, without waiting: each ticket settles once its
        own record is durable, or with the reason it was refused. The rows are taken as they are
        (`issuance_row` reads one from a certificate; the issuance desk makes them as it signs)."""
        if len(rows) != len(tickets):
            raise StamplineError("each issuance record needs its own ticket.")
        taken, waiting = [], []
        for row, ticket in zip(rows, tickets):
            try:
                _check_row(row)
            except StamplineError as exc:
                ticket.set_exception(exc)
            else:
                taken.append(row)
                waiting.append(ticket)
        if taken:
            self._writer.submit(partial(ops.record_issuances, rows=taken), Fanout(waiting))

    def record_refusal(self, chip_id: str, batch_id: int, device_serial: str | None, step: str, reason: str,
                       csr_der: bytes | None) -> None:
        self._write(ops.record_refusal, chip_id=_chip(chip_id), batch_id=batch_id, device_serial=device_serial,
                    step=step, reason=reason, csr_der=None if csr_der is None else bytes(csr_der))

    def revoke(self, cert_serial: str, reason: str) -> None:
        if not reason:
            raise StamplineError("a revocation needs a reason.")
        self._write(ops.revoke, cert_serial=_cert_serial(cert_serial), reason=reason)
