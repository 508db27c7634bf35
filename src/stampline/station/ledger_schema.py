"""The ledger's SQLite schema, its version, the device states and how connections are opened.

Timestamps the ledger writes are POSIX seconds (REAL). Certificates' validity is stored the
same way. Nothing secret is ever stored: certificates, CSRs and public data only.
"""

from __future__ import annotations

import sqlite3
from enum import Enum
from pathlib import Path

from stampline import private
from stampline.errors import StamplineError

SCHEMA_VERSION = 1
APPLICATION_ID = 0x53544C47  # "STLG" in the SQLite header: marks the file as a stampline ledger
BUSY_TIMEOUT_S = 30.0


class DeviceState(str, Enum):
    SEEN = "seen"
    SERIAL_ALLOCATED = "serial_allocated"
    KEY_GENERATED = "key_generated"
    ISSUED = "issued"  # certificate committed to the ledger
    WRITTEN = "written"  # certificate written to the device and read back
    STAMPED = "stamped"  # NVS stamp written
    PROVISIONED = "provisioned"
    LOCKING = "locking"  # secure bootloader written, rebooted into its first boot
    SECURED = "secured"  # the device reported secure boot, flash encryption and a closed door
    FAILED = "failed"
    REWORKED = "reworked"


#: States that need a certificate: a chip cannot reach them without one being committed
#: (a state added later after `issued`, such as `secured`, belongs here).
CERTIFIED_STATES = frozenset({DeviceState.ISSUED, DeviceState.WRITTEN, DeviceState.STAMPED, DeviceState.PROVISIONED,
                              DeviceState.LOCKING, DeviceState.SECURED})
#: States before issuance: a chip holding a live certificate cannot be in them.
PRE_ISSUANCE_STATES = frozenset({DeviceState.SEEN, DeviceState.SERIAL_ALLOCATED, DeviceState.KEY_GENERATED})

#: Every audited table and its key column; each audit payload names rows by these.
TABLE_KEYS = {
    "batches": "id",
    "devices": "chip_id",
    "certificates": "cert_serial",
    "refusals": "id",
    "steps": "id",
    "serial_counter": "template",
}
#: Columns the audit trail records as a SHA-256 (``<column>_sha256``) rather than verbatim.
BLOB_COLUMNS = frozenset({"der", "csr_der"})
#: Columns declared REAL (in every table that has them). SQLite may hand a whole number back
#: as an INTEGER from ``RETURNING``; the audit trail always records them as floats.
REAL_COLUMNS = frozenset({"started_at", "provisioned_at", "updated_at", "not_before", "not_after", "issued_at",
                          "revoked_at", "at", "duration_s"})

APPEND_ONLY_TRIGGERS = ("audit_no_update", "audit_no_delete")

SCHEMA = (
    """CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        started_at REAL NOT NULL,
        station_id TEXT NOT NULL,
        recipe_name TEXT NOT NULL,
        recipe_sha256 TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE devices (
        chip_id TEXT PRIMARY KEY CHECK (length(chip_id) = 12 AND chip_id NOT GLOB '*[^0-9a-f]*'),
        chip_model TEXT NOT NULL,
        serial TEXT UNIQUE,
        serial_template TEXT,
        serial_number INTEGER,
        state TEXT NOT NULL,
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        port TEXT NOT NULL,
        mfg_fw_version TEXT NOT NULL,
        app_fw_version TEXT NOT NULL,
        provisioned_at REAL,
        updated_at REAL NOT NULL,
        UNIQUE (serial_template, serial_number))""",
    """CREATE TABLE certificates (
        cert_serial TEXT PRIMARY KEY,
        chip_id TEXT NOT NULL REFERENCES devices(chip_id),
        device_serial TEXT NOT NULL,
        subject TEXT NOT NULL,
        public_key_sha256 TEXT NOT NULL,
        der BLOB NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        revoked_at REAL,
        revocation_reason TEXT)""",
    "CREATE UNIQUE INDEX certificates_one_live_per_chip ON certificates(chip_id) WHERE revoked_at IS NULL",
    "CREATE UNIQUE INDEX certificates_one_live_per_key ON certificates(public_key_sha256) WHERE revoked_at IS NULL",
    "CREATE INDEX certificates_by_key ON certificates(public_key_sha256)",
    """CREATE TABLE refusals (
        id INTEGER PRIMARY KEY,
        chip_id TEXT NOT NULL,
        device_serial TEXT,
        step TEXT NOT NULL,
        reason TEXT NOT NULL,
        csr_der BLOB,
        at REAL NOT NULL,
        batch_id INTEGER NOT NULL REFERENCES batches(id))""",
    "CREATE INDEX refusals_by_chip ON refusals(chip_id)",
    """CREATE TABLE steps (
        id INTEGER PRIMARY KEY,
        chip_id TEXT NOT NULL,
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        step TEXT NOT NULL,
        started_at REAL NOT NULL,
        duration_s REAL NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'failed', 'skipped')),
        detail TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX steps_by_chip ON steps(chip_id)",
    "CREATE TABLE serial_counter (template TEXT PRIMARY KEY, next_value INTEGER NOT NULL)",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        chip_id TEXT,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
)


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) returning `sqlite3.Row`s.

    Read-only connections use ``mode=ro`` so that they can never create a file.
    """
    target = path.resolve().as_uri() + "?mode=ro" if readonly else str(path)
    try:
        if not readonly:
            private.create_file(path)  # 0600: SQLite gives its -wal and -shm files the same mode
        conn = sqlite3.connect(target, uri=readonly, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise StamplineError(f"cannot open the ledger at {path}: {exc}.") from None
    conn.row_factory = sqlite3.Row
    return conn


def check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """True if the file is a ledger of our version, False if it is empty; refuse anything else."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError:
        raise StamplineError(f"{path} is not a stampline ledger.") from None
    if app_id == 0 and objects == 0:
        return False
    if app_id != APPLICATION_ID:
        raise StamplineError(f"{path} is not a stampline ledger.")
    if version != SCHEMA_VERSION:
        raise StamplineError(f"the ledger at {path} has schema version {version}, "
                             f"but this stampline reads version {SCHEMA_VERSION}.")
    return True


def prepare_writer(conn: sqlite3.Connection, path: Path) -> None:
    """Put the write connection in WAL + synchronous=FULL and create the schema if the file is new."""
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.DatabaseError:
        raise StamplineError(f"{path} is not a stampline ledger.") from None
    if mode != "wal":
        raise StamplineError(f"the ledger at {path} cannot use write-ahead logging (journal mode is {mode}).")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("BEGIN IMMEDIATE")  # two processes creating the same ledger at once: one wins
    try:
        if not check_schema(conn, path):
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
