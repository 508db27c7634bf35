"""The chip's eFuses: espefuse's virtual eFuse file, and the burns a first boot makes.

``<device dir>/efuse.bin`` is espefuse's own virtual eFuse file
(``espefuse --chip esp32c3 --virt --path-efuse-file efuse.bin summary`` reads it), and every burn
goes through espefuse's Python API in-process, so the semantics are espefuse's: a bit once set never
clears, a write-protected field takes no new bits, a read-protected key block reads back as zeros.

Read protection is where an emulator must step outside espefuse. On silicon the bits of a
read-protected key block still reach the AES-XTS engine over a private path; espefuse's emulator
zeroes them in the file. So a flash encryption key is also written, just before it is burnt, to
``efuse-hw.json`` beside the eFuse file: the emulator's stand-in for that private path, read only
by `Efuses.read_flash_encryption_key_as_hardware` (the flash encryption engine). Nothing playing
software, the station or an attacker may read it.

What follows ESP-IDF's bootloader (Secure Boot V2 + flash encryption in Release mode):

- `Efuses.burn_secure_boot_digest`: the first free key block (from BLOCK_KEY0), purpose
  SECURE_BOOT_DIGESTn, block and purpose write-protected, block left readable.
- `Efuses.enable_secure_boot`: SECURE_BOOT_EN, and SECURE_BOOT_KEY_REVOKEn for every slot
  without a digest ("Revoking empty key digest slot"); SECURE_BOOT_AGGRESSIVE_REVOKE stays off.
- `Efuses.burn_flash_encryption_key`: XTS_AES_128_KEY (32 bytes) or, on the ESP32-S3,
  XTS_AES_256_KEY_1 + XTS_AES_256_KEY_2 (64 bytes) in the first free blocks other than BLOCK_KEY5
  (KEY_PURPOSE_5 cannot hold an XTS key); read- and write-protected; espefuse stores the bytes
  reversed, as the AES-XTS peripheral wants them.
- `Efuses.set_flash_crypt_count`: the lowest clear bit of SPI_BOOT_CRYPT_CNT (0b001 on a new chip).
- `Efuses.close_manufacturing`: the rest of the Release configuration, which ESP-IDF burns with
  SECURE_BOOT_EN and SPI_BOOT_CRYPT_CNT and stampline defers so the manufacturing door stays open
  until the stamp is complete: DIS_DOWNLOAD_MANUAL_ENCRYPT, DIS_DOWNLOAD_ICACHE (and
  DIS_DOWNLOAD_DCACHE on the S3), DIS_PAD_JTAG (HARD_DIS_JTAG in ESP-IDF's S3 table), DIS_USB_JTAG,
  SOFT_DIS_JTAG = 0b111, DIS_DIRECT_BOOT; write protection of SPI_BOOT_CRYPT_CNT, DIS_ICACHE (the
  WR_DIS bit shared by the DIS_* and JTAG fields) and RD_DIS (so no one can read-protect the
  digests later); then ENABLE_SECURITY_DOWNLOAD (ESP-IDF's default for Release) or DIS_DOWNLOAD_MODE.
  SECURE_VERSION shares its WR_DIS bit with DIS_DOWNLOAD_MODE, so that bit is never burnt and
  anti-rollback can still advance.
- `Efuses.burn_secure_version`: SECURE_VERSION counts set bits (esp_efuse_read_secure_version).

Every burn is safe to repeat for a resumable first boot: burning what is already burnt is a no-op,
burning something else where a value is burnt is refused with a `StamplineError`.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stampline import private
from stampline.device.flash_crypt import XTS_KEY_SIZES, check_key
from stampline.errors import StamplineError
from stampline.files import KiB, read_bounded

if TYPE_CHECKING:
    from espefuse import BaseCommands

DIGEST_SIZE = 32
DIGEST_SLOTS = 3
SECURE_VERSION_MAX = 16
EFUSE_FILE_SIZE = 512  # espefuse's virtual memory for both chips
XTS_PURPOSES = {32: ("XTS_AES_128_KEY",), 64: ("XTS_AES_256_KEY_1", "XTS_AES_256_KEY_2")}
_NO_XTS_BLOCK = "BLOCK_KEY5"
_DOWNLOAD_CACHE = {"esp32c3": ("DIS_DOWNLOAD_ICACHE",), "esp32s3": ("DIS_DOWNLOAD_ICACHE", "DIS_DOWNLOAD_DCACHE")}
_JTAG = {"DIS_PAD_JTAG": 1, "DIS_USB_JTAG": 1, "SOFT_DIS_JTAG": 0b111}
_RELEASE_WRITE_PROTECT = ("SPI_BOOT_CRYPT_CNT", "DIS_ICACHE", "RD_DIS")

DownloadMode = Literal["enabled", "secure", "disabled"]

# espefuse reports through esptool's process-wide logger, which each call silences for a moment.
_espefuse_lock = threading.Lock()


@dataclass(frozen=True)
class KeyBlock:
    """A key block (BLOCK_KEY0..5) as espefuse reads it: a read-protected block reads as zeros."""

    name: str
    purpose: str
    value: bytes
    readable: bool
    writeable: bool


class Efuses:
    """The eFuses of one emulated chip (esp32c3 or esp32s3), in ``path`` (created blank on first use)."""

    def __init__(self, chip: str, path: Path) -> None:
        if chip not in XTS_KEY_SIZES:
            raise StamplineError(f"The emulator models the eFuses of {', '.join(XTS_KEY_SIZES)}, not '{chip}'.")
        self.chip = chip
        self.path = Path(path)
        self.hardware_path = self.path.with_name(self.path.stem + "-hw.json")
        self._commands: BaseCommands | None = None
        self._seen: bytes | None = None

    # ------------------------------------------------------------------ reads

    def summary(self) -> str:
        """espefuse's ``summary`` table, as the command line prints it after its banner."""
        with self._espefuse() as commands:
            sink = _Sink()
            commands.summary(file=sink)
            return sink.getvalue()

    def summary_json(self) -> dict[str, Any]:
        """espefuse's ``summary --format json``: every field with value, protection and location."""
        with self._espefuse() as commands:
            sink = _Sink()
            commands.summary(format="json", file=sink)
            return json.loads(sink.getvalue())

    def key_blocks(self) -> list[KeyBlock]:
        with self._espefuse() as commands:
            return _key_blocks(commands)

    def secure_boot_enabled(self) -> bool:
        return bool(self._field("SECURE_BOOT_EN"))

    def secure_boot_digests(self) -> list[bytes]:
        """The digests the ROM trusts: burnt and not revoked, in slot order."""
        with self._espefuse() as commands:
            digests = {block.purpose: block.value for block in _key_blocks(commands)}
            return [digests[f"SECURE_BOOT_DIGEST{slot}"] for slot in range(DIGEST_SLOTS)
                    if f"SECURE_BOOT_DIGEST{slot}" in digests
                    and not commands.efuses[f"SECURE_BOOT_KEY_REVOKE{slot}"].get_raw()]

    def flash_encryption_enabled(self) -> bool:
        """SPI_BOOT_CRYPT_CNT has an odd number of bits set."""
        return int(self._field("SPI_BOOT_CRYPT_CNT")).bit_count() % 2 == 1

    def flash_encryption_key_burnt(self) -> bool:
        with self._espefuse() as commands:
            return bool(_xts_blocks(commands))

    def flash_encryption_key_read_protected(self) -> bool:
        with self._espefuse() as commands:
            blocks = _xts_blocks(commands)
            return bool(blocks) and not any(block.readable for block in blocks)

    def secure_version(self) -> int:
        return int(self._field("SECURE_VERSION")).bit_count()

    def download_mode(self) -> DownloadMode:
        with self._espefuse() as commands:
            if commands.efuses["DIS_DOWNLOAD_MODE"].get_raw():
                return "disabled"
            return "secure" if commands.efuses["ENABLE_SECURITY_DOWNLOAD"].get_raw() else "enabled"

    def download_mode_disabled(self) -> bool:
        """The full ROM download mode is closed: disabled, or restricted to Secure Download Mode."""
        return self.download_mode() != "enabled"

    def jtag_disabled(self) -> bool:
        with self._espefuse() as commands:
            return all(commands.efuses[name].get_raw() for name in ("DIS_PAD_JTAG", "DIS_USB_JTAG"))

    def read_flash_encryption_key_as_hardware(self) -> bytes:
        """The flash encryption key as the AES-XTS engine uses it, in key-file order.

        This is the emulator's hardware path, not something software can do: a read-protected
        block comes from ``efuse-hw.json`` (see the module docstring), a readable one from espefuse.
        """
        with self._espefuse() as commands:
            blocks = _xts_blocks(commands)
        if not blocks:
            raise StamplineError("No flash encryption key is burnt in the chip's eFuses.")
        hidden = self._load_hidden()
        key = b""
        for block in blocks:
            held = block.value if block.readable else bytes.fromhex(hidden.get(block.name, ""))
            if len(held) != 32:
                raise StamplineError(f"The emulated chip has lost the hardware copy of its key block {block.name}.")
            key += held[::-1]  # espefuse burns XTS keys byte-reversed
        return key

    # ------------------------------------------------------------------ burns

    def burn_secure_boot_digest(self, digest: bytes, slot: int = 0) -> None:
        """Burn a Secure Boot V2 public key digest; the same digest again is a no-op."""
        if len(digest) != DIGEST_SIZE:
            raise StamplineError(f"A secure boot key digest is {DIGEST_SIZE} bytes, not {len(digest)}.")
        if slot not in range(DIGEST_SLOTS):
            raise StamplineError(f"Secure boot digest slots are 0 to {DIGEST_SLOTS - 1}, not {slot}.")
        purpose = f"SECURE_BOOT_DIGEST{slot}"
        with self._espefuse() as commands:
            burnt = [block for block in _key_blocks(commands) if block.purpose == purpose]
            if burnt:
                if burnt[0].value == digest:
                    return
                raise StamplineError(f"Secure boot digest slot {slot} already holds a different digest.")
            if commands.efuses[f"SECURE_BOOT_KEY_REVOKE{slot}"].get_raw():
                raise StamplineError(f"Secure boot digest slot {slot} is revoked.")
            block = _free_key_blocks(commands, 1, xts=False)[0]
            commands.burn_key([block], [io.BytesIO(digest)], [purpose])

    def enable_secure_boot(self) -> None:
        """SECURE_BOOT_EN, and revoke the digest slots left empty (as ESP-IDF's bootloader does)."""
        with self._espefuse() as commands:
            purposes = {block.purpose for block in _key_blocks(commands)}
            used = [slot for slot in range(DIGEST_SLOTS) if f"SECURE_BOOT_DIGEST{slot}" in purposes]
            if not used:
                raise StamplineError("No secure boot digest is burnt; burn one before enabling secure boot.")
            fuses = {"SECURE_BOOT_EN": 1}
            fuses.update({f"SECURE_BOOT_KEY_REVOKE{slot}": 1 for slot in range(DIGEST_SLOTS) if slot not in used})
            _burn(commands, fuses)

    def burn_flash_encryption_key(self, key: bytes) -> None:
        """Burn the flash encryption key, read- and write-protected; refused if one is burnt."""
        check_key(key, self.chip)
        purposes = XTS_PURPOSES[len(key)]
        halves = [key[start:start + 32] for start in range(0, len(key), 32)]
        with self._espefuse() as commands:
            if _xts_blocks(commands):
                raise StamplineError("A flash encryption key is already burnt; eFuse key blocks are write-once.")
            blocks = _free_key_blocks(commands, len(purposes), xts=True)
            # Write-ahead: the hardware copy exists before the bits are burnt (and zeroed in efuse.bin).
            self._save_hidden({block: half[::-1] for block, half in zip(blocks, halves)})
            commands.burn_key(blocks, [io.BytesIO(half) for half in halves], list(purposes))

    def set_flash_crypt_count(self) -> None:
        """Enable flash encryption: set the lowest clear bit of SPI_BOOT_CRYPT_CNT (no-op when enabled)."""
        with self._espefuse() as commands:
            count = int(commands.efuses["SPI_BOOT_CRYPT_CNT"].get_raw())
            if count.bit_count() % 2 == 1:
                return
            if not _xts_blocks(commands):
                raise StamplineError("No flash encryption key is burnt; burn one before enabling flash encryption.")
            _burn(commands, {"SPI_BOOT_CRYPT_CNT": count | (~count & (count + 1))})

    def close_manufacturing(self, download_mode: Literal["secure", "disabled"] = "secure") -> None:
        """Burn the Release configuration listed in the module docstring (download mode last)."""
        if download_mode not in ("secure", "disabled"):
            raise StamplineError(f"The download mode is closed to 'secure' or 'disabled', not '{download_mode}'.")
        fuses = {"DIS_DOWNLOAD_MANUAL_ENCRYPT": 1, **{name: 1 for name in _DOWNLOAD_CACHE[self.chip]},
                 **_JTAG, "DIS_DIRECT_BOOT": 1}
        with self._espefuse() as commands:
            if int(commands.efuses["SPI_BOOT_CRYPT_CNT"].get_raw()).bit_count() % 2 == 0:
                raise StamplineError("Flash encryption is not enabled; locking SPI_BOOT_CRYPT_CNT would keep it off.")
            if download_mode == "disabled":
                fuses["DIS_DOWNLOAD_MODE"] = 1
            elif not commands.efuses["DIS_DOWNLOAD_MODE"].get_raw():
                fuses["ENABLE_SECURITY_DOWNLOAD"] = 1
            _burn(commands, fuses, write_protect=_RELEASE_WRITE_PROTECT)

    def burn_secure_version(self, version: int) -> None:
        """Raise the anti-rollback version to ``version`` (no-op if equal, refused if lower)."""
        if not 0 <= version <= SECURE_VERSION_MAX:
            raise StamplineError(f"The secure version is 0 to {SECURE_VERSION_MAX}, not {version}.")
        with self._espefuse() as commands:
            bits = int(commands.efuses["SECURE_VERSION"].get_raw())
            if version < bits.bit_count():
                raise StamplineError(f"Secure version {version} is below the chip's anti-rollback version "
                                     f"{bits.bit_count()}.")
            while bits.bit_count() < version:
                bits |= ~bits & (bits + 1)
            _burn(commands, {"SECURE_VERSION": bits})

    # ------------------------------------------------------------------ espefuse

    def _field(self, name: str) -> Any:
        with self._espefuse() as commands:
            return commands.efuses[name].get_raw()

    @contextmanager
    def _espefuse(self) -> Iterator[BaseCommands]:
        """espefuse's commands on the file, loaded once (~0.1 s of YAML) and again only if the file
        changed behind our back; dropped after any failure, since a refused burn leaves it dirty."""
        import esptool  # imported here: esptool costs ~0.1 s to import

        with _espefuse_lock, _quiet():
            current = self._read_file()
            if self._commands is None or current != self._seen:
                self._commands = self._load()
            try:
                yield self._commands
            except StamplineError:
                raise
            except esptool.FatalError as error:
                self._commands = None
                reason = " ".join(str(error).split()).rstrip(".")
                raise StamplineError(f"espefuse refused the burn: {reason}.") from None
            except BaseException:
                self._commands = None
                raise
            finally:
                self._seen = self._read_file()

    def _load(self) -> BaseCommands:
        import espefuse

        if not self.path.parent.is_dir():
            raise StamplineError(f"The device directory {self.path.parent} does not exist.")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size not in (0, EFUSE_FILE_SIZE):
            # espefuse would silently start a blank chip over a file it cannot read.
            raise StamplineError(f"{self.path} is not a {EFUSE_FILE_SIZE}-byte virtual eFuse file.")
        private.create_file(self.path)  # 0600: espefuse would make it 0644 (it holds the XTS key)
        commands = espefuse.init_commands(chip=self.chip, virt=True, virt_efuse_file=str(self.path),
                                          do_not_confirm=True)
        commands.efuses.postpone = True  # as the command line: protection and door bits burn last
        return commands

    def _read_file(self) -> bytes | None:
        return read_bounded(self.path, EFUSE_FILE_SIZE, "virtual eFuse file") if self.path.exists() else None

    def _load_hidden(self) -> dict[str, str]:
        if not self.hardware_path.exists():
            return {}
        try:  # a few keys of at most 32 bytes, in hex
            return json.loads(read_bounded(self.hardware_path, 4 * KiB, "hardware key file"))
        except ValueError:
            raise StamplineError(f"{self.hardware_path} is not the emulator's hardware key file.") from None

    def _save_hidden(self, blocks: dict[str, bytes]) -> None:
        hidden = {**self._load_hidden(), **{name: value.hex() for name, value in blocks.items()}}
        temporary = self.hardware_path.with_name(self.hardware_path.name + ".tmp")
        with open(temporary, "w", opener=private.opener) as file:
            json.dump(hidden, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.hardware_path)


