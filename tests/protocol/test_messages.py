import pytest

from stampline.protocol.messages import (
    REGISTRY,
    Ack,
    BadPayload,
    Busy,
    CsrBuild,
    CsrBuildReply,
    DeviceError,
    Erase,
    ErrorCode,
    ErrorReply,
    Finish,
    Hello,
    HelloReply,
    Keygen,
    KeygenReply,
    KeyType,
    MsgType,
    NvsType,
    Read,
    ReadReply,
    StateFlag,
    Status,
    StatusReply,
    Tag,
    Target,
    WriteBegin,
    WriteChunk,
    WriteEnd,
    WriteReply,
    decode_tlv,
    encode_tlv,
    nvs_decode,
    nvs_encode,
    validate_object,
)

SHA = bytes(range(32))
HELLO_REPLY = HelloReply(b"\x24\x6f\x28\x01\x02\x03", "esp32c3", 3, "mfg-1.0.0", "", 1024,
                         StateFlag.KEY_PRESENT | StateFlag.CSR_READY)

MESSAGES = [
    Hello(),
    HELLO_REPLY,
    Keygen(KeyType.RSA_3072),
    KeygenReply(KeyType.EC_P256),
    CsrBuild("dev-0001"),
    CsrBuild("Gerät 1", "Stampline Ltd", "SN-0001"),
    CsrBuildReply(612, SHA),
    WriteBegin(Target.NVS, "app", "wifi_ssid", NvsType.STRING, 3, SHA, b"lab"),
    WriteBegin(Target.NVS, "app", "empty", NvsType.BLOB, 0, SHA, b""),
    WriteBegin(Target.CERT, "pki", "cert", NvsType.BLOB, 5000, SHA),
    WriteChunk(1014, b"\x00" * 1014),
    WriteReply(2028),
    WriteEnd(),
    Read(Target.CSR),
    Read(Target.NVS, "app", "serial", 979, 500),
    ReadReply(5000, SHA, b"abc"),
    Status(),
    StatusReply(StateFlag.SECURED, ErrorCode.LOCKED),
    Finish(),
    Erase(),
    Ack(),
    ErrorReply(ErrorCode.KEY_MISMATCH, "certificate key differs"),
    ErrorReply(ErrorCode.INTERNAL),
    Busy(),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    assert type(msg).decode(msg.encode()) == msg


def test_registry_pairs_every_request_with_its_reply() -> None:
    assert REGISTRY[MsgType.HELLO] == (Hello, HelloReply)
    assert REGISTRY[MsgType.WRITE_CHUNK] == (WriteChunk, WriteReply)
    assert REGISTRY[MsgType.FINISH] == (Finish, Ack)
    assert REGISTRY[MsgType.ERASE] == (Erase, Ack)
    for mtype, (request, _) in REGISTRY.items():
        assert request.TYPE == mtype and 0x01 <= mtype <= 0x3F
        assert request.reply_type() == mtype | 0x80


def test_optional_fields_absent_and_empty_payloads() -> None:
    assert ErrorReply(ErrorCode.BUSY).encode() == bytes([Tag.CODE, 1, 0, 0x0C])
    assert Status().encode() == b""
    assert CsrBuild.decode(CsrBuild("x").encode()).subject_o is None


def field(tag: int, value: bytes) -> bytes:
    return encode_tlv([(tag, value)])


def test_unknown_tag_ignored() -> None:
    payload = field(0xEE, b"from the future") + Keygen(KeyType.EC_P256).encode()
    assert Keygen.decode(payload) == Keygen(KeyType.EC_P256)


@pytest.mark.parametrize(
    "payload",
    [
        field(Tag.KEY_TYPE, b"\x01") * 2,  # duplicate tag
        field(Tag.KEY_TYPE, b"\x01")[:-1],  # truncated value
        bytes([Tag.KEY_TYPE, 1]),  # truncated header
        field(Tag.KEY_TYPE, b"\x01\x00"),  # wrong width
        field(0xEE, b"x") + bytes([Tag.KEY_TYPE, 0xFF, 0xFF]),  # overrun
        b"",  # missing required field
    ],
    ids=["duplicate", "truncated", "short-header", "width", "overrun", "missing"],
)
def test_malformed_payload_refused(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        Keygen.decode(payload)


def test_unknown_enum_values_refused_with_their_code() -> None:
    with pytest.raises(BadPayload) as info:
        Keygen.decode(field(Tag.KEY_TYPE, b"\x09"))
    assert info.value.code is ErrorCode.UNSUPPORTED_KEY_TYPE
    with pytest.raises(BadPayload) as info:
        Read.decode(Read(Target.CSR).encode().replace(bytes([Tag.TARGET, 1, 0, 1]),
                                                      bytes([Tag.TARGET, 1, 0, 9])))
    assert info.value.code is ErrorCode.BAD_PAYLOAD


def hello_reply_with(tag: Tag, value: bytes) -> bytes:
    fields = decode_tlv(HELLO_REPLY.encode())
    fields[tag] = value
    return encode_tlv(list(fields.items()))


@pytest.mark.parametrize(
    "tag, value",
    [
        (Tag.CHIP_MODEL, b"esp32\xff"),  # bad UTF-8
        (Tag.MFG_FW_VERSION, b"\xc3\x28"),  # bad UTF-8
        (Tag.CHIP_MODEL, b"x" * 17),  # too long
        (Tag.MFG_FW_VERSION, "é".encode() * 17),  # 34 bytes, 17 characters
        (Tag.APP_FW_VERSION, b"1.0\n"),  # not printable
        (Tag.CHIP_MODEL, "esp32ç".encode()),  # names are ASCII
        (Tag.CHIP_ID, b"\x00" * 5),  # fixed size
        (Tag.MAX_PAYLOAD, (100).to_bytes(2, "little")),  # below the minimum
    ],
)
def test_bad_strings_and_values_refused(tag: Tag, value: bytes) -> None:
    with pytest.raises(BadPayload):
        HelloReply.decode(hello_reply_with(tag, value))


def test_encode_refuses_what_decode_would() -> None:
    with pytest.raises(BadPayload):
        CsrBuild("x" * 65).encode()
    with pytest.raises(BadPayload):
        Read(Target.NVS, "a-namespace-too-long", "k").encode()
    with pytest.raises(BadPayload):
        WriteChunk(-1, b"").encode()
    with pytest.raises(BadPayload):
        WriteChunk(0, bytes(1020)).encode()  # more than MAX_PAYLOAD


def test_error_detail_is_sanitised_not_refused() -> None:
    payload = field(Tag.CODE, b"\x0a") + field(Tag.DETAIL, b"nvs \xff\x1b[2J" + b"x" * 300)
    reply = ErrorReply.decode(payload)
    assert reply.code is ErrorCode.STORAGE
    assert reply.detail.isprintable() and len(reply.detail) == 128
    assert ErrorReply.decode(field(Tag.CODE, b"\x55")).code is ErrorCode.INTERNAL


def test_device_error_message() -> None:
    error = DeviceError(ErrorCode.KEY_MISMATCH, "bad\nkey", "WRITE_END")
    assert error.code is ErrorCode.KEY_MISMATCH and error.detail == "bad?key"
    assert str(error) == ("The device refused WRITE_END with KEY_MISMATCH: the certificate's "
                          "public key is not the device's key (bad?key).")
    assert all(code.sentence.endswith(".") for code in ErrorCode)


def test_validate_object() -> None:
    validate_object(Target.NVS, "app", "n", NvsType.U16, b"\x01\x00")
    for args in [
        (Target.CSR, "a", "b", NvsType.BLOB, b""),
        (Target.NVS, "", "b", NvsType.BLOB, b""),
        (Target.NVS, "a", "b", NvsType.U32, b"\x01"),
        (Target.NVS, "a", "b", NvsType.STRING, b"a\0b"),
        (Target.CERT, "a", "b", NvsType.STRING, b"x"),
    ]:
        with pytest.raises(BadPayload):
            validate_object(*args)
    with pytest.raises(BadPayload) as info:
        validate_object(Target.CERT, "a", "b", NvsType.BLOB, bytes(4097))
    assert info.value.code is ErrorCode.TOO_LARGE


def test_nvs_values() -> None:
    assert nvs_encode(NvsType.I16, -2) == b"\xfe\xff"
    assert nvs_decode(NvsType.I16, b"\xfe\xff") == -2
    assert nvs_decode(NvsType.STRING, nvs_encode(NvsType.STRING, "ü")) == "ü"
    with pytest.raises(BadPayload):
        nvs_encode(NvsType.U8, 256)
