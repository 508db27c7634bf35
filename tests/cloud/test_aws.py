"""The AWS IoT Core adapter against moto in server mode (loopback), and botocore's Stubber where
moto lacks a behaviour: CA registration, JITR activation, revocation, bulk registration with
resume and throttling, status, and the command line's refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import boto3
import pytest
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from conftest import tool
from stampline import ceremony
from stampline.cloud import aws
from stampline.cloud.aws_api import AwsRefusal, Backoff, IotApi, RateLimiter
from stampline.cloud.aws_device import LedgerIndex, handle_registration_event, pem_fingerprint
from stampline.errors import StamplineError
from stampline.pki.policy import check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.station.ledger import DeviceState, Ledger
from stampline.workspace import Workspace

REGION = "eu-west-1"
ORG = "Test Org"


# --- moto server ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION)
    for name in ("AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def client(moto_url: str) -> Any:
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=5).close()
    return boto3.client("iot", endpoint_url=moto_url, region_name=REGION)


@pytest.fixture
def api(client: Any) -> IotApi:
    return IotApi(client)


# --- a workspace whose ledger holds devices issued by the real Sub CA -------------------------

@dataclass
class Line:
    workspace: Workspace
    issuer: DeviceIssuer
    serials: list[str]
    chips: list[str]

    def issue(self, serial: str, chip: str) -> tuple[bytes, str]:
        """A device certificate signed by the Sub CA through its token (not recorded anywhere)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = csr_subject(serial, ORG, chip)
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        profile = DeviceProfile("ec-p256", 7300, {"organization": ORG, "common_name": serial})
        accepted = check_csr(csr.public_bytes(Encoding.DER), profile, subject, lambda _: None)
        return self.issuer.issue(accepted, profile, chip), accepted.public_key_sha256

    def record(self, index: int) -> dict[str, Any]:
        return next(r for r in aws.ledger_records(self.workspace) if r["serial"] == self.serials[index])

    def pem(self, index: int) -> str:
        return str(self.record(index)["certificate"])


def make_line(workspace: Workspace, count: int) -> Line:
    token, label = workspace.config().key_token("sub_ca")
    line = Line(workspace, DeviceIssuer(ceremony.load_sub(workspace), token.signer(label)), [], [])
    with Ledger(workspace.ledger_path, station_id="line-1") as ledger:
        batch = ledger.open_batch("test", "ab" * 32)
        for n in range(count):
            chip, serial = f"7cdf{n:08x}", f"ACME-{n + 1:06d}"
            ledger.device_seen(chip, "esp32c3", "1.0.0", "1.0.0", "/dev/pts/9", batch)
            der, digest = line.issue(serial, chip)
            ledger.record_issuance(chip, batch, serial, der, digest)
            ledger.set_state(chip, DeviceState.PROVISIONED)
            line.serials.append(serial)
            line.chips.append(chip)
    return line


@pytest.fixture
def line(fresh_workspace: Workspace) -> Line:
    return make_line(fresh_workspace, 4)


def sub_pem(workspace: Workspace) -> str:
    return ceremony.load_sub(workspace).public_bytes(Encoding.PEM).decode()


def jitr_connect(client: Any, workspace: Workspace, cert_pem: str) -> dict[str, Any]:
    """What AWS IoT does at a JITR device's first connection (moto does not): register the
    certificate PENDING_ACTIVATION under its CA and publish the event."""
    registered = client.register_certificate(certificatePem=cert_pem, caCertificatePem=sub_pem(workspace),
                                             status="PENDING_ACTIVATION")
    return {"certificateId": registered["certificateId"], "caCertificateId": "ab" * 32,
            "certificateStatus": "PENDING_ACTIVATION", "timestamp": 1_700_000_000_000,
            "awsAccountId": "123456789012", "certificateRegistrationTimestamp": "1700000000000"}


