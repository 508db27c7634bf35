"""ESP-IDF NVS partition images (format version 2, multi-page blobs), plain or encrypted.

Layout of a partition: 4096-byte pages, each a 32-byte header (state u32, sequence u32,
version u8, 19 reserved ``FF``, CRC32 of bytes 4..28), a 32-byte bitmap holding two bits per
entry (``11`` empty, ``10`` written, ``00`` erased), then 126 entries of 32 bytes. An entry is
namespace index u8, type u8, span u8, chunk index u8, CRC32 u32 (of the entry without that
field), key (16 bytes, NUL-padded) and 8 bytes of data. Namespaces are u8 entries in
namespace 0 whose value is the index their keys use. Strings and blob chunks keep size u16,
reserved u16 and the CRC32 of their payload in the data field and the payload in the
following ``span - 1`` entries; a v2 blob is one or more BLOB_DATA chunks (one per page)
followed by a BLOB_IDX entry (size u32, chunk count u8, first chunk index u8).

Every CRC32 is ESP-IDF's ``esp_rom_crc32_le(0xFFFFFFFF, ...)``, which is
``zlib.crc32(data, 0xFFFFFFFF)``: the usual CRC-32 polynomial and final XOR but starting from
register 0 instead of ``0xFFFFFFFF``, so it is *not* ``zlib.crc32(data)``.

`NvsImage.to_bytes` lays entries out exactly as Espressif's ``esp_idf_nvs_partition_gen``
(0.3) does for a CSV listing the same keys in the same order with a namespace row before each
change of namespace: same page states (earlier pages FULL, the last used one ACTIVE, the rest
blank, the last page kept free), same split of blobs into chunks, byte-identical images, plain
or encrypted. We differ only where the generator is wrong:

* it crashes on a string of 3969..4000 bytes (it wants one spare entry even on an empty
  page); we give such a string a page of its own, which the firmware accepts;
* when a CSV returns to an earlier namespace, it files the following keys under the most
  recently *created* namespace; we file them under the right one;
* its CSV front end silently adds Wi-Fi entries (``sta.apinfo``, ``sta.pmk``, ``ap.pmk_info``
  ...) when it meets the keys ``sta.ssid``, ``sta.pswd`` or ``ap.*``; we never add anything.

NVS encryption (XTS-AES-256, key = eky || tky from the ``nvs_keys`` partition) encrypts each
written 32-byte entry on its own with the tweak set to the entry's byte offset in the
partition as a 16-byte little-endian number; page headers, bitmaps and never-written entries
stay as they are.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from stampline.errors import StamplineError

PAGE_SIZE = 4096
ENTRY_SIZE = 32
ENTRIES_PER_PAGE = 126
FIRST_ENTRY_OFFSET = 64
VERSION2 = 0xFE
VERSION1 = 0xFF

PAGE_UNINITIALIZED = 0xFFFFFFFF
PAGE_ACTIVE = 0xFFFFFFFE
PAGE_FULL = 0xFFFFFFFC
PAGE_FREEING = 0xFFFFFFF8

MAX_KEY_LENGTH = 15
MAX_NAMESPACES = 254
MAX_STRING_SIZE = 4000  # bytes, terminating NUL included
MAX_BLOB_SIZE = 508000
KEYS_SIZE = 64  # eky (32 bytes) || tky (32 bytes)

TYPE_U8, TYPE_I8, TYPE_U16, TYPE_I16 = 0x01, 0x11, 0x02, 0x12
TYPE_U32, TYPE_I32, TYPE_U64, TYPE_I64 = 0x04, 0x14, 0x08, 0x18
TYPE_STRING = 0x21
TYPE_BLOB_V1 = 0x41
TYPE_BLOB_DATA = 0x42
TYPE_BLOB_INDEX = 0x48
CHUNK_ANY = 0xFF

_EMPTY, _WRITTEN, _ERASED = 0b11, 0b10, 0b00

# kind -> (type code, struct format of the value in the data field)
_PRIMITIVES: dict[str, tuple[int, str]] = {
    "u8": (TYPE_U8, "<B"), "i8": (TYPE_I8, "<b"),
    "u16": (TYPE_U16, "<H"), "i16": (TYPE_I16, "<h"),
    "u32": (TYPE_U32, "<I"), "i32": (TYPE_I32, "<i"),
    "u64": (TYPE_U64, "<Q"), "i64": (TYPE_I64, "<q"),
}
_KIND_OF_TYPE = {code: kind for kind, (code, _) in _PRIMITIVES.items()}
KINDS = (*_PRIMITIVES, "string", "blob")

Value = int | str | bytes


def crc32(data: bytes) -> int:
    """ESP-IDF's CRC32 (``esp_rom_crc32_le`` seeded with 0xFFFFFFFF)."""
    return zlib.crc32(data, 0xFFFFFFFF)


