"""Flash encryption checked byte for byte against espsecure, the reference for what the chip writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stampline.device import flash_crypt
from stampline.device.chip import Flash
from stampline.errors import StamplineError

ESPSECURE = str(Path(sys.executable).with_name("espsecure"))
KEYS = [("esp32c3", 32), ("esp32s3", 64), ("esp32s3", 32)]
# The bootloader at 0x0 (not a whole number of 128-byte blocks), the partition table at 0x8000,
# an app at 0x20000, and spans that start and end inside a 128-byte flash encryption block.
SPANS = [(0x0, 0x5010), (0x8000, 0xC00), (0x20000, 0x2000), (0x20010, 0x50), (0x3FFF70, 0x20)]


def espsecure(command: str, key: bytes, address: int, data: bytes, tmp_path: Path) -> bytes:
    (tmp_path / "key.bin").write_bytes(key)
    (tmp_path / "in.bin").write_bytes(data)
    subprocess.run([ESPSECURE, command, "--aes-xts", "--keyfile", str(tmp_path / "key.bin"), "--address",
                    hex(address), "--output", str(tmp_path / "out.bin"), str(tmp_path / "in.bin")],
                   check=True, capture_output=True, timeout=60)
    return (tmp_path / "out.bin").read_bytes()


@pytest.mark.parametrize(("chip", "key_size"), KEYS)
def test_encrypt_matches_espsecure(chip: str, key_size: int, tmp_path: Path) -> None:
    key = os.urandom(key_size)
    for address, size in SPANS:
        plaintext = os.urandom(size)
        ciphertext = flash_crypt.encrypt(key, address, plaintext, chip)
        assert ciphertext == espsecure("encrypt-flash-data", key, address, plaintext, tmp_path), hex(address)
        assert flash_crypt.decrypt(key, address, ciphertext, chip) == plaintext


@pytest.mark.parametrize(("chip", "key_size"), [("esp32c3", 32), ("esp32s3", 64)])
def test_espsecure_decrypts_what_we_encrypt(chip: str, key_size: int, tmp_path: Path) -> None:
    key, plaintext = os.urandom(key_size), os.urandom(0x1000)
    ciphertext = flash_crypt.encrypt(key, 0x8000, plaintext, chip)
    assert espsecure("decrypt-flash-data", key, 0x8000, ciphertext, tmp_path) == plaintext


def test_address_and_key_change_the_ciphertext() -> None:
    key, plaintext = os.urandom(32), bytes(0x100)
    at_zero = flash_crypt.encrypt(key, 0, plaintext, "esp32c3")
    assert at_zero[:0x80] != at_zero[0x80:]  # each 128-byte block has its own tweak
    assert flash_crypt.encrypt(key, 0x10000, plaintext, "esp32c3") != at_zero
    assert flash_crypt.encrypt(os.urandom(32), 0, plaintext, "esp32c3") != at_zero


def test_any_aligned_split_gives_the_same_bytes() -> None:
    key, plaintext = os.urandom(64), os.urandom(0x400)
    whole = flash_crypt.encrypt(key, 0x1000, plaintext, "esp32s3")
    cuts = [0, 0x10, 0x90, 0x100, 0x2F0, 0x400]
    pieces = [flash_crypt.encrypt(key, 0x1000 + a, plaintext[a:b], "esp32s3") for a, b in zip(cuts, cuts[1:])]
    assert b"".join(pieces) == whole


@pytest.mark.parametrize(("key", "address", "data", "chip"), [
    (bytes(32), 0x8, bytes(16), "esp32c3"),       # address not 16-byte aligned
    (bytes(32), 0x10, bytes(17), "esp32c3"),      # length not a multiple of 16
    (bytes(32), -16, bytes(16), "esp32c3"),
    (bytes(64), 0x0, bytes(16), "esp32c3"),       # the C3 has no AES-256 flash encryption
    (bytes(16), 0x0, bytes(16), "esp32s3"),
    (bytes(32), 0x0, bytes(16), "esp32"),
    (bytes(32), 0xFFFFFFF0, bytes(32), "esp32c3"),
])
def test_bad_input_is_refused(key: bytes, address: int, data: bytes, chip: str) -> None:
    with pytest.raises(StamplineError):
        flash_crypt.encrypt(key, address, data, chip)


@pytest.fixture
def flash(tmp_path: Path) -> Iterator[Flash]:
    flash = Flash(tmp_path / "flash.bin")
    yield flash
    flash.close()


def test_encrypt_in_place_then_read_through_the_cache(flash: Flash, tmp_path: Path) -> None:
    key = os.urandom(32)
    bootloader, table = os.urandom(0x5010), os.urandom(0xC00)
    flash.write(0x0, bootloader)
    flash.write(0x8000, table)
    view = flash_crypt.EncryptedFlash(flash, key, "esp32c3")
    view.encrypt_in_place(0x0, len(bootloader))
    view.encrypt_in_place(0x8000, 0x1000)
    assert flash.read(0x0, len(bootloader)) == espsecure("encrypt-flash-data", key, 0x0, bootloader, tmp_path)
    assert flash.read(0x8000, 0xC00) == flash_crypt.encrypt(key, 0x8000, table, "esp32c3")
    assert view.read_decrypted(0x0, len(bootloader)) == bootloader
    assert view.read_decrypted(0x8003, 0x101) == table[3:0x104]  # the cache reads any address
    assert view.read_decrypted(0x6000, 0x10) != b"\xff" * 16  # whole sectors are encrypted, erased tail included


def test_encrypted_write_and_transparent_regions(flash: Flash) -> None:
    key = os.urandom(64)
    view = flash_crypt.EncryptedFlash(flash, key, "esp32s3", regions=[(0x9000, 0x1000), (0x20000, 0x10000)])
    secret = os.urandom(0x40)
    view.write(0x9000, secret)
    assert flash.read(0x9000, 0x40) == flash_crypt.encrypt(key, 0x9000, secret, "esp32s3")
    assert view.read(0x9000, 0x40) == secret
    view.write(0x10000, b"plain text")  # outside every encrypted region
    assert flash.read(0x10000, 10) == view.read(0x10000, 10) == b"plain text"
    with pytest.raises(StamplineError):
        view.read(0x9FF0, 0x20)  # straddles the end of an encrypted region
    with pytest.raises(StamplineError):
        view.write_encrypted(0x9008, bytes(16))
    with pytest.raises(StamplineError):
        view.encrypt_in_place(0x9100, 0x100)
    with pytest.raises(StamplineError):
        flash_crypt.EncryptedFlash(flash, key, "esp32s3", regions=[(0x9000, 0x1000), (0x9800, 0x1000)])
