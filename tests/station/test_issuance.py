"""The issuance desk: the CSR policy, batched signing through the token, each certificate durable
before it is returned, and refusals that reach their own port only."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stampline import ceremony
from stampline.errors import StamplineError
from stampline.pki import policy
from stampline.pki.policy import CsrRefused, check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.station.issuance import IssuanceDesk
from stampline.station import audit
from stampline.station.ledger import Ledger, issuance_row
from stampline.station.handoff import Fanout, Ticket
from stampline.workspace import Workspace


def profile(serial: str) -> DeviceProfile:
    return DeviceProfile("ec-p256", 365, {"common_name": serial, "organization": "Test"})


def subject(chip_id: str, serial: str) -> x509.Name:
    return csr_subject(serial, "Test", chip_id)


def csr(chip_id: str, serial: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(subject(chip_id, serial)).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.DER)


def spki(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_key().public_bytes(serialization.Encoding.DER,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


class CountingSigner:
    """The Sub CA's token signer, counting what it signs (every signature is a certificate)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.public_key, self.scheme, self.signed = inner, inner.public_key, inner.scheme, 0

    def sign(self, data: bytes) -> bytes:
        return self.sign_many([data])[0]

    def sign_many(self, items: Iterable[bytes]) -> list[bytes]:
        signatures = self.inner.sign_many(items)
        self.signed += len(signatures)
        return signatures


@pytest.fixture
def issuer(ca_workspace: Workspace) -> DeviceIssuer:
    token, label = ca_workspace.config().key_token("sub_ca")
    return DeviceIssuer(ceremony.load_sub(ca_workspace), CountingSigner(token.signer(label)))


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def open_batch(ledger: Ledger, chips: list[str]) -> int:
    batch = ledger.open_batch("p", "00" * 32)
    for chip_id in chips:
        ledger.device_seen(chip_id, "esp32c3", "1.0.0", "1.0.0", "port", batch)
    return batch


def at_once(work: dict[str, tuple]) -> dict[str, object]:  # type: ignore[type-arg]
    """Run desk.issue for every chip on its own thread, all released together; result or exception."""
    outcomes: dict[str, object] = {}
    start = threading.Barrier(len(work))

    def port(chip_id: str, desk: IssuanceDesk, args: tuple) -> None:  # type: ignore[type-arg]
        start.wait()
        try:
            outcomes[chip_id] = desk.issue(*args)
        except StamplineError as exc:
            outcomes[chip_id] = exc
    threads = [threading.Thread(target=port, args=(chip_id, *w), daemon=True) for chip_id, w in work.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_many_ports_at_once_are_signed_in_batches_and_each_is_durable(issuer: DeviceIssuer, ledger: Ledger,
                                                                      ca_workspace: Workspace) -> None:
    chips = [f"7cdfa1{i:06x}" for i in range(48)]
    batch = open_batch(ledger, chips)
    csrs = {chip_id: csr(chip_id, f"SN-{i}") for i, chip_id in enumerate(chips)}
    durable: list[bool] = []

    class Watching(IssuanceDesk):  # what a port sees when issue() returns
        def issue(self, *args):  # type: ignore[no-untyped-def]
            der = super().issue(*args)
            durable.append(ledger.live_certificate(args[3]).der == der)  # type: ignore[union-attr]
            return der
    with Watching(issuer, ledger) as desk:
        outcomes = at_once({c: (desk, (csrs[c], profile(f"SN-{i}"), subject(c, f"SN-{i}"), c, batch, f"SN-{i}"))
                            for i, c in enumerate(chips)})
        assert 0 < desk.batches < len(chips)  # the token signed several certificates per trip
    assert durable == [True] * len(chips)
    sub = ceremony.load_sub(ca_workspace)
    for chip_id, der in outcomes.items():
        assert isinstance(der, bytes), der
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(sub)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == chip_id
        assert cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo) == spki(csrs[chip_id])
    assert ledger.verify() == []


