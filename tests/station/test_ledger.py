"""The station ledger: durability, group commit, issuance policy, serial allocation, audit verification."""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stampline.errors import StamplineError
from stampline.station.ledger import DeviceState, Ledger, LedgerView
from stampline.station.ledger_schema import connect
from stampline.station.handoff import Ticket
from stampline.station.ledger_writer import GroupCommitWriter

RECIPE_SHA = "ab" * 32
_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Device CA")])


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(device_serial: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, str]:
    """A real EC device certificate and the SHA-256 of its SubjectPublicKeyInfo."""
    public_key = (key or new_key()).public_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_serial)]))
            .issuer_name(_CA_NAME)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(_CA_KEY, hashes.SHA256()))
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_bytes(serialization.Encoding.DER), hashlib.sha256(spki).hexdigest()


def chip(n: int) -> str:
    return f"{n:012x}"


def seen(ledger: Ledger, batch: int, chip_id: str) -> None:
    ledger.device_seen(chip_id, "esp32", "mfg-1.0", "app-2.0", "/dev/ttyUSB0", batch)


def issue(ledger: Ledger, batch: int, chip_id: str, serial: str,
          key: ec.EllipticCurvePrivateKey | None = None) -> str:
    der, digest = make_cert(serial, key)
    ledger.record_issuance(chip_id, batch, serial, der, digest)
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger(tmp_path / "ledger.db", station_id="st-1") as opened:
        yield opened


@pytest.fixture
def batch(ledger: Ledger) -> int:
    return ledger.open_batch("esp32-default", RECIPE_SHA, note="test")


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# --- durability -----------------------------------------------------------------------------

def test_pragmas_wal_and_synchronous_full(ledger: Ledger, batch: int) -> None:
    assert raw(ledger.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._writer.submit(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]).result() == 2


def test_issuance_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as first:
        batch = first.open_batch("r", RECIPE_SHA)
        seen(first, batch, chip(1))
        cert_serial = issue(first, batch, chip(1), "SN-1")
    with Ledger(path) as again:
        assert again.live_certificate(chip(1)).cert_serial == cert_serial
        assert again.device(chip(1)).state is DeviceState.ISSUED
        assert again.verify() == []


CHILD = textwrap.dedent("""
    import datetime, hashlib, sys, threading
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from stampline.station.ledger import Ledger

    ca = ec.generate_private_key(ec.SECP256R1())
    ledger = Ledger(sys.argv[1])
    batch = ledger.open_batch("r", "ab" * 32)
    out = threading.Lock()

    def work(t):
        for i in range(10**6):
            chip_id, serial = f"{t:04x}{i:08x}", f"SN-{t}-{i}"
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
            now = datetime.datetime.now(datetime.timezone.utc)
            cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
                    .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")])).public_key(key)
                    .serial_number(x509.random_serial_number()).not_valid_before(now)
                    .not_valid_after(now + datetime.timedelta(days=1)).sign(ca, hashes.SHA256()))
            spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            ledger.device_seen(chip_id, "esp32", "1", "1", f"port{t}", batch)
            ledger.record_issuance(chip_id, batch, serial, cert.public_bytes(serialization.Encoding.DER),
                                   hashlib.sha256(spki).hexdigest())
            with out:
                sys.stdout.write(format(cert.serial_number, "x") + "\\n")
                sys.stdout.flush()

    for t in range(4):
        threading.Thread(target=work, args=(t,)).start()
""")


def test_sigkill_while_issuing_loses_nothing_that_returned(tmp_path: Path) -> None:
    path, script = tmp_path / "ledger.db", tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[str] = []
    try:
        while len(printed) < 150:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the child stopped early: {child.stderr.read()}")
            printed.append(line.strip())
    finally:
        child.kill()  # SIGKILL, mid-issuance
        rest, _ = child.communicate()
    printed += [line.strip() for line in rest.splitlines(keepends=True) if line.endswith("\n")]

    with Ledger(path) as reopened:
        assert reopened.verify() == []
        in_table = {c.cert_serial for c in reopened.certificates()}
        assert set(printed) <= in_table
        audited = {json.loads(p)["certificates"]["cert_serial"] for (p,) in raw(path).execute(
            "SELECT payload FROM audit WHERE kind = 'certificate_issued'")}
        assert audited == in_table
        # the restarted station goes on where the killed one stopped
        batch = reopened.open_batch("r", RECIPE_SHA)
        seen(reopened, batch, chip(0xFFFF00000001))
        issue(reopened, batch, chip(0xFFFF00000001), "SN-after-restart")
        assert reopened.verify() == []


