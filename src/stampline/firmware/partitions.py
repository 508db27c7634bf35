"""ESP-IDF binary partition tables: read, validate, write, and stampline's reference layout.

The binary format is the one ESP-IDF's ``gen_esp32part.py`` writes and the second-stage
bootloader reads at ``PARTITION_TABLE_OFFSET``: 32-byte entries (``<2sBBLL16sL``: magic
``AA 50``, type, subtype, offset, size, NUL-padded label, flags), then an MD5 entry
(``EB EB``, fourteen ``FF``, the MD5 of all preceding entries), then ``FF`` padding to 0xC00
bytes (the rest of the 4 KiB sector is left for a signature).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from stampline.errors import StamplineError

PARTITION_TABLE_OFFSET = 0x8000
PARTITION_TABLE_SIZE = 0x1000
TABLE_LENGTH = 0xC00
ENTRY_SIZE = 32
# gen_esp32part.py refuses a table that, MD5 entry included, reaches 0xC00 bytes.
MAX_ENTRIES = TABLE_LENGTH // ENTRY_SIZE - 2

_ENTRY = struct.Struct("<2sBBLL16sL")
_MAGIC = b"\xaa\x50"
_MD5_MAGIC = b"\xeb\xeb" + b"\xff" * 14
_END = b"\xff" * ENTRY_SIZE

FLAG_ENCRYPTED = 0x1
FLAG_READONLY = 0x2

APP_ALIGNMENT = 0x10000
DATA_ALIGNMENT = 0x1000


class PartitionType(IntEnum):
    APP = 0x00
    DATA = 0x01
    BOOTLOADER = 0x02  # ESP-IDF >= 5.3: describes the bootloader region itself
    PARTITION_TABLE = 0x03  # ESP-IDF >= 5.3: describes the partition table region itself


class AppSubtype(IntEnum):
    FACTORY = 0x00
    OTA_0 = 0x10
    OTA_1 = 0x11
    OTA_2 = 0x12
    OTA_3 = 0x13
    OTA_4 = 0x14
    OTA_5 = 0x15
    OTA_6 = 0x16
    OTA_7 = 0x17
    OTA_8 = 0x18
    OTA_9 = 0x19
    OTA_10 = 0x1A
    OTA_11 = 0x1B
    OTA_12 = 0x1C
    OTA_13 = 0x1D
    OTA_14 = 0x1E
    OTA_15 = 0x1F
    TEST = 0x20


class DataSubtype(IntEnum):
    OTA = 0x00
    PHY = 0x01
    NVS = 0x02
    COREDUMP = 0x03
    NVS_KEYS = 0x04
    EFUSE = 0x05
    UNDEFINED = 0x06
    ESPHTTPD = 0x80
    FAT = 0x81
    SPIFFS = 0x82
    LITTLEFS = 0x83


_BOOTLOADER_OFFSETS = {
    "esp32": 0x1000,
    "esp32s2": 0x1000,
    "esp32s3": 0x0,
    "esp32c2": 0x0,
    "esp32c3": 0x0,
    "esp32c6": 0x0,
    "esp32h2": 0x0,
    "esp32c5": 0x2000,
    "esp32p4": 0x2000,
}


def bootloader_offset(chip: str) -> int:
    """Flash offset of the second-stage bootloader image for `chip` (e.g. ``"esp32c3"``)."""
    try:
        return _BOOTLOADER_OFFSETS[chip.lower().replace("-", "")]
    except KeyError:
        known = ", ".join(sorted(_BOOTLOADER_OFFSETS))
        raise StamplineError(f"unknown chip '{chip}'; expected one of {known}.") from None


def _alignment(ptype: int) -> int:
    return APP_ALIGNMENT if ptype == PartitionType.APP else DATA_ALIGNMENT


@dataclass(frozen=True)
class PartitionEntry:
    """One row of the table; `flags` bit 0 marks a partition encrypted under flash encryption."""

    label: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0

    def __post_init__(self) -> None:
        try:
            raw = self.label.encode("ascii")
        except UnicodeEncodeError:
            raise StamplineError(f"partition label '{self.label}' is not ASCII.") from None
        if not raw or len(raw) > 16 or b"\x00" in raw:
            raise StamplineError(
                f"partition label '{self.label}' must be 1 to 16 ASCII characters.")
        for name, value, limit in (("type", self.type, 0xFE), ("subtype", self.subtype, 0xFE),
                                   ("offset", self.offset, 0xFFFFFFFF),
                                   ("size", self.size, 0xFFFFFFFF),
                                   ("flags", self.flags, 0xFFFFFFFF)):
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise StamplineError(f"partition '{self.label}' has an invalid {name} {value!r}.")
        if self.size == 0:
            raise StamplineError(f"partition '{self.label}' has size 0.")

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def end(self) -> int:
        """The first byte after the partition."""
        return self.offset + self.size

    def to_bytes(self) -> bytes:
        return _ENTRY.pack(_MAGIC, self.type, self.subtype, self.offset, self.size,
                           self.label.encode("ascii"), self.flags)


class PartitionTable:
    """A validated partition table; entries keep the order they were given in."""

    def __init__(self, entries: Iterable[PartitionEntry], flash_size: int | None = None,
                 table_offset: int = PARTITION_TABLE_OFFSET) -> None:
        self._entries = tuple(entries)
        self.flash_size = flash_size
        self.table_offset = table_offset
        self._validate()

    def _validate(self) -> None:
        if not self._entries:
            raise StamplineError("the partition table has no partitions.")
        if len(self._entries) > MAX_ENTRIES:
            raise StamplineError(
                f"the partition table has {len(self._entries)} partitions; at most {MAX_ENTRIES} fit.")
        seen: set[str] = set()
        table_end = self.table_offset + PARTITION_TABLE_SIZE
        for e in self._entries:
            if e.label in seen:
                raise StamplineError(f"partition label '{e.label}' is used twice.")
            seen.add(e.label)
            align = _alignment(e.type)
            if e.offset % align:
                raise StamplineError(
                    f"partition '{e.label}' offset {e.offset:#x} is not aligned to {align:#x}.")
            if e.type == PartitionType.APP and e.size % DATA_ALIGNMENT:
                raise StamplineError(
                    f"partition '{e.label}' size {e.size:#x} is not a multiple of {DATA_ALIGNMENT:#x}.")
            if e.encrypted and e.size % DATA_ALIGNMENT:
                raise StamplineError(
                    f"encrypted partition '{e.label}' size {e.size:#x} is not a multiple of "
                    f"{DATA_ALIGNMENT:#x}.")
            regions_exempt = e.type in (PartitionType.BOOTLOADER, PartitionType.PARTITION_TABLE)
            if not regions_exempt and e.offset < table_end:
                raise StamplineError(
                    f"partition '{e.label}' at {e.offset:#x} lies below the end of the partition "
                    f"table at {table_end:#x}.")
            if self.flash_size is not None and e.end > self.flash_size:
                raise StamplineError(
                    f"partition '{e.label}' ends at {e.end:#x}, beyond the {self.flash_size:#x}-byte "
                    "flash.")
        ordered = sorted(self._entries, key=lambda p: p.offset)
        for before, after in zip(ordered, ordered[1:]):
            if after.offset < before.end:
                raise StamplineError(
                    f"partitions '{before.label}' and '{after.label}' overlap at {after.offset:#x}.")

    @classmethod
    def parse(cls, data: bytes, flash_size: int | None = None,
              table_offset: int = PARTITION_TABLE_OFFSET) -> PartitionTable:
        """Read a binary table (0xC00 bytes or the whole 4 KiB sector); the MD5 entry is required."""
        entries: list[PartitionEntry] = []
        md5 = hashlib.md5()
        for pos in range(0, min(len(data), TABLE_LENGTH) - ENTRY_SIZE + 1, ENTRY_SIZE):
            raw = bytes(data[pos:pos + ENTRY_SIZE])
            index = pos // ENTRY_SIZE
            if raw == _END:
                raise StamplineError("the partition table has no MD5 entry.")
            if raw[:2] == _MD5_MAGIC[:2]:
                if raw[:16] != _MD5_MAGIC or raw[16:] != md5.digest():
                    raise StamplineError("the partition table MD5 does not match its entries.")
                return cls(entries, flash_size, table_offset)
            magic, ptype, subtype, offset, size, label, flags = _ENTRY.unpack(raw)
            if magic != _MAGIC:
                raise StamplineError(f"partition table entry {index} has a bad magic number.")
            md5.update(raw)
            name = label.split(b"\x00", 1)[0]
            try:
                text = name.decode("ascii")
            except UnicodeDecodeError:
                raise StamplineError(
                    f"partition table entry {index} has a label that is not ASCII.") from None
            entries.append(PartitionEntry(text, ptype, subtype, offset, size, flags))
        raise StamplineError("the partition table has no MD5 entry within its 0xC00 bytes.")

    def to_bytes(self) -> bytes:
        """The 0xC00-byte image gen_esp32part.py produces: entries, MD5 entry, FF padding."""
        body = b"".join(e.to_bytes() for e in self._entries)
        body += _MD5_MAGIC + hashlib.md5(body).digest()
        return body + b"\xff" * (TABLE_LENGTH - len(body))

    def find(self, label: str) -> PartitionEntry:
        """The partition named `label`; a missing one is a StamplineError."""
        for e in self._entries:
            if e.label == label:
                return e
        raise StamplineError(f"the partition table has no partition '{label}'.")

    def by_subtype(self, type: int, subtype: int) -> tuple[PartitionEntry, ...]:
        """All partitions of this type and subtype, in table order (there may be several NVS)."""
        return tuple(e for e in self._entries if e.type == type and e.subtype == subtype)

    def __contains__(self, label: object) -> bool:
        return any(e.label == label for e in self._entries)

    def __iter__(self) -> Iterator[PartitionEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PartitionTable) and self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return f"PartitionTable({list(self._entries)!r})"


DEFAULT_FLASH_SIZE = 4 * 1024 * 1024
JOURNAL_SUBTYPE = 0x40  # a custom data subtype (0x40-0xFE are free for applications)


def default_table(chip: str, flash_size: int = DEFAULT_FLASH_SIZE) -> PartitionTable:
    """Stampline's reference layout (designed for esp32c3/esp32s3, valid on any known chip).

    ``fctry`` holds the plaintext manufacturing stamp written at the station; ``nvs`` is left
    blank and becomes the encrypted NVS on first boot, keyed from ``nvs_keys`` (which is
    flagged encrypted, so flash encryption protects the NVS keys). ``fb_journal`` (two state
    sectors and a scratch sector) makes the first boot resumable after a power cut.
    """
    bootloader_offset(chip)  # refuses unknown chips
    app, data = PartitionType.APP, PartitionType.DATA
    return PartitionTable([
        PartitionEntry("nvs", data, DataSubtype.NVS, 0x9000, 0x6000),
        PartitionEntry("otadata", data, DataSubtype.OTA, 0xF000, 0x2000),
        PartitionEntry("nvs_keys", data, DataSubtype.NVS_KEYS, 0x11000, 0x1000, FLAG_ENCRYPTED),
        PartitionEntry("fctry", data, DataSubtype.NVS, 0x12000, 0x6000),
        PartitionEntry("fb_journal", data, JOURNAL_SUBTYPE, 0x18000, 0x3000),
        PartitionEntry("factory", app, AppSubtype.FACTORY, 0x20000, 0x100000),
        PartitionEntry("ota_0", app, AppSubtype.OTA_0, 0x120000, 0x100000),
        PartitionEntry("ota_1", app, AppSubtype.OTA_1, 0x220000, 0x100000),
    ], flash_size=flash_size)
