"""The AWS IoT Core adapter, on a station workspace: register the Sub CA (proof of possession
through its token), activate devices as they come online (JITR), register the ledger in bulk,
revoke, and compare what AWS holds with what the ledger says.

What it keeps in the workspace, per AWS region, under ``aws/<region>/``: ``ca.json`` (the id AWS
gave the Sub CA) and ``registered.jsonl`` (bulk registration progress, one line per certificate).
Neither holds a secret. AWS credentials come only from boto3's chain.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from stampline.ceremony import load_sub
from stampline.cloud.aws_api import (SYSTEM_CLOCK, AwsRefusal, Backoff, Clock, IotApi, RateLimiter, iot_client)
from stampline.cloud.aws_device import (ACTIVE, PENDING, POLICY_NAME, REVOKED, DeviceRefused, LedgerIndex,
                                        certificate_id_of, check_policy_name, check_thing_name, ensure_device,
                                        handle_registration_event, load_pem, pem_fingerprint, subject_value)
from stampline.cloud.verification import check_registration, verification_certificate
from stampline.files import KiB, MiB, fsync_dir, read_bounded, write_atomically
from stampline.errors import StamplineError
from stampline.pki import x509 as px
from stampline.station.ledger import Ledger
from stampline.workspace import Workspace

__all__ = ["AwsRegistrar", "Backoff", "DEFAULT_RATE", "client_api", "IotApi", "LedgerIndex", "POLICY_NAME", "Progress",
           "bulk_register", "handle_registration_event", "iot_client", "ledger_index", "load_crl", "register_ca",
           "register_ca_certificate", "revoke_ca", "revoke_device", "status"]

#: RegisterCertificate and RegisterCertificateWithoutCA: 10 transactions per second by default
#: (AWS IoT Core quotas; see docs/aws.md for the sources).
DEFAULT_RATE = 10.0
MAX_RECORD_BYTES = 64 * KiB  # ca.json: a certificate id, an ARN, a status (under 1 KiB)
MAX_PROGRESS_BYTES = 64 * MiB  # progress.jsonl: about 200 bytes per registered certificate
#: AWS errors that concern one certificate: the others of a bulk run can still go ahead.
DEVICE_REFUSALS = frozenset({"CertificateValidationException", "CertificateStateException",
                             "CertificateConflictException"})


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def aws_dir(workspace: Workspace, region: str) -> Path:
    return workspace.root / "aws" / region


# --- the CA ------------------------------------------------------------------------------------

def _ca_record(workspace: Workspace, region: str) -> dict[str, Any] | None:
    path = aws_dir(workspace, region) / "ca.json"
    if not path.exists():
        return None
    try:
        record = json.loads(read_bounded(path, MAX_RECORD_BYTES, "CA registration record"))
        if isinstance(record, dict) and isinstance(record.get("certificate_id"), str):
            return record
    except ValueError:
        pass
    raise StamplineError(f"{path} is not a CA registration record; move it away and register the CA again.")


def _write_ca_record(workspace: Workspace, region: str, record: dict[str, Any]) -> None:
    directory = aws_dir(workspace, region)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "ca.json", json.dumps(record, indent=2).encode())


def register_ca_certificate(api: IotApi, ca_cert: x509.Certificate, verification: x509.Certificate,
                            registration_code: str) -> dict[str, Any]:
    """Register ``ca_cert`` with AWS IoT (active, auto-registration on), after checking on our side
    what AWS checks: a CA certificate, and a verification certificate for this code signed by its key."""
    check_registration(ca_cert, verification, registration_code)
    return api.call("register_ca_certificate", caCertificate=_pem(ca_cert), verificationCertificate=_pem(verification),
                    setAsActive=True, allowAutoRegistration=True)


def register_ca(workspace: Workspace, api: IotApi) -> dict[str, Any]:
    """Register the workspace's Sub CA in the client's region, unless AWS already holds it from here."""
    sub = load_sub(workspace)
    fingerprint = px.fingerprint(sub.public_bytes(Encoding.DER))
    record = _ca_record(workspace, api.region)
    if record is not None and record.get("fingerprint") == fingerprint:
        found = api.find("describe_ca_certificate", certificateId=record["certificate_id"])
        if found is not None:
            return {**record, "status": found["certificateDescription"]["status"], "registered_now": False}
    code = str(api.call("get_registration_code")["registrationCode"])
    token, label = workspace.config().key_token("sub_ca")
    verification = verification_certificate(sub, token.signer(label), code)
    response = register_ca_certificate(api, sub, verification, code)
    record = {"certificate_id": response["certificateId"], "certificate_arn": response["certificateArn"],
              "fingerprint": fingerprint, "subject": sub.subject.rfc4514_string(), "registered_at": _now()}
    _write_ca_record(workspace, api.region, record)
    return {**record, "status": ACTIVE, "registered_now": True}


def _registered_ca(workspace: Workspace, region: str) -> dict[str, Any]:
    record = _ca_record(workspace, region)
    if record is None:
        raise StamplineError(f"the Sub CA is not registered in AWS IoT ({region}) from this workspace; "
                             "run 'stampline aws register-ca' first.")
    return record


def revoke_ca(workspace: Workspace, api: IotApi, devices: bool = True, rate: float = DEFAULT_RATE,
              clock: Clock = SYSTEM_CLOCK) -> dict[str, Any]:
    """Deactivate the Sub CA in AWS IoT (AWS has no REVOKED state for a CA: ACTIVE or INACTIVE) and
    turn off auto-registration; with ``devices``, revoke every certificate AWS lists under it, since
    certificates already registered keep working after their CA is deactivated."""
    ca_id = _registered_ca(workspace, api.region)["certificate_id"]
    api.call("update_ca_certificate", certificateId=ca_id, newStatus="INACTIVE", newAutoRegistrationStatus="DISABLE")
    revoked: list[str] = []
    if devices:
        limiter = RateLimiter(rate, clock)
        for cert in list(api.all("list_certificates_by_ca", "certificates", caCertificateId=ca_id)):
            if cert.get("status") != REVOKED:
                limiter.wait()
                api.call("update_certificate", certificateId=cert["certificateId"], newStatus=REVOKED)
                revoked.append(cert["certificateId"])
    return {"certificate_id": ca_id, "status": "INACTIVE", "auto_registration": "DISABLE", "revoked": revoked}


# --- the ledger side ---------------------------------------------------------------------------

def ledger_records(workspace: Workspace) -> list[dict[str, Any]]:
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        return list(ledger.export())


def ledger_index(workspace: Workspace) -> LedgerIndex:
    return LedgerIndex.from_export(ledger_records(workspace))


def load_crl(workspace: Workspace) -> x509.CertificateRevocationList | None:
    """The Sub CA's CRL, its signature verified; None when no CRL was ever issued."""
    if not workspace.crl_path.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(read_bounded(workspace.crl_path, px.MAX_CRL_PEM, "CRL"))
    except ValueError:
        raise StamplineError(f"{workspace.crl_path} is not a PEM CRL.") from None
    sub = load_sub(workspace)
    if crl.issuer != sub.subject or not px.verify_signed_by(crl, sub.public_key()):  # type: ignore[arg-type]
        raise StamplineError(f"{workspace.crl_path} is not signed by the workspace's Sub CA.")
    return crl