# --- group commit ---------------------------------------------------------------------------

def test_group_commit_16_threads_all_issuances_present(ledger: Ledger, batch: int) -> None:
    threads, per_thread = 16, 100
    work = {t: [(chip(t * 1000 + i), f"SN-{t}-{i}", *make_cert(f"SN-{t}-{i}")) for i in range(per_thread)]
            for t in range(threads)}
    for items in work.values():
        for chip_id, *_ in items:
            seen(ledger, batch, chip_id)
    groups_before = ledger._writer.groups
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(items: list[tuple[str, str, bytes, str]]) -> None:
        start.wait()
        try:
            for chip_id, serial, der, digest in items:
                ledger.record_issuance(chip_id, batch, serial, der, digest)
        except BaseException as exc:  # reported below
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(items,)) for items in work.values()]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    certs = ledger.certificates()
    assert len(certs) == threads * per_thread
    assert {c.chip_id for c in certs} == {chip_id for items in work.values() for chip_id, *_ in items}
    assert ledger._writer.groups - groups_before < threads * per_thread  # operations were grouped
    assert ledger.verify() == []


def test_a_failing_operation_does_not_lose_the_rest_of_its_group(tmp_path: Path) -> None:
    conn = connect(tmp_path / "w.db", readonly=False)
    conn.execute("CREATE TABLE t (v INTEGER)")
    writer = GroupCommitWriter(conn)
    running, gate = threading.Event(), threading.Event()

    def block(c: sqlite3.Connection) -> bool:  # holds the writer so that the next three queue up
        running.set()
        return gate.wait(5)

    blocker = writer.submit(block)
    assert running.wait(5)

    def insert(value: int, fail: bool = False):
        def op(c: sqlite3.Connection) -> int:
            c.execute("INSERT INTO t VALUES (?)", (value,))
            if fail:
                raise StamplineError("refused.")
            return value
        return op

    futures: list[Ticket[int]] = [writer.submit(insert(1)), writer.submit(insert(2, fail=True)), writer.submit(insert(3))]
    groups = writer.groups
    gate.set()
    assert blocker.result() is True
    assert futures[0].result() == 1 and futures[2].result() == 3
    with pytest.raises(StamplineError, match="refused"):
        futures[1].result()
    assert writer.groups - groups == 2  # the blocker, then the three together
    writer.close()
    assert [v for (v,) in raw(tmp_path / "w.db").execute("SELECT v FROM t ORDER BY v")] == [1, 3]


# --- issuance policy ------------------------------------------------------------------------

def test_second_live_certificate_for_a_chip_is_refused(ledger: Ledger, batch: int) -> None:
    seen(ledger, batch, chip(1))
    first = issue(ledger, batch, chip(1), "SN-1")
    with pytest.raises(StamplineError, match="already holds the live certificate"):
        issue(ledger, batch, chip(1), "SN-1")
    assert [c.cert_serial for c in ledger.certificates()] == [first]


def test_same_public_key_for_another_chip_is_refused(ledger: Ledger, batch: int) -> None:
    key = new_key()
    seen(ledger, batch, chip(1))
    seen(ledger, batch, chip(2))
    issue(ledger, batch, chip(1), "SN-1", key)
    with pytest.raises(StamplineError, match="already certified for chip 000000000001"):
        issue(ledger, batch, chip(2), "SN-2", key)
    assert ledger.live_certificate(chip(2)) is None
    _, digest = make_cert("x", key)
    assert ledger.public_key_issued(digest) == chip(1)
    assert ledger.public_key_issued("00" * 32) is None


