"""The ledger's write operations. Each runs on the writer thread inside a group's transaction,
in its own savepoint: raising rolls back that operation alone. Each appends its audit record.
"""

from __future__ import annotations

import sqlite3
import time

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


def record_issuance(conn: sqlite3.Connection, *, chip_id: str, batch_id: int, device_serial: str, der: bytes,
                     public_key_sha256: str, cert_serial: str, subject: str, not_before: float,
                     not_after: float) -> None:
    # every precondition in one statement: the line's hot path, where each statement costs a GIL hand-off
    found = conn.execute(
        "SELECT (SELECT 1 FROM batches WHERE id = :batch),"
        " (SELECT 1 FROM devices WHERE chip_id = :chip),"
        " (SELECT serial FROM devices WHERE chip_id = :chip),"
        " (SELECT cert_serial FROM certificates WHERE chip_id = :chip AND revoked_at IS NULL),"
        " (SELECT chip_id FROM certificates WHERE public_key_sha256 = :key AND chip_id <> :chip LIMIT 1),"
        " (SELECT 1 FROM certificates WHERE cert_serial = :serial)",
        {"batch": batch_id, "chip": chip_id, "key": public_key_sha256, "serial": cert_serial}).fetchone()
    batch_known, device_known, serial, live, holder, serial_taken = found
    if batch_known is None:
        raise StamplineError(f"batch {batch_id} is not in the ledger.")
    if device_known is None:
        raise StamplineError(f"chip {chip_id} has not been seen by this ledger.")
    if live is not None:
        raise StamplineError(f"chip {chip_id} already holds the live certificate {live}; "
                             "revoke it before issuing another.")
    if holder is not None:
        raise StamplineError(f"the public key of chip {chip_id} was already certified for chip {holder}.")
    if serial_taken:
        raise StamplineError(f"a certificate with serial {cert_serial} is already in the ledger.")
    if serial is None:
        _claim_serial(conn, chip_id, device_serial)
    elif serial != device_serial:
        raise StamplineError(f"chip {chip_id} has serial {serial}, not {device_serial}.")
    now = time.time()
    (certificate,) = conn.execute(
        "INSERT INTO certificates (cert_serial, chip_id, device_serial, subject, public_key_sha256, der,"
        " not_before, not_after, issued_at, batch_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        (cert_serial, chip_id, device_serial, subject, public_key_sha256, der, not_before, not_after,
         now, batch_id)).fetchall()
    (device,) = conn.execute("UPDATE devices SET state = ?, updated_at = ? WHERE chip_id = ? RETURNING *",
                             (DeviceState.ISSUED.value, now, chip_id)).fetchall()
    audit.record(conn, "certificate_issued", chip_id, {"certificates": certificate, "devices": device})


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
