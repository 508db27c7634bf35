"""The device's end of the protocol, transport-agnostic: bytes in, frames dispatched, bytes out.

The handler is one callable: it receives the decoded request dataclass (``Hello``,
``Keygen``...) and returns the reply dataclass its registry entry names (``HelloReply``,
``Ack``...), or raises ``DeviceFault(code, detail)`` (or ``BadPayload``) to answer ERROR.
Device state (keys, NVS, the LOCKED rule) is the handler's business; this module only
guarantees that every request gets exactly one reply and that nothing the station sends
can stop the loop. While a handler runs longer than ``keepalive_interval``, BUSY frames
are sent on its behalf from a helper thread.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from stampline.protocol.messages import (
    REGISTRY,
    BadPayload,
    ErrorCode,
    ErrorReply,
    Hello,
    Message,
    MsgType,
    Request,
    sanitize,
)
from stampline.protocol.wire import (
    VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    FrameErrorKind,
    ProtocolError,
    encode_frame,
)

log = logging.getLogger(__name__)

Handler = Callable[[Request[Any]], Message]
KEEPALIVE_INTERVAL = 1.0


class DeviceFault(Exception):
    """Raised by a handler to answer the request with ERROR ``code``."""

    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        super().__init__(f"{code.name}: {detail}" if detail else code.name)
        self.code = code
        self.detail = sanitize(detail)


class DeviceServer:
    """Reads frames with ``read(n)``, answers them with ``write(data)``.

    ``read(n)`` returns up to n bytes, or b"" when nothing arrived within a short time (it
    must not block for long, so that ``serve_forever`` notices its stop event); it raises
    OSError or EOFError when the line is gone, which ends ``serve_forever``.
    """

    def __init__(self, handler: Handler, read: Callable[[int], bytes],
                 write: Callable[[bytes], Any], *,
                 keepalive_interval: float = KEEPALIVE_INTERVAL) -> None:
        self._handler = handler
        self._read = read
        self._write = write
        self._write_lock = threading.Lock()
        self._decoder = FrameDecoder()
        self.keepalive_interval = keepalive_interval

    @classmethod
    def for_fd(cls, handler: Handler, fd: int, *, keepalive_interval: float = KEEPALIVE_INTERVAL,
               poll: float = 0.05) -> DeviceServer:
        """A server on a file descriptor, e.g. the master side of a pty."""

        def read(n: int) -> bytes:
            if not select.select([fd], [], [], poll)[0]:
                return b""
            data = os.read(fd, n)
            if not data:
                raise EOFError("end of file")
            return data

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        return cls(handler, read, write, keepalive_interval=keepalive_interval)

    def send(self, frame: Frame) -> None:
        """Write one frame (thread-safe: keep-alives are written from another thread)."""
        data = encode_frame(frame)
        with self._write_lock:
            self._write(data)

    def serve_forever(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set or the line is gone."""
        while not stop.is_set():
            try:
                data = self._read(4096)
            except (OSError, EOFError) as e:
                log.debug("protocol line closed: %s", e)
                return
            if data:
                try:
                    self.feed(data)
                except (OSError, EOFError) as e:
                    log.debug("protocol line closed: %s", e)
                    return

    def feed(self, data: bytes) -> None:
        """Decode ``data`` and answer every complete frame in it."""
        for item in self._decoder.feed(data):
            if isinstance(item, FrameError):
                code = (ErrorCode.UNSUPPORTED_VERSION if item.kind is FrameErrorKind.BAD_VERSION
                        else ErrorCode.BAD_FRAME)
                self._send_error(item.request_id or 0, code, item.reason)
            else:
                self._answer(item)

    def _send_error(self, request_id: int, code: ErrorCode, detail: str) -> None:
        self.send(Frame(MsgType.ERROR, request_id, ErrorReply(code, detail).encode()))

    def _answer(self, frame: Frame) -> None:
        if frame.request_id == 0:
            self._send_error(0, ErrorCode.BAD_FRAME, "request id 0 is reserved")
            return
        entry = REGISTRY.get(frame.type)  # type: ignore[call-overload]
        if entry is None:
            self._send_error(frame.request_id, ErrorCode.UNKNOWN_TYPE, f"type 0x{frame.type:02X}")
            return
        request_cls, reply_cls = entry
        try:
            request = request_cls.decode(frame.payload)
        except BadPayload as e:
            self._send_error(frame.request_id, e.code, e.reason)
            return
        if isinstance(request, Hello) and request.proto < VERSION:
            # PROTO is the newest version the station speaks; this device speaks VERSION.
            self._send_error(frame.request_id, ErrorCode.UNSUPPORTED_VERSION,
                             f"station speaks {request.proto}, device {VERSION}")
            return
        try:
            reply = self._run(request, frame.request_id)
            if not isinstance(reply, reply_cls):
                raise TypeError(f"{type(reply).__name__} is no reply to {request_cls.__name__}")
            payload = reply.encode()
        except DeviceFault as e:
            self._send_error(frame.request_id, e.code, e.detail)
        except BadPayload as e:
            self._send_error(frame.request_id, e.code, e.reason)
        except Exception as e:  # noqa: BLE001 - a handler bug must not take the device down
            log.exception("handler failed on %s", request_cls.__name__)
            self._send_error(frame.request_id, ErrorCode.INTERNAL, type(e).__name__)
        else:
            self.send(Frame(request_cls.reply_type(), frame.request_id, payload))

    def _run(self, request: Request[Any], request_id: int) -> Message:
        """Call the handler, sending BUSY every keep-alive interval until it returns."""
        done = threading.Event()

        def keepalive() -> None:
            while not done.wait(self.keepalive_interval):
                try:
                    self.send(Frame(MsgType.BUSY, request_id))
                except (OSError, ProtocolError):
                    return

        thread = threading.Thread(target=keepalive, name="stampline-busy", daemon=True)
        thread.start()
        try:
            return self._handler(request)
        finally:
            done.set()
            thread.join()