def test_two_devices_with_one_key_at_once_get_one_certificate(issuer: DeviceIssuer, ledger: Ledger) -> None:
    chips = [f"00000000000{i}" for i in range(1, 5)]
    batch = open_batch(ledger, chips)
    shared = ec.generate_private_key(ec.SECP256R1())
    with IssuanceDesk(issuer, ledger) as desk:
        outcomes = at_once({c: (desk, (csr(c, f"SN-{i}", shared), profile(f"SN-{i}"), subject(c, f"SN-{i}"), c,
                                       batch, f"SN-{i}")) for i, c in enumerate(chips)})
    issued = [c for c, o in outcomes.items() if isinstance(o, bytes)]
    refused = [o for o in outcomes.values() if isinstance(o, CsrRefused)]
    assert len(issued) == 1 and len(refused) == 3
    assert all(r.code == "key-reuse" and issued[0] in str(r) for r in refused)
    assert issuer.signer.signed == 1  # type: ignore[attr-defined]  # refused before signing, not after
    assert [c.chip_id for c in ledger.certificates()] == issued
    assert ledger.verify() == []


def test_a_key_certified_earlier_is_refused_by_the_policy(issuer: DeviceIssuer, ledger: Ledger) -> None:
    batch = open_batch(ledger, ["000000000001", "000000000002"])
    key = ec.generate_private_key(ec.SECP256R1())
    with IssuanceDesk(issuer, ledger) as desk:
        desk.issue(csr("000000000001", "SN-1", key), profile("SN-1"), subject("000000000001", "SN-1"),
                   "000000000001", batch, "SN-1")
        with pytest.raises(CsrRefused, match="already issued to device 000000000001") as refused:
            desk.issue(csr("000000000002", "SN-2", key), profile("SN-2"), subject("000000000002", "SN-2"),
                       "000000000002", batch, "SN-2")
    assert refused.value.code == "key-reuse"
    assert ledger.live_certificate("000000000002") is None


def test_a_refusal_reaches_its_own_port_only(issuer: DeviceIssuer, ledger: Ledger) -> None:
    chips = ["000000000001", "000000000002", "000000000003"]
    batch = open_batch(ledger, chips)
    with IssuanceDesk(issuer, ledger) as desk:
        desk.issue(csr(chips[0], "SN-1"), profile("SN-1"), subject(chips[0], "SN-1"), chips[0], batch, "SN-1")
        outcomes = at_once({
            chips[0]: (desk, (csr(chips[0], "SN-1"), profile("SN-1"), subject(chips[0], "SN-1"), chips[0], batch,
                              "SN-1")),  # a second live certificate: the ledger refuses
            chips[1]: (desk, (csr(chips[1], "SN-X"), profile("SN-2"), subject(chips[1], "SN-2"), chips[1], batch,
                              "SN-2")),  # the wrong subject: the policy refuses
            chips[2]: (desk, (csr(chips[2], "SN-3"), profile("SN-3"), subject(chips[2], "SN-3"), chips[2], batch,
                              "SN-3")),
        })
    assert "already holds the live certificate" in str(outcomes[chips[0]])
    assert isinstance(outcomes[chips[1]], CsrRefused) and outcomes[chips[1]].code == "subject"  # type: ignore[union-attr]
    assert isinstance(outcomes[chips[2]], bytes)
    assert [c.chip_id for c in ledger.certificates()] == [chips[0], chips[2]]
    assert ledger.verify() == []


def test_a_token_failure_reaches_every_port_and_records_nothing(issuer: DeviceIssuer, ledger: Ledger) -> None:
    chips = [f"00000000000{i}" for i in range(1, 7)]
    batch = open_batch(ledger, chips)

    class BrokenToken:
        public_key = issuer.signer.public_key
        scheme = issuer.signer.scheme

        def sign(self, data: bytes) -> bytes:
            raise StamplineError("token 'line' refused to sign with 'sub-ca': DeviceRemoved.")

        def sign_many(self, items: Iterable[bytes]) -> list[bytes]:
            raise StamplineError("token 'line' refused to sign with 'sub-ca': DeviceRemoved.")  # before any item

    with IssuanceDesk(DeviceIssuer(issuer.ca_cert, BrokenToken()), ledger) as desk:
        outcomes = at_once({c: (desk, (csr(c, f"SN-{i}"), profile(f"SN-{i}"), subject(c, f"SN-{i}"), c, batch,
                                       f"SN-{i}")) for i, c in enumerate(chips)})
    assert len(outcomes) == len(chips)  # every port was answered, none left waiting
    assert all("DeviceRemoved" in str(o) for o in outcomes.values())
    assert ledger.certificates() == []


