"""The issuance desk: batched signing through the token, each certificate durable before it is returned."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stampline import ceremony
from stampline.errors import StamplineError
from stampline.pki.policy import AcceptedCsr, check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.station.issuance import IssuanceDesk
from stampline.station.ledger import Ledger
from stampline.station.ledger_writer import Ticket
from stampline.workspace import Workspace


def profile(serial: str) -> DeviceProfile:
    return DeviceProfile("ec-p256", 365, {"common_name": serial, "organization": "Test"})


def accepted(chip_id: str, serial: str, key: ec.EllipticCurvePrivateKey | None = None) -> AcceptedCsr:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = csr_subject(serial, "Test", chip_id)
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return check_csr(csr.public_bytes(serialization.Encoding.DER), profile(serial), subject, lambda _: None)


@pytest.fixture(scope="module")
def issuer(ca_workspace: Workspace) -> DeviceIssuer:
    token, label = ca_workspace.config().key_token("sub_ca")
    return DeviceIssuer(ceremony.load_sub(ca_workspace), token.signer(label))


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def seen(ledger: Ledger, batch: int, chip_id: str) -> None:
    ledger.device_seen(chip_id, "esp32c3", "1.0.0", "1.0.0", "port", batch)


def test_many_ports_at_once_are_signed_in_batches_and_each_is_durable(issuer: DeviceIssuer, ledger: Ledger,
                                                                      ca_workspace: Workspace) -> None:
    batch = ledger.open_batch("p", "00" * 32)
    chips = [f"7cdfa1{i:06x}" for i in range(48)]
    for chip_id in chips:
        seen(ledger, batch, chip_id)
    requests = {chip_id: accepted(chip_id, f"SN-{i}") for i, chip_id in enumerate(chips)}
    issued: dict[str, bytes] = {}
    start = threading.Barrier(len(chips))
    with IssuanceDesk(issuer, ledger) as desk:
        def port(i: int, chip_id: str) -> None:
            start.wait()
            issued[chip_id] = desk.issue(requests[chip_id], profile(f"SN-{i}"), chip_id, batch, f"SN-{i}")
            # returned: the ledger holds it already
            assert ledger.live_certificate(chip_id).der == issued[chip_id]  # type: ignore[union-attr]
        threads = [threading.Thread(target=port, args=(i, c)) for i, c in enumerate(chips)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 0 < desk.batches < len(chips)  # the token signed several certificates per trip
    assert len(issued) == len(chips)
    sub = ceremony.load_sub(ca_workspace)
    for chip_id, der in issued.items():
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(sub)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == chip_id
        assert cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            == requests[chip_id].public_key_der
    assert ledger.verify() == []


def test_a_refusal_reaches_its_own_port_only(issuer: DeviceIssuer, ledger: Ledger) -> None:
    batch = ledger.open_batch("p", "00" * 32)
    for chip_id in ("000000000001", "000000000002", "000000000003"):
        seen(ledger, batch, chip_id)
    shared = ec.generate_private_key(ec.SECP256R1())
    with IssuanceDesk(issuer, ledger) as desk:
        desk.issue(accepted("000000000001", "SN-1", shared), profile("SN-1"), "000000000001", batch, "SN-1")
        outcomes: dict[str, object] = {}

        def port(chip_id: str, serial: str, key: ec.EllipticCurvePrivateKey | None) -> None:
            try:
                outcomes[chip_id] = desk.issue(accepted(chip_id, serial, key), profile(serial), chip_id, batch, serial)
            except StamplineError as exc:
                outcomes[chip_id] = exc
        threads = [threading.Thread(target=port, args=("000000000002", "SN-2", shared)),  # the same key again
                   threading.Thread(target=port, args=("000000000003", "SN-3", None))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert isinstance(outcomes["000000000002"], StamplineError)
    assert "already certified for chip 000000000001" in str(outcomes["000000000002"])
    assert isinstance(outcomes["000000000003"], bytes)
    assert ledger.live_certificate("000000000002") is None
    assert ledger.live_certificate("000000000003") is not None
    assert ledger.verify() == []


def test_a_token_failure_reaches_every_port_of_the_batch_and_records_nothing(issuer: DeviceIssuer,
                                                                             ledger: Ledger) -> None:
    batch = ledger.open_batch("p", "00" * 32)
    seen(ledger, batch, "000000000001")

    class BrokenToken:
        public_key = issuer.signer.public_key
        scheme = issuer.signer.scheme

        def sign(self, data: bytes) -> bytes:
            raise StamplineError("token 'line' refused to sign with 'sub-ca': DeviceRemoved.")

        def sign_many(self, items: list[bytes]) -> list[bytes]:
            return [self.sign(item) for item in items]

    broken = DeviceIssuer(issuer.ca_cert, BrokenToken())
    with IssuanceDesk(broken, ledger) as desk, pytest.raises(StamplineError, match="DeviceRemoved"):
        desk.issue(accepted("000000000001", "SN-1"), profile("SN-1"), "000000000001", batch, "SN-1")
    assert ledger.certificates() == []


def test_the_closed_desk_refuses_work(issuer: DeviceIssuer, ledger: Ledger) -> None:
    desk = IssuanceDesk(issuer, ledger)
    desk.close()
    with pytest.raises(StamplineError, match="closed"):
        desk.issue(accepted("000000000001", "SN-1"), profile("SN-1"), "000000000001", 1, "SN-1")


def test_a_ticket_gives_its_result_or_raises_its_exception_to_every_waiter() -> None:
    good: Ticket[int] = Ticket()
    assert not good.done()
    waiters = [threading.Thread(target=lambda: seen_values.append(good.result())) for _ in range(3)]
    seen_values: list[int] = []
    for t in waiters:
        t.start()
    good.set_result(7)
    for t in waiters:
        t.join(5)
    assert good.done() and seen_values == [7, 7, 7]
    bad: Ticket[int] = Ticket()
    bad.set_exception(StamplineError("refused."))
    with pytest.raises(StamplineError, match="refused"):
        bad.result()
