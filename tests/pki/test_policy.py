"""The device certificate profile and the CSR policy: what is issued, and each refusal."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pytest
from asn1crypto import core as asn1_core  # type: ignore[import-untyped]
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from conftest import tool
from stampline import ceremony
from stampline.errors import StamplineError
from stampline.pki import der
from stampline.pki import policy
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


def host_key(key_type: str = "ec-p256") -> Any:
    """One host key per type for the edited vectors (RSA keys are slow to make)."""
    return _host_key(key_type)


@lru_cache(maxsize=None)
def _host_key(key_type: str) -> Any:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(65537, int(key_type[4:]))


def signed(info: bytes, key: Any, algorithm: bytes | None = None) -> bytes:
    """A CSR of these CertificationRequestInfo bytes, signed with ``key`` (SHA-256), under
    ``algorithm`` (the profile's for the key unless given)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature, default = key.sign(info, ec.ECDSA(hashes.SHA256())), der.ECDSA_SHA256
    else:
        signature, default = key.sign(info, padding.PKCS1v15(), hashes.SHA256()), der.RSA_PKCS1_SHA256
    return der.seq(info, algorithm or default, der.bit_string(signature))


def edited(edit: Callable[[Any], None], key_type: str = "ec-p256", algorithm: bytes | None = None) -> bytes:
    """A good CSR whose CertificationRequestInfo ``edit`` changed (with asn1crypto), signed again
    with its key, so that the edit is its only flaw."""
    key = host_key(key_type)
    info = asn1_csr.CertificationRequest.load(make_csr(key))["certification_request_info"]
    edit(info)
    return signed(info.dump(force=True), key, algorithm)


def _info_bytes(key_type: str = "ec-p256") -> bytes:
    return asn1_csr.CertificationRequest.load(make_csr(host_key(key_type)))["certification_request_info"].dump()


def _null_ec_parameters(info: Any) -> None:
    info["subject_pk_info"]["algorithm"]["parameters"] = asn1_keys.ECDomainParameters("implicit_ca", asn1_core.Null())


def _version_2(info: Any) -> None:
    info["version"] = 1


def _compressed_point(info: Any) -> None:
    point = host_key().public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.CompressedPoint)
    info["subject_pk_info"]["public_key"] = asn1_keys.ECPointBitString(point)


def _extension_request(values: list[Any]) -> Callable[[Any], None]:
    def edit(info: Any) -> None:
        info["attributes"] = [{"type": "extension_request", "values": values}]
    return edit


def _sha384() -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(expected())
            .sign(host_key(), hashes.SHA384()).public_bytes(serialization.Encoding.DER))


def _signature_unused_bits() -> bytes:
    good = make_csr(host_key())
    signature = asn1_csr.CertificationRequest.load(good)["signature"].contents  # unused-bits octet, then the value
    return good[:-len(signature)] + b"\x04" + signature[1:]


def _long_outer_length() -> bytes:
    good = make_csr(host_key())
    assert good[1] == 0x81  # one length octet after 0x81: write it with two
    return b"\x30\x82\x00" + good[2:]


def _long_version_length() -> bytes:
    info = _info_bytes()
    contents = asn1_csr.CertificationRequestInfo.load(info).contents
    assert contents[:3] == b"\x02\x01\x00"
    return signed(der.seq(b"\x02\x81\x01\x00" + contents[3:]), host_key())  # INTEGER 0, long-form length


def _rsa_key_without_null() -> bytes:
    info = asn1_csr.CertificationRequestInfo.load(_info_bytes("rsa-2048"))
    spki = info["subject_pk_info"]
    spki_der = der.seq(der.seq(der.oid("1.2.840.113549.1.1.1")), spki["public_key"].dump())
    return signed(der.seq(info["version"].dump(), info["subject"].dump(), spki_der, info["attributes"].dump()),
                  host_key("rsa-2048"))


