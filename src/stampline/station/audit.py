"""The ledger's hash-chained, append-only audit trail, and the verification of a ledger against it.

Every write to another table appends, in the same transaction, one audit record whose payload
holds a snapshot of each row it wrote, keyed by table name (``{"devices": {...}, ...}``), with
BLOB columns replaced by their SHA-256 (``der`` -> ``der_sha256``). The latest snapshot of a
row must equal the row; that is how `verify` finds edits made behind the ledger's back.

Record ``seq`` has ``hash = SHA-256(prev_hash + canonical_json([seq, at, kind, chip_id, payload]))``
where ``prev_hash`` is the previous record's hash as 64 lowercase hex characters (64 zeros for the
first record), concatenated as ASCII text before the UTF-8 JSON, and canonical JSON has sorted keys,
no whitespace and no ASCII escaping. The chain detects edits; publishing `head` somewhere
else is what detects a rewrite of the whole chain.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections import defaultdict
from typing import Any, Sequence

from stampline.station.ledger_schema import (
    APPEND_ONLY_TRIGGERS, BLOB_COLUMNS, CERTIFIED_STATES, PRE_ISSUANCE_STATES, REAL_COLUMNS, TABLE_KEYS,
    DeviceState,
)

GENESIS = "0" * 64

#: {table: {key: (seq, snapshot)}}: each row's latest snapshot in the audit trail.
Expected = dict[str, dict[Any, tuple[int, dict[str, Any]]]]

_LABELS = {
    "batches": "batch {}",
    "devices": "device {}",
    "certificates": "certificate {}",
    "refusals": "refusal {}",
    "steps": "step record {}",
    "serial_counter": "serial counter '{}'",
}


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def record_hash(prev_hash: str, seq: int, at: float, kind: str, chip_id: str | None, payload: Any) -> str:
    return _hash_body(prev_hash, seq, at, kind, chip_id, canonical_json(payload))


def _hash_body(prev_hash: str, seq: int, at: float, kind: str, chip_id: str | None, payload_json: str) -> str:
    """`record_hash` for a payload already in canonical JSON: the list's JSON with it spliced in last."""
    head_json = canonical_json([seq, at, kind, chip_id])
    body = f"{head_json[:-1]},{payload_json}]"
    return hashlib.sha256(prev_hash.encode("utf-8") + body.encode("utf-8")).hexdigest()


def snapshot(row: sqlite3.Row) -> dict[str, Any]:
    """A row as the audit trail records it."""
    out: dict[str, Any] = {}
    for name in row.keys():
        value = row[name]
        if name in BLOB_COLUMNS:
            out[f"{name}_sha256"] = None if value is None else hashlib.sha256(value).hexdigest()
        elif name in REAL_COLUMNS and isinstance(value, int):
            out[name] = float(value)
        else:
            out[name] = value
    return out


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """The last record's (seq, hash); (0, 64 zeros) for an empty trail."""
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (0, GENESIS)


def record(conn: sqlite3.Connection, kind: str, chip_id: str | None, rows: dict[str, object], **extra: Any) -> int:
    """Append a record describing ``rows`` as they are now; call inside the write.

    ``rows`` maps a table to the key of the row, which is read back here, or to the row itself
    as an ``INSERT/UPDATE ... RETURNING *`` gave it (the same thing, without the read).
    """
    payload: dict[str, Any] = dict(extra)
    for table, key in rows.items():
        row = key if isinstance(key, sqlite3.Row) else \
            conn.execute(f"SELECT * FROM {table} WHERE {TABLE_KEYS[table]} = ?", (key,)).fetchone()
        payload[table] = snapshot(row)
    return record_many(conn, [(kind, chip_id, payload)])


def record_many(conn: sqlite3.Connection, records: Sequence[tuple[str, str | None, dict[str, Any]]]) -> int:
    """Append records given as (kind, chip_id, payload), payloads holding `snapshot`s, in one
    INSERT; returns the last seq."""
    last_seq, prev_hash = head(conn)
    at = time.time()
    values: list[Any] = []
    for seq, (kind, chip_id, payload) in enumerate(records, last_seq + 1):
        text = canonical_json(payload)
        digest = _hash_body(prev_hash, seq, at, kind, chip_id, text)
        values += (seq, at, kind, chip_id, text, prev_hash, digest)
        prev_hash = digest
    conn.execute("INSERT INTO audit (seq, at, kind, chip_id, payload, prev_hash, hash) VALUES "
                 + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(records)), values)
    return last_seq + len(records)


