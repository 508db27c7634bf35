"""The issuance desk: the CSR policy, batched signing through the token, each certificate durable
before it is returned, and refusals that reach their own port only."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Iterable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stampline import ceremony
from stampline.errors import StamplineError
from stampline.pki.policy import CsrRefused, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.station.issuance import IssuanceDesk
from stampline.station.ledger import Ledger
from stampline.station.ledger_writer import Ticket
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
        good.set_result(8)
    bad: Ticket[int] = Ticket()
    bad.set_exception(StamplineError("refused."))
    with pytest.raises(StamplineError, match="refused"):
        bad.result()


def test_the_ledger_records_a_batch_in_one_operation_each_row_refused_or_recorded_alone(ledger: Ledger,
                                                                                         issuer: DeviceIssuer) -> None:
    from stampline.station.ledger import issuance_row
    from stampline.pki.policy import check_csr
    chips = ["000000000001", "000000000002", "000000000003"]
    batch = open_batch(ledger, chips)
    key = ec.generate_private_key(ec.SECP256R1())
    items = []
    for chip_id, serial, k in ((chips[0], "SN-1", key), (chips[1], "SN-2", key), (chips[2], "SN-3", None)):
        accepted = check_csr(csr(chip_id, serial, k), profile(serial), subject(chip_id, serial), lambda _: None)
        items.append(issuance_row(chip_id, batch, serial, issuer.issue(accepted, profile(serial), chip_id),
                                  accepted.public_key_sha256))
    items.append(dataclasses.replace(items[2], chip_id=chips[0]))  # chip 1 again, with another's certificate
    tickets: list[Ticket[None]] = [Ticket() for _ in items]
    groups = ledger._writer.groups
    ledger.submit_issuances(items, tickets)
    outcomes = []
    for ticket in tickets:
        try:
            outcomes.append(ticket.result())
        except StamplineError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] is None and outcomes[2] is None
    assert "already certified for chip 000000000001" in outcomes[1]  # type: ignore[operator]
    assert "already holds the live certificate" in outcomes[3] or "already in the ledger" in outcomes[3]  # type: ignore[operator]
    assert ledger._writer.groups - groups == 1
    assert sorted(c.chip_id for c in ledger.certificates()) == [chips[0], chips[2]]
    assert ledger.verify() == []
