"""Reading the client certificate off a TLS 1.2 handshake as it passes by.

Mosquitto terminates TLS and checks the chain and the CRL; the registration service needs the
certificate itself (its fingerprint, not only its CN) to apply AWS-style Just-In-Time
Registration. In TLS 1.2 the client's Certificate handshake message travels in clear before
ChangeCipherSpec, so the service relays the bytes and reads it on the way: it never holds a key
and cannot alter the session. The endpoint pins its listener to TLS 1.2 for this.

The bytes come from an untrusted client, so the parser is strict and bounded: a record is at most
``MAX_RECORD`` bytes, a handshake message at most ``MAX_HANDSHAKE``, all the clear part of the
client's handshake at most ``MAX_CLEAR``; anything else than the client's side of a TLS 1.2 full
handshake (ClientHello first, then Certificate, ClientKeyExchange, CertificateVerify) raises
``TapError``, and so does every later ``feed`` of a tap that failed once.
"""

from __future__ import annotations

MAX_RECORD = 2**14 + 2048  # RFC 5246 6.2.3: the largest record a TLS 1.2 peer may send
MAX_HANDSHAKE = 64 * 1024  # a client Certificate chain larger than this is refused
MAX_CLEAR = 2 * MAX_HANDSHAKE  # every record the client sends before its ChangeCipherSpec
_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE = 20, 21, 22
_CLIENT_HELLO, _CERTIFICATE, _CERTIFICATE_VERIFY, _CLIENT_KEY_EXCHANGE = 1, 11, 15, 16


class TapError(Exception):
    """The client's handshake bytes are not a TLS 1.2 handshake we can read."""


class CertificateTap:
    """Feed it the client-to-server bytes; ``chain`` is set once the Certificate message passed,
    ``done`` once the clear part of the client's handshake is over (its ChangeCipherSpec, or an
    alert): from there on the bytes are encrypted and the tap ignores them."""

    def __init__(self) -> None:
        self._records = bytearray()
        self._handshake = bytearray()
        self._clear = 0  # bytes of complete records taken so far
        self._messages = 0  # handshake messages taken so far
        self._failed: str | None = None
        self.chain: list[bytes] | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        """Take the next bytes from the client; raises TapError on anything malformed."""
        if self._failed is not None:
            raise TapError(self._failed)
        if self.done:
            return
        try:
            self._records += data
            self._take_records()
        except TapError as exc:
            self._failed = str(exc)
            self._records.clear()
            self._handshake.clear()
            raise

    def _take_records(self) -> None:
        while len(self._records) >= 5 and not self.done:
            kind, major, minor = self._records[0], self._records[1], self._records[2]
            length = int.from_bytes(self._records[3:5], "big")
            if kind not in (_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE) or major != 3 or minor > 3:
                raise TapError("not a TLS 1.2 handshake record")
            if not 0 < length <= MAX_RECORD:
                raise TapError(f"a TLS record of {length} bytes")
            if self._clear + 5 + length > MAX_CLEAR:
                raise TapError("the clear part of the handshake is too large")
            if len(self._records) < 5 + length:
                return
            self._clear += 5 + length
            fragment = bytes(self._records[5:5 + length])
            del self._records[:5 + length]
            if kind == _HANDSHAKE:
                self._handshake += fragment
                self._parse_handshake()
            else:
                if self._handshake:
                    raise TapError("a handshake message cut by a record of another type")
                if kind == _CHANGE_CIPHER_SPEC and fragment != b"\x01":
                    raise TapError("a malformed ChangeCipherSpec")
                self.done = True  # ChangeCipherSpec: from here on everything is encrypted; an alert: over
                self._records.clear()

    def _parse_handshake(self) -> None:
        while len(self._handshake) >= 4:
            kind = self._handshake[0]
            length = int.from_bytes(self._handshake[1:4], "big")
            if length > MAX_HANDSHAKE:
                raise TapError("the handshake is too large")
            if self._messages == 0 and kind != _CLIENT_HELLO:
                raise TapError("the handshake does not begin with a ClientHello")
            if self._messages > 0 and kind not in (_CERTIFICATE, _CLIENT_KEY_EXCHANGE, _CERTIFICATE_VERIFY):
                raise TapError(f"an unexpected handshake message of type {kind}")
            if len(self._handshake) < 4 + length:
                return
            body = bytes(self._handshake[4:4 + length])
            del self._handshake[:4 + length]
            self._messages += 1
            if kind == _CERTIFICATE:
                if self.chain is not None:
                    raise TapError("a second Certificate message")
                self.chain = _certificates(body)


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
        if size == 0 or position + size > len(body):
            raise TapError("a truncated certificate entry")
        chain.append(body[position:position + size])
        position += size
    return chain
