"""The emulated eFuses, checked through espefuse's own command line on the same virtual eFuse file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stampline.device.efuse import Efuses
from stampline.errors import StamplineError

ESPEFUSE = str(Path(sys.executable).with_name("espefuse"))
KEY_SIZE = {"esp32c3": 32, "esp32s3": 64}


def espefuse(chip: str, path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ESPEFUSE, "--chip", chip, "--virt", "--path-efuse-file", str(path), *args],
                          capture_output=True, text=True, check=check, timeout=60)


def espefuse_json(chip: str, path: Path) -> dict:
    out = espefuse(chip, path, "summary", "--format", "json").stdout
    return json.loads(out[out.index("{"):])


def first_boot(efuses: Efuses, digest: bytes, key: bytes) -> None:
    efuses.burn_secure_boot_digest(digest)
    efuses.enable_secure_boot()
    efuses.burn_flash_encryption_key(key)
    efuses.set_flash_crypt_count()
    efuses.burn_secure_version(2)
    efuses.close_manufacturing()


def test_a_new_chip_is_blank(tmp_path: Path) -> None:
    efuses = Efuses("esp32c3", tmp_path / "efuse.bin")
    assert "SECURE_BOOT_EN (BLOCK0)" in efuses.summary()
    assert (tmp_path / "efuse.bin").stat().st_size == 512
    assert efuses.summary_json()["SECURE_BOOT_EN"]["value"] is False
    assert espefuse_json("esp32c3", tmp_path / "efuse.bin")["SECURE_BOOT_EN"]["value"] is False
    assert not efuses.secure_boot_enabled() and efuses.secure_boot_digests() == []
    assert not efuses.flash_encryption_enabled() and not efuses.flash_encryption_key_burnt()
    assert not efuses.flash_encryption_key_read_protected()
    assert efuses.secure_version() == 0
    assert efuses.download_mode() == "enabled" and not efuses.download_mode_disabled()
    assert not efuses.jtag_disabled()
    assert [block.purpose for block in efuses.key_blocks()] == ["USER"] * 6
    with pytest.raises(StamplineError):
        efuses.read_flash_encryption_key_as_hardware()


@pytest.mark.parametrize("chip", ["esp32c3", "esp32s3"])
def test_first_boot_as_espefuse_sees_it(chip: str, tmp_path: Path) -> None:
    path = tmp_path / "efuse.bin"
    efuses = Efuses(chip, path)
    digest, key = os.urandom(32), os.urandom(KEY_SIZE[chip])
    first_boot(efuses, digest, key)

    fuses = espefuse_json(chip, path)
    assert fuses["KEY_PURPOSE_0"]["value"] == "SECURE_BOOT_DIGEST0"
    assert fuses["BLOCK_KEY0"]["value"] == digest.hex(" ")
    assert fuses["BLOCK_KEY0"]["readable"] and not fuses["BLOCK_KEY0"]["writeable"]
    assert fuses["SECURE_BOOT_EN"]["value"] is True
    assert fuses["SECURE_BOOT_AGGRESSIVE_REVOKE"]["value"] is False
    assert [fuses[f"SECURE_BOOT_KEY_REVOKE{slot}"]["value"] for slot in range(3)] == [False, True, True]
    key_blocks = ["BLOCK_KEY1"] if chip == "esp32c3" else ["BLOCK_KEY1", "BLOCK_KEY2"]
    purposes = ["XTS_AES_128_KEY"] if chip == "esp32c3" else ["XTS_AES_256_KEY_1", "XTS_AES_256_KEY_2"]
    for index, (block, purpose) in enumerate(zip(key_blocks, purposes), start=1):
        assert fuses[f"KEY_PURPOSE_{index}"]["value"] == purpose
        assert not fuses[block]["readable"] and not fuses[block]["writeable"]
        assert fuses[block]["value"] == " ".join(["??"] * 32)
    assert fuses["SPI_BOOT_CRYPT_CNT"]["value"] == "Enable" and not fuses["SPI_BOOT_CRYPT_CNT"]["writeable"]
    assert fuses["SECURE_VERSION"]["value"] == 0b11
    for name in ("DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_DOWNLOAD_ICACHE", "DIS_PAD_JTAG", "DIS_USB_JTAG",
                 "DIS_DIRECT_BOOT", "ENABLE_SECURITY_DOWNLOAD"):
        assert fuses[name]["value"] is True, name
    assert fuses["DIS_DOWNLOAD_MODE"]["value"] is False
    assert fuses["SOFT_DIS_JTAG"]["value"] == 0b111
    assert not fuses["DIS_PAD_JTAG"]["writeable"] and not fuses["RD_DIS"]["writeable"]
    assert fuses["SECURE_VERSION"]["writeable"]  # anti-rollback can still move on
    if chip == "esp32s3":
        assert fuses["DIS_DOWNLOAD_DCACHE"]["value"] is True

    text = espefuse(chip, path, "summary").stdout
    assert text.endswith(efuses.summary())  # our summary is espefuse's, without the banner
    assert "Purpose: SECURE_BOOT_DIGEST0" in text and "?? ?? ?? ??" in text

    assert efuses.secure_boot_enabled() and efuses.secure_boot_digests() == [digest]
    assert efuses.flash_encryption_enabled() and efuses.flash_encryption_key_read_protected()
    assert efuses.secure_version() == 2
    assert efuses.download_mode() == "secure" and efuses.download_mode_disabled() and efuses.jtag_disabled()


@pytest.mark.parametrize("chip", ["esp32c3", "esp32s3"])
def test_the_hardware_sees_the_key_that_espefuse_cannot_read(chip: str, tmp_path: Path) -> None:
    path = tmp_path / "efuse.bin"
    efuses = Efuses(chip, path)
    key = os.urandom(KEY_SIZE[chip])
    efuses.burn_flash_encryption_key(key)
    assert efuses.read_flash_encryption_key_as_hardware() == key
    blocks = [block for block in efuses.key_blocks() if block.purpose.startswith("XTS_AES")]
    assert blocks and all(block.value == bytes(32) and not block.readable for block in blocks)
    raw = path.read_bytes()
    assert key[:16] not in raw and key[::-1][:16] not in raw  # espefuse's file holds zeros


def test_hardware_key_order_is_espefuse_burn_key_order(tmp_path: Path) -> None:
    """A key burnt readable by espefuse itself comes back from the hardware path as its key file."""
    path, key = tmp_path / "efuse.bin", os.urandom(32)
    (tmp_path / "key.bin").write_bytes(key)
    espefuse("esp32c3", path, "--do-not-confirm", "burn-key", "BLOCK_KEY2", str(tmp_path / "key.bin"),
             "XTS_AES_128_KEY", "--no-read-protect")
    assert Efuses("esp32c3", path).read_flash_encryption_key_as_hardware() == key


def test_burns_repeat_as_no_ops(tmp_path: Path) -> None:
    path = tmp_path / "efuse.bin"
    efuses = Efuses("esp32c3", path)
    digest, key = os.urandom(32), os.urandom(32)
    first_boot(efuses, digest, key)
    before = path.read_bytes()
    efuses.burn_secure_boot_digest(digest)
    efuses.enable_secure_boot()
    efuses.set_flash_crypt_count()
    efuses.burn_secure_version(2)
    efuses.close_manufacturing()
    assert path.read_bytes() == before


def test_write_once(tmp_path: Path) -> None:
    path = tmp_path / "efuse.bin"
    efuses = Efuses("esp32c3", path)
    efuses.burn_secure_boot_digest(bytes(range(32)))
    efuses.burn_flash_encryption_key(key := os.urandom(32))
    before = path.read_bytes()
    with pytest.raises(StamplineError, match="different digest"):
        efuses.burn_secure_boot_digest(bytes(32 * [7]))
    with pytest.raises(StamplineError, match="already burnt"):
        efuses.burn_flash_encryption_key(os.urandom(32))
    assert path.read_bytes() == before
    assert efuses.read_flash_encryption_key_as_hardware() == key
    # The refusal is not only ours: espefuse itself will not rewrite a burnt, write-protected block.
    (tmp_path / "other.bin").write_bytes(os.urandom(32))
    refused = espefuse("esp32c3", path, "--do-not-confirm", "burn-key", "BLOCK_KEY1", str(tmp_path / "other.bin"),
                       "XTS_AES_128_KEY", check=False)
    assert refused.returncode != 0
    assert path.read_bytes() == before


def test_order_and_range_are_enforced(tmp_path: Path) -> None:
    efuses = Efuses("esp32c3", tmp_path / "efuse.bin")
    for refused in (efuses.enable_secure_boot, efuses.set_flash_crypt_count, efuses.close_manufacturing):
        with pytest.raises(StamplineError):
            refused()
    with pytest.raises(StamplineError):
        efuses.burn_secure_boot_digest(bytes(31))
    with pytest.raises(StamplineError):
        efuses.burn_secure_boot_digest(bytes(32), slot=3)
    with pytest.raises(StamplineError):
        efuses.burn_flash_encryption_key(os.urandom(64))  # no AES-256 on the C3
    efuses.burn_secure_version(3)
    with pytest.raises(StamplineError, match="below"):
        efuses.burn_secure_version(2)
    with pytest.raises(StamplineError):
        efuses.burn_secure_version(17)
    assert efuses.secure_version() == 3
    with pytest.raises(StamplineError):
        Efuses("esp32", tmp_path / "other.bin")


def test_block_key5_never_holds_the_flash_key(tmp_path: Path) -> None:
    efuses = Efuses("esp32c3", tmp_path / "efuse.bin")
    for slot in range(3):
        efuses.burn_secure_boot_digest(os.urandom(32), slot)
    (tmp_path / "data.bin").write_bytes(os.urandom(32))
    for block in ("BLOCK_KEY3", "BLOCK_KEY4"):
        espefuse("esp32c3", tmp_path / "efuse.bin", "--do-not-confirm", "burn-key", block,
                 str(tmp_path / "data.bin"), "USER")
    with pytest.raises(StamplineError, match="free eFuse key blocks"):
        efuses.burn_flash_encryption_key(os.urandom(32))
    assert not efuses.flash_encryption_key_burnt()


def test_disabled_download_mode_and_changes_made_by_espefuse(tmp_path: Path) -> None:
    path = tmp_path / "efuse.bin"
    efuses = Efuses("esp32s3", path)
    efuses.burn_flash_encryption_key(os.urandom(32))  # the S3 also takes an AES-128 key
    efuses.set_flash_crypt_count()
    assert efuses.summary_json()["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    espefuse("esp32s3", path, "--do-not-confirm", "burn-efuse", "DIS_USB_JTAG", "1")  # behind our back
    assert efuses.summary_json()["DIS_USB_JTAG"]["value"] is True
    efuses.close_manufacturing(download_mode="disabled")
    assert efuses.download_mode() == "disabled"
    assert espefuse_json("esp32s3", path)["DIS_DOWNLOAD_MODE"]["value"] is True


def test_a_file_that_is_not_an_efuse_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "efuse.bin").write_bytes(b"\0" * 100)
    with pytest.raises(StamplineError, match="not a 512-byte"):
        Efuses("esp32c3", tmp_path / "efuse.bin").secure_boot_enabled()
    with pytest.raises(StamplineError, match="does not exist"):
        Efuses("esp32c3", tmp_path / "missing" / "efuse.bin").secure_boot_enabled()


def test_espefuse_refusals_become_one_sentence_errors(tmp_path: Path) -> None:
    path = tmp_path / "efuse.bin"
    # SECURE_VERSION shares its write-protect bit with DIS_DOWNLOAD_MODE.
    espefuse("esp32c3", path, "--do-not-confirm", "write-protect-efuse", "DIS_DOWNLOAD_MODE")
    efuses = Efuses("esp32c3", path)
    with pytest.raises(StamplineError, match="SECURE_VERSION is write-protected"):
        efuses.burn_secure_version(1)
    assert efuses.secure_version() == 0
    efuses.burn_secure_boot_digest(digest := os.urandom(32))  # the failed burn left nothing pending
    assert efuses.secure_boot_digests() == [digest]
