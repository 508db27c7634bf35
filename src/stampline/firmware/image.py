"""ESP-IDF firmware images: build deterministic test images, parse and check real ones.

An ESP32-family image is a 24-byte header (8-byte common header + 16-byte extended header),
``segment count`` segments of ``load address u32 | length u32 | data``, zero padding up to a
one-byte XOR checksum that ends on a 16-byte boundary, and (if the extended header says so)
the SHA-256 of everything before it. An app's first segment is flash-mapped read-only data
that starts with the 256-byte ``esp_app_desc_t``; a second-stage bootloader's first segment is
DRAM starting with the 80-byte ``esp_bootloader_desc_t`` (ESP-IDF >= 5.3).

A Secure Boot V2 signature sector (4096 bytes, up to three 1216-byte blocks that start with
0xE7) follows the image at the next 4096-byte boundary. ESP-IDF builds apps with esptool's
``elf2image --secure-pad-v2``, which inserts a zero padding segment so that the image ends
exactly on an MMU page boundary; `pad_for_secure_boot_v2` does the same (bootloaders are only
padded with 0xFF to the sector, as ``espsecure sign-data`` would do).

The builders write images byte-identical to what esptool itself would save for the same
segments, so esptool and espsecure accept them; nothing here needs esptool at run time.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from stampline.errors import StamplineError

# esptool's IMAGE_CHIP_ID of each target (the extended header's chip_id field).
MFG_PROJECT = "stampline-mfg"  # the project name of the reference manufacturing firmware

CHIP_IDS: dict[str, int] = {
    "esp32": 0,
    "esp32s2": 2,
    "esp32c3": 5,
    "esp32s3": 9,
    "esp32c2": 12,
    "esp32c6": 13,
    "esp32h2": 16,
    "esp32p4": 18,
    "esp32c61": 20,
    "esp32c5": 23,
    "esp32h21": 25,
    "esp32h4": 28,
    "esp32e22": 31,
    "esp32s31": 32,
}
_CHIP_BY_ID = {chip_id: chip for chip, chip_id in CHIP_IDS.items()}

# Flash offset of the second-stage bootloader, for the chips the builders support.
BOOTLOADER_OFFSETS: dict[str, int] = {"esp32": 0x1000, "esp32s2": 0x1000, "esp32c3": 0x0, "esp32s3": 0x0,
                                      "esp32c6": 0x0}

IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
BOOTLOADER_DESC_MAGIC = 0x50
SIG_BLOCK_MAGIC = 0xE7
SIG_BLOCK_SIZE = 1216
MAX_SIG_BLOCKS = 3
SECTOR_SIZE = 4096
MMU_PAGE_SIZE = 0x10000
MAX_SEGMENTS = 16
#: The largest image file stampline reads: 16 MiB, the most flash an ESP32-family chip addresses
#: with 3-byte SPI addresses (no partition, hence no image, can be larger on such a flash).
MAX_IMAGE_BYTES = 16 * 1024 * 1024

_CHECKSUM_SEED = 0xEF
_WP_PIN_DISABLED = 0xEE
_SPI_MODE_DIO = 2
_COMMON_HEADER = struct.Struct("<BBBBI")          # magic, segments, spi mode, size/freq, entry
_EXTENDED_HEADER = struct.Struct("<BBBBHBHH4xB")  # wp pin, 3 drive bytes, chip id, revs, hash flag
_HEADER_SIZE = _COMMON_HEADER.size + _EXTENDED_HEADER.size
_SEGMENT_HEADER = struct.Struct("<II")
# esp_app_desc_t: magic, secure_version, reserv1[2], version, project_name, time, date, idf_ver,
# app_elf_sha256, min/max efuse block rev, mmu_page_size (log2), reserv3[3], reserv2[18].
_APP_DESC = struct.Struct("<II8x32s32s16s16s32s32sHHB3x72x")
# esp_bootloader_desc_t: magic_byte, reserved[3], version, idf_ver, date_time, reserved2[16].
_APP_DESC_PAGE_OFFSET = 0xB4
_BOOTLOADER_DESC = struct.Struct("<B3xI32s24s16x")
_DIGEST_SIZE = 32

_BUILD_DATE = "Jan  1 2025"  # fixed, so that builds are reproducible
_BUILD_TIME = "00:00:00"
_MAX_APP_PAYLOAD = 4 * 1024 * 1024
_MAX_BOOTLOADER_PAYLOAD = 24 * 1024
_MAX_RAM_SEGMENT = 16 * 1024


@dataclass(frozen=True)
class _Layout:
    """Where a chip maps flash and where images load (addresses as real ESP-IDF builds use)."""

    flash: tuple[tuple[int, int], ...]  # flash-mapped (cache) address ranges, end exclusive
    drom: int                           # page-aligned base of the app's read-only data
    irom: int                           # page-aligned base of the app's flash-mapped code
    app_dram: int
    app_iram: int
    boot_dram: int
    boot_iram: int
    flash_size_freq: int                # 2MB and the IDF default frequency
    min_rev_full: int
    max_rev_full: int
    max_efuse_blk_rev_full: int


_LAYOUTS: dict[str, _Layout] = {
    "esp32": _Layout(((0x3F400000, 0x3F800000), (0x400D0000, 0x40400000)), 0x3F400000, 0x400D0000,
                     0x3FFB0000, 0x40080000, 0x3FFF0030, 0x40078000, 0x10, 0, 399, 99),
    "esp32s2": _Layout(((0x3F000000, 0x3F3F0000), (0x40080000, 0x40B80000)), 0x3F000000, 0x40080000,
                       0x3FFC0000, 0x40024000, 0x3FFE6100, 0x4004C000, 0x10, 0, 199, 99),
    "esp32c3": _Layout(((0x3C000000, 0x3C800000), (0x42000000, 0x42800000)), 0x3C000000, 0x42000000,
                       0x3FC90000, 0x40380000, 0x3FCD5820, 0x403CC710, 0x1F, 3, 199, 99),
    "esp32s3": _Layout(((0x3C000000, 0x3E000000), (0x42000000, 0x44000000)), 0x3C000000, 0x42000000,
                       0x3FC90000, 0x40374000, 0x3FCE2810, 0x403C9700, 0x1F, 0, 99, 99),
    "esp32c6": _Layout(((0x42000000, 0x43000000),), 0x42000000, 0x42000000,
                       0x40810000, 0x40800000, 0x4086C410, 0x4086E610, 0x10, 0, 99, 99),
}


@dataclass(frozen=True)
class AppDescriptor:
    """esp_app_desc_t, the start of an app's first (flash-mapped data) segment."""

    magic: int
    secure_version: int
    version: str
    project_name: str
    time: str
    date: str
    idf_ver: str
    app_elf_sha256: bytes