class _Sink(io.StringIO):
    """Where espefuse's summary writes: it wants a named file and closes it when done."""

    name = "<summary>"

    def close(self) -> None:
        pass


@contextmanager
def _quiet() -> Iterator[None]:
    from esptool.logger import log

    previous = log._verbosity  # esp-pylib has no getter; restored for other esptool users
    log.set_verbosity("silent")
    try:
        yield
    finally:
        log.set_verbosity(previous)


def _key_blocks(commands: BaseCommands) -> list[KeyBlock]:
    efuses = commands.efuses
    blocks = []
    for block in efuses.blocks:
        if block.key_purpose_name is None:
            continue
        field = efuses[block.name]
        blocks.append(KeyBlock(block.name, str(efuses[block.key_purpose_name].get()),
                               field.get_bitstring().bytes[::-1], field.is_readable(), field.is_writeable()))
    return blocks


def _xts_blocks(commands: BaseCommands) -> list[KeyBlock]:
    """The flash encryption key blocks, in key order (XTS_AES_256_KEY_1 before _2)."""
    blocks = sorted((block for block in _key_blocks(commands) if block.purpose.startswith("XTS_AES")),
                    key=lambda block: block.purpose)
    if blocks and tuple(block.purpose for block in blocks) not in XTS_PURPOSES.values():
        raise StamplineError("The chip's flash encryption key blocks are inconsistent: "
                             f"{', '.join(block.purpose for block in blocks)}.")
    return blocks


