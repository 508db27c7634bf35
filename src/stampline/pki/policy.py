"""The CSR policy: what a device's certificate request must be before anything is signed.

A CSR comes from a device, and a device is untrusted. Each refusal is one sentence
(``CsrRefused``, with a short ``code``) that the station records in the ledger: oversized or
malformed DER, a signature that does not verify, a key type or size the recipe does not ask for,
any attribute or extension request (CA:TRUE named as such), a subject other than the one the
station allocated, and a public key already issued.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from stampline.errors import StamplineError, shown
from stampline.pki import x509 as px
from stampline.pki.profile import KEY_TYPES, DeviceProfile
from stampline.pki.token import PublicKey

MAX_CSR_BYTES = 4096
_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"


class CsrRefused(StamplineError):
    """The policy refused a CSR; ``code`` is a short machine name, the message is the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def csr_subject(common_name: str, organization: str | None, chip_id: str) -> x509.Name:
    """The subject the device is asked to put in its CSR: O (optional), CN, serialNumber — in that order."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, common_name), x509.NameAttribute(NameOID.SERIAL_NUMBER, chip_id)]
    return x509.Name(attrs)


@dataclass(frozen=True)
class AcceptedCsr:
    public_key: PublicKey
    public_key_der: bytes
    public_key_sha256: str


def _shown(name: x509.Name) -> str:
    return shown(name.rfc4514_string(), 80)


def check_csr(der_bytes: bytes, profile: DeviceProfile, expected_subject: x509.Name,
              issued_to: Callable[[str], str | None]) -> AcceptedCsr:
    """Apply the CSR policy; ``issued_to(public_key_sha256)`` names the chip a key was issued to."""
    if len(der_bytes) > MAX_CSR_BYTES:
        raise CsrRefused("oversized", f"the CSR is {len(der_bytes)} bytes, more than the {MAX_CSR_BYTES} allowed.")
    try:
        csr = x509.load_der_x509_csr(der_bytes)
        canonical = csr.public_bytes(serialization.Encoding.DER) == der_bytes
        public_key = csr.public_key()
    except (ValueError, TypeError):
        raise CsrRefused("malformed", "the CSR is not well-formed DER.") from None
    if not canonical:
        raise CsrRefused("malformed", "the CSR has trailing or non-canonical bytes.")
    try:
        valid = csr.is_signature_valid
    except Exception:  # an algorithm cryptography cannot verify is a refusal, not a crash
        valid = False
    if not valid:
        raise CsrRefused("bad-signature", "the CSR's signature does not verify.")

    family, size = KEY_TYPES[profile.key_type]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise CsrRefused("key-type", f"the CSR's key is on curve {public_key.curve.name}, which is not allowed.")
        got = ("ec", 256)
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise CsrRefused("key-type", f"the CSR's key is RSA-{public_key.key_size}; at least 2048 bits are required.")
        if public_key.public_numbers().e != 65537:
            raise CsrRefused("key-type", "the CSR's RSA key does not use the public exponent 65537.")
        got = ("rsa", public_key.key_size)
    else:
        raise CsrRefused("key-type", f"the CSR's key type {type(public_key).__name__} is not supported.")
    if got != (family, size):
        raise CsrRefused("key-type", f"the CSR holds a {got[0].upper()}-{got[1]} key, but the recipe asks for {profile.key_type}.")

    try:
        attributes = list(csr.attributes)
        subject_der = csr.subject.public_bytes()
    except (ValueError, TypeError):
        raise CsrRefused("malformed", "the CSR's attributes or subject are malformed.") from None
    for attribute in attributes:
        if attribute.oid.dotted_string != _EXTENSION_REQUEST:
            raise CsrRefused("attribute", f"the CSR carries the attribute {attribute.oid.dotted_string}, which is not allowed.")
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise CsrRefused("extension", "the CSR's extension request is malformed.") from None
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise CsrRefused("extension", "the CSR asks for CA:TRUE.")
        raise CsrRefused("extension", f"the CSR asks for extension {ext.oid.dotted_string}, which the device profile does not allow.")

    if subject_der != expected_subject.public_bytes():
        raise CsrRefused("subject", f"the CSR's subject '{_shown(csr.subject)}' is not the allocated '{_shown(expected_subject)}'.")

    public_key_der = px.spki_der(public_key)
    digest = hashlib.sha256(public_key_der).hexdigest()
    holder = issued_to(digest)
    if holder is not None:
        raise CsrRefused("key-reuse", f"the CSR's public key was already issued to device {holder}.")
    return AcceptedCsr(public_key, public_key_der, digest)