@pytest.mark.parametrize("patched,code", [("load_der_x509_csr", "malformed"), ("spki_der", "internal")])
def test_a_csr_that_makes_the_policy_raise_is_a_recorded_refusal(issuer: DeviceIssuer, ledger: Ledger,
                                                                 monkeypatch: pytest.MonkeyPatch, patched: str,
                                                                 code: str) -> None:
    """A parser that raises anything (or a bug further on in the policy): the port hears a
    refusal, and the ledger holds it with the CSR's bytes, as for any other refusal."""
    chips = ["000000000001", "000000000002"]
    batch = open_batch(ledger, chips)
    hostile = csr(chips[0], "SN-1")

    def explode(*args: object) -> object:
        raise RuntimeError("nobody foresaw this")
    with IssuanceDesk(issuer, ledger) as desk:
        monkeypatch.setattr(policy.x509 if patched == "load_der_x509_csr" else policy.px, patched, explode)
        with pytest.raises(CsrRefused) as refused:
            desk.issue(hostile, profile("SN-1"), subject(chips[0], "SN-1"), chips[0], batch, "SN-1")
        monkeypatch.undo()
        desk.issue(csr(chips[1], "SN-2"), profile("SN-2"), subject(chips[1], "SN-2"), chips[1], batch, "SN-2")
    assert refused.value.code == code and refused.value.recorded
    (record,) = ledger.refusals(chips[0])
    assert (record.step, record.reason, record.csr_der, record.device_serial) == ("issue", str(refused.value),
                                                                                hostile, "SN-1")
    assert ledger.live_certificate(chips[0]) is None and ledger.live_certificate(chips[1]) is not None
    assert ledger.refusals(chips[1]) == []


def test_every_policy_refusal_is_recorded_by_the_desk_even_when_the_token_fails(issuer: DeviceIssuer,
                                                                                ledger: Ledger) -> None:
    chips = ["000000000001", "000000000002"]
    batch = open_batch(ledger, chips)

    class BrokenToken:
        public_key = issuer.signer.public_key
        scheme = issuer.signer.scheme

        def sign_many(self, items: Iterable[bytes]) -> list[bytes]:
            list(items)  # the policy sees every request, then the token fails
            raise StamplineError("token 'line' refused to sign with 'sub-ca': DeviceRemoved.")

    hostile = csr(chips[0], "SN-1") + b"\x00"
    with IssuanceDesk(DeviceIssuer(issuer.ca_cert, BrokenToken()), ledger) as desk:  # type: ignore[arg-type]
        outcomes = at_once({
            chips[0]: (desk, (hostile, profile("SN-1"), subject(chips[0], "SN-1"), chips[0], batch, "SN-1")),
            chips[1]: (desk, (csr(chips[1], "SN-2"), profile("SN-2"), subject(chips[1], "SN-2"), chips[1], batch,
                              "SN-2")),
        })
    assert isinstance(outcomes[chips[0]], CsrRefused) and outcomes[chips[0]].code == "trailing"  # type: ignore[union-attr]
    assert "DeviceRemoved" in str(outcomes[chips[1]])
    assert [(r.chip_id, r.csr_der) for r in ledger.refusals()] == [(chips[0], hostile)]


def test_the_closed_desk_refuses_work(issuer: DeviceIssuer, ledger: Ledger) -> None:
    desk = IssuanceDesk(issuer, ledger)
    desk.close()
    with pytest.raises(StamplineError, match="closed"):
        desk.issue(csr("000000000001", "SN-1"), profile("SN-1"), subject("000000000001", "SN-1"), "000000000001",
                   1, "SN-1")


