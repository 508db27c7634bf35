"""The device certificate profile, and the issuer that signs it through the Sub CA's token.

Subject CN = the serial the station allocated, subject serialNumber = the chip id (its base
MAC, 12 lowercase hex digits); a random 159-bit serial number;
keyUsage digitalSignature (critical; plus keyEncipherment for RSA keys); extendedKeyUsage
clientAuth; basicConstraints CA:FALSE (critical); subject and authority key identifiers;
validity from the recipe, never past the Sub CA's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stampline.errors import StamplineError
from stampline.pki import x509 as px
from stampline.pki.ca import random_serial

if TYPE_CHECKING:
    from stampline.pki.policy import AcceptedCsr

_NAME_OIDS = {"country": NameOID.COUNTRY_NAME, "organization": NameOID.ORGANIZATION_NAME,
              "organizational_unit": NameOID.ORGANIZATIONAL_UNIT_NAME, "common_name": NameOID.COMMON_NAME}
#: an accepted CSR, the profile to issue it under and the chip id
IssueRequest = tuple["AcceptedCsr", "DeviceProfile", str]
KEY_TYPES = {"ec-p256": ("ec", 256), "rsa-2048": ("rsa", 2048), "rsa-3072": ("rsa", 3072)}


@dataclass(frozen=True)
class DeviceProfile:
    key_type: str  # one of KEY_TYPES
    validity_days: int
    subject: dict[str, str]  # rendered attributes: common_name (the serial), organization, ...

    def certificate_subject(self, chip_id: str) -> x509.Name:
        attrs = [x509.NameAttribute(_NAME_OIDS[key], self.subject[key])
                 for key in ("country", "organization", "organizational_unit", "common_name") if key in self.subject]
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, chip_id))
        return x509.Name(attrs)


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate, and what it was made of (no need to parse it back)."""

    der: bytes
    fields: px.CertificateFields

    @property
    def serial_hex(self) -> str:
        return format(self.fields.serial_number, "x")

    @property
    def subject(self) -> str:
        """RFC 4514."""
        assert isinstance(self.fields.subject, x509.Name)
        return self.fields.subject.rfc4514_string()


class DeviceIssuer:
    """Signs device certificates with the Sub CA key through its token."""

    def __init__(self, ca_cert: x509.Certificate, signer: px.BatchSigner) -> None:
        if px.spki_der(signer.public_key) != px.spki_der(ca_cert.public_key()):  # type: ignore[arg-type]
            raise StamplineError("the Sub CA key in the token does not match the Sub CA certificate.")
        self.ca_cert = ca_cert
        self.signer = signer
        # what every device certificate carries, encoded once (the hot path of the line)
        self._issuer_name = ca_cert.subject.public_bytes()
        aki = px.extension(x509.AuthorityKeyIdentifier(px.key_identifier(signer.public_key), None, None), False)
        self._constant = {rsa_key: [px.extension(x509.BasicConstraints(ca=False, path_length=None), True),
                                    px.extension(_key_usage(rsa_key), True),
                                    px.extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
                          for rsa_key in (False, True)}
        self._authority_key_id = aki

    def issue(self, accepted: "AcceptedCsr", profile: DeviceProfile, chip_id: str) -> bytes:
        (issued,) = self.issue_many([(accepted, profile, chip_id)])
        if isinstance(issued, Exception):
            raise issued
        return issued.der

    def issue_many(self, requests: Iterable[IssueRequest]) -> list[IssuedCertificate | Exception]:
        """Per request (an accepted CSR, its profile and chip id), in order: its certificate, or
        why it has none (the token refused it; it could not be built). ``requests`` may be a
        generator that does work (the CSR policy): the token signs one certificate while the
        next request is being made."""
        made: list[tuple[px.CertificateFields, bytes] | Exception] = []

        def built() -> Iterator[bytes]:
            for request in requests:
                try:
                    fields = self._fields(*request)
                    tbs = px.tbs_certificate(fields, self.signer.scheme)
                except Exception as exc:  # this request alone: the others are signed
                    made.append(exc)
                    continue
                made.append((fields, tbs))
                yield tbs
        signatures = iter(self.signer.sign_many(built()))
        issued: list[IssuedCertificate | Exception] = []
        for item in made:
            if isinstance(item, Exception):
                issued.append(item)
                continue
            signature = next(signatures, None)
            if signature is None:
                issued.append(StamplineError("the token returned no signature for a certificate."))
            elif isinstance(signature, Exception):
                issued.append(signature)
            else:
                fields, tbs = item
                issued.append(IssuedCertificate(px.with_signature(tbs, self.signer.scheme, signature), fields))
        return issued

    def _fields(self, accepted: "AcceptedCsr", profile: DeviceProfile, chip_id: str) -> px.CertificateFields:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        not_after = min(now + timedelta(days=profile.validity_days), self.ca_cert.not_valid_after_utc)
        rsa_key = isinstance(accepted.public_key, rsa.RSAPublicKey)
        return px.CertificateFields(
            serial_number=random_serial(), issuer=self._issuer_name, subject=profile.certificate_subject(chip_id),
            not_before=now - timedelta(minutes=5), not_after=not_after, public_key_der=accepted.public_key_der,
            extensions=[
                *self._constant[rsa_key],
                (x509.SubjectKeyIdentifier(px.key_identifier(accepted.public_key)), False),
                self._authority_key_id,
            ])


def _key_usage(rsa_key: bool) -> x509.KeyUsage:
    """digitalSignature; RSA keys also keyEncipherment (TLS 1.2 RSA key exchange)."""
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)
