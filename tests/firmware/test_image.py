"""ESP-IDF images: built images are checked against esptool/espsecure, the independent tools."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from esptool.bin_image import LoadFirmwareImage

from stampline.errors import StamplineError
from stampline.firmware.image import (
    CHIP_IDS,
    SECTOR_SIZE,
    AppDescriptor,
    build_app_image,
    build_bootloader_image,
    compare_versions,
    pad_for_secure_boot_v2,
    parse_image,
    read_app_descriptor,
)

SMALL = 8 * 1024  # payload for most tests: fast, still four real segments


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; the project depends on esptool")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _image_info(chip: str, path: Path) -> str:
    result = _run(_tool("esptool"), "--chip", chip, "image-info", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _esptool_resave(chip: str, data: bytes, secure_pad: str | None = None) -> bytes:
    """What esptool's own writer produces for the segments it reads from `data`."""
    image = LoadFirmwareImage(chip, data)
    for segment in image.segments:
        segment.name = ""  # esptool 5.6's save() expects ELF section names on RAM segments
    image.secure_pad = secure_pad
    return image.save(None)


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    folder = tmp_path_factory.mktemp("sbv2-key")
    private, public = folder / "key.pem", folder / "pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


# --- cross-checks with esptool -------------------------------------------------------------


@pytest.mark.parametrize("chip", ["esp32c3", "esp32s3"])
def test_esptool_image_info_accepts_app(chip: str, tmp_path: Path) -> None:
    path = tmp_path / "app.bin"
    path.write_bytes(build_app_image(chip, "sensor-fw", "2.4.1-rc2", secure_version=7, payload_size=SMALL))
    out = _image_info(chip, path)
    assert re.search(r"Checksum: 0x[0-9a-f]{2} \(valid\)", out), out
    assert re.search(r"Validation hash: [0-9a-f]{64} \(valid\)", out), out
    assert "Project name: sensor-fw" in out
    assert "App version: 2.4.1-rc2" in out
    assert "Secure version: 7" in out
    assert f"Chip ID: {CHIP_IDS[chip]}" in out


def test_esptool_image_info_reports_corruption(tmp_path: Path) -> None:
    """The cross-check can fail: esptool notices a flipped byte in a segment."""
    data = bytearray(build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL))
    data[2000] ^= 0x01
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    out = _image_info("esp32c3", path)
    assert "Checksum" in out and "invalid" in out


def test_esptool_image_info_accepts_bootloader(tmp_path: Path) -> None:
    path = tmp_path / "bootloader.bin"
    path.write_bytes(build_bootloader_image("esp32s3", "v5.3.1"))
    out = _image_info("esp32s3", path)
    assert re.search(r"Checksum: 0x[0-9a-f]{2} \(valid\)", out), out
    assert re.search(r"Validation hash: [0-9a-f]{64} \(valid\)", out), out
    assert "Bootloader Information" in out and "ESP-IDF: v5.3.1" in out
    assert "Application Information" not in out


@pytest.mark.parametrize(("chip", "payload"), [("esp32", SMALL), ("esp32s2", SMALL), ("esp32c3", SMALL),
                                               ("esp32s3", SMALL), ("esp32c6", SMALL),
                                               ("esp32", 4 * (0x10000 - 0x120))])  # DROM ends on a page
def test_images_are_what_esptool_itself_writes(chip: str, payload: int) -> None:
    """esptool re-saving the segments it reads gives the same bytes, padded or not."""
    app = build_app_image(chip, "p", "1.0.0", payload_size=payload)
    assert _esptool_resave(chip, app) == app
    assert _esptool_resave(chip, app, secure_pad="2") == pad_for_secure_boot_v2(app)
    bootloader = build_bootloader_image(chip)
    assert _esptool_resave(chip, bootloader) == bootloader


# --- parse_image ------------------------------------------------------------------------------


def test_parse_round_trips_build_parameters() -> None:
    data = build_app_image("esp32s3", "gateway", "v3.1.0", secure_version=5, payload_size=32 * 1024,
                           seed=b"lot-42", idf_ver="v5.3.2")
    info = parse_image(data, expect_chip="esp32s3")
    assert info.chip == "esp32s3"
    assert info.hash_appended and info.image_length == len(data)
    assert info.signature_blocks == 0
    assert info.app is not None and info.bootloader is None
    assert (info.app.magic, info.app.project_name, info.app.version) == (0xABCD5432, "gateway", "v3.1.0")
    assert (info.app.secure_version, info.app.idf_ver) == (5, "v5.3.2")
    assert len(info.app.app_elf_sha256) == 32
    assert 32 * 1024 <= sum(length for _, length in info.segments) <= 32 * 1024 + 512
    assert 0x3C000000 <= info.segments[0][0] < 0x3E000000  # DROM first
    assert any(start <= info.entry < start + length for start, length in info.segments)
    assert info.sha256 == hashlib.sha256(data).digest()


