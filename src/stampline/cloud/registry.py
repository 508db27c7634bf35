"""The local endpoint's registry: registered CAs, device certificates and their states, the
certificates the station exported, and the events — SQLite, one file.

States follow AWS IoT Core: a certificate from a registered CA is PENDING_ACTIVATION at its
first connection, ACTIVE once the activation policy accepts it, REVOKED for good. A certificate
signed by a registered CA but absent from every ledger export stays pending and is flagged
``suspect``: the counterfeit case (a token signing outside the station).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from stampline import private
from stampline.cloud.verification import check_registration
from stampline.errors import StamplineError

PENDING = "PENDING_ACTIVATION"
ACTIVE = "ACTIVE"
REVOKED = "REVOKED"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cas (ca_id TEXT PRIMARY KEY, subject TEXT, pem TEXT NOT NULL, status TEXT NOT NULL,
    auto_registration INTEGER NOT NULL, registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS codes (code TEXT PRIMARY KEY, issued_at REAL NOT NULL, used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS exported (fingerprint TEXT PRIMARY KEY, serial TEXT NOT NULL, chip_id TEXT,
    source TEXT, imported_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS exported_revoked (cert_serial TEXT PRIMARY KEY, imported_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (cert_id TEXT PRIMARY KEY, serial TEXT NOT NULL, chip_id TEXT,
    ca_id TEXT NOT NULL, pem TEXT NOT NULL, state TEXT NOT NULL, suspect INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '', first_seen REAL, activated_at REAL, revoked_at REAL, connections INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS certificates_serial ON certificates(serial);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, cert_id TEXT,
    payload TEXT NOT NULL);
"""


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _name(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else ""


@dataclass(frozen=True)
class DeviceEntry:
    cert_id: str
    serial: str
    chip_id: str
    ca_id: str
    state: str
    suspect: bool
    reason: str
    first_seen: float | None
    activated_at: float | None
    revoked_at: float | None
    hello_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"serial": self.serial, "chip_id": self.chip_id, "state": self.state, "suspect": self.suspect,
                "reason": self.reason, "certificate_id": self.cert_id, "ca_id": self.ca_id,
                "first_seen": self.first_seen, "activated_at": self.activated_at, "revoked_at": self.revoked_at,
                "hello_at": self.hello_at}


