"""Protocol v1 messages: types, error codes, the TLV payload codec and one dataclass per message.

A payload is a sequence of ``tag u8 | length u16 LE | value`` fields. Tags are global: one tag
always has the same meaning and type, whatever the message (see ``Tag`` and ``SPECS``). Parsing
is strict (duplicates, overruns, missing or malformed fields are refused) except that unknown
tags are skipped, so that later versions can add fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag
from typing import Any, ClassVar, Generic, Self, TypeVar

from stampline.protocol.wire import MAX_PAYLOAD, VERSION, ProtocolError

REPLY_BIT = 0x80
MIN_PAYLOAD = 256  # the smallest MAX_PAYLOAD a device may announce
MAX_DETAIL = 128
MAX_OBJECT = 16 * 1024
MAX_CSR = 4 * 1024
MAX_CERT = 4 * 1024
MAX_NVS_STRING = 3999  # ESP-IDF: 4000 bytes including the terminating NUL
MAX_NAME = 15  # ESP-IDF NVS namespace and key names, without the NUL


class MsgType(IntEnum):
    HELLO = 0x01
    KEYGEN = 0x02
    CSR_BUILD = 0x03
    STATUS = 0x06
    FINISH = 0x07
    ERASE = 0x08
    WRITE_BEGIN = 0x10
    WRITE_CHUNK = 0x11
    WRITE_END = 0x12
    READ = 0x13
    FLASH_BEGIN = 0x20
    FLASH_DATA = 0x21
    FLASH_END = 0x22
    FLASH_HASH = 0x23
    SET_BOOT = 0x24
    REBOOT = 0x25
    HELLO_REPLY = 0x81
    KEYGEN_REPLY = 0x82
    CSR_BUILD_REPLY = 0x83
    STATUS_REPLY = 0x86
    FINISH_REPLY = 0x87
    ERASE_REPLY = 0x88
    WRITE_BEGIN_REPLY = 0x90
    WRITE_CHUNK_REPLY = 0x91
    WRITE_END_REPLY = 0x92
    READ_REPLY = 0x93
    FLASH_BEGIN_REPLY = 0xA0
    FLASH_DATA_REPLY = 0xA1
    FLASH_END_REPLY = 0xA2
    FLASH_HASH_REPLY = 0xA3
    SET_BOOT_REPLY = 0xA4
    REBOOT_REPLY = 0xA5
    BUSY = 0xFE
    ERROR = 0xFF


def type_name(value: int) -> str:
    """A message type's name for messages to people, also for values this version lacks."""
    try:
        return MsgType(value).name
    except ValueError:
        return f"type 0x{value:02X}"


class ErrorCode(IntEnum):
    NONE = 0x00  # only in STATUS's LAST_ERROR
    BAD_FRAME = 0x01
    UNSUPPORTED_VERSION = 0x02
    UNKNOWN_TYPE = 0x03
    BAD_PAYLOAD = 0x04
    BAD_STATE = 0x05
    UNSUPPORTED_KEY_TYPE = 0x06
    TOO_LARGE = 0x07
    HASH_MISMATCH = 0x08
    KEY_MISMATCH = 0x09
    STORAGE = 0x0A
    LOCKED = 0x0B
    BUSY = 0x0C
    NOT_FOUND = 0x0D
    OUT_OF_ORDER = 0x0E
    INTERNAL = 0x7F

    @property
    def sentence(self) -> str:
        return _SENTENCES[self]

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Codes from a later protocol version are read as INTERNAL rather than refused."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL


