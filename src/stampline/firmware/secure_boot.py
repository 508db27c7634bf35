"""Secure Boot V2 signature blocks: sign images with a token key, parse and verify them as the ROM does.

A signed image is the image padded to a 4096-byte boundary, then one signature sector: up to
three 1216-byte blocks and 0xFF padding. Each block holds the SHA-256 (SHA-384 for P-384) of
everything before the sector, the public key and the signature, then a CRC32 of the first 1196
bytes and 16 zero bytes. The chip trusts a key when the SHA-256 of the block's key section
(`key_digest`) is burned in an eFuse key block.

RSA block (version 0x02): magic | version | 2 reserved | digest[32] | n[384] LE | e u32 |
R^-1 = 2^6144 mod n [384] LE | M' = -n^-1 mod 2^32 u32 | RSA-PSS signature[384] LE.
ECDSA block (version 0x03): magic | version | sha (0 = SHA-256, 1 = SHA-384) | reserved |
digest[32|48] | curve id (1 P-192, 2 P-256, 3 P-384) | x, y LE | r, s LE | zero fill.

Signing hands the token the padded image and lets espsecure assemble the block from the public
key and the signature (`generate_signature_block_using_pre_calculated_signature`, the path of
``espsecure sign-data --pub-key ... --signature ...``), so the bytes are espsecure's own.
This module imports nothing from `stampline.pki`: the device emulator models the ROM with it.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from stampline.errors import StamplineError
from stampline.firmware.image import SECTOR_SIZE, pad_for_secure_boot_v2, parse_image

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

SIGNATURE_BLOCK_SIZE = 1216
SIGNATURE_BLOCK_MAGIC = 0xE7
MAX_BLOCKS = 3  # a signature sector never holds more, whatever the chip

# Key types stampline signs with, per chip: what the chip's Secure Boot V2 accepts (ESP-IDF
# soc_caps SOC_SECURE_BOOT_V2_RSA/_ECC and the secure-boot-v2 guide), minus ECDSA P-192 (accepted
# by ECDSA chips, 96-bit security, "not recommended" in ESP-IDF) and minus ECDSA on ESP32-C5 and
# ESP32-P4, where ESP-IDF documents the ECDSA scheme as failing for some inputs on current silicon.
CHIP_SCHEMES: dict[str, tuple[str, ...]] = {
    "esp32": ("rsa-3072",),  # ECO3 and later; earlier revisions have only Secure Boot V1
    "esp32s2": ("rsa-3072",),
    "esp32c3": ("rsa-3072",),  # ECO3 and later
    "esp32s3": ("rsa-3072",),
    "esp32c2": ("ecdsa-p256",),
    "esp32c6": ("rsa-3072", "ecdsa-p256"),
    "esp32h2": ("rsa-3072", "ecdsa-p256"),
    "esp32c5": ("rsa-3072",),
    "esp32p4": ("rsa-3072",),
    "esp32c61": ("ecdsa-p256",),
}
# Secure boot key digests in eFuse (SOC_EFUSE_SECURE_BOOT_KEY_DIGESTS): signature blocks a chip uses.
MAX_KEYS: dict[str, int] = {chip: 1 if chip in ("esp32", "esp32c2") else 3 for chip in CHIP_SCHEMES}

_VERSION_RSA = 0x02
_VERSION_ECDSA = 0x03
_CRC_OFFSET = 1196
_RSA_BLOCK = struct.Struct("<BBxx32s384sI384sI384sI16x")
_RSA_KEY_SECTION = struct.Struct("<384sI384sI")
# curve id -> (curve, coordinate bytes, digest bytes), and back by curve name.
_CURVES: dict[int, tuple[ec.EllipticCurve, int, int]] = {
    1: (ec.SECP192R1(), 24, 32), 2: (ec.SECP256R1(), 32, 32), 3: (ec.SECP384R1(), 48, 48)}
_CURVE_IDS = {curve.name: curve_id for curve_id, (curve, _, _) in _CURVES.items()}
# The signer scheme each key type needs (values of stampline.pki.token.Scheme).
_SIGNER_SCHEMES = {"rsa-3072": "rsa-pss-sha256", "ecdsa-p192": "ecdsa-sha256",
                   "ecdsa-p256": "ecdsa-sha256", "ecdsa-p384": "ecdsa-sha384"}


class Signer(Protocol):
    """What signs: a `TokenSigner`, or anything with the same three members."""

    @property
    def public_key(self) -> PublicKey: ...

    @property
    def scheme(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class SignatureBlock:
    """One parsed signature block; ``signature`` is big-endian RSA or DER-encoded ECDSA."""

    image_digest: bytes
    public_key: PublicKey
    signature: bytes
    crc_ok: bool
    scheme: str  # "rsa-pss-3072" | "ecdsa-p192" | "ecdsa-p256" | "ecdsa-p384"
    index: int = 0  # position in the signature sector

    @property
    def key_type(self) -> str:
        """The key type, as `CHIP_SCHEMES` names it."""
        return key_type(self.public_key)

    @property
    def key_digest(self) -> bytes:
        return key_digest(self.public_key)


def key_type(public_key: PublicKey) -> str:
    """"rsa-3072", "ecdsa-p256", ...: the key type name `CHIP_SCHEMES` uses."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ecdsa-p{public_key.curve.key_size}"
    raise StamplineError(f"A Secure Boot V2 key must be an RSA or EC public key, not {type(public_key).__name__}.")


