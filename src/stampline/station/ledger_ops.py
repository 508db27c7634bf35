"""The ledger's write operations. Each runs on the writer thread inside a group's transaction,
in its own savepoint: raising rolls back that operation alone. Each appends its audit record.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Sequence

from stampline.errors import StamplineError
from stampline.station import audit
from stampline.station.ledger_schema import CERTIFIED_STATES, PRE_ISSUANCE_STATES, DeviceState


def _require_batch(conn: sqlite3.Connection, batch_id: int) -> None:
    if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
        raise StamplineError(f"batch {batch_id} is not in the ledger.")


def _require_device(conn: sqlite3.Connection, chip_id: str) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM devices WHERE chip_id = ?", (chip_id,)).fetchone()
    if row is None:
        raise StamplineError(f"chip {chip_id} has not been seen by this ledger.")
    return row


def _live_serial(conn: sqlite3.Connection, chip_id: str) -> str | None:
    row = conn.execute("SELECT cert_serial FROM certificates WHERE chip_id = ? AND revoked_at IS NULL",
                       (chip_id,)).fetchone()
    return None if row is None else row[0]


def _claim_serial(conn: sqlite3.Connection, chip_id: str, serial: str) -> None:
    holder = conn.execute("SELECT chip_id FROM devices WHERE serial = ? AND chip_id <> ?", (serial, chip_id)).fetchone()
    if holder is not None:
        raise StamplineError(f"serial {serial} already belongs to chip {holder[0]}.")
    conn.execute("UPDATE devices SET serial = ?, updated_at = ? WHERE chip_id = ?", (serial, time.time(), chip_id))


def open_batch(conn: sqlite3.Connection, *, station_id: str, recipe_name: str, recipe_sha256: str, note: str) -> int:
    cursor = conn.execute(
        "INSERT INTO batches (started_at, station_id, recipe_name, recipe_sha256, note) VALUES (?, ?, ?, ?, ?)",
        (time.time(), station_id, recipe_name, recipe_sha256, note))
    batch_id = int(cursor.lastrowid or 0)
    audit.record(conn, "batch_opened", None, {"batches": batch_id})
    return batch_id


def device_seen(conn: sqlite3.Connection, *, chip_id: str, chip_model: str, mfg_fw_version: str,
                 app_fw_version: str, port: str, batch_id: int) -> sqlite3.Row:
    _require_batch(conn, batch_id)
    row = conn.execute("SELECT chip_model FROM devices WHERE chip_id = ?", (chip_id,)).fetchone()
    values = (batch_id, port, mfg_fw_version, app_fw_version, time.time(), chip_id)
    if row is None:
        conn.execute("INSERT INTO devices (batch_id, port, mfg_fw_version, app_fw_version, updated_at, chip_id,"
                     " chip_model, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     values + (chip_model, DeviceState.SEEN.value))
    elif row[0] != chip_model:
        raise StamplineError(f"chip {chip_id} was recorded as a {row[0]}, not a {chip_model}.")
    elif _live_serial(conn, chip_id) is not None:
        # certified: it stays in the batch (and on the port) that made it; the sighting is journaled
        audit.record(conn, "device_seen_again", chip_id, {}, port=port, batch_id=batch_id,
                     mfg_fw_version=mfg_fw_version, app_fw_version=app_fw_version)
        return _require_device(conn, chip_id)
    else:
        conn.execute("UPDATE devices SET batch_id = ?, port = ?, mfg_fw_version = ?, app_fw_version = ?,"
                     " updated_at = ? WHERE chip_id = ?", values)
    audit.record(conn, "device_seen", chip_id, {"devices": chip_id})
    return _require_device(conn, chip_id)


def allocate_serial(conn: sqlite3.Connection, *, chip_id: str, template: str, start: int) -> int:
    device = _require_device(conn, chip_id)
    if device["serial_number"] is not None:
        if device["serial_template"] != template:
            raise StamplineError(f"chip {chip_id} already has serial number {device['serial_number']} "
                                 f"from template '{device['serial_template']}'.")
        return int(device["serial_number"])
    counter = conn.execute("SELECT next_value FROM serial_counter WHERE template = ?", (template,)).fetchone()
    number = start if counter is None else max(start, counter[0])
    conn.execute("INSERT INTO serial_counter (template, next_value) VALUES (?, ?)"
                 " ON CONFLICT (template) DO UPDATE SET next_value = excluded.next_value", (template, number + 1))
    state = device["state"] if _live_serial(conn, chip_id) else DeviceState.SERIAL_ALLOCATED.value
    conn.execute("UPDATE devices SET serial_template = ?, serial_number = ?, state = ?, updated_at = ?"
                 " WHERE chip_id = ?", (template, number, state, time.time(), chip_id))
    audit.record(conn, "serial_allocated", chip_id, {"devices": chip_id, "serial_counter": template})
    return number


def set_device_serial(conn: sqlite3.Connection, *, chip_id: str, serial: str) -> None:
    device = _require_device(conn, chip_id)
    if device["serial"] == serial:
        return
    live = _live_serial(conn, chip_id)
    if live is not None:
        raise StamplineError(f"chip {chip_id} holds the live certificate {live} for serial {device['serial']}; "
                             "revoke it before changing the serial.")
    _claim_serial(conn, chip_id, serial)
    audit.record(conn, "serial_set", chip_id, {"devices": chip_id})


def set_state(conn: sqlite3.Connection, *, chip_id: str, state: DeviceState, detail: str) -> None:
    device = _require_device(conn, chip_id)
    live = _live_serial(conn, chip_id)
    if state in CERTIFIED_STATES and live is None:
        raise StamplineError(f"chip {chip_id} holds no live certificate, so it cannot be {state.value}.")
    if state in PRE_ISSUANCE_STATES and live is not None:
        raise StamplineError(f"chip {chip_id} holds the live certificate {live}, "
                             f"so it cannot go back to {state.value}.")
    now = time.time()
    provisioned_at = now if state is DeviceState.PROVISIONED else device["provisioned_at"]
    conn.execute("UPDATE devices SET state = ?, provisioned_at = ?, updated_at = ? WHERE chip_id = ?",
                 (state.value, provisioned_at, now, chip_id))
    audit.record(conn, "state_changed", chip_id, {"devices": chip_id}, detail=detail)


def record_step(conn: sqlite3.Connection, *, chip_id: str, batch_id: int, step: str, started_at: float,
                 duration_s: float, outcome: str, detail: str) -> None:
    _require_batch(conn, batch_id)
    (row,) = conn.execute("INSERT INTO steps (chip_id, batch_id, step, started_at, duration_s, outcome, detail)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING *",
                          (chip_id, batch_id, step, started_at, duration_s, outcome, detail)).fetchall()
    audit.record(conn, "step", chip_id, {"steps": row})


@dataclass(frozen=True)
class IssuanceRow:
    """A certificate to record, with the fields the ledger read from its DER."""

    chip_id: str
    batch_id: int
    device_serial: str
    der: bytes
    public_key_sha256: str
    cert_serial: str
    subject: str
    not_before: float
    not_after: float


_CERTIFICATE_COLUMNS = ("cert_serial", "chip_id", "device_serial", "subject", "public_key_sha256", "der",
                        "not_before", "not_after", "issued_at", "batch_id")


def record_issuances(conn: sqlite3.Connection, *, rows: Sequence[IssuanceRow]) -> list[StamplineError | None]:
    """Record certificates (the issuance desk's batch), each one refused or recorded as alone.

    On the line's hot path every statement is a hand-off of the GIL, so the whole batch takes a
    few statements: one for every precondition, one insert, one update, one audit insert. A
    refused row is left out and its error is in its place in the result (None: recorded).
    """
    found = _preconditions(conn, rows)
    errors: list[StamplineError | None] = []
    recorded: list[IssuanceRow] = []
    earlier: dict[str, IssuanceRow] = {}  # rows recorded before this one in the batch, by chip and by key
    for row, pre in zip(rows, found):
        try:
            _check_issuance(conn, row, pre, earlier)
        except StamplineError as exc:
            errors.append(exc)
            continue
        errors.append(None)
        recorded.append(row)
        earlier[row.chip_id] = earlier[row.public_key_sha256] = row
    if recorded:
        now = time.time()
        certificates = {r["cert_serial"]: r for r in conn.execute(
            f"INSERT INTO certificates ({', '.join(_CERTIFICATE_COLUMNS)}) VALUES "
            + ", ".join([f"({', '.join('?' * len(_CERTIFICATE_COLUMNS))})"] * len(recorded)) + " RETURNING *",
            [value for r in recorded for value in (r.cert_serial, r.chip_id, r.device_serial, r.subject,
                                                   r.public_key_sha256, r.der, r.not_before, r.not_after,
                                                   now, r.batch_id)]).fetchall()}
        devices = {r["chip_id"]: r for r in conn.execute(
            f"UPDATE devices SET state = ?, updated_at = ? WHERE chip_id IN ({', '.join('?' * len(recorded))})"
            " RETURNING *", [DeviceState.ISSUED.value, now, *(r.chip_id for r in recorded)]).fetchall()}
        audit.record_many(conn, [("certificate_issued", r.chip_id,
                                  {"certificates": audit.snapshot(certificates[r.cert_serial]),
                                   "devices": audit.snapshot(devices[r.chip_id])}) for r in recorded])
    return errors


def _preconditions(conn: sqlite3.Connection, rows: Sequence[IssuanceRow]) -> list[sqlite3.Row]:
    """Per row, in order: batch known, device known, the device's serial, its live certificate,
    another chip holding the key, the certificate serial already used."""
    wanted = ", ".join(["(?, ?, ?, ?, ?)"] * len(rows))
    return conn.execute(
        f"WITH wanted(i, chip, batch, key, serial) AS (VALUES {wanted})"
        " SELECT (SELECT 1 FROM batches WHERE id = w.batch), d.chip_id IS NOT NULL, d.serial,"
        " (SELECT cert_serial FROM certificates c WHERE c.chip_id = w.chip AND c.revoked_at IS NULL),"
        " (SELECT chip_id FROM certificates c WHERE c.public_key_sha256 = w.key AND c.chip_id <> w.chip LIMIT 1),"
        " (SELECT 1 FROM certificates c WHERE c.cert_serial = w.serial)"
        " FROM wanted w LEFT JOIN devices d ON d.chip_id = w.chip ORDER BY w.i",
        [value for i, r in enumerate(rows)
         for value in (i, r.chip_id, r.batch_id, r.public_key_sha256, r.cert_serial)]).fetchall()


def _check_issuance(conn: sqlite3.Connection, row: IssuanceRow, pre: sqlite3.Row,
                    earlier: dict[str, IssuanceRow]) -> None:
    batch_known, device_known, serial, live, holder, serial_taken = pre
    chip_id = row.chip_id
    if batch_known is None:
        raise StamplineError(f"batch {row.batch_id} is not in the ledger.")
    if not device_known:
        raise StamplineError(f"chip {chip_id} has not been seen by this ledger.")
    live = live or (earlier[chip_id].cert_serial if chip_id in earlier else None)
    if live is not None:
        raise StamplineError(f"chip {chip_id} already holds the live certificate {live}; "
                             "revoke it before issuing another.")
    same_key = earlier.get(row.public_key_sha256)
    holder = holder or (same_key.chip_id if same_key is not None else None)
    if holder is not None:
        raise StamplineError(f"the public key of chip {chip_id} was already certified for chip {holder}.")
    if serial_taken or any(r.cert_serial == row.cert_serial for r in earlier.values()):
        raise StamplineError(f"a certificate with serial {row.cert_serial} is already in the ledger.")
    if serial is None:
        _claim_serial(conn, chip_id, row.device_serial)
    elif serial != row.device_serial:
        raise StamplineError(f"chip {chip_id} has serial {serial}, not {row.device_serial}.")


def record_refusal(conn: sqlite3.Connection, *, chip_id: str, batch_id: int, device_serial: str | None, step: str,
                    reason: str, csr_der: bytes | None) -> None:
    _require_batch(conn, batch_id)
    cursor = conn.execute("INSERT INTO refusals (chip_id, device_serial, step, reason, csr_der, at, batch_id)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (chip_id, device_serial, step, reason, csr_der, time.time(), batch_id))
    audit.record(conn, "refusal", chip_id, {"refusals": cursor.lastrowid})


def revoke(conn: sqlite3.Connection, *, cert_serial: str, reason: str) -> None:
    row = conn.execute("SELECT chip_id, revoked_at FROM certificates WHERE cert_serial = ?", (cert_serial,)).fetchone()
    if row is None:
        raise StamplineError(f"no certificate with serial {cert_serial} is in the ledger.")
    if row["revoked_at"] is not None:
        raise StamplineError(f"certificate {cert_serial} is already revoked.")
    conn.execute("UPDATE certificates SET revoked_at = ?, revocation_reason = ? WHERE cert_serial = ?",
                 (time.time(), reason, cert_serial))
    audit.record(conn, "certificate_revoked", row["chip_id"], {"certificates": cert_serial})
