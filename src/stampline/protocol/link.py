"""The station's end of the protocol: one request at a time over any pyserial port.

Everything the device sends is untrusted: replies are matched by request id and type, parsed
strictly, and any byte that is not part of a well-formed frame while a request is outstanding
fails that request. The device must therefore not log on the protocol port.

Every error of the port itself (pyserial's, the OS's, termios') is a ``LinkLost``: the device went
away (unplugged, reset, powered off, re-enumerated on USB). The caller decides whether to wait for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Self, TypeVar

import serial

try:
    import termios
    _TERMIOS_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - Windows has no termios
    _TERMIOS_ERRORS = ()

from stampline.protocol.messages import (
    CHUNK_OVERHEAD,
    MAX_PAYLOAD,
    READ_OVERHEAD,
    BadPayload,
    DeviceError,
    ErrorCode,
    ErrorReply,
    FlashBegin,
    FlashData,
    FlashEnd,
    FlashHash,
    HelloReply,
    Message,
    MsgType,
    NvsType,
    Read,
    ReadReply,
    Request,
    Target,
    WriteBegin,
    WriteChunk,
    WriteEnd,
    WriteReply,
    max_object_size,
    type_name,
    validate_object,
)
from stampline.protocol.wire import Frame, FrameDecoder, FrameError, ProtocolError, encode_frame

R = TypeVar("R", bound=Message)
Tap = Callable[[str, bytes], None]

POLL_INTERVAL = 0.02  # the port's read timeout: how often a waiting request checks its deadline
KEEPALIVE_TIMEOUT = 2.0  # silence allowed after a BUSY (the device sends one every 1 s)
DEFAULT_HARD_TIMEOUT = 60.0  # cap on BUSY extensions when the caller gives none


class LinkTimeout(ProtocolError):
    """The device did not answer in time."""


class LinkLost(ProtocolError):
    """The port failed under the link: the device went away (a reset, a power cut, the cable, USB
    re-enumeration). The link is dead; a new one may be opened when the device is back."""


PORT_ERRORS: tuple[type[Exception], ...] = (serial.SerialException, OSError, *_TERMIOS_ERRORS)


def _reason(e: Exception) -> str:
    if isinstance(e, _TERMIOS_ERRORS) and len(e.args) == 2:  # termios.error(5, 'Input/output error')
        return f"[Errno {e.args[0]}] {e.args[1]}"
    return str(e)


@contextmanager
def _port_errors(what: str) -> Iterator[None]:
    """Turn any error of the port (pyserial, OS, termios) into ``LinkLost`` saying what failed."""
    try:
        yield
    except PORT_ERRORS as e:
        raise LinkLost(f"{what} failed: {_reason(e)}.") from e


class Link:
    """Request/response with one device over an open pyserial port (or anything like one).

    The port's read timeout is set to ``POLL_INTERVAL``: reads must return promptly.

    ``tap`` is called with ("tx" | "rx", bytes) for every write and read, e.g. to log the line.
    ``tx_bytes`` / ``rx_bytes`` count the traffic, ``stale_frames`` the replies discarded
    because they answered an earlier request.
    """

    def __init__(self, port: Any, *, tap: Tap | None = None,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self._port = port
        with _port_errors("Configuring the serial port"):
            self._port.timeout = POLL_INTERVAL
        self._tap = tap
        self._decoder = FrameDecoder()
        self._last_id = 0
        self.keepalive_timeout = keepalive_timeout
        self.max_payload = MAX_PAYLOAD  # lowered to the device's own limit by HELLO
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.stale_frames = 0
        self._reopen: Callable[[str], Link] | None = None
        self.url = ""  # the port's name, when opened by ``open``

    @classmethod
    def open(cls, url: str, baudrate: int = 115200, *, tap: Tap | None = None,
             keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> Link:
        """Open a port: a device path, a pty, ``socket://host:port``, ``loop://``."""
        try:
            port = serial.serial_for_url(url, baudrate=baudrate, timeout=POLL_INTERVAL)
        except ValueError as e:
            raise ProtocolError(f"Cannot open the serial port {url}: {e}.") from e
        except PORT_ERRORS as e:
            raise LinkLost(f"Cannot open the serial port {url}: {_reason(e)}.") from e
        try:
            link = cls(port, tap=tap, keepalive_timeout=keepalive_timeout)
        except LinkLost:
            with suppress(*PORT_ERRORS):
                port.close()
            raise
        link.url = url
        link._reopen = lambda name: cls.open(name, baudrate, tap=tap, keepalive_timeout=keepalive_timeout)
        return link

    def reopen(self, url: str | None = None) -> Link:
        """A new link on the same port (after the line dropped), or on ``url`` with the same
        settings; this one must be closed."""
        if self._reopen is None:
            raise ProtocolError("This link was not opened from a port name and cannot be reopened.")
        return self._reopen(url or self.url)

    def close(self) -> None:
        """Close the port; a port that is already gone closes quietly."""
        with suppress(*PORT_ERRORS):
            self._port.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_id(self) -> int:
        self._last_id = self._last_id % 0xFFFF + 1  # 1..65535: 0 is for unsolicited frames
        return self._last_id

    def _write(self, data: bytes) -> None:
        if self._tap:
            self._tap("tx", data)
        with _port_errors("Writing to the serial port"):
            self._port.write(data)
        self.tx_bytes += len(data)

    def _read(self) -> bytes:
        with _port_errors("Reading from the serial port"):
            data: bytes = self._port.read(max(1, self._port.in_waiting))
        if data:
            self.rx_bytes += len(data)
            if self._tap:
                self._tap("rx", data)
        return data

    def request(self, msg: Request[R], *, timeout: float = 2.0,
                hard_timeout: float | None = None) -> R:
        """Send ``msg`` and return its reply.

        ``timeout`` bounds the silence before the reply; each BUSY keep-alive from the device
        allows ``keepalive_timeout`` more, but never beyond ``hard_timeout`` after sending.
        """
        name = msg.TYPE.name
        request_id = self._next_id()
        frame = encode_frame(Frame(msg.TYPE, request_id, msg.encode()))
        with _port_errors("Reading from the serial port"):
            self._port.reset_input_buffer()  # drop anything left from earlier requests
        self._decoder.reset()
        self._write(frame)
        start = time.monotonic()
        hard = start + (DEFAULT_HARD_TIMEOUT if hard_timeout is None else hard_timeout)
        deadline = min(start + timeout, hard)
        while True:
            if time.monotonic() >= deadline:
                waited = time.monotonic() - start
                raise LinkTimeout(f"The device did not answer {name} within {waited:.1f} s.")
            data = self._read()
            if not data:
                continue
            skipped = self._decoder.skipped
            frames = []
            for item in self._decoder.feed(data):
                if isinstance(item, FrameError):
                    raise ProtocolError(
                        f"The device sent a corrupt frame ({item.reason}) while answering {name}."
                    )
                frames.append(item)
            if self._decoder.skipped != skipped:
                raise ProtocolError(
                    f"The device sent {self._decoder.skipped - skipped} bytes that are not "
                    f"part of a frame while answering {name}."
                )
            for frame in frames:
                if frame.request_id != request_id:
                    self.stale_frames += 1
                elif frame.type == MsgType.BUSY:
                    deadline = min(max(deadline, time.monotonic() + self.keepalive_timeout), hard)
                else:
                    return self._reply(msg, frame)

    def _reply(self, msg: Request[R], frame: Frame) -> R:
        name = msg.TYPE.name
        if frame.type == MsgType.ERROR:
            try:
                error = ErrorReply.decode(frame.payload)
            except BadPayload as e:
                raise ProtocolError(
                    f"The device sent a malformed ERROR reply to {name}: {e.reason}."
                ) from e
            raise DeviceError(error.code, error.detail, name)
        if frame.type != msg.reply_type():
            raise ProtocolError(
                f"The device answered {name} with an unexpected {type_name(frame.type)} frame."
            )
        try:
            reply = msg.REPLY.decode(frame.payload)
        except BadPayload as e:
            raise ProtocolError(f"The device sent a malformed reply to {name}: {e.reason}.") from e
        if isinstance(reply, HelloReply):
            self.max_payload = min(MAX_PAYLOAD, reply.max_payload)
        return reply  # type: ignore[return-value]

    def _request_retry(self, msg: Request[R], timeout: float) -> R:
        """Send an idempotent request, once more if its request or reply was lost or damaged."""
        try:
            return self.request(msg, timeout=timeout)
        except LinkTimeout:
            pass
        except DeviceError as e:
            if e.code != ErrorCode.BAD_FRAME:
                raise
        return self.request(msg, timeout=timeout)

    def write_object(self, target: Target, namespace: str, key: str, nvs_type: NvsType,
                     data: bytes, *, timeout: float = 2.0) -> None:
        """Write one object: inline in WRITE_BEGIN if it fits, else BEGIN, CHUNKs and END."""
        validate_object(target, namespace, key, nvs_type, data)
        digest = hashlib.sha256(data).digest()
        begin = WriteBegin(Target(target), namespace, key, NvsType(nvs_type), len(data), digest)
        if len(begin.encode()) + 3 + len(data) <= self.max_payload:  # DATA inline: 3 + n bytes
            inline = dataclasses.replace(begin, data=data)
            self._expect_offset(self._request_retry(inline, timeout), len(data))
            return
        self._expect_offset(self._request_retry(begin, timeout), 0)
        size = self.max_payload - CHUNK_OVERHEAD
        for offset in range(0, len(data), size):
            chunk = data[offset : offset + size]
            reply = self._request_retry(WriteChunk(offset, chunk), timeout)
            self._expect_offset(reply, offset + len(chunk))
        self._request_retry(WriteEnd(), timeout)

    @staticmethod
    def _expect_offset(reply: WriteReply, expected: int) -> None:
        if reply.next_offset != expected:
            raise ProtocolError(
                f"The device expects offset {reply.next_offset} where {expected} was due."
            )

    def read_object(self, target: Target, namespace: str = "", key: str = "", *,
                    timeout: float = 2.0) -> bytes:
        """Read one object in chunks and check it against the SHA-256 the device announced."""
        target = Target(target)
        limit = max_object_size(target)
        max_len = self.max_payload - READ_OVERHEAD
        data = bytearray()
        first: ReadReply | None = None
        while first is None or len(data) < first.total:
            reply = self._request_retry(Read(target, namespace, key, len(data), max_len), timeout)
            if first is None:
                if reply.total > limit:
                    raise ProtocolError(
                        f"The device announced a {reply.total}-byte {target.name} object, "
                        f"more than the {limit}-byte limit."
                    )
                first = reply
            elif (reply.total, reply.sha256) != (first.total, first.sha256):
                raise ProtocolError(f"The device's {target.name} object changed while being read.")
            if len(reply.data) > max_len or len(data) + len(reply.data) > first.total:
                raise ProtocolError(f"The device sent more {target.name} data than asked for.")
            if len(reply.data) < min(max_len, first.total - len(data)):
                raise ProtocolError(f"The device sent a short {target.name} chunk ({len(reply.data)} bytes).")
            data += reply.data
        if hashlib.sha256(data).digest() != first.sha256:
            raise ProtocolError(f"The {target.name} object read from the device fails its SHA-256.")
        return bytes(data)

    def flash(self, address: int, image: bytes, *, timeout: float = 5.0,
              compressed: bytes | None = None) -> int:
        """Write ``image`` at ``address``: zlib-compressed, in chunks, then checked by a SHA-256
        the device computes over what it wrote. Resumes where the device says an interrupted
        transfer of the same image stopped. Returns the compressed bytes actually sent."""
        packed = compressed if compressed is not None else zlib.compress(image, 9)
        digest = hashlib.sha256(image).digest()
        begin = self.request(FlashBegin(address, len(image), len(packed), digest), timeout=timeout,
                             hard_timeout=max(timeout, 60.0))
        start = begin.next_offset
        if start > len(packed):
            raise ProtocolError(f"The device resumes a flash transfer at {start}, past its end.")
        size = self.max_payload - CHUNK_OVERHEAD
        for offset in range(start, len(packed), size):
            chunk = packed[offset : offset + size]
            self._expect_offset(self._request_retry(FlashData(offset, chunk), timeout), offset + len(chunk))
        self.request(FlashEnd(), timeout=timeout, hard_timeout=max(timeout, 120.0))
        if self.request(FlashHash(address, len(image)), timeout=timeout, hard_timeout=120.0).sha256 != digest:
            raise ProtocolError(f"The flash at 0x{address:x} does not read back as the image written.")
        return len(packed) - start

