"""The certificate tap on real and malformed TLS 1.2 client handshakes: a strict, bounded parser."""

from __future__ import annotations

import random
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stampline.cloud.tap import MAX_CLEAR, MAX_HANDSHAKE, MAX_RECORD, CertificateTap, TapError


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
          issuer_key: ec.EllipticCurvePrivateKey | None = None, ca: bool = False) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key or key, hashes.SHA256()))


def _pem(*items: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    return out


class Handshake:
    """The bytes a TLS 1.2 client sends in a mutually authenticated handshake, made in memory."""

    def __init__(self, directory: Path) -> None:
        ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        ca = _cert("test CA", ca_key, ca=True)
        server = _cert("localhost", server_key, ca.subject, ca_key)
        client = _cert("ACME-000001", client_key, ca.subject, ca_key)
        (directory / "server.pem").write_bytes(_pem(server, server_key))
        (directory / "client.pem").write_bytes(_pem(client, ca, client_key))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        server_ctx.load_cert_chain(directory / "server.pem")
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(cadata=_pem(ca).decode())
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client_ctx.check_hostname = False
        client_ctx.load_verify_locations(cadata=_pem(ca).decode())
        client_ctx.load_cert_chain(directory / "client.pem")
        bios = [ssl.MemoryBIO() for _ in range(4)]
        client_tls = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="localhost")
        server_tls = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
        self.flights: list[bytes] = []
        for _ in range(6):
            for side in (client_tls, server_tls):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            sent = bios[1].read()
            if sent:
                self.flights.append(sent)
            bios[2].write(sent)
            bios[0].write(bios[3].read())
        self.chain = [client.public_bytes(serialization.Encoding.DER), ca.public_bytes(serialization.Encoding.DER)]
        self.stream = b"".join(self.flights)


@pytest.fixture(scope="module")
def handshake(tmp_path_factory: pytest.TempPathFactory) -> Handshake:
    return Handshake(tmp_path_factory.mktemp("tap"))


def record(kind: int, body: bytes, version: bytes = b"\x03\x03") -> bytes:
    return bytes([kind]) + version + len(body).to_bytes(2, "big") + body


def message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