def run_aws(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command line in a fresh process, with the aws group whether or not main lists it yet."""
    code = ("import sys\nfrom stampline.cli import aws_cmd, main\n"
            "if aws_cmd not in main.COMMANDS:\n    main.COMMANDS = main.COMMANDS + (aws_cmd,)\n"
            "sys.exit(main.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "aws", *args], capture_output=True, text=True,
                          input=input, timeout=120)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --- CA registration --------------------------------------------------------------------------

def test_register_ca_with_proof_of_possession(line: Line, client: Any, api: IotApi) -> None:
    result = aws.register_ca(line.workspace, api)
    assert result["registered_now"] and result["status"] == "ACTIVE"
    held = client.describe_ca_certificate(certificateId=result["certificate_id"])["certificateDescription"]
    assert held["status"] == "ACTIVE"
    assert x509.load_pem_x509_certificate(held["certificatePem"].encode()) == ceremony.load_sub(line.workspace)
    record = json.loads((line.workspace.root / "aws" / REGION / "ca.json").read_text())
    assert record["certificate_id"] == result["certificate_id"]
    again = aws.register_ca(line.workspace, api)  # nothing sent to register twice
    assert not again["registered_now"] and again["certificate_id"] == result["certificate_id"]


def _forged_verification(ca: x509.Certificate, code: str, common_name: str | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())  # not the CA's key
    now = datetime.now(timezone.utc)
    return (x509.CertificateBuilder().issuer_name(ca.subject)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or code)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))


def test_register_ca_refuses_what_aws_would_refuse_before_sending(line: Line) -> None:
    silent = boto3.client("iot", region_name=REGION)
    with Stubber(silent) as stubber:  # no response queued: any call to AWS would fail the test
        api = IotApi(silent)
        sub = ceremony.load_sub(line.workspace)
        code = "f" * 64
        with pytest.raises(StamplineError, match="not signed by the CA's key"):
            aws.register_ca_certificate(api, sub, _forged_verification(sub, code), code)
        token, label = line.workspace.config().key_token("sub_ca")
        from stampline.cloud.verification import verification_certificate
        good = verification_certificate(sub, token.signer(label), code)
        with pytest.raises(StamplineError, match="CN is not the registration code"):
            aws.register_ca_certificate(api, sub, good, "0" * 64)
        device = x509.load_pem_x509_certificate(line.pem(0).encode())
        with pytest.raises(StamplineError, match="not a CA certificate"):
            aws.register_ca_certificate(api, device, good, code)
        stubber.assert_no_pending_responses()


def test_aws_refusal_of_a_ca_is_one_sentence(line: Line) -> None:
    client = boto3.client("iot", region_name=REGION)
    sub = ceremony.load_sub(line.workspace)
    token, label = line.workspace.config().key_token("sub_ca")
    from stampline.cloud.verification import verification_certificate
    good = verification_certificate(sub, token.signer(label), "c" * 64)
    with Stubber(client) as stubber:
        stubber.add_client_error("register_ca_certificate", "RegistrationCodeValidationException",
                                 "The registration code\nis invalid", 400)
        with pytest.raises(AwsRefusal) as refused:
            aws.register_ca_certificate(IotApi(client), sub, good, "c" * 64)
    assert refused.value.code == "RegistrationCodeValidationException"
    assert str(refused.value) == ("AWS IoT refused RegisterCACertificate (RegistrationCodeValidationException): "
                                  "The registration code is invalid.")


# --- JITR activation --------------------------------------------------------------------------

def test_activation_of_a_ledger_device_is_idempotent(line: Line, client: Any, api: IotApi) -> None:
    event = jitr_connect(client, line.workspace, line.pem(1))
    index = aws.ledger_index(line.workspace)
    report = handle_registration_event(event, client, index, aws.load_crl(line.workspace), "fleet")
    assert report["outcome"] == "active" and report["serial"] == line.serials[1]
    assert report["status_before"] == "PENDING_ACTIVATION" and report["status"] == "ACTIVE"
    assert len(report["changes"]) == 5, report["changes"]
    cert_id = event["certificateId"]
    held = client.describe_certificate(certificateId=cert_id)["certificateDescription"]
    assert held["status"] == "ACTIVE"
    thing = client.describe_thing(thingName=line.serials[1])
    assert thing["attributes"] == {"chip_id": line.chips[1]}
    assert client.list_thing_principals(thingName=line.serials[1])["principals"] == [held["certificateArn"]]
    attached = client.list_attached_policies(target=held["certificateArn"])["policies"]
    assert [p["policyName"] for p in attached] == ["fleet"]
    policy = json.loads(client.get_policy(policyName="fleet")["policyDocument"])
    base = "arn:aws:iot:eu-west-1:123456789012:"
    thing = "${iot:Connection.Thing.ThingName}"
    grants = {(json.dumps(s["Action"]), s["Resource"]) for s in policy["Statement"]}
    assert grants == {('"iot:Connect"', f"{base}client/{thing}"),
                      ('["iot:Publish", "iot:Receive"]', f"{base}topic/devices/{thing}/*"),
                      ('"iot:Subscribe"', f"{base}topicfilter/devices/{thing}/*")}
    assert policy["Statement"][0]["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}

    again = handle_registration_event(event, client, index, None, "fleet")  # the event repeats
    assert again["outcome"] == "active" and again["changes"] == []
    assert len(client.list_things()["things"]) == 1
    assert len(client.list_policies()["policies"]) == 1
    assert len(client.list_policy_versions(policyName="fleet")["policyVersions"]) == 1


def test_a_certificate_absent_from_the_ledger_stays_pending_and_is_suspect(line: Line, client: Any) -> None:
    der, _ = line.issue("ACME-999999", "0badc0ffee00")  # the Sub CA's key, outside the station
    pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()
    event = jitr_connect(client, line.workspace, pem)
    report = handle_registration_event(event, client, aws.ledger_records(line.workspace), None, "fleet")
    assert report["outcome"] == "suspect" and report["changes"] == []
    assert "outside the station" in report["reason"]
    assert client.describe_certificate(certificateId=event["certificateId"])["certificateDescription"]["status"] \
        == "PENDING_ACTIVATION"
    assert client.list_things()["things"] == []


def test_a_certificate_in_the_crl_is_revoked(line: Line, client: Any) -> None:
    cert = x509.load_pem_x509_certificate(line.pem(2).encode())
    ceremony.issue_crl(line.workspace, [ceremony.revoked_entry(format(cert.serial_number, "x"), time.time(),
                                                                "key-compromise")])
    event = jitr_connect(client, line.workspace, line.pem(2))
    report = handle_registration_event(event, client, aws.ledger_index(line.workspace),
                                       aws.load_crl(line.workspace), "fleet")
    assert report["outcome"] == "revoked" and "CRL" in report["reason"] and "keyCompromise" in report["reason"]
    assert client.describe_certificate(certificateId=event["certificateId"])["certificateDescription"]["status"] \
        == "REVOKED"
    assert client.list_things()["things"] == []
    # revoked in the ledger only (no CRL yet) is revoked too
    other = x509.load_pem_x509_certificate(line.pem(3).encode())
    with Ledger(line.workspace.ledger_path) as ledger:
        ledger.revoke(format(other.serial_number, "x"), "rework")
    event = jitr_connect(client, line.workspace, other.public_bytes(Encoding.PEM).decode())
    report = handle_registration_event(event, client, aws.ledger_index(line.workspace), None, "fleet")
    assert report["outcome"] == "revoked" and "ledger" in report["reason"]


def test_bad_events_are_refused_in_one_sentence(client: Any) -> None:
    index = LedgerIndex({}, frozenset())
    for event in ({}, {"certificateId": "../etc"}, [], {"certificateId": "a" * 64, "caCertificateId": 5}):
        with pytest.raises(StamplineError) as refused:
            handle_registration_event(event, client, index, None, "fleet")  # type: ignore[arg-type]
        assert str(refused.value).count(".") == 1 and "\n" not in str(refused.value)


# --- revocation -------------------------------------------------------------------------------

def test_device_revocation_revokes_and_detaches(line: Line, client: Any, api: IotApi) -> None:
    event = jitr_connect(client, line.workspace, line.pem(0))
    handle_registration_event(event, client, aws.ledger_index(line.workspace), None, "fleet")
    result = aws.revoke_device(line.workspace, api, line.serials[0])
    assert result["certificates"] == [event["certificateId"]]
    held = client.describe_certificate(certificateId=event["certificateId"])["certificateDescription"]
    assert held["status"] == "REVOKED"
    assert client.list_attached_policies(target=held["certificateArn"])["policies"] == []
    assert client.list_thing_principals(thingName=line.serials[0])["principals"] == []
    with pytest.raises(StamplineError, match="holds no certificate of ACME-000002"):
        aws.revoke_device(line.workspace, api, line.serials[1])
    with pytest.raises(StamplineError, match="no device with serial"):
        aws.revoke_device(line.workspace, api, "NOPE-1")


def test_revoke_ca_deactivates_it_and_revokes_its_certificates(line: Line, client: Any, api: IotApi) -> None:
    ca_id = aws.register_ca(line.workspace, api)["certificate_id"]
    aws.bulk_register(line.workspace, api, clock=FakeClock())
    clock = FakeClock()
    result = aws.revoke_ca(line.workspace, api, rate=5, clock=clock)
    assert client.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]["status"] == "INACTIVE"
    assert len(result["revoked"]) == 4
    assert {c["status"] for c in client.list_certificates_by_ca(caCertificateId=ca_id)["certificates"]} == {"REVOKED"}
    assert clock.sleeps == pytest.approx([0.2] * 3)


def test_revoke_ca_asks_aws_for_inactive_and_no_auto_registration(line: Line) -> None:
    """moto ignores newAutoRegistrationStatus: what is sent is checked with the Stubber."""
    ca_dir = line.workspace.root / "aws" / REGION
    ca_dir.mkdir(parents=True)
    (ca_dir / "ca.json").write_text(json.dumps({"certificate_id": "c" * 64}))
    client = boto3.client("iot", region_name=REGION)
    with Stubber(client) as stubber:
        stubber.add_response("update_ca_certificate", {}, {"certificateId": "c" * 64, "newStatus": "INACTIVE",
                                                           "newAutoRegistrationStatus": "DISABLE"})
        result = aws.revoke_ca(line.workspace, IotApi(client), devices=False)
        stubber.assert_no_pending_responses()
    assert result["status"] == "INACTIVE" and result["revoked"] == []


# --- bulk registration ------------------------------------------------------------------------

def test_bulk_registration_registers_each_once_and_resumes(fresh_workspace: Workspace, client: Any,
                                                           api: IotApi) -> None:
    line = make_line(fresh_workspace, 6)
    aws.register_ca(line.workspace, api)
    ca_pem = sub_pem(line.workspace)
    # a run killed after three devices: two recorded, the third registered but not yet recorded,
    # and a torn last line
    progress = aws.Progress(aws.progress_path(line.workspace, REGION))
    registrar = aws.AwsRegistrar(api)
    for n in range(3):
        certificate_id = registrar.register_device(line.serials[n], line.pem(n), ca_pem)
        if n < 2:
            progress.add(line.serials[n], pem_fingerprint(line.pem(n)), certificate_id)
    with open(progress.path, "a") as f:
        f.write('{"serial":"ACME-0000')

    clock = FakeClock()
    result = aws.bulk_register(line.workspace, api, rate=4, clock=clock)
    assert (result["registered"], result["already_registered"], result["refused"]) == (4, 2, [])
    assert clock.sleeps == pytest.approx([0.25] * 3)  # four registrations, 1/4 s apart, no real sleep
    certificates = client.list_certificates()["certificates"]
    assert len(certificates) == 6 and {c["status"] for c in certificates} == {"ACTIVE"}
    lines = progress.path.read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["certificate_id"] for x in lines}) == 6
    for n, serial in enumerate(line.serials):
        principals = client.list_thing_principals(thingName=serial)["principals"]
        assert len(principals) == 1
        assert [p["policyName"] for p in client.list_attached_policies(target=principals[0])["policies"]] \
            == [aws.POLICY_NAME]
        assert client.describe_thing(thingName=serial)["attributes"] == {"chip_id": line.chips[n]}

    rerun = aws.bulk_register(line.workspace, api, rate=4, clock=FakeClock())
    assert (rerun["registered"], rerun["already_registered"]) == (0, 6)
    assert len(client.list_certificates()["certificates"]) == 6


def test_bulk_registration_needs_the_ca_or_without_ca(line: Line, client: Any, api: IotApi) -> None:
    with pytest.raises(StamplineError, match="register-ca"):
        aws.bulk_register(line.workspace, api, clock=FakeClock())
    client.create_thing(thingName=line.serials[3], attributePayload={"attributes": {"chip_id": "0123456789ab"}})
    result = aws.bulk_register(line.workspace, api, without_ca=True, clock=FakeClock())
    assert result["registered"] == 3 and result["mode"] == "without-ca"
    assert result["refused"] == [{"serial": line.serials[3], "reason": f"the thing {line.serials[3]} already "
                                  f"exists for chip 0123456789ab, not {line.chips[3]}."}]
    assert {c.get("caCertificateId") for c in client.list_certificates()["certificates"]} == {None}


def test_registrar_refuses_a_certificate_aws_holds_as_revoked(line: Line, client: Any, api: IotApi) -> None:
    registrar = aws.AwsRegistrar(api)
    first = registrar.register_device(line.serials[0], line.pem(0), None)
    assert registrar.register_device(line.serials[0], line.pem(0), None) == first  # idempotent
    client.update_certificate(certificateId=first, newStatus="REVOKED")
    with pytest.raises(StamplineError, match="as revoked"):
        registrar.register_device(line.serials[0], line.pem(0), None)
    with pytest.raises(StamplineError, match="does not name it"):
        registrar.register_device(line.serials[1], line.pem(0), None)


# --- throttling, with a fake clock -------------------------------------------------------------

def test_throttling_backs_off_exponentially_then_gives_up() -> None:
    client = boto3.client("iot", region_name=REGION)
    clock = FakeClock()
    api = IotApi(client, Backoff(retries=4, base_s=0.5, cap_s=3.0), clock, jitter=lambda: 1.0)
    with Stubber(client) as stubber:
        for code in ("ThrottlingException", "ThrottlingException", "ServiceUnavailableException"):
            stubber.add_client_error("register_certificate_without_ca", code, "Rate exceeded", 400)
        stubber.add_response("register_certificate_without_ca", {"certificateId": "a" * 64,
                                                                 "certificateArn": "arn:aws:iot:x"})
        assert api.call("register_certificate_without_ca", certificatePem="x")["certificateId"] == "a" * 64
        assert clock.sleeps == [0.5, 1.0, 2.0]
        clock.sleeps.clear()
        for _ in range(5):
            stubber.add_client_error("register_certificate_without_ca", "ThrottlingException", "Rate exceeded", 400)
        with pytest.raises(AwsRefusal, match="kept refusing RegisterCertificateWithoutCA .* after 4 retries"):
            api.call("register_certificate_without_ca", certificatePem="x")
        assert clock.sleeps == [0.5, 1.0, 2.0, 3.0]  # capped
        stubber.add_client_error("register_certificate_without_ca", "CertificateValidationException", "bad", 400)
        with pytest.raises(AwsRefusal):
            api.call("register_certificate_without_ca", certificatePem="x")
        assert len(clock.sleeps) == 4  # no retry of a refusal
    assert Backoff(base_s=1, cap_s=100).delay(3, 0.0) == 4.0  # jitter halves at most


def test_rate_limiter_spaces_calls() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, clock)
    for _ in range(3):
        limiter.wait()
    assert clock.sleeps == pytest.approx([0.1, 0.1])
    clock.now += 5  # idle time is not saved up into a burst
    limiter.wait()
    limiter.wait()
    assert clock.sleeps[-1] == pytest.approx(0.1) and len(clock.sleeps) == 3
    with pytest.raises(StamplineError):
        RateLimiter(0)


def test_bulk_registration_survives_throttling(line: Line, client: Any) -> None:
    """moto never throttles: a client that throttles every other call, in front of moto."""
    calls = {"n": 0}

    def throttle(**_: Any) -> None:
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                              "RegisterCertificateWithoutCA")

    client.meta.events.register("before-call.iot.RegisterCertificateWithoutCA", throttle)
    clock = FakeClock()
    api = IotApi(client, clock=clock, jitter=lambda: 0.0)
    result = aws.bulk_register(line.workspace, api, without_ca=True, clock=clock)
    assert result["registered"] == 4 and result["throttled_retries"] == 4
    assert len(client.list_certificates()["certificates"]) == 4


# --- status and the command line --------------------------------------------------------------

def test_status_and_cli(line: Line, client: Any, moto_url: str) -> None:
    ws = str(line.workspace.root)
    done = run_aws("register-ca", "--workdir", ws, "--endpoint-url", moto_url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "ACTIVE"
    event = jitr_connect(client, line.workspace, line.pem(0))
    done = run_aws("activate", "--workdir", ws, "--endpoint-url", moto_url, "--event", "-", input=json.dumps(event))
    assert done.returncode == 0 and "ACME-000001: active (ACTIVE)" in done.stdout, done.stderr
    pending = jitr_connect(client, line.workspace, line.pem(1))  # connected, its event not handled yet
    done = run_aws("bulk-register", "--workdir", ws, "--endpoint-url", moto_url, "--rate", "1000", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["registered"] == 4  # the JITR devices were found in AWS, not registered twice
    assert len(client.list_certificates()["certificates"]) == 4
    assert client.describe_certificate(certificateId=pending["certificateId"])["certificateDescription"]["status"] \
        == "ACTIVE"
    done = run_aws("revoke", "--workdir", ws, "--endpoint-url", moto_url, "--serial", line.serials[3])
    assert done.returncode == 0, done.stderr
    done = run_aws("status", "--workdir", ws, "--endpoint-url", moto_url, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ca"]["status"] == "ACTIVE"
    seen = {d["serial"]: [c["status"] for c in d["aws"]] for d in result["devices"]}
    assert seen == {line.serials[0]: ["ACTIVE"], line.serials[1]: ["ACTIVE"], line.serials[2]: ["ACTIVE"],
                    line.serials[3]: ["REVOKED"]}
    assert all(d["thing"] and d["ledger_state"] == "provisioned" for d in result["devices"])
    # a suspect: exit code 3, listed as unmatched under the CA
    der, _ = line.issue("ACME-777777", "0badc0ffee01")
    pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()
    event = jitr_connect(client, line.workspace, pem)
    path = line.workspace.root / "event.json"
    path.write_text(json.dumps(event))
    done = run_aws("activate", "--workdir", ws, "--endpoint-url", moto_url, "--event", str(path))
    assert done.returncode == 3 and "suspect" in done.stdout, done.stderr
    done = run_aws("status", "--workdir", ws, "--endpoint-url", moto_url)
    assert done.returncode == 0 and "match no ledger device" in done.stdout, done.stderr


@pytest.mark.parametrize("args,stdin,text", [
    (["activate", "--event", "-"], "not json", "the event is not JSON"),
    (["activate", "--event", "-"], "[1]", "not a JSON object"),
    (["activate", "--event", "/nonexistent/event.json"], None, "cannot read the event"),
    (["bulk-register", "--rate", "0"], None, "must be more than 0"),
    (["status", "--endpoint-url", "http://iot.example.com"], None, "plain http only on this machine"),
    (["status", "--endpoint-url", "https://user:pw@iot.example.com"], None, "must not carry credentials"),
    (["status", "--region", "Mars"], None, "not an AWS region"),
    (["revoke"], None, "--serial"),
], ids=["not-json", "not-object", "no-file", "rate", "http", "userinfo", "region", "no-serial"])
def test_cli_bad_input_is_one_sentence(line: Line, moto_url: str, args: list[str], stdin: str | None,
                                       text: str) -> None:
    done = run_aws(*args[:1], "--workdir", str(line.workspace.root), *args[1:], input=stdin)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("stampline: ") and text in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
