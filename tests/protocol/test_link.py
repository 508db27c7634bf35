"""The station's Link against small fake devices on a pty (and one on a TCP socket)."""

import hashlib
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from stampline.protocol.link import Link, LinkTimeout
from stampline.protocol.messages import (
    Ack,
    BadPayload,
    DeviceError,
    ErrorCode,
    ErrorReply,
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
    Target,
    WriteBegin,
    WriteChunk,
    WriteEnd,
    WriteReply,
    validate_object,
)
from stampline.protocol.server import DeviceFault, DeviceServer
from stampline.protocol.wire import Frame, FrameDecoder, ProtocolError, encode_frame

CHIP_ID = bytes.fromhex("246f28010203")


class FakeDevice:
    """Just enough of a device: HELLO, STATUS, KEYGEN and the chunked object transfers."""

    def __init__(self) -> None:
        self.objects: dict[tuple[int, str, str], bytes] = {}
        self.requests: list[object] = []
        self.keygen_seconds = 0.0
        self.server: DeviceServer | None = None
        self.on_status: Callable[[], None] | None = None
        self.corrupt_reads = False
        self._open: dict | None = None
        self._last_chunk: tuple[int, int] | None = None

    def __call__(self, request):
        self.requests.append(request)
        match request:
            case Hello():
                return HelloReply(CHIP_ID, "esp32c3", 3, "mfg-1.0", "", 1024, StateFlag(0))
            case Status():
                if self.on_status:
                    self.on_status()
                return StatusReply(StateFlag.KEY_PRESENT)
            case Keygen(key_type=KeyType.EC_P256):
                time.sleep(self.keygen_seconds)
                return KeygenReply(KeyType.EC_P256)
            case Keygen():
                raise DeviceFault(ErrorCode.UNSUPPORTED_KEY_TYPE, "only P-256")
            case WriteBegin():
                self._open = {"begin": request, "data": bytearray()}
                if request.data is None:
                    return WriteReply(0)
                self._open["data"] += request.data
                self._commit()
                return WriteReply(request.total)
            case WriteChunk(offset=offset, data=data):
                if self._open is None:
                    raise DeviceFault(ErrorCode.BAD_STATE, "no transfer")
                received = self._open["data"]
                if self._last_chunk == (offset, len(data)) and offset + len(data) == len(received):
                    return WriteReply(len(received))  # a retried chunk
                if offset != len(received):
                    raise DeviceFault(ErrorCode.OUT_OF_ORDER)
                received += data
                self._last_chunk = (offset, len(data))
                return WriteReply(len(received))
            case WriteEnd():
                if self._open is None:
                    raise DeviceFault(ErrorCode.BAD_STATE, "no transfer")
                self._commit()
                return Ack()
            case Read(target=target, namespace=ns, key=key, offset=offset, max_len=max_len):
                value = self.objects.get((target, ns, key))
                if value is None:
                    raise DeviceFault(ErrorCode.NOT_FOUND, f"{ns}/{key}")
                digest = hashlib.sha256(value).digest()
                data = value[offset : offset + max_len]
                if self.corrupt_reads:
                    data = bytes(b ^ 1 for b in data)
                return ReadReply(len(value), digest, data)
        raise AssertionError(request)

    def _commit(self) -> None:
        begin, data = self._open["begin"], bytes(self._open["data"])
        try:
            validate_object(begin.target, begin.namespace, begin.key, begin.nvs_type, data)
        except BadPayload as e:
            raise DeviceFault(e.code, e.reason) from None
        if len(data) != begin.total or hashlib.sha256(data).digest() != begin.sha256:
            raise DeviceFault(ErrorCode.HASH_MISMATCH)
        self.objects[(begin.target, begin.namespace, begin.key)] = data
        self._open = None


@contextmanager
def pty_device(serve: Callable[[int, threading.Event], None] | None,
               **link_args) -> Iterator[Link]:
    """A Link on a pty whose other end is served by ``serve(fd, stop)`` in a thread."""
    master, slave = os.openpty()
    stop = threading.Event()
    thread = None
    if serve:
        thread = threading.Thread(target=serve, args=(master, stop), daemon=True)
        thread.start()
    link = Link.open(os.ttyname(slave), **link_args)
    try:
        yield link
    finally:
        stop.set()
        if thread:
            thread.join(2)
        link.close()
        os.close(slave)
        os.close(master)