def signer_scheme(public_key: PublicKey) -> str:
    """The signer scheme Secure Boot V2 needs for this key (pass it to `Token.signer`)."""
    kind = key_type(public_key)
    if kind not in _SIGNER_SCHEMES:
        raise StamplineError(f"Secure Boot V2 cannot use a {kind} key; it takes RSA-3072 or ECDSA P-192/P-256/P-384.")
    return _SIGNER_SCHEMES[kind]


def key_digest(public_key: PublicKey) -> bytes:
    """The SHA-256 of the block's key section: what ``espefuse burn-key-digest`` burns into eFuse."""
    return hashlib.sha256(_key_section(public_key)).digest()


def public_key_pem(public_key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, as espsecure's ``--keyfile`` takes it."""
    key_type(public_key)
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_section(public_key: PublicKey) -> bytes:
    """The key bytes exactly as a signature block stores them (and eFuse digests them)."""
    kind = key_type(public_key)
    if kind not in _SIGNER_SCHEMES:
        raise StamplineError(f"Secure Boot V2 cannot use a {kind} key; it takes RSA-3072 or ECDSA P-192/P-256/P-384.")
    if isinstance(public_key, rsa.RSAPublicKey):
        n, e = public_key.public_numbers().n, public_key.public_numbers().e
        if e >= 1 << 32:
            raise StamplineError("Secure Boot V2 stores the RSA exponent in 32 bits; this key's is larger.")
        rinv = (1 << 6144) % n  # R^2 mod n for the RSA peripheral's Montgomery form, R = 2^3072
        m_prime = -pow(n, -1, 1 << 32) % (1 << 32)
        return _RSA_KEY_SECTION.pack(_le(n, 384), e, _le(rinv, 384), m_prime)
    numbers = public_key.public_numbers()
    curve_id = _CURVE_IDS[public_key.curve.name]
    size = _CURVES[curve_id][1]
    return bytes([curve_id]) + _le(numbers.x, size) + _le(numbers.y, size)


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


# ---------------------------------------------------------------------------------------------
# Parsing and verifying


def _signature_sector(data: bytes) -> int:
    """Offset of the signature sector: the image end rounded up to a 4096-byte boundary."""
    end = parse_image(data).image_length
    return end + (-end % SECTOR_SIZE)


def parse_signature_blocks(data: bytes) -> list[SignatureBlock]:
    """The blocks in the signature sector after the image, up to the first without the 0xE7 magic.

    A block with a wrong CRC is returned with ``crc_ok`` False; one whose fields cannot be a key
    (unknown version or curve, a point off the curve, inconsistent RSA parameters) is refused.
    """
    data = bytes(data)
    return _parse_blocks(data, _signature_sector(data))


def _parse_blocks(data: bytes, sector: int) -> list[SignatureBlock]:
    blocks = []
    for index in range(MAX_BLOCKS):
        start = sector + index * SIGNATURE_BLOCK_SIZE
        raw = data[start:start + SIGNATURE_BLOCK_SIZE]
        if len(raw) < SIGNATURE_BLOCK_SIZE or raw[0] != SIGNATURE_BLOCK_MAGIC:
            break
        blocks.append(_parse_block(raw, index))
    return blocks


def _parse_block(raw: bytes, index: int) -> SignatureBlock:
    crc_ok = zlib.crc32(raw[:_CRC_OFFSET]) == int.from_bytes(raw[_CRC_OFFSET:_CRC_OFFSET + 4], "little")
    damaged = "" if crc_ok else " (its CRC is wrong too)"
    version, sha = raw[1], raw[2]
    try:
        if version == _VERSION_RSA:
            _, _, digest, n, e, _, _, sig, _ = _RSA_BLOCK.unpack(raw)
            public_key: PublicKey = rsa.RSAPublicNumbers(e, int.from_bytes(n, "little")).public_key()
            if public_key.key_size != 3072:
                raise ValueError
            signature, scheme, key_at = sig[::-1], "rsa-pss-3072", 36
        elif version == _VERSION_ECDSA and sha in (0, 1):
            digest_size = 48 if sha else 32
            curve_id = raw[4 + digest_size]
            curve, size, curve_digest = _CURVES[curve_id]
            if curve_digest != digest_size:
                raise ValueError
            digest = raw[4:4 + digest_size]
            key_at = 4 + digest_size
            point = raw[key_at + 1:key_at + 1 + 2 * size]
            rs = raw[key_at + 1 + 2 * size:key_at + 1 + 4 * size]
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(point[:size], "little"), int.from_bytes(point[size:], "little"), curve).public_key()
            signature = encode_dss_signature(int.from_bytes(rs[:size], "little"), int.from_bytes(rs[size:], "little"))
            scheme = f"ecdsa-p{curve.key_size}"
        else:
            raise StamplineError(f"Signature block {index} has an unknown version 0x{version:02x}/{sha}{damaged}.")
    except (ValueError, KeyError):
        raise StamplineError(f"Signature block {index} does not hold a valid Secure Boot V2 key{damaged}.") from None
    section = _key_section(public_key)
    if raw[key_at:key_at + len(section)] != section:
        raise StamplineError(f"Signature block {index} holds RSA parameters that do not belong to its key{damaged}.")
    return SignatureBlock(image_digest=bytes(digest), public_key=public_key, signature=signature,
                          crc_ok=crc_ok, scheme=scheme, index=index)


