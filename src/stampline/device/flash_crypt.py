"""Flash encryption as the ESP32-C3/S3 does it: AES-XTS over 128-byte flash encryption blocks.

The chip cuts flash into "flash encryption blocks" of 1024 bits (0x80 bytes). Each 0x80-aligned
block is one XTS data unit whose tweak is the block's flash address (4 bytes little-endian, padded
with zeros to 16), and the hardware feeds the block to AES-XTS byte-reversed. Inside a block each
16-byte AES block is independent of the others, so any 16-byte aligned span can be processed on
its own: the output is byte for byte what
``espsecure encrypt-flash-data --aes-xts --keyfile K --address A`` writes.

Keys are in key-file order: the file that ``espefuse burn-key`` burns and ``espsecure`` reads.
A 32-byte key is AES-128-XTS (XTS_AES_128_KEY), which both chips take; a 64-byte key is
AES-256-XTS (XTS_AES_256_KEY_1 + _2), which only the ESP32-S3 has and which its first boot uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from stampline.errors import StamplineError

if TYPE_CHECKING:
    from stampline.device.chip import Flash

XTS_KEY_SIZES = {"esp32c3": 32, "esp32s3": 64}  # the key a first boot generates; 32 bytes always work
BLOCK = 0x80  # one flash encryption block = one XTS data unit
ALIGN = 16  # the encryption engine works on whole AES blocks
SECTOR = 0x1000


def check_key(key: bytes, chip: str) -> None:
    """Refuse a chip the emulator does not model, or a key its flash encryption cannot use."""
    if chip not in XTS_KEY_SIZES:
        raise StamplineError(f"Flash encryption is modelled for {', '.join(XTS_KEY_SIZES)}, not '{chip}'.")
    sizes = sorted({32, XTS_KEY_SIZES[chip]})
    if len(key) not in sizes:
        raise StamplineError(f"A {chip} flash encryption key is {' or '.join(map(str, sizes))} bytes, not {len(key)}.")


def encrypt(key: bytes, address: int, data: bytes, chip: str) -> bytes:
    """What the chip writes to flash at ``address`` for the plaintext ``data``."""
    return _xts(key, address, data, chip, decrypt=False)


def decrypt(key: bytes, address: int, data: bytes, chip: str) -> bytes:
    """What the chip's cache reads from the ciphertext ``data`` stored at ``address``."""
    return _xts(key, address, data, chip, decrypt=True)


def _xts(key: bytes, address: int, data: bytes, chip: str, decrypt: bool) -> bytes:
    check_key(key, chip)
    if address < 0 or address % ALIGN or len(data) % ALIGN:
        raise StamplineError("Flash encryption needs a 16-byte aligned address and length, "
                             f"not 0x{address:x}+{len(data)}.")
    if address + len(data) > 1 << 32:
        raise StamplineError(f"Flash encryption addresses are 32 bits; 0x{address:x}+{len(data)} is beyond them.")
    aes = algorithms.AES(key)
    out = bytearray()
    position, end = address, address + len(data)
    while position < end:
        unit = position & ~(BLOCK - 1)
        stop = min(unit + BLOCK, end)
        # Place the span at its offset in its block; the zero padding does not change its output.
        padded = bytes(position - unit) + data[position - address:stop - address] + bytes(unit + BLOCK - stop)
        cipher = Cipher(aes, modes.XTS(unit.to_bytes(4, "little") + bytes(12)))
        context = cipher.decryptor() if decrypt else cipher.encryptor()
        result = (context.update(padded[::-1]) + context.finalize())[::-1]
        out += result[position - unit:stop - unit]
        position = stop
    return bytes(out)


class EncryptedFlash:
    """The chip's view of its flash with a flash encryption key.

    ``read_decrypted`` is what the cache returns, ``write_encrypted`` what an encrypted write stores.
    ``regions`` are the (offset, size) spans the chip treats as encrypted (bootloader, partition
    table, app partitions, nvs_keys...): ``read`` and ``write`` inside them are transparent, and
    outside them go to the flash unchanged, as for a partition without the encrypted flag.
    """

    def __init__(self, flash: Flash, key: bytes, chip: str, regions: Iterable[tuple[int, int]] = ()) -> None:
        check_key(key, chip)
        self.flash = flash
        self.chip = chip
        self._key = key
        self.regions = tuple(sorted(regions))
        previous_end = 0
        for offset, size in self.regions:
            if offset % ALIGN or size <= 0 or size % ALIGN or offset < previous_end or offset + size > flash.size:
                raise StamplineError(f"The encrypted region 0x{offset:x}+{size} is not a 16-byte aligned, "
                                     "non-overlapping span of the flash.")
            previous_end = offset + size

    def read_decrypted(self, address: int, length: int) -> bytes:
        """Read through the decrypting cache; any address and length."""
        start = address - address % ALIGN
        end = -(-(address + length) // ALIGN) * ALIGN
        plain = decrypt(self._key, start, self.flash.read(start, end - start), self.chip)
        return plain[address - start:address - start + length]

    def write_encrypted(self, address: int, plaintext: bytes) -> None:
        """An encrypted write: like esp_flash_write_encrypted, 16-byte aligned address and length."""
        self.flash.write(address, encrypt(self._key, address, plaintext, self.chip))

    def encrypt_in_place(self, address: int, size: int) -> None:
        """Encrypt plaintext already in flash, a sector at a time (read, erase, write) as the
        first boot does (esp_flash_encrypt_region): ``address`` sector-aligned, ``size`` rounded up
        to whole sectors."""
        if address % SECTOR or size <= 0:
            raise StamplineError(f"In-place encryption needs a sector-aligned region, not 0x{address:x}+{size}.")
        for sector in range(address, address + size, SECTOR):
            plaintext = self.flash.read(sector, SECTOR)
            self.flash.erase(sector, SECTOR)
            self.write_encrypted(sector, plaintext)
        self.flash.flush()

    def read(self, address: int, length: int) -> bytes:
        if self._encrypted(address, length):
            return self.read_decrypted(address, length)
        return self.flash.read(address, length)

    def write(self, address: int, data: bytes) -> None:
        if self._encrypted(address, len(data)):
            self.write_encrypted(address, data)
        else:
            self.flash.write(address, data)

    def _encrypted(self, address: int, length: int) -> bool:
        for offset, size in self.regions:
            if address < offset + size and offset < address + length:
                if offset <= address and address + length <= offset + size:
                    return True
                raise StamplineError(f"The flash access 0x{address:x}+{length} straddles the edge of "
                                     f"the encrypted region 0x{offset:x}+{size}.")
        return False