# --- bulk registration -------------------------------------------------------------------------

class Progress:
    """Bulk registration progress: one JSON line per certificate AWS IoT holds, appended and
    fsynced after each success, so that a rerun after a kill skips what is done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = read_bounded(self.path, MAX_PROGRESS_BYTES, "progress record")
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a kill: its certificate is found again in AWS on the rerun
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._entries[str(entry["certificate_sha256"])] = entry
            except (ValueError, KeyError, TypeError):
                raise StamplineError(f"{self.path} line {number} is not a progress record.") from None

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        return self._entries.get(fingerprint)

    def for_serial(self, serial: str) -> list[dict[str, Any]]:
        return [e for e in self._entries.values() if e.get("serial") == serial]

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, serial: str, fingerprint: str, certificate_id: str) -> None:
        entry = {"serial": serial, "certificate_sha256": fingerprint, "certificate_id": certificate_id, "at": _now()}
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path.parent)
        self._entries[fingerprint] = entry


class AwsRegistrar:
    """The `Registrar` protocol over AWS IoT Core: RegisterCertificate (with the CA's PEM) or
    RegisterCertificateWithoutCA, certificate ACTIVE, then thing, policy and attachments."""

    name = "aws-iot"

    def __init__(self, api: IotApi, policy_name: str = POLICY_NAME) -> None:
        check_policy_name(policy_name)
        self.api = api
        self.policy_name = policy_name

    def register_device(self, serial: str, certificate_pem: str, ca_certificate_pem: str | None) -> str:
        cert = load_pem(certificate_pem)
        if subject_value(cert, NameOID.COMMON_NAME) != serial:
            raise DeviceRefused(f"the certificate given for {serial} does not name it as its CN.")
        check_thing_name(serial)
        pending = False
        try:
            if ca_certificate_pem is None:
                done = self.api.call("register_certificate_without_ca", certificatePem=certificate_pem, status=ACTIVE)
            else:
                done = self.api.call("register_certificate", certificatePem=certificate_pem,
                                     caCertificatePem=ca_certificate_pem, setAsActive=True)
            certificate_id, arn = str(done["certificateId"]), str(done["certificateArn"])
        except AwsRefusal as exc:
            if exc.code == "ResourceAlreadyExistsException" and exc.details.get("resourceId"):
                certificate_id = exc.details["resourceId"]
                held = self.api.call("describe_certificate", certificateId=certificate_id)["certificateDescription"]
                if held["status"] == REVOKED:
                    raise DeviceRefused(f"AWS IoT holds the certificate of {serial} as revoked; "
                                        "it is not registered again.") from None
                arn = str(held["certificateArn"])
                pending = held["status"] == PENDING  # it connected (JITR) before any activation
            elif exc.code in DEVICE_REFUSALS:
                raise DeviceRefused(f"{serial}: {exc}") from None
            else:
                raise
        ensure_device(self.api, serial, subject_value(cert, NameOID.SERIAL_NUMBER), arn, self.policy_name)
        if pending:
            self.api.call("update_certificate", certificateId=certificate_id, newStatus=ACTIVE)
        return certificate_id


def progress_path(workspace: Workspace, region: str) -> Path:
    return aws_dir(workspace, region) / "registered.jsonl"


def bulk_register(workspace: Workspace, api: IotApi, without_ca: bool = False, rate: float = DEFAULT_RATE,
                  policy_name: str = POLICY_NAME, clock: Clock = SYSTEM_CLOCK,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Register every live certificate of the ledger, ``rate`` devices a second, resumably."""
    check_policy_name(policy_name)
    limiter = RateLimiter(rate, clock)
    ca_pem = None if without_ca else _pem(load_sub(workspace))
    if not without_ca:
        _registered_ca(workspace, api.region)
    records = [r for r in ledger_records(workspace) if r.get("certificate")]
    progress = Progress(progress_path(workspace, api.region))
    registrar = AwsRegistrar(api, policy_name)
    registered, already, refused = 0, 0, []
    for number, record in enumerate(records, 1):
        fingerprint = pem_fingerprint(record["certificate"])
        if progress.get(fingerprint) is not None:
            already += 1
            continue
        limiter.wait()
        try:
            certificate_id = registrar.register_device(record["serial"], record["certificate"], ca_pem)
        except DeviceRefused as exc:
            refused.append({"serial": record["serial"], "reason": str(exc)})
            continue
        progress.add(record["serial"], fingerprint, certificate_id)
        registered += 1
        if on_progress is not None:
            on_progress(number, len(records))
    return {"region": api.region, "mode": "without-ca" if without_ca else "with-ca", "rate": rate,
            "certificates": len(records), "registered": registered, "already_registered": already,
            "refused": refused, "throttled_retries": api.retried}


# --- revocation and status ---------------------------------------------------------------------

def _aws_ids(api: IotApi, progress: Progress, record: dict[str, Any], exists: Callable[[str], bool],
             has_thing: Callable[[str], bool], thorough: bool) -> list[str]:
    """The AWS certificate ids of one device: from bulk progress, from the certificate fingerprint
    (AWS's id is the SHA-256 of the DER) and, when those find nothing or ``thorough``, from the
    principals of its thing (a JITR device)."""
    candidates = [e["certificate_id"] for e in progress.for_serial(record["serial"])]
    if record.get("certificate"):
        candidates.append(pem_fingerprint(record["certificate"]))
    ids = [i for i in dict.fromkeys(candidates) if exists(i)]
    if (thorough or not ids) and has_thing(record["serial"]):
        for arn in api.all("list_thing_principals", "principals", thingName=record["serial"]):
            certificate_id = certificate_id_of(arn)
            if certificate_id is not None and certificate_id not in ids:
                ids.append(certificate_id)
    return ids


def revoke_device(workspace: Workspace, api: IotApi, serial: str) -> dict[str, Any]:
    """Revoke every certificate AWS IoT holds for the device, then detach its policies and thing."""
    record = next((r for r in ledger_records(workspace) if r.get("serial") == serial), None)
    if record is None:
        raise StamplineError(f"the ledger has no device with serial {serial}.")
    progress = Progress(progress_path(workspace, api.region))
    changes: list[str] = []
    revoked: list[str] = []
    ids = _aws_ids(api, progress, record,
                   lambda i: api.find("describe_certificate", certificateId=i) is not None,
                   lambda name: api.find("describe_thing", thingName=name) is not None, thorough=True)
    for certificate_id in ids:
        description = api.call("describe_certificate", certificateId=certificate_id)["certificateDescription"]
        arn = description["certificateArn"]
        revoked.append(certificate_id)
        if description["status"] != REVOKED:  # first: AWS disconnects a device whose certificate leaves ACTIVE
            api.call("update_certificate", certificateId=certificate_id, newStatus=REVOKED)
            changes.append(f"certificate {certificate_id[:12]} revoked")
        for policy in list(api.all("list_attached_policies", "policies", target=arn)):
            api.call("detach_policy", policyName=policy["policyName"], target=arn)
            changes.append(f"policy {policy['policyName']} detached")
        for thing in list(api.all("list_principal_things", "things", principal=arn)):
            api.call("detach_thing_principal", thingName=thing, principal=arn)
            changes.append(f"certificate detached from thing {thing}")
    if not revoked:
        raise StamplineError(f"AWS IoT ({api.region}) holds no certificate of {serial}.")
    return {"serial": serial, "certificates": revoked, "changes": changes}


def status(workspace: Workspace, api: IotApi) -> dict[str, Any]:
    """The CA and every ledger device as AWS IoT sees them, beside the ledger's own state."""
    record = _ca_record(workspace, api.region)
    ca: dict[str, Any] = {"registered": record is not None}
    if record is not None:
        found = api.find("describe_ca_certificate", certificateId=record["certificate_id"])
        ca.update(certificate_id=record["certificate_id"],
                  status=found["certificateDescription"]["status"] if found else "MISSING",
                  auto_registration=(found or {}).get("certificateDescription", {}).get("autoRegistrationStatus"))
    held = {c["certificateId"]: c["status"] for c in api.all("list_certificates", "certificates", pageSize=250)}
    things = {t["thingName"] for t in api.all("list_things", "things", maxResults=250)}
    progress = Progress(progress_path(workspace, api.region))
    devices, matched = [], set()
    for device in ledger_records(workspace):
        if not device.get("serial"):
            continue
        ids = _aws_ids(api, progress, device, held.__contains__, things.__contains__, thorough=False)
        matched.update(ids)
        aws = [{"certificate_id": i, "status": held[i]} for i in ids if i in held]
        entry = {"serial": device["serial"], "chip_id": device["chip_id"], "ledger_state": device["state"],
                 "ledger_certificate": "live" if device.get("certificate") else
                 ("revoked" if device.get("revoked") else "none"),
                 "aws": aws, "thing": device["serial"] in things, "attention": ""}
        if not device.get("certificate") and any(c["status"] == ACTIVE for c in aws):
            entry["attention"] = "no live certificate in the ledger, but one ACTIVE in AWS IoT."
        devices.append(entry)
    unmatched = []
    if record is not None and ca["status"] != "MISSING":
        under_ca = api.all("list_certificates_by_ca", "certificates", caCertificateId=record["certificate_id"])
        unmatched = [{"certificate_id": c["certificateId"], "status": c["status"]}
                     for c in under_ca if c["certificateId"] not in matched]
    return {"region": api.region, "ca": ca, "devices": devices, "unmatched_certificates": unmatched}


def client_api(region: str | None, endpoint_url: str | None, backoff: Backoff = Backoff()) -> IotApi:
    return IotApi(iot_client(region, endpoint_url), backoff)