HELLO = record(22, message(1, b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x00\x2f\x01\x00"))


def certificate(*entries: bytes, total: int | None = None) -> bytes:
    body = b"".join(len(e).to_bytes(3, "big") + e for e in entries)
    return message(11, (len(body) if total is None else total).to_bytes(3, "big") + body)


def test_reads_the_chain_of_a_real_handshake_fed_whole_or_byte_by_byte(handshake: Handshake) -> None:
    assert len(handshake.flights) >= 2  # ClientHello, then Certificate … ChangeCipherSpec, Finished
    whole = CertificateTap()
    whole.feed(handshake.stream)
    assert whole.chain == handshake.chain and whole.done
    tap = CertificateTap()
    for i in range(len(handshake.stream)):
        tap.feed(handshake.stream[i:i + 1])
    assert tap.chain == handshake.chain and tap.done
    tap.feed(b"\x17\x03\x03\x00\x05encrypted, ignored")  # after ChangeCipherSpec: not parsed
    # the certificate is known before the ChangeCipherSpec; done waits for it
    tap = CertificateTap()
    tap.feed(handshake.flights[0])
    assert tap.chain is None and not tap.done
    second = handshake.flights[1]
    tap.feed(second[:second.index(b"\x14\x03\x03\x00\x01\x01")])
    assert tap.chain == handshake.chain and not tap.done


MALFORMED = [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS 1.2 handshake record"),
    (b"\x80\x2e\x01\x03\x01" + bytes(40), "not a TLS 1.2 handshake record"),  # SSLv2 ClientHello
    (record(23, b"data"), "not a TLS 1.2 handshake record"),  # application data before the handshake
    (record(24, b"\x01\x00\x10" + bytes(16)), "not a TLS 1.2 handshake record"),  # heartbeat
    (record(22, b"\x01", version=b"\x04\x01"), "not a TLS 1.2 handshake record"),
    (record(22, b"\x01", version=b"\x03\x04"), "not a TLS 1.2 handshake record"),
    (record(22, b""), "a TLS record of 0 bytes"),
    (b"\x16\x03\x03" + (MAX_RECORD + 1).to_bytes(2, "big"), f"a TLS record of {MAX_RECORD + 1} bytes"),
    (record(22, b"\x0b\x00\x00\x03\x00\x00\x00"), "does not begin with a ClientHello"),
    (record(22, b"\x01\xff\xff\xff"), "the handshake is too large"),
    (record(22, b"\x01" + (MAX_HANDSHAKE + 1).to_bytes(3, "big")), "the handshake is too large"),
    (HELLO + record(22, message(2, b"")), "an unexpected handshake message of type 2"),
    (HELLO + record(22, message(1, b"")), "an unexpected handshake message of type 1"),
    (HELLO + record(22, certificate(b"x") + certificate(b"y")), "a second Certificate message"),
    (HELLO + record(22, message(11, b"\x00")), "a truncated Certificate message"),
    (HELLO + record(22, certificate(b"abc", total=9)), "inconsistent length"),
    (HELLO + record(22, certificate(b"")), "a truncated certificate entry"),
    (HELLO + record(22, message(11, b"\x00\x00\x02\x00\x00")), "a truncated certificate entry"),
    (HELLO + record(22, message(11, b"\x00\x00\x04\x00\x00\x09\x00")), "a truncated certificate entry"),
    (HELLO + record(20, b"\x02"), "a malformed ChangeCipherSpec"),
    (HELLO + record(22, b"\x10\x00") + record(20, b"\x01"), "cut by a record of another type"),
]


@pytest.mark.parametrize("data, error", MALFORMED, ids=[f"{i}-{e.split()[-1]}" for i, (_, e) in enumerate(MALFORMED)])
def test_malformed_input_is_a_tap_error_and_stays_one(data: bytes, error: str) -> None:
    tap = CertificateTap()
    with pytest.raises(TapError, match=error):
        tap.feed(data)
    with pytest.raises(TapError, match=error):  # a failed tap never takes bytes again
        tap.feed(HELLO)
    assert tap.chain is None or isinstance(tap.chain, list)


def test_the_clear_part_of_the_handshake_is_bounded() -> None:
    tap = CertificateTap()
    tap.feed(HELLO)
    messages = message(16, bytes(60000)) * 3  # well-formed, each under MAX_HANDSHAKE, together too much
    with pytest.raises(TapError, match="the clear part of the handshake is too large"):
        for at in range(0, len(messages), 2**14):
            tap.feed(record(22, messages[at:at + 2**14]))
    assert MAX_CLEAR < len(messages)
    # a record of the largest size is taken (and waited for when incomplete)
    tap = CertificateTap()
    tap.feed(HELLO + b"\x16\x03\x03" + MAX_RECORD.to_bytes(2, "big") + bytes(100))
    assert not tap.done and tap.chain is None


def test_an_alert_before_the_certificate_ends_the_tap_without_a_chain() -> None:
    tap = CertificateTap()
    tap.feed(HELLO + record(21, b"\x02\x28"))
    assert tap.done and tap.chain is None
    tap.feed(b"anything at all")  # done: ignored


def test_random_damage_ends_in_a_tap_error_or_a_clean_state(handshake: Handshake) -> None:
    """A small fuzz run: mutated, cut and re-chunked handshakes never raise anything but TapError,
    and the tap's buffers stay bounded."""
    rng = random.Random(8)
    stream = handshake.stream
    for _ in range(3000):
        data = bytearray(stream)
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            at = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[at] = rng.randrange(256)
            elif action == 1:
                del data[at:at + rng.randint(1, 64)]
            elif action == 2:
                data[at:at] = rng.randbytes(rng.randint(1, 64))
            else:
                data = data[:at]
        tap = CertificateTap()
        position = 0
        try:
            while position < len(data):
                size = rng.choice((1, 7, 100, 4096, 65536))
                tap.feed(bytes(data[position:position + size]))
                position += size
        except TapError:
            continue
        assert len(tap._records) <= 5 + MAX_RECORD + 65536
        assert len(tap._handshake) <= 4 + MAX_HANDSHAKE + MAX_RECORD
        assert tap.chain is None or all(isinstance(c, bytes) and c for c in tap.chain)
    for _ in range(2000):  # and plain noise, behind a valid record header or not
        tap = CertificateTap()
        noise = rng.randbytes(rng.randint(0, 300))
        try:
            tap.feed((b"\x16\x03\x03" + noise[:2] if rng.random() < 0.5 else b"") + noise)
        except TapError:
            pass