def test_after_revoke_a_new_certificate_is_allowed(ledger: Ledger, batch: int) -> None:
    seen(ledger, batch, chip(1))
    old = issue(ledger, batch, chip(1), "SN-1")
    ledger.revoke(old.upper(), "wrong label printed")
    new = issue(ledger, batch, chip(1), "SN-1")
    assert ledger.live_certificate(chip(1)).cert_serial == new
    revoked = [c for c in ledger.certificates() if c.revoked]
    assert [(c.cert_serial, c.revocation_reason) for c in revoked] == [(old, "wrong label printed")]
    assert [c.cert_serial for c in ledger.certificates(include_revoked=False)] == [new]
    with pytest.raises(StamplineError, match="already revoked"):
        ledger.revoke(old, "again")
    with pytest.raises(StamplineError, match="no certificate"):
        ledger.revoke("abcdef", "unknown")
    assert ledger.verify() == []


def test_issuance_refuses_inconsistent_input(ledger: Ledger, batch: int) -> None:
    with pytest.raises(StamplineError, match="has not been seen"):
        issue(ledger, batch, chip(9), "SN-9")
    seen(ledger, batch, chip(1))
    ledger.set_device_serial(chip(1), "SN-1")
    with pytest.raises(StamplineError, match="has serial SN-1, not SN-2"):
        issue(ledger, batch, chip(1), "SN-2")
    der, _ = make_cert("SN-1")
    with pytest.raises(StamplineError, match="does not hold the public key"):
        ledger.record_issuance(chip(1), batch, "SN-1", der, "11" * 32)
    with pytest.raises(StamplineError, match="not a readable DER"):
        ledger.record_issuance(chip(1), batch, "SN-1", b"\x30\x03junk", "11" * 32)
    assert ledger.certificates() == [] and ledger.device(chip(1)).state is DeviceState.SEEN


# --- devices, serials, states, steps --------------------------------------------------------

def test_allocate_serial_unique_across_threads_and_idempotent(ledger: Ledger, batch: int) -> None:
    threads, per_thread = 8, 50
    got: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for i in range(per_thread):
                chip_id = chip(t * 100 + i)
                seen(ledger, batch, chip_id)
                number = ledger.allocate_serial(chip_id, "ESP-{n:06d}")
                assert ledger.allocate_serial(chip_id, "ESP-{n:06d}") == number
                got[chip_id] = number
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    assert sorted(got.values()) == list(range(1, threads * per_thread + 1))
    some = chip(0)
    assert ledger.allocate_serial(some, "ESP-{n:06d}", start=5000) == got[some]  # still idempotent
    assert ledger.device(some).state is DeviceState.SERIAL_ALLOCATED
    with pytest.raises(StamplineError, match="already has serial number"):
        ledger.allocate_serial(some, "OTHER")
    seen(ledger, batch, chip(999_999))
    assert ledger.allocate_serial(chip(999_999), "ESP-{n:06d}", start=5000) == 5000  # start moves the counter up
    assert ledger.verify() == []


def test_device_seen_and_serials(ledger: Ledger, batch: int) -> None:
    record = ledger.device_seen(chip(1).upper(), "esp32", "m1", "a1", "/dev/ttyUSB3", batch)
    assert (record.chip_id, record.state, record.serial, record.port) == (chip(1), DeviceState.SEEN, None, "/dev/ttyUSB3")
    again = ledger.device_seen(chip(1), "esp32", "m2", "a2", "/dev/ttyUSB4", batch)
    assert (again.mfg_fw_version, again.port, again.state) == ("m2", "/dev/ttyUSB4", DeviceState.SEEN)
    with pytest.raises(StamplineError, match="recorded as a esp32"):
        ledger.device_seen(chip(1), "esp32c3", "m", "a", "p", batch)
    with pytest.raises(StamplineError, match="12 hexadecimal digits"):
        ledger.device_seen("xyz", "esp32", "m", "a", "p", batch)
    with pytest.raises(StamplineError, match="batch 99"):
        ledger.device_seen(chip(2), "esp32", "m", "a", "p", 99)
    seen(ledger, batch, chip(2))
    ledger.set_device_serial(chip(1), "SN-1")
    with pytest.raises(StamplineError, match="already belongs to chip 000000000001"):
        ledger.set_device_serial(chip(2), "SN-1")
    assert ledger.device(chip(2)).serial is None and ledger.device(chip(3)) is None


