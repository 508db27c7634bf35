"""A firmware release as the product's CI makes it for the demo and tests: the reference
bootloader, manufacturing firmware and application, built as ESP-IDF images and signed through
the signing workspace's token, with the public key and the recipe lines that name them.

(A real product builds its images with ESP-IDF; the signing and the recipe are the same.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stampline import private, signing
from stampline.firmware import image
from stampline.firmware.image import MFG_PROJECT
from stampline.files import read_bounded
from stampline.workspace import Workspace


@dataclass(frozen=True)
class Release:
    directory: Path
    files: dict[str, Path]  # bootloader, manufacturing, application, secure_boot_key

    def data(self, part: str) -> bytes:
        return read_bounded(self.files[part], image.MAX_IMAGE_BYTES, "firmware image")

    def recipe_firmware(self, mfg_min: str = "1.0.0", app_min: str = "1.0.0") -> str:
        """The recipe's ``firmware:`` section naming these files (paths absolute)."""
        def sha(part: str) -> str:
            return hashlib.sha256(self.data(part)).hexdigest()
        return (
            "firmware:\n"
            f"  secure_boot_key: {self.files['secure_boot_key']}\n"
            "  manufacturing:\n"
            f'    min_version: "{mfg_min}"\n'
            f"    image: {self.files['manufacturing']}\n"
            f'    sha256: "{sha("manufacturing")}"\n'
            "  application:\n"
            f'    min_version: "{app_min}"\n'
            f"    image: {self.files['application']}\n"
            f'    sha256: "{sha("application")}"\n'
            "  bootloader:\n"
            f"    image: {self.files['bootloader']}\n"
            f'    sha256: "{sha("bootloader")}"\n'
        )


def release_files(out: Path, mfg_version: str = "1.0.0", app_version: str = "1.0.0") -> dict[str, Path]:
    """Where a release's files lie (``build`` writes them there)."""
    return {"bootloader": out / f"bootloader-{mfg_version}.signed.bin",
            "manufacturing": out / f"manufacturing-{mfg_version}.signed.bin",
            "application": out / f"application-{app_version}.signed.bin",
            "secure_boot_key": out / "secure-boot.pub.pem"}


def existing(out: Path) -> Release | None:
    """The default-version release already built in ``out``, if complete."""
    files = release_files(out)
    return Release(out, files) if all(path.exists() for path in files.values()) else None


def build(signing_workspace: Workspace, chip: str, out: Path, mfg_version: str = "1.0.0",
          app_version: str = "1.0.0", secure_version: int = 0, app_size: int = 64 * 1024) -> Release:
    """Build and sign a release into ``out`` (the signing key must exist: ``signing.keygen``)."""
    private.make_dir(out)
    parts = {
        "bootloader": image.build_bootloader_image(chip),
        "manufacturing": image.build_app_image(chip, MFG_PROJECT, mfg_version),
        "application": image.build_app_image(chip, "product-app", app_version, secure_version=secure_version,
                                             payload_size=app_size),
    }
    files = release_files(out, mfg_version, app_version)
    for part, data in parts.items():
        private.write_file(files[part], signing.sign(signing_workspace, data, chip))
    private.write_file(files["secure_boot_key"], signing.key_info(signing_workspace).pem)
    return Release(out, files)
