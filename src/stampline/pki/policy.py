"""The CSR policy: what a device's certificate request must be before anything is signed.

A CSR comes from a device, and a device is untrusted. The profile is exactly the DER the
reference device produces (docs/protocol.md section 6.3): at most 4096 bytes, canonical DER with
nothing after it, version 0, the recipe's key (id-ecPublicKey with the named curve prime256v1
and an uncompressed point, or rsaEncryption with NULL parameters, the recipe's size and
e = 65537), an empty attributes field, the signature algorithm of the key's family
(ecdsa-with-SHA256 without parameters, sha256WithRSAEncryption with NULL) in a BIT STRING
without unused bits that verifies, the subject the station allocated, a key never issued before.

The structure is checked byte by byte (with asn1crypto) before ``cryptography`` parses the CSR.
Each refusal is one sentence (``CsrRefused``, with a short ``code``) that the station records in
the ledger, whatever went wrong: an exception while parsing is a ``malformed`` refusal, and an
exception anywhere else in the policy (a bug) is an ``internal`` refusal, never a crash.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn

from asn1crypto import csr as asn1_csr  # type: ignore[import-untyped]
from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from stampline.errors import StamplineError, shown
from stampline.pki import der
from stampline.pki import x509 as px
from stampline.pki.profile import KEY_TYPES, DeviceProfile
from stampline.pki.token import PublicKey

log = logging.getLogger(__name__)

MAX_CSR_BYTES = 4096
_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
_BASIC_CONSTRAINTS = "2.5.29.19"
_VERSION_0 = der.integer(0)
_NO_ATTRIBUTES = b"\xa0\x00"  # attributes [0] IMPLICIT SET OF Attribute, empty


@dataclass(frozen=True)
class _Family:
    """What the profile allows for one key family, as exact DER."""

    key_algorithm: bytes
    key_name: str
    signature_oid: str
    signature_algorithm: bytes
    signature_name: str


_FAMILIES = {
    "1.2.840.10045.2.1": ("ec", _Family(der.seq(der.oid("1.2.840.10045.2.1"), der.oid("1.2.840.10045.3.1.7")),
                                        "id-ecPublicKey with the named curve prime256v1", "1.2.840.10045.4.3.2",
                                        der.ECDSA_SHA256, "ecdsa-with-SHA256 without parameters")),
    "1.2.840.113549.1.1.1": ("rsa", _Family(der.seq(der.oid("1.2.840.113549.1.1.1"), der.null()),
                                            "rsaEncryption with NULL parameters", "1.2.840.113549.1.1.11",
                                            der.RSA_PKCS1_SHA256, "sha256WithRSAEncryption with NULL parameters")),
}


class CsrRefused(StamplineError):
    """The policy refused a CSR; ``code`` is a short machine name, the message is the reason.

    ``recorded`` is set once the refusal (with the CSR) is durable in the ledger."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.recorded = False


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


def check_csr(der_bytes: bytes, profile: DeviceProfile, expected_subject: x509.Name,
              issued_to: Callable[[str], str | None]) -> AcceptedCsr:
    """Apply the CSR policy; ``issued_to(public_key_sha256)`` names the chip a key was issued to.

    Raises `CsrRefused` for every CSR it does not accept; what ``issued_to`` raises passes through."""
    data = bytes(der_bytes)
    try:
        public_key = _checked_key(data, profile, expected_subject)
        public_key_der = px.spki_der(public_key)
    except CsrRefused:
        raise
    except Exception as exc:  # a bug in the policy, or input nobody foresaw: still a refusal, never a crash
        log.exception("the CSR policy failed on a CSR")
        raise CsrRefused("internal", f"the CSR policy could not check this CSR ({type(exc).__name__}).") from None
    digest = hashlib.sha256(public_key_der).hexdigest()
    holder = issued_to(digest)
    if holder is not None:
        raise CsrRefused("key-reuse", f"the CSR's public key was already issued to device {holder}.")
    return AcceptedCsr(public_key, public_key_der, digest)


def _refuse(code: str, message: str) -> NoReturn:
    raise CsrRefused(code, message)


@contextmanager
def _parsing() -> Iterator[None]:
    """Whatever a parser raises on hostile bytes is a ``malformed`` refusal."""
    try:
        yield
    except CsrRefused:
        raise
    except Exception:
        raise CsrRefused("malformed", "the CSR is not well-formed DER.") from None


