"""A device in AWS IoT Core: its thing, its policy, and the activation handler for Just-In-Time
Registration.

With JITR, AWS IoT registers a certificate signed by a registered CA at its first TLS connection,
as PENDING_ACTIVATION, and publishes ``$aws/events/certificates/registered/<caCertificateId>``
(again at every further attempt while it stays pending). `handle_registration_event` is the
Lambda-style function a rule on that topic calls. The CA's signature only says that the Sub CA's
key signed it; the ledger export says that the station issued it. A certificate the CA signed but
the ledger never recorded (a token signing outside the station) stays pending and is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from stampline.cloud.aws_api import AwsRefusal, IotApi
from stampline.errors import StamplineError

log = logging.getLogger(__name__)

POLICY_NAME = "stampline-device"
PENDING = "PENDING_ACTIVATION"
ACTIVE = "ACTIVE"
REVOKED = "REVOKED"
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
POLICY_NAME_PATTERN = re.compile(r"[\w+=,.@-]{1,128}")
_CERT_ID = re.compile(r"[0-9a-f]{64}")
_ARN = re.compile(r"arn:([a-z-]+):iot:([a-z0-9-]+):(\d{12}):cert/([0-9a-f]{64})")
_THING_VAR = "${iot:Connection.Thing.ThingName}"


def pem_fingerprint(pem: str) -> str:
    """SHA-256 of a PEM certificate's DER: how the ledger export and AWS IoT are matched."""
    try:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.strip())).hexdigest()
    except (ValueError, AttributeError):
        raise StamplineError("a certificate is not in PEM form.") from None


def load_pem(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except (ValueError, AttributeError):
        raise StamplineError("a certificate is not a readable PEM X.509 certificate.") from None


def subject_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def certificate_id_of(arn: str) -> str | None:
    match = _ARN.fullmatch(arn)
    return match.group(4) if match else None


def device_policy(certificate_arn: str) -> dict[str, Any]:
    """The device policy: connect only as client id = thing name (the thing attached to this very
    certificate), publish/receive/subscribe only under ``devices/<thing name>/``."""
    match = _ARN.fullmatch(certificate_arn)
    if match is None:
        raise StamplineError(f"'{certificate_arn}' is not an AWS IoT certificate ARN.")
    base = f"arn:{match.group(1)}:iot:{match.group(2)}:{match.group(3)}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{base}:client/{_THING_VAR}",
             "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": f"{base}:topic/devices/{_THING_VAR}/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{base}:topicfilter/devices/{_THING_VAR}/*"},
        ],
    }


class DeviceRefused(StamplineError):
    """This one device cannot be registered or provisioned; others can (a bulk run goes on)."""


def check_thing_name(thing_name: str) -> None:
    if not THING_NAME.fullmatch(thing_name or ""):
        raise DeviceRefused(f"the serial {thing_name!r} cannot be an AWS IoT thing name "
                             "(1-128 letters, digits, ':', '_' or '-').")


def check_policy_name(policy_name: str) -> None:
    if not POLICY_NAME_PATTERN.fullmatch(policy_name or ""):
        raise StamplineError(f"{policy_name!r} is not an AWS IoT policy name (1-128 letters, digits or +=,.@_-).")


def _created(api: IotApi, operation: str, **params: Any) -> bool:
    """Create something; a concurrent creator that got there first is as good."""
    try:
        api.call(operation, **params)
        return True
    except AwsRefusal as exc:
        if exc.code == "ResourceAlreadyExistsException":
            return False
        raise


def ensure_device(api: IotApi, thing_name: str, chip_id: str | None, certificate_arn: str,
                  policy_name: str = POLICY_NAME) -> list[str]:
    """Make the thing, the policy and both attachments exist; create only what is missing.

    Returns what was changed (empty when everything was already in place)."""
    check_thing_name(thing_name)
    check_policy_name(policy_name)
    changes: list[str] = []
    thing = api.find("describe_thing", thingName=thing_name)
    if thing is None:
        attributes = {"attributes": {"chip_id": chip_id}} if chip_id else {}
        if _created(api, "create_thing", thingName=thing_name, attributePayload=attributes):
            changes.append(f"thing {thing_name} created")
    else:
        recorded = (thing.get("attributes") or {}).get("chip_id")
        if chip_id and recorded and recorded != chip_id:
            raise DeviceRefused(f"the thing {thing_name} already exists for chip {recorded}, not {chip_id}.")
    if certificate_arn not in set(api.all("list_thing_principals", "principals", thingName=thing_name)):
        api.call("attach_thing_principal", thingName=thing_name, principal=certificate_arn)
        changes.append(f"certificate attached to thing {thing_name}")
    if api.find("get_policy", policyName=policy_name) is None:
        if _created(api, "create_policy", policyName=policy_name,
                    policyDocument=json.dumps(device_policy(certificate_arn))):
            changes.append(f"policy {policy_name} created")
    attached = {p.get("policyName") for p in api.all("list_attached_policies", "policies", target=certificate_arn)}
    if policy_name not in attached:
        api.call("attach_policy", policyName=policy_name, target=certificate_arn)
        changes.append(f"policy {policy_name} attached")
    return changes


