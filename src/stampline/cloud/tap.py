"""Reading the client certificate off a TLS 1.2 handshake as it passes by.

Mosquitto terminates TLS and checks the chain and the CRL; the registration service needs the
certificate itself (its fingerprint, not only its CN) to apply AWS-style Just-In-Time
Registration. In TLS 1.2 the client's Certificate handshake message travels in clear before
ChangeCipherSpec, so the service relays the bytes and reads it on the way: it never holds a key
and cannot alter the session. The endpoint pins its listener to TLS 1.2 for this.
"""

from __future__ import annotations

MAX_HANDSHAKE = 64 * 1024  # a client Certificate chain larger than this is refused
_HANDSHAKE, _CHANGE_CIPHER_SPEC, _ALERT, _APPLICATION_DATA = 22, 20, 21, 23
_CERTIFICATE = 11


class TapError(Exception):
    """The client's handshake bytes are not a TLS 1.2 handshake we can read."""


class CertificateTap:
    """Feed it the client-to-server bytes; ``chain`` is set once the Certificate message passed."""

    def __init__(self) -> None:
        self._records = bytearray()
        self._handshake = bytearray()
        self.chain: list[bytes] | None = None
        self.done = False  # the handshake part is over (certificate found, or none will come)

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._records += data
        while len(self._records) >= 5 and not self.done:
            kind = self._records[0]
            length = int.from_bytes(self._records[3:5], "big")
            if self._records[1] != 3 or length > 18432:
                raise TapError("not a TLS record")
            if len(self._records) < 5 + length:
                return
            fragment = bytes(self._records[5:5 + length])
            del self._records[:5 + length]
            if kind == _HANDSHAKE:
                self._handshake += fragment
                if len(self._handshake) > MAX_HANDSHAKE:
                    raise TapError("the handshake is too large")
                self._parse_handshake()
            elif kind in (_CHANGE_CIPHER_SPEC, _APPLICATION_DATA, _ALERT):
                self.done = True  # from here on everything is encrypted (or over)

    def _parse_handshake(self) -> None:
        while len(self._handshake) >= 4:
            kind = self._handshake[0]
            length = int.from_bytes(self._handshake[1:4], "big")
            if len(self._handshake) < 4 + length:
                return
            body = bytes(self._handshake[4:4 + length])
            del self._handshake[:4 + length]
            if kind == _CERTIFICATE:
                self.chain = _certificates(body)
                self.done = True
                return


def _certificates(body: bytes) -> list[bytes]:
    if len(body) < 3:
        raise TapError("a truncated Certificate message")
    total = int.from_bytes(body[:3], "big")
    if total != len(body) - 3:
        raise TapError("a Certificate message of inconsistent length")
    chain, position = [], 3
    while position < len(body):
        if position + 3 > len(body):
            raise TapError("a truncated certificate entry")
        size = int.from_bytes(body[position:position + 3], "big")
        position += 3
        if position + size > len(body):
            raise TapError("a truncated certificate entry")
        chain.append(body[position:position + size])
        position += size
    return chain
