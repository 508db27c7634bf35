"""The whole line with Secure Boot V2 and flash encryption: flashing, the secure bootloader swap,
the first boot, and independent checks of the locked device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import run_cli, secure_recipe
from stampline import recipe as recipes
from stampline.device.emulator import DeviceOptions, Emulator, EmulatedDevice
from stampline.device.timing import TimingModel
from stampline.firmware import image
from stampline.firmware.partitions import default_table
from stampline.protocol import messages as m
from stampline.protocol.link import Link
from stampline.station.flow import DeviceResult
from stampline.station.ledger import Ledger
from stampline.station.line import open_station, run_line
from stampline.workspace import Workspace


@pytest.fixture
def workspace(fresh_workspace: Workspace, release) -> Workspace:  # type: ignore[no-untyped-def]
    fresh_workspace.recipe_path.write_text(secure_recipe(release))
    return fresh_workspace


@pytest.fixture
def emulator(workspace: Workspace) -> Iterator[Emulator]:
    with Emulator(workspace.devices_dir, TimingModel(0)) as emu:
        yield emu


def signed_options(release, **overrides) -> DeviceOptions:  # type: ignore[no-untyped-def]
    images = {"manufacturing": release.data("manufacturing"), "application": release.data("application")}
    return DeviceOptions(images={**images, **overrides})


def provision(workspace: Workspace, devices: list[EmulatedDevice], recipe_text: str | None = None) -> list[DeviceResult]:
    recipe = recipes.parse(recipe_text or workspace.recipe_path.read_text())
    with open_station(workspace, recipe) as context:
        return run_line(context, [d.port for d in devices])


def test_line_locks_every_device(workspace: Workspace, emulator: Emulator, release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    devices = emulator.add_new(2, signed_options(release))
    results = provision(workspace, devices)
    assert [r.outcome for r in results] == ["secured", "secured"], [r.reason for r in results]
    assert {"write_bootloader", "set_boot", "reboot", "first_boot"} <= set(results[0].steps)
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        assert {row["state"] for row in ledger.export()} == {"secured"}
        assert ledger.verify() == []
    for device in devices:
        efuses = device.efuses
        assert efuses.secure_boot_enabled() and efuses.flash_encryption_enabled()
        assert efuses.flash_encryption_key_read_protected() and efuses.download_mode_disabled()
        assert efuses.jtag_disabled()
        # the station's commands are refused now; HELLO tells what it is
        with Link.open(device.port) as link:
            hello = link.request(m.Hello())
            assert hello.state & m.StateFlag.SECURED and hello.mfg_fw_version == ""
            with pytest.raises(m.DeviceError) as refused:
                link.request(m.Keygen(m.KeyType.EC_P256))
            assert refused.value.code == m.ErrorCode.LOCKED


def test_secured_device_survives_independent_checks(workspace: Workspace, emulator: Emulator, release,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    device = emulator.add_new(1, signed_options(release))[0]
    result = provision(workspace, [device])[0]
    assert result.outcome == "secured", result.reason
    ws = str(workspace.root)
    # device secrets (emulator only) and a raw dump, as a chip's flash would read
    secrets = json.loads(run_cli("device", "secrets", "--workdir", ws, "--serial", result.serial, "--json").stdout)
    dump = tmp_path / "flash.bin"
    done = run_cli("device", "dump", "--workdir", ws, "--serial", result.serial, "--out", str(dump))
    assert done.returncode == 0, done.stderr
    raw = dump.read_bytes()
    table = default_table("esp32c3")
    # espsecure decrypts the application the station verified, with the key born on the chip
    key = tmp_path / "fe.key"
    key.write_bytes(bytes.fromhex(secrets["flash_encryption_key"]))
    app = release.data("application")
    ota_0 = table.find("ota_0").offset
    region = tmp_path / "ota0.enc"
    region.write_bytes(raw[ota_0:ota_0 + len(app)])
    out = tmp_path / "ota0.bin"
    subprocess.run([sys.executable, "-m", "espsecure", "decrypt-flash-data", "--aes-xts", "--keyfile", str(key),
                    "--address", hex(ota_0), "--output", str(out), str(region)], check=True, capture_output=True)
    assert out.read_bytes() == app
    assert raw[ota_0:ota_0 + 64] != app[:64]  # it is encrypted in flash
    # the NVS decrypts with Espressif's generator and holds the stamp
    nvs = table.find("nvs")
    enc = tmp_path / "nvs-enc.bin"
    enc.write_bytes(raw[nvs.offset:nvs.offset + nvs.size])
    keyfile = tmp_path / "nvs_keys.bin"
    from stampline.firmware.nvs import NvsImage, make_nvs_keys_partition
    keyfile.write_bytes(make_nvs_keys_partition(bytes.fromhex(secrets["nvs_keys"])))
    plain = tmp_path / "nvs-plain.bin"
    subprocess.run([sys.executable, "-m", "esp_idf_nvs_partition_gen", "decrypt", enc.name, keyfile.name,
                    plain.name, "--outdir", str(tmp_path)], cwd=tmp_path, check=True, capture_output=True)
    stamp = NvsImage.parse(plain.read_bytes()).items()
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        cert_der = ledger.live_certificate(device.chip_id).der  # type: ignore[union-attr]
    assert stamp[("stamp", "cert")] == ("blob", cert_der)
    assert stamp[("stamp", "serial")] == ("string", result.serial)
    private_der = serialization.load_pem_private_key(secrets["device_private_key"].encode(), None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert stamp[("device", "priv_key")] == ("blob", private_der)
    # nothing of the stamp is left in plaintext anywhere in the flash
    for secret in (cert_der, private_der, result.serial.encode(), private_der[-32:]):
        assert secret not in raw
    # espefuse's own summary: secure boot on with our key's digest, the flash key read-protected
    summary = run_cli("device", "efuse", "--workdir", ws, "--serial", result.serial).stdout
    digest = json.loads(run_cli("firmware", "info", str(release.files["application"]), "--json").stdout)[
        "signature_blocks"][0]["key_digest"]
    blocks = _key_blocks(summary)
    assert blocks["SECURE_BOOT_DIGEST0"].replace(" ", "").startswith("=" + digest)
    assert blocks["XTS_AES_128_KEY"].split("=")[1].split()[:32] == ["??"] * 32  # read-protected
    assert blocks["XTS_AES_128_KEY"].rstrip().endswith("-/-")
    fields = {line.split()[0]: line for line in summary.splitlines() if line[:1].isalpha()}
    assert "= True" in fields["SECURE_BOOT_EN"]
    assert "= Enable" in fields["SPI_BOOT_CRYPT_CNT"]
    assert "= True" in fields["DIS_PAD_JTAG"] and "= True" in fields["DIS_DOWNLOAD_MANUAL_ENCRYPT"]


def _key_blocks(summary: str) -> dict[str, str]:
    """{purpose: value line} of espefuse's key block section."""
    lines = summary.splitlines()
    found = {}
    for i, line in enumerate(lines):
        if line.startswith("BLOCK_KEY"):
            purpose = lines[i + 1].split("Purpose:")[1].strip()
            found[purpose] = next(v.strip() for v in lines[i + 2:i + 5] if v.strip().startswith("="))
    return found


