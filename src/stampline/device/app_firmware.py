"""The product application (a stand-in): its half of the first boot, its answers on the line,
and OTA updates.

First boot, once the bootloader has enabled flash encryption: generate the NVS encryption keys
on the chip into ``nvs_keys`` (an encrypted partition), write the stamp — certificate, device
private key, serial, endpoint, everything in ``fctry`` — into the encrypted ``nvs`` partition,
check it reads back, erase the plaintext ``fctry``, and erase the manufacturing firmware so it
can never boot again. Each step is idempotent and checkpointed, like the bootloader's.

On the line the application answers only HELLO and STATUS; everything else is LOCKED.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Callable

from stampline.device.boot import SECTOR, BootHalted, verify_with_digests
from stampline.device.chip import ChipIdentity, Flash
from stampline.device.efuse import Efuses
from stampline.device.mfg_firmware import OWN_NAMESPACE
from stampline.device.flash_crypt import EncryptedFlash
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.firmware import image, otadata
from stampline.firmware.image import MFG_PROJECT
from stampline.firmware.nvs import NvsImage, make_nvs_keys_partition, parse_nvs_keys_partition
from stampline.firmware.partitions import AppSubtype, PartitionEntry, PartitionTable, PartitionType
from stampline.protocol import messages as m
from stampline.protocol.server import DeviceFault

NVS_SECONDS = 0.25  # generate keys, write and verify the encrypted NVS
ERASE_SECONDS_PER_SECTOR = 0.025

if TYPE_CHECKING:
    from stampline.device.cloud_client import CloudClient


class OtaRefused(StamplineError):
    """An OTA image the application will not install."""


class ApplicationFirmware:
    def __init__(self, identity: ChipIdentity, flash: Flash, view: Flash | EncryptedFlash, efuses: Efuses,
                 table: PartitionTable, running: PartitionEntry, timing: TimingModel,
                 checkpoint: Callable[[str], None] | None = None) -> None:
        self.identity = identity
        self.flash = flash  # raw
        self.view = view  # through flash encryption, where it is on
        self.efuses = efuses
        self.table = table
        self.running = running
        self.timing = timing
        self.checkpoint = checkpoint or (lambda name: None)
        self.phases: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def secured(self) -> bool:
        return self.efuses.flash_encryption_enabled() and self.efuses.secure_boot_enabled()

    def _spend(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        self.timing.sleep_boot(seconds)

    # -- first boot, application half ------------------------------------------------------------

    def start(self) -> dict[str, float]:
        """What the application does at every start; the first one secures the stamp."""
        if self.secured:
            keys = self._nvs_keys()
            self._move_stamp(keys)
            self._close_manufacturing()
        descriptor = image.read_app_descriptor(self.view.read(self.running.offset, self.running.size))
        if descriptor and self.efuses.secure_boot_enabled() and descriptor.secure_version > self.efuses.secure_version():
            self.checkpoint("anti_rollback")
            self.efuses.burn_secure_version(descriptor.secure_version)
        return self.phases

    def _nvs_keys(self) -> bytes:
        entry = self.table.find("nvs_keys")
        if self.view.read(entry.offset, entry.size) == b"\xff" * entry.size:
            self.checkpoint("nvs:keygen")
            keys = os.urandom(64)  # generated on the chip, never leave it
            self.flash.erase(entry.offset, entry.size)
            self.view.write(entry.offset, make_nvs_keys_partition(keys))
            self.flash.flush()
            self._spend("nvs", NVS_SECONDS / 2)
        return parse_nvs_keys_partition(self.view.read(entry.offset, entry.size))

    def _move_stamp(self, keys: bytes) -> None:
        plain, secure = self.table.find("fctry"), self.table.find("nvs")
        raw = self.flash.read(plain.offset, plain.size)
        if raw == b"\xff" * plain.size:
            return  # moved already (or never stamped)
        items = NvsImage.parse(raw).items()
        encrypted = NvsImage(secure.size)
        for (namespace, key), (kind, value) in items.items():
            encrypted.set(namespace, key, value, kind)
        self.checkpoint("nvs:write")
        self.flash.erase(secure.offset, secure.size)
        self.flash.write(secure.offset, encrypted.to_bytes(encryption_keys=keys))
        self.flash.flush()
        if NvsImage.parse(self.flash.read(secure.offset, secure.size), encryption_keys=keys).items() != items:
            raise BootHalted("the encrypted NVS does not read back as the stamp.")
        self._spend("nvs", NVS_SECONDS / 2)
        self.checkpoint("nvs:erase_plaintext")
        self.flash.erase(plain.offset, plain.size)
        self.flash.flush()
        self._spend("erase", ERASE_SECONDS_PER_SECTOR * plain.size // SECTOR)

    def _close_manufacturing(self) -> None:
        """Erase every copy of the manufacturing firmware: the station's protocol is gone for good."""
        for entry in self.table:
            if entry.type != PartitionType.APP or entry == self.running:
                continue
            descriptor = image.read_app_descriptor(self.view.read(entry.offset, entry.size))
            if descriptor is not None and descriptor.project_name == MFG_PROJECT:
                self.checkpoint(f"close:erase:{entry.label}")
                self.flash.erase(entry.offset, entry.size)
                self.flash.flush()
                self._spend("erase", ERASE_SECONDS_PER_SECTOR * entry.size // SECTOR)

    # -- what the application knows ----------------------------------------------------------------

    def stamp(self) -> dict[tuple[str, str], tuple[str, int | str | bytes]]:
        """The stamp as the application reads it (encrypted NVS once secured, else fctry)."""
        if self.secured:
            keys = parse_nvs_keys_partition(self.view.read(*self._span("nvs_keys")))
            return NvsImage.parse(self.flash.read(*self._span("nvs")), encryption_keys=keys).items()
        raw = self.flash.read(*self._span("fctry"))
        return {} if raw == b"\xff" * len(raw) else NvsImage.parse(raw).items()

    def _span(self, label: str) -> tuple[int, int]:
        entry = self.table.find(label)
        return entry.offset, entry.size

    def state(self) -> m.StateFlag:
        stamp = self.stamp()
        flags = m.StateFlag(0)
        if (OWN_NAMESPACE, "priv_key") in stamp:
            flags |= m.StateFlag.KEY_PRESENT
        if (OWN_NAMESPACE, "cert_loc") in stamp:
            flags |= m.StateFlag.CERT_PRESENT
        if stamp.get((OWN_NAMESPACE, "stamp_done"), ("", 0))[1] == 1:
            flags |= m.StateFlag.STAMP_DONE
        if self.efuses.secure_boot_enabled():
            flags |= m.StateFlag.SECURE_BOOT
        if self.efuses.flash_encryption_enabled():
            flags |= m.StateFlag.FLASH_ENCRYPTION
        if self.secured and self.efuses.download_mode_disabled():
            flags |= m.StateFlag.SECURED
        return flags

    def __call__(self, request: m.Request) -> m.Message:  # type: ignore[type-arg]
        with self._lock:
            if isinstance(request, m.Hello):
                descriptor = image.read_app_descriptor(self.view.read(self.running.offset, self.running.size))
                return m.HelloReply(chip_id=self.identity.chip_id, chip_model=self.identity.model,
                                    chip_rev=self.identity.revision, mfg_fw_version="",
                                    app_fw_version=descriptor.version if descriptor else "",
                                    max_payload=1024, state=self.state())
            if isinstance(request, m.Status):
                return m.StatusReply(state=self.state(), last_error=m.ErrorCode.LOCKED)
            raise DeviceFault(m.ErrorCode.LOCKED, "the application does not speak the manufacturing protocol")

    # -- the cloud ------------------------------------------------------------------------------------

    def connect_cloud(self, trust_pem: bytes) -> "CloudClient | None":
        """Connect to the endpoint of the stamp (reference layout: the certificate's namespace holds
        serial, endpoint and ca_cert); None when the device holds no complete stamp."""
        from stampline.device.cloud_client import CloudClient, tls_context

        stamp = self.stamp()
        location = stamp.get((OWN_NAMESPACE, "cert_loc"), ("", ""))[1]
        private = stamp.get((OWN_NAMESPACE, "priv_key"), ("", b""))[1]
        if not isinstance(location, str) or "/" not in location or not isinstance(private, bytes) or not private:
            return None
        namespace, cert_key = location.split("/", 1)
        values = {name: stamp.get((namespace, key), ("", None))[1]
                  for name, key in (("cert", cert_key), ("ca", "ca_cert"), ("serial", "serial"), ("endpoint", "endpoint"))}
        if not all(values.values()):
            return None
        context = tls_context(values["cert"], values["ca"], private, trust_pem)  # type: ignore[arg-type]
        return CloudClient(str(values["serial"]), str(values["endpoint"]), context).start()

    # -- OTA ----------------------------------------------------------------------------------------

    def ota_update(self, data: bytes) -> PartitionEntry:
        """Install a new application in the OTA slot not running and select it for the next boot."""
        with self._lock:
            descriptor = image.read_app_descriptor(data)
            if descriptor is None:
                raise OtaRefused("the OTA image is not an application image.")
            if self.efuses.secure_boot_enabled():
                try:
                    verify_with_digests(data, self.efuses.secure_boot_digests(), "OTA image")
                except BootHalted as exc:
                    raise OtaRefused(str(exc)) from None
                if descriptor.secure_version < self.efuses.secure_version():
                    raise OtaRefused(f"the OTA image has secure_version {descriptor.secure_version}, below the "
                                     f"anti-rollback eFuse ({self.efuses.secure_version()}): a downgrade.")
            slots = sorted((e for e in self.table if e.type == PartitionType.APP and e.subtype != AppSubtype.FACTORY),
                           key=lambda e: e.subtype)
            target = next((e for e in slots if e != self.running), None)
            if target is None or len(data) > target.size:
                raise OtaRefused("there is no OTA slot that can hold the image.")
            length = -(-len(data) // SECTOR) * SECTOR
            self.flash.erase(target.offset, length)
            self.view.write(target.offset, data + b"\xff" * (length - len(data)))
            ota = self.table.find("otadata")
            self.flash.write(ota.offset, otadata.select(self.flash.read(ota.offset, ota.size), slots.index(target),
                                                        len(slots)))
            self.flash.flush()
            return target