def _entry_crc(entry: bytes) -> int:
    return crc32(entry[0:4] + entry[8:32])


def _make_entry(ns: int, type_: int, span: int, chunk: int, key: str, data: bytes) -> bytes:
    entry = bytearray(struct.pack("<BBBBI16s8s", ns, type_, span, chunk, 0,
                                  key.encode("ascii"), data))
    struct.pack_into("<I", entry, 4, _entry_crc(entry))
    return bytes(entry)


def _payload_entries(payload: bytes) -> list[bytes]:
    """Split `payload` into 32-byte entries, the last one padded with FF."""
    return [payload[i:i + ENTRY_SIZE].ljust(ENTRY_SIZE, b"\xff")
            for i in range(0, len(payload), ENTRY_SIZE)]


def _entries_for(size: int) -> int:
    return (size + ENTRY_SIZE - 1) // ENTRY_SIZE


def _check_keys(keys: bytes) -> bytes:
    keys = bytes(keys)
    if len(keys) != KEYS_SIZE:
        raise StamplineError(f"NVS encryption keys must be {KEYS_SIZE} bytes, not {len(keys)}.")
    if keys[:32] == keys[32:]:
        raise StamplineError("the NVS encryption key and tweak key must differ.")
    return keys


def _xts(keys: bytes, offset: int, block: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(keys), modes.XTS(offset.to_bytes(16, "little")))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(block) + op.finalize()


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str):
        raise StamplineError(f"an NVS {what} must be a string, not {type(name).__name__}.")
    if not name or len(name) > MAX_KEY_LENGTH or not name.isascii() or "\x00" in name:
        raise StamplineError(
            f"NVS {what} '{name}' must be 1 to {MAX_KEY_LENGTH} ASCII characters.")


def _normalise(key: str, value: object, kind: str | None) -> tuple[str, Value]:
    """Check `value` against `kind` (inferred for str and bytes) and return both."""
    if isinstance(value, bool):
        raise StamplineError(
            f"NVS key '{key}': booleans are not stored; use 0 or 1 with kind 'u8'.")
    if kind is None:
        if isinstance(value, str):
            kind = "string"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            kind = "blob"
        elif isinstance(value, int):
            raise StamplineError(f"NVS key '{key}' holds an integer, which needs an explicit "
                                 "kind such as 'u8' or 'i32'.")
        else:
            raise StamplineError(
                f"NVS key '{key}' has a value of unsupported type {type(value).__name__}.")
    if kind in _PRIMITIVES:
        if not isinstance(value, int):
            raise StamplineError(f"NVS key '{key}' of kind '{kind}' needs an integer value.")
        try:
            struct.pack(_PRIMITIVES[kind][1], value)
        except struct.error:
            raise StamplineError(
                f"NVS key '{key}': {value} does not fit in kind '{kind}'.") from None
        return kind, value
    if kind == "string":
        if not isinstance(value, str):
            raise StamplineError(f"NVS key '{key}' of kind 'string' needs a str value.")
        if "\x00" in value:
            raise StamplineError(f"NVS key '{key}': a string cannot contain a NUL character.")
        size = len(value.encode("utf-8")) + 1
        if size > MAX_STRING_SIZE:
            raise StamplineError(
                f"NVS key '{key}': the string takes {size} bytes with its NUL; at most "
                f"{MAX_STRING_SIZE} fit.")
        return kind, value
    if kind == "blob":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise StamplineError(f"NVS key '{key}' of kind 'blob' needs a bytes value.")
        data = bytes(value)
        if len(data) > MAX_BLOB_SIZE:
            raise StamplineError(
                f"NVS key '{key}': the blob is {len(data)} bytes; at most {MAX_BLOB_SIZE} fit.")
        return kind, data
    raise StamplineError(f"unknown NVS kind '{kind}'; expected one of {', '.join(KINDS)}.")


