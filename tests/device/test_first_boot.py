"""The emulated first boot: power cuts at every step, the ROM and bootloader signature checks,
OTA updates with anti-rollback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from stampline import recipe as recipes
from stampline.device.app_firmware import ApplicationFirmware, OtaRefused
from stampline.device.emulator import DeviceOptions, Emulator, EmulatedDevice
from stampline.device.flash_crypt import decrypt
from stampline.device.timing import TimingModel
from stampline.firmware import image, secure_boot
from stampline.firmware.partitions import default_table
from stampline.protocol import messages as m
from stampline.protocol.link import Link
from stampline.station.line import open_station, run_line
from stampline.workspace import Workspace

TABLE = default_table("esp32c3")


class SoftwareSigner:
    """Another party's RSA-3072 key (not the product's): what the device must refuse."""

    def __init__(self) -> None:
        self._key = rsa.generate_private_key(65537, 3072)
        self.public_key = self._key.public_key()
        self.scheme = "rsa-pss-sha256"

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory, ca_workspace: Workspace, release) -> Path:  # type: ignore[no-untyped-def]
    """A device stamped at the station, secure bootloader written, about to reboot into its first boot
    (a copy of its directory: flash, eFuses)."""
    root = tmp_path_factory.mktemp("ready")
    workspace = Workspace.at(root / "ws", create=True)
    shutil.copytree(ca_workspace.root, workspace.root, dirs_exist_ok=True)
    conf = workspace.softhsm_dir / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(ca_workspace.root), str(workspace.root)))
    images = {"manufacturing": release.data("manufacturing"), "application": release.data("application")}
    with Emulator(workspace.devices_dir, TimingModel(0)) as emulator:
        device = emulator.add_new(1, DeviceOptions(images=images))[0]
        with open_station(workspace, recipes.parse(recipes.TEMPLATE)) as context:  # stamp, no lock
            assert run_line(context, [device.port])[0].outcome == "provisioned"
        with Link.open(device.port) as link:
            link.request(m.Hello())
            link.flash(0x0, release.data("bootloader"))
            link.request(m.SetBoot("ota_0"))
        chip_id = device.chip_id
    return workspace.devices_dir / chip_id


def device_from(snapshot: Path, tmp_path: Path, name: str = "d") -> EmulatedDevice:
    root = tmp_path / name
    shutil.copytree(snapshot, root / snapshot.name)
    return EmulatedDevice(root, snapshot.name, TimingModel(0), power_on=False)


def assert_secured(device: EmulatedDevice, release, stamp: dict) -> None:  # type: ignore[no-untyped-def]
    app = device.handler
    assert isinstance(app, ApplicationFirmware), device.halted
    assert app.state() & m.StateFlag.SECURED
    assert app.stamp() == stamp
    fctry = TABLE.find("fctry")
    assert device.flash.read(fctry.offset, fctry.size) == b"\xff" * fctry.size
    key = device.efuses.read_flash_encryption_key_as_hardware()
    for part, offset in (("application", TABLE.find("ota_0").offset), ("bootloader", 0)):
        data = release.data(part)
        assert decrypt(key, offset, device.flash.read(offset, len(data)), "esp32c3") == data
    factory = TABLE.find("factory")
    assert device.flash.read(factory.offset, 4096) == b"\xff" * 4096  # the manufacturing firmware is gone


def test_power_cut_at_every_step_of_the_first_boot(ready: Path, tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    reference = device_from(ready, tmp_path, "reference")
    stamp_before = _plain_stamp(reference)
    passed = reference.power_cycle().passed
    assert_secured(reference, release, stamp_before)
    reference.stop()
    # The one window no firmware can close on the ESP32-C3: from the first encrypted write of the
    # bootloader until SPI_BOOT_CRYPT_CNT is burnt, the ROM can read no bootloader. It is kept to
    # the bootloader's own sectors, right before the burn.
    boot_sectors = {name.split(":")[2] for name in passed if name.startswith("flash_encryption:sector:0x0:")
                    or (":sector:" in name and int(name.split(":")[2], 16) < 0x8000)}
    window_start = next(i for i, name in enumerate(passed, 1)
                        if ":sector:" in name and name.split(":")[2] in boot_sectors and name.endswith(":erase"))
    window_end = passed.index("flash_encryption:enable") + 1
    assert window_end - window_start + 1 <= 4 * len(boot_sectors) + 2
    assert all(":sector:" not in name or name.split(":")[2] in boot_sectors
               for name in passed[window_start - 1:window_end - 1] if name != "flash_encryption:encrypted")
    # every named step, and every stage of the first, a middle and the last sector encrypted
    sectors = sorted({name.split(":")[2] for name in passed if ":sector:" in name}, key=lambda a: int(a, 16))
    chosen = {sectors[0], sectors[len(sectors) // 2], sectors[-1]}
    cuts = [i for i, name in enumerate(passed, 1)
            if (":sector:" not in name or name.split(":")[2] in chosen) and not window_start <= i <= window_end]
    assert len(cuts) >= 20 and any("keygen" in passed[i - 1] for i in cuts)
    for cut in cuts:
        device = device_from(ready, tmp_path, f"cut{cut}")
        try:
            device.power_cycle(cut_at=cut)
            assert device.handler is None and device.halted.startswith("powered off at"), passed[cut - 1]
            device.power_cycle()
            assert_secured(device, release, stamp_before)
            assert device.power_cycle().passed[-1] == "start:application"  # and it keeps booting
        finally:
            device.stop()
            shutil.rmtree(device.directory.parent)
    # inside the window the chip does not boot (on silicon as here): the station keeps it powered
    device = device_from(ready, tmp_path, "window")
    try:
        device.power_cycle(cut_at=window_start + 1)
        device.power_cycle()
        assert device.handler is None and "no valid bootloader" in device.halted
    finally:
        device.stop()


def _plain_stamp(device: EmulatedDevice) -> dict:  # type: ignore[type-arg]
    from stampline.firmware.nvs import NvsImage
    fctry = TABLE.find("fctry")
    return NvsImage.parse(device.flash.read(fctry.offset, fctry.size)).items()


@pytest.fixture
def secured(ready: Path, tmp_path: Path) -> EmulatedDevice:
    device = device_from(ready, tmp_path)
    device.power_cycle()
    assert isinstance(device.handler, ApplicationFirmware), device.halted
    yield device  # type: ignore[misc]
    device.stop()


def test_rom_refuses_a_tampered_bootloader(secured: EmulatedDevice) -> None:
    raw = bytearray(secured.flash.read(0x100, 16))
    raw[3] ^= 0x01
    secured.flash.write(0x100, bytes(raw))
    secured.power_cycle()
    assert secured.handler is None and "bootloader" in secured.halted


def test_bootloader_refuses_an_app_signed_by_another_key(secured: EmulatedDevice, release) -> None:  # type: ignore[no-untyped-def]
    foreign = secure_boot.sign_image(image.build_app_image("esp32c3", "product-app", "9.9.9"), SoftwareSigner(),
                                     "esp32c3")
    with pytest.raises(OtaRefused, match="not signed by a key whose digest is in eFuse"):
        secured.handler.ota_update(foreign)  # type: ignore[union-attr]
    # written behind the application's back (as an attacker with a flash programmer would), it does not boot
    app = secured.handler
    assert isinstance(app, ApplicationFirmware)
    ota_0 = TABLE.find("ota_0")
    secured.flash.erase(ota_0.offset, len(foreign) + 4096)
    app.view.write(ota_0.offset, foreign + b"\xff" * (-len(foreign) % 16))
    secured.power_cycle()
    assert secured.handler is None and "not signed by a key whose digest is in eFuse" in secured.halted


def test_ota_signed_update_boots_and_downgrade_or_unsigned_is_refused(secured: EmulatedDevice, release) -> None:  # type: ignore[no-untyped-def]
    from stampline import signing

    ci = Workspace.at(release.files["secure_boot_key"].parent.parent)
    newer = signing.sign(ci, image.build_app_image("esp32c3", "product-app", "2.0.0", secure_version=2), "esp32c3")
    app = secured.handler
    assert isinstance(app, ApplicationFirmware)
    assert app.ota_update(newer).label == "ota_1"
    secured.power_cycle()
    app = secured.handler
    assert isinstance(app, ApplicationFirmware), secured.halted
    assert app.running.label == "ota_1" and secured.efuses.secure_version() == 2
    older = signing.sign(ci, image.build_app_image("esp32c3", "product-app", "1.5.0", secure_version=1), "esp32c3")
    with pytest.raises(OtaRefused, match="a downgrade"):
        app.ota_update(older)
    with pytest.raises(OtaRefused, match="not signed"):
        app.ota_update(image.build_app_image("esp32c3", "product-app", "3.0.0", secure_version=3))
    flipped = bytearray(newer)
    flipped[len(flipped) // 3] ^= 0x40
    with pytest.raises(OtaRefused):
        app.ota_update(bytes(flipped))
