"""The emulated chip: identity, a file-backed SPI flash, and the factory-fresh flash contents.

A device lives in ``<workdir>/devices/<chip id>/``: ``chip.json`` (model, chip id, revision)
and ``flash.bin`` (the whole SPI flash, byte for byte what a chip's flash would read).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from stampline import private
from stampline.errors import StamplineError
from stampline.files import KiB, read_bounded
from stampline.firmware import image, partitions

FLASH_SIZE = 4 * 1024 * 1024
MAX_IDENTITY_BYTES = 4 * KiB  # chip.json: model, chip id, revision (under 100 bytes)
ESPRESSIF_OUI = bytes.fromhex("7cdfa1")
SUPPORTED = ("esp32c3", "esp32s3")


class Flash:
    """SPI NOR flash in a file, mapped into memory; writes reach the file at once (msync on flush)."""

    def __init__(self, path: Path, size: int = FLASH_SIZE) -> None:
        self.path = path
        self.size = size
        if not path.exists():
            with open(path, "wb", opener=private.opener) as f:
                f.write(b"\xff" * size)
        self._file = open(path, "r+b")
        if os.fstat(self._file.fileno()).st_size != size:
            raise StamplineError(f"the flash image {path} is not {size} bytes.")
        self._map = mmap.mmap(self._file.fileno(), size)

    def _check(self, address: int, length: int) -> None:
        if address < 0 or length < 0 or address + length > self.size:
            raise StamplineError(f"flash access 0x{address:x}+{length} is outside the {self.size}-byte flash.")

    def read(self, address: int, length: int) -> bytes:
        self._check(address, length)
        return self._map[address:address + length]

    def write(self, address: int, data: bytes) -> None:
        self._check(address, len(data))
        self._map[address:address + len(data)] = data

    def erase(self, address: int, length: int) -> None:
        self._check(address, length)
        self._map[address:address + length] = b"\xff" * length

    def flush(self) -> None:
        self._map.flush()

    def close(self) -> None:
        self._map.flush()
        self._map.close()
        self._file.close()


@dataclass(frozen=True)
class ChipIdentity:
    model: str
    chip_id: bytes  # base MAC, 6 bytes
    revision: int = 4

    @property
    def hex(self) -> str:
        return self.chip_id.hex()


def device_dir(devices_root: Path, chip_id: str) -> Path:
    return devices_root / chip_id


def new_identity(devices_root: Path, model: str) -> ChipIdentity:
    if model not in SUPPORTED:
        raise StamplineError(f"the emulator models {', '.join(SUPPORTED)}, not '{model}'.")
    while True:
        chip_id = ESPRESSIF_OUI + secrets.token_bytes(3)
        if not device_dir(devices_root, chip_id.hex()).exists():
            return ChipIdentity(model, chip_id)


def save_identity(directory: Path, identity: ChipIdentity) -> None:
    private.make_dir(directory)
    private.write_file(directory / "chip.json", json.dumps(
        {"model": identity.model, "chip_id": identity.hex, "revision": identity.revision}))


def load_identity(directory: Path) -> ChipIdentity:
    path = directory / "chip.json"
    try:
        raw = json.loads(read_bounded(path, MAX_IDENTITY_BYTES, "chip identity")) if path.exists() else {}
        return ChipIdentity(raw["model"], bytes.fromhex(raw["chip_id"]), int(raw["revision"]))
    except (ValueError, KeyError, TypeError):
        raise StamplineError(f"{directory} does not hold an emulated device.") from None


def factory_image(identity: ChipIdentity, mfg_version: str, app_version: str,
                  images: dict[str, bytes] | None = None) -> dict[int, bytes]:
    """What a chip supplier pre-flashes: bootloader, partition table, manufacturing and application
    firmware; ``images`` (bootloader, manufacturing, application) replaces the built-in ones."""
    table = partitions.default_table(identity.model, FLASH_SIZE)
    given = images or {}
    return {
        partitions.bootloader_offset(identity.model): given.get("bootloader") or image.build_bootloader_image(identity.model),
        partitions.PARTITION_TABLE_OFFSET: table.to_bytes(),
        table.find("factory").offset: given.get("manufacturing") or image.build_app_image(
            identity.model, image.MFG_PROJECT, mfg_version),
        table.find("ota_0").offset: given.get("application") or image.build_app_image(
            identity.model, "product-app", app_version),
    }
