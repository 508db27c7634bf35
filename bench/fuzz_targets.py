"""The fuzz targets of bench/fuzz.py: every parser that reads untrusted bytes, with its seeds.

A target is a function of one ``bytes`` input. It calls the code under test the way the station,
the emulator or the cloud calls it, and lets through only the refusal type that code is allowed
to raise (``Target.allowed``); anything else that escapes is a crash. A target may also raise
``Violation`` itself when an invariant breaks (a decoded message that does not re-encode, a
buffer that grows, a refusal sentence that is long or unprintable, an "internal error").

Inputs are plain bytes so that a coverage-guided engine (atheris/libFuzzer) and the built-in
mutator can drive the same targets. Where a signature or a checksum would stop every mutated
input at the first check, the input's first byte selects a *structured* mode in which the
harness repairs it: frames get their CRC, CSRs are re-signed over the mutated
CertificationRequestInfo, manifest entries are re-signed over their mutated payloads, YAML
documents are mutated as trees. Everything (keys, certificates, seeds) is derived from fixed
values, so a run is a function of its seed.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import functools
import hashlib
import json
import os
import random
import shutil
import ssl
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

MAX_MESSAGE = 300  # a refusal is one short sentence


class Violation(Exception):
    """An invariant the target checks itself broke. ``kind``: crash, internal or message."""

    def __init__(self, kind: str, detail: str, key: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.key = key or detail  # what tells one finding from another (bench/fuzz.py normalises it)


def message_problem(text: str, internal_phrase: bool = True) -> tuple[str, str] | None:
    """(kind, why) when a sentence shown to people is not a short, printable sentence."""
    if internal_phrase and "internal error" in text.lower():
        return "internal", "the message reports an internal error"
    if len(text) > MAX_MESSAGE:
        return "message", f"the message is {len(text)} characters long (limit {MAX_MESSAGE})"
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        return "message", f"the message holds the non-printable character {bad!r}"
    return None


def check_message(text: str, where: str, internal_phrase: bool = True) -> None:
    problem = message_problem(text, internal_phrase)
    if problem:
        opening = " ".join(text.split()[:3])[:40]
        raise Violation(problem[0], f"{where}: {problem[1]}: {text[:200]!r}", f"{where}: {problem[0]}: {opening}")


@dataclass
class Target:
    name: str
    doc: str
    run: Callable[[bytes], None]
    seeds: list[bytes]
    allowed: tuple[type[BaseException], ...]
    tokens: list[bytes] = field(default_factory=list)  # a dictionary for the mutators
    max_len: int = 4096
    accepted: list[bytes] = field(default_factory=list)  # seeds the code must accept, not refuse
    internal_phrase: bool = True  # whether "internal error" in a refusal counts as one
    cleanup: Callable[[], None] | None = None  # removes what the target made (temporary files)

    def check_seeds(self) -> None:
        """Each ``accepted`` seed must pass without any refusal: the harness still reaches the
        code behind the checks (a target whose seeds are all refused tests only the front door)."""
        for number, seed in enumerate(self.accepted):
            try:
                self.run(seed)
            except Exception as exc:
                raise RuntimeError(f"fuzz target {self.name}: seed {number} is refused or fails: "
                                   f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------- helpers

class Choices:
    """Reads decisions from fuzz bytes (zeros once they run out), like libFuzzer's data provider."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def below(self, n: int) -> int:
        return (self.byte() << 8 | self.byte()) % n if n > 1 else 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _chunks(data: bytes, pattern: int) -> list[bytes]:
    """Split ``data`` the way a serial line or a socket might deliver it (``pattern`` picks)."""
    size = (1, 2, 3, 7, 64, 1500, 4096, 1 << 20)[pattern & 7]
    if pattern & 8:  # irregular: sizes from the data itself
        out, pos, step = [], 0, 1
        while pos < len(data):
            step = (step * 31 + data[pos]) % 97 + 1
            out.append(data[pos:pos + step])
            pos += step
        return out
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


# --------------------------------------------------------------------- deterministic keys

def _probable_prime(rng: random.Random, bits: int) -> int:
    small = [p for p in range(3, 2000, 2) if all(p % d for d in range(3, int(p ** 0.5) + 1, 2))]
    while True:
        candidate = rng.getrandbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if any(candidate % p == 0 for p in small) or candidate % 65537 == 1:
            continue
        d, r = candidate - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(24):
            x = pow(rng.randrange(2, candidate - 1), d, candidate)
            if x in (1, candidate - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, candidate)
                if x == candidate - 1:
                    break
            else:
                break
        else:
            return candidate


@functools.lru_cache(maxsize=None)
def rsa_key(bits: int, label: str) -> rsa.RSAPrivateKey:
    """An RSA key derived from ``label`` (the same key on every run)."""
    rng = random.Random(f"stampline-fuzz-rsa:{label}:{bits}")
    e = 65537
    while True:
        p, q = _probable_prime(rng, bits // 2), _probable_prime(rng, bits // 2)
        n = p * q
        if p != q and n.bit_length() == bits:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, n))
    return numbers.private_key()


def ec_key(label: str, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    curve = curve or ec.SECP256R1()
    value = int.from_bytes(hashlib.sha512(f"stampline-fuzz-ec:{label}".encode()).digest(), "big")
    return ec.derive_private_key(value % (1 << (curve.key_size - 1)) + 1, curve)  # below the order


def ed_key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"stampline-fuzz-ed:{label}".encode()).digest())


_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)