_SENTENCES = {
    ErrorCode.NONE: "No error was recorded.",
    ErrorCode.BAD_FRAME: "The device received a corrupt frame.",
    ErrorCode.UNSUPPORTED_VERSION: "The device does not speak this protocol version.",
    ErrorCode.UNKNOWN_TYPE: "The device does not know this message type.",
    ErrorCode.BAD_PAYLOAD: "The device could not parse the message's fields.",
    ErrorCode.BAD_STATE: "The request is not valid in the device's current state.",
    ErrorCode.UNSUPPORTED_KEY_TYPE: "The device cannot generate this type of key.",
    ErrorCode.TOO_LARGE: "The object is larger than the device accepts.",
    ErrorCode.HASH_MISMATCH: "The data the device received does not match its SHA-256.",
    ErrorCode.KEY_MISMATCH: "The certificate's public key is not the device's key.",
    ErrorCode.STORAGE: "The device failed to read or write its flash storage.",
    ErrorCode.LOCKED: "The device's manufacturing mode is closed.",
    ErrorCode.BUSY: "The device is busy with another operation.",
    ErrorCode.NOT_FOUND: "The requested object does not exist on the device.",
    ErrorCode.OUT_OF_ORDER: "A chunk arrived at an unexpected offset.",
    ErrorCode.INTERNAL: "The device hit an internal error.",
}


class KeyType(IntEnum):
    EC_P256 = 1
    RSA_2048 = 2
    RSA_3072 = 3


class Target(IntEnum):
    CSR = 1
    CERT = 2
    NVS = 3


class NvsType(IntEnum):
    """ESP-IDF's nvs_type_t codes; the low nibble of an integer type is its width in bytes."""

    U8 = 0x01
    U16 = 0x02
    U32 = 0x04
    U64 = 0x08
    I8 = 0x11
    I16 = 0x12
    I32 = 0x14
    I64 = 0x18
    STRING = 0x21
    BLOB = 0x42

    @property
    def width(self) -> int | None:
        """Size in bytes of an integer type, None for STRING and BLOB."""
        return None if self in (NvsType.STRING, NvsType.BLOB) else self & 0x0F

    @property
    def signed(self) -> bool:
        return bool(self & 0x10)


class StateFlag(IntFlag):
    KEY_PRESENT = 1 << 0
    CSR_READY = 1 << 1
    CERT_PRESENT = 1 << 2
    STAMP_DONE = 1 << 3
    SECURED = 1 << 4
    SECURE_BOOT = 1 << 5
    FLASH_ENCRYPTION = 1 << 6


class BadPayload(ProtocolError):
    """A payload or value that breaks the protocol's rules; ``code`` is what a device answers."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.BAD_PAYLOAD) -> None:
        super().__init__(f"Malformed message: {reason}.")
        self.reason = reason
        self.code = code


def sanitize(text: str, limit: int = MAX_DETAIL) -> str:
    """Printable, at most ``limit`` characters: safe to show on an operator's terminal."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class DeviceError(ProtocolError):
    """The device answered a request with an ERROR reply."""

    def __init__(self, code: ErrorCode, detail: str = "", request: str = "the request") -> None:
        self.code = code
        self.detail = sanitize(detail)
        reason = code.sentence[0].lower() + code.sentence[1:-1]
        suffix = f" ({self.detail})" if self.detail else ""
        super().__init__(f"The device refused {request} with {code.name}: {reason}{suffix}.")


# --- TLV codec -------------------------------------------------------------------------------


class Tag(IntEnum):
    PROTO = 0x01
    CHIP_ID = 0x02
    CHIP_MODEL = 0x03
    CHIP_REV = 0x04
    MFG_FW_VERSION = 0x05
    APP_FW_VERSION = 0x06
    MAX_PAYLOAD = 0x07
    STATE = 0x08
    KEY_TYPE = 0x09
    SUBJECT_CN = 0x0A
    SUBJECT_O = 0x0B
    SUBJECT_SERIAL = 0x0C
    LENGTH = 0x0D
    SHA256 = 0x0E
    TARGET = 0x0F
    NAMESPACE = 0x10
    KEY = 0x11
    NVS_TYPE = 0x12
    TOTAL = 0x13
    DATA = 0x14
    NEXT_OFFSET = 0x15
    OFFSET = 0x16
    MAX = 0x17
    LAST_ERROR = 0x18
    CODE = 0x19
    DETAIL = 0x1A
    ADDRESS = 0x1B
    SIZE = 0x1C
    COMPRESSED = 0x1D
    PARTITION = 0x1E


