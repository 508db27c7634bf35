"""Power-on of the emulated chip: the ROM, the second-stage bootloader and, on the first boot
with the secure bootloader, the bootloader's half of the security enablement.

ROM: with secure boot enabled, the bootloader must carry a valid Secure Boot V2 signature by a
key whose digest is in eFuse; with flash encryption enabled, every read of an encrypted region
is decrypted with the key only the hardware can read.

Bootloader: a *signed* bootloader is the product's secure bootloader (Release configuration);
an unsigned one is the plain bootloader chip suppliers pre-flash. On its first boot the secure
bootloader verifies the app it is about to start with its own key, burns that key's digest and
SECURE_BOOT_EN, generates the flash encryption key on the chip, burns it read-protected,
encrypts bootloader, partition table, app images and nvs_keys in place (journaled sector by
sector, see ``journal``), burns SPI_BOOT_CRYPT_CNT and closes download mode and JTAG. Then, on
every boot, it selects the app (otadata, else factory), verifies its signature against the
eFuse digests and refuses a secure_version below the anti-rollback eFuse.

Every step is idempotent and named by a checkpoint: a power cut injected at any checkpoint
leaves a chip that the next boot finishes (docs/first-boot.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

from stampline.device.chip import ChipIdentity, Flash
from stampline.device.efuse import Efuses
from stampline.device.flash_crypt import EncryptedFlash, XTS_KEY_SIZES, decrypt, encrypt
from stampline.device.journal import ENCRYPTED, ENCRYPTING, SECTOR, Journal
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.firmware import image, otadata, secure_boot
from stampline.firmware.image import MFG_PROJECT
from stampline.firmware.partitions import (
    PARTITION_TABLE_OFFSET,
    TABLE_LENGTH,
    AppSubtype,
    PartitionEntry,
    PartitionTable,
    PartitionType,
    bootloader_offset,
    default_table,
)

FE_SECONDS_PER_SECTOR = 0.12  # read, erase, write 4 KiB encrypted, plus the journal: ~1 MB a minute
SB_VERIFY_SECONDS = 0.08  # RSA-3072 verification of one image
BOOT_SECONDS = 0.3


def default_journal_entries(chip: str) -> list[PartitionEntry]:
    """Where the journal lies in the reference layout (what a bootloader built for it knows)."""
    return [default_table(chip).find("fb_journal")]


class PowerCut(Exception):
    """The power went away at a checkpoint (injected by tests)."""


class BootHalted(StamplineError):
    """The chip refuses to boot (a real chip would reset and try again, for ever)."""


class Checkpoints:
    """Named points of the boot where a power cut can be injected: ``cut_at`` counts from 1."""

    def __init__(self, cut_at: int | None = None) -> None:
        self.cut_at = cut_at
        self.passed: list[str] = []

    def __call__(self, name: str) -> None:
        self.passed.append(name)
        if self.cut_at is not None and len(self.passed) == self.cut_at:
            raise PowerCut(name)


@dataclass
class BootResult:
    running: str  # "manufacturing" | "application"
    partition: PartitionEntry
    flash: Flash | EncryptedFlash  # the CPU's view of the flash
    table: PartitionTable
    first_boot: bool = False
    phases: dict[str, float] = field(default_factory=dict)  # modelled seconds per phase


def _round_up(value: int) -> int:
    return -(-value // SECTOR) * SECTOR


def _image_length(data: bytes) -> int | None:
    """Length of a valid ESP image in ``data``, its signature sector included; None if none."""
    try:
        info = image.parse_image(data)
    except StamplineError:
        return None
    length = _round_up(info.image_length)
    if info.signature_blocks:
        length = _round_up(length + 1)  # the signature sector follows the image, 4096-aligned
        for offset in range(length - SECTOR, len(data) - SECTOR + 1, SECTOR):
            if data[offset:offset + 1] == b"\xe7":
                return offset + SECTOR
    return length


def verify_with_digests(data: bytes, digests: list[bytes], what: str) -> secure_boot.SignatureBlock:
    """The chip's check: one signature block whose key digest is burnt in eFuse must verify."""
    for block in secure_boot.parse_signature_blocks(data):
        if block.key_digest in digests:
            try:
                return secure_boot.verify_image(data, block.public_key)
            except StamplineError as exc:
                raise BootHalted(f"the {what} signature does not verify: {exc}") from None
    raise BootHalted(f"the {what} is not signed by a key whose digest is in eFuse.")


