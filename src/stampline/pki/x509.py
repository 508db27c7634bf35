"""Assemble and sign X.509 structures with a key that stays in a token.

``cryptography``'s builders need the private key in memory, which a token never gives. Here
the to-be-signed structure is framed with ``der``, names and extension values are encoded by
``cryptography``, and the signature comes from a ``Signer`` (a token key, or a software key in
tests). The result is parsed back with ``cryptography`` and checked against the public key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Protocol, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from stampline.errors import StamplineError
from stampline.files import KiB, MiB
from stampline.pki import der
from stampline.pki.token import PublicKey, Scheme

#: Bounds of the PEM files stampline reads. A certificate is 0.5-2 KiB (the protocol caps a
#: device's at 4 KiB); 64 KiB holds a chain of dozens. A public key (PEM or JWK) is under 1 KiB
#: even for RSA-4096. A CRL entry takes about 50 bytes of PEM: 16 MiB is some 300,000 revocations.
MAX_CERTIFICATE_PEM = 64 * KiB
MAX_PUBLIC_KEY_PEM = 16 * KiB
MAX_CRL_PEM = 16 * MiB

_ALGORITHM_IDS = {
    Scheme.ECDSA_SHA256: der.ECDSA_SHA256,
    Scheme.ECDSA_SHA384: der.ECDSA_SHA384,
    Scheme.RSA_PKCS1_SHA256: der.RSA_PKCS1_SHA256,
}


class Signer(Protocol):
    public_key: PublicKey
    scheme: Scheme

    def sign(self, data: bytes) -> bytes: ...


class BatchSigner(Signer, Protocol):
    def sign_many(self, items: Iterable[bytes]) -> list[bytes | Exception]:
        """Per item, in order, its signature or why it was not signed; the key may sign an item
        while the next is made."""
        ...


def spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_identifier(public_key: PublicKey) -> bytes:
    """Method 1 of RFC 5280 section 4.2.1.2: SHA-1 of the subjectPublicKey bit string."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def extension(value: x509.ExtensionType, critical: bool) -> bytes:
    fields = [der.oid(value.oid.dotted_string)]
    if critical:
        fields.append(der.boolean(True))
    fields.append(der.octet_string(value.public_bytes()))
    return der.seq(*fields)


@dataclass(frozen=True)
class CertificateFields:
    serial_number: int
    issuer: x509.Name | bytes  # bytes: the Name already DER-encoded
    subject: x509.Name | bytes
    not_before: datetime
    not_after: datetime
    public_key_der: bytes  # SubjectPublicKeyInfo, taken verbatim (from a CSR or a token)
    extensions: Sequence[tuple[x509.ExtensionType, bool] | bytes]  # bytes: an Extension already encoded


def tbs_certificate(fields: CertificateFields, scheme: Scheme) -> bytes:
    return der.seq(
        der.explicit(0, der.integer(2)),
        der.integer(fields.serial_number),
        _ALGORITHM_IDS[scheme],
        _name_der(fields.issuer),
        der.seq(der.time(fields.not_before), der.time(fields.not_after)),
        _name_der(fields.subject),
        fields.public_key_der,
        der.explicit(3, der.seq(*(item if isinstance(item, bytes) else extension(*item) for item in fields.extensions))),
    )


def _name_der(name: x509.Name | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.public_bytes()


def signed(tbs: bytes, signer: Signer) -> bytes:
    """``SEQUENCE { tbs, signatureAlgorithm, signature }`` — the shape of certs, CSRs and CRLs."""
    return with_signature(tbs, signer.scheme, signer.sign(tbs))


def with_signature(tbs: bytes, scheme: Scheme, signature: bytes) -> bytes:
    """`signed`, for a signature made already (one of a batch)."""
    return der.seq(tbs, _ALGORITHM_IDS[scheme], der.bit_string(signature))


def sign_certificate(fields: CertificateFields, signer: Signer) -> bytes:
    return signed(tbs_certificate(fields, signer.scheme), signer)


def build_csr(subject: x509.Name, signer: Signer, extensions: Sequence[tuple[x509.ExtensionType, bool]] = ()) -> bytes:
    """A PKCS#10 request for the signer's own key (used for the Sub CA, whose key is in a token)."""
    attributes = b""
    if extensions:
        requested = der.seq(*(extension(value, critical) for value, critical in extensions))
        attributes = der.seq(der.oid("1.2.840.113549.1.9.14"), der.set_of(requested))
    info = der.seq(der.integer(0), subject.public_bytes(), spki_der(signer.public_key), der.tlv(0xA0, attributes))
    return signed(info, signer)


@dataclass(frozen=True)
class Revoked:
    serial_number: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None = None


def build_crl(issuer: x509.Name, issuer_key_id: bytes, number: int, this_update: datetime, next_update: datetime,
              revoked: Sequence[Revoked], signer: Signer) -> bytes:
    entries = []
    for item in revoked:
        entry = [der.integer(item.serial_number), der.time(item.revoked_at)]
        if item.reason is not None and item.reason != x509.ReasonFlags.unspecified:
            entry.append(der.seq(extension(x509.CRLReason(item.reason), False)))
        entries.append(der.seq(*entry))
    extensions = der.explicit(0, der.seq(
        extension(x509.AuthorityKeyIdentifier(issuer_key_id, None, None), False),
        extension(x509.CRLNumber(number), False),
    ))
    tbs = der.seq(
        der.integer(1), _ALGORITHM_IDS[signer.scheme], issuer.public_bytes(),
        der.time(this_update), der.time(next_update),
        *([der.seq(*entries)] if entries else []),
        extensions,
    )
    return signed(tbs, signer)


def verify_signed_by(cert: x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest,
                     public_key: PublicKey) -> bool:
    """Whether ``cert`` (or CRL/CSR) carries a valid signature by ``public_key``."""
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return False
    if not isinstance(algorithm, hashes.HashAlgorithm):  # Ed25519 and the like: not ours
        return False
    data = cert.tbs_certrequest_bytes if isinstance(cert, x509.CertificateSigningRequest) else (
        cert.tbs_certlist_bytes if isinstance(cert, x509.CertificateRevocationList) else cert.tbs_certificate_bytes)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(cert.signature, data, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(cert.signature, data, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """A certificate from DER or PEM, every field parsed now: ``cryptography`` parses names, keys
    and extensions only when they are first read, so a malformed field would otherwise raise
    far from here, long after the certificate was accepted."""
    try:
        cert = x509.load_der_x509_certificate(data) if not data.lstrip().startswith(b"-----") \
            else x509.load_pem_x509_certificate(data)
        cert.issuer, cert.subject, cert.extensions, cert.public_key()  # noqa: B018
        cert.signature_hash_algorithm, cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
    except (ValueError, UnsupportedAlgorithm):
        raise StamplineError(f"the {what} is not a well-formed X.509 certificate with a key stampline knows.") from None
    return cert


def fingerprint(der_bytes: bytes) -> str:
    return hashlib.sha256(der_bytes).hexdigest()