def test_set_state_follows_the_certificates(ledger: Ledger, batch: int) -> None:
    seen(ledger, batch, chip(1))
    with pytest.raises(StamplineError, match="no live certificate"):
        ledger.set_state(chip(1), DeviceState.PROVISIONED)
    ledger.set_state(chip(1), DeviceState.KEY_GENERATED)
    issue(ledger, batch, chip(1), "SN-1")
    for state in (DeviceState.WRITTEN, DeviceState.STAMPED, DeviceState.PROVISIONED):
        ledger.set_state(chip(1), state, detail="ok")
    with pytest.raises(StamplineError, match="cannot go back to seen"):
        ledger.set_state(chip(1), DeviceState.SEEN)
    with pytest.raises(StamplineError, match="not a device state"):
        ledger.set_state(chip(1), "sparkling")  # type: ignore[arg-type]
    device = ledger.device(chip(1))
    assert device.state is DeviceState.PROVISIONED and device.provisioned_at is not None


def test_steps_are_queued_then_flushed_into_the_chain(ledger: Ledger, batch: int) -> None:
    for i, outcome in enumerate(("ok", "failed", "skipped")):
        ledger.record_step(chip(1), batch, f"step{i}", 1000.0 + i, 0.25, outcome, detail=str(i))
    ledger.flush()
    steps = ledger.steps(chip(1))
    assert [(s.step, s.outcome, s.started_at, s.detail) for s in steps] == [
        ("step0", "ok", 1000.0, "0"), ("step1", "failed", 1001.0, "1"), ("step2", "skipped", 1002.0, "2")]
    kinds = [k for (k,) in raw(ledger.path).execute("SELECT kind FROM audit ORDER BY seq")]
    assert kinds.count("step") == 3
    with pytest.raises(StamplineError, match="outcome"):
        ledger.record_step(chip(1), batch, "x", 0, 0, "maybe")
    ledger.record_step(chip(1), 424242, "x", 0, 0, "ok")  # fails on the writer thread...
    with pytest.raises(StamplineError, match="batch 424242"):
        ledger.flush()  # ...and flush reports it
    ledger.flush()


def test_refusals_are_recorded(ledger: Ledger, batch: int) -> None:
    ledger.record_refusal(chip(1), batch, "SN-1", "csr", "the CSR's signature does not verify.", b"\x30\x00")
    ledger.record_refusal(chip(2), batch, None, "csr", "oversized", None)
    assert [(r.chip_id, r.csr_der) for r in ledger.refusals()] == [(chip(1), b"\x30\x00"), (chip(2), None)]
    assert [r.reason for r in ledger.refusals(chip(2))] == ["oversized"]
    assert ledger.verify() == []


def test_read_connections_of_finished_threads_are_closed(ledger: Ledger, batch: int) -> None:
    seen(ledger, batch, chip(1))
    for _ in range(20):
        reader = threading.Thread(target=ledger.device, args=(chip(1),))
        reader.start()
        reader.join()
    assert len(ledger._readers) <= 2  # this thread's and at most the last finished one's