def sign(key: Any, data: bytes) -> bytes:
    """A deterministic signature (RFC 6979 ECDSA, PKCS#1 v1.5, Ed25519)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, _ECDSA)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


_NOT_BEFORE = _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc)
_NOT_AFTER = _dt.datetime(2049, 1, 1, tzinfo=_dt.timezone.utc)


def _name(**attrs: str) -> x509.Name:
    oids = {"O": NameOID.ORGANIZATION_NAME, "CN": NameOID.COMMON_NAME, "serial": NameOID.SERIAL_NUMBER}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


def _ca_cert(key: Any, name: x509.Name, serial: int) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(serial).not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True))
    return _signed(builder, key)


def _signed(builder: Any, key: Any) -> Any:
    """Sign a certificate/CSR builder deterministically: build with a throwaway signature, then
    re-sign the to-be-signed bytes with ``key`` (cryptography's builders sign with a random k)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)  # Ed25519 is deterministic already
    if isinstance(key, rsa.RSAPrivateKey):
        return builder.sign(key, hashes.SHA256())  # PKCS#1 v1.5 is deterministic already
    draft = builder.sign(key, hashes.SHA256())
    tbs = draft.tbs_certificate_bytes if isinstance(draft, x509.Certificate) else draft.tbs_certrequest_bytes
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    der = _der(0x30, tbs + algorithm + _der(0x03, b"\0" + sign(key, tbs)))
    if isinstance(draft, x509.Certificate):
        return x509.load_der_x509_certificate(der)
    return x509.load_der_x509_csr(der)


def _leaf_cert(key: Any, subject: x509.Name, issuer: x509.Certificate, issuer_key: Any, serial: int) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    return _signed(builder, issuer_key)


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# ============================================================================ protocol targets

def _protocol_samples() -> list[Any]:
    """One valid instance of every message type, and a few variants."""
    from stampline.protocol import messages as m

    sha = hashlib.sha256(b"stampline").digest()
    return [
        m.Hello(), m.Hello(7),
        m.HelloReply(b"\x24\x6f\x28\x01\x02\x03", "esp32c3", 3, "mfg-1.0.0", "1.2.3", 1024,
                     m.StateFlag.KEY_PRESENT | m.StateFlag.CSR_READY),
        m.Keygen(m.KeyType.EC_P256), m.Keygen(m.KeyType.RSA_3072), m.KeygenReply(m.KeyType.RSA_2048),
        m.CsrBuild("ACME-000001"), m.CsrBuild("Gerät 1", "Acme Devices", "246f28010203"),
        m.CsrBuildReply(612, sha),
        m.WriteBegin(m.Target.NVS, "stamp", "serial", m.NvsType.STRING, 11, sha, b"ACME-000001"),
        m.WriteBegin(m.Target.NVS, "app", "count", m.NvsType.U32, 4, sha, b"\1\0\0\0"),
        m.WriteBegin(m.Target.CERT, "stamp", "cert", m.NvsType.BLOB, 1500, sha),
        m.WriteChunk(1014, b"\x30\x82" * 40), m.WriteReply(2028), m.WriteEnd(),
        m.Read(m.Target.CSR), m.Read(m.Target.NVS, "stamp", "serial", 0, 500),
        m.ReadReply(5000, sha, b"\x30\x82\x01\x0a"),
        m.Status(), m.StatusReply(m.StateFlag.SECURED | m.StateFlag.SECURE_BOOT, m.ErrorCode.HASH_MISMATCH),
        m.Finish(), m.Erase(), m.Ack(),
        m.ErrorReply(m.ErrorCode.BAD_STATE, "no key yet"), m.ErrorReply(m.ErrorCode.INTERNAL),
        m.Busy(),
        m.FlashBegin(0x10000, 300000, 120000, sha), m.FlashData(4096, b"\x78\x9c" + bytes(range(200))),
        m.FlashEnd(), m.FlashHash(0x10000, 300000), m.HashReply(sha), m.SetBoot("ota_0"), m.Reboot(),
    ]


def _decoders() -> list[type]:
    from stampline.protocol import messages as m

    replies = {reply for _, reply in m.REGISTRY.values()}
    ordered = list(m.REQUESTS) + sorted(replies, key=lambda c: c.__name__) + [m.ErrorReply, m.Busy]
    return list(dict.fromkeys(ordered))


PROTOCOL_TOKENS = [b"SL", b"SL\x01", b"\xff\xff", b"\x00\x04", b"\xff\x03", b"\x00\x01", b"\x01\x00", b"\x04\x00",
                   b"\x20\x00", b"\x06\x00", b"\x0e\x20\x00", b"\x14\x00\x00", b"\x1a\x80\x00", b"\xff\xff\xff\xff",
                   b"\x80", b"\x7f", b"\xc3\xa4", b"\xe2\x80\xae", b"\xf0\x9f\x92\xa9", b"\x00", b"\x1b[2J"]


def target_frame() -> Target:
    """wire.FrameDecoder: the stream decoder both ends of the serial line run."""
    from stampline.protocol.wire import (
        MAX_FRAME_SIZE, MAX_PAYLOAD, Frame, FrameDecoder, FrameError, encode_frame, crc32, _HEADER, _CRC)

    def build(data: bytes) -> tuple[bytes, list[Frame] | None]:
        """Structured input -> a byte stream, and the frames it must decode to (None: unknown)."""
        c = Choices(data)
        stream, expected, clean = bytearray(), [], True
        while c.left >= 6:
            flags, mtype, request_id, length = c.byte(), c.byte(), c.below(0x10000), c.below(0x500)
            payload = c.take(min(length, MAX_PAYLOAD) if not flags & 4 else length)
            version = 1 if not flags & 2 else c.byte()
            body = _HEADER.pack(b"SL", version, mtype, request_id, len(payload) if not flags & 16 else length) + payload
            crc = crc32(body[2:]) ^ (0 if not flags & 1 else 1 << (flags >> 5))
            frame = body + _CRC.pack(crc)
            if flags & 8:  # noise before the frame
                stream += bytes([flags, 0x53, 0x4C][: 1 + (flags >> 6)])
            stream += frame
            if flags & (1 | 2 | 8 | 16) or (flags & 4 and len(payload) > MAX_PAYLOAD) or version != 1:
                clean = False
            elif len(payload) <= MAX_PAYLOAD:
                expected.append(Frame(mtype, request_id, bytes(payload)))
        return bytes(stream), (expected if clean else None)

    def run(data: bytes) -> None:
        if not data:
            return
        mode, pattern = data[0], data[1] if len(data) > 1 else 0
        stream, expected = build(data[2:]) if mode & 1 else (data[2:], None)
        decoder = FrameDecoder()
        items: list[Frame | FrameError] = []
        for chunk in _chunks(stream, pattern):
            items += decoder.feed(chunk)
            if decoder.pending >= MAX_FRAME_SIZE:
                raise Violation("crash", f"the decoder buffers {decoder.pending} bytes")
        for item in items:
            if isinstance(item, FrameError):
                check_message(item.reason, "FrameError.reason")
                continue
            if not isinstance(item, Frame):
                raise Violation("crash", f"the decoder returned a {type(item).__name__}")
            again = FrameDecoder().feed(encode_frame(item))
            if again != [item]:
                raise Violation("crash", f"a decoded frame does not re-encode to itself: {item!r:.120}")
        if expected is not None:
            frames = [i for i in items if isinstance(i, Frame)]
            if frames != expected or len(frames) != len(items) or decoder.skipped:
                raise Violation("crash", f"{len(expected)} well-formed frames decoded as {len(frames)} "
                                         f"frames and {len(items) - len(frames)} errors")

    seeds = []
    samples = _protocol_samples()
    for sample in samples:  # raw: one valid frame of each message type
        seeds.append(b"\0\7" + encode_frame(Frame(sample.TYPE if hasattr(sample, "TYPE") else 0x80, 1, sample.encode())))
    stream = b"".join(encode_frame(Frame(getattr(s, "TYPE", 0x80), i + 1, s.encode())) for i, s in enumerate(samples))
    seeds += [b"\0\0" + stream, b"\0\x08" + b"noise" + stream[:300] + b"SL\x02" + stream[300:900]]

    def record(flags: int, mtype: int, request_id: int, payload: bytes) -> bytes:
        return bytes([flags, mtype]) + request_id.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
    structured = b"".join(record(0, getattr(s, "TYPE", 0x80), i, s.encode()) for i, s in enumerate(samples[:8]))
    seeds += [b"\1\3" + structured, b"\1\x09" + record(1, 0x81, 5, b"x" * 40) + record(8, 1, 6, b""),
              b"\1\0" + record(0x10, 2, 7, b"abc") + record(4, 3, 8, bytes(1030))]
    return Target("frame", "protocol/wire.py FrameDecoder.feed (chunked streams, CRC-repaired frames)", run,
                  seeds, (), PROTOCOL_TOKENS, 8192, accepted=seeds[:3])


def target_tlv() -> Target:
    """Every message decoder in protocol/messages.py, as the station (replies) and the emulator
    (requests) call them on a frame's payload; decoded messages must re-encode to themselves."""
    from stampline.protocol import messages as m
    from stampline.protocol.wire import ProtocolError

    decoders = _decoders()
    nvs_types = list(m.NvsType)

    def run(data: bytes) -> None:
        if not data:
            return
        which, payload = data[0], data[1:]
        if which >= 0xF0:  # the helpers a device or station applies to decoded values
            nvs_type = nvs_types[(payload[:1] or b"\0")[0] % len(nvs_types)]
            if which & 1:
                m.nvs_decode(nvs_type, payload[1:])
            else:
                check_message(m.type_name(payload[0] if payload else 0), "type_name")
                m.decode_tlv(payload[1:])
            return
        cls = decoders[which % len(decoders)]
        msg = cls.decode(payload)
        try:
            again = cls.decode(msg.encode())
        except ProtocolError as exc:
            raise Violation("crash", f"a decoded {cls.__name__} does not re-encode: {exc}") from None
        if again != msg:
            raise Violation("crash", f"a decoded {cls.__name__} re-encodes to another message: {msg!r:.80} -> {again!r:.80}")
        if isinstance(msg, m.ErrorReply):  # what the station makes of it (link.py)
            check_message(str(m.DeviceError(msg.code, msg.detail, "WRITE_BEGIN")), "DeviceError", internal_phrase=False)
        if isinstance(msg, m.WriteBegin):  # what a device checks before it accepts the object
            m.validate_object(msg.target, msg.namespace, msg.key, msg.nvs_type, msg.data or b"")

    seeds = []
    for sample in _protocol_samples():
        seeds.append(bytes([decoders.index(type(sample))]) + sample.encode())
    seeds += [b"\xf0\x02\x14\x03\x00abc\x99\x00\x00", b"\xf1\x08hello", b"\xf1\x02\1\0\0\0"]
    return Target("tlv", "protocol/messages.py: every request and reply decoder (+ nvs_decode, validate_object)",
                  run, seeds, (ProtocolError,), PROTOCOL_TOKENS, 1100, accepted=seeds)


class _GoodDevice:
    """A device that answers every request correctly (the seeds' conversations come from it)."""

    IMAGE = bytes(range(256)) * 24

    def __init__(self) -> None:
        from stampline.protocol import messages as m
        self.m = m
        self.csr = bytes(range(256)) * 3 + b"tail"
        self.written = 0

    def __call__(self, request: Any) -> Any:
        m = self.m
        sha = hashlib.sha256
        if isinstance(request, m.Hello):
            return m.HelloReply(b"\x24\x6f\x28\x01\x02\x03", "esp32c3", 3, "1.0.0", "1.0.0", 1024, m.StateFlag(3))
        if isinstance(request, m.Status):
            return m.StatusReply(m.StateFlag(3))
        if isinstance(request, m.Keygen):
            return m.KeygenReply(request.key_type)
        if isinstance(request, m.CsrBuild):
            return m.CsrBuildReply(len(self.csr), sha(self.csr).digest())
        if isinstance(request, m.Read):
            chunk = self.csr[request.offset:request.offset + request.max_len]
            return m.ReadReply(len(self.csr), sha(self.csr).digest(), chunk)
        if isinstance(request, (m.WriteBegin,)):
            return m.WriteReply(len(request.data) if request.data is not None else 0)
        if isinstance(request, (m.WriteChunk, m.FlashData)):
            return m.WriteReply(request.offset + len(request.data))
        if isinstance(request, m.FlashBegin):
            return m.WriteReply(0)
        if isinstance(request, m.FlashHash):
            return m.HashReply(sha(self.IMAGE).digest())
        return m.Ack()


class _FakePort:
    """A pyserial port whose device answers each request with the next scripted reply."""

    def __init__(self, script: bytes, device: _GoodDevice | None = None) -> None:
        from stampline.protocol.wire import FrameDecoder
        self.timeout = None
        self.script = Choices(script)
        self.device = device  # record mode: answer correctly and write the script
        self.recorded = bytearray()
        self.queue = bytearray()
        self._decoder = FrameDecoder()

    @property
    def in_waiting(self) -> int:
        return len(self.queue)

    def reset_input_buffer(self) -> None:
        self.queue.clear()

    def close(self) -> None:
        pass

    def write(self, data: bytes) -> int:
        import serial
        from stampline.protocol import messages as m
        from stampline.protocol.wire import Frame, FrameError, encode_frame

        frames = [f for f in self._decoder.feed(data) if not isinstance(f, FrameError)]
        if not frames:
            return len(data)
        request = frames[-1]
        if self.device is not None:
            cls = m.REGISTRY[m.MsgType(request.type)][0]
            reply = self.device(cls.decode(request.payload))
            payload = reply.encode()
            self.recorded += bytes([0, request.type | 0x80]) + _u16(len(payload)) + payload
            self.queue += encode_frame(Frame(request.type | 0x80, request.request_id, payload))
            return len(data)
        c = self.script
        if c.left < 4:
            raise serial.SerialException("the scripted device has nothing more to say")
        flags, mtype, length = c.byte(), c.byte(), c.byte() | c.byte() << 8
        payload = c.take(length)
        if flags & 16:  # raw bytes, no framing
            self.queue += payload
            return len(data)
        rid = request.request_id
        if flags & 1:
            self.queue += encode_frame(Frame(m.MsgType.BUSY, rid))
        if flags & 2:
            self.queue += encode_frame(Frame(mtype, rid ^ 0x8000, payload[:1024]))
        if flags & 32:
            self.queue += bytes([flags])
        frame = encode_frame(Frame(mtype, (rid + 1) & 0xFFFF if flags & 4 else rid, payload[:1024]))
        if flags & 8:
            frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
        self.queue += frame
        return len(data)

    def read(self, n: int) -> bytes:
        import serial
        if not self.queue:
            raise serial.SerialException("the scripted device is silent")
        out = bytes(self.queue[:n])
        del self.queue[:n]
        return out


def _link_operations() -> list[Callable[[Any], Any]]:
    from stampline.protocol import messages as m

    cert = bytes(range(256)) * 6
    return [
        lambda link: link.request(m.Hello()),
        lambda link: link.request(m.Status()),
        lambda link: link.request(m.Keygen(m.KeyType.EC_P256)),
        lambda link: link.request(m.CsrBuild("ACME-000001", "Acme Devices", "246f28010203")),
        lambda link: link.read_object(m.Target.CSR),
        lambda link: link.write_object(m.Target.CERT, "stamp", "cert", m.NvsType.BLOB, cert),
        lambda link: link.write_object(m.Target.NVS, "stamp", "serial", m.NvsType.STRING, b"ACME-000001"),
        lambda link: link.flash(0x10000, _GoodDevice.IMAGE),
        lambda link: (link.request(m.Hello()), link.read_object(m.Target.CSR)),
        lambda link: link.request(m.FlashHash(0x10000, 4096)),
    ]


def target_link() -> Target:
    """protocol/link.py: the station's request/reply loop and object transfers, over a port
    whose device answers with fuzzed (CRC-correct) reply frames."""
    from stampline.protocol.link import Link
    from stampline.protocol.messages import DeviceError
    from stampline.protocol.wire import ProtocolError

    operations = _link_operations()

    def run(data: bytes) -> None:
        if not data:
            return
        operation = operations[data[0] % len(operations)]
        try:
            operation(Link(_FakePort(data[1:])))
        except DeviceError as exc:  # the device's own words: INTERNAL is the device's error, not ours
            check_message(str(exc), "DeviceError", internal_phrase=False)

    seeds = []
    for number, operation in enumerate(operations):
        port = _FakePort(b"", _GoodDevice())
        operation(Link(port))
        seeds.append(bytes([number]) + bytes(port.recorded))
    seeds.append(b"\0" + bytes([1 | 2, 0x81]) + seeds[0][3:])
    seeds.append(b"\4" + bytes([0, 0xFF, 5, 0]) + b"\x19\x01\x00\x7f\x1a")
    return Target("link", "protocol/link.py Link.request / read_object / write_object / flash (fuzzed replies)",
                  run, seeds, (ProtocolError,), PROTOCOL_TOKENS, 12000, accepted=seeds[:len(operations)])


def target_server() -> Target:
    """protocol/server.py: the emulator's end; every frame gets exactly one well-formed reply."""
    from stampline.protocol import messages as m
    from stampline.protocol.server import DeviceServer
    from stampline.protocol.wire import Frame, FrameDecoder, FrameError, _CRC, _HEADER, crc32, encode_frame

    def run(data: bytes) -> None:
        if not data:
            return
        mode, pattern = data[0], data[1] if len(data) > 1 else 0
        if mode & 1:  # frames with a correct CRC: type, request id, payload from the input
            c, stream = Choices(data[2:]), bytearray()
            while c.left >= 4:
                mtype, rid, length = c.byte(), c.below(0x10000), c.byte() | c.byte() << 8
                body = _HEADER.pack(b"SL", 1, mtype, rid, min(length, c.left))[2:] + c.take(length)
                stream += b"SL" + body + _CRC.pack(crc32(body))
        else:
            stream = bytearray(data[2:])
        out = bytearray()
        server = DeviceServer(_GoodDevice(), lambda n: b"", out.extend, keepalive_interval=60)
        for chunk in _chunks(bytes(stream), pattern):
            server.feed(chunk)
        expected = len(FrameDecoder().feed(bytes(stream)))
        replies = FrameDecoder()
        answers = replies.feed(bytes(out))
        if replies.skipped or replies.pending or any(isinstance(a, FrameError) for a in answers):
            raise Violation("crash", "the device wrote bytes that are not well-formed frames")
        if len(answers) != expected:
            raise Violation("crash", f"{expected} frames got {len(answers)} replies")
        for answer in answers:
            if answer.type == m.MsgType.ERROR:
                error = m.ErrorReply.decode(answer.payload)
                if error.code == m.ErrorCode.INTERNAL:
                    raise Violation("internal", f"the device answered INTERNAL ({error.detail})")
                check_message(error.detail, "ERROR detail")
            elif answer.type & 0x80 == 0:
                raise Violation("crash", f"the device answered with the request type {answer.type:#x}")

    seeds = []
    for i, sample in enumerate(_protocol_samples()):
        if hasattr(sample, "REPLY"):
            seeds.append(b"\0\0" + encode_frame(Frame(sample.TYPE, i + 1, sample.encode())))
    seeds.append(b"\0\x03" + b"".join(s[2:] for s in seeds) + b"SL\x07" + bytes(20))
    seeds.append(b"\1\0" + bytes([0x13, 0, 9, 3, 0]) + b"\x0f\x01\x00" + bytes([0x44, 0, 1, 0, 0]))
    return Target("server", "protocol/server.py DeviceServer.feed (request decoding on the emulator's side)",
                  run, seeds, (), PROTOCOL_TOKENS, 8192, accepted=seeds)


# ================================================================================= CSR policy

_ALG_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_ALG_RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")
_ALG_ED25519 = bytes.fromhex("300506032b6570")


def target_csr() -> Target:
    """pki/policy.py check_csr, as the issuance desk calls it. Mode byte: bit 0 the recipe's
    key type (EC P-256 / RSA-2048), bit 1 a key already issued, bits 2-4 raw DER or a
    CertificationRequestInfo re-signed by one of five keys (so mutations get past the signature)."""
    from stampline.pki.policy import CsrRefused, check_csr, csr_subject
    from stampline.pki.profile import DeviceProfile

    subject = csr_subject("ACME-000001", "Acme Devices", "246f28010203")
    profiles = [DeviceProfile("ec-p256", 7300, {"common_name": "ACME-000001", "organization": "Acme Devices"}),
                DeviceProfile("rsa-2048", 7300, {"common_name": "ACME-000001", "organization": "Acme Devices"})]
    keys = [ec_key("device"), rsa_key(2048, "device"), ec_key("device-384", ec.SECP384R1()), ed_key("device"),
            rsa_key(1024, "device")]
    algorithms = [_ALG_ECDSA_SHA256, _ALG_RSA_SHA256, _ALG_ECDSA_SHA256, _ALG_ED25519, _ALG_RSA_SHA256]

    def resigned(tbs: bytes, number: int) -> bytes:
        key = keys[number]
        return _der(0x30, tbs + algorithms[number] + _der(0x03, b"\0" + sign(key, tbs)))

    def run(data: bytes) -> None:
        if not data:
            return
        mode, body = data[0], data[1:]
        signer = (mode >> 2) & 7
        der = body if signer == 0 or signer > len(keys) else resigned(body, signer - 1)
        holder = "246f28aabbcc" if mode & 2 else None
        check_csr(der, profiles[mode & 1], subject, lambda digest: holder)

    def csr(key: Any, name: x509.Name, extensions: list[Any] = (), attributes: list[Any] = ()) -> x509.CertificateSigningRequest:
        builder = x509.CertificateSigningRequestBuilder().subject_name(name)
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical)
        for oid, value in attributes:
            builder = builder.add_attribute(oid, value)
        return _signed(builder, key)

    variants = [
        (0, 0, [], []), (1, 1, [], []),
        (0, 0, [(x509.BasicConstraints(ca=True, path_length=None), True)], []),
        (0, 0, [(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)], []),
        (0, 0, [(x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)], []),
        (1, 1, [], [(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"secret")]),
        (0, 2, [], []), (0, 3, [], []), (1, 4, [], []),
    ]
    seeds, accepted = [], []
    for profile, number, extensions, attributes in variants:
        request = csr(keys[number], subject, extensions, attributes)
        der = request.public_bytes(serialization.Encoding.DER)
        seeds.append(bytes([profile]) + der)  # raw
        seeds.append(bytes([profile | (number + 1) << 2]) + request.tbs_certrequest_bytes)  # re-signed
        if not extensions and not attributes and number < 2:
            accepted += seeds[-2:]
    wrong = csr(keys[0], csr_subject("ACME-000002", None, "246f28010203"))
    seeds.append(b"\0" + wrong.public_bytes(serialization.Encoding.DER))
    seeds.append(b"\x06" + wrong.tbs_certrequest_bytes)
    seeds.append(b"\x02" + accepted[0][1:])  # a key already issued
    tokens = [bytes.fromhex(h) for h in (
        "06092a864886f70d01090e", "06092a864886f70d010907", "0603551d13", "0603551d11", "0603551d0f", "0101ff",
        "06082a8648ce3d030107", "06052b81040022", "06072a8648ce3d0201", "06092a864886f70d010101", "0500",
        "06032b6570", "06032b656e", "0603550403", "0603550405", "060355040a", "a000", "a0", "3000", "3100",
        "0c00", "1300", "1e00", "8201", "82ffff", "8180", "020100", "0203010001", "020101", "03020700")]
    tokens += [b"\x30\x84\xff\xff\xff\xff", b"\x06\x7f" + b"\x81" * 8]
    return Target("csr", "pki/policy.py check_csr (raw DER, and CertificationRequestInfo re-signed)",
                  run, seeds, (CsrRefused,), tokens, 4600, accepted=accepted)


