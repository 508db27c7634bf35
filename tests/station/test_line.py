"""The station end to end against emulated devices: chains, stamp, no key on the wire, refusals,
bad frames, firmware minimums, recognition and rework."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import tool
from stampline import recipe as recipes
from stampline.device.emulator import DeviceOptions, Emulator, EmulatedDevice
from stampline.device.mfg_firmware import OWN_NAMESPACE
from stampline.device.timing import TimingModel
from stampline.firmware.nvs import NvsImage
from stampline.firmware.partitions import PARTITION_TABLE_OFFSET, TABLE_LENGTH, PartitionTable
from stampline.protocol import messages as m
from stampline.station.flow import DeviceResult
from stampline.station.ledger import Ledger
from stampline.station.line import open_station, run_line
from stampline.workspace import Workspace


@pytest.fixture
def workspace(fresh_workspace: Workspace) -> Workspace:
    fresh_workspace.recipe_path.write_text(recipes.TEMPLATE)
    return fresh_workspace


@pytest.fixture
def emulator(workspace: Workspace) -> Iterator[Emulator]:
    with Emulator(workspace.devices_dir, TimingModel(0)) as emu:
        yield emu


def provision(workspace: Workspace, devices: list[EmulatedDevice], rework: bool = False,
              recipe_text: str | None = None) -> list[DeviceResult]:
    recipe = recipes.parse(recipe_text or recipes.TEMPLATE)
    with open_station(workspace, recipe, rework=rework) as context:
        return run_line(context, [d.port for d in devices])


def stamp_of(device: EmulatedDevice) -> dict[tuple[str, str], tuple[str, object]]:
    """The fctry NVS partition as it lies in the device's flash, parsed."""
    table = PartitionTable.parse(device.flash.read(PARTITION_TABLE_OFFSET, TABLE_LENGTH))
    entry = table.find("fctry")
    return NvsImage.parse(device.flash.read(entry.offset, entry.size)).items()