def serving(device: FakeDevice, keepalive: float = 1.0):
    def serve(fd: int, stop: threading.Event) -> None:
        device.server = DeviceServer.for_fd(device, fd, keepalive_interval=keepalive)
        device.server.serve_forever(stop)

    return serve


def responding(respond: Callable[[Frame], bytes]):
    """A raw device: answers each frame with whatever bytes ``respond`` returns."""

    def serve(fd: int, stop: threading.Event) -> None:
        decoder = FrameDecoder()
        while not stop.is_set():
            if select.select([fd], [], [], 0.02)[0]:
                for frame in decoder.feed(os.read(fd, 4096)):
                    os.write(fd, respond(frame))

    return serve


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


def test_request_reply_and_tap(device: FakeDevice) -> None:
    line: list[tuple[str, bytes]] = []
    with pty_device(serving(device), tap=lambda d, b: line.append((d, b))) as link:
        link.max_payload = 300
        reply = link.request(Hello())
        assert reply.chip_id == CHIP_ID and reply.chip_model == "esp32c3"
        assert link.max_payload == 1024  # taken from the reply
        assert link.request(Status()).state == StateFlag.KEY_PRESENT
        tx = b"".join(b for d, b in line if d == "tx")
        rx = b"".join(b for d, b in line if d == "rx")
        assert tx == encode_frame(Frame(MsgType.HELLO, 1, Hello().encode())) + encode_frame(
            Frame(MsgType.STATUS, 2, b""))
        assert FrameDecoder().feed(rx)[0] == Frame(MsgType.HELLO_REPLY, 1, reply.encode())
        assert (link.tx_bytes, link.rx_bytes) == (len(tx), len(rx))


def test_stale_replies_skipped(device: FakeDevice) -> None:
    def send_stale() -> None:
        device.server.send(Frame(MsgType.STATUS_REPLY, 0x7777, StatusReply(StateFlag(0)).encode()))
        device.server.send(Frame(MsgType.ERROR, 0, b""))

    device.on_status = send_stale
    device.keygen_seconds = 0.3
    with pty_device(serving(device)) as link:
        with pytest.raises(LinkTimeout):
            link.request(Keygen(KeyType.EC_P256), timeout=0.1)
        # The late KEYGEN reply arrives while STATUS is outstanding, then two more strays.
        assert link.request(Status(), timeout=1.0).state == StateFlag.KEY_PRESENT
        assert link.stale_frames == 3


def test_busy_extends_the_deadline_up_to_the_hard_cap(device: FakeDevice) -> None:
    device.keygen_seconds = 0.35
    with pty_device(serving(device, keepalive=0.05), keepalive_timeout=0.12) as link:
        start = time.monotonic()
        reply = link.request(Keygen(KeyType.EC_P256), timeout=0.12, hard_timeout=2.0)
        assert reply.key_type is KeyType.EC_P256
        assert time.monotonic() - start >= 0.35
        start = time.monotonic()
        with pytest.raises(LinkTimeout, match="KEYGEN"):
            link.request(Keygen(KeyType.EC_P256), timeout=0.12, hard_timeout=0.2)
        assert time.monotonic() - start >= 0.2  # the device would answer at 0.35 s: the cap, not the reply, ended it


def test_busy_does_not_help_without_keepalives(device: FakeDevice) -> None:
    device.keygen_seconds = 0.3
    with pty_device(serving(device, keepalive=5.0)) as link:
        with pytest.raises(LinkTimeout):
            link.request(Keygen(KeyType.EC_P256), timeout=0.15, hard_timeout=2.0)


def test_error_reply_raises_device_error(device: FakeDevice) -> None:
    with pty_device(serving(device)) as link:
        with pytest.raises(DeviceError, match="KEYGEN") as info:
            link.request(Keygen(KeyType.RSA_2048))
        assert info.value.code is ErrorCode.UNSUPPORTED_KEY_TYPE
        assert info.value.detail == "only P-256"
        # An unknown key type is refused by the server's decoder with the same code.
        with pytest.raises(DeviceError) as info:
            link.request(Keygen(9))  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.UNSUPPORTED_KEY_TYPE
        with pytest.raises(DeviceError) as info:
            link.read_object(Target.NVS, "app", "missing")
        assert info.value.code is ErrorCode.NOT_FOUND