class _Layout:
    """Places entries on pages the way esp_idf_nvs_partition_gen does."""

    def __init__(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.pages: list[list[bytes]] = [[]]

    @property
    def used(self) -> int:
        return len(self.pages[-1])

    def new_page(self) -> None:
        if len(self.pages) >= self.max_pages:
            raise StamplineError(
                f"the NVS data does not fit in {self.max_pages} pages (one more page is kept free "
                "for the firmware).")
        self.pages.append([])

    def primitive(self, entry: bytes) -> None:
        if self.used >= ENTRIES_PER_PAGE:
            self.new_page()
        self.pages[-1].append(entry)

    def string(self, ns: int, key: str, payload: bytes) -> None:
        span = 1 + _entries_for(len(payload))
        # The generator moves on unless one entry would remain spare; a fresh page always takes it.
        if self.used and self.used + span >= ENTRIES_PER_PAGE:
            self.new_page()
        header = struct.pack("<HHI", len(payload), 0xFFFF, crc32(payload))
        self.pages[-1] += [_make_entry(ns, TYPE_STRING, span, CHUNK_ANY, key, header),
                           *_payload_entries(payload)]

    def blob(self, ns: int, key: str, data: bytes) -> None:
        if self.used >= ENTRIES_PER_PAGE:
            self.new_page()
        offset, chunks = 0, 0
        while True:
            # Like the generator, a chunk fills whatever the page has left, even nothing.
            tailroom = (ENTRIES_PER_PAGE - self.used - 1) * ENTRY_SIZE
            piece = data[offset:offset + tailroom]
            offset += len(piece)
            header = struct.pack("<HHI", len(piece), 0xFFFF, crc32(piece))
            span = 1 + _entries_for(len(piece))
            self.pages[-1] += [_make_entry(ns, TYPE_BLOB_DATA, span, chunks, key, header),
                               *_payload_entries(piece)]
            chunks += 1
            if offset < len(data) or tailroom - len(piece) < ENTRY_SIZE:
                self.new_page()
            if offset >= len(data):
                break
        index = struct.pack("<IBBH", len(data), chunks, 0, 0xFFFF)
        self.pages[-1].append(_make_entry(ns, TYPE_BLOB_INDEX, 1, CHUNK_ANY, key, index))


@dataclass
class _Record:
    """One item found while parsing; `order` is its position in the log."""

    order: int
    kind: str
    value: Value


class NvsImage:
    """The key-value content of one NVS partition of `size` bytes, kept in insertion order."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size % PAGE_SIZE or size < 3 * PAGE_SIZE:
            raise StamplineError(
                f"an NVS partition must be a multiple of {PAGE_SIZE} bytes and at least "
                f"{3 * PAGE_SIZE}, not {size}.")
        self.size = size
        self._items: dict[tuple[str, str], tuple[str, Value]] = {}

    # -- editing ---------------------------------------------------------------------------

    def set(self, namespace: str, key: str, value: Value, kind: str | None = None) -> None:
        """Add or replace a key; ints need `kind`, str defaults to "string" and bytes to "blob"."""
        _check_name(namespace, "namespace")
        _check_name(key, "key")
        entry = _normalise(key, value, kind)
        namespaces = self.namespaces()
        if namespace not in namespaces and len(namespaces) >= MAX_NAMESPACES:
            raise StamplineError(f"an NVS partition holds at most {MAX_NAMESPACES} namespaces.")
        previous = self._items.get((namespace, key))
        self._items[(namespace, key)] = entry
        try:
            self._layout()
        except StamplineError:
            if previous is None:
                del self._items[(namespace, key)]
            else:
                self._items[(namespace, key)] = previous
            raise

    def delete(self, namespace: str, key: str) -> None:
        if (namespace, key) not in self._items:
            raise StamplineError(f"NVS namespace '{namespace}' has no key '{key}'.")
        del self._items[(namespace, key)]

    def get(self, namespace: str, key: str) -> Value:
        try:
            return self._items[(namespace, key)][1]
        except KeyError:
            raise StamplineError(f"NVS namespace '{namespace}' has no key '{key}'.") from None

    def items(self) -> dict[tuple[str, str], tuple[str, Value]]:
        """``{(namespace, key): (kind, value)}`` in insertion order."""
        return dict(self._items)

    def namespaces(self) -> list[str]:
        return list(dict.fromkeys(ns for ns, _ in self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    # -- writing ---------------------------------------------------------------------------

    def _layout(self) -> _Layout:
        layout = _Layout(self.size // PAGE_SIZE - 1)  # the last page stays free, as ESP-IDF needs
        indices: dict[str, int] = {}
        for (namespace, key), (kind, value) in self._items.items():
            if namespace not in indices:
                indices[namespace] = len(indices) + 1
                layout.primitive(_make_entry(0, TYPE_U8, 1, CHUNK_ANY, namespace,
                                             bytes([indices[namespace]]).ljust(8, b"\xff")))
            ns = indices[namespace]
            if kind in _PRIMITIVES:
                code, fmt = _PRIMITIVES[kind]
                data = struct.pack(fmt, value).ljust(8, b"\xff")
                layout.primitive(_make_entry(ns, code, 1, CHUNK_ANY, key, data))
            elif kind == "string":
                assert isinstance(value, str)
                layout.string(ns, key, value.encode("utf-8") + b"\x00")
            else:
                assert isinstance(value, bytes)
                layout.blob(ns, key, value)
        return layout

    def to_bytes(self, encryption_keys: bytes | None = None) -> bytes:
        """The whole partition image, encrypted with eky || tky when `encryption_keys` is given."""
        keys = _check_keys(encryption_keys) if encryption_keys is not None else None
        pages = self._layout().pages
        out = bytearray(b"\xff" * self.size)
        for number, entries in enumerate(pages):
            base = number * PAGE_SIZE
            state = PAGE_ACTIVE if number == len(pages) - 1 else PAGE_FULL
            header = bytearray(struct.pack("<II", state, number) + bytes([VERSION2]) + b"\xff" * 23)
            struct.pack_into("<I", header, 28, crc32(bytes(header[4:28])))
            bitmap = bytearray(b"\xff" * 32)
            for i in range(len(entries)):
                bitmap[i // 4] &= ~(1 << (i % 4 * 2)) & 0xFF
            out[base:base + FIRST_ENTRY_OFFSET] = header + bitmap
            for i, entry in enumerate(entries):
                at = base + FIRST_ENTRY_OFFSET + i * ENTRY_SIZE
                out[at:at + ENTRY_SIZE] = _xts(keys, at, entry, True) if keys else entry
        return bytes(out)

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, encryption_keys: bytes | None = None) -> NvsImage:
        """Read an image written by the generator, the firmware or `to_bytes`.

        Pages are read in sequence-number order (a later write of a key wins), blank pages and
        erased entries are skipped, and any bad CRC or inconsistent entry is refused.
        """
        image = cls(len(data))
        keys = _check_keys(encryption_keys) if encryption_keys is not None else None
        pages: dict[int, int] = {}  # sequence number -> page position
        for number in range(len(data) // PAGE_SIZE):
            base = number * PAGE_SIZE
            state, seq, version = struct.unpack_from("<IIB", data, base)
            if state == PAGE_UNINITIALIZED:
                continue
            if state not in (PAGE_ACTIVE, PAGE_FULL, PAGE_FREEING):
                raise StamplineError(f"NVS page {number} is marked corrupt (state {state:#010x}).")
            (stored,) = struct.unpack_from("<I", data, base + 28)
            if crc32(bytes(data[base + 4:base + 28])) != stored:
                raise StamplineError(f"NVS page {number} has a bad header CRC.")
            if version not in (VERSION1, VERSION2):
                raise StamplineError(f"NVS page {number} has unknown format version {version:#04x}.")
            if seq in pages:
                raise StamplineError(f"NVS pages {pages[seq]} and {number} share sequence number {seq}.")
            pages[seq] = number

        reader = _Reader(data, keys)
        for seq in sorted(pages):
            reader.read_page(pages[seq])
        for (ns, key), record in sorted(reader.resolve().items(), key=lambda kv: kv[1].order):
            if ns not in reader.namespaces:
                raise StamplineError(f"NVS key '{key}' uses namespace index {ns}, which is not defined.")
            image._items[(reader.namespaces[ns], key)] = (record.kind, record.value)
        return image


class _Reader:
    """Collects the items of the pages it is given, later pages overriding earlier ones."""

    def __init__(self, data: bytes, keys: bytes | None) -> None:
        self.data = data
        self.keys = keys
        self.order = 0
        self.namespaces: dict[int, str] = {}
        self.records: dict[tuple[int, str], _Record] = {}
        self.chunks: dict[tuple[int, str, int], bytes] = {}
        self.indexes: dict[tuple[int, str], tuple[int, int, int, int]] = {}

    def entry(self, page: int, index: int) -> bytes:
        at = page * PAGE_SIZE + FIRST_ENTRY_OFFSET + index * ENTRY_SIZE
        raw = bytes(self.data[at:at + ENTRY_SIZE])
        return _xts(self.keys, at, raw, False) if self.keys else raw

    def read_page(self, page: int) -> None:
        bitmap = self.data[page * PAGE_SIZE + 32:page * PAGE_SIZE + 64]
        index = 0
        while index < ENTRIES_PER_PAGE:
            state = (bitmap[index // 4] >> (index % 4 * 2)) & 0b11
            if state in (_EMPTY, _ERASED):
                index += 1
                continue
            if state != _WRITTEN:
                raise StamplineError(f"NVS page {page} entry {index} has an illegal state.")
            index += self.read_item(page, index)

    def record(self, ns: int, key: str, kind: str, value: Value) -> None:
        self.indexes.pop((ns, key), None)
        self.records[(ns, key)] = _Record(self.order, kind, value)

    def read_item(self, page: int, index: int) -> int:
        """Record the item whose header is at (page, index) and return its span."""
        where = f"NVS page {page} entry {index}"
        entry = self.entry(page, index)
        ns, type_, span, chunk = entry[0:4]
        if struct.unpack_from("<I", entry, 4)[0] != _entry_crc(entry):
            raise StamplineError(f"{where} has a bad CRC.")
        try:
            key = entry[8:24].split(b"\x00", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            raise StamplineError(f"{where} has a key that is not ASCII.") from None
        self.order += 1
        if type_ in (TYPE_STRING, TYPE_BLOB_V1, TYPE_BLOB_DATA):
            size, _, data_crc = struct.unpack_from("<HHI", entry, 24)
            if span != 1 + _entries_for(size) or index + span > ENTRIES_PER_PAGE:
                raise StamplineError(f"{where} has a span that does not match its size.")
            payload = b"".join(self.entry(page, index + i) for i in range(1, span))[:size]
            if crc32(payload) != data_crc:
                raise StamplineError(f"{where} has data that does not match its CRC.")
            if type_ == TYPE_BLOB_DATA:
                self.chunks[(ns, key, chunk)] = payload
            elif type_ == TYPE_BLOB_V1:
                self.record(ns, key, "blob", payload)
            else:
                if not payload.endswith(b"\x00"):
                    raise StamplineError(f"{where} holds a string without its terminating NUL.")
                try:
                    text = payload[:-1].decode("utf-8")
                except UnicodeDecodeError:
                    raise StamplineError(f"{where} holds a string that is not UTF-8.") from None
                self.record(ns, key, "string", text)
            return span
        if span != 1:
            raise StamplineError(f"{where} has a span of {span} for a fixed-size item.")
        if type_ == TYPE_BLOB_INDEX:
            size, count, start = struct.unpack_from("<IBB", entry, 24)
            self.records.pop((ns, key), None)
            self.indexes[(ns, key)] = (self.order, size, count, start)
        elif type_ in _KIND_OF_TYPE:
            kind = _KIND_OF_TYPE[type_]
            (value,) = struct.unpack_from(_PRIMITIVES[kind][1], entry, 24)
            if ns == 0:
                if kind != "u8" or value in (0, 0xFF):
                    raise StamplineError(f"{where} is not a valid namespace entry.")
                self.namespaces[value] = key
            else:
                self.record(ns, key, kind, value)
        else:
            raise StamplineError(f"{where} has unknown type {type_:#04x}.")
        return 1

    def resolve(self) -> dict[tuple[int, str], _Record]:
        """Join each v2 blob's chunks through its index entry."""
        records = dict(self.records)
        for (ns, key), (order, size, count, start) in self.indexes.items():
            parts = []
            for chunk in range(start, start + count):
                if (ns, key, chunk) not in self.chunks:
                    raise StamplineError(f"NVS blob '{key}' is missing its chunk {chunk}.")
                parts.append(self.chunks[(ns, key, chunk)])
            blob = b"".join(parts)
            if len(blob) != size:
                raise StamplineError(
                    f"NVS blob '{key}' has {len(blob)} bytes in its chunks but its index says {size}.")
            records[(ns, key)] = _Record(order, "blob", blob)
        return records


# -- the nvs_keys partition ------------------------------------------------------------------

def make_nvs_keys_partition(keys: bytes) -> bytes:
    """The 4096-byte nvs_keys image: eky, tky, CRC32 of both (u32 LE), FF to the end.

    The caller generates the keys (``secrets.token_bytes(64)``); the generator's own
    ``generate-key`` uses ``random`` and must not be used for real devices.
    """
    keys = _check_keys(keys)
    return keys + struct.pack("<I", crc32(keys)) + b"\xff" * (PAGE_SIZE - KEYS_SIZE - 4)


def parse_nvs_keys_partition(data: bytes) -> bytes:
    """The 64 bytes eky || tky held by an nvs_keys image, after checking its CRC."""
    if len(data) < KEYS_SIZE + 4:
        raise StamplineError(f"an nvs_keys partition holds at least {KEYS_SIZE + 4} bytes.")
    keys = bytes(data[:KEYS_SIZE])
    if keys == b"\xff" * KEYS_SIZE:
        raise StamplineError("the nvs_keys partition is empty.")
    if struct.unpack_from("<I", data, KEYS_SIZE)[0] != crc32(keys):
        raise StamplineError("the nvs_keys partition CRC does not match its keys.")
    return _check_keys(keys)