# ========================================================================= YAML: recipe, config

_WEIRD_TEXT = ["", " ", "x" * 400, "\x07bell", "line\nbreak", "tab\there", "\u202eevil", "Gerät", "💩" * 40,
               "{", "}", "{}", "{counter", "{counter:0100000000d}", "{counter:>4000}", "{counter!r}", "{0}",
               "{counter.real}", "{product[0]}", "{counter:{product}}", "{{counter}}", "%s", "..", "../../etc/passwd",
               "\0", "mqtts://", "mqtts://h:99999", "v1:", "v1:AAAA", "pkcs11:", "pkcs11:token=a;object=b;type=x",
               "pkcs11:token=%ff;object=b", "pkcs11:token=a;object=b?pin-value=1", "1.2.3-" + "a" * 30, "99999.1.1",
               "~", "null", "yes", "0x10", "1e400", ".nan", "env", "prompt", "sealed", "softhsm"]


def _weird_value(c: Choices, depth: int = 0) -> Any:
    pick = c.byte() % 24
    if pick < 10:
        return _WEIRD_TEXT[c.below(len(_WEIRD_TEXT))] if pick < 8 else c.take(c.byte() % 48).decode("latin-1")
    if pick < 18:
        return [None, True, False, 0, -1, 1, 2 ** 63, -(2 ** 70), 10 ** 40, 1.5, float("inf"), float("nan"),
                _dt.date(2024, 2, 29), b"\0\xff", 36501, 10 ** 12][c.byte() % 16] if pick < 16 else c.below(70000)
    if depth > 3:
        return None
    if pick < 21:
        return [_weird_value(c, depth + 1) for _ in range(c.byte() % 4)]
    keys = ["a", "keys", "env", "prompt", "sealed", "module", "pin", "image", 1, None, True]
    return {keys[c.byte() % len(keys)]: _weird_value(c, depth + 1) for _ in range(c.byte() % 4)}


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            out += _paths(value, prefix + (index,))
    return out


