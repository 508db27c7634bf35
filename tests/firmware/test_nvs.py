"""NVS images, cross-checked against Espressif's esp_idf_nvs_partition_gen run as a command."""

from __future__ import annotations

import base64
import csv
import secrets
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from stampline.errors import StamplineError
from stampline.firmware.nvs import (
    NvsImage,
    crc32,
    make_nvs_keys_partition,
    parse_nvs_keys_partition,
)

PAGE = 4096

# (namespace, key) -> (kind, value): every type, a long string, a 2 KB blob that has to be
# split over two pages (the string before it leaves too little room), several namespaces.
CONTENT: dict[tuple[str, str], tuple[str, int | str | bytes]] = {
    ("stamp", "u8"): ("u8", 255),
    ("stamp", "i8"): ("i8", -128),
    ("stamp", "u16"): ("u16", 65535),
    ("stamp", "i16"): ("i16", -32768),
    ("stamp", "u32"): ("u32", 4294967295),
    ("stamp", "i32"): ("i32", -2147483648),
    ("stamp", "u64"): ("u64", 18446744073709551615),
    ("stamp", "i64"): ("i64", -9223372036854775808),
    ("stamp", "serial"): ("string", "SL-0001-ÄÖ"),
    ("stamp", "empty"): ("string", ""),
    ("cfg", "long"): ("string", "x" * 3000),
    ("cfg", "cert"): ("blob", bytes(range(256)) * 8),
    ("cfg", "tiny"): ("blob", b"\x00"),
    ("other", "nothing"): ("blob", b""),
    ("other", "count"): ("u32", 7),
}


def _gen(tmp_path: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "esp_idf_nvs_partition_gen", *args,
                    "--outdir", str(tmp_path)], cwd=tmp_path, check=True, capture_output=True)


def _csv(tmp_path: Path, content: dict, name: str = "in.csv") -> str:
    """The generator's CSV for `content`; a namespace row wherever the namespace changes."""
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["key", "type", "encoding", "value"])
        current = None
        for (namespace, key), (kind, value) in content.items():
            if namespace != current:
                out.writerow([namespace, "namespace", "", ""])
                current = namespace
            if kind == "blob":
                # Use both binary encodings the generator has.
                if len(value) % 2:
                    out.writerow([key, "data", "base64", base64.b64encode(value).decode()])
                else:
                    out.writerow([key, "data", "hex2bin", value.hex()])
            else:
                out.writerow([key, "data", kind, value])
    return str(path)


def _generated(tmp_path: Path, content: dict, size: int, version: str = "2") -> bytes:
    _gen(tmp_path, "generate", _csv(tmp_path, content), "gen.bin", hex(size), "--version", version)
    return (tmp_path / "gen.bin").read_bytes()


def _image(content: dict, size: int) -> NvsImage:
    image = NvsImage(size)
    for (namespace, key), (kind, value) in content.items():
        image.set(namespace, key, value, kind)
    return image