def test_silence_times_out_within_the_timeout() -> None:
    with pty_device(None) as link:
        start = time.monotonic()
        with pytest.raises(LinkTimeout, match="HELLO"):
            link.request(Hello(), timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.5


@pytest.mark.parametrize(
    "respond, match",
    [
        (lambda f: random.Random(f.request_id).randbytes(64), "not part of a frame"),
        (lambda f: encode_frame(Frame(MsgType.HELLO_REPLY, f.request_id, b"x"))[:-1] + b"\0",
         "corrupt frame"),
        (lambda f: encode_frame(Frame(MsgType.STATUS_REPLY, f.request_id, b"")),
         "unexpected STATUS_REPLY"),
        (lambda f: encode_frame(Frame(MsgType.HELLO_REPLY, f.request_id, b"")),
         "malformed reply to HELLO: the required field CHIP_ID is missing"),
        (lambda f: encode_frame(Frame(MsgType.ERROR, f.request_id, b"\x19\x01")),
         "malformed ERROR reply to HELLO"),
    ],
    ids=["noise", "crc", "wrong-type", "bad-payload", "bad-error"],
)
def test_misbehaving_device_raises_protocol_error(respond, match: str) -> None:
    with pty_device(responding(respond)) as link:
        start = time.monotonic()
        with pytest.raises(ProtocolError, match=match) as info:
            link.request(Hello(), timeout=0.5)
        assert not isinstance(info.value, (LinkTimeout, DeviceError))
        assert time.monotonic() - start < 0.45


def test_chunked_write_and_read_of_5000_bytes(device: FakeDevice) -> None:
    blob = random.Random(5).randbytes(5000)
    with pty_device(serving(device)) as link:
        link.write_object(Target.NVS, "app", "blob", NvsType.BLOB, blob)
        kinds = [type(r) for r in device.requests]
        assert kinds == [WriteBegin] + [WriteChunk] * 5 + [WriteEnd]
        assert device.objects[(Target.NVS, "app", "blob")] == blob
        del device.requests[:]
        assert link.read_object(Target.NVS, "app", "blob") == blob
        assert [r.offset for r in device.requests] == [0, 979, 1958, 2937, 3916, 4895]
        device.corrupt_reads = True
        with pytest.raises(ProtocolError, match="SHA-256"):
            link.read_object(Target.NVS, "app", "blob")


def test_small_write_is_one_round_trip(device: FakeDevice) -> None:
    with pty_device(serving(device)) as link:
        link.write_object(Target.NVS, "app", "count", NvsType.U32, (7).to_bytes(4, "little"))
        assert len(device.requests) == 1 and device.requests[0].data == b"\x07\0\0\0"
        with pytest.raises(BadPayload):  # checked before anything is sent
            link.write_object(Target.NVS, "app", "count", NvsType.U32, b"\x07")
        assert len(device.requests) == 1


def test_lost_chunk_reply_is_retried_once(device: FakeDevice) -> None:
    blob = bytes(3000)
    dropped = []

    def serve(fd: int, stop: threading.Event) -> None:
        def write(data: bytes) -> None:
            if data[3] == MsgType.WRITE_CHUNK_REPLY and not dropped:
                dropped.append(data)  # the device processed the chunk, its reply is lost
                return
            os.write(fd, data)

        def read(n: int) -> bytes:
            return os.read(fd, n) if select.select([fd], [], [], 0.02)[0] else b""

        DeviceServer(device, read, write).serve_forever(stop)

    with pty_device(serve) as link:
        link.write_object(Target.NVS, "app", "blob", NvsType.BLOB, blob, timeout=0.2)
    chunks = [r.offset for r in device.requests if isinstance(r, WriteChunk)]
    assert chunks == [0, 0, 1014, 2028]
    assert device.objects[(Target.NVS, "app", "blob")] == blob


def test_read_refuses_a_total_that_changes(device: FakeDevice) -> None:
    with pty_device(serving(device)) as link:
        link.write_object(Target.NVS, "app", "blob", NvsType.BLOB, bytes(2000))
        original = device.__call__

        def growing(request):
            reply = original(request)
            if isinstance(request, Read) and request.offset:
                return ReadReply(reply.total + 1, reply.sha256, reply.data)
            return reply

        device.__class__ = type("Growing", (FakeDevice,), {"__call__": lambda s, r: growing(r)})
        with pytest.raises(ProtocolError, match="changed"):
            link.read_object(Target.NVS, "app", "blob")


def test_socket_url(device: FakeDevice) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(0.02)

        def read(n: int) -> bytes:
            try:
                data = conn.recv(n)
            except TimeoutError:
                return b""
            if not data:
                raise EOFError
            return data

        with conn:
            DeviceServer(device, read, conn.sendall).serve_forever(stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with Link.open(f"socket://127.0.0.1:{port}") as link:
            assert link.request(Hello()).chip_id == CHIP_ID
    finally:
        stop.set()
        thread.join(2)
        listener.close()


def test_open_failure_is_a_sentence() -> None:
    with pytest.raises(ProtocolError, match="Cannot open the serial port"):
        Link.open("/nonexistent/tty")


# DeviceServer on its own, fed bytes directly.


def server_replies(handler, data: bytes) -> list[Frame]:
    written: list[bytes] = []
    DeviceServer(handler, lambda n: b"", written.append).feed(data)
    frames = FrameDecoder().feed(b"".join(written))
    assert all(isinstance(f, Frame) for f in frames)
    return frames


def error_code(frame: Frame) -> ErrorCode:
    assert frame.type == MsgType.ERROR
    return ErrorReply.decode(frame.payload).code


def test_server_answers_every_kind_of_bad_input(device: FakeDevice) -> None:
    bad_crc = bytearray(encode_frame(Frame(MsgType.STATUS, 5, b"")))
    bad_crc[-1] ^= 0xFF
    v2 = bytearray(encode_frame(Frame(MsgType.STATUS, 6, b"")))
    v2[2] = 2
    inputs = [
        bytes(bad_crc),
        bytes(v2),
        encode_frame(Frame(MsgType.STATUS, 0, b"")),
        encode_frame(Frame(0x26, 7, b"")),  # reserved
        encode_frame(Frame(MsgType.HELLO_REPLY, 8, b"")),
        encode_frame(Frame(MsgType.READ, 9, b"\x0f\x01\x00")),  # truncated field
        encode_frame(Frame(MsgType.HELLO, 10, b"\x01\x01\x00\x00")),  # PROTO 0
        encode_frame(Frame(MsgType.STATUS, 11, b"")),
    ]
    replies = server_replies(device, b"noise" + b"".join(inputs))
    answers = [(f.request_id, error_code(f) if f.type == MsgType.ERROR else f.type)
               for f in replies]
    assert answers == [
        (5, ErrorCode.BAD_FRAME),
        (6, ErrorCode.UNSUPPORTED_VERSION),
        (0, ErrorCode.BAD_FRAME),
        (7, ErrorCode.UNKNOWN_TYPE),
        (8, ErrorCode.UNKNOWN_TYPE),
        (9, ErrorCode.BAD_PAYLOAD),
        (10, ErrorCode.UNSUPPORTED_VERSION),
        (11, MsgType.STATUS_REPLY),
    ]


def test_server_survives_handler_bugs() -> None:
    def handler(request):
        if isinstance(request, Hello):
            raise KeyError("bug")
        return Ack()  # the wrong reply class for STATUS

    frames = [Frame(MsgType.HELLO, 1, Hello().encode()), Frame(MsgType.STATUS, 2, b""),
              Frame(MsgType.FINISH, 3, b"")]
    replies = server_replies(handler, b"".join(encode_frame(f) for f in frames))
    assert [error_code(f) for f in replies[:2]] == [ErrorCode.INTERNAL, ErrorCode.INTERNAL]
    assert replies[2] == Frame(MsgType.FINISH_REPLY, 3, b"")