class Boot:
    """One power-on. ``run`` returns what the chip ends up running, or raises BootHalted/PowerCut."""

    def __init__(self, identity: ChipIdentity, flash: Flash, efuses: Efuses, timing: TimingModel,
                 checkpoint: Callable[[str], None] | None = None) -> None:
        self.identity = identity
        self.chip = identity.model
        self.flash = flash
        self.efuses = efuses
        self.timing = timing
        self.checkpoint = checkpoint or (lambda name: None)
        self.phases: dict[str, float] = {}

    def _spend(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        self.timing.sleep_boot(seconds)

    # -- views of the flash ---------------------------------------------------------------------

    def _encrypted_regions(self, table: PartitionTable) -> list[tuple[int, int]]:
        """What the chip treats as encrypted: bootloader, partition table, apps, flagged partitions."""
        boot = bootloader_offset(self.chip)
        regions = [(boot, PARTITION_TABLE_OFFSET - boot), (PARTITION_TABLE_OFFSET, SECTOR)]
        regions += [(e.offset, e.size) for e in table if e.type == PartitionType.APP or e.encrypted]
        return regions

    def _view(self, table: PartitionTable | None) -> Flash | EncryptedFlash:
        if not self.efuses.flash_encryption_enabled():
            return self.flash
        key = self.efuses.read_flash_encryption_key_as_hardware()
        boot = bootloader_offset(self.chip)
        regions = [(boot, PARTITION_TABLE_OFFSET - boot), (PARTITION_TABLE_OFFSET, SECTOR)]
        return EncryptedFlash(self.flash, key, self.chip, self._encrypted_regions(table) if table else regions)

    # -- the boot -----------------------------------------------------------------------------

    def run(self) -> BootResult:
        self._spend("boot", BOOT_SECONDS)
        self.checkpoint("rom")
        boot_offset = bootloader_offset(self.chip)
        view = self._view(None)
        region = view.read(boot_offset, PARTITION_TABLE_OFFSET - boot_offset)
        length = _image_length(region)
        if length is None:
            raise BootHalted("the ROM finds no valid bootloader image.")
        bootloader = region[:length]
        if self.efuses.secure_boot_enabled():
            verify_with_digests(bootloader, self.efuses.secure_boot_digests(), "bootloader")
            self._spend("secure_boot", SB_VERIFY_SECONDS)
        table = self._partition_table(view)

        secure_loader = bool(secure_boot.parse_signature_blocks(bootloader))
        first_boot = secure_loader and not (self.efuses.secure_boot_enabled() and self.efuses.flash_encryption_enabled()
                                            and self.efuses.download_mode_disabled())
        app_entry = self._select_app(table, view)
        if first_boot:
            own_keys = [b.public_key for b in secure_boot.parse_signature_blocks(bootloader)]
            self._enable_secure_boot(own_keys, app_entry, view)
            self._enable_flash_encryption(table, boot_offset, bootloader)
            if not self.efuses.download_mode_disabled():
                self.checkpoint("close_manufacturing")
                self.efuses.close_manufacturing()
            view = self._view(table)
        elif self.efuses.flash_encryption_enabled():
            view = self._view(table)

        app = self._load_app(app_entry, view)
        if self.efuses.secure_boot_enabled():
            verify_with_digests(app, self.efuses.secure_boot_digests(), f"app in {app_entry.label}")
            self._spend("secure_boot", SB_VERIFY_SECONDS)
            descriptor = image.read_app_descriptor(app)
            assert descriptor is not None
            if descriptor.secure_version < self.efuses.secure_version():
                raise BootHalted(f"the app in {app_entry.label} has secure_version {descriptor.secure_version}, "
                                 f"below the anti-rollback eFuse ({self.efuses.secure_version()}).")
        descriptor = image.read_app_descriptor(app)
        assert descriptor is not None
        running = "manufacturing" if descriptor.project_name == MFG_PROJECT else "application"
        self.checkpoint(f"start:{running}")
        return BootResult(running, app_entry, view, table, first_boot, self.phases)

    def _partition_table(self, view: Flash | EncryptedFlash) -> PartitionTable:
        raw = view.read(PARTITION_TABLE_OFFSET, TABLE_LENGTH)
        try:
            return PartitionTable.parse(raw, self.flash.size)
        except StamplineError as exc:
            problem = exc
        # A first boot cut after the table was encrypted but before the eFuse burn: the journal
        # (at the reference layout's place) kept the plaintext table.
        if not self.efuses.flash_encryption_enabled() and self.efuses.flash_encryption_key_burnt():
            for candidate in (e for e in default_journal_entries(self.chip)):
                saved = Journal(self.flash, candidate).state().table
                if saved:
                    return PartitionTable.parse(saved, self.flash.size)
        raise BootHalted(f"the bootloader cannot read the partition table: {problem}")

    def _select_app(self, table: PartitionTable, view: Flash | EncryptedFlash) -> PartitionEntry:
        slots = sorted((e for e in table if e.type == PartitionType.APP and e.subtype != AppSubtype.FACTORY),
                       key=lambda e: e.subtype)
        ota = next((e for e in table if e.label == "otadata"), None)
        index = otadata.selected_ota_index(self.flash.read(ota.offset, ota.size), len(slots)) if ota else None
        if index is not None:
            return slots[index]
        factory = [e for e in table if e.type == PartitionType.APP and e.subtype == AppSubtype.FACTORY]
        if not factory:
            raise BootHalted("otadata selects no app and there is no factory app.")
        return factory[0]

    def _load_app(self, entry: PartitionEntry, view: Flash | EncryptedFlash) -> bytes:
        data = view.read(entry.offset, entry.size)
        length = _image_length(data)
        if length is None or image.read_app_descriptor(data) is None:
            raise BootHalted(f"the bootloader finds no valid app in {entry.label}.")
        return data[:length]

    # -- first boot, bootloader half -------------------------------------------------------------

    def _enable_secure_boot(self, own_keys: list[secure_boot.PublicKey], app_entry: PartitionEntry,
                            view: Flash | EncryptedFlash) -> None:
        if self.efuses.secure_boot_enabled():
            return
        app = self._load_app(app_entry, view)
        digests = [secure_boot.key_digest(k) for k in own_keys]
        verify_with_digests(app, digests, f"app in {app_entry.label}")  # before anything is burnt
        self._spend("secure_boot", SB_VERIFY_SECONDS)
        for slot, digest in enumerate(digests):
            if digest not in self.efuses.secure_boot_digests():
                self.checkpoint(f"secure_boot:burn_digest:{slot}")
                self.efuses.burn_secure_boot_digest(digest, slot)
        self.checkpoint("secure_boot:enable")
        self.efuses.enable_secure_boot()

    def _regions_to_encrypt(self, table: PartitionTable, boot_offset: int, bootloader: bytes) -> list[tuple[int, int]]:
        """Partition table, apps, encrypted data partitions — and the bootloader last.

        The ROM reads the bootloader raw until SPI_BOOT_CRYPT_CNT is burnt and decrypted after, so
        from the first encrypted write of the bootloader until that burn no bootloader is readable:
        a window no firmware can close on these chips. Encrypting the bootloader last, right
        before the burn, keeps it to a few sector writes (docs/first-boot.md)."""
        regions = [(PARTITION_TABLE_OFFSET, SECTOR)]
        for entry in table:
            if entry.type == PartitionType.APP:
                length = _image_length(self.flash.read(entry.offset, entry.size))
                if length:
                    regions.append((entry.offset, length))
            elif entry.encrypted:
                regions.append((entry.offset, entry.size))
        return regions + [(boot_offset, _round_up(len(bootloader)))]

    def _enable_flash_encryption(self, table: PartitionTable, boot_offset: int, bootloader: bytes) -> None:
        if self.efuses.flash_encryption_enabled():
            return
        if not self.efuses.flash_encryption_key_burnt():
            self.checkpoint("flash_encryption:keygen")
            self.efuses.burn_flash_encryption_key(os.urandom(XTS_KEY_SIZES[self.chip]))  # born on the chip
        key = self.efuses.read_flash_encryption_key_as_hardware()
        journal = Journal(self.flash, table.find("fb_journal"))
        state = journal.state()
        if state.phase != ENCRYPTED:
            # The list of regions is fixed in the journal when encryption starts: once a sector of
            # an app is encrypted its image no longer parses, so it could not be listed again.
            if state.phase == ENCRYPTING:
                regions, resume_at = state.regions, state.address
            else:
                regions, resume_at = tuple(self._regions_to_encrypt(table, boot_offset, bootloader)), None
            self._table_bytes = table.to_bytes()
            sectors = [s for start, size in regions for s in range(start, start + size, SECTOR)]
            for sector in sectors:
                if resume_at is not None:
                    if sector != resume_at:
                        continue  # encrypted before the cut
                    resume_at = None
                    if self._finish_interrupted(sector, state.sha256, journal, key):
                        continue
                self._encrypt_sector(sector, key, journal, regions)
            self.checkpoint("flash_encryption:encrypted")
            journal.save(ENCRYPTED)
        self.checkpoint("flash_encryption:enable")
        self.efuses.set_flash_crypt_count()
        journal.clear()

    def _encrypt_sector(self, sector: int, key: bytes, journal: Journal, regions: tuple[tuple[int, int], ...]) -> None:
        plain = self.flash.read(sector, SECTOR)
        self.checkpoint(f"flash_encryption:sector:{sector:#x}:scratch")
        journal.save_scratch(plain)
        self.checkpoint(f"flash_encryption:sector:{sector:#x}:journal")
        journal.save(ENCRYPTING, sector, hashlib.sha256(plain).digest(), regions, self._table_bytes)
        self.checkpoint(f"flash_encryption:sector:{sector:#x}:erase")
        self.flash.erase(sector, SECTOR)
        self.flash.flush()
        self.checkpoint(f"flash_encryption:sector:{sector:#x}:write")  # a cut here leaves it erased
        self.flash.write(sector, encrypt(key, sector, plain, self.chip))
        self.flash.flush()
        self._spend("flash_encryption", FE_SECONDS_PER_SECTOR)

    def _finish_interrupted(self, sector: int, plain_sha: bytes, journal: Journal, key: bytes) -> bool:
        """The sector being encrypted when the power went: True if it was done already."""
        raw = self.flash.read(sector, SECTOR)
        if hashlib.sha256(raw).digest() == plain_sha:
            return False  # still plaintext: encrypt it now
        if hashlib.sha256(decrypt(key, sector, raw, self.chip)).digest() == plain_sha:
            return True  # the encrypted write landed
        saved = journal.scratch()
        if hashlib.sha256(saved).digest() != plain_sha:
            raise BootHalted(f"the first-boot journal cannot restore the sector at {sector:#x}.")
        self.flash.erase(sector, SECTOR)
        self.flash.write(sector, saved)  # torn: put the plaintext back, then encrypt it
        return False