def verify(conn: sqlite3.Connection) -> list[str]:
    """Every problem found, one sentence each; call inside one read transaction."""
    problems = _check_triggers(conn)
    expected, chain_problems = _walk_chain(conn)
    problems += chain_problems
    problems += _compare_tables(conn, expected)
    problems += _check_consistency(conn)
    return problems


def _check_triggers(conn: sqlite3.Connection) -> list[str]:
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    return [f"the append-only trigger {name} on the audit table is missing." for name in APPEND_ONLY_TRIGGERS
            if name not in present]


def _walk_chain(conn: sqlite3.Connection) -> tuple[Expected, list[str]]:
    """Check the chain and collect each row's latest snapshot."""
    problems: list[str] = []
    expected: Expected = {table: {} for table in TABLE_KEYS}
    prev, want = GENESIS, 1
    for seq, at, kind, chip_id, text, prev_hash, stored in conn.execute(
            "SELECT seq, at, kind, chip_id, payload, prev_hash, hash FROM audit ORDER BY seq"):
        if seq != want:
            missing = f"record {want} is" if seq == want + 1 else f"records {want} to {seq - 1} are"
            problems.append(f"the audit chain breaks at seq {seq}: {missing} missing.")
        elif prev_hash != prev:
            problems.append(f"the audit chain breaks at seq {seq}: its prev_hash is not the hash of record {seq - 1}.")
        prev, want = stored, seq + 1
        try:
            payload = json.loads(text)
        except (TypeError, ValueError):
            problems.append(f"audit record {seq} has a payload that is not JSON.")
            continue
        if canonical_json(payload) != text:
            problems.append(f"audit record {seq} has a payload that is not canonical JSON.")
        elif record_hash(prev_hash, seq, at, kind, chip_id, payload) != stored:
            problems.append(f"audit record {seq} does not match its hash.")
        if isinstance(payload, dict):
            for table, key in TABLE_KEYS.items():
                snap = payload.get(table)
                if isinstance(snap, dict) and isinstance(snap.get(key), (str, int)):
                    expected[table][snap[key]] = (seq, snap)
    return expected, problems


def _compare_tables(conn: sqlite3.Connection, expected: Expected) -> list[str]:
    problems: list[str] = []
    for table, key in TABLE_KEYS.items():
        want = expected[table]
        for row in conn.execute(f"SELECT * FROM {table}"):
            snap = snapshot(row)
            label = _LABELS[table].format(snap[key])
            entry = want.pop(snap[key], None)
            if entry is None:
                problems.append(f"{label} has no audit record.")
                continue
            seq, recorded = entry
            fields = sorted(n for n in set(snap) | set(recorded) if snap.get(n) != recorded.get(n))
            if fields:
                problems.append(f"{label} differs from its audit record {seq} in {', '.join(fields)}.")
        for missing_key, (seq, _) in want.items():
            problems.append(f"audit record {seq} describes {_LABELS[table].format(missing_key)}, which is missing.")
    return problems


def _check_consistency(conn: sqlite3.Connection) -> list[str]:
    """Rules between tables: one live certificate per chip, and states that agree with certificates."""
    problems: list[str] = []
    live: dict[str, list[sqlite3.Row]] = defaultdict(list)
    certified: set[str] = set()
    for cert in conn.execute(
            "SELECT cert_serial, chip_id, device_serial, revoked_at FROM certificates ORDER BY cert_serial"):
        certified.add(cert["chip_id"])
        if cert["revoked_at"] is None:
            live[cert["chip_id"]].append(cert)
    for chip_id, certs in live.items():
        if len(certs) > 1:
            serials = ", ".join(c["cert_serial"] for c in certs)
            problems.append(f"chip {chip_id} has {len(certs)} live certificates ({serials}).")
    devices = {d["chip_id"]: d for d in conn.execute("SELECT chip_id, serial, state FROM devices")}
    for chip_id in sorted(certified - devices.keys()):
        problems.append(f"chip {chip_id} has certificates but no device record.")
    for chip_id, device in devices.items():
        try:
            state = DeviceState(device["state"])
        except ValueError:
            problems.append(f"device {chip_id} has the unknown state '{device['state']}'.")
            continue
        if state in CERTIFIED_STATES and chip_id not in certified:
            problems.append(f"device {chip_id} is {state.value} but has no certificate.")
        for cert in live.get(chip_id, []):
            if state in PRE_ISSUANCE_STATES:
                problems.append(f"device {chip_id} is {state.value} but holds the live certificate "
                                f"{cert['cert_serial']}.")
            if cert["device_serial"] != device["serial"]:
                problems.append(f"device {chip_id} has serial {device['serial']} but its live certificate "
                                f"{cert['cert_serial']} names {cert['device_serial']}.")
    return problems
