"""Looking inside an emulated device, for independent checks (tests, demos, audits of the
emulator itself). ``secrets`` exists only because this is an emulator: a real chip never gives
its flash encryption key, NVS keys or device private key to anyone.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from stampline.device import chip
from stampline.device.chip import Flash
from stampline.device.efuse import Efuses
from stampline.device.flash_crypt import EncryptedFlash
from stampline.device.mfg_firmware import OWN_NAMESPACE
from stampline.errors import StamplineError
from stampline.files import read_bounded
from stampline.firmware.nvs import NvsImage, parse_nvs_keys_partition
from stampline.firmware.partitions import PARTITION_TABLE_OFFSET, TABLE_LENGTH, PartitionTable



def _open(devices_root: Path, chip_id: str) -> tuple[chip.ChipIdentity, Path]:
    directory = chip.device_dir(devices_root, chip_id)
    return chip.load_identity(directory), directory


def dump(devices_root: Path, chip_id: str) -> bytes:
    """The raw flash, as a flash reader clipped to the chip would see it: encrypted where encrypted."""
    _, directory = _open(devices_root, chip_id)
    return read_bounded(directory / "flash.bin", chip.FLASH_SIZE, "flash image")


def efuse_summary(devices_root: Path, chip_id: str) -> str:
    identity, directory = _open(devices_root, chip_id)
    return Efuses(identity.model, directory / "efuse.bin").summary()


def secrets(devices_root: Path, chip_id: str) -> dict[str, str | None]:
    """EMULATOR ONLY: the keys that never leave a real chip, read through the 'hardware path'."""
    identity, directory = _open(devices_root, chip_id)
    efuses = Efuses(identity.model, directory / "efuse.bin")
    flash = Flash(directory / "flash.bin")
    try:
        fe_key = efuses.read_flash_encryption_key_as_hardware() if efuses.flash_encryption_key_burnt() else None
        view = EncryptedFlash(flash, fe_key, identity.model) if fe_key and efuses.flash_encryption_enabled() else None
        table_bytes = (view.read_decrypted if view else flash.read)(PARTITION_TABLE_OFFSET, TABLE_LENGTH)
        table = PartitionTable.parse(table_bytes)
        nvs_keys = None
        keys_entry = table.find("nvs_keys")
        raw_keys = (view.read_decrypted if view else flash.read)(keys_entry.offset, keys_entry.size)
        if raw_keys != b"\xff" * keys_entry.size:
            nvs_keys = parse_nvs_keys_partition(raw_keys)
        stamp: dict[tuple[str, str], tuple[str, object]] = {}
        for label, keys in (("nvs", nvs_keys), ("fctry", None)):
            entry = table.find(label)
            raw = flash.read(entry.offset, entry.size)
            if raw != b"\xff" * entry.size and (label == "fctry" or keys):
                stamp.update(NvsImage.parse(raw, encryption_keys=keys).items())
        private = stamp.get((OWN_NAMESPACE, "priv_key"))
        private_pem = None
        if private is not None and isinstance(private[1], bytes):
            key = serialization.load_der_private_key(private[1], None)
            private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode()
    except StamplineError as exc:
        raise StamplineError(f"the emulated device {chip_id} cannot be read: {exc}") from None
    finally:
        flash.close()
    return {
        "warning": "emulator only: a real chip never reveals these keys",
        "chip_id": identity.hex,
        "flash_encryption_key": fe_key.hex() if fe_key else None,
        "nvs_keys": nvs_keys.hex() if nvs_keys else None,
        "device_private_key": private_pem,
    }
