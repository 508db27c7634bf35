"""The local endpoint's registry and CRL handling, without processes: station revocations in a
ledger export, and CRLs that would lock every device out."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stampline.cloud import jitr
from stampline.cloud.broker import free_port
from stampline.cloud.endpoint import Endpoint
from stampline.cloud.registry import ACTIVE, REVOKED
from stampline.cloud.verification import verification_certificate
from stampline.errors import StamplineError
from stampline.pki.token import Scheme

NOW = datetime.now(timezone.utc)


class SoftCa:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = self.key.public_key()
        self.scheme = Scheme.ECDSA_SHA256
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Sub CA")])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.public_key).serial_number(1).not_valid_before(NOW - timedelta(days=1))
                     .not_valid_after(NOW + timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def device(self, serial: str, chip: str) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial), x509.NameAttribute(NameOID.SERIAL_NUMBER, chip)])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(self.name)
                .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(days=1))
                .not_valid_after(NOW + timedelta(days=30)).sign(self.key, hashes.SHA256()))

    def crl(self, number: int, revoked: list[int], next_update: datetime) -> bytes:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
                   .last_update(min(NOW, next_update) - timedelta(days=1)).next_update(next_update)
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                                      .revocation_date(NOW - timedelta(hours=1)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    endpoint = Endpoint(tmp_path)
    endpoint.files.create(free_port())
    ca = SoftCa()
    registry = endpoint.registry()
    registry.register_ca(ca.cert, verification_certificate(ca.cert, ca, registry.registration_code()))
    registry.close()
    yield endpoint, ca
    endpoint.down()  # removes its socket directory from the temp dir


def _connect(endpoint: Endpoint, cert: x509.Certificate) -> str:
    registry = endpoint.registry()
    try:
        event = registry.first_connection(cert, registry.ca_id_for(cert))  # type: ignore[arg-type]
        assert event is not None
        return jitr.handle_registration_event(event, registry, endpoint.files.crls())
    finally:
        registry.close()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_a_certificate_the_station_revoked_is_refused_and_an_active_one_revoked(setup) -> None:  # type: ignore[no-untyped-def]
    endpoint, ca = setup
    old, new, other = ca.device("ACME-1", "7cdfa1000001"), ca.device("ACME-1", "7cdfa1000001"), ca.device("ACME-2", "7cdfa1000002")
    registry = endpoint.registry()
    registry.import_export([{"serial": "ACME-1", "certificate": _pem(old)},
                            {"serial": "ACME-2", "certificate": _pem(other)}], "first export")
    registry.close()
    assert _connect(endpoint, old) == ACTIVE and _connect(endpoint, other) == ACTIVE
    # rework at the station: the old certificate is revoked, a new one issued; the next export says so
    registry = endpoint.registry()
    registry.import_export([{"serial": "ACME-1", "certificate": _pem(new),
                             "revoked": [format(old.serial_number, "x")]}], "second export")
    jitr.reconsider_pending(registry, [])
    states = {d.cert_id: d.state for d in registry.devices()}
    registry.close()
    from stampline.cloud.registry import fingerprint
    assert states[fingerprint(old)] == REVOKED and states[fingerprint(other)] == ACTIVE
    assert _connect(endpoint, new) == ACTIVE


def test_expired_or_older_crls_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    endpoint, ca = setup
    with pytest.raises(StamplineError, match="has expired"):
        endpoint.update_crl(ca.crl(5, [], NOW - timedelta(hours=1)))
    assert endpoint.update_crl(ca.crl(5, [], NOW + timedelta(days=7))) == 0
    with pytest.raises(StamplineError, match="not newer"):
        endpoint.update_crl(ca.crl(4, [], NOW + timedelta(days=7)))
    stranger = SoftCa()
    with pytest.raises(StamplineError, match="not signed by a CA registered"):
        endpoint.update_crl(stranger.crl(9, [], NOW + timedelta(days=7)))