def test_build_is_deterministic_and_seeded() -> None:
    one = build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL, seed=b"a")
    assert one == build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL, seed=b"a")
    assert one != build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL, seed=b"b")
    assert one != build_app_image("esp32c3", "p", "1.0.1", payload_size=SMALL, seed=b"a")


def test_parse_bootloader() -> None:
    data = build_bootloader_image("esp32c3", "v5.3", seed=b"x", project_version=4)
    info = parse_image(data)
    assert info.chip == "esp32c3" and info.app is None
    assert info.bootloader is not None and (info.bootloader.version, info.bootloader.idf_ver) == (4, "v5.3")


def test_flipped_segment_byte_fails_checksum() -> None:
    data = bytearray(build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL))
    data[3000] ^= 0x40
    with pytest.raises(StamplineError, match="checksum"):
        parse_image(bytes(data))


@pytest.mark.parametrize("where", ["entry point", "digest"])
def test_flipped_header_or_digest_fails_hash(where: str) -> None:
    data = bytearray(build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL))
    data[4 if where == "entry point" else len(data) - 1] ^= 0x01
    with pytest.raises(StamplineError, match="SHA-256"):
        parse_image(bytes(data))


@pytest.mark.parametrize("keep", [10, 100, 5000, -1, -33])
def test_truncated_image_fails(keep: int) -> None:
    data = build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL)
    with pytest.raises(StamplineError, match="truncated"):
        parse_image(data[:keep])


def test_random_bytes_are_not_an_image() -> None:
    data = random.Random(1).randbytes(4096).replace(b"\xe9", b"\x00")
    with pytest.raises(StamplineError, match="Not an ESP image"):
        parse_image(data)
    with pytest.raises(StamplineError, match="Not an ESP image"):
        parse_image(b"")


def test_wrong_chip_and_bad_header_fields() -> None:
    data = build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL)
    with pytest.raises(StamplineError, match="esp32c3, not esp32s3"):
        parse_image(data, expect_chip="esp32s3")
    with pytest.raises(StamplineError, match="segments"):
        parse_image(data[:1] + b"\x00" + data[2:])
    with pytest.raises(StamplineError, match="unknown chip id"):
        parse_image(data[:12] + b"\x63\x00" + data[14:])


def test_app_segment_without_descriptor_is_refused() -> None:
    """A resealed image (valid checksum and hash, by esptool) whose DROM lost its descriptor magic."""
    loaded = LoadFirmwareImage("esp32c3", build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL))
    loaded.segments[0].data = bytes(4) + loaded.segments[0].data[4:]
    for segment in loaded.segments:
        segment.name = ""
    data = loaded.save(None)
    with pytest.raises(StamplineError, match="app descriptor"):
        parse_image(data)
    assert read_app_descriptor(data) is None


def test_flash_segment_must_match_its_page_offset() -> None:
    """The ESP-IDF bootloader refuses a flash-mapped segment whose address and offset disagree."""
    data = bytearray(build_app_image("esp32c3", "p", "1.0.0", payload_size=SMALL))
    data[24:28] = (0x3C000040).to_bytes(4, "little")  # DROM load address, not checksummed
    with pytest.raises(StamplineError, match="MMU page"):
        parse_image(bytes(data[:-32]) + hashlib.sha256(data[:-32]).digest())


# --- read_app_descriptor -----------------------------------------------------------------------


def test_read_app_descriptor() -> None:
    assert read_app_descriptor(b"\xff" * 0x10000) is None
    assert read_app_descriptor(b"") is None
    assert read_app_descriptor(random.Random(2).randbytes(0x4000)) is None
    assert read_app_descriptor(build_bootloader_image("esp32c3")) is None
    image = build_app_image("esp32c3", "factory-app", "0.9.0", secure_version=1, payload_size=SMALL)
    desc = read_app_descriptor(image + b"\xff" * (0x20000 - len(image)))  # a whole partition
    assert isinstance(desc, AppDescriptor)
    assert (desc.project_name, desc.version, desc.secure_version) == ("factory-app", "0.9.0", 1)


def test_read_app_descriptor_never_raises_on_damage() -> None:
    """Random truncation and byte changes, biased to the headers: always None or a descriptor."""
    image = build_app_image("esp32c3", "p", "1.0.0", payload_size=1024)
    rng = random.Random(3)
    outcomes = []
    for _ in range(400):
        data = bytearray(image[: rng.randrange(len(image) + 1)] if rng.random() < 0.3 else image)
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(min(len(data), 48) if rng.random() < 0.7 else len(data))] = rng.randrange(256)
        outcome = read_app_descriptor(bytes(data))
        assert outcome is None or isinstance(outcome, AppDescriptor)
        outcomes.append(outcome)
    assert outcomes.count(None) > 300


# --- Secure Boot V2 ---------------------------------------------------------------------------


