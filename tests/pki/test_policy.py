"""The device certificate profile and the CSR policy: what is issued, and each refusal."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import tool
from stampline import ceremony
from stampline.pki.policy import CsrRefused, check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.workspace import Workspace

CHIP = "7cdfa1b2c3d4"
SERIAL = "ACME-000042"


def profile(key_type: str = "ec-p256") -> DeviceProfile:
    return DeviceProfile(key_type=key_type, validity_days=7300,
                         subject={"common_name": SERIAL, "organization": "Test Org"})


def expected() -> x509.Name:
    return csr_subject(SERIAL, "Test Org", CHIP)


def make_csr(key=None, subject: x509.Name | None = None,  # type: ignore[no-untyped-def]
             extend: Callable[[x509.CertificateSigningRequestBuilder], x509.CertificateSigningRequestBuilder] | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or expected())
    if extend:
        builder = extend(builder)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def nobody(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def issuer(ca_workspace: Workspace) -> DeviceIssuer:
    token, label = ca_workspace.config().key_token("sub_ca")
    return DeviceIssuer(ceremony.load_sub(ca_workspace), token.signer(label))


@pytest.mark.parametrize("key_type,key", [("ec-p256", lambda: ec.generate_private_key(ec.SECP256R1())),
                                          ("rsa-2048", lambda: rsa.generate_private_key(65537, 2048))])
def test_issued_certificate_verifies_and_lints(issuer: DeviceIssuer, ca_workspace: Workspace, tmp_path: Path,
                                               key_type: str, key) -> None:  # type: ignore[no-untyped-def]
    accepted = check_csr(make_csr(key()), profile(key_type), expected(), nobody)
    der = issuer.issue(accepted, profile(key_type), CHIP)
    cert = x509.load_der_x509_certificate(der)
    pem = tmp_path / "device.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run([tool("openssl"), "verify", "-x509_strict", "-purpose", "sslclient",
                           "-CAfile", str(ca_workspace.root_cert_path), "-untrusted", str(ca_workspace.sub_cert_path),
                           str(pem)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lint = subprocess.run([tool("lint_pkix_cert"), "lint", "-s", "WARNING", str(pem)], capture_output=True, text=True)
    assert lint.stdout.strip() == "", lint.stdout
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SERIAL
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == CHIP
    assert cert.serial_number.bit_length() >= 64
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_serial_numbers_are_random(issuer: DeviceIssuer) -> None:
    serials = set()
    for _ in range(20):
        accepted = check_csr(make_csr(), profile(), expected(), nobody)
        serials.add(x509.load_der_x509_certificate(issuer.issue(accepted, profile(), CHIP)).serial_number)
    assert len(serials) == 20


def _tampered_signature() -> bytes:
    der = bytearray(make_csr())
    der[-5] ^= 0x01
    return bytes(der)


def _with_challenge_password() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(expected())
            .add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"secret")
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


CASES: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("bad signature", _tampered_signature, "bad-signature", "signature does not verify"),
    ("rsa-1024", lambda: make_csr(rsa.generate_private_key(65537, 1024)), "key-type", "at least 2048"),
    ("p-384", lambda: make_csr(ec.generate_private_key(ec.SECP384R1())), "key-type", "secp384r1, which is not allowed"),
    ("rsa where ec asked", lambda: make_csr(rsa.generate_private_key(65537, 2048)), "key-type", "recipe asks for ec-p256"),
    ("ca true", lambda: make_csr(extend=lambda b: b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)),
     "extension", "asks for CA:TRUE"),
    ("other extension", lambda: make_csr(extend=lambda b: b.add_extension(
        x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)), "extension", "2.5.29.17"),
    ("attribute", _with_challenge_password, "attribute", "1.2.840.113549.1.9.7"),
    ("wrong subject", lambda: make_csr(subject=csr_subject("ACME-999999", "Test Org", CHIP)), "subject", "ACME-999999"),
    ("wrong chip", lambda: make_csr(subject=csr_subject(SERIAL, "Test Org", "000000000000")), "subject", "not the allocated"),
    ("malformed", lambda: b"\x30\x82\x01\x00garbage", "malformed", "not well-formed DER"),
    ("trailing bytes", lambda: make_csr() + b"\x00\x00", "malformed", "not well-formed"),
    ("oversized", lambda: b"\x30" * 5000, "oversized", "5000 bytes"),
]


@pytest.mark.parametrize("name,make,code,text", CASES, ids=[c[0] for c in CASES])
def test_bad_csr_is_refused_with_its_reason(name: str, make: Callable[[], bytes], code: str, text: str) -> None:
    with pytest.raises(CsrRefused) as refused:
        check_csr(make(), profile(), expected(), nobody)
    assert refused.value.code == code
    assert text in str(refused.value)
    assert "\n" not in str(refused.value)


def test_public_key_issued_to_another_device_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first = check_csr(make_csr(key), profile(), expected(), nobody)
    issued = {first.public_key_sha256: "aabbccddeeff"}
    with pytest.raises(CsrRefused, match="already issued to device aabbccddeeff") as refused:
        check_csr(make_csr(key), profile(), expected(), issued.get)
    assert refused.value.code == "key-reuse"


def test_issuer_refuses_a_token_key_that_is_not_the_ca_key(ca_workspace: Workspace) -> None:
    token, label = ca_workspace.config().key_token("root_ca")
    with pytest.raises(Exception, match="does not match the Sub CA certificate"):
        DeviceIssuer(ceremony.load_sub(ca_workspace), token.signer(label))


def test_csr_with_a_multi_valued_attribute_is_refused_not_a_crash() -> None:
    from stampline.pki import der
    from stampline.pki import x509 as px
    from stampline.pki.token import Scheme

    key = ec.generate_private_key(ec.SECP256R1())

    class Soft:
        public_key = key.public_key()
        scheme = Scheme.ECDSA_SHA256

        def sign(self, data: bytes) -> bytes:
            return key.sign(data, ec.ECDSA(hashes.SHA256()))

    attribute = der.seq(der.oid("1.2.840.113549.1.9.7"), der.set_of(der.tlv(0x0C, b"a"), der.tlv(0x0C, b"b")))
    info = der.seq(der.integer(0), expected().public_bytes(), px.spki_der(key.public_key()), der.tlv(0xA0, attribute))
    with pytest.raises(CsrRefused) as refused:
        check_csr(px.signed(info, Soft()), profile(), expected(), nobody)
    assert refused.value.code in ("malformed", "attribute")