def mutate_tree(tree: Any, data: bytes) -> Any:
    """Structural mutations of a parsed YAML document, each decision read from ``data``."""
    c = Choices(data)
    tree = copy.deepcopy(tree)
    for _ in range(1 + c.byte() % 4):
        paths = _paths(tree)
        path = paths[c.below(len(paths))]
        if not path:
            if c.byte() % 8 == 0:
                tree = _weird_value(c)
            continue
        parent = tree
        for step in path[:-1]:
            parent = parent[step]
        key, action = path[-1], c.byte() % 6
        if action <= 2:
            parent[key] = _weird_value(c)
        elif action == 3 and isinstance(parent, dict):
            del parent[key]
        elif action == 4 and isinstance(parent, dict):
            new = _weird_value(c) if c.byte() % 4 == 0 else f"{key}_x"
            parent[new if isinstance(new, (str, int, float, bool, type(None))) else str(new)] = parent.pop(key)
        else:
            parent[key] = [parent[key]] if c.byte() % 2 else {"x": parent[key]}
    return tree


def _dump(tree: Any) -> str:
    import yaml

    try:
        return yaml.safe_dump(tree, allow_unicode=bool(len(str(tree)) % 2), sort_keys=False)
    except (yaml.YAMLError, TypeError, ValueError):
        return ""