@dataclass(frozen=True)
class LedgerIndex:
    """The station's ledger export, indexed by certificate fingerprint; built once, used per event."""

    devices: Mapping[str, Mapping[str, Any]]  # fingerprint of the live certificate -> export record
    revoked_serials: frozenset[str]  # certificate serial numbers (lowercase hex) revoked in the ledger

    @classmethod
    def from_export(cls, records: Iterable[Mapping[str, Any]]) -> LedgerIndex:
        devices: dict[str, Mapping[str, Any]] = {}
        revoked: set[str] = set()
        for record in records:
            revoked.update(str(serial).lower() for serial in record.get("revoked") or ())
            if record.get("certificate"):
                devices[pem_fingerprint(str(record["certificate"]))] = record
        return cls(devices, frozenset(revoked))


def revocation_reason(cert: x509.Certificate, crl: x509.CertificateRevocationList | None,
                      ledger: LedgerIndex) -> str | None:
    """Why ``cert`` is revoked (listed in the Sub CA's CRL, or revoked in the ledger), or None."""
    if crl is not None and crl.issuer == cert.issuer:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
            except x509.ExtensionNotFound:
                reason = "unspecified"
            return f"the certificate is listed in the Sub CA's CRL (reason: {reason})."
    if format(cert.serial_number, "x") in ledger.revoked_serials:
        return "the certificate is revoked in the station's ledger."
    return None


def _event_certificate_id(event: Any) -> str:
    if not isinstance(event, Mapping):
        raise StamplineError("the registration event is not a JSON object.")
    certificate_id = event.get("certificateId")
    if not isinstance(certificate_id, str) or not _CERT_ID.fullmatch(certificate_id):
        raise StamplineError("the registration event has no certificateId of 64 hexadecimal digits.")
    ca_id = event.get("caCertificateId")
    if ca_id is not None and (not isinstance(ca_id, str) or not _CERT_ID.fullmatch(ca_id)):
        raise StamplineError("the registration event's caCertificateId is not 64 hexadecimal digits.")
    return certificate_id


def handle_registration_event(event: dict[str, Any], iot_client: Any,
                              ledger_export_certs: LedgerIndex | Iterable[Mapping[str, Any]],
                              crl: x509.CertificateRevocationList | None,
                              policy_name: str = POLICY_NAME) -> dict[str, Any]:
    """Handle one ``$aws/events/certificates/registered/<caCertificateId>`` event; idempotent.

    ``crl`` must already be verified against the Sub CA. The outcome is ``active`` (thing, policy,
    attachments in place, certificate ACTIVE), ``revoked`` (set REVOKED), ``suspect`` (not in the
    ledger: left PENDING_ACTIVATION) or ``skipped`` (AWS holds it INACTIVE or in transfer: left
    alone). ``changes`` lists what this call changed; a repeated event changes nothing.
    """
    certificate_id = _event_certificate_id(event)
    api = iot_client if isinstance(iot_client, IotApi) else IotApi(iot_client)
    ledger = ledger_export_certs if isinstance(ledger_export_certs, LedgerIndex) \
        else LedgerIndex.from_export(ledger_export_certs)
    description = api.call("describe_certificate", certificateId=certificate_id)["certificateDescription"]
    cert = load_pem(description["certificatePem"])
    status, arn = description["status"], description["certificateArn"]
    report: dict[str, Any] = {
        "certificate_id": certificate_id, "serial": subject_value(cert, NameOID.COMMON_NAME),
        "fingerprint": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
        "status_before": status, "status": status, "outcome": "", "reason": "", "changes": []}

    def done(outcome: str, reason: str, new_status: str | None = None) -> dict[str, Any]:
        report.update(outcome=outcome, reason=reason, status=new_status or status)
        return report

    revoked = revocation_reason(cert, crl, ledger)
    if revoked is not None:
        if status != REVOKED:
            api.call("update_certificate", certificateId=certificate_id, newStatus=REVOKED)
            report["changes"].append("certificate revoked")
        return done("revoked", revoked, REVOKED)
    if status == REVOKED:
        return done("revoked", "AWS IoT already holds the certificate as revoked.")
    record = ledger.devices.get(report["fingerprint"])
    if record is None:
        log.warning("suspect certificate %s (CN %r): signed by the CA, absent from the ledger", certificate_id,
                    report["serial"])
        return done("suspect", "the certificate is signed by the registered CA but absent from the ledger "
                               "export: it was issued outside the station.")
    if status not in (PENDING, ACTIVE):
        return done("skipped", f"AWS IoT holds the certificate as {status}; it is left as it is.")
    report["serial"] = record.get("serial") or report["serial"]
    try:
        report["changes"] += ensure_device(api, report["serial"], record.get("chip_id"), arn, policy_name)
    except DeviceRefused as exc:
        return done("skipped", str(exc))
    if status != ACTIVE:  # last: an ACTIVE certificate always has its thing and policy
        api.call("update_certificate", certificateId=certificate_id, newStatus=ACTIVE)
        report["changes"].append("certificate activated")
    return done("active", "the certificate is in the ledger export and not revoked.", ACTIVE)
