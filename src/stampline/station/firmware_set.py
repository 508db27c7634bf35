"""The firmware images a recipe names, checked once when the station starts: each file must have
the recipe's SHA-256, be an ESP image for the recipe's chip, carry a valid Secure Boot V2
signature by the recipe's secure boot key, and (apps) meet the recipe's minimum version.

Nothing is written to any device before all of this holds. Each image is compressed once here,
not once per device.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from stampline.errors import StamplineError, UsageError, shown
from stampline.files import read_bounded
from stampline.firmware import image as esp_image
from stampline.firmware import secure_boot
from stampline.firmware.partitions import PartitionTable, bootloader_offset, default_table
from stampline.pki.x509 import MAX_PUBLIC_KEY_PEM
from stampline.recipe import Recipe, parse_version

@dataclass(frozen=True)
class CheckedImage:
    part: str  # manufacturing | application | bootloader
    data: bytes
    compressed: bytes
    version: str
    secure_version: int

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()


@dataclass(frozen=True)
class FirmwareSet:
    table: PartitionTable
    bootloader_offset: int
    images: dict[str, CheckedImage]

    @property
    def secure(self) -> bool:
        """Whether the flow ends with the secure bootloader swap (and so the device locks itself)."""
        return "bootloader" in self.images

    @classmethod
    def load(cls, recipe: Recipe) -> "FirmwareSet":
        table = default_table(recipe.chip)
        refs: dict[str, tuple[Path, str]] = {part: (rule.image, rule.sha256) for part, rule in recipe.firmware.items()
                                             if rule.image is not None and rule.sha256 is not None}
        if recipe.bootloader is not None:
            refs["bootloader"] = (recipe.bootloader.path, recipe.bootloader.sha256)
        if not refs:
            return cls(table, bootloader_offset(recipe.chip), {})
        assert recipe.secure_boot_key is not None
        key = _load_key(recipe.secure_boot_key)
        images = {part: _check(recipe, part, path, digest, key) for part, (path, digest) in refs.items()}
        return cls(table, bootloader_offset(recipe.chip), images)


def _read(field: str, path: Path, limit: int, what: str) -> bytes:
    """A file the recipe names, bounded; a refusal names the recipe field."""
    try:
        return read_bounded(path, limit, what)
    except UsageError as exc:
        raise UsageError(f"{field}: {exc}") from None


def _load_key(path: Path) -> secure_boot.PublicKey:
    data = _read("firmware.secure_boot_key", path, MAX_PUBLIC_KEY_PEM, "secure boot key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise UsageError(f"firmware.secure_boot_key: {shown(str(path), 160)} is not a PEM public key.") from None
    return key  # type: ignore[return-value]


def _check(recipe: Recipe, part: str, path: Path, digest: str, key: secure_boot.PublicKey) -> CheckedImage:
    where = f"firmware.{part}.image"
    data = _read(where, path, esp_image.MAX_IMAGE_BYTES, "firmware image")
    name = shown(path.name, 80)
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise UsageError(f"{where}: {name} has SHA-256 {actual[:16]}..., not the recipe's {digest[:16]}....")
    try:
        info = esp_image.parse_image(data, expect_chip=recipe.chip)
        secure_boot.verify_image(data, key)
    except StamplineError as exc:
        raise UsageError(f"{where}: {name}: {exc}") from None
    version, secure_version = "", 0
    if part == "bootloader":
        if info.app is not None:
            raise UsageError(f"{where}: {name} is an app image, not a bootloader.")
    else:
        if info.app is None:
            raise UsageError(f"{where}: {name} is not an app image.")
        version, secure_version = info.app.version, info.app.secure_version
        if parse_version(version) is None or \
                esp_image.compare_versions(version, recipe.firmware[part].min_version_text) < 0:
            raise UsageError(f"{where}: {name} is version {shown(version)}, below the recipe's minimum "
                             f"{recipe.firmware[part].min_version_text}.")
    return CheckedImage(part, data, zlib.compress(data, 9), version, secure_version)