def _entries(data: bytes, type_: int) -> list[bytes]:
    """Item headers of one type in a plaintext image, walking each page by span."""
    found = []
    for page in range(0, len(data), PAGE):
        i = 0
        while i < 126:
            entry = data[page + 64 + 32 * i:page + 96 + 32 * i]
            if (data[page + 32 + i // 4] >> (i % 4 * 2)) & 3 != 0b10:
                i += 1
                continue
            if entry[1] == type_:
                found.append(entry)
            i += entry[2]
    return found


def _state(data: bytes, page: int) -> int:
    return struct.unpack_from("<I", data, page * PAGE)[0]


def test_reads_the_generators_image(tmp_path):
    data = _generated(tmp_path, CONTENT, 0x6000)
    # The 2 KB blob really is split: its index entry counts two chunks.
    (index,) = [e for e in _entries(data, 0x48) if e[8:12] == b"cert"]
    assert struct.unpack_from("<IB", index, 24) == (2048, 2)
    assert NvsImage.parse(data).items() == CONTENT


def test_writes_the_generators_bytes(tmp_path):
    ours = _image(CONTENT, 0x6000).to_bytes()
    assert ours == _generated(tmp_path, CONTENT, 0x6000)
    # Page 0 full, page 1 active (the log continues there), the rest blank, the last page is
    # the reserve the firmware needs for garbage collection.
    assert (_state(ours, 0), _state(ours, 1)) == (0xFFFFFFFC, 0xFFFFFFFE)
    assert ours[2 * PAGE:] == b"\xff" * (len(ours) - 2 * PAGE)
    assert ours[8] == 0xFE  # format version 2


def test_empty_image_matches_the_generator(tmp_path):
    ours = NvsImage(0x3000).to_bytes()
    assert ours == _generated(tmp_path, {}, 0x3000)
    assert _state(ours, 0) == 0xFFFFFFFE and NvsImage.parse(ours).items() == {}


def _filler(count: int) -> dict:
    return {("n", f"k{i}"): ("u8", i % 256) for i in range(count)}


# Page-boundary cases, each with where the last item's header must land (page, entry).
EDGES = {
    # 1 namespace entry + 124 u8 leave one entry: the generator still starts the blob there
    # with a zero-length chunk 0 and puts the data in chunk 1 on the next page.
    "zero-length chunk": ({**_filler(124), ("n", "blob"): ("blob", b"\xab" * 100)}, 0x48, (1, 5)),
    # 61 + a 65-entry string would fill the page exactly: the generator moves it on anyway.
    "string one short": ({**_filler(60), ("n", "s"): ("string", "s" * 2047)}, 0x21, (1, 0)),
    # A blob that fills the page to the last entry pushes its index entry to the next page.
    "index on next page": ({("n", "b"): ("blob", b"\x5a" * 3968)}, 0x48, (1, 0)),
    # 126 entries fill page 0 exactly; the next primitive opens page 1.
    "page filled exactly": (_filler(126), 0x01, (1, 0)),
}


@pytest.mark.parametrize("name", EDGES)
def test_page_boundaries_match_the_generator(tmp_path, name):
    content, last_type, (page, entry) = EDGES[name]
    ours = _image(content, 0x4000).to_bytes()
    assert ours == _generated(tmp_path, content, 0x4000)
    at = page * PAGE + 64 + 32 * entry
    last_key = list(content)[-1][1]
    assert ours[at + 1] == last_type and ours[at + 8:at + 24].rstrip(b"\0").decode() == last_key
    if name == "zero-length chunk":
        assert [struct.unpack_from("<H", e, 24)[0] for e in _entries(ours, 0x42)] == [0, 100]
    assert NvsImage.parse(ours).items() == content


def test_reads_version_1_blobs(tmp_path):
    content = {("n", "blob"): ("blob", b"\x01\x02" * 300), ("n", "s"): ("string", "v1")}
    data = _generated(tmp_path, content, 0x3000, version="1")
    assert data[8] == 0xFF and _entries(data, 0x42) == []  # really version 1, no v2 chunks
    assert len(_entries(data, 0x41)) == 1
    assert NvsImage.parse(data).items() == content


def test_encrypted_image_matches_the_generator_both_ways(tmp_path):
    keys = secrets.token_bytes(64)
    (tmp_path / "keys.bin").write_bytes(make_nvs_keys_partition(keys))
    image = _image(CONTENT, 0x6000)
    plain, ours = image.to_bytes(), image.to_bytes(encryption_keys=keys)
    assert ours[64:96] != plain[64:96] and ours[:64] == plain[:64]  # entries only

    _gen(tmp_path, "encrypt", _csv(tmp_path, CONTENT), "enc.bin", "0x6000", "--inputkey",
         str(tmp_path / "keys.bin"))
    theirs = (tmp_path / "enc.bin").read_bytes()
    assert ours == theirs
    assert NvsImage.parse(theirs, encryption_keys=keys).items() == CONTENT

    (tmp_path / "ours.bin").write_bytes(ours)
    _gen(tmp_path, "decrypt", "ours.bin", str(tmp_path / "keys.bin"), "dec.bin")
    assert (tmp_path / "dec.bin").read_bytes() == plain


def test_wrong_keys_are_detected():
    keys = secrets.token_bytes(64)
    data = _image(CONTENT, 0x6000).to_bytes(keys)
    with pytest.raises(StamplineError, match="bad CRC"):
        NvsImage.parse(data, encryption_keys=secrets.token_bytes(64))


def test_nvs_keys_partition(tmp_path):
    keys = secrets.token_bytes(64)
    part = make_nvs_keys_partition(keys)
    assert len(part) == PAGE and part[:64] == keys and part[68:] == b"\xff" * (PAGE - 68)
    assert parse_nvs_keys_partition(part) == keys
    # The generator's own key file (test only: it draws keys from `random`) reads back.
    _gen(tmp_path, "generate-key", "--keyfile", "gk.bin")
    generated = (tmp_path / "keys" / "gk.bin").read_bytes()
    assert parse_nvs_keys_partition(generated) == generated[:64]

    with pytest.raises(StamplineError, match="the nvs_keys partition is empty"):
        parse_nvs_keys_partition(b"\xff" * PAGE)
    broken = bytearray(part)
    broken[3] ^= 1
    with pytest.raises(StamplineError, match="CRC"):
        parse_nvs_keys_partition(bytes(broken))
    with pytest.raises(StamplineError):
        make_nvs_keys_partition(keys[:32])


def _bitwise_crc(data: bytes) -> int:
    """esp_rom_crc32_le(0xFFFFFFFF, ...) spelled out: reflected 0xEDB88320, register
    starting at 0 (the ROM inverts the seed), final inversion."""
    register = 0
    for byte in data:
        register ^= byte
        for _ in range(8):
            register = (register >> 1) ^ (0xEDB88320 if register & 1 else 0)
    return register ^ 0xFFFFFFFF


def test_crc_is_esp_idfs_convention():
    for sample in (b"", b"123456789", bytes(range(256))):
        assert crc32(sample) == _bitwise_crc(sample)
    assert crc32(b"123456789") != 0xCBF43926  # not the usual CRC-32


def _flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


def test_corruption_is_refused():
    image = NvsImage(0x3000)
    image.set("ns", "key", "a string longer than one entry, for the data CRC")
    data = image.to_bytes()
    with pytest.raises(StamplineError, match="page 0 entry 1 has a bad CRC"):
        NvsImage.parse(_flip(data, 64 + 32 + 9))  # key byte of the string's header
    with pytest.raises(StamplineError, match="page 0 entry 1 has data"):
        NvsImage.parse(_flip(data, 64 + 64 + 3))  # the string's data
    with pytest.raises(StamplineError, match="page 0 has a bad header CRC"):
        NvsImage.parse(_flip(data, 5))


def test_erased_entries_are_skipped_and_sequence_numbers_order_pages():
    first, second = NvsImage(0x3000), NvsImage(0x3000)
    first.set("ns", "k", 1, "u8")
    first.set("ns", "gone", 2, "u8")
    second.set("ns", "k", 2, "u8")
    a, b = first.to_bytes(), second.to_bytes()
    # b's page goes first on flash but carries sequence number 1, so it is the newer one.
    page_b = bytearray(b[:PAGE])
    struct.pack_into("<I", page_b, 4, 1)
    struct.pack_into("<I", page_b, 28, crc32(bytes(page_b[4:28])))
    page_a = bytearray(a[:PAGE])
    page_a[32] &= ~(0b11 << 4) & 0xFF  # entry 2 ("gone") erased
    data = bytes(page_b) + bytes(page_a) + b"\xff" * PAGE
    assert NvsImage.parse(data).items() == {("ns", "k"): ("u8", 2)}


def test_set_replace_delete_get():
    image = NvsImage(0x3000)
    image.set("ns", "a", 1, "u8")
    image.set("ns", "b", b"\x01")
    image.set("ns", "a", "now a string")
    assert list(image.items()) == [("ns", "a"), ("ns", "b")]  # replacing keeps the place
    assert image.get("ns", "a") == "now a string"
    image.delete("ns", "a")
    assert image.items() == {("ns", "b"): ("blob", b"\x01")}
    with pytest.raises(StamplineError, match="no key 'a'"):
        image.get("ns", "a")
    with pytest.raises(StamplineError):
        image.delete("ns", "a")


@pytest.mark.parametrize("namespace, key, value, kind", [
    ("ns", "k" * 16, 1, "u8"),            # key too long
    ("n" * 16, "k", 1, "u8"),             # namespace too long
    ("ns", "", 1, "u8"),                  # empty key
    ("ns", "k", 256, "u8"),               # out of range
    ("ns", "k", -1, "u32"),               # unsigned
    ("ns", "k", b"x", "string"),          # wrong type for the kind
    ("ns", "k", "x", "u8"),
    ("ns", "k", 5, None),                 # ints need a kind
    ("ns", "k", True, "u8"),              # booleans are refused
    ("ns", "k", "x" * 4000, None),        # 4001 bytes with the NUL
    ("ns", "k", "a\x00b", None),          # NUL inside a string
    ("ns", "k", 1, "float"),              # unknown kind
])
def test_bad_values_are_refused(namespace, key, value, kind):
    image = NvsImage(0x3000)
    with pytest.raises(StamplineError):
        image.set(namespace, key, value, kind)
    assert image.items() == {}


def test_sizes_are_checked():
    for size in (0x2000, 0x3001, 0):
        with pytest.raises(StamplineError, match="multiple of 4096"):
            NvsImage(size)
    image = NvsImage(0x3000)  # two usable pages, each takes one 64-entry string
    image.set("ns", "a", "x" * 2000)
    image.set("ns", "b", "y" * 2000)
    with pytest.raises(StamplineError, match="does not fit"):
        image.set("ns", "c", "z" * 2000)
    assert list(image.items()) == [("ns", "a"), ("ns", "b")]  # the refused key left no trace
    with pytest.raises(StamplineError, match="at most 508000"):
        NvsImage(0x100000).set("ns", "big", b"\x00" * 508001)


def test_at_most_254_namespaces():
    image = NvsImage(0x10000)
    for i in range(254):
        image.set(f"ns{i}", "k", i, "u8")
    with pytest.raises(StamplineError, match="254 namespaces"):
        image.set("one-too-many", "k", 0, "u8")
    assert NvsImage.parse(image.to_bytes()).items() == image.items()