def verify_image(data: bytes, public_key: PublicKey | None = None) -> SignatureBlock:
    """Check a signed image as the ROM and bootloader do; return the block that verified.

    With ``public_key``, a block for that key (same eFuse digest) must verify. Without one,
    every block must verify: we do not know which key the device trusts.
    """
    data = bytes(data)
    sector = _signature_sector(data)
    blocks = _parse_blocks(data, sector)
    if not blocks:
        raise StamplineError("The image is not signed: no Secure Boot V2 signature block follows it.")
    body = data[:sector]
    if public_key is None:
        for block in blocks:
            _check_block(block, body)
        return blocks[0]
    wanted = key_digest(public_key)
    mine = [block for block in blocks if block.key_digest == wanted]
    if not mine:
        raise StamplineError(f"None of the image's {len(blocks)} signature block(s) is for the given key.")
    failure: StamplineError | None = None
    for block in mine:
        try:
            _check_block(block, body)
            return block
        except StamplineError as exc:
            failure = failure or exc
    assert failure is not None
    raise failure


def _check_block(block: SignatureBlock, body: bytes) -> None:
    where = f"Signature block {block.index}"
    if not block.crc_ok:
        raise StamplineError(f"{where} has a wrong CRC; the ROM ignores it.")
    hashed = hashlib.sha384(body) if len(block.image_digest) == 48 else hashlib.sha256(body)
    if block.image_digest != hashed.digest():
        raise StamplineError(f"{where} was made for other image contents (the image digest does not match).")
    try:
        if isinstance(block.public_key, rsa.RSAPublicKey):
            block.public_key.verify(block.signature, block.image_digest,
                                    padding.PSS(padding.MGF1(hashes.SHA256()), 32), Prehashed(hashes.SHA256()))
        else:
            algorithm = hashes.SHA384() if len(block.image_digest) == 48 else hashes.SHA256()
            block.public_key.verify(block.signature, block.image_digest, ec.ECDSA(Prehashed(algorithm)))
    except InvalidSignature:
        raise StamplineError(f"{where} holds a signature that is not valid for the image.") from None


