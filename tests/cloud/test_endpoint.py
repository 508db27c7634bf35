"""The local endpoint: Mosquitto with mutual TLS and Just-In-Time Registration, with devices
provisioned and locked at the station connecting on their own."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import run_cli, secure_recipe
from stampline import ceremony, recipe as recipes
from stampline.cloud import jitr
from stampline.cloud.broker import free_port
from stampline.cloud.endpoint import Endpoint
from stampline.cloud.registry import ACTIVE, PENDING, REVOKED, Registry
from stampline.cloud.service import Limits
from stampline.cloud.verification import verification_certificate
from stampline.device.cloud_client import tls_context
from stampline.device.emulator import DeviceOptions, Emulator, EmulatedDevice
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.pki.policy import check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.station.line import open_station, run_line
from stampline.workspace import Workspace


def wait_for(condition: Callable[[], Any], timeout: float = 40.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


class Line:
    """A station workspace, an endpoint, and three secured devices talking to it."""

    def __init__(self, station: Workspace, endpoint: Endpoint, emulator: Emulator, devices: list[EmulatedDevice],
                 serials: list[str]) -> None:
        self.station, self.endpoint, self.emulator, self.devices, self.serials = (
            station, endpoint, emulator, devices, serials)

    def registry(self) -> Registry:
        return self.endpoint.registry()

    def states(self) -> dict[str, str]:
        registry = self.registry()
        try:
            return {d.serial: d.state for d in registry.devices()}
        finally:
            registry.close()


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory, ca_workspace: Workspace, release) -> Iterator[Line]:  # type: ignore[no-untyped-def]
    with open_line(tmp_path_factory.mktemp("endpoint-line"), ca_workspace, release) as made:
        yield made


@contextmanager
def open_line(root: Path, ca_workspace: Workspace, release, count: int = 3,  # type: ignore[no-untyped-def]
              limits: Limits | None = None) -> Iterator[Line]:
    """A station copied from the CA workspace, an endpoint up with ``limits``, and ``count``
    devices provisioned and secured by the station (they then connect on their own)."""
    station = Workspace.at(root / "station", create=True)
    shutil.copytree(ca_workspace.root, station.root, dirs_exist_ok=True)
    conf = station.softhsm_dir / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(ca_workspace.root), str(station.root)))
    port = free_port()
    station.recipe_path.write_text(secure_recipe(release).replace("mqtts://127.0.0.1:8883", f"mqtts://127.0.0.1:{port}"))
    endpoint = Endpoint(root / "cloud")
    endpoint.up(port, limits)
    try:
        endpoint.register_ca(station)
        trust = Path(endpoint.info().ca_file).read_bytes()
        with Emulator(station.devices_dir, TimingModel(0), cloud_trust=trust) as emulator:
            devices = emulator.add_new(count, DeviceOptions(images={"manufacturing": release.data("manufacturing"),
                                                                      "application": release.data("application")}))
            with open_station(station, recipes.load(station.recipe_path)) as context:
                results = run_line(context, [d.port for d in devices])
            assert [r.outcome for r in results] == ["secured"] * count, [r.reason for r in results]
            yield Line(station, endpoint, emulator, devices, [r.serial for r in results])
    finally:
        endpoint.down()


def test_jitr_pending_until_exported_then_active_once_and_hello_arrives(line: Line) -> None:
    # the devices connect on their own after their first boot; the cloud has no ledger export yet
    wait_for(lambda: len(line.states()) == 3, what="three registrations")
    registry = line.registry()
    try:
        assert all(d.state == PENDING and d.suspect for d in registry.devices())
    finally:
        registry.close()
    imported = run_cli("endpoint", "import-ledger", "--workdir", str(line.endpoint.workdir),
                       "--station", str(line.station.root), "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["activated"] == 3
    wait_for(lambda: all(d.cloud and d.cloud.status.hello_acked for d in line.devices), what="hellos")
    listed = json.loads(run_cli("endpoint", "devices", "--workdir", str(line.endpoint.workdir), "--json").stdout)
    assert {d["serial"]: d["state"] for d in listed} == {s: ACTIVE for s in line.serials}
    wait_for(lambda: all(d["hello_at"] for d in json.loads(run_cli(
        "endpoint", "devices", "--workdir", str(line.endpoint.workdir), "--json").stdout)), what="hello records")
    # the registration event repeats; handling it again changes nothing
    registry = line.registry()
    try:
        device = registry.devices()[0]
        before = registry._db.execute("SELECT count(*) FROM events").fetchone()[0]
        event = {"certificateId": device.cert_id, "caCertificateId": device.ca_id, "certificateStatus": PENDING}
        assert jitr.handle_registration_event(event, registry, []) == ACTIVE
        assert registry._db.execute("SELECT count(*) FROM events").fetchone()[0] == before
        assert registry._db.execute("SELECT count(*) FROM events WHERE kind = 'active' AND cert_id = ?",
                                    (device.cert_id,)).fetchone()[0] == 1
    finally:
        registry.close()
    info = json.loads(run_cli("endpoint", "info", "--workdir", str(line.endpoint.workdir), "--json").stdout)
    assert info["host"] == "127.0.0.1" and info["port"] == line.endpoint.info().port and Path(info["ca_file"]).exists()


def _device_context(line: Line, device: EmulatedDevice) -> ssl.SSLContext:
    stamp = device.handler.stamp()  # type: ignore[union-attr]
    return tls_context(stamp[("stamp", "cert")][1], stamp[("stamp", "ca_cert")][1],  # type: ignore[arg-type]
                       stamp[("device", "priv_key")][1], Path(line.endpoint.info().ca_file).read_bytes())  # type: ignore[arg-type]


def _mqtt(context: ssl.SSLContext, port: int, client_id: str) -> tuple[mqtt.Client, dict[int, Any]]:
    acks: dict[int, Any] = {}
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(context)
    client.on_connect = lambda c, u, f, reason, p: connected.set() if not reason.is_failure else None
    client.on_publish = lambda c, u, mid, reason, p: acks.__setitem__(mid, reason)
    client.on_subscribe = lambda c, u, mid, reasons, p: acks.__setitem__(mid, reasons)
    for _ in range(20):  # the endpoint may close a first connection
        try:
            client.connect("127.0.0.1", port)
            client.loop_start()
            if connected.wait(3):
                return client, acks
            client.loop_stop()
        except (OSError, ssl.SSLError):
            time.sleep(0.2)
    raise AssertionError("could not connect")


def test_an_active_device_may_use_its_own_topics_only(line: Line) -> None:
    wait_for(lambda: set(line.states().values()) == {ACTIVE}, what="activation")
    own, other = line.serials[0], line.serials[1]
    port = line.endpoint.info().port
    client, acks = _mqtt(_device_context(line, line.devices[0]), port, own)
    neighbour, _ = _mqtt(_device_context(line, line.devices[1]), port, other)
    received: list[str] = []
    client.on_message = lambda c, u, message: received.append(message.topic)
    try:
        mine = client.publish(f"devices/{own}/telemetry", b"1", qos=1)
        theirs = client.publish(f"devices/{other}/telemetry", b"1", qos=1)
        wait_for(lambda: {mine.mid, theirs.mid} <= set(acks), what="acks")
        assert not acks[mine.mid].is_failure
        assert acks[theirs.mid].is_failure  # MQTT 5: not authorized
        client.subscribe(f"devices/{other}/#", qos=1)
        client.subscribe(f"devices/{own}/#", qos=1)
        time.sleep(0.3)
        neighbour.publish(f"devices/{other}/telemetry", b"2", qos=1).wait_for_publish(3)
        client.publish(f"devices/{own}/echo", b"3", qos=1).wait_for_publish(3)
        wait_for(lambda: f"devices/{own}/echo" in received, what="its own message back")
        time.sleep(0.3)
        assert not any(topic.startswith(f"devices/{other}/") for topic in received)
    finally:
        for c in (client, neighbour):
            c.loop_stop()
            c.disconnect()


def test_certificate_from_an_unregistered_ca_is_refused_in_the_handshake(line: Line, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EVIL-1")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(line.endpoint.info().ca_file)
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", line.endpoint.info().port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x10\x00")  # the handshake completes lazily in TLS 1.2 client auth
                assert tls.recv(1) != b""
    log = (line.endpoint.files.path("mosquitto.log")).read_text()
    wait_for(lambda: "certificate verify failed" in line.endpoint.files.path("mosquitto.log").read_text() or None,
             what="Mosquitto refusing the chain")
    assert "EVIL-1" not in line.states() and log is not None


def test_counterfeit_signed_by_the_sub_ca_but_absent_from_the_ledger_stays_pending(line: Line) -> None:
    token, label = line.station.config().key_token("sub_ca")
    issuer = DeviceIssuer(ceremony.load_sub(line.station), token.signer(label))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = csr_subject("ACME-999999", "Acme Devices", "7cdfa1999999")
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
           .public_bytes(serialization.Encoding.DER))
    profile = DeviceProfile("ec-p256", 7300, {"common_name": "ACME-999999", "organization": "Acme Devices"})
    cert_der = issuer.issue(check_csr(csr, profile, subject, lambda _: None), profile, "7cdfa1999999")
    sub_der = ceremony.load_sub(line.station).public_bytes(serialization.Encoding.DER)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    context = tls_context(cert_der, sub_der, key_der, Path(line.endpoint.info().ca_file).read_bytes())
    for _ in range(3):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection(("127.0.0.1", line.endpoint.info().port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"\x10\x00")
                    if tls.recv(1) == b"":
                        raise ConnectionError("closed")
    listed = json.loads(run_cli("endpoint", "devices", "--workdir", str(line.endpoint.workdir), "--json").stdout)
    counterfeit = next(d for d in listed if d["serial"] == "ACME-999999")
    assert counterfeit["state"] == PENDING and counterfeit["suspect"] and "suspect" in counterfeit["reason"]


def test_ca_registration_needs_proof_of_possession(line: Line) -> None:
    registry = line.registry()
    try:
        root_token, root_label = line.station.config().key_token("root_ca")
        sub = ceremony.load_sub(line.station)
        code = registry.registration_code()
        # signed by the root's key instead of the Sub CA's: refused
        from stampline.pki import x509 as px
        forged = _verification_signed_by(root_token.signer(root_label), sub, code, px)
        with pytest.raises(StamplineError, match="not signed by the CA's key"):
            registry.register_ca(sub, forged)
        # a certificate that is not a CA: refused
        device_pem = registry.pem(registry.devices()[0].cert_id)
        device_cert = x509.load_pem_x509_certificate(device_pem.encode())  # type: ignore[union-attr]
        sub_token, sub_label = line.station.config().key_token("sub_ca")
        code = registry.registration_code()
        good_for_sub = verification_certificate(sub, sub_token.signer(sub_label), code)
        with pytest.raises(StamplineError, match="not a CA certificate"):
            registry.register_ca(device_cert, good_for_sub)
    finally:
        registry.close()


def _verification_signed_by(signer, ca: x509.Certificate, code: str, px) -> x509.Certificate:  # type: ignore[no-untyped-def]
    throwaway = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    fields = px.CertificateFields(serial_number=7, issuer=ca.subject,
                                  subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]),
                                  not_before=now, not_after=now + timedelta(days=1),
                                  public_key_der=px.spki_der(throwaway), extensions=[])
    return x509.load_der_x509_certificate(px.sign_certificate(fields, signer))


def test_revoked_device_loses_its_connection_at_once_and_is_refused_after(line: Line) -> None:
    victim = line.devices[2]
    serial = line.serials[2]
    wait_for(lambda: victim.cloud and victim.cloud.status.connected, what="the victim connected")
    attempts = victim.cloud.status.attempts  # type: ignore[union-attr]
    done = run_cli("endpoint", "revoke", "--workdir", str(line.endpoint.workdir), "--serial", serial)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not victim.cloud.status.connected, timeout=5, what="the connection cut")  # type: ignore[union-attr]
    wait_for(lambda: victim.cloud.status.attempts >= attempts + 2, what="retries")  # type: ignore[union-attr]
    assert not victim.cloud.status.connected  # type: ignore[union-attr]
    assert line.states()[serial] == REVOKED
    # and once the CA's CRL lists it, Mosquitto refuses it in the handshake too
    registry = line.registry()
    try:
        cert = x509.load_pem_x509_certificate(registry.pem(registry.by_serial(serial)[0].cert_id).encode())  # type: ignore[union-attr]
    finally:
        registry.close()
    crl = ceremony.issue_crl(line.station, [ceremony.revoked_entry(format(cert.serial_number, "x"), time.time(),
                                                                   "key-compromise")])
    path = line.station.crl_path
    assert crl and path.exists()
    log = line.endpoint.files.path("mosquitto.log")
    before = log.read_text().count("certificate verify failed")
    loaded = run_cli("endpoint", "update-crl", "--workdir", str(line.endpoint.workdir), "--crl", str(path))
    assert loaded.returncode == 0, loaded.stderr
    # the victim keeps retrying; now each handshake fails at Mosquitto (OpenSSL's CRL check)
    wait_for(lambda: log.read_text().count("certificate verify failed") >= before + 2,
             what="Mosquitto refusing the revoked certificate")


def test_daemons_do_not_inherit_pin_variables(line: Line) -> None:
    """A PIN from the environment never lives on in the endpoint's long-running processes."""
    for name in ("mosquitto.pid", "service.pid"):
        pid = int(line.endpoint.files.path(name).read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0].decode() for item in environ if item}
        assert names <= {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "OPENSSL_CONF"}, names
        assert "STAMPLINE_SEAL_DIR" not in names and not any("PIN" in n for n in names)