def test_secure_pad_sign_and_verify_with_espsecure(tmp_path: Path, rsa_key: tuple[Path, Path]) -> None:
    private, public = rsa_key
    image = build_app_image("esp32c3", "p", "1.2.3", payload_size=SMALL)
    padded = pad_for_secure_boot_v2(image)
    assert len(padded) % 0x10000 == 0  # signature sector will start on an MMU page
    assert pad_for_secure_boot_v2(padded) == padded
    info = parse_image(padded)
    assert info.image_length == len(padded) and info.segments[-1][0] == 0 and info.app is not None

    unsigned, signed = tmp_path / "app.bin", tmp_path / "app-signed.bin"
    unsigned.write_bytes(padded)
    result = _run(_tool("espsecure"), "sign-data", "--version", "2", "--keyfile", str(private),
                  "--output", str(signed), str(unsigned))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Padding" not in result.stdout  # espsecure had nothing left to pad
    data = signed.read_bytes()
    assert data[: len(padded)] == padded and len(data) == len(padded) + SECTOR_SIZE

    for key in (public, private):
        result = _run(_tool("espsecure"), "verify-signature", "--version", "2", "--keyfile", str(key), str(signed))
        assert result.returncode == 0, result.stdout + result.stderr
    signed_info = parse_image(data)
    assert signed_info.signature_blocks == 1
    assert signed_info.image_length == len(padded) and signed_info.app == info.app
    with pytest.raises(StamplineError, match="already signed"):
        pad_for_secure_boot_v2(data)

    tampered = bytearray(data)
    tampered[40] ^= 0x01  # inside the app descriptor's version
    signed.write_bytes(tampered)
    result = _run(_tool("espsecure"), "verify-signature", "--version", "2", "--keyfile", str(public), str(signed))
    assert result.returncode != 0


def test_bootloader_is_padded_to_a_sector_only(tmp_path: Path, rsa_key: tuple[Path, Path]) -> None:
    """ESP-IDF does not secure-pad bootloaders; their signature sector follows at the next 4 KB."""
    image = build_bootloader_image("esp32c3")
    padded = pad_for_secure_boot_v2(image)
    assert padded.startswith(image) and set(padded[len(image):]) == {0xFF}
    assert len(padded) % SECTOR_SIZE == 0 and len(padded) - len(image) < SECTOR_SIZE
    assert parse_image(padded).signature_blocks == 0

    unsigned, signed = tmp_path / "bootloader.bin", tmp_path / "bootloader-signed.bin"
    unsigned.write_bytes(image)  # espsecure pads it to the sector itself
    result = _run(_tool("espsecure"), "sign-data", "--version", "2", "--keyfile", str(rsa_key[0]),
                  "--output", str(signed), str(unsigned))
    assert result.returncode == 0, result.stdout + result.stderr
    data = signed.read_bytes()
    assert data[: len(padded)] == padded
    info = parse_image(data)
    assert (info.signature_blocks, info.image_length, info.bootloader) == (1, len(image), parse_image(image).bootloader)


def test_signature_blocks_counted_by_magic() -> None:
    padded = pad_for_secure_boot_v2(build_app_image("esp32s3", "p", "1.0.0", payload_size=SMALL))
    block = b"\xe7" + bytes(1215)
    assert parse_image(padded + block * 2 + b"\xff" * (SECTOR_SIZE - 2 * 1216)).signature_blocks == 2
    assert parse_image(padded + b"\xff" * SECTOR_SIZE).signature_blocks == 0


# --- validation and versions ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"chip": "esp8266"},
    {"version": "x" * 32},
    {"project": "a\0b"},
    {"secure_version": -1},
    {"payload_size": 64 * 1024 * 1024},
])
def test_bad_build_input(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"chip": "esp32c3", "project": "p", "version": "1.0.0", **kwargs}
    with pytest.raises(StamplineError):
        build_app_image(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("1.2.3", "1.2.3", 0),
    ("v1.2.3", "1.2.3", 0),
    ("1.2", "1.2.0", 0),
    ("1.2.3", "1.2.4", -1),
    ("1.10.0", "1.9.9", 1),
    ("2.0.0", "10.0.0", -1),
    ("1.0.0-rc1", "1.0.0", -1),
    ("1.0.0-alpha", "1.0.0-alpha.1", -1),
    ("1.0.0-alpha.1", "1.0.0-alpha.beta", -1),
    ("1.0.0-rc.2", "1.0.0-rc.11", -1),
    ("1.0.0+build5", "1.0.0", 0),
])
def test_compare_versions(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


@pytest.mark.parametrize("bad", ["", "abc", "1..2", "1.2.3-", "v", "1.2.3-rc..1"])
def test_compare_versions_rejects_garbage(bad: str) -> None:
    with pytest.raises(StamplineError):
        compare_versions(bad, "1.0.0")