YAML_TOKENS = [b": ", b"- ", b"&a ", b"*a", b"<<: *a", b"!!binary ", b"!!python/object:os.system", b"!!str ",
               b"!!int ", b"!!float ", b"!!set ", b"!!omap ", b"!!timestamp ", b"? ", b"{", b"}", b"[", b"]",
               b"|", b">-", b"~", b"null", b".inf", b".nan", b"0x7f", b"0o17", b"1e400", b"99999999999999999999",
               b"'", b'"', b'"\\x07"', b'"\\u202e"', b"\\0", b"%YAML 1.1\n---\n", b"---\n", b"...\n", b"#", b"\t",
               b"\n  ", b"{counter}", b"{counter:0100000000d}", b"{counter:>9999}", b"{serial}", b"{product}",
               b"pkcs11:token=", b";object=", b"mqtts://", b"yes", b"on", b"2024-02-29", b"=", b"\xef\xbb\xbf"]


def _yaml_seeds(texts: list[str]) -> tuple[list[bytes], list[bytes]]:
    """Raw (mode 0) and tree (mode 1) seeds; the raw ones must be accepted."""
    raw = [b"\0" + text.encode() for text in texts]
    tree = [b"\1" + bytes(random.Random(f"tree:{i}").getrandbits(8) for _ in range(32)) for i in range(8)]
    return raw + tree, raw