def test_closed_ledger_refuses_calls(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.close()
    ledger.close()
    with pytest.raises(StamplineError, match="closed"):
        ledger.open_batch("r", RECIPE_SHA)
    with pytest.raises(StamplineError, match="closed"):
        ledger.device(chip(1))


def test_open_readonly_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(StamplineError, match="no ledger at"):
        Ledger.open_readonly(missing)
    assert not missing.exists()
    foreign = tmp_path / "foreign.db"
    raw(foreign).execute("CREATE TABLE x (y)")
    with pytest.raises(StamplineError, match="not a stampline ledger"):
        Ledger.open_readonly(foreign)
    with pytest.raises(StamplineError, match="not a stampline ledger"):
        Ledger(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not SQLite at all" * 10)
    with pytest.raises(StamplineError, match="not a stampline ledger"):
        Ledger(text)


# --- verify ---------------------------------------------------------------------------------

def populate(path: Path) -> dict[str, str]:
    """A small ledger: chip 1 provisioned, chip 2 re-issued after a revocation, chip 3 refused."""
    with Ledger(path) as ledger:
        batch = ledger.open_batch("r", RECIPE_SHA)
        for n in (1, 2, 3):
            seen(ledger, batch, chip(n))
            ledger.set_device_serial(chip(n), f"SN-{n}")
        c1 = issue(ledger, batch, chip(1), "SN-1")
        for state in (DeviceState.WRITTEN, DeviceState.STAMPED, DeviceState.PROVISIONED):
            ledger.set_state(chip(1), state)
        old2 = issue(ledger, batch, chip(2), "SN-2")
        ledger.revoke(old2, "rework")
        c2 = issue(ledger, batch, chip(2), "SN-2")
        ledger.record_refusal(chip(3), batch, "SN-3", "csr", "bad signature", b"\x30\x00")
        ledger.record_step(chip(1), batch, "flash", 1.0, 2.0, "ok")
        assert ledger.verify() == []
    return {"c1": c1, "old2": old2, "c2": c2}


def problems_after(path: Path, *statements: str | tuple[str, tuple]) -> list[str]:
    conn = raw(path)
    for statement in statements:
        sql, args = statement if isinstance(statement, tuple) else (statement, ())
        conn.execute(sql, args)
    conn.close()
    with Ledger.open_readonly(path) as view:
        return view.verify()


def test_verify_is_empty_for_a_sound_ledger(tmp_path: Path) -> None:
    populate(tmp_path / "l.db")
    with Ledger.open_readonly(tmp_path / "l.db") as view:
        assert isinstance(view, LedgerView) and not isinstance(view, Ledger)
        assert view.verify() == []


def test_verify_catches_an_edited_certificate_der(tmp_path: Path) -> None:
    serials = populate(tmp_path / "l.db")
    other, _ = make_cert("SN-1")
    problems = problems_after(tmp_path / "l.db", ("UPDATE certificates SET der = ? WHERE cert_serial = ?",
                                                  (other, serials["c1"])))
    assert any(serials["c1"] in p and "der_sha256" in p for p in problems), problems


def test_verify_catches_an_edited_device_state(tmp_path: Path) -> None:
    populate(tmp_path / "l.db")
    problems = problems_after(tmp_path / "l.db", f"UPDATE devices SET state = 'provisioned' WHERE chip_id = '{chip(3)}'")
    assert any(f"device {chip(3)} differs" in p and "state" in p for p in problems), problems
    assert f"device {chip(3)} is provisioned but has no certificate." in problems


def test_verify_catches_a_deleted_audit_record(tmp_path: Path) -> None:
    populate(tmp_path / "l.db")
    problems = problems_after(tmp_path / "l.db", "DROP TRIGGER audit_no_delete", "DELETE FROM audit WHERE seq = 3")
    assert "the audit chain breaks at seq 4: record 3 is missing." in problems
    assert any("audit_no_delete" in p for p in problems)


def test_verify_catches_an_edited_audit_payload(tmp_path: Path) -> None:
    serials = populate(tmp_path / "l.db")
    problems = problems_after(
        tmp_path / "l.db", "DROP TRIGGER audit_no_update",
        ("UPDATE audit SET payload = replace(payload, '\"rework\"', '\"compromised\"')"
         " WHERE kind = 'certificate_revoked'", ()))
    seq = raw(tmp_path / "l.db").execute("SELECT seq FROM audit WHERE kind = 'certificate_revoked'").fetchone()[0]
    assert f"audit record {seq} does not match its hash." in problems
    assert any(serials["old2"] in p and "revocation_reason" in p for p in problems), problems


def test_verify_catches_a_certificate_inserted_without_audit(tmp_path: Path) -> None:
    populate(tmp_path / "l.db")
    der, digest = make_cert("SN-3")
    problems = problems_after(tmp_path / "l.db", (
        "INSERT INTO certificates (cert_serial, chip_id, device_serial, subject, public_key_sha256, der, not_before,"
        " not_after, issued_at, batch_id) VALUES ('abc123', ?, 'SN-3', 'CN=SN-3', ?, ?, 0, 1, 0, 1)",
        (chip(3), digest, der)))
    assert "certificate abc123 has no audit record." in problems
    assert any(f"device {chip(3)} is seen but holds the live certificate abc123" in p for p in problems), problems


def test_verify_catches_two_live_certificates_and_a_missing_row(tmp_path: Path) -> None:
    serials = populate(tmp_path / "l.db")
    problems = problems_after(tmp_path / "l.db", "DROP INDEX certificates_one_live_per_chip",
                              (f"UPDATE certificates SET revoked_at = NULL WHERE cert_serial = '{serials['old2']}'", ()),
                              "DELETE FROM steps")
    assert any(f"chip {chip(2)} has 2 live certificates" in p for p in problems), problems
    assert any("step record 1, which is missing" in p for p in problems), problems


def test_triggers_refuse_update_and_delete_on_audit(tmp_path: Path) -> None:
    populate(tmp_path / "l.db")
    conn = raw(tmp_path / "l.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET kind = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE seq = 1")
    with Ledger.open_readonly(tmp_path / "l.db") as view:
        assert view.verify() == []


# --- export ---------------------------------------------------------------------------------

def test_export_carries_pem_state_and_revocations(tmp_path: Path) -> None:
    serials = populate(tmp_path / "l.db")
    with Ledger.open_readonly(tmp_path / "l.db") as view:
        lines = {line["chip_id"]: json.loads(json.dumps(line)) for line in view.export()}
        live = {c.chip_id: c for c in view.certificates(include_revoked=False)}
    assert list(lines) == [chip(1), chip(2), chip(3)]  # ordered by serial
    one = lines[chip(1)]
    assert (one["serial"], one["state"], one["certificate_serial"], one["revoked"]) == (
        "SN-1", "provisioned", serials["c1"], [])
    assert x509.load_pem_x509_certificate(one["certificate"].encode()).public_bytes(
        serialization.Encoding.DER) == live[chip(1)].der
    assert one["provisioned_at"].endswith("Z") and one["batch"] == 1 and one["chip_model"] == "esp32"
    assert (one["mfg_fw_version"], one["app_fw_version"]) == ("mfg-1.0", "app-2.0")
    two = lines[chip(2)]
    assert (two["state"], two["certificate_serial"], two["revoked"]) == ("issued", serials["c2"], [serials["old2"]])
    three = lines[chip(3)]
    assert (three["state"], three["certificate"], three["certificate_serial"], three["provisioned_at"]) == (
        "seen", None, None, None)


def test_export_while_writing_reads_one_snapshot(ledger: Ledger, batch: int) -> None:
    for n in range(5):
        seen(ledger, batch, chip(n))
    exported = ledger.export()
    first = next(exported)
    seen(ledger, batch, chip(99))  # written while the export is open
    assert ledger.device(chip(99)) is not None
    assert len([first, *exported]) == 5


def test_the_audit_trail_knows_every_real_column_of_the_schema() -> None:
    import re
    from stampline.station.ledger_schema import REAL_COLUMNS, SCHEMA
    declared = {m.group(1) for statement in SCHEMA for m in re.finditer(r"\n\s+(\w+) REAL\b", statement)}
    assert declared == REAL_COLUMNS


def test_a_writer_that_stops_answers_what_is_queued_and_refuses_new_work(tmp_path: Path) -> None:
    conn = connect(tmp_path / "w.db", readonly=False)
    writer = GroupCommitWriter(conn)
    running, gate = threading.Event(), threading.Event()

    def block(c: sqlite3.Connection) -> None:  # holds the writer so that the next ones queue up
        running.set()
        gate.wait(5)
        raise SystemExit("a bug that is not an Exception")  # escapes the group commit: the writer stops

    in_flight = writer.submit(block)
    assert running.wait(5)
    queued = [writer.submit(lambda c: 1) for _ in range(3)]
    gate.set()
    for ticket in [in_flight, *queued]:
        with pytest.raises(StamplineError, match="writer stopped"):
            ticket.result()
    with pytest.raises(StamplineError, match="closed"):
        writer.submit(lambda c: 1)
    conn.close()