class Registry:
    """Thread-safe (one connection, one lock): the endpoint service and the CLI share the file."""

    name = "local endpoint"

    def __init__(self, path: Path) -> None:
        private.make_dir(path.parent)
        private.create_file(path)  # 0600: SQLite gives its -wal and -shm files the same mode
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: each transaction survives a crash of the process
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(certificates)")}
        for column, kind in (("hello_at", "REAL"), ("hello", "TEXT")):  # registries made before these existed
            if column not in columns:
                self._db.execute(f"ALTER TABLE certificates ADD COLUMN {column} {kind}")
        self._lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction for several writes (a registration and its events): one commit."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._depth == 1:
                    self._db.execute("ROLLBACK")
                raise
            else:
                if self._depth == 1:
                    self._db.execute("COMMIT")
            finally:
                self._depth -= 1

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: Iterable[Any] = ()) -> None:
        with self._lock:
            self._db.execute(sql, tuple(args))

    def _event(self, kind: str, cert_id: str | None, payload: dict[str, Any]) -> dict[str, Any]:
        at = time.time()
        self._write("INSERT INTO events (at, kind, cert_id, payload) VALUES (?, ?, ?, ?)",
                    (at, kind, cert_id, json.dumps(payload, sort_keys=True)))
        return {"kind": kind, "at": at, **payload}

    # -- CAs --------------------------------------------------------------------------------------

    def registration_code(self) -> str:
        code = secrets.token_hex(32)
        self._write("INSERT INTO codes (code, issued_at) VALUES (?, ?)", (code, time.time()))
        return code

    def register_ca(self, ca_cert: x509.Certificate, verification: x509.Certificate,
                    auto_registration: bool = True) -> str:
        code = _name(verification, NameOID.COMMON_NAME)
        with self._lock:
            row = self._db.execute("SELECT used FROM codes WHERE code = ?", (code,)).fetchone()
            if row is None:
                raise StamplineError("the verification certificate does not carry a registration code this endpoint issued.")
            if row["used"]:
                raise StamplineError("that registration code was used already; ask for a new one.")
            check_registration(ca_cert, verification, code)
            ca_id = fingerprint(ca_cert)
            self._db.execute("UPDATE codes SET used = 1 WHERE code = ?", (code,))
            self._db.execute("INSERT OR REPLACE INTO cas VALUES (?, ?, ?, 'ACTIVE', ?, ?)",
                             (ca_id, ca_cert.subject.rfc4514_string(), ca_cert.public_bytes(Encoding.PEM).decode(),
                              int(auto_registration), time.time()))
        self._event("ca_registered", None, {"caCertificateId": ca_id})
        return ca_id

    def revoke_ca(self, ca_id: str) -> None:
        self._write("UPDATE cas SET status = 'REVOKED' WHERE ca_id = ?", (ca_id,))
        self._event("ca_revoked", None, {"caCertificateId": ca_id})

    def cas(self, active_only: bool = True) -> list[x509.Certificate]:
        with self._lock:
            rows = self._db.execute("SELECT pem FROM cas" + (" WHERE status = 'ACTIVE'" if active_only else "")).fetchall()
        return [x509.load_pem_x509_certificate(r["pem"].encode()) for r in rows]

    def ca_id_for(self, cert: x509.Certificate) -> str | None:
        """The registered, active CA that issued ``cert`` (signature checked), or None."""
        from stampline.pki.x509 import verify_signed_by

        for ca in self.cas():
            if ca.subject == cert.issuer and verify_signed_by(cert, ca.public_key()):  # type: ignore[arg-type]
                return fingerprint(ca)
        return None

    # -- what the station exported ----------------------------------------------------------------

    def import_export(self, rows: Iterable[dict[str, Any]], source: str) -> int:
        """Record the certificates of a ledger export; returns how many were new."""
        added = 0
        now = time.time()
        with self._lock:
            for row in rows:
                for cert_serial in row.get("revoked") or []:  # the station revoked these (rework)
                    self._db.execute("INSERT OR IGNORE INTO exported_revoked VALUES (?, ?)",
                                     (str(cert_serial).lower().lstrip("0") or "0", now))
                pem = row.get("certificate")
                if not pem:
                    continue
                cert = x509.load_pem_x509_certificate(pem.encode())
                cursor = self._db.execute("INSERT OR IGNORE INTO exported VALUES (?, ?, ?, ?, ?)",
                                          (fingerprint(cert), row.get("serial") or "", row.get("chip_id"), source, now))
                added += cursor.rowcount
        self._event("ledger_imported", None, {"source": source, "added": added})
        return added

    def revoked_by_station(self, cert: x509.Certificate) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM exported_revoked WHERE cert_serial = ?",
                                    (format(cert.serial_number, "x"),)).fetchone() is not None

    def exported(self, cert_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM exported WHERE fingerprint = ?", (cert_id,)).fetchone() is not None

    # -- device certificates ----------------------------------------------------------------------

    def state(self, cert_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM certificates WHERE cert_id = ?", (cert_id,)).fetchone()
        return row["state"] if row else None

    def first_connection(self, cert: x509.Certificate, ca_id: str) -> dict[str, Any] | None:
        """Record a certificate seen for the first time as PENDING_ACTIVATION; return the
        registration event (None when the certificate was known already)."""
        cert_id = fingerprint(cert)
        serial = _name(cert, NameOID.COMMON_NAME)
        chip_id = _name(cert, NameOID.SERIAL_NUMBER)
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO certificates (cert_id, serial, chip_id, ca_id, pem, state, first_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cert_id, serial, chip_id, ca_id, cert.public_bytes(Encoding.PEM).decode(), PENDING, time.time()))
            self._db.execute("UPDATE certificates SET connections = connections + 1 WHERE cert_id = ?", (cert_id,))
        if not cursor.rowcount:
            return None
        return self._event("registered", cert_id, {
            "certificateId": cert_id, "caCertificateId": ca_id, "certificateStatus": PENDING,
            "certificateRegistrationTimestamp": int(time.time() * 1000)})

    def set_state(self, cert_id: str, state: str, reason: str = "", suspect: bool = False) -> None:
        column = {ACTIVE: "activated_at", REVOKED: "revoked_at"}.get(state)
        with self._lock:
            current = self.state(cert_id)
            if current == REVOKED and state != REVOKED:
                raise StamplineError(f"certificate {cert_id[:16]}... is revoked for good.")
            self._db.execute("UPDATE certificates SET state = ?, reason = ?, suspect = ?"
                             + (f", {column} = coalesce({column}, ?)" if column else "") + " WHERE cert_id = ?",
                             (state, reason, int(suspect), *((time.time(),) if column else ()), cert_id))
        self._event(state.lower(), cert_id, {"reason": reason, "suspect": suspect})

    def record_hello(self, serial: str, payload: str) -> None:
        """The device's first message on its own topic arrived (the ACL let only that device publish it)."""
        self._write("UPDATE certificates SET hello_at = coalesce(hello_at, ?), hello = ? "
                    "WHERE serial = ? AND state = 'ACTIVE'", (time.time(), payload, serial))

    def pem(self, cert_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT pem FROM certificates WHERE cert_id = ?", (cert_id,)).fetchone()
        return row["pem"] if row else None

    def devices(self, state: str | None = None) -> list[DeviceEntry]:
        query = "SELECT * FROM certificates" + (" WHERE state = ?" if state else "") + " ORDER BY serial, first_seen"
        with self._lock:
            rows = self._db.execute(query, (state,) if state else ()).fetchall()
        return [DeviceEntry(r["cert_id"], r["serial"], r["chip_id"] or "", r["ca_id"], r["state"], bool(r["suspect"]),
                            r["reason"], r["first_seen"], r["activated_at"], r["revoked_at"], r["hello_at"])
                for r in rows]

    def by_serial(self, serial: str) -> list[DeviceEntry]:
        return [d for d in self.devices() if d.serial == serial]

    # -- bulk registration (manifests) --------------------------------------------------------

    def register_device(self, serial: str, certificate_pem: str, ca_certificate_pem: str | None) -> str:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
        cert_id = fingerprint(cert)
        state = self.state(cert_id)
        if state == REVOKED:
            raise StamplineError(f"the certificate of {serial} is revoked at this endpoint.")
        if state == ACTIVE:
            return cert_id
        ca_id = self.ca_id_for(cert)
        if ca_id is None:
            raise StamplineError(f"the certificate of {serial} is not issued by a CA registered at this endpoint.")
        self.first_connection(cert, ca_id)
        self.set_state(cert_id, ACTIVE, "bulk registration")
        return cert_id