def test_line_provisions_every_port_and_each_chain_verifies(workspace: Workspace, emulator: Emulator,
                                                            tmp_path: Path) -> None:
    devices = emulator.add_new(4, DeviceOptions())
    results = provision(workspace, devices)
    assert [r.outcome for r in results] == ["provisioned"] * 4
    assert len({r.serial for r in results}) == 4
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        exported = {row["chip_id"]: row for row in ledger.export()}
        assert ledger.verify() == []
    for device, result in zip(devices, results):
        row = exported[device.chip_id]
        assert row["state"] == "provisioned" and row["serial"] == result.serial
        pem = tmp_path / f"{result.serial}.pem"
        pem.write_text(row["certificate"])
        done = subprocess.run([tool("openssl"), "verify", "-x509_strict", "-CAfile", str(workspace.root_cert_path),
                               "-untrusted", str(workspace.sub_cert_path), str(pem)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        # the stamp is in the device's NVS, where the recipe says
        stamp = stamp_of(device)
        cert_der = x509.load_pem_x509_certificate(row["certificate"].encode()).public_bytes(serialization.Encoding.DER)
        assert stamp[("stamp", "cert")] == ("blob", cert_der)
        assert stamp[("stamp", "serial")] == ("string", result.serial)
        assert stamp[("stamp", "endpoint")] == ("string", "mqtts://127.0.0.1:8883")
        assert stamp[("stamp", "ca_cert")][1] == x509.load_pem_x509_certificate(
            workspace.sub_cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
        assert len(str(stamp[("stamp", "pop")][1])) >= 16
        # every step was timed and journaled
        with Ledger.open_readonly(workspace.ledger_path) as ledger:
            steps = {s.step for s in ledger.steps(device.chip_id)}
        assert {"identify", "keygen", "csr", "issue", "write_cert", "verify_cert",
                "write_stamp", "finish"} <= steps


def test_no_private_key_material_crosses_the_link(workspace: Workspace, emulator: Emulator) -> None:
    captured = bytearray()
    device = emulator.add_new(1, DeviceOptions())[0]
    device._tap = lambda direction, data: captured.extend(data)
    assert provision(workspace, [device])[0].outcome == "provisioned"
    kind, der = stamp_of(device)[(OWN_NAMESPACE, "priv_key")]
    key = serialization.load_der_private_key(der, None)  # type: ignore[arg-type]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    line = bytes(captured)
    assert len(line) > 1000  # the capture really saw the session
    assert scalar not in line and scalar[::-1] not in line and scalar.hex().encode() not in line
    assert der not in line  # type: ignore[operator]
    # and the public key did cross (so the capture was of the right session)
    public = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert public in line


def _bad_csr(device: EmulatedDevice, make: Callable[[ec.EllipticCurvePrivateKey, m.CsrBuild], bytes]) -> None:
    """Make the device answer CSR_BUILD with a CSR of the test's choosing (a counterfeit firmware)."""
    firmware = device.firmware
    import hashlib

    def build(request: m.CsrBuild) -> m.CsrBuildReply:
        key = firmware._private_key()
        firmware.csr = make(key, request)  # type: ignore[arg-type]
        return m.CsrBuildReply(length=len(firmware.csr), sha256=hashlib.sha256(firmware.csr).digest())
    firmware._csr_build = build  # type: ignore[method-assign]


def _name(request: m.CsrBuild, cn: str | None = None) -> x509.Name:
    from stampline.pki.policy import csr_subject
    return csr_subject(cn or request.subject_cn, request.subject_o, request.subject_serial or "")


def _csr(key, subject: x509.Name, ca: bool = False) -> bytes:  # type: ignore[no-untyped-def]
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


BAD_CSRS = {
    "ca-true": (lambda key, req: _csr(key, _name(req), ca=True), "asks for CA:TRUE"),
    "wrong-subject": (lambda key, req: _csr(key, _name(req, "EVIL-1")), "is not the allocated"),
    "foreign-key": (lambda key, req: _csr(ec.generate_private_key(ec.SECP384R1()), _name(req)), "secp384r1"),
    "bad-signature": (lambda key, req: _csr(key, _name(req))[:-3] + b"\x00\x00\x00", "does not verify"),
    "garbage": (lambda key, req: b"\x30\x03\x02\x01", "not well-formed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSRS))
def test_bad_csr_is_refused_recorded_and_others_finish(workspace: Workspace, emulator: Emulator, case: str) -> None:
    good, bad = emulator.add_new(2, DeviceOptions())
    make, reason = BAD_CSRS[case]
    _bad_csr(bad, make)
    results = {r.chip_id: r for r in provision(workspace, [good, bad])}
    assert results[good.chip_id].outcome == "provisioned"
    refused = results[bad.chip_id]
    assert refused.outcome == "failed" and refused.step == "issue" and reason in refused.reason
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        assert ledger.live_certificate(bad.chip_id) is None
        assert all(c.chip_id != bad.chip_id for c in ledger.certificates())
        refusals = ledger.refusals(bad.chip_id)
        assert len(refusals) == 1 and reason in refusals[0].reason
        assert ledger.verify() == []


CORRUPTIONS = {
    "flipped-crc": lambda frame: frame[:-1] + bytes([frame[-1] ^ 0xFF]),
    "truncated": lambda frame: frame[: len(frame) // 2],
    "garbage": lambda frame: b"\x00\xff" * 40,
    "oversized-length": lambda frame: frame[:6] + b"\xff\xff" + frame[8:],
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_frames_fail_that_device_only(workspace: Workspace, emulator: Emulator, case: str) -> None:
    good, bad = emulator.add_new(2, DeviceOptions())
    corrupt = CORRUPTIONS[case]
    real_write = bad._write
    state = {"replies": 0}

    def write(data: bytes) -> None:
        state["replies"] += 1
        real_write(corrupt(data) if state["replies"] >= 3 else data)  # from the third reply on
    bad._write = write  # type: ignore[method-assign]
    bad._server._write = write  # type: ignore[attr-defined]
    results = {r.port: r for r in provision(workspace, [good, bad])}
    assert results[good.port].outcome == "provisioned"
    failed = results[bad.port]
    assert failed.outcome == "failed" and failed.reason and "\n" not in failed.reason
    assert "internal error" not in failed.reason  # a protocol failure, named as such
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        assert ledger.verify() == []


def test_firmware_below_the_minimum_is_refused(workspace: Workspace, emulator: Emulator) -> None:
    old = emulator.add_new(1, DeviceOptions(mfg_version="0.9.0"))[0]
    result = provision(workspace, [old])[0]
    assert result.outcome == "failed" and result.step == "check_firmware"
    assert "manufacturing firmware 0.9.0 is below the recipe's minimum 1.0.0" in result.reason


def test_wrong_chip_is_refused(workspace: Workspace, emulator: Emulator) -> None:
    s3 = emulator.add_new(1, DeviceOptions(model="esp32s3"))[0]
    result = provision(workspace, [s3])[0]
    assert result.outcome == "failed" and "esp32s3, but the recipe is for esp32c3" in result.reason


def test_provisioned_device_is_recognised_and_rework_revokes(workspace: Workspace, emulator: Emulator) -> None:
    device = emulator.add_new(1, DeviceOptions())[0]
    first = provision(workspace, [device])[0]
    assert first.outcome == "provisioned"
    again = provision(workspace, [device])[0]
    assert again.outcome == "already-provisioned" and again.serial == first.serial
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        assert len(ledger.certificates()) == 1
        old_serial = ledger.live_certificate(device.chip_id).cert_serial  # type: ignore[union-attr]
    reworked = provision(workspace, [device], rework=True)[0]
    assert reworked.outcome == "provisioned", reworked.reason
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        certs = ledger.certificates()
        live = ledger.live_certificate(device.chip_id)
        assert len(certs) == 2 and live is not None and live.cert_serial != old_serial
        assert [c.cert_serial for c in certs if c.revoked] == [old_serial]
        assert ledger.verify() == []
    assert stamp_of(device)[("stamp", "cert")] == ("blob", live.der)


def test_rsa_2048_device_key(workspace: Workspace, emulator: Emulator) -> None:
    device = emulator.add_new(1, DeviceOptions())[0]
    result = provision(workspace, [device], recipe_text=recipes.TEMPLATE.replace("device_key: ec-p256", "device_key: rsa-2048"))[0]
    assert result.outcome == "provisioned", result.reason
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        cert = x509.load_der_x509_certificate(ledger.live_certificate(device.chip_id).der)  # type: ignore[union-attr]
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]


def test_interrupted_rework_is_finished_only_on_the_operators_word(workspace: Workspace, emulator: Emulator) -> None:
    device = emulator.add_new(1, DeviceOptions())[0]
    assert provision(workspace, [device])[0].outcome == "provisioned"
    with Ledger(workspace.ledger_path) as ledger:  # a rework stopped right after the revocation
        ledger.revoke(ledger.live_certificate(device.chip_id).cert_serial, "rework")  # type: ignore[union-attr]
    refused = provision(workspace, [device])[0]
    assert refused.outcome == "failed" and "run with --rework" in refused.reason
    reworked = provision(workspace, [device], rework=True)[0]
    assert reworked.outcome == "provisioned", reworked.reason
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        assert ledger.live_certificate(device.chip_id) is not None and ledger.verify() == []


def test_pop_secret_never_reaches_the_ledger(workspace: Workspace, emulator: Emulator) -> None:
    device = emulator.add_new(1, DeviceOptions())[0]
    assert provision(workspace, [device])[0].outcome == "provisioned"
    pop = str(stamp_of(device)[("stamp", "pop")][1]).encode()
    assert len(pop) >= 16
    stored = b"".join(p.read_bytes() for p in workspace.root.glob("ledger.sqlite*"))
    assert stored and pop not in stored


def test_a_device_claiming_a_provisioned_chip_id_gets_nothing(workspace: Workspace, emulator: Emulator) -> None:
    """A counterfeit answering with a real chip's id and public key, but unable to sign for it."""
    real = emulator.add_new(1, DeviceOptions())[0]
    assert provision(workspace, [real])[0].outcome == "provisioned"
    fake = emulator.add_new(1, DeviceOptions())[0]
    fake.firmware.identity = real.identity  # it claims the provisioned chip's id
    real_key = serialization.load_der_private_key(stamp_of(real)[(OWN_NAMESPACE, "priv_key")][1], None)  # type: ignore[arg-type]
    forger = ec.generate_private_key(ec.SECP256R1())

    def forged(key, request):  # type: ignore[no-untyped-def]
        csr = bytearray(_csr(forger, _name(request)))
        # the real chip's public key in place of the forger's: the signature no longer verifies
        ours = forger.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        theirs = real_key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return bytes(csr).replace(ours, theirs)
    fake.firmware.keygen_attempts = 0
    fake.firmware._set_own("priv_key", forger.private_bytes(serialization.Encoding.DER,
                           serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), "blob")
    _bad_csr(fake, forged)
    result = provision(workspace, [fake])[0]
    assert result.outcome == "failed" and result.step == "resume" and "does not verify" in result.reason
    assert (OWN_NAMESPACE, "cert_loc") not in stamp_of(fake)
