"""Partition tables. gen_esp32part.py is not on PyPI and esptool 5 has no partition-table
reader, so the expected bytes are built here from the documented entry layout."""

from __future__ import annotations

import hashlib
import struct

import pytest
from esptool.targets import CHIP_DEFS

from stampline.errors import StamplineError
from stampline.firmware.partitions import (
    PARTITION_TABLE_OFFSET,
    AppSubtype,
    DataSubtype,
    PartitionEntry,
    PartitionTable,
    PartitionType,
    bootloader_offset,
    default_table,
)

REFERENCE = [  # label, type, subtype, offset, size, flags
    ("nvs", 1, 0x02, 0x9000, 0x6000, 0),
    ("otadata", 1, 0x00, 0xF000, 0x2000, 0),
    ("nvs_keys", 1, 0x04, 0x11000, 0x1000, 1),
    ("fctry", 1, 0x02, 0x12000, 0x6000, 0),
    ("fb_journal", 1, 0x40, 0x18000, 0x3000, 0),
    ("factory", 0, 0x00, 0x20000, 0x100000, 0),
    ("ota_0", 0, 0x10, 0x120000, 0x100000, 0),
    ("ota_1", 0, 0x11, 0x220000, 0x100000, 0),
]


def _expected_bytes(rows) -> bytes:
    body = b"".join(struct.pack("<2sBBLL16sL", b"\xaa\x50", t, s, o, n, label.encode(), f)
                    for label, t, s, o, n, f in rows)
    body += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(body).digest()
    return body + b"\xff" * (0xC00 - len(body))


@pytest.mark.parametrize("chip", ["esp32c3", "esp32s3"])
def test_default_table_is_the_reference_layout(chip):
    table = default_table(chip)
    assert [(e.label, e.type, e.subtype, e.offset, e.size, e.flags) for e in table] == REFERENCE
    assert table.to_bytes() == _expected_bytes(REFERENCE)
    assert len(table.to_bytes()) == 0xC00


def test_round_trip_and_lookups():
    data = default_table("esp32c3").to_bytes()
    table = PartitionTable.parse(data, flash_size=4 * 1024 * 1024)
    assert table == default_table("esp32c3") and table.to_bytes() == data
    assert PartitionTable.parse(data + b"\xff" * 0x400) == table  # a whole 4 KiB sector read back
    assert table.find("nvs_keys").encrypted and not table.find("fctry").encrypted
    assert [e.label for e in table.by_subtype(PartitionType.DATA, DataSubtype.NVS)] == ["nvs", "fctry"]
    assert table.by_subtype(PartitionType.APP, AppSubtype.OTA_1)[0].offset == 0x220000
    assert "otadata" in table and "spiffs" not in table and len(table) == 8
    with pytest.raises(StamplineError, match="no partition 'spiffs'"):
        table.find("spiffs")


def test_sixteen_character_label_round_trips():
    entry = PartitionEntry("abcdefghijklmnop", 1, 0x81, 0x10000, 0x1000)
    assert entry.to_bytes()[12:28] == b"abcdefghijklmnop"
    assert PartitionTable.parse(PartitionTable([entry]).to_bytes()).find("abcdefghijklmnop") == entry


def _corrupt(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


def test_md5_corruption_is_detected():
    data = default_table("esp32s3").to_bytes()
    with pytest.raises(StamplineError, match="MD5 does not match"):
        PartitionTable.parse(_corrupt(data, 32 + 12))  # a label byte of the second entry
    with pytest.raises(StamplineError, match="MD5 does not match"):
        PartitionTable.parse(_corrupt(data, 7 * 32 + 20))  # the MD5 itself
    without_md5 = data[:7 * 32] + b"\xff" * (0xC00 - 7 * 32)
    with pytest.raises(StamplineError, match="no MD5"):
        PartitionTable.parse(without_md5)
    with pytest.raises(StamplineError, match="bad magic"):
        PartitionTable.parse(_corrupt(data, 0))


def _row(label, ptype, offset, size, flags=0):
    subtype = AppSubtype.OTA_0 if ptype == PartitionType.APP else DataSubtype.NVS
    return PartitionEntry(label, ptype, subtype, offset, size, flags)


@pytest.mark.parametrize("rows, message", [
    ([_row("a", 1, 0x9000, 0x2000), _row("b", 1, 0xA000, 0x1000)], "overlap"),
    ([_row("a", 1, 0x9000, 0x1000), _row("a", 1, 0xA000, 0x1000)], "used twice"),
    ([_row("app", 0, 0x18000, 0x10000)], "not aligned to 0x10000"),
    ([_row("a", 1, 0x9800, 0x1000)], "not aligned to 0x1000"),
    ([_row("a", 1, 0x8000, 0x1000)], "below the end of the partition table"),
    ([_row("a", 1, 0x3F0000, 0x20000)], "beyond"),
    ([_row("k", 1, 0x9000, 0x800, flags=1)], "encrypted partition"),
    ([], "no partitions"),
])
def test_bad_tables_are_refused(rows, message):
    with pytest.raises(StamplineError, match=message):
        PartitionTable(rows, flash_size=0x400000)


def test_parse_checks_the_same_rules():
    rows = [("a", 1, 2, 0x9000, 0x2000, 0), ("b", 1, 2, 0xA000, 0x1000, 0)]
    with pytest.raises(StamplineError, match="overlap"):
        PartitionTable.parse(_expected_bytes(rows))
    with pytest.raises(StamplineError, match="beyond"):
        PartitionTable.parse(default_table("esp32c3").to_bytes(), flash_size=2 * 1024 * 1024)
    with pytest.raises(StamplineError, match="beyond"):
        default_table("esp32c3", flash_size=2 * 1024 * 1024)


@pytest.mark.parametrize("label", ["", "seventeen-chars-x", "näme"])
def test_bad_labels_are_refused(label):
    with pytest.raises(StamplineError):
        PartitionEntry(label, 1, 2, 0x9000, 0x1000)


def test_bootloader_offsets_agree_with_esptool():
    for chip in ("esp32", "esp32s2", "esp32s3", "esp32c2", "esp32c3", "esp32c5", "esp32c6",
                 "esp32h2", "esp32p4"):
        assert bootloader_offset(chip) == CHIP_DEFS[chip].BOOTLOADER_FLASH_OFFSET
    assert bootloader_offset("esp32") == 0x1000 and bootloader_offset("esp32c3") == 0
    assert PARTITION_TABLE_OFFSET == 0x8000
    with pytest.raises(StamplineError, match="unknown chip"):
        bootloader_offset("esp8266")
    with pytest.raises(StamplineError, match="unknown chip"):
        default_table("atmega328")
