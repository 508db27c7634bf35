"""The first-boot journal: what makes in-place flash encryption survive a power cut.

The ``fb_journal`` partition holds two state sectors and one scratch sector. A state record is
written to the sector that does not hold the newest one, with a sequence number and a CRC, so a
cut during the write leaves the previous record in force (as ESP-IDF's otadata does). Before a
sector is encrypted in place, its plaintext is copied to the scratch sector and the journal
names the sector and the SHA-256 of its plaintext; after a cut the sector is found as plaintext
(encrypt it), as ciphertext (it was done), or torn (restore it from scratch, then encrypt).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from stampline.device.chip import Flash
from stampline.firmware.partitions import PartitionEntry

SECTOR = 0x1000
_HEAD = struct.Struct("<4sIBxxxI32sHH")  # magic, seq, phase, address, sha256, region count, table length
_REGION = struct.Struct("<II")  # offset, size
_MAGIC = b"FBJ1"
MAX_REGIONS = 16
MAX_TABLE = 0xC00

IDLE = 0  # nothing in progress
ENCRYPTING = 1  # the sector at ``address`` (plaintext SHA-256 ``sha256``) is being encrypted
ENCRYPTED = 2  # every region is encrypted; the flash encryption eFuse may not be burnt yet


@dataclass(frozen=True)
class JournalState:
    seq: int = 0
    phase: int = IDLE
    address: int = 0
    sha256: bytes = bytes(32)
    regions: tuple[tuple[int, int], ...] = ()  # what is being encrypted, fixed when it starts
    table: bytes = b""  # the plaintext partition table: once encrypted, it is unreadable until the eFuse burn


class Journal:
    def __init__(self, flash: Flash, partition: PartitionEntry) -> None:
        if partition.size < 3 * SECTOR:
            raise ValueError("the first-boot journal needs three sectors")
        self.flash = flash
        self.base = partition.offset

    def _read(self, index: int) -> JournalState | None:
        raw = self.flash.read(self.base + index * SECTOR, SECTOR)
        magic, seq, phase, address, sha, count, table_length = _HEAD.unpack_from(raw)
        if magic != _MAGIC or count > MAX_REGIONS or table_length > MAX_TABLE:
            return None
        table_at = _HEAD.size + count * _REGION.size
        end = table_at + table_length
        (crc,) = struct.unpack_from("<I", raw, end)
        if crc != zlib.crc32(raw[:end]):
            return None
        regions = tuple(_REGION.unpack_from(raw, _HEAD.size + i * _REGION.size) for i in range(count))
        return JournalState(seq, phase, address, sha, regions, raw[table_at:end])

    def state(self) -> JournalState:
        found = [s for s in (self._read(0), self._read(1)) if s is not None]
        return max(found, key=lambda s: s.seq) if found else JournalState()

    def save(self, phase: int, address: int = 0, sha256: bytes = bytes(32),
             regions: tuple[tuple[int, int], ...] = (), table: bytes = b"") -> None:
        """Write a new state into the sector not holding the newest one."""
        if len(regions) > MAX_REGIONS or len(table) > MAX_TABLE:
            raise ValueError("too many regions or too long a partition table for the journal")
        states = [(i, s) for i, s in ((0, self._read(0)), (1, self._read(1))) if s is not None]
        index, newest = max(states, key=lambda item: item[1].seq, default=(1, JournalState()))
        body = _HEAD.pack(_MAGIC, newest.seq + 1, phase, address, sha256, len(regions), len(table)) + b"".join(
            _REGION.pack(*r) for r in regions) + table
        target = self.base + (1 - index) * SECTOR
        self.flash.erase(target, SECTOR)
        self.flash.write(target, body + struct.pack("<I", zlib.crc32(body)))
        self.flash.flush()

    def save_scratch(self, data: bytes) -> None:
        self.flash.erase(self.base + 2 * SECTOR, SECTOR)
        self.flash.write(self.base + 2 * SECTOR, data)
        self.flash.flush()

    def scratch(self) -> bytes:
        return self.flash.read(self.base + 2 * SECTOR, SECTOR)

    def clear(self) -> None:
        self.flash.erase(self.base, 3 * SECTOR)
        self.flash.flush()