def _free_key_blocks(commands: BaseCommands, count: int, xts: bool) -> list[str]:
    """The first ``count`` unused key blocks, in the order esp_efuse_find_unused_key_block picks them."""
    efuses = commands.efuses
    free = []
    for block in efuses.blocks:
        if block.key_purpose_name is None or (xts and block.name == _NO_XTS_BLOCK):
            continue
        key, purpose = efuses[block.name], efuses[block.key_purpose_name]
        if (purpose.get() == "USER" and purpose.is_writeable() and key.is_readable() and key.is_writeable()
                and not key.get_bitstring().any(True)):
            free.append(block.name)
    if len(free) < count:
        raise StamplineError(f"The chip has {len(free)} free eFuse key blocks; this key needs {count}.")
    return free[:count]


def _burn(commands: BaseCommands, fuses: dict[str, int], write_protect: Iterable[str] = ()) -> None:
    """Burn the fields not yet at their value and write-protect the ones not yet protected, in one batch."""
    efuses = commands.efuses
    fuses = {name: value for name, value in fuses.items() if int(efuses[name].get_raw()) != value}
    protect = [name for name in write_protect if efuses[name].is_writeable()]
    if not fuses and not protect:
        return
    commands.use_batch_mode()
    if fuses:
        commands.burn_efuse(fuses)
    if protect:
        commands.write_protect_efuse(protect)
    commands.burn_all()
