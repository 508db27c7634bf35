"""Secure Boot V2 signing through the token, cross-checked with Espressif's espsecure."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from stampline.errors import StamplineError
from stampline.firmware.image import SECTOR_SIZE, build_app_image, build_bootloader_image, pad_for_secure_boot_v2, \
    parse_image
from stampline.firmware.secure_boot import (
    CHIP_SCHEMES,
    MAX_KEYS,
    SIGNATURE_BLOCK_SIZE,
    key_digest,
    parse_signature_blocks,
    public_key_pem,
    sign_image,
    verify_image,
)
from stampline.pki.token import KeyAlgorithm, Scheme, TokenSigner
from stampline.workspace import Workspace

PAYLOAD = 8 * 1024  # small images: fast, still four real segments


def espsecure(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "espsecure", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def espsecure_verifies(tmp_path: Path, signed: bytes, public_key: Any) -> bool:
    pem, image = tmp_path / f"{uuid.uuid4().hex}.pem", tmp_path / f"{uuid.uuid4().hex}.bin"
    pem.write_bytes(public_key_pem(public_key))
    image.write_bytes(signed)
    done = espsecure("verify-signature", "--version", "2", "--keyfile", pem, image)
    return done.returncode == 0


class SoftSigner:
    """A throwaway in-memory key with the signer interface (for cross-checks only)."""

    def __init__(self, private_key: Any, scheme: str | None = None) -> None:
        self.private_key = private_key
        self.public_key = private_key.public_key()
        if scheme is None:
            scheme = ("rsa-pss-sha256" if isinstance(private_key, rsa.RSAPrivateKey)
                      else "ecdsa-sha384" if private_key.curve.key_size == 384 else "ecdsa-sha256")
        self.scheme = scheme

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        algorithm = hashes.SHA384() if self.private_key.curve.key_size == 384 else hashes.SHA256()
        return self.private_key.sign(data, ec.ECDSA(algorithm))


@pytest.fixture(scope="module")
def soft_rsa() -> list[SoftSigner]:
    return [SoftSigner(rsa.generate_private_key(65537, 3072)) for _ in range(3)]


@pytest.fixture
def token_signer(fresh_workspace: Workspace) -> TokenSigner:
    """A fresh RSA-3072 key in the station token, used with the scheme Secure Boot V2 needs."""
    token = fresh_workspace.config().token("stampline-line-1")
    label = f"fw-signing-{uuid.uuid4().hex[:12]}"
    token.generate_key(label, KeyAlgorithm.RSA_3072)
    return token.signer(label, Scheme.RSA_PSS_SHA256)


@pytest.fixture(scope="module")
def app() -> bytes:
    return build_app_image("esp32c3", "demo", "1.0.0", secure_version=2, payload_size=PAYLOAD)


# ---------------------------------------------------------------------------------------------
# Signing through the token, checked by espsecure


def test_token_signed_app_is_accepted_by_espsecure(token_signer: TokenSigner, app: bytes, tmp_path: Path) -> None:
    signed = sign_image(app, token_signer, "esp32c3")

    assert espsecure_verifies(tmp_path, signed, token_signer.public_key)
    padded = pad_for_secure_boot_v2(app)
    assert len(padded) % 0x10000 == 0 and signed[:len(padded)] == padded
    assert len(signed) == len(padded) + SECTOR_SIZE
    assert signed[len(padded) + SIGNATURE_BLOCK_SIZE:] == b"\xff" * (SECTOR_SIZE - SIGNATURE_BLOCK_SIZE)
    assert parse_image(signed).signature_blocks == 1
    block = verify_image(signed, token_signer.public_key)
    assert (block.index, block.scheme, block.crc_ok, block.key_type) == (0, "rsa-pss-3072", True, "rsa-3072")
    assert block.image_digest == hashlib.sha256(padded).digest()
    assert block.public_key.public_numbers() == token_signer.public_key.public_numbers()
    assert parse_signature_blocks(signed) == [block]


def test_tampered_image_is_rejected_by_espsecure_and_verify_image(token_signer: TokenSigner, app: bytes,
                                                                  tmp_path: Path) -> None:
    signed = sign_image(app, token_signer, "esp32c3")
    key = token_signer.public_key

    flipped = bytearray(signed)
    flipped[300] ^= 0x01  # inside the first segment: the image's own SHA-256 no longer matches
    assert not espsecure_verifies(tmp_path, bytes(flipped), key)
    with pytest.raises(StamplineError):
        verify_image(bytes(flipped), key)

    # An attacker who also fixes the checksum and the appended SHA-256: only the signature stops it.
    end = parse_image(signed).image_length
    forged = bytearray(signed)
    forged[300] ^= 0x01
    forged[end - 33] ^= 0x01
    forged[end - 32:end] = hashlib.sha256(forged[:end - 32]).digest()
    parse_image(bytes(forged))
    assert not espsecure_verifies(tmp_path, bytes(forged), key)
    with pytest.raises(StamplineError, match="image digest does not match"):
        verify_image(bytes(forged), key)

    bad_signature = bytearray(signed)
    bad_signature[end + 900] ^= 0x01  # in the signature, which the CRC covers
    assert not espsecure_verifies(tmp_path, bytes(bad_signature), key)
    with pytest.raises(StamplineError, match="wrong CRC"):
        verify_image(bytes(bad_signature), key)
    bad_signature[end + 1196:end + 1200] = zlib.crc32(bad_signature[end:end + 1196]).to_bytes(4, "little")
    assert not espsecure_verifies(tmp_path, bytes(bad_signature), key)
    with pytest.raises(StamplineError, match="signature that is not valid"):
        verify_image(bytes(bad_signature), key)


def test_verify_image_refuses_another_key_and_an_unsigned_image(token_signer: TokenSigner, app: bytes,
                                                                soft_rsa: list[SoftSigner], tmp_path: Path) -> None:
    signed = sign_image(app, token_signer, "esp32c3")
    assert verify_image(signed).public_key.public_numbers() == token_signer.public_key.public_numbers()
    with pytest.raises(StamplineError, match="None of the image's 1 signature block"):
        verify_image(signed, soft_rsa[0].public_key)
    assert not espsecure_verifies(tmp_path, signed, soft_rsa[0].public_key)
    for unsigned in (app, pad_for_secure_boot_v2(app)):
        assert parse_signature_blocks(unsigned) == []
        with pytest.raises(StamplineError, match="not signed"):
            verify_image(unsigned)


def test_key_digest_matches_espsecure(token_signer: TokenSigner, app: bytes, tmp_path: Path) -> None:
    keys = [token_signer.public_key, ec.generate_private_key(ec.SECP256R1()).public_key(),
            ec.generate_private_key(ec.SECP384R1()).public_key()]
    for n, key in enumerate(keys):
        pem, out = tmp_path / f"{n}.pem", tmp_path / f"{n}.digest"
        pem.write_bytes(public_key_pem(key))
        done = espsecure("digest-sbv2-public-key", "--keyfile", pem, "--output", out)
        assert done.returncode == 0, done.stderr
        assert key_digest(key) == out.read_bytes()
        assert len(key_digest(key)) == 32
    # The digest is of the block's key section: n, e, R^-1, M' (bytes 36..812 of an RSA block).
    signed = sign_image(app, token_signer, "esp32c3")
    sector = len(pad_for_secure_boot_v2(app))
    assert key_digest(keys[0]) == hashlib.sha256(signed[sector + 36:sector + 812]).digest()


def test_bootloader_signs_and_verifies(token_signer: TokenSigner, tmp_path: Path) -> None:
    bootloader = build_bootloader_image("esp32s3")
    signed = sign_image(bootloader, token_signer, "esp32s3")
    body = bootloader + b"\xff" * (-len(bootloader) % SECTOR_SIZE)
    assert signed[:len(body)] == body and len(signed) == len(body) + SECTOR_SIZE
    assert espsecure_verifies(tmp_path, signed, token_signer.public_key)
    assert verify_image(signed, token_signer.public_key).image_digest == hashlib.sha256(body).digest()
    # The 0xFF gap after the bootloader is signed too.
    gap = bytearray(signed)
    gap[len(bootloader) + 1] = 0
    with pytest.raises(StamplineError, match="image digest does not match"):
        verify_image(bytes(gap))


def test_token_ecdsa_p256_signs_for_esp32c6(fresh_workspace: Workspace, tmp_path: Path) -> None:
    token = fresh_workspace.config().token("stampline-line-1")
    label = f"fw-ec-{uuid.uuid4().hex[:12]}"
    token.generate_key(label, KeyAlgorithm.EC_P256)
    signer = token.signer(label, Scheme.ECDSA_SHA256)
    signed = sign_image(build_app_image("esp32c6", "demo", "1.0.0", payload_size=PAYLOAD), signer, "esp32c6")
    assert espsecure_verifies(tmp_path, signed, signer.public_key)
    block = verify_image(signed, signer.public_key)
    assert (block.scheme, len(block.image_digest)) == ("ecdsa-p256", 32)


# ---------------------------------------------------------------------------------------------
# Layout: byte for byte what espsecure sign-data writes, bar the randomised signature


@pytest.mark.parametrize("kind", ["app", "bootloader"])
def test_layout_matches_espsecure_sign_data(kind: str, app: bytes, tmp_path: Path) -> None:
    private_key = rsa.generate_private_key(65537, 3072)
    keyfile = tmp_path / "throwaway.pem"  # a test-only key, written for espsecure's cross-check
    keyfile.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    image = pad_for_secure_boot_v2(app) if kind == "app" else build_bootloader_image("esp32c3")
    (tmp_path / "in.bin").write_bytes(image)
    done = espsecure("sign-data", "--version", "2", "--keyfile", keyfile, "--output", tmp_path / "out.bin",
                     tmp_path / "in.bin")
    assert done.returncode == 0, done.stderr
    theirs = (tmp_path / "out.bin").read_bytes()
    ours = sign_image(image, SoftSigner(private_key), "esp32c3")

    assert len(ours) == len(theirs)
    sector = len(ours) - SECTOR_SIZE
    signature = slice(sector + 812, sector + 1200)  # the signature and the CRC that covers it
    assert ours[:signature.start] == theirs[:signature.start]
    assert ours[signature.stop:] == theirs[signature.stop:]
    verify_image(theirs, private_key.public_key())


def test_espsecure_p384_block_parses_and_verifies(app: bytes, tmp_path: Path) -> None:
    private_key = ec.generate_private_key(ec.SECP384R1())
    keyfile = tmp_path / "throwaway.pem"
    keyfile.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (tmp_path / "in.bin").write_bytes(pad_for_secure_boot_v2(app))
    done = espsecure("sign-data", "--version", "2", "--keyfile", keyfile, "--output", tmp_path / "out.bin",
                     tmp_path / "in.bin")
    assert done.returncode == 0, done.stderr
    signed = (tmp_path / "out.bin").read_bytes()
    block = verify_image(signed, private_key.public_key())
    assert (block.scheme, block.key_type, len(block.image_digest)) == ("ecdsa-p384", "ecdsa-p384", 48)
    assert block.image_digest == hashlib.sha384(pad_for_secure_boot_v2(app)).digest()


# ---------------------------------------------------------------------------------------------
# Several keys


def test_append_up_to_max_keys(app: bytes, soft_rsa: list[SoftSigner], tmp_path: Path) -> None:
    assert MAX_KEYS["esp32c3"] == 3
    signed = sign_image(app, soft_rsa[0], "esp32c3")
    with pytest.raises(StamplineError, match="already signed; pass append to add a key"):
        sign_image(signed, soft_rsa[1], "esp32c3")
    with pytest.raises(StamplineError, match="already signed with this key"):
        sign_image(signed, soft_rsa[0], "esp32c3", append=True)
    signed = sign_image(signed, soft_rsa[1], "esp32c3", append=True)
    signed = sign_image(signed, soft_rsa[2], "esp32c3", append=True)

    assert len(signed) == len(pad_for_secure_boot_v2(app)) + SECTOR_SIZE
    assert [b.index for b in parse_signature_blocks(signed)] == [0, 1, 2]
    for index, signer in enumerate(soft_rsa):
        assert verify_image(signed, signer.public_key).index == index
    assert espsecure_verifies(tmp_path, signed, soft_rsa[2].public_key)
    with pytest.raises(StamplineError, match="already has 3 signature blocks"):
        sign_image(signed, SoftSigner(rsa.generate_private_key(65537, 3072)), "esp32c3", append=True)


def test_single_key_chip_refuses_append(soft_rsa: list[SoftSigner]) -> None:
    assert MAX_KEYS["esp32"] == 1
    signed = sign_image(build_app_image("esp32", "demo", "1.0.0", payload_size=PAYLOAD), soft_rsa[0], "esp32")
    verify_image(signed, soft_rsa[0].public_key)
    with pytest.raises(StamplineError, match="single key"):
        sign_image(signed, soft_rsa[1], "esp32", append=True)


def test_append_refuses_a_broken_existing_block(app: bytes, soft_rsa: list[SoftSigner]) -> None:
    signed = bytearray(sign_image(app, soft_rsa[0], "esp32c3"))
    signed[len(pad_for_secure_boot_v2(app)) + 900] ^= 1
    with pytest.raises(StamplineError, match="wrong CRC"):
        sign_image(bytes(signed), soft_rsa[1], "esp32c3", append=True)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_refuses_what_is_not_an_esp_image(soft_rsa: list[SoftSigner]) -> None:
    with pytest.raises(StamplineError, match="Not an ESP image"):
        sign_image(bytes(range(256)) * 64, soft_rsa[0], "esp32c3")
    with pytest.raises(StamplineError, match="Not an ESP image"):
        verify_image(b"\x00" * SECTOR_SIZE * 2)


def test_refuses_key_types_the_chip_does_not_take(app: bytes, soft_rsa: list[SoftSigner]) -> None:
    assert CHIP_SCHEMES["esp32c3"] == CHIP_SCHEMES["esp32s3"] == ("rsa-3072",)
    p256 = SoftSigner(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(StamplineError, match="esp32c3 Secure Boot V2 does not take ecdsa-p256 keys"):
        sign_image(app, p256, "esp32c3")
    with pytest.raises(StamplineError, match="rsa-2048"):
        sign_image(app, SoftSigner(rsa.generate_private_key(65537, 2048)), "esp32c3")
    p192 = SoftSigner(ec.generate_private_key(ec.SECP192R1()), "ecdsa-sha256")
    with pytest.raises(StamplineError, match="ecdsa-p192"):
        sign_image(build_app_image("esp32c6", "demo", "1.0.0", payload_size=PAYLOAD), p192, "esp32c6")


def test_refuses_a_wrong_scheme_chip_or_signature(app: bytes, soft_rsa: list[SoftSigner]) -> None:
    pkcs1 = SoftSigner(soft_rsa[0].private_key, Scheme.RSA_PKCS1_SHA256)  # TokenSigner's RSA default
    with pytest.raises(StamplineError, match="scheme rsa-pkcs1-sha256; Secure Boot V2 needs rsa-pss-sha256"):
        sign_image(app, pkcs1, "esp32c3")
    with pytest.raises(StamplineError, match="Cannot sign for chip 'esp8266'"):
        sign_image(app, soft_rsa[0], "esp8266")
    with pytest.raises(StamplineError, match="for esp32c3, not esp32s3"):
        sign_image(app, soft_rsa[0], "esp32s3")

    class Liar(SoftSigner):
        def sign(self, data: bytes) -> bytes:
            return super().sign(data + b"!")

    with pytest.raises(StamplineError, match="espsecure refused the signer's signature"):
        sign_image(app, Liar(soft_rsa[0].private_key), "esp32c3")


# ---------------------------------------------------------------------------------------------
# Strict parsing


def test_parse_refuses_blocks_that_cannot_hold_a_key(app: bytes, soft_rsa: list[SoftSigner]) -> None:
    signed = sign_image(app, soft_rsa[0], "esp32c3")
    sector = len(pad_for_secure_boot_v2(app))

    def with_block(edit: Any) -> bytes:
        out = bytearray(signed)
        edit(out)
        out[sector + 1196:sector + 1200] = zlib.crc32(out[sector:sector + 1196]).to_bytes(4, "little")
        return bytes(out)

    def version(out: bytearray) -> None:
        out[sector + 1] = 0x09

    def modulus(out: bytearray) -> None:
        out[sector + 40] ^= 0x10  # n changes, R^-1 and M' no longer belong to it

    with pytest.raises(StamplineError, match="unknown version 0x09"):
        parse_signature_blocks(with_block(version))
    with pytest.raises(StamplineError, match="do not belong to its key"):
        parse_signature_blocks(with_block(modulus))

    bad_crc = bytearray(signed)
    bad_crc[sector + 1199] ^= 0xFF
    (block,) = parse_signature_blocks(bytes(bad_crc))
    assert not block.crc_ok
    # A fourth 0xE7 block is never read: the sector holds three at most.
    third = signed[:sector] + (signed[sector:sector + SIGNATURE_BLOCK_SIZE] * 3).ljust(SECTOR_SIZE, b"\xe7")
    assert len(parse_signature_blocks(third)) == 3