def _yaml_target(name: str, doc: str, texts: list[str], load: Callable[[str], None], allowed: tuple) -> Target:
    import yaml

    trees = [yaml.safe_load(text) for text in texts]

    def run(data: bytes) -> None:
        if not data:
            return
        if data[0] & 1:  # tree mode: mutate a seed as a YAML tree, then dump it
            text = _dump(mutate_tree(trees[data[1 % len(data)] % len(trees)], data[2:]))
        else:
            text = data[1:].decode("utf-8", "replace")
        load(text)

    seeds, accepted = _yaml_seeds(texts)
    return Target(name, doc, run, seeds, allowed, YAML_TOKENS, 16384, accepted=accepted)


def recipe_texts() -> list[str]:
    from stampline import recipe

    text = recipe.TEMPLATE
    firmware = ("firmware:\n  secure_boot_key: firmware/secure-boot.pub.pem\n  manufacturing:\n"
                '    min_version: "1.0.0"\n    image: firmware/mfg.signed.bin\n    sha256: "' + "ab" * 32 + '"\n'
                '  application:\n    min_version: "v2.1.0-rc.1"\n    image: firmware/app.signed.bin\n'
                '    sha256: "' + "cd" * 32 + '"\n  bootloader:\n    image: firmware/bootloader.signed.bin\n'
                '    sha256: "' + "ef" * 32 + '"\n')
    secure = text[:text.index("firmware:")] + firmware
    variants = (text.replace("device_key: ec-p256", "device_key: rsa-2048")
                .replace("registration: jitr", "registration: manifest")
                .replace("# organizational_unit: Sensors", "organizational_unit: Sensors")
                .replace("# country: DE", "country: DE").replace("bytes: 16", "bytes: 0")
                .replace("    pop: pop ", "    # pop: pop"))
    minimal = ("product: {name: p, organization: O}\nchip: esp32\nserial: {template: 'S{counter}'}\n"
               "nvs: {namespace: s, keys: {serial: a, endpoint: b, certificate: c}}\npop: {bytes: 0}\n"
               "endpoint: {url: 'mqtts://h'}\nfirmware: {manufacturing: {min_version: 0.0.0}, "
               "application: {min_version: 0.0.0}}\n")
    return [text, secure, variants, minimal]


def target_recipe() -> Target:
    from stampline import recipe
    from stampline.errors import StamplineError

    def load(text: str) -> None:
        recipe.parse(text, "recipe.yaml", base=Path("/nonexistent/fuzz"))

    return _yaml_target("recipe", "recipe.py parse (raw YAML text, and YAML trees mutated structurally)",
                        recipe_texts(), load, (StamplineError,))


def station_config_texts() -> list[str]:
    blob = lambda label: "v1:" + base64.b64encode(hashlib.sha512(label.encode()).digest()[:44]).decode()  # noqa: E731
    sealed = ("# stampline station configuration: no secret is stored here in plain text.\n"
              "workspace_id: 3f2a9c0d1e7b4a55\nstation_id: line-1\ntokens:\n"
              "  stampline-root:\n    module: softhsm\n    pin:\n      sealed: " + blob("root") + "\n"
              "    so_pin:\n      sealed: " + blob("root/so") + "\n"
              "  stampline-line-1:\n    module: softhsm\n    pin:\n      sealed: " + blob("line") + "\n"
              "    so_pin:\n      sealed: " + blob("line/so") + "\n"
              "keys:\n  root_ca: pkcs11:token=stampline-root;object=root-ca\n"
              "  sub_ca: pkcs11:token=stampline-line-1;object=sub-ca\n"
              "  manifest: pkcs11:token=stampline-line-1;object=manifest\n")
    env = ("workspace_id: 00aa11bb22cc33dd\nstation_id: line-7\ntokens:\n  yubikey:\n"
           "    module: /usr/lib/x86_64-linux-gnu/libykcs11.so\n    pin: {env: STAMPLINE_PIN}\n"
           "  hsm:\n    module: softhsm\n    pin: {prompt: true}\n"
           "keys:\n  sub_ca: 'pkcs11:token=yubikey;object=Private%20key%20for%20Digital%20Signature'\n"
           "  signing: pkcs11:token=hsm;object=secure-boot;type=private\n")
    return [sealed, env]


def target_station_config() -> Target:
    """workspace.py Workspace.config(): station.yaml read from a workspace, then StationConfig."""
    from stampline.errors import StamplineError
    from stampline.workspace import Workspace

    root = Path(tempfile.mkdtemp(prefix="stampline-fuzz-ws-"))
    workspace = Workspace.at(root)

    def load(text: str) -> None:
        workspace.config_path.write_text(text, errors="surrogateescape")
        workspace.config()

    target = _yaml_target("station-config", "workspace.py Workspace.config() -> StationConfig.from_dict (station.yaml)",
                          station_config_texts(), load, (StamplineError,))
    target.cleanup = lambda: shutil.rmtree(root, ignore_errors=True)
    return target


# ================================================================================== manifests