CASES: list[tuple[str, Callable[[], bytes], str, str, str]] = [
    ("bad signature", _tampered_signature, "ec-p256", "bad-signature", "signature does not verify"),
    ("rsa-1024", lambda: make_csr(rsa.generate_private_key(65537, 1024)), "ec-p256", "key-type", "at least 2048"),
    ("rsa-2048 where rsa-3072 asked", lambda: make_csr(host_key("rsa-2048")), "rsa-3072", "key-type",
     "RSA-2048 key, but the recipe asks for rsa-3072"),
    ("rsa exponent 3", lambda: make_csr(rsa.generate_private_key(3, 2048)), "rsa-2048", "key-type", "65537"),
    ("p-384", lambda: make_csr(ec.generate_private_key(ec.SECP384R1())), "ec-p256", "key-type",
     "secp384r1, which is not allowed"),
    ("rsa where ec asked", lambda: make_csr(host_key("rsa-2048")), "ec-p256", "key-type", "recipe asks for ec-p256"),
    ("ca true", lambda: make_csr(extend=lambda b: b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)),
     "ec-p256", "extension", "asks for CA:TRUE"),
    ("other extension", lambda: make_csr(extend=lambda b: b.add_extension(
        x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)), "ec-p256", "extension", "2.5.29.17"),
    ("attribute", _with_challenge_password, "ec-p256", "attribute", "1.2.840.113549.1.9.7"),
    ("wrong subject", lambda: make_csr(subject=csr_subject("ACME-999999", "Test Org", CHIP)), "ec-p256", "subject",
     "ACME-999999"),
    ("wrong chip", lambda: make_csr(subject=csr_subject(SERIAL, "Test Org", "000000000000")), "ec-p256", "subject",
     "not the allocated"),
    ("malformed", lambda: b"\x30\x82\x01\x00garbage", "ec-p256", "malformed", "not well-formed DER"),
    ("oversized", lambda: b"\x30" * 5000, "ec-p256", "oversized", "5000 bytes"),
    # issue 8: hostile CSRs that escaped the policy, each with one flaw only
    ("null ec parameters", lambda: edited(_null_ec_parameters), "ec-p256", "key-type",
     "not the profile's id-ecPublicKey with the named curve prime256v1"),
    ("version 2", lambda: edited(_version_2), "ec-p256", "version", "version is not 0"),
    ("sha-384", _sha384, "ec-p256", "signature-algorithm",
     "1.2.840.10045.4.3.3 is not the profile's ecdsa-with-SHA256"),
    ("compressed point", lambda: edited(_compressed_point), "ec-p256", "key-encoding", "EC point is compressed"),
    ("empty extension request", lambda: edited(_extension_request([[]])), "ec-p256", "attribute",
     "empty extensionRequest attribute"),
    ("extension request without values", lambda: edited(_extension_request([])), "ec-p256", "attribute",
     "empty extensionRequest attribute"),
    ("signature unused bits", _signature_unused_bits, "ec-p256", "signature-encoding",
     "signature BIT STRING has unused bits"),
    ("trailing garbage", lambda: make_csr() + b"\x00\x00", "ec-p256", "trailing", "2 bytes after its end"),
    ("long outer length", _long_outer_length, "ec-p256", "non-canonical", "not canonical DER"),
    ("long version length", _long_version_length, "ec-p256", "non-canonical", "not canonical DER"),
    ("rsa key without null", _rsa_key_without_null, "rsa-2048", "key-type",
     "not the profile's rsaEncryption with NULL parameters"),
    ("rsa signature without null",
     lambda: signed(_info_bytes("rsa-2048"), host_key("rsa-2048"), der.seq(der.oid("1.2.840.113549.1.1.11"))),
     "rsa-2048", "signature-algorithm", "1.2.840.113549.1.1.11 has parameters other than the profile's"),
    ("rsa signature on an ec key", lambda: signed(_info_bytes(), host_key(), der.RSA_PKCS1_SHA256), "ec-p256",
     "signature-algorithm", "is not the profile's ecdsa-with-SHA256"),
    ("no attributes field", lambda: signed(der.seq(*_info_parts()[:3]), host_key()), "ec-p256", "attribute",
     "attributes field is missing"),
]


def _info_parts() -> list[bytes]:
    info = asn1_csr.CertificationRequestInfo.load(_info_bytes())
    return [info[field].dump() for field in ("version", "subject", "subject_pk_info", "attributes")]


@pytest.mark.parametrize("name,make,key_type,code,text", CASES, ids=[c[0] for c in CASES])
def test_bad_csr_is_refused_with_its_reason(name: str, make: Callable[[], bytes], key_type: str, code: str,
                                            text: str) -> None:
    with pytest.raises(CsrRefused) as refused:
        check_csr(make(), profile(key_type), expected(), nobody)
    assert refused.value.code == code
    assert text in str(refused.value)
    assert "\n" not in str(refused.value)


RESIGNED = ["null ec parameters", "version 2", "compressed point", "empty extension request",
            "extension request without values", "long version length", "rsa key without null",
            "rsa signature without null", "no attributes field"]


@pytest.mark.parametrize("name", RESIGNED)
def test_each_edited_vector_is_signed_by_its_key(name: str) -> None:
    """The edit is the vector's only flaw: its signature verifies over its (edited) info."""
    (make, key_type) = next((c[1], c[2]) for c in CASES if c[0] == name)
    request = asn1_csr.CertificationRequest.load(make())
    info, signature = request["certification_request_info"].dump(), request["signature"].contents[1:]
    public_key = host_key(key_type).public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, info, ec.ECDSA(hashes.SHA256()))
    else:
        public_key.verify(signature, info, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048", "rsa-3072"])
@pytest.mark.parametrize("organization", ["Test Org", None])
def test_the_reference_devices_csr_is_accepted_for_each_key_type(key_type: str, organization: str | None) -> None:
    subject = csr_subject(SERIAL, organization, CHIP)
    key = host_key(key_type)
    accepted = check_csr(make_csr(key, subject), profile(key_type), subject, nobody)
    assert accepted.public_key_der == key.public_key().public_bytes(serialization.Encoding.DER,
                                                                    serialization.PublicFormat.SubjectPublicKeyInfo)


def test_an_exception_from_a_parser_is_a_malformed_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(data: bytes) -> x509.CertificateSigningRequest:
        raise RuntimeError("a parser bug")
    monkeypatch.setattr(policy.x509, "load_der_x509_csr", explode)
    with pytest.raises(CsrRefused) as refused:
        check_csr(make_csr(), profile(), expected(), nobody)
    assert refused.value.code == "malformed" and str(refused.value) == "the CSR is not well-formed DER."


def test_a_bug_in_the_policy_is_an_internal_refusal_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(public_key: object) -> bytes:
        raise KeyError("a policy bug")
    monkeypatch.setattr(policy.px, "spki_der", explode)
    with pytest.raises(CsrRefused) as refused:
        check_csr(make_csr(), profile(), expected(), nobody)
    assert refused.value.code == "internal"
    assert str(refused.value) == "the CSR policy could not check this CSR (KeyError)."


def test_what_the_key_lookup_raises_is_not_taken_for_a_refusal() -> None:
    def closed(_: str) -> str | None:
        raise StamplineError("the ledger is closed.")
    with pytest.raises(StamplineError, match="the ledger is closed") as raised:
        check_csr(make_csr(), profile(), expected(), closed)
    assert not isinstance(raised.value, CsrRefused)


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