@dataclass(frozen=True)
class BootloaderDescriptor:
    """esp_bootloader_desc_t, the start of a bootloader's first DRAM segment (ESP-IDF >= 5.3)."""

    magic: int
    version: int
    idf_ver: str
    date_time: str


@dataclass(frozen=True)
class ImageInfo:
    """What `parse_image` found; `bootloader` is set for a bootloader image with a descriptor."""

    chip: str
    entry: int
    segments: list[tuple[int, int]]  # (load address, length)
    hash_appended: bool
    image_length: int                # header through checksum and SHA-256, before padding/signature
    app: AppDescriptor | None
    signature_blocks: int            # Secure Boot V2 blocks after the image (magic only, not verified)
    sha256: bytes                    # of all the data given
    bootloader: BootloaderDescriptor | None = None


# ---------------------------------------------------------------------------------------------
# Building


def build_app_image(chip: str, project: str, version: str, secure_version: int = 0,
                    payload_size: int = 64 * 1024, seed: bytes = b"", idf_ver: str = "v5.3") -> bytes:
    """A valid ESP-IDF app image whose code and data are filler derived from (project, version, seed).

    Segments: DROM (app descriptor + data) at the start of the data bus, IROM on the next free
    MMU page at the address matching its file offset (as the bootloader requires), then the
    DRAM and IRAM segments in address order; the entry point is the start of IRAM.
    """
    layout = _layout(chip)
    fields = (_c_string(version, 32, "version"), _c_string(project, 32, "project name"),
              _c_string(idf_ver, 32, "idf_ver"))
    _check_int(secure_version, 0, 0xFFFFFFFF, "secure_version")
    _check_int(payload_size, 0, _MAX_APP_PAYLOAD, "payload_size")
    filler = _filler(b"app", (project, version, seed), payload_size)
    ram = min(_align_down(payload_size // 8, 4), _MAX_RAM_SEGMENT)
    drom_extra = _align_down(payload_size // 4, 4)
    irom_end = len(filler) - 2 * ram
    drom_filler, irom_data = filler[:drom_extra], filler[drom_extra:irom_end]
    dram_data, iram_data = filler[irom_end:irom_end + ram], filler[irom_end + ram:]

    elf_sha256 = hashlib.sha256(b"stampline-elf\0" + _encode_parts(chip, *fields, seed)
                                + secure_version.to_bytes(4, "little") + filler).digest()
    desc = _APP_DESC.pack(APP_DESC_MAGIC, secure_version, fields[0], fields[1], _BUILD_TIME.encode(),
                          _BUILD_DATE.encode(), fields[2], elf_sha256, 0, layout.max_efuse_blk_rev_full,
                          MMU_PAGE_SIZE.bit_length() - 1)
    drom_addr = layout.drom + _HEADER_SIZE + _SEGMENT_HEADER.size
    drom_data = _esp32_map_fix(chip, drom_addr, desc + drom_filler)
    # IROM data starts after DROM and its own segment header; give it the next unused page.
    irom_offset = _HEADER_SIZE + 2 * _SEGMENT_HEADER.size + len(drom_data)
    drom_pages = -(-(drom_addr - layout.drom + len(drom_data)) // MMU_PAGE_SIZE)
    irom_addr = layout.irom + drom_pages * MMU_PAGE_SIZE + irom_offset % MMU_PAGE_SIZE
    irom_data = _esp32_map_fix(chip, irom_addr, irom_data)
    segments = [(drom_addr, drom_data)]
    if irom_data:
        segments.append((irom_addr, irom_data))
    # RAM segments in address order, as esptool writes them.
    segments += sorted(s for s in ((layout.app_dram, dram_data), (layout.app_iram, iram_data)) if s[1])
    return _assemble(chip, layout, layout.app_iram, segments)


def build_bootloader_image(chip: str, version: str = "v5.3", payload_size: int = 16 * 1024, seed: bytes = b"",
                           *, project_version: int = 1) -> bytes:
    """A second-stage bootloader image: DRAM (esp_bootloader_desc_t + data) and IRAM segments.

    ``version`` is the ESP-IDF version recorded in the descriptor, ``project_version`` its
    numeric bootloader version (CONFIG_BOOTLOADER_PROJECT_VER).
    """
    layout = _layout(chip)
    idf_ver = _c_string(version, 32, "version")
    _check_int(payload_size, 0, _MAX_BOOTLOADER_PAYLOAD, "payload_size")
    _check_int(project_version, 0, 0xFFFFFFFF, "project_version")
    filler = _filler(b"bootloader", (chip, version, seed), payload_size)
    dram_extra = _align_down(payload_size // 4, 4)
    desc = _BOOTLOADER_DESC.pack(BOOTLOADER_DESC_MAGIC, project_version, idf_ver,
                                 f"{_BUILD_DATE} {_BUILD_TIME}".encode())
    segments = [(layout.boot_dram, desc + filler[:dram_extra])]
    if len(filler) > dram_extra:
        segments.append((layout.boot_iram, filler[dram_extra:]))
    return _assemble(chip, layout, layout.boot_iram, segments)


def pad_for_secure_boot_v2(image: bytes) -> bytes:
    """The image padded as ESP-IDF does before Secure Boot V2 signing.

    Apps get esptool's ``--secure-pad-v2``: a zero-filled padding segment (load address 0) before
    the checksum so that image + SHA-256 ends on an MMU page boundary and the signature sector
    lands on the next page; the checksum and SHA-256 are recomputed. Bootloaders (ESP-IDF never
    secure-pads them) are padded with 0xFF to the next 4096-byte sector, as espsecure would.
    """
    info = parse_image(image)
    if info.signature_blocks:
        raise StamplineError("The image is already signed; pad it before signing, not after.")
    if not info.hash_appended:
        raise StamplineError("Secure Boot V2 padding needs an image with an appended SHA-256.")
    tail = bytes(image[info.image_length:])
    if tail.strip(b"\xff"):
        raise StamplineError("The image is followed by data that is neither padding nor a signature.")
    body = bytes(image[:info.image_length])
    if info.app is None:
        return body + b"\xff" * (-len(body) % SECTOR_SIZE)
    page = _page_size(memoryview(body)[_HEADER_SIZE + _SEGMENT_HEADER.size:])
    if len(body) % page == 0:
        return body  # already padded
    if len(info.segments) >= MAX_SEGMENTS:
        raise StamplineError(f"The image already has {MAX_SEGMENTS} segments; no room for a padding segment.")
    segments_end = _HEADER_SIZE + sum(_SEGMENT_HEADER.size + length for _, length in info.segments)
    pad_len = (-(segments_end + _SEGMENT_HEADER.size) - 16 - _DIGEST_SIZE) % page
    # Zero padding leaves the XOR checksum unchanged; the header's segment count is not checksummed.
    checksum = body[segments_end | 15]
    out = bytearray(body[:segments_end])
    out[1] += 1
    out += _SEGMENT_HEADER.pack(0, pad_len) + bytes(pad_len)
    return _finish(out, checksum)


def _esp32_map_fix(chip: str, addr: int, data: bytes) -> bytes:
    """Zero-extend an ESP32 flash segment ending < 0x24 bytes past a page, as esptool does.

    Older ESP32 bootloaders do not map that last page; the segment's file offset and load address
    agree modulo the page size, so the address tells where the data ends in the file.
    """
    if chip != "esp32" or not data:
        return data
    over = (addr + len(data)) % MMU_PAGE_SIZE
    return data + bytes(0x24 - over) if over < 0x24 else data


def _assemble(chip: str, layout: _Layout, entry: int, segments: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(_COMMON_HEADER.pack(IMAGE_MAGIC, len(segments), _SPI_MODE_DIO, layout.flash_size_freq, entry))
    out += _EXTENDED_HEADER.pack(_WP_PIN_DISABLED, 0, 0, 0, CHIP_IDS[chip], layout.min_rev_full // 100,
                                 layout.min_rev_full, layout.max_rev_full, 1)
    checksum = _CHECKSUM_SEED
    for addr, data in segments:
        out += _SEGMENT_HEADER.pack(addr, len(data)) + data
        checksum ^= _xor(data)
    return _finish(out, checksum)


def _finish(out: bytearray, checksum: int) -> bytes:
    """Append zero padding, the checksum byte at the end of a 16-byte line, and the SHA-256."""
    out += bytes(15 - len(out) % 16) + bytes([checksum])
    out += hashlib.sha256(out).digest()
    return bytes(out)


def _layout(chip: str) -> _Layout:
    try:
        return _LAYOUTS[chip]
    except (KeyError, TypeError):
        raise StamplineError(f"Cannot build images for chip {chip!r}; supported: {', '.join(_LAYOUTS)}.") from None


def _filler(kind: bytes, parts: tuple[str | bytes, ...], size: int) -> bytes:
    """Deterministic pseudo-random bytes, ``size`` rounded down to a multiple of 4."""
    return hashlib.shake_256(b"stampline-filler\0" + kind + _encode_parts(*parts)).digest(_align_down(size, 4))


def _encode_parts(*parts: object) -> bytes:
    """Length-prefixed encoding, so that different inputs never give the same seed material."""
    out = bytearray()
    for part in parts:
        if isinstance(part, str):
            raw = part.encode()
        elif isinstance(part, (bytes, bytearray, memoryview)):
            raw = bytes(part)
        else:
            raise StamplineError(f"Expected text or bytes, got {type(part).__name__}.")
        out += len(raw).to_bytes(4, "little") + raw
    return bytes(out)


def _c_string(value: str, size: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise StamplineError(f"The {what} must be text, not {type(value).__name__}.")
    raw = value.encode()
    if len(raw) >= size or b"\0" in raw:
        raise StamplineError(f"The {what} {value!r} must be at most {size - 1} bytes without NUL characters.")
    return raw


def _check_int(value: int, low: int, high: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise StamplineError(f"The {what} must be an integer from {low} to {high}, not {value!r}.")


def _align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def _xor(data: bytes | memoryview) -> int:
    """XOR of all bytes, by folding one big integer in halves (fast for megabytes)."""
    value, width = int.from_bytes(data, "little"), len(data)
    while width > 1:
        half = (width + 1) // 2
        value = (value & ((1 << (8 * half)) - 1)) ^ (value >> (8 * half))
        width = half
    return value & 0xFF


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_image(data: bytes, expect_chip: str | None = None) -> ImageInfo:
    """Parse and check an image (optionally followed by padding and a signature sector).

    Checks the magic, the chip, segment count and lengths against the data, flash-mapped
    segment alignment, the checksum, the appended SHA-256 and the app descriptor magic.
    """
    view = memoryview(bytes(data))
    if not view or view[0] != IMAGE_MAGIC:
        magic = f"0x{view[0]:02x}" if view else "none, the data is empty"
        raise StamplineError(f"Not an ESP image (magic {magic}, expected 0xe9).")
    if len(view) < _HEADER_SIZE:
        raise StamplineError(f"The ESP image is truncated: {len(view)} bytes, shorter than its 24-byte header.")
    _, count, _, _, entry = _COMMON_HEADER.unpack_from(view, 0)
    *_, chip_id, _, _, _, hash_flag = _EXTENDED_HEADER.unpack_from(view, _COMMON_HEADER.size)
    chip = _CHIP_BY_ID.get(chip_id)
    if chip is None:
        raise StamplineError(f"The ESP image names an unknown chip id {chip_id}.")
    if expect_chip is not None:
        if expect_chip not in CHIP_IDS:
            raise StamplineError(f"Unknown chip {expect_chip!r}.")
        if chip != expect_chip:
            raise StamplineError(f"The image is for {chip}, not {expect_chip}.")
    if hash_flag not in (0, 1):
        raise StamplineError(f"The ESP image's hash_appended field is 0x{hash_flag:02x}, not 0 or 1.")
    if not 1 <= count <= MAX_SEGMENTS:
        raise StamplineError(f"The ESP image declares {count} segments; it must have 1 to {MAX_SEGMENTS}.")

    segments: list[tuple[int, int]] = []
    offsets: list[int] = []
    checksum = _CHECKSUM_SEED
    offset = _HEADER_SIZE
    for index in range(count):
        if offset + _SEGMENT_HEADER.size > len(view):
            raise StamplineError(f"The ESP image is truncated in the header of segment {index}.")
        addr, length = _SEGMENT_HEADER.unpack_from(view, offset)
        offset += _SEGMENT_HEADER.size
        if length % 4:
            raise StamplineError(f"Segment {index} of the ESP image has length {length}, not a multiple of 4.")
        if offset + length > len(view):
            raise StamplineError(f"The ESP image is truncated: segment {index} needs {length} bytes at "
                                 f"offset {offset}, only {len(view) - offset} remain.")
        checksum ^= _xor(view[offset:offset + length])
        segments.append((addr, length))
        offsets.append(offset)
        offset += length

    checksum_at = offset | 15
    if checksum_at >= len(view):
        raise StamplineError("The ESP image is truncated before its checksum.")
    if view[checksum_at] != checksum:
        raise StamplineError(f"The ESP image checksum is wrong (stored 0x{view[checksum_at]:02x}, "
                             f"computed 0x{checksum:02x}).")
    image_length = checksum_at + 1
    if hash_flag:
        if image_length + _DIGEST_SIZE > len(view):
            raise StamplineError("The ESP image is truncated in its appended SHA-256.")
        if hashlib.sha256(view[:image_length]).digest() != view[image_length:image_length + _DIGEST_SIZE]:
            raise StamplineError("The ESP image's appended SHA-256 hash does not match its contents.")
        image_length += _DIGEST_SIZE

    layout = _LAYOUTS.get(chip)
    first = view[offsets[0]:offsets[0] + segments[0][1]]
    first_is_flash = layout is not None and _in_flash(layout, segments[0][0])
    app = _parse_app_desc(first)
    if app is None and first_is_flash:
        raise StamplineError("The ESP image's first segment is flash-mapped data without an app descriptor "
                             "(magic 0xabcd5432 missing).")
    if layout is not None:
        page = _page_size(first) if app is not None else MMU_PAGE_SIZE
        for index, ((addr, _), data_offset) in enumerate(zip(segments, offsets)):
            if _in_flash(layout, addr) and addr % page != data_offset % page:
                raise StamplineError(f"Segment {index} of the ESP image loads at 0x{addr:08x} but its data is at "
                                     f"offset 0x{data_offset:x}; flash-mapped segments must match modulo the "
                                     f"MMU page size.")
    return ImageInfo(chip=chip, entry=entry, segments=segments, hash_appended=bool(hash_flag),
                     image_length=image_length, app=app, signature_blocks=_count_signature_blocks(view, image_length),
                     sha256=hashlib.sha256(view).digest(),
                     bootloader=None if app is not None else _parse_bootloader_desc(first))


def read_app_descriptor(partition_data: bytes) -> AppDescriptor | None:
    """The app descriptor of the image in a partition, or None if it is erased or holds no valid app.

    Never raises on bad contents: a device must survive a corrupt partition.
    """
    if not partition_data or partition_data[0] != IMAGE_MAGIC:
        return None
    try:
        return parse_image(partition_data).app
    except StamplineError:
        return None


def _in_flash(layout: _Layout, addr: int) -> bool:
    return any(start <= addr < end for start, end in layout.flash)


def _page_size(app_segment: memoryview) -> int:
    """The MMU page size an app descriptor records (esp_app_desc_t.mmu_page_size, log2), else 64 KB."""
    exponent = app_segment[_APP_DESC_PAGE_OFFSET]
    return 1 << exponent if 13 <= exponent <= 16 else MMU_PAGE_SIZE


def _parse_app_desc(segment: memoryview) -> AppDescriptor | None:
    if len(segment) < _APP_DESC.size:
        return None
    magic, secure_version, version, project, time, date, idf_ver, elf_sha256, *_ = _APP_DESC.unpack_from(segment)
    if magic != APP_DESC_MAGIC:
        return None
    return AppDescriptor(magic=magic, secure_version=secure_version, version=_text(version),
                         project_name=_text(project), time=_text(time), date=_text(date), idf_ver=_text(idf_ver),
                         app_elf_sha256=elf_sha256)


def _parse_bootloader_desc(segment: memoryview) -> BootloaderDescriptor | None:
    if len(segment) < _BOOTLOADER_DESC.size or segment[0] != BOOTLOADER_DESC_MAGIC:
        return None
    magic, version, idf_ver, date_time = _BOOTLOADER_DESC.unpack_from(segment)
    return BootloaderDescriptor(magic=magic, version=version, idf_ver=_text(idf_ver), date_time=_text(date_time))


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _count_signature_blocks(view: memoryview, image_length: int) -> int:
    """Blocks with the 0xE7 magic in the sector after the image; their contents are not checked here."""
    sector = image_length + (-image_length % SECTOR_SIZE)
    count = 0
    while (count < MAX_SIG_BLOCKS and sector + (count + 1) * SIG_BLOCK_SIZE <= len(view)
           and view[sector + count * SIG_BLOCK_SIZE] == SIG_BLOCK_MAGIC):
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Versions

_VERSION = re.compile(r"[vV]?([0-9]+(?:\.[0-9]+){0,3})(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b``.

    Semantic-versioning order: a leading "v" is ignored, missing components count as 0
    ("1.2" == "1.2.0"), a pre-release ("-rc1") sorts before its release and build metadata
    ("+build") is ignored.
    """
    ka, kb = _version_key(a), _version_key(b)
    return (ka > kb) - (ka < kb)


def _version_key(text: str) -> tuple[tuple[int, ...], tuple[int], tuple[tuple[int, int | str], ...]]:
    match = _VERSION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise StamplineError(f"{text!r} is not a version like 1.2.3 or v1.2.3-rc1.")
    core = tuple(int(part) for part in match[1].split("."))
    core += (0,) * (4 - len(core))
    pre = match[2]
    if pre is None:
        return core, (1,), ()  # a release sorts after all its pre-releases
    if "" in pre.split("."):
        raise StamplineError(f"{text!r} has an empty pre-release identifier.")
    # Numeric identifiers compare as numbers and before alphanumeric ones.
    ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return core, (0,), ids
