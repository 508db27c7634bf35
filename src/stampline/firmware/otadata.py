"""ESP-IDF's otadata partition: which OTA app partition the bootloader starts.

Two 4 KiB sectors, each beginning with an ``esp_ota_select_entry_t``: ``ota_seq`` (u32),
``seq_label`` (20 bytes), ``ota_state`` (u32), ``crc`` (u32, ``esp_rom_crc32_le(UINT32_MAX,
&ota_seq, 4)``). The valid entry with the highest sequence wins; it selects ota_{(seq-1) mod n}.
Both sectors erased means: boot the factory app.
"""

from __future__ import annotations

import struct
import zlib

SECTOR = 0x1000
_ENTRY = struct.Struct("<I20sII")
STATE_NEW = 0x0
STATE_VALID = 0x2
STATE_UNDEFINED = 0xFFFFFFFF


def _crc(seq: int) -> int:
    return zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF)  # ESP-IDF's ROM CRC convention


def _valid_entries(data: bytes) -> list[tuple[int, int]]:
    """(sector index, sequence) of each sector holding a valid entry."""
    found = []
    for index in range(2):
        seq, _, state, crc = _ENTRY.unpack_from(data, index * SECTOR)
        if seq not in (0, 0xFFFFFFFF) and crc == _crc(seq) and state not in (0x3, 0x4):
            found.append((index, seq))
    return found


def selected_ota_index(data: bytes, ota_count: int) -> int | None:
    """The OTA slot (0 = ota_0) otadata selects, or None for the factory app."""
    entries = _valid_entries(data)
    if not entries or ota_count < 1:
        return None
    seq = max(seq for _, seq in entries)
    return (seq - 1) % ota_count


def select(data: bytes, ota_index: int, ota_count: int) -> bytes:
    """The otadata partition after selecting ``ota_index`` (as esp_ota_set_boot_partition does)."""
    entries = _valid_entries(data)
    current = max((seq for _, seq in entries), default=0)
    seq = current + 1
    while (seq - 1) % ota_count != ota_index:
        seq += 1
    # write the sector not holding the current entry, so a power cut leaves the old choice intact
    current_sector = next((i for i, s in entries if s == current), 1)
    target = 1 - current_sector
    out = bytearray(data)
    entry = _ENTRY.pack(seq, b"\xff" * 20, STATE_VALID, _crc(seq))
    out[target * SECTOR:(target + 1) * SECTOR] = entry + b"\xff" * (SECTOR - len(entry))
    return bytes(out)


def erased(size: int = 2 * SECTOR) -> bytes:
    return b"\xff" * size