class Kind(Enum):
    U8 = 1
    U16 = 2
    U32 = 4
    FIXED = "bytes of an exact size"
    BLOB = "bytes"
    TEXT = "UTF-8 text, printable"
    NAME = "ASCII text, printable"


@dataclass(frozen=True)
class Spec:
    """What a tag holds. ``size``: exact size for FIXED, maximum in bytes for TEXT and NAME."""

    kind: Kind
    size: int = 0
    convert: Callable[[int], Any] | None = None  # int -> enum for integer kinds
    bad_code: ErrorCode = ErrorCode.BAD_PAYLOAD  # the code for an unknown enum value
    strict: bool = True  # False: bad text is repaired (sanitised) instead of refused


SPECS: dict[Tag, Spec] = {
    Tag.PROTO: Spec(Kind.U8),
    Tag.CHIP_ID: Spec(Kind.FIXED, 6),
    Tag.CHIP_MODEL: Spec(Kind.NAME, 16),
    Tag.CHIP_REV: Spec(Kind.U16),
    Tag.MFG_FW_VERSION: Spec(Kind.TEXT, 32),
    Tag.APP_FW_VERSION: Spec(Kind.TEXT, 32),
    Tag.MAX_PAYLOAD: Spec(Kind.U16),
    Tag.STATE: Spec(Kind.U32, convert=StateFlag),
    Tag.KEY_TYPE: Spec(Kind.U8, convert=KeyType, bad_code=ErrorCode.UNSUPPORTED_KEY_TYPE),
    Tag.SUBJECT_CN: Spec(Kind.TEXT, 64),
    Tag.SUBJECT_O: Spec(Kind.TEXT, 64),
    Tag.SUBJECT_SERIAL: Spec(Kind.TEXT, 64),
    Tag.LENGTH: Spec(Kind.U32),
    Tag.SHA256: Spec(Kind.FIXED, 32),
    Tag.TARGET: Spec(Kind.U8, convert=Target),
    Tag.NAMESPACE: Spec(Kind.NAME, MAX_NAME),
    Tag.KEY: Spec(Kind.NAME, MAX_NAME),
    Tag.NVS_TYPE: Spec(Kind.U8, convert=NvsType),
    Tag.TOTAL: Spec(Kind.U32),
    Tag.DATA: Spec(Kind.BLOB),
    Tag.NEXT_OFFSET: Spec(Kind.U32),
    Tag.OFFSET: Spec(Kind.U32),
    Tag.MAX: Spec(Kind.U16),
    Tag.LAST_ERROR: Spec(Kind.U8, convert=ErrorCode.from_wire),
    Tag.CODE: Spec(Kind.U8, convert=ErrorCode.from_wire),
    Tag.DETAIL: Spec(Kind.TEXT, MAX_DETAIL, strict=False),
    Tag.ADDRESS: Spec(Kind.U32),
    Tag.SIZE: Spec(Kind.U32),
    Tag.COMPRESSED: Spec(Kind.U32),
    Tag.PARTITION: Spec(Kind.NAME, 16),
}


def encode_tlv(fields: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        if len(value) > 0xFFFF:
            raise BadPayload(f"field 0x{tag:02X} is {len(value)} bytes, more than a TLV holds")
        out += bytes((tag,)) + len(value).to_bytes(2, "little") + value
    return bytes(out)


def decode_tlv(payload: bytes) -> dict[int, bytes]:
    """Split a payload into {tag: value}, refusing duplicates and fields that overrun it."""
    if len(payload) > MAX_PAYLOAD:
        raise BadPayload(f"the payload is {len(payload)} bytes, more than {MAX_PAYLOAD}")
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload):
        if pos + 3 > len(payload):
            raise BadPayload(f"a field header is truncated at offset {pos}")
        tag = payload[pos]
        length = int.from_bytes(payload[pos + 1 : pos + 3], "little")
        pos += 3
        if pos + length > len(payload):
            raise BadPayload(f"field 0x{tag:02X} overruns the payload")
        if tag in fields:
            raise BadPayload(f"field 0x{tag:02X} appears twice")
        fields[tag] = payload[pos : pos + length]
        pos += length
    return fields


