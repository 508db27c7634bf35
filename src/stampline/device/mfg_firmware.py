"""The reference manufacturing firmware: what runs from the ``factory`` partition on the line.

It answers the station's protocol requests. The device key pair is generated here and its
private half is kept in the device's own NVS (namespace ``device``): it is never put in a reply.
The stamp (certificate, serial, endpoint, ...) is written into the plaintext ``fctry`` NVS
partition where the station asks; the first boot (a later stage) moves it to encrypted NVS.

Real firmware does the same with mbedTLS and ESP-IDF's NVS API; this module is its specification.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from stampline.device.chip import ChipIdentity, Flash
from stampline.device.timing import CSR_SIGN_SECONDS, FLASH_ERASE_SECONDS_PER_SECTOR, NVS_WRITE_SECONDS, TimingModel
from stampline.errors import StamplineError
from stampline.firmware import image, otadata
from stampline.firmware.nvs import NvsImage
from stampline.firmware.partitions import (
    PARTITION_TABLE_OFFSET,
    TABLE_LENGTH,
    AppSubtype,
    PartitionEntry,
    PartitionTable,
    PartitionType,
    bootloader_offset,
)
from stampline.protocol import messages as m
from stampline.protocol.server import DeviceFault

OWN_NAMESPACE = "device"  # the firmware's own entries: key pair, certificate location, flags
_NVS_KINDS = {m.NvsType.U8: "u8", m.NvsType.U16: "u16", m.NvsType.U32: "u32", m.NvsType.U64: "u64",
              m.NvsType.I8: "i8", m.NvsType.I16: "i16", m.NvsType.I32: "i32", m.NvsType.I64: "i64",
              m.NvsType.STRING: "string", m.NvsType.BLOB: "blob"}
_KIND_TYPES = {kind: nvs_type for nvs_type, kind in _NVS_KINDS.items()}
MAX_PAYLOAD = 1024


class NvsStore:
    """An NVS partition in flash, edited as ESP-IDF's nvs_set/nvs_commit would."""

    def __init__(self, flash: Flash, partition: PartitionEntry) -> None:
        self.flash = flash
        self.partition = partition
        raw = flash.read(partition.offset, partition.size)
        self.image = NvsImage(partition.size) if raw == b"\xff" * partition.size else NvsImage.parse(raw)

    def get(self, namespace: str, key: str) -> tuple[str, int | str | bytes] | None:
        return self.image.items().get((namespace, key))

    def set(self, namespace: str, key: str, value: int | str | bytes, kind: str) -> None:
        self.image.set(namespace, key, value, kind)
        self.commit()

    def commit(self) -> None:
        self.flash.write(self.partition.offset, self.image.to_bytes())
        self.flash.flush()


@dataclass
class _Transfer:
    target: m.Target
    namespace: str
    key: str
    nvs_type: m.NvsType
    total: int
    sha256: bytes
    data: bytearray = field(default_factory=bytearray)
    last_chunk: tuple[int, bytes] | None = None


@dataclass
class _FlashTransfer:
    address: int
    size: int
    compressed: int
    sha256: bytes
    received: int = 0
    written: int = 0
    inflater: "zlib._Decompress" = field(default_factory=zlib.decompressobj)
    last_chunk: tuple[int, bytes] | None = None

    def same(self, request: m.FlashBegin) -> bool:
        return (self.address, self.size, self.compressed, self.sha256) == \
            (request.address, request.size, request.compressed, request.sha256)


