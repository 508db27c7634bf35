"""The activation policy of Just-In-Time Registration, as a Lambda-style handler of the
registration event (`$aws/events/certificates/registered/<caCertificateId>`).

A certificate is activated when it is not revoked (CRL, registry), its subject is well formed
(CN = a serial, serialNumber = a 12-hex-digit chip id), and it is in a ledger export the
station sent to the cloud. Signed by the registered CA but absent from every export, it stays
PENDING_ACTIVATION and is flagged suspect: the counterfeit case. Idempotent: the event repeats
while a certificate is pending, and handling it again changes nothing that was decided.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from stampline.cloud.registry import ACTIVE, PENDING, REVOKED, Registry

SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHIP_ID = re.compile(r"^[0-9a-f]{12}$")


def _single(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def revoked_by(cert: x509.Certificate, crls: list[x509.CertificateRevocationList]) -> bool:
    return any(crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number)
               is not None for crl in crls)


def handle_registration_event(event: dict[str, Any], registry: Registry,
                              crls: list[x509.CertificateRevocationList]) -> str:
    """Decide a pending certificate; returns its state afterwards."""
    cert_id = str(event.get("certificateId", ""))
    current = registry.state(cert_id)
    if current in (ACTIVE, REVOKED) or current is None:
        return current or "UNKNOWN"
    pem = registry.pem(cert_id)
    assert pem is not None
    cert = x509.load_pem_x509_certificate(pem.encode())
    if revoked_by(cert, crls):
        registry.set_state(cert_id, REVOKED, "listed in the CA's CRL")
        return REVOKED
    if registry.revoked_by_station(cert):
        registry.set_state(cert_id, REVOKED, "revoked in the station's ledger export")
        return REVOKED
    serial, chip_id = _single(cert, NameOID.COMMON_NAME), _single(cert, NameOID.SERIAL_NUMBER)
    if serial is None or not SERIAL.match(serial) or chip_id is None or not CHIP_ID.match(chip_id):
        registry.set_state(cert_id, PENDING, "the subject is not a well-formed serial and chip id", suspect=True)
        return PENDING
    if not registry.exported(cert_id):
        registry.set_state(cert_id, PENDING, "signed by the registered CA but in no ledger export the station sent: "
                                             "suspect (counterfeit?)", suspect=True)
        return PENDING
    registry.set_state(cert_id, ACTIVE, "in the station's ledger export")
    return ACTIVE


def reconsider_pending(registry: Registry, crls: list[x509.CertificateRevocationList]) -> int:
    """After a ledger export arrives: revoke what the station revoked, handle every pending
    certificate again; returns activations."""
    for device in registry.devices(ACTIVE):
        pem = registry.pem(device.cert_id)
        if pem and registry.revoked_by_station(x509.load_pem_x509_certificate(pem.encode())):
            registry.set_state(device.cert_id, REVOKED, "revoked in the station's ledger export")
    activated = 0
    for device in registry.devices(PENDING):
        event = {"certificateId": device.cert_id, "caCertificateId": device.ca_id, "certificateStatus": PENDING}
        activated += handle_registration_event(event, registry, crls) == ACTIVE
    return activated