def test_old_firmware_is_flashed_before_the_stamp(workspace: Workspace, emulator: Emulator, release) -> None:  # type: ignore[no-untyped-def]
    old_app = image.build_app_image("esp32c3", "product-app", "0.9.0")  # unsigned, too old
    old_mfg = image.build_app_image("esp32c3", image.MFG_PROJECT, "0.8.0")
    device = emulator.add_new(1, DeviceOptions(images={"application": old_app, "manufacturing": old_mfg}))[0]
    text = secure_recipe(release).replace('min_version: "1.0.0"', 'min_version: "1.0.0"')
    result = provision(workspace, [device], text)[0]
    assert result.outcome == "secured", result.reason
    assert {"flash_manufacturing", "flash_application"} <= set(result.steps)
    with Link.open(device.port) as link:
        assert link.request(m.Hello()).app_fw_version == "1.0.0"


def test_unsigned_application_is_replaced_before_the_lock(workspace: Workspace, emulator: Emulator, release) -> None:  # type: ignore[no-untyped-def]
    unsigned = image.build_app_image("esp32c3", "product-app", "1.0.0")  # right version, but not signed
    device = emulator.add_new(1, signed_options(release, application=unsigned))[0]
    result = provision(workspace, [device])[0]
    assert result.outcome == "secured", result.reason
    assert "flash_application" in result.steps


