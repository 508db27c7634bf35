"""CA registration with proof of possession, as AWS IoT Core asks for it: the cloud hands out a
registration code; the CA owner proves it holds the CA key by issuing a *verification
certificate* whose subject CN is that code, signed by the CA key (here: through the token).

The verification certificate's own key pair is throwaway: only the CA's signature matters.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stampline.errors import StamplineError
from stampline.pki import x509 as px
from stampline.pki.ca import random_serial


def verification_certificate(ca_cert: x509.Certificate, signer: px.Signer, registration_code: str) -> x509.Certificate:
    """A certificate with CN = ``registration_code``, issued by ``ca_cert``'s key (``signer``)."""
    if not registration_code or len(registration_code) > 64 or not registration_code.isprintable():
        raise StamplineError("the registration code is empty, too long or not printable.")
    if px.spki_der(signer.public_key) != px.spki_der(ca_cert.public_key()):  # type: ignore[arg-type]
        raise StamplineError("the signing key is not the key of the CA being registered.")
    throwaway = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    fields = px.CertificateFields(
        serial_number=random_serial(), issuer=ca_cert.subject,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_code)]),
        not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=1),
        public_key_der=px.spki_der(throwaway),
        extensions=[(x509.BasicConstraints(ca=False, path_length=None), True),
                    (x509.AuthorityKeyIdentifier(px.key_identifier(signer.public_key), None, None), False)])
    return x509.load_der_x509_certificate(px.sign_certificate(fields, signer))


def check_registration(ca_cert: x509.Certificate, verification: x509.Certificate, registration_code: str) -> None:
    """What the cloud checks before it registers a CA; each refusal is one sentence."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise StamplineError("the certificate to register is not a CA certificate (basicConstraints CA:TRUE is missing).")
    common_names = verification.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in common_names] != [registration_code]:
        raise StamplineError("the verification certificate's CN is not the registration code.")
    if not px.verify_signed_by(verification, ca_cert.public_key()):  # type: ignore[arg-type]
        raise StamplineError("the verification certificate is not signed by the CA's key.")