def test_a_ticket_gives_its_result_or_raises_its_exception_to_every_waiter() -> None:
    good: Ticket[int] = Ticket()
    assert not good.done()
    got: list[int] = []
    waiters = [threading.Thread(target=lambda: got.append(good.result())) for _ in range(3)]
    for t in waiters:
        t.start()
    good.set_result(7)
    for t in waiters:
        t.join(5)
    assert good.done() and got == [7, 7, 7]
    with pytest.raises(StamplineError, match="once"):
        good.set_exception(StamplineError("late."))
    assert good.result() == 7  # the first outcome stands
    bad: Ticket[int] = Ticket()
    bad.set_exception(StamplineError("refused."))
    with pytest.raises(StamplineError, match="refused"):
        bad.result()


def test_the_ledger_records_a_batch_in_one_operation_each_row_refused_or_recorded_alone(ledger: Ledger,
                                                                                         issuer: DeviceIssuer) -> None:
    chips = [f"00000000000{i}" for i in range(1, 6)]
    batch = open_batch(ledger, chips)
    key = ec.generate_private_key(ec.SECP256R1())
    rows = []
    for i, (chip_id, k) in enumerate(zip(chips, (key, key, None, None, None))):
        serial = f"SN-{i}"
        accepted = check_csr(csr(chip_id, serial, k), profile(serial), subject(chip_id, serial), lambda _: None)
        rows.append(issuance_row(chip_id, batch, serial, issuer.issue(accepted, profile(serial), chip_id),
                                 accepted.public_key_sha256))
    rows[3] = dataclasses.replace(rows[3], cert_serial=rows[2].cert_serial)  # a serial used earlier in the batch
    rows.append(dataclasses.replace(rows[4], cert_serial="abc123"))  # chip 5 twice
    tickets: list[Ticket[None]] = [Ticket() for _ in rows]
    groups = ledger._writer.groups
    ledger.submit_issuances(rows, tickets)
    outcomes: list[str | None] = []
    for ticket in tickets:
        try:
            outcomes.append(ticket.result())
        except StamplineError as exc:
            outcomes.append(str(exc))
    assert outcomes == [
        None,
        f"the public key of chip {chips[1]} was already certified for chip {chips[0]}.",
        None,
        f"a certificate with serial {rows[2].cert_serial} is already in the ledger.",
        None,
        f"chip {chips[4]} already holds the live certificate {rows[4].cert_serial}; revoke it before issuing another.",
    ]
    assert ledger._writer.groups - groups == 1
    recorded = {c.chip_id: c for c in ledger.certificates()}
    assert sorted(recorded) == [chips[0], chips[2], chips[4]]
    for row in (rows[0], rows[2], rows[4]):  # each record is its own row's, whatever order RETURNING gave
        assert recorded[row.chip_id].der == row.der and recorded[row.chip_id].cert_serial == row.cert_serial
    assert ledger.verify() == []


def test_each_audit_record_of_a_batch_describes_its_own_chip_with_the_types_a_read_gives(
        ledger: Ledger, issuer: DeviceIssuer, tmp_path: Path) -> None:
    chips = [f"00000000000{i}" for i in range(1, 5)]
    batch = open_batch(ledger, chips)
    with IssuanceDesk(issuer, ledger) as desk:
        at_once({c: (desk, (csr(c, f"SN-{i}"), profile(f"SN-{i}"), subject(c, f"SN-{i}"), c, batch, f"SN-{i}"))
                 for i, c in enumerate(chips)})
    ledger.record_step(chips[0], batch, "keygen", 1000.0, 0.0, "ok")  # whole-number REALs
    ledger.flush()
    conn = sqlite3.connect(ledger.path)
    conn.row_factory = sqlite3.Row
    records = conn.execute("SELECT kind, chip_id, payload FROM audit WHERE kind IN ('certificate_issued', 'step')")
    seen = 0
    for record in records:
        payload = json.loads(record["payload"])
        for table, key in (("certificates", "cert_serial"), ("devices", "chip_id"), ("steps", "id")):
            if table in payload:
                snap = payload[table]
                assert snap["chip_id"] == record["chip_id"]
                row = conn.execute(f"SELECT * FROM {table} WHERE {key} = ?", (snap[key],)).fetchone()
                if table != "devices":  # a device's row moves on; its certificate and steps do not
                    assert audit.canonical_json(snap) == audit.canonical_json(audit.snapshot(row))
                seen += 1
    assert seen == 2 * len(chips) + 1