def test_images_are_checked_before_anything_is_written(workspace: Workspace, release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tampered = tmp_path / "app.bin"
    data = bytearray(release.data("application"))
    data[0x2000] ^= 1
    tampered.write_bytes(bytes(data))
    text = secure_recipe(release).replace(str(release.files["application"]), str(tampered))
    import hashlib
    text = text.replace(hashlib.sha256(release.data("application")).hexdigest(), hashlib.sha256(bytes(data)).hexdigest())
    path = workspace.root / "tampered.yaml"
    path.write_text(text)
    done = run_cli("station", "run", "--workdir", str(workspace.root), "--port", "/dev/null", "--recipe", str(path))
    assert done.returncode == 2
    assert "firmware.application.image" in done.stderr and "Traceback" not in done.stderr
    assert not workspace.ledger_path.exists()


def test_esp32s3_locks_with_xts_aes_256(fresh_workspace: Workspace, release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The second chip: the same line, a 64-byte XTS-AES-256 key born on the chip."""
    from stampline import release as releases

    ci = Workspace.at(release.files["secure_boot_key"].parent.parent)
    s3 = releases.build(ci, "esp32s3", tmp_path / "s3-release")
    fresh_workspace.recipe_path.write_text(secure_recipe(s3).replace("chip: esp32c3", "chip: esp32s3"))
    with Emulator(fresh_workspace.devices_dir, TimingModel(0)) as emulator:
        device = emulator.add_new(1, DeviceOptions(model="esp32s3", images={
            "manufacturing": s3.data("manufacturing"), "application": s3.data("application")}))[0]
        result = provision(fresh_workspace, [device])[0]
        assert result.outcome == "secured", result.reason
        key = device.efuses.read_flash_encryption_key_as_hardware()
        assert len(key) == 64 and device.efuses.flash_encryption_key_read_protected()
        raw = device.flash.read(0x0, 0x8000)
    keyfile = tmp_path / "fe.key"
    keyfile.write_bytes(key)
    enc, out = tmp_path / "boot.enc", tmp_path / "boot.bin"
    bootloader = s3.data("bootloader")
    enc.write_bytes(raw[:len(bootloader)])
    subprocess.run([sys.executable, "-m", "espsecure", "decrypt-flash-data", "--aes-xts", "--keyfile", str(keyfile),
                    "--address", "0x0", "--output", str(out), str(enc)], check=True, capture_output=True)
    assert out.read_bytes() == bootloader


def test_secured_device_is_recognised_and_never_reworked(workspace: Workspace, emulator: Emulator, release) -> None:  # type: ignore[no-untyped-def]
    device = emulator.add_new(1, signed_options(release))[0]
    assert provision(workspace, [device])[0].outcome == "secured"
    recipe = recipes.parse(workspace.recipe_path.read_text())
    with open_station(workspace, recipe, rework=True) as context:
        refused = run_line(context, [device.port])[0]
    assert refused.outcome == "failed" and "secured" in refused.reason
    again = provision(workspace, [device])[0]
    assert again.outcome == "already-provisioned", again.reason
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        assert ledger.device(device.chip_id).state == "secured"  # type: ignore[union-attr]
        assert len(ledger.certificates()) == 1 and ledger.verify() == []


def test_a_first_boot_longer_than_the_wait_is_picked_up_at_the_next_run(workspace: Workspace, release) -> None:  # type: ignore[no-untyped-def]
    import time as clock

    with Emulator(workspace.devices_dir, TimingModel(0, boot_scale=0.1)) as emulator:  # ~1.5 s of first boot
        device = emulator.add_new(1, signed_options(release))[0]
        recipe = recipes.parse(workspace.recipe_path.read_text())
        with open_station(workspace, recipe) as context:
            context.first_boot_timeout = 0.2
            gave_up = run_line(context, [device.port])[0]
        assert gave_up.outcome == "failed" and gave_up.step == "first_boot"
        with Ledger.open_readonly(workspace.ledger_path) as ledger:
            assert ledger.device(device.chip_id).state == "locking"  # type: ignore[union-attr]
        deadline = clock.monotonic() + 30
        while not (device.efuses.download_mode_disabled() and device.handler is not None) and clock.monotonic() < deadline:
            clock.sleep(0.1)
        again = provision(workspace, [device])[0]
        assert again.outcome == "secured", again.reason
        with Ledger.open_readonly(workspace.ledger_path) as ledger:
            assert ledger.device(device.chip_id).state == "secured"  # type: ignore[union-attr]
            assert ledger.verify() == []