class _ManifestKit:
    """A Sub CA, five devices and the manifest key, all derived from fixed values."""

    def __init__(self) -> None:
        self.key = ec_key("manifest")
        self.public_key = self.key.public_key()
        self.sub_key = ec_key("sub-ca")
        self.sub_ca = _ca_cert(self.sub_key, _name(O="Acme Devices", CN="Acme Sub CA line-1"), 0x5C)
        devices = [(ec_key(f"dev{i}"), f"ACME-{i:06d}", f"246f2801{i:04x}") for i in range(1, 4)]
        devices.append((rsa_key(2048, "device"), "ACME-000004", "246f28010004"))
        self.rows = []
        for number, (key, serial, chip) in enumerate(devices):
            cert = _leaf_cert(key, _name(O="Acme Devices", CN=serial, serial=chip), self.sub_ca, self.sub_key, 100 + number)
            self.rows.append({"certificate": _pem(cert).decode(), "serial": serial, "chip_id": chip,
                              "chip_model": "esp32c3", "provisioned_at": f"2025-01-0{number + 1}T08:00:00Z",
                              "batch": 1})
        # odd chains for the x5c of mutated entries: another CA, an Ed25519 CA, an RSA CA
        self.others = []
        for label, key in (("other", ec_key("other-ca")), ("ed", ed_key("ca")), ("rsa", rsa_key(2048, "ca"))):
            ca = _ca_cert(key, _name(CN=f"{label} CA"), 7)
            leaf_key = ed_key("leaf") if label == "ed" else ec_key(f"{label}-leaf")
            leaf = _leaf_cert(leaf_key, _name(CN="ACME-000009", serial="246f28019999"), ca, key, 9)
            self.others.append([base64.b64encode(_der_of(leaf)).decode(), base64.b64encode(_der_of(ca)).decode()])

    def build(self) -> bytes:
        from stampline.cloud import manifest as mf

        class Frozen(_dt.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:  # build_manifest's createdAt, frozen
                return _dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=tz)

        class Signer:
            public_key = self.public_key
            sign = staticmethod(lambda data: sign(self.key, data))

        saved, mf.datetime = mf.datetime, Frozen
        try:
            return mf.build_manifest(self.rows, self.sub_ca, Signer(), "line-1", batch=1,
                                     manifest_id="6c1c9a52-0d8e-4a57-9a4f-2a0e58f0b6a1")
        finally:
            mf.datetime = saved


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def target_manifest() -> Target:
    """cloud/manifest.py check_manifest: the file, its JWS signatures, the chains in x5c. Mode
    byte: bit 0 verify against the Sub CA; bit 1 structured (an unsigned document whose payloads
    the harness signs with the manifest key, "@auto" standing for the right chain hash)."""
    from stampline.cloud import manifest as mf
    from stampline.errors import StamplineError

    kit = _ManifestKit()
    kid = mf.jwk_thumbprint(kit.public_key)
    good = kit.build()
    report = mf.check_manifest(good, kit.public_key, kit.sub_ca)
    if not report.ok:
        raise RuntimeError(f"the fuzz manifest seed does not verify: {report.problems[0]}")

    def jws(typ: str, payload: Any, protected: Any, unprotected: Any) -> dict[str, Any]:
        head = protected if protected is not None else {"alg": "ES256", "typ": typ, "kid": kid}
        encoded_protected = _b64url(json.dumps(head, separators=(",", ":")).encode())
        encoded_payload = _b64url(json.dumps(payload, separators=(",", ":")).encode())
        r, s = decode_dss_signature(sign(kit.key, f"{encoded_protected}.{encoded_payload}".encode("ascii")))
        out = {"protected": encoded_protected, "payload": encoded_payload,
               "signature": _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))}
        if unprotected is not None:
            out["header"] = unprotected
        return out

    def link(entry: dict[str, Any]) -> str:
        return _b64url(hashlib.sha256(f"{entry['protected']}.{entry['payload']}".encode("ascii")).digest())

    def signed(document: Any) -> bytes:
        if not isinstance(document, dict):
            return json.dumps(document).encode()
        header, entries = document.get("header"), document.get("entries")
        head = header.get("payload") if isinstance(header, dict) else None
        manifest_id = head.get("manifestId") if isinstance(head, dict) else None
        prev = _b64url(hashlib.sha256(f"stampline-manifest:{manifest_id}".encode()).digest()) \
            if isinstance(manifest_id, str) else ""
        out_entries = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and "payload" in entry:
                payload = entry["payload"]
                if isinstance(payload, dict) and payload.get("prev") == "@auto":
                    payload["prev"] = prev
                if isinstance(payload, dict) and payload.get("x5c") in (0, 1, 2):  # swap in an odd chain
                    key = payload["publicKeySet"]["keys"][0] if isinstance(payload.get("publicKeySet"), dict) else {}
                    if isinstance(key, dict):
                        key["x5c"] = kit.others[payload.pop("x5c")]
                entry = jws(mf.ENTRY_TYPE, payload, entry.get("protected"), entry.get("header"))
                prev = link(entry)
            out_entries.append(entry)
        if isinstance(header, dict) and "payload" in header:
            payload = header["payload"]
            if isinstance(payload, dict) and payload.get("head") == "@auto":
                payload["head"] = prev
            header = jws(mf.HEADER_TYPE, payload, header.get("protected"), header.get("header"))
        rendered = dict(document)
        rendered["header"], rendered["entries"] = header, out_entries if isinstance(entries, list) else entries
        return json.dumps(rendered, separators=(",", ":")).encode()

    def unsigned(data: bytes) -> dict[str, Any]:
        document = json.loads(data)
        entries = []
        for entry in document["entries"]:
            payload = json.loads(_unb64url(entry["payload"]))
            payload["prev"] = "@auto"
            entries.append({"payload": payload, "header": entry.get("header")})
        header = json.loads(_unb64url(document["header"]["payload"]))
        header["head"] = "@auto"
        return {**document, "header": {"payload": header}, "entries": entries}

    def run(data: bytes) -> None:
        if not data:
            return
        mode, body = data[0], data[1:]
        if mode & 2:
            try:
                document = json.loads(body)
            except (ValueError, RecursionError):
                return
            try:
                body = signed(document)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
                return  # the harness cannot sign this shape (not the code under test)
        result = mf.check_manifest(body, kit.public_key, kit.sub_ca if mode & 1 else None)
        for problem in result.problems:
            check_message(problem.message, "Problem.message")

    template = unsigned(good)
    again = mf.check_manifest(signed(copy.deepcopy(template)), kit.public_key, kit.sub_ca)
    if not again.ok or len(again.entries) != len(kit.rows):
        raise RuntimeError(f"the fuzz manifest's structured seed does not verify: {again.problems[:1]}")
    variants = [template]
    odd = copy.deepcopy(template)
    for number in range(3):
        odd["entries"][number]["payload"]["x5c"] = number
    variants.append(odd)
    short = copy.deepcopy(template)
    short["entries"] = short["entries"][:2]
    variants.append(short)
    header_batch = copy.deepcopy(template)
    header_batch["header"]["payload"]["batch"] = None
    variants.append(header_batch)
    seeds = [b"\1" + good, b"\0" + good, b"\0" + good.replace(b'"version":1,', b'"version":2,', 1),
             b"\0" + good[: len(good) // 2]]
    seeds += [bytes([3 if i % 2 == 0 else 2]) + json.dumps(v, separators=(",", ":")).encode()
              for i, v in enumerate(variants)]
    tokens = [b'"@auto"', b'"seq"', b'"prev"', b'"head"', b'"count"', b'"batch"', b'"version"', b'"x5c"', b"null",
              b"true", b"NaN", b"Infinity", b"-0", b"1e999", b"[]", b"{}", b'""', b'"\\u0000"', b'"\\ud800"',
              b'"\\u202e"', b"9" * 30, b'"kid"', b'"alg"', b'"ES256"', b'"typ"', b'"uniqueId"', b'"header"',
              b'"protected"', b'"signature"', b'"payload"', b'"x5c":0', b'"x5c":1', b'"x5c":2', b'"keys"']
    return Target("manifest", "cloud/manifest.py check_manifest (raw files, and entries re-signed after mutation)",
                  run, seeds, (StamplineError,), tokens, 32768, accepted=[seeds[0], seeds[4]])


def target_manifest_key() -> Target:
    """cloud/manifest.py load_public_key: the manifest public key file (PEM or JWK)."""
    from stampline.cloud import manifest as mf
    from stampline.errors import StamplineError

    folder = Path(tempfile.mkdtemp(prefix="stampline-fuzz-key-"))
    path = folder / "manifest.pub"
    key = ec_key("manifest").public_key()

    def run(data: bytes) -> None:
        path.write_bytes(data)
        mf.load_public_key(path)

    jwk = {**mf.public_jwk(key), "kid": mf.jwk_thumbprint(key), "alg": "ES256", "use": "sig"}
    seeds = [_pem(key), json.dumps(jwk).encode(), _pem(rsa_key(1024, "device").public_key()),
             _pem(ec_key("p384", ec.SECP384R1()).public_key()), _pem(ed_key("x").public_key()),
             json.dumps({**jwk, "crv": "P-384"}).encode(), json.dumps({**jwk, "x": jwk["x"] + "A"}).encode()]
    tokens = [b"-----BEGIN PUBLIC KEY-----\n", b"-----END PUBLIC KEY-----\n", b"-----BEGIN CERTIFICATE-----",
              b'"kty"', b'"EC"', b'"crv"', b'"P-256"', b'"x"', b'"y"', b"{", b"}", b"null", b"NaN", b"1e999"]
    return Target("manifest-key", "cloud/manifest.py load_public_key (PEM or JWK file)", run, seeds,
                  (StamplineError,), tokens, 4096, accepted=seeds[:2],
                  cleanup=lambda: shutil.rmtree(folder, ignore_errors=True))


# ======================================================================================= TLS

def capture_tls() -> tuple[bytes, list[bytes]]:
    """The client-to-server bytes of a real TLS 1.2 handshake with a client certificate (Python's
    ssl, memory BIOs), with its random fields zeroed; and the chain the client sent."""
    kit_key, server_key, client_key = ec_key("tls-ca"), ec_key("tls-server"), ec_key("tls-client")
    ca = _ca_cert(kit_key, _name(O="Acme Devices", CN="Acme Sub CA"), 0x71)
    server = _leaf_cert(server_key, _name(CN="localhost"), ca, kit_key, 0x72)
    client = _leaf_cert(client_key, _name(O="Acme Devices", CN="ACME-000001", serial="246f28010203"), ca, kit_key, 0x73)
    with tempfile.TemporaryDirectory(prefix="stampline-fuzz-tls-") as tmp:
        files = {}
        for name, cert, key in (("server", server, server_key), ("client", client, client_key)):
            files[name] = (Path(tmp) / f"{name}.pem", Path(tmp) / f"{name}.key")
            files[name][0].write_bytes(_pem(cert) + _pem(ca))
            files[name][1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        server_ctx.load_cert_chain(*files["server"])
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(cadata=_pem(ca).decode())
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        client_ctx.load_cert_chain(*files["client"])
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client_ctx.wrap_bio(c_in, c_out, server_side=False)
        s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        sent = bytearray()
        done = [False, False]
        for _ in range(20):
            for number, side in enumerate((c, s)):
                if not done[number]:
                    try:
                        side.do_handshake()
                        done[number] = True
                    except ssl.SSLWantReadError:
                        pass
            data = c_out.read()
            sent += data
            s_in.write(data)
            c_in.write(s_out.read())
            if all(done):
                break
        if not all(done):
            raise RuntimeError("the TLS capture handshake did not complete")
    return _normalised(bytes(sent)), [_der_of(client), _der_of(ca)]


def _normalised(stream: bytes) -> bytes:
    """Zero what differs between runs: the ClientHello random and session id, the key exchange,
    the CertificateVerify signature, everything encrypted (the Certificate message is kept)."""
    out, pos, encrypted = bytearray(), 0, False
    while pos + 5 <= len(stream):
        kind, length = stream[pos], int.from_bytes(stream[pos + 3:pos + 5], "big")
        header, body = stream[pos:pos + 5], bytearray(stream[pos + 5:pos + 5 + length])
        pos += 5 + length
        if kind == 22 and not encrypted:
            at = 0
            while at + 4 <= len(body):
                mtype, size = body[at], int.from_bytes(body[at + 1:at + 4], "big")
                start = at + 4
                if mtype == 1:  # ClientHello: random, session id
                    body[start + 2:start + 34] = bytes(32)
                    sid = body[start + 34]
                    body[start + 35:start + 35 + sid] = bytes(sid)
                elif mtype != 11:
                    body[start:start + size] = bytes(size)
                at = start + size
        elif kind != 20:
            body = bytearray(len(body))
        if kind == 20:
            encrypted = True
        out += header + body
    return bytes(out)


def target_tls() -> Target:
    """cloud/tap.py CertificateTap.feed: TLS records from a client, fed as they arrive."""
    from stampline.cloud.tap import CertificateTap, TapError

    stream, chain = capture_tls()

    def run(data: bytes) -> None:
        if not data:
            return
        tap = CertificateTap()
        for chunk in _chunks(data[1:], data[0]):
            tap.feed(chunk)
        if tap.chain is not None and not all(isinstance(c, bytes) and c for c in tap.chain):
            raise Violation("crash", "the tap holds a chain that is not a list of certificates (bytes)")

    def accepted_run(data: bytes) -> None:
        tap = CertificateTap()
        for chunk in _chunks(data[1:], data[0]):
            tap.feed(chunk)
        if tap.chain != chain:
            raise RuntimeError("the tap does not read the captured client chain")

    records, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 3:pos + 5], "big")
        records.append(stream[pos:pos + 5 + length])
        pos += 5 + length
    seeds = [bytes([p]) + stream for p in (7, 0, 3, 8, 9)]
    seeds.append(b"\7" + records[0])  # the ClientHello alone
    seeds.append(b"\7" + b"".join(records[1:]))  # the second flight alone
    tokens = [b"\x16\x03\x03", b"\x16\x03\x01", b"\x14\x03\x03\x00\x01\x01", b"\x15\x03\x03", b"\x17\x03\x03",
              b"\x0b", b"\x0b\x00\x00\x00", b"\x00\x00\x00", b"\xff\xff\xff", b"\x48\x00", b"\x48\x01", b"\x30\x82"]
    target = Target("tls", "cloud/tap.py CertificateTap.feed (a captured TLS 1.2 client flight, chunked)",
                    run, seeds, (TapError,), tokens, 20000, accepted=[])
    for seed in seeds[:5]:
        accepted_run(seed)
    return target


# ============================================================================= the registry

TARGETS: dict[str, Callable[[], Target]] = {
    "frame": target_frame,
    "tlv": target_tlv,
    "link": target_link,
    "server": target_server,
    "csr": target_csr,
    "recipe": target_recipe,
    "station-config": target_station_config,
    "manifest": target_manifest,
    "manifest-key": target_manifest_key,
    "tls": target_tls,
}


def build(name: str) -> Target:
    target = TARGETS[name]()
    target.check_seeds()
    return target