def _check_text(tag: Tag, spec: Spec, text: str, size: int) -> None:
    if size > spec.size:
        raise BadPayload(f"field {tag.name} is {size} bytes, more than {spec.size}")
    if not text.isprintable():
        raise BadPayload(f"field {tag.name} holds non-printable characters")
    if spec.kind is Kind.NAME and not text.isascii():
        raise BadPayload(f"field {tag.name} holds non-ASCII characters")


def encode_value(tag: Tag, value: Any) -> bytes:
    spec = SPECS[tag]
    if isinstance(spec.kind.value, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadPayload(f"field {tag.name} must be an integer")
        if not 0 <= value < 1 << (8 * spec.kind.value):
            raise BadPayload(f"field {tag.name} value {value} does not fit in {spec.kind.name}")
        return int(value).to_bytes(spec.kind.value, "little")
    if spec.kind in (Kind.FIXED, Kind.BLOB):
        if not isinstance(value, (bytes, bytearray)):
            raise BadPayload(f"field {tag.name} must be bytes")
        if spec.kind is Kind.FIXED and len(value) != spec.size:
            raise BadPayload(f"field {tag.name} must be {spec.size} bytes, not {len(value)}")
        return bytes(value)
    if not isinstance(value, str):
        raise BadPayload(f"field {tag.name} must be text")
    if not spec.strict:
        value = sanitize(value, spec.size)
        raw = value.encode()
        while len(raw) > spec.size:  # cut whole characters until the bytes fit
            value = value[:-1]
            raw = value.encode()
        return raw
    raw = value.encode()
    _check_text(tag, spec, value, len(raw))
    return raw


def decode_value(tag: Tag, raw: bytes) -> Any:
    spec = SPECS[tag]
    if isinstance(spec.kind.value, int):
        if len(raw) != spec.kind.value:
            raise BadPayload(f"field {tag.name} must be {spec.kind.value} bytes, not {len(raw)}")
        number = int.from_bytes(raw, "little")
        if spec.convert is None:
            return number
        try:
            return spec.convert(number)
        except ValueError:
            reason = f"field {tag.name} has the unknown value {number}"
            raise BadPayload(reason, spec.bad_code) from None
    if spec.kind is Kind.FIXED and len(raw) != spec.size:
        raise BadPayload(f"field {tag.name} must be {spec.size} bytes, not {len(raw)}")
    if spec.kind in (Kind.FIXED, Kind.BLOB):
        return bytes(raw)
    if not spec.strict:
        return sanitize(raw.decode("utf-8", "replace"), spec.size)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPayload(f"field {tag.name} is not valid UTF-8") from None
    _check_text(tag, spec, text, len(raw))
    return text


# --- Messages --------------------------------------------------------------------------------


def tlv(tag: Tag, *, default: Any = dataclasses.MISSING, optional: bool = False) -> Any:
    """Declare a dataclass field carried in TLV ``tag``.

    An optional field may be absent on the wire; it then takes its default (None unless
    given) and is not sent when it equals that default. A required field may still have a
    Python default, but is always sent and must always be received.
    """
    if optional and default is dataclasses.MISSING:
        default = None
    return field(default=default, metadata={"tag": tag, "optional": optional})


class Message:
    """Base of all message dataclasses: the payload codec driven by their ``tlv()`` fields."""

    TYPE: ClassVar[MsgType]

    def encode(self) -> bytes:
        out = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata["optional"] and value == f.default:
                continue
            out.append((f.metadata["tag"], encode_value(f.metadata["tag"], value)))
        payload = encode_tlv(out)
        if len(payload) > MAX_PAYLOAD:
            raise BadPayload(
                f"a {type(self).__name__} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}",
                ErrorCode.TOO_LARGE,
            )
        return payload

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        fields = decode_tlv(payload)
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            tag = f.metadata["tag"]
            if tag in fields:
                kwargs[f.name] = decode_value(tag, fields[tag])
            elif not f.metadata["optional"]:
                raise BadPayload(f"the required field {tag.name} is missing")
        return cls(**kwargs)


R = TypeVar("R", bound=Message)


class Request(Message, Generic[R]):
    """A station-to-device message; ``REPLY`` is the class of its successful reply."""

    REPLY: ClassVar[type[Message]]

    @classmethod
    def reply_type(cls) -> MsgType:
        return MsgType(cls.TYPE | REPLY_BIT)


# Replies. Their frame type is their request's type | 0x80 (Ack serves several requests).


@dataclass(frozen=True)
class HelloReply(Message):
    chip_id: bytes = tlv(Tag.CHIP_ID)
    chip_model: str = tlv(Tag.CHIP_MODEL)
    chip_rev: int = tlv(Tag.CHIP_REV)
    mfg_fw_version: str = tlv(Tag.MFG_FW_VERSION)
    app_fw_version: str = tlv(Tag.APP_FW_VERSION)
    max_payload: int = tlv(Tag.MAX_PAYLOAD)
    state: StateFlag = tlv(Tag.STATE)

    def __post_init__(self) -> None:
        if isinstance(self.max_payload, int) and self.max_payload < MIN_PAYLOAD:
            raise BadPayload(f"MAX_PAYLOAD {self.max_payload} is below the minimum {MIN_PAYLOAD}")


@dataclass(frozen=True)
class KeygenReply(Message):
    key_type: KeyType = tlv(Tag.KEY_TYPE)


@dataclass(frozen=True)
class CsrBuildReply(Message):
    length: int = tlv(Tag.LENGTH)
    sha256: bytes = tlv(Tag.SHA256)


@dataclass(frozen=True)
class WriteReply(Message):
    next_offset: int = tlv(Tag.NEXT_OFFSET)


@dataclass(frozen=True)
class ReadReply(Message):
    total: int = tlv(Tag.TOTAL)
    sha256: bytes = tlv(Tag.SHA256)
    data: bytes = tlv(Tag.DATA)


@dataclass(frozen=True)
class StatusReply(Message):
    state: StateFlag = tlv(Tag.STATE)
    last_error: ErrorCode = tlv(Tag.LAST_ERROR, default=ErrorCode.NONE)


@dataclass(frozen=True)
class Ack(Message):
    """The empty reply of WRITE_END, FINISH and ERASE."""


@dataclass(frozen=True)
class ErrorReply(Message):
    TYPE = MsgType.ERROR
    code: ErrorCode = tlv(Tag.CODE)
    detail: str = tlv(Tag.DETAIL, default="", optional=True)


@dataclass(frozen=True)
class Busy(Message):
    """Keep-alive from the device while a request is in progress (same request id)."""

    TYPE = MsgType.BUSY


# Requests.


@dataclass(frozen=True)
class Hello(Request[HelloReply]):
    TYPE = MsgType.HELLO
    REPLY = HelloReply
    proto: int = tlv(Tag.PROTO, default=VERSION)


@dataclass(frozen=True)
class Keygen(Request[KeygenReply]):
    TYPE = MsgType.KEYGEN
    REPLY = KeygenReply
    key_type: KeyType = tlv(Tag.KEY_TYPE)


@dataclass(frozen=True)
class CsrBuild(Request[CsrBuildReply]):
    TYPE = MsgType.CSR_BUILD
    REPLY = CsrBuildReply
    subject_cn: str = tlv(Tag.SUBJECT_CN)
    subject_o: str | None = tlv(Tag.SUBJECT_O, optional=True)
    subject_serial: str | None = tlv(Tag.SUBJECT_SERIAL, optional=True)


@dataclass(frozen=True)
class WriteBegin(Request[WriteReply]):
    TYPE = MsgType.WRITE_BEGIN
    REPLY = WriteReply
    target: Target = tlv(Tag.TARGET)
    namespace: str = tlv(Tag.NAMESPACE)
    key: str = tlv(Tag.KEY)
    nvs_type: NvsType = tlv(Tag.NVS_TYPE)
    total: int = tlv(Tag.TOTAL)
    sha256: bytes = tlv(Tag.SHA256)
    data: bytes | None = tlv(Tag.DATA, optional=True)  # all TOTAL bytes: commit at once


@dataclass(frozen=True)
class WriteChunk(Request[WriteReply]):
    TYPE = MsgType.WRITE_CHUNK
    REPLY = WriteReply
    offset: int = tlv(Tag.OFFSET)
    data: bytes = tlv(Tag.DATA)


@dataclass(frozen=True)
class WriteEnd(Request[Ack]):
    TYPE = MsgType.WRITE_END
    REPLY = Ack


# Reply overhead of READ: TOTAL (3+4), SHA256 (3+32), DATA header (3).
READ_OVERHEAD = 45
# Request overhead of WRITE_CHUNK: OFFSET (3+4), DATA header (3).
CHUNK_OVERHEAD = 10


@dataclass(frozen=True)
class Read(Request[ReadReply]):
    TYPE = MsgType.READ
    REPLY = ReadReply
    target: Target = tlv(Tag.TARGET)
    namespace: str = tlv(Tag.NAMESPACE, default="")
    key: str = tlv(Tag.KEY, default="")
    offset: int = tlv(Tag.OFFSET, default=0)
    max_len: int = tlv(Tag.MAX, default=MAX_PAYLOAD - READ_OVERHEAD)


@dataclass(frozen=True)
class Status(Request[StatusReply]):
    TYPE = MsgType.STATUS
    REPLY = StatusReply


@dataclass(frozen=True)
class Finish(Request[Ack]):
    TYPE = MsgType.FINISH
    REPLY = Ack


@dataclass(frozen=True)
class Erase(Request[Ack]):
    """Back to factory-fresh for rework: the stamp, certificate, CSR and the key are destroyed."""

    TYPE = MsgType.ERASE
    REPLY = Ack


# Flashing (0x20-0x25): a zlib-compressed image streamed into a flash region, resumable.


@dataclass(frozen=True)
class HashReply(Message):
    sha256: bytes = tlv(Tag.SHA256)


@dataclass(frozen=True)
class FlashBegin(Request[WriteReply]):
    """Start (or resume) writing ``size`` bytes at ``address``; the data comes zlib-compressed
    (``compressed`` bytes). NEXT_OFFSET in the reply is where in the compressed stream to go on:
    0 for a new transfer, more when the same transfer (address, size, SHA-256) was interrupted."""

    TYPE = MsgType.FLASH_BEGIN
    REPLY = WriteReply
    address: int = tlv(Tag.ADDRESS)
    size: int = tlv(Tag.SIZE)
    compressed: int = tlv(Tag.COMPRESSED)
    sha256: bytes = tlv(Tag.SHA256)


@dataclass(frozen=True)
class FlashData(Request[WriteReply]):
    TYPE = MsgType.FLASH_DATA
    REPLY = WriteReply
    offset: int = tlv(Tag.OFFSET)
    data: bytes = tlv(Tag.DATA)


@dataclass(frozen=True)
class FlashEnd(Request[Ack]):
    """All compressed bytes sent: the device checks the SHA-256 of what it wrote."""

    TYPE = MsgType.FLASH_END
    REPLY = Ack


@dataclass(frozen=True)
class FlashHash(Request[HashReply]):
    """SHA-256 of a flash region as the device reads it back."""

    TYPE = MsgType.FLASH_HASH
    REPLY = HashReply
    address: int = tlv(Tag.ADDRESS)
    size: int = tlv(Tag.SIZE)


@dataclass(frozen=True)
class SetBoot(Request[Ack]):
    """Select the app partition the bootloader starts next (ESP-IDF's otadata)."""

    TYPE = MsgType.SET_BOOT
    REPLY = Ack
    partition: str = tlv(Tag.PARTITION)


@dataclass(frozen=True)
class Reboot(Request[Ack]):
    """Reboot after the reply has been sent."""

    TYPE = MsgType.REBOOT
    REPLY = Ack


REQUESTS: tuple[type[Request[Any]], ...] = (
    Hello, Keygen, CsrBuild, WriteBegin, WriteChunk, WriteEnd, Read, Status, Finish, Erase,
    FlashBegin, FlashData, FlashEnd, FlashHash, SetBoot, Reboot,
)
# request type -> (request class, reply class)
REGISTRY: dict[MsgType, tuple[type[Request[Any]], type[Message]]] = {
    cls.TYPE: (cls, cls.REPLY) for cls in REQUESTS
}


# --- Objects ---------------------------------------------------------------------------------


def max_object_size(target: Target) -> int:
    return {Target.CSR: MAX_CSR, Target.CERT: MAX_CERT}.get(target, MAX_OBJECT)


def validate_object(target: Target, namespace: str, key: str, nvs_type: NvsType,
                    data: bytes) -> None:
    """Check an object before it is written (the station) or committed (a device).

    Raises BadPayload whose ``code`` is what a device answers.
    """
    try:
        target, nvs_type = Target(target), NvsType(nvs_type)
    except ValueError:
        raise BadPayload(f"unknown target {target} or NVS type {nvs_type}") from None
    if target is Target.CSR:
        raise BadPayload("the CSR target is read-only")
    for tag, name in ((Tag.NAMESPACE, namespace), (Tag.KEY, key)):
        encode_value(tag, name)
        if not name:
            raise BadPayload(f"field {tag.name} must not be empty")
    limit = max_object_size(target)
    if len(data) > limit:
        raise BadPayload(f"the object is {len(data)} bytes, more than {limit}", ErrorCode.TOO_LARGE)
    if target is Target.CERT and nvs_type is not NvsType.BLOB:
        raise BadPayload("a certificate must be stored as a BLOB")
    width = nvs_type.width
    if width is not None and len(data) != width:
        raise BadPayload(f"an NVS {nvs_type.name} value must be {width} bytes, not {len(data)}")
    if nvs_type is NvsType.STRING:
        if b"\0" in data:
            raise BadPayload("an NVS string must not contain a NUL byte")
        if len(data) > MAX_NVS_STRING:
            raise BadPayload(f"an NVS string holds at most {MAX_NVS_STRING} bytes",
                             ErrorCode.TOO_LARGE)


def nvs_encode(nvs_type: NvsType, value: int | str | bytes) -> bytes:
    """The wire form of an NVS value: integers little-endian at their width, text UTF-8."""
    width = nvs_type.width
    if width is not None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadPayload(f"an NVS {nvs_type.name} value must be an integer")
        try:
            return value.to_bytes(width, "little", signed=nvs_type.signed)
        except OverflowError:
            raise BadPayload(f"{value} does not fit in an NVS {nvs_type.name}") from None
    if nvs_type is NvsType.STRING:
        if not isinstance(value, str):
            raise BadPayload("an NVS STRING value must be text")
        return value.encode()
    if not isinstance(value, (bytes, bytearray)):
        raise BadPayload("an NVS BLOB value must be bytes")
    return bytes(value)


def nvs_decode(nvs_type: NvsType, data: bytes) -> int | str | bytes:
    width = nvs_type.width
    if width is not None:
        if len(data) != width:
            raise BadPayload(f"an NVS {nvs_type.name} value must be {width} bytes, not {len(data)}")
        return int.from_bytes(data, "little", signed=nvs_type.signed)
    if nvs_type is NvsType.STRING:
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise BadPayload("an NVS string is not valid UTF-8") from None
    return bytes(data)
