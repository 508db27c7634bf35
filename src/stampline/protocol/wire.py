"""Framing of the station/device serial protocol: header, CRC-32 and an incremental decoder.

A frame is ``"SL" | version u8 | type u8 | request id u16 | length u16 | payload | crc32 u32``,
integers little-endian, the CRC (zlib's CRC-32) covering version through payload. The decoder
treats its input as hostile: it never waits for more than one maximum-size frame, resynchronises
on the magic after any error and keeps its buffer bounded whatever it is fed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import Enum

from stampline.errors import StamplineError

MAGIC = b"SL"
VERSION = 1
MAX_PAYLOAD = 1024
HEADER_SIZE = 8
CRC_SIZE = 4
MAX_FRAME_SIZE = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE

_HEADER = struct.Struct("<2sBBHH")
_CRC = struct.Struct("<I")


class ProtocolError(StamplineError):
    """The serial protocol failed: a bad frame, a bad reply or a silent device."""


@dataclass(frozen=True)
class Frame:
    """One frame, checked on construction so that every Frame can be encoded."""

    type: int
    request_id: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFF:
            raise ProtocolError(f"The message type {self.type} does not fit in one byte.")
        if not 0 <= self.request_id <= 0xFFFF:
            raise ProtocolError(f"The request id {self.request_id} does not fit in 16 bits.")
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(
                f"A {len(self.payload)}-byte payload exceeds the {MAX_PAYLOAD}-byte frame limit."
            )


class FrameErrorKind(Enum):
    BAD_CRC = "bad CRC"
    BAD_VERSION = "unsupported version"
    TOO_LONG = "payload too long"


@dataclass(frozen=True)
class FrameError:
    """A frame the decoder rejected (a value, not an exception: decoding goes on after it).

    ``request_id`` is the id read from the rejected header; it is unverified (the CRC may
    not cover it yet, or failed) and is only good for echoing back in an ERROR reply.
    """

    reason: str
    kind: FrameErrorKind
    request_id: int | None = None


def crc32(data: bytes) -> int:
    """CRC-32/IEEE 802.3 (reflected, polynomial 0xEDB88320, init and xorout 0xFFFFFFFF)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_frame(frame: Frame) -> bytes:
    body = _HEADER.pack(MAGIC, VERSION, frame.type, frame.request_id, len(frame.payload))
    body += frame.payload
    return body + _CRC.pack(crc32(body[len(MAGIC):]))


class FrameDecoder:
    """Turns a byte stream into frames and frame errors, whatever the stream holds.

    Bytes that are not part of any frame (noise before a magic) are dropped silently but
    counted in ``skipped``, so a caller can decide whether noise is acceptable.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0

    @property
    def pending(self) -> int:
        """Bytes buffered while waiting for the rest of a frame (always < MAX_FRAME_SIZE)."""
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        # Appending at most one frame's worth at a time keeps the buffer bounded.
        for start in range(0, len(data), MAX_FRAME_SIZE):
            self._buf += data[start : start + MAX_FRAME_SIZE]
            self._drain(out)
        return out

    def _skip_noise(self, count: int) -> None:
        del self._buf[:count]
        self.skipped += count

    def _reject(self, out: list[Frame | FrameError], kind: FrameErrorKind, detail: str,
                request_id: int) -> None:
        out.append(FrameError(f"{kind.value}: {detail}", kind, request_id))
        del self._buf[: len(MAGIC)]  # resynchronise on the next magic after this one

    def _drain(self, out: list[Frame | FrameError]) -> None:
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                # Keep a trailing first magic byte: the second may be in the next chunk.
                self._skip_noise(len(buf) - (1 if buf.endswith(MAGIC[:1]) else 0))
                return
            if start:
                self._skip_noise(start)
            if len(buf) < HEADER_SIZE:
                return
            _, version, mtype, request_id, length = _HEADER.unpack_from(buf)
            if version != VERSION:
                self._reject(out, FrameErrorKind.BAD_VERSION, f"version {version}", request_id)
                continue
            if length > MAX_PAYLOAD:
                self._reject(out, FrameErrorKind.TOO_LONG,
                             f"{length} > {MAX_PAYLOAD} bytes", request_id)
                continue
            end = HEADER_SIZE + length
            if len(buf) < end + CRC_SIZE:
                return
            (received,) = _CRC.unpack_from(buf, end)
            computed = crc32(bytes(buf[len(MAGIC) : end]))
            if received != computed:
                self._reject(out, FrameErrorKind.BAD_CRC,
                             f"got {received:#010x}, computed {computed:#010x}", request_id)
                continue
            out.append(Frame(mtype, request_id, bytes(buf[HEADER_SIZE:end])))
            del buf[: end + CRC_SIZE]