class ManufacturingFirmware:
    """The request handler of the manufacturing firmware (``DeviceServer`` calls it)."""

    def __init__(self, identity: ChipIdentity, flash: Flash, timing: TimingModel,
                 reboot: Callable[[], None] | None = None, running: str = "factory") -> None:
        self.identity = identity
        self.running = running  # the partition this firmware was started from
        self.reboot = reboot or (lambda: None)
        self.flashing: _FlashTransfer | None = None
        self.flash = flash
        self.timing = timing
        self.table = PartitionTable.parse(flash.read(PARTITION_TABLE_OFFSET, TABLE_LENGTH))
        self.store = NvsStore(flash, self.table.find("fctry"))
        self.csr: bytes | None = None
        self.transfer: _Transfer | None = None
        self.committed: _Transfer | None = None  # the last committed write, for a repeated WRITE_END
        self.keygen_attempts = 0
        self.last_error = m.ErrorCode.NONE
        self._lock = threading.Lock()

    # -- what the device knows about itself -------------------------------------------------

    def _version(self, label: str) -> str:
        entry = self.table.find(label)
        descriptor = image.read_app_descriptor(self.flash.read(entry.offset, entry.size))
        return descriptor.version if descriptor else ""

    def _own(self, key: str) -> int | str | bytes | None:
        found = self.store.get(OWN_NAMESPACE, key)
        return found[1] if found else None

    def _private_key(self) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None:
        der = self._own("priv_key")
        if not isinstance(der, bytes):
            return None
        key = serialization.load_der_private_key(der, password=None)
        assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
        return key

    def state(self) -> m.StateFlag:
        flags = m.StateFlag(0)
        if self._own("priv_key") is not None:
            flags |= m.StateFlag.KEY_PRESENT
        if self.csr is not None:
            flags |= m.StateFlag.CSR_READY
        if self._own("cert_loc") is not None:
            flags |= m.StateFlag.CERT_PRESENT
        if self._own("stamp_done") == 1:
            flags |= m.StateFlag.STAMP_DONE
        return flags

    # -- the protocol -------------------------------------------------------------------------

    def __call__(self, request: m.Request) -> m.Message:  # type: ignore[type-arg]
        with self._lock:
            try:
                return self._dispatch(request)
            except DeviceFault as fault:
                self.last_error = fault.code
                raise

    def _dispatch(self, request: m.Request) -> m.Message:  # type: ignore[type-arg]
        if isinstance(request, m.Hello):
            return m.HelloReply(chip_id=self.identity.chip_id, chip_model=self.identity.model,
                                chip_rev=self.identity.revision, mfg_fw_version=self._version(self.running),
                                app_fw_version=self._version("ota_0"), max_payload=MAX_PAYLOAD, state=self.state())
        if isinstance(request, m.Status):
            return m.StatusReply(state=self.state(), last_error=self.last_error)
        if isinstance(request, m.Keygen):
            return self._keygen(request)
        if isinstance(request, m.CsrBuild):
            return self._csr_build(request)
        if isinstance(request, m.WriteBegin):
            return self._write_begin(request)
        if isinstance(request, m.WriteChunk):
            return self._write_chunk(request)
        if isinstance(request, m.WriteEnd):
            return self._write_end()
        if isinstance(request, m.Read):
            return self._read(request)
        if isinstance(request, m.FlashBegin):
            return self._flash_begin(request)
        if isinstance(request, m.FlashData):
            return self._flash_data(request)
        if isinstance(request, m.FlashEnd):
            return self._flash_end()
        if isinstance(request, m.FlashHash):
            self._check_region(request.address, request.size, readable=True)
            return m.HashReply(sha256=hashlib.sha256(self.flash.read(request.address, request.size)).digest())
        if isinstance(request, m.SetBoot):
            return self._set_boot(request.partition)
        if isinstance(request, m.Reboot):
            self.reboot()
            return m.Ack()
        if isinstance(request, m.Erase):
            return self._erase()
        if isinstance(request, m.Finish):
            if not self.state() & m.StateFlag.CERT_PRESENT:
                raise DeviceFault(m.ErrorCode.BAD_STATE, "no certificate is stored yet")
            self.store.set(OWN_NAMESPACE, "stamp_done", 1, "u8")
            return m.Ack()
        raise DeviceFault(m.ErrorCode.UNKNOWN_TYPE, type(request).__name__)

    def _erase(self) -> m.Ack:
        """Destroy the stamp and the key pair (rework); the station has revoked the certificate."""
        for namespace, key in list(self.store.image.items()):
            self.store.image.delete(namespace, key)
        self.store.commit()
        self.csr, self.transfer, self.committed = None, None, None
        return m.Ack()

    def _keygen(self, request: m.Keygen) -> m.KeygenReply:
        if self.state() & m.StateFlag.CERT_PRESENT:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "a certificate is stored for the current key")
        self.keygen_attempts += 1
        self.timing.sleep(self.timing.keygen_seconds(request.key_type, self.identity.chip_id, self.keygen_attempts))
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if request.key_type == m.KeyType.EC_P256:
            key = ec.generate_private_key(ec.SECP256R1())
        elif request.key_type in (m.KeyType.RSA_2048, m.KeyType.RSA_3072):
            key = rsa.generate_private_key(65537, 2048 if request.key_type == m.KeyType.RSA_2048 else 3072)
        else:
            raise DeviceFault(m.ErrorCode.UNSUPPORTED_KEY_TYPE, str(int(request.key_type)))
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self._set_own("priv_key", der, "blob")
        self._set_own("key_type", int(request.key_type), "u8")
        self.csr = None
        return m.KeygenReply(key_type=request.key_type)

    def _csr_build(self, request: m.CsrBuild) -> m.CsrBuildReply:
        key = self._private_key()
        if key is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "no key pair has been generated")
        attrs = []
        if request.subject_o:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, request.subject_o))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, request.subject_cn))
        if request.subject_serial:
            attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, request.subject_serial))
        try:
            csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hashes.SHA256())
        except ValueError as exc:
            raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, f"subject rejected: {exc}") from None
        key_type = self._own("key_type")
        self.timing.sleep(CSR_SIGN_SECONDS.get(key_type if isinstance(key_type, int) else 1, 0.05))
        self.csr = csr.public_bytes(serialization.Encoding.DER)
        return m.CsrBuildReply(length=len(self.csr), sha256=hashlib.sha256(self.csr).digest())

    # -- chunked writes ---------------------------------------------------------------------

    def _write_begin(self, request: m.WriteBegin) -> m.WriteReply:
        if request.target == m.Target.CSR:
            raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, "the CSR is read-only")
        if request.total > m.max_object_size(request.target):
            raise DeviceFault(m.ErrorCode.TOO_LARGE, f"{request.total} bytes")
        if request.namespace == OWN_NAMESPACE:
            raise DeviceFault(m.ErrorCode.BAD_STATE, f"namespace '{OWN_NAMESPACE}' belongs to the firmware")
        self.committed = None
        self.transfer = _Transfer(request.target, request.namespace, request.key, request.nvs_type,
                                  request.total, request.sha256)
        if request.data is not None:
            if len(request.data) != request.total:
                raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, "inline DATA must hold all TOTAL bytes")
            self.transfer.data.extend(request.data)
            self._commit()
            return m.WriteReply(next_offset=request.total)
        return m.WriteReply(next_offset=0)

    def _write_chunk(self, request: m.WriteChunk) -> m.WriteReply:
        transfer = self.transfer
        if transfer is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "no write is in progress")
        if transfer.last_chunk == (request.offset, request.data):
            return m.WriteReply(next_offset=len(transfer.data))  # a retry after a lost reply
        if request.offset != len(transfer.data):
            raise DeviceFault(m.ErrorCode.OUT_OF_ORDER, f"expected offset {len(transfer.data)}")
        if len(transfer.data) + len(request.data) > transfer.total:
            raise DeviceFault(m.ErrorCode.TOO_LARGE, "more data than announced")
        transfer.data.extend(request.data)
        transfer.last_chunk = (request.offset, request.data)
        return m.WriteReply(next_offset=len(transfer.data))

    def _write_end(self) -> m.Ack:
        if self.transfer is None and self.committed is not None:
            return m.Ack()  # a retry after a lost reply: the write was committed
        if self.transfer is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "no write is in progress")
        if len(self.transfer.data) != self.transfer.total:
            raise DeviceFault(m.ErrorCode.BAD_STATE, f"{len(self.transfer.data)} of {self.transfer.total} bytes received")
        self._commit()
        return m.Ack()

    def _commit(self) -> None:
        transfer, self.transfer, self.committed = self.transfer, None, None
        assert transfer is not None
        data = bytes(transfer.data)
        if hashlib.sha256(data).digest() != transfer.sha256:
            raise DeviceFault(m.ErrorCode.HASH_MISMATCH, "the data does not match its SHA-256")
        try:
            m.validate_object(transfer.target, transfer.namespace, transfer.key, transfer.nvs_type, data)
            value = m.nvs_decode(transfer.nvs_type, data)
        except m.BadPayload as exc:
            raise DeviceFault(exc.code, exc.reason) from None
        if transfer.target == m.Target.CERT:
            self._check_certificate(data)
        try:
            self.store.set(transfer.namespace, transfer.key, value, _NVS_KINDS[transfer.nvs_type])
        except StamplineError as exc:
            raise DeviceFault(m.ErrorCode.STORAGE, str(exc)) from None
        if transfer.target == m.Target.CERT:
            self._set_own("cert_loc", f"{transfer.namespace}/{transfer.key}", "string")
        self.committed = transfer
        self.timing.sleep(NVS_WRITE_SECONDS)

    def _check_certificate(self, der: bytes) -> None:
        key = self._private_key()
        if key is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "no key pair has been generated")
        try:
            cert = x509.load_der_x509_certificate(der)
            cert_key = cert.public_key()
        except ValueError:
            raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, "not a DER certificate") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert_key.public_bytes(serialization.Encoding.DER, spki) != \
                key.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise DeviceFault(m.ErrorCode.KEY_MISMATCH, "the certificate is not for this device's key")

    def _set_own(self, key: str, value: int | str | bytes, kind: str) -> None:
        try:
            self.store.set(OWN_NAMESPACE, key, value, kind)
        except StamplineError as exc:
            raise DeviceFault(m.ErrorCode.STORAGE, str(exc)) from None

    # -- flashing -----------------------------------------------------------------------------

    def _regions(self, readable: bool) -> list[tuple[int, int]]:
        """Where the station may write: the bootloader region and the OTA app slots (the running
        factory app and the data partitions are out of reach); reading also covers the factory app."""
        boot = bootloader_offset(self.identity.model)
        regions = [(boot, PARTITION_TABLE_OFFSET - boot)]
        for entry in self.table:
            if entry.type == PartitionType.APP and (readable or entry.subtype != AppSubtype.FACTORY):
                regions.append((entry.offset, entry.size))
        return regions

    def _check_region(self, address: int, size: int, readable: bool = False) -> None:
        if size <= 0 or not any(start <= address and address + size <= start + length
                                for start, length in self._regions(readable)):
            raise DeviceFault(m.ErrorCode.BAD_STATE, f"0x{address:x}+{size} is not a region the station may "
                                                     f"{'read' if readable else 'write'}")

    def _flash_begin(self, request: m.FlashBegin) -> m.WriteReply:
        if self.flashing is not None and self.flashing.same(request):
            return m.WriteReply(next_offset=self.flashing.received)  # resume after a dropped link
        self._check_region(request.address, request.size)
        if request.compressed == 0 or request.compressed > 2 * request.size + 1024:
            raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, "implausible compressed size")
        sectors = (request.size + 0xFFF) // 0x1000
        self.flash.erase(request.address, min(sectors * 0x1000, self.flash.size - request.address))
        self.timing.sleep(sectors * FLASH_ERASE_SECONDS_PER_SECTOR)
        self.flashing = _FlashTransfer(request.address, request.size, request.compressed, request.sha256)
        return m.WriteReply(next_offset=0)

    def _flash_data(self, request: m.FlashData) -> m.WriteReply:
        t = self.flashing
        if t is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "no flash transfer is in progress")
        if t.last_chunk == (request.offset, request.data):
            return m.WriteReply(next_offset=t.received)
        if request.offset != t.received:
            raise DeviceFault(m.ErrorCode.OUT_OF_ORDER, f"expected offset {t.received}")
        if t.received + len(request.data) > t.compressed:
            raise DeviceFault(m.ErrorCode.TOO_LARGE, "more data than announced")
        try:
            # bounded: never inflate past the announced size (a compression bomb stops here)
            plain = t.inflater.decompress(request.data, t.size - t.written + 1)
        except zlib.error:
            self.flashing = None
            raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, "the data does not inflate") from None
        if t.written + len(plain) > t.size or t.inflater.unconsumed_tail:
            self.flashing = None
            raise DeviceFault(m.ErrorCode.TOO_LARGE, "the data inflates past the announced size")
        self.flash.write(t.address + t.written, plain)
        t.written += len(plain)
        t.received += len(request.data)
        t.last_chunk = (request.offset, request.data)
        return m.WriteReply(next_offset=t.received)

    def _flash_end(self) -> m.Ack:
        t, self.flashing = self.flashing, None
        if t is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, "no flash transfer is in progress")
        self.flash.flush()
        if t.received != t.compressed or t.written != t.size or not t.inflater.eof:
            raise DeviceFault(m.ErrorCode.BAD_STATE, f"{t.written} of {t.size} bytes written")
        if hashlib.sha256(self.flash.read(t.address, t.size)).digest() != t.sha256:
            raise DeviceFault(m.ErrorCode.HASH_MISMATCH, "the written flash does not match its SHA-256")
        return m.Ack()

    def _set_boot(self, label: str) -> m.Ack:
        try:
            target = self.table.find(label)
        except StamplineError:
            raise DeviceFault(m.ErrorCode.NOT_FOUND, f"no partition '{label}'") from None
        slots = sorted((e for e in self.table if e.type == PartitionType.APP and e.subtype != AppSubtype.FACTORY),
                       key=lambda e: e.subtype)
        ota = self.table.find("otadata")
        if target.type != PartitionType.APP:
            raise DeviceFault(m.ErrorCode.BAD_STATE, f"'{label}' is not an app partition")
        if image.read_app_descriptor(self.flash.read(target.offset, target.size)) is None:
            raise DeviceFault(m.ErrorCode.BAD_STATE, f"'{label}' holds no app image")
        if target.subtype == AppSubtype.FACTORY:
            data = otadata.erased(ota.size)
        else:
            data = otadata.select(self.flash.read(ota.offset, ota.size), slots.index(target), len(slots))
        self.flash.write(ota.offset, data)
        self.flash.flush()
        return m.Ack()

    # -- reads --------------------------------------------------------------------------------

    def _read(self, request: m.Read) -> m.ReadReply:
        if request.target == m.Target.CSR:
            if self.csr is None:
                raise DeviceFault(m.ErrorCode.NOT_FOUND, "no CSR has been built")
            data = self.csr
        else:
            if request.namespace == OWN_NAMESPACE:
                raise DeviceFault(m.ErrorCode.NOT_FOUND, f"namespace '{OWN_NAMESPACE}' is not readable")
            found = self.store.get(request.namespace, request.key)
            if found is None:
                raise DeviceFault(m.ErrorCode.NOT_FOUND, f"{request.namespace}/{request.key}")
            kind, value = found
            data = m.nvs_encode(_KIND_TYPES[kind], value)
        if request.offset > len(data):
            raise DeviceFault(m.ErrorCode.BAD_PAYLOAD, "offset past the end")
        size = min(request.max_len, MAX_PAYLOAD - m.READ_OVERHEAD)
        return m.ReadReply(total=len(data), sha256=hashlib.sha256(data).digest(),
                           data=data[request.offset:request.offset + size])