# ---------------------------------------------------------------------------------------------
# Signing


def sign_image(image: bytes, signer: Signer, chip: str, append: bool = False) -> bytes:
    """The image padded and signed for Secure Boot V2 on ``chip``, with the signer's block added.

    An unsigned app gets esptool's ``--secure-pad-v2`` padding, a bootloader 0xFF up to 4096
    bytes. With ``append``, a signed image keeps its (valid) blocks and gets one more.
    """
    image = bytes(image)
    if chip not in CHIP_SCHEMES:
        raise StamplineError(f"Cannot sign for chip {chip!r}; Secure Boot V2 chips: {', '.join(CHIP_SCHEMES)}.")
    public_key = signer.public_key
    kind = key_type(public_key)
    if kind not in CHIP_SCHEMES[chip]:
        raise StamplineError(f"{chip} Secure Boot V2 does not take {kind} keys; it takes "
                             f"{' or '.join(CHIP_SCHEMES[chip])}.")
    wanted = signer_scheme(public_key)
    if str(getattr(signer.scheme, "value", signer.scheme)) != wanted:
        raise StamplineError(f"The signer uses scheme {getattr(signer.scheme, 'value', signer.scheme)}; "
                             f"Secure Boot V2 needs {wanted} for a {kind} key.")

    info = parse_image(image, expect_chip=chip)
    if info.signature_blocks:
        if not append:
            raise StamplineError("The image is already signed; pass append to add a key.")
        body, kept = _signed_parts(image, chip, key_digest(public_key))
    else:
        body, kept = pad_for_secure_boot_v2(image), b""
    if len(body) % SECTOR_SIZE:
        raise StamplineError("The padded image does not end on a 4096-byte sector boundary.")

    block = _espsecure_block(body, public_key, signer.sign(body))
    signed = body + (kept + block).ljust(SECTOR_SIZE, b"\xff")
    verify_image(signed, public_key)  # the token's signature, as the chip will check it
    return signed


def _signed_parts(image: bytes, chip: str, new_key: bytes) -> tuple[bytes, bytes]:
    """The signed body and its existing blocks, if one more block for ``new_key`` may join them."""
    sector = _signature_sector(image)
    blocks = _parse_blocks(image, sector)
    limit = MAX_KEYS[chip]
    if limit == 1:
        raise StamplineError(f"{chip} Secure Boot V2 takes a single key; the image is already signed.")
    if len(blocks) >= limit:
        raise StamplineError(f"The image already has {len(blocks)} signature blocks, the most {chip} takes.")
    end = sector + SECTOR_SIZE
    if len(image) < end or image[end:].strip(b"\xff"):
        raise StamplineError("The signed image's signature sector is truncated or followed by other data.")
    body = image[:sector]
    for block in blocks:
        _check_block(block, body)
        if block.key_digest == new_key:
            raise StamplineError(f"The image is already signed with this key (signature block {block.index}).")
    return body, image[sector:sector + len(blocks) * SIGNATURE_BLOCK_SIZE]


def _espsecure_block(body: bytes, public_key: PublicKey, signature: bytes) -> bytes:
    """espsecure's own block for a precomputed signature (it checks the signature first)."""
    import esptool  # imported here: espsecure and esptool take ~0.1 s to import
    from espsecure import generate_signature_block_using_pre_calculated_signature

    try:
        block = generate_signature_block_using_pre_calculated_signature(
            [io.BytesIO(signature)], [io.BytesIO(public_key_pem(public_key))], body)
    except esptool.FatalError as exc:
        reason = str(exc).splitlines()[0].rstrip(".")
        raise StamplineError(f"espsecure refused the signer's signature: {reason}.") from None
    except ValueError:  # a malformed DER ECDSA signature
        raise StamplineError("espsecure refused the signer's signature: it is not a valid encoding.") from None
    if len(block) != SIGNATURE_BLOCK_SIZE:
        raise StamplineError(f"espsecure made a {len(block)}-byte signature block, not {SIGNATURE_BLOCK_SIZE}.")
    return bytes(block)
