"""The CA ceremony: an offline root in a token of its own, a Sub CA whose key is born in the
station token, certified by the root through a CSR; and CRLs.

Profiles follow RFC 5280: CA certificates carry basicConstraints (critical), keyUsage
keyCertSign + cRLSign (critical), subject and authority key identifiers; the Sub CA has
pathLenConstraint 0 so that it can certify devices and nothing that certifies.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone
from typing import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from stampline.errors import StamplineError
from stampline.pki import x509 as px
from stampline.pki.token import KeyAlgorithm, Token, TokenSigner

CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False)
MAX_CSR_BYTES = 8192


def name(common_name: str, organization: str | None = None, country: str | None = None) -> x509.Name:
    attrs = []
    if country:
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def random_serial() -> int:
    """A positive 159-bit serial: unpredictable and within RFC 5280's 20 octets."""
    return secrets.randbits(159) | (1 << 158)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def create_root(token: Token, key_label: str, subject: x509.Name, days: int,
                algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> x509.Certificate:
    """Generate the root key in its token and self-sign the root certificate."""
    token.generate_key(key_label, algorithm)
    signer = token.signer(key_label)
    key_id = px.key_identifier(signer.public_key)
    now = _now()
    fields = px.CertificateFields(
        serial_number=random_serial(), issuer=subject, subject=subject,
        not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=days),
        public_key_der=px.spki_der(signer.public_key),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (CA_KEY_USAGE, True),
            (x509.SubjectKeyIdentifier(key_id), False),
        ])
    return x509.load_der_x509_certificate(px.sign_certificate(fields, signer))


def create_sub_ca_request(token: Token, key_label: str, subject: x509.Name,
                          algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> bytes:
    """Generate the Sub CA key in the station token and return its CSR (DER)."""
    token.generate_key(key_label, algorithm)
    return px.build_csr(subject, token.signer(key_label),
                        [(x509.BasicConstraints(ca=True, path_length=0), True)])


def sign_sub_ca(root: TokenSigner, root_cert: x509.Certificate, csr_der: bytes, days: int) -> x509.Certificate:
    """Certify a Sub CA request with the root: CA:TRUE, pathLenConstraint 0."""
    if len(csr_der) > MAX_CSR_BYTES:
        raise StamplineError("the Sub CA request is larger than any CSR stampline accepts.")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise StamplineError("the Sub CA request is not a well-formed PKCS#10 CSR.") from None
    if not csr.is_signature_valid:
        raise StamplineError("the Sub CA request's signature does not verify.")
    public_key = csr.public_key()
    now = _now()
    not_after = min(now + timedelta(days=days), root_cert.not_valid_after_utc)
    fields = px.CertificateFields(
        serial_number=random_serial(), issuer=root_cert.subject, subject=csr.subject,
        not_before=now - timedelta(minutes=5), not_after=not_after,
        public_key_der=px.spki_der(public_key),  # type: ignore[arg-type]
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (CA_KEY_USAGE, True),
            (x509.SubjectKeyIdentifier(px.key_identifier(public_key)), False),  # type: ignore[arg-type]
            (x509.AuthorityKeyIdentifier(px.key_identifier(root.public_key), None, None), False),
        ])
    return x509.load_der_x509_certificate(px.sign_certificate(fields, root))


def issue_crl(signer: TokenSigner, ca_cert: x509.Certificate, revoked: Sequence[px.Revoked], number: int,
              days: int = 7) -> x509.CertificateRevocationList:
    """A CRL of ``ca_cert`` listing ``revoked``, signed through the token."""
    if px.spki_der(signer.public_key) != px.spki_der(ca_cert.public_key()):  # type: ignore[arg-type]
        raise StamplineError("the CRL signing key is not the key of the CA certificate.")
    now = _now()
    der_bytes = px.build_crl(ca_cert.subject, px.key_identifier(signer.public_key), number, now,
                             now + timedelta(days=days), revoked, signer)
    return x509.load_der_x509_crl(der_bytes)