def _checked_key(data: bytes, profile: DeviceProfile, expected_subject: x509.Name) -> PublicKey:
    """Everything but key reuse; returns the CSR's public key."""
    if len(data) > MAX_CSR_BYTES:
        _refuse("oversized", f"the CSR is {len(data)} bytes, more than the {MAX_CSR_BYTES} allowed.")
    with _parsing():
        subject_der = _check_structure(data)
        csr = x509.load_der_x509_csr(data)
        public_key, subject = csr.public_key(), csr.subject
    try:
        valid = csr.is_signature_valid
    except Exception:  # an algorithm cryptography cannot verify is a refusal, not a crash
        valid = False
    if not valid:
        raise CsrRefused("bad-signature", "the CSR's signature does not verify.")

    wanted_family, wanted_size = KEY_TYPES[profile.key_type]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        got = ("ec", public_key.curve.key_size)
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            _refuse("key-type", f"the CSR's key is RSA-{public_key.key_size}; at least 2048 bits are required.")
        if public_key.public_numbers().e != 65537:
            _refuse("key-type", "the CSR's RSA key does not use the public exponent 65537.")
        got = ("rsa", public_key.key_size)
    else:  # the structure allows no other, but a refusal all the same
        _refuse("key-type", f"the CSR's key type {type(public_key).__name__} is not supported.")
    if got != (wanted_family, wanted_size):
        _refuse("key-type", f"the CSR holds a {got[0].upper()}-{got[1]} key, "
                            f"but the recipe asks for {profile.key_type}.")

    if subject_der != expected_subject.public_bytes():
        _refuse("subject", f"the CSR's subject '{_shown(subject)}' is not the allocated '{_shown(expected_subject)}'.")
    return public_key


def _check_structure(data: bytes) -> bytes:
    """The CSR's DER against the profile, byte by byte, before cryptography parses it; returns
    the subject's DER."""
    request = asn1_csr.CertificationRequest.load(data)
    length = len(request.dump())
    if length != len(data):
        _refuse("trailing", f"the CSR has {len(data) - length} bytes after its end.")
    info = request["certification_request_info"]
    if request["signature"].contents[:1] != b"\x00":
        _refuse("signature-encoding", "the CSR's signature BIT STRING has unused bits, which is not allowed.")
    if info["subject_pk_info"]["public_key"].contents[:1] != b"\x00":
        _refuse("key-encoding", "the CSR's public key BIT STRING has unused bits, which is not allowed.")
    if request.dump(force=True) != data:  # re-encoded in full from its values: exactly DER, or not
        _refuse("non-canonical", "the CSR is not canonical DER (a length or value is not in its DER form).")
    if info["version"].dump() != _VERSION_0:
        _refuse("version", "the CSR's version is not 0 (PKCS#10 v1), the only one allowed.")
    family = _key_family(info["subject_pk_info"])
    signature_algorithm = request["signature_algorithm"]
    if signature_algorithm.dump() != family.signature_algorithm:
        oid = signature_algorithm["algorithm"].dotted
        what = "has parameters other than" if oid == family.signature_oid else "is not"
        _refuse("signature-algorithm", f"the CSR's signature algorithm {shown(oid, 40)} {what} the profile's "
                                       f"{family.signature_name}.")
    _check_attributes(info["attributes"])
    return bytes(info["subject"].dump())


def _key_family(spki: Any) -> _Family:
    """The key's family, once its algorithm identifier and encoding are exactly the profile's."""
    algorithm = spki["algorithm"]
    oid = algorithm["algorithm"].dotted
    if oid not in _FAMILIES:
        _refuse("key-type", f"the CSR's key algorithm {shown(oid, 40)} is not supported.")
    name, family = _FAMILIES[oid]
    if algorithm.dump() != family.key_algorithm:
        params = algorithm["parameters"]
        if name == "ec" and isinstance(params, asn1_keys.ECDomainParameters) and params.name == "named":
            curve = shown(str(params.chosen.native), 40)
            if curve != "prime256v1":
                _refuse("key-type", f"the CSR's key is on curve {curve}, which is not allowed.")
        _refuse("key-type", f"the CSR's key algorithm identifier is not the profile's {family.key_name}.")
    bits = spki["public_key"].contents  # the unused-bits octet (0), then the key
    if name == "ec" and (len(bits) != 66 or bits[1] != 0x04):
        if bits[1:2] in (b"\x02", b"\x03"):
            _refuse("key-encoding", "the CSR's EC point is compressed; the profile requires an uncompressed point.")
        _refuse("key-encoding", "the CSR's EC point is not an uncompressed P-256 point.")
    return family


def _check_attributes(attributes: Any) -> None:
    """The attributes field must be present and empty; name what a CSR asks for instead."""
    if attributes.dump() == _NO_ATTRIBUTES:
        return
    if not len(attributes):
        _refuse("attribute", "the CSR's attributes field is missing or not an empty SET, as the profile requires.")
    for attribute in attributes:
        oid = attribute["type"].dotted
        if oid != _EXTENSION_REQUEST:
            _refuse("attribute", f"the CSR carries the attribute {shown(oid, 40)}, which is not allowed.")
        extensions = [extension for value in attribute["values"] for extension in value]
        for extension in extensions:
            if extension["extn_id"].dotted == _BASIC_CONSTRAINTS and extension["extn_value"].parsed["ca"].native:
                _refuse("extension", "the CSR asks for CA:TRUE.")
        if extensions:
            _refuse("extension", f"the CSR asks for extension {shown(extensions[0]['extn_id'].dotted, 40)}, "
                                 "which the device profile does not allow.")
        _refuse("attribute", "the CSR carries an empty extensionRequest attribute, which is not allowed.")


def _shown(name: x509.Name) -> str:
    return shown(name.rfc4514_string(), 80)