def test_a_token_refusal_of_one_certificate_fails_that_port_only(issuer: DeviceIssuer, ledger: Ledger) -> None:
    chips = [f"00000000000{i}" for i in range(1, 5)]
    batch = open_batch(ledger, chips)
    inner = issuer.signer

    class RefusesTheSecond:
        public_key, scheme = inner.public_key, inner.scheme

        def sign(self, data: bytes) -> bytes:
            raise AssertionError("the desk signs through sign_many")

        def sign_many(self, items: Iterable[bytes]) -> list[bytes | Exception]:
            out = inner.sign_many(items)
            out[1] = StamplineError("token 'line' refused to sign with 'sub-ca': FunctionFailed.")
            return out

    desk_issuer = DeviceIssuer(issuer.ca_cert, RefusesTheSecond())
    with IssuanceDesk(desk_issuer, ledger) as desk:
        hold = threading.Lock()
        hold.acquire()
        desk._inbox.put(_Held(hold))  # type: ignore[arg-type]  # the desk waits here while all four queue up
        requests = {c: (desk, (csr(c, f"SN-{i}"), profile(f"SN-{i}"), subject(c, f"SN-{i}"), c, batch, f"SN-{i}"))
                    for i, c in enumerate(chips)}
        threading.Timer(0.5, hold.release).start()
        outcomes = at_once(requests)
        assert desk.batches == 1  # the four were signed together
    failed = [c for c, o in outcomes.items() if not isinstance(o, bytes)]
    assert len(failed) == 1 and "FunctionFailed" in str(outcomes[failed[0]])
    assert sorted(c.chip_id for c in ledger.certificates()) == sorted(set(chips) - set(failed))
    assert ledger.verify() == []


def test_a_ledger_that_takes_nothing_answers_every_port_and_the_desk_goes_on(issuer: DeviceIssuer,
                                                                              tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    chips = [f"00000000000{i}" for i in range(1, 4)]
    batch = open_batch(ledger, chips)
    ledger._writer.close()  # the writer is gone: submitting raises
    with IssuanceDesk(issuer, ledger) as desk:
        for _ in range(2):  # a second batch is served too: the desk thread did not die
            outcomes = at_once({c: (desk, (csr(c, f"SN-{i}"), profile(f"SN-{i}"), subject(c, f"SN-{i}"), c, batch,
                                           f"SN-{i}")) for i, c in enumerate(chips)})
            assert len(outcomes) == len(chips)
            assert all(isinstance(o, StamplineError) and "closed" in str(o) for o in outcomes.values()), outcomes
    ledger.close()


def test_a_ticket_that_cannot_be_settled_does_not_stop_the_ledger_writer(ledger: Ledger) -> None:
    class Refusing(Ticket[object]):
        def set_result(self, value: object) -> None:
            raise RuntimeError("a bug in whoever waits")

    ledger._writer.submit(lambda conn: 1, Refusing())
    ledger.flush()  # answered: the writer is still serving
    assert ledger._writer._thread.is_alive()


def test_a_fan_out_given_fewer_outcomes_than_tickets_fails_them_all() -> None:
    tickets: list[Ticket[None]] = [Ticket(), Ticket(), Ticket()]
    Fanout(tickets).set_result([None])
    for ticket in tickets:
        with pytest.raises(StamplineError, match="no outcome"):
            ticket.result()


class _Held:
    """Queued ahead of the requests: the desk blocks on its CSR until released (the requests
    queue up meanwhile), then refuses it as malformed."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.ticket: Ticket[None] = Ticket()

    @property
    def csr(self) -> bytes:
        with self._lock:
            return b""
