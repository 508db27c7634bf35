"""A small DER writer for the structures a token signs: TBSCertificate, CSR info, TBSCertList.

The token signs bytes, so stampline assembles what it signs itself. Names and extension values
are encoded by ``cryptography`` (``public_bytes()``); this module only frames them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import lru_cache


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(items)))


def integer(value: int) -> bytes:
    size = value.bit_length() // 8 + 1 if value >= 0 else (value + 1).bit_length() // 8 + 1
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")


def null() -> bytes:
    return b"\x05\x00"


def octet_string(value: bytes) -> bytes:
    return tlv(0x04, value)


def bit_string(value: bytes) -> bytes:
    return tlv(0x03, b"\x00" + value)


@lru_cache(maxsize=512)
def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray()
    for number in [parts[0] * 40 + parts[1], *parts[2:]]:
        chunk = [number & 0x7F]
        number >>= 7
        while number:
            chunk.append(0x80 | (number & 0x7F))
            number >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def explicit(number: int, content: bytes) -> bytes:
    return tlv(0xA0 | number, content)


def time(moment: datetime) -> bytes:
    """UTCTime through 2049, GeneralizedTime after, as RFC 5280 section 4.1.2.5 requires."""
    moment = moment.astimezone(timezone.utc)
    if moment.year < 2050:
        return tlv(0x17, moment.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode())


# Signature algorithm identifiers (RFC 5758, RFC 4055): ECDSA omits parameters, RSA has NULL.
ECDSA_SHA256 = seq(oid("1.2.840.10045.4.3.2"))
ECDSA_SHA384 = seq(oid("1.2.840.10045.4.3.3"))
RSA_PKCS1_SHA256 = seq(oid("1.2.840.113549.1.1.11"), null())
