import random
import struct
import zlib

import pytest

from stampline.protocol.wire import (
    MAGIC,
    MAX_FRAME_SIZE,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameError,
    FrameErrorKind,
    ProtocolError,
    crc32,
    encode_frame,
)


def test_crc_is_ieee_crc32() -> None:
    assert crc32(b"123456789") == 0xCBF43926


def test_encode_layout() -> None:
    raw = encode_frame(Frame(0x01, 0x1234, b"\x01\x01\x00\x01"))
    assert raw[:8] == b"SL\x01\x01\x34\x12\x04\x00"
    assert raw[8:12] == b"\x01\x01\x00\x01"
    assert raw[12:] == struct.pack("<I", zlib.crc32(raw[2:12]))


def test_round_trip() -> None:
    frames = [Frame(0x81, 1, b""), Frame(0x13, 0xFFFF, bytes(range(256)) * 4)]
    data = b"".join(encode_frame(f) for f in frames)
    assert FrameDecoder().feed(data) == frames


def test_frame_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ProtocolError):
        Frame(0x100, 1)
    with pytest.raises(ProtocolError):
        Frame(1, 0x10000)
    with pytest.raises(ProtocolError):
        Frame(1, 1, bytes(MAX_PAYLOAD + 1))


def test_resync_after_garbage_counts_noise() -> None:
    frame = Frame(0x01, 7, b"hello")
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00garbage S\xff" + encode_frame(frame)) == [frame]
    assert decoder.skipped == len(b"\x00garbage S\xff")


def test_crc_error_reported_then_next_frame_decoded() -> None:
    bad = bytearray(encode_frame(Frame(0x02, 9, b"\x09\x01\x00\x01")))
    bad[-1] ^= 0x01
    good = Frame(0x06, 10, b"")
    out = FrameDecoder().feed(bytes(bad) + encode_frame(good))
    assert len(out) == 2
    assert isinstance(out[0], FrameError) and out[0].kind is FrameErrorKind.BAD_CRC
    assert out[0].request_id == 9
    assert out[1] == good


def test_unknown_version_reported() -> None:
    raw = bytearray(encode_frame(Frame(0x01, 3, b"")))
    raw[2] = 2
    (error,) = FrameDecoder().feed(bytes(raw))
    assert isinstance(error, FrameError) and error.kind is FrameErrorKind.BAD_VERSION


def test_oversized_length_rejected_without_waiting() -> None:
    header = MAGIC + struct.pack("<BBHH", 1, 0x10, 5, MAX_PAYLOAD + 1)
    decoder = FrameDecoder()
    (error,) = decoder.feed(header)  # nothing more is needed to know it is bad
    assert isinstance(error, FrameError) and error.kind is FrameErrorKind.TOO_LONG
    assert decoder.pending < len(header)


def test_byte_at_a_time() -> None:
    frames = [Frame(0x81, n, bytes([n]) * n) for n in range(1, 20)]
    data = b"xS" + b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    out = []
    for byte in data:
        out += decoder.feed(bytes([byte]))
    assert out == frames


def test_buffer_bounded_with_endless_garbage() -> None:
    rng = random.Random(1)
    decoder = FrameDecoder()
    # Random noise, then noise made of plausible headers that announce long payloads.
    header = MAGIC + struct.pack("<BBHH", 1, 0x81, 1, MAX_PAYLOAD)
    for i in range(400):
        chunk = rng.randbytes(4096) if i % 2 else header * 200
        decoder.feed(chunk)
        assert decoder.pending < MAX_FRAME_SIZE
    assert decoder.feed(b"") == []
    decoder.reset()
    frame = Frame(1, 1, b"ok")
    assert decoder.feed(encode_frame(frame)) == [frame]


def test_random_corruption_never_raises_nor_invents_frames() -> None:
    rng = random.Random(2)
    for _ in range(300):
        frames = [Frame(rng.randrange(256), rng.randrange(65536), rng.randbytes(rng.randrange(64)))
                  for _ in range(rng.randrange(1, 5))]
        data = bytearray(b"".join(encode_frame(f) for f in frames))
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif action == 1:
                del data[pos]
            elif action == 2:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
            else:
                del data[pos:]
                if not data:
                    break
        decoder = FrameDecoder()
        out = []
        pos = 0
        while pos < len(data):
            step = rng.randrange(1, 40)
            out += decoder.feed(bytes(data[pos : pos + step]))
            pos += step
        for item in out:
            assert isinstance(item, (Frame, FrameError))
            if isinstance(item, Frame):
                assert item in frames
