"""Bulk-registration manifests: what the station built, signed so the cloud can trust it.

The layout follows Microchip's Trust&GO manifests: one JWS in the flattened JSON serialization
(RFC 7515 section 7.2.2) per device, whose payload carries the device's unique id and its public
key as a JWK with the certificate chain in ``x5c``. Two things are added because a manifest
crosses an untrusted factory and the article's warning is that a lost or corrupted manifest
orphans devices: every entry carries its sequence number and the hash of the entry before it
(a hash chain that starts from the manifest id), and a signed header declares the entry count
and the hash of the last entry. Truncation, reordering, duplication and alteration all break
a signature, a sequence number, the chain or the count, and each bad entry is reported by
its index and unique id.

Entries are signed with ES256 by the ``manifest`` key, generated in the station token; its
public key (PEM or JWK) is what the cloud verifies with. The protected header holds ``alg``,
``typ`` and ``kid`` (the RFC 7638 thumbprint of the manifest key). ``x5t#S256`` is left out:
the manifest key has no certificate, and RFC 7515 defines that member as the thumbprint of
the signer's certificate.

Import verifies the whole manifest before it registers anything, then registers entries in
order, appending each applied one to a JSON-lines progress record (fsynced) before moving on:
an interrupted import leaves an exact record, and a rerun registers only the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import reprlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

from stampline.cloud.registrar import Registrar
from stampline.files import MiB, fsync_dir, read_bounded, write_atomically
from stampline.errors import StamplineError, shown
from stampline.pki import x509 as px
from stampline.pki.token import KeyAlgorithm, PublicKey, Scheme, TokenSigner
from stampline.pki.uri import Pkcs11Uri
from stampline.station.ledger import Ledger
from stampline.station.ledger_schema import DeviceState
from stampline.workspace import Workspace

FORMAT = "stampline-manifest"
VERSION = 1
ENTRY_TYPE = "stampline-device+jws"
HEADER_TYPE = "stampline-manifest+jws"
MANIFEST_KEY = "manifest"  # the key's name in station.yaml and its object label in the token
#: Ledger states of devices that are done on the line and belong in a manifest.
MANIFEST_STATES = frozenset({DeviceState.PROVISIONED.value, DeviceState.LOCKING.value, DeviceState.SECURED.value})
#: An entry takes 2.5 KB (EC P-256 device) to 3.7 KB (RSA-3072): some 140,000-200,000 devices.
MAX_MANIFEST_BYTES = 512 * MiB
#: A progress line takes about 200 bytes: room for more entries than a manifest holds.
MAX_PROGRESS_BYTES = 64 * MiB
MAX_PROTECTED_CHARS = 1024
MAX_PAYLOAD_CHARS = 64 * 1024

_ENTRY_FIELDS = {"version", "manifestId", "seq", "prev", "uniqueId", "serial", "model", "publicKeySet",
                 "provisioningTime", "batch", "station"}
_HEADER_FIELDS = {"version", "manifestId", "station", "createdAt", "batch", "count", "head"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


# ---------------------------------------------------------------- encodings and keys

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: Any, what: str) -> bytes:
    """Strict base64url without padding: the only spelling of the bytes that is accepted."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise _Bad(f"its {what} is not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise _Bad(f"its {what} is not canonical base64url")
    return data


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The JWK (RFC 7517/7518) of a public key, members in RFC 7638 order."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name)
        if crv is None:
            raise StamplineError(f"the EC curve {key.curve.name} has no JWK name stampline supports.")
        size = (key.curve.key_size + 7) // 8
        numbers = key.public_numbers()
        return {"crv": crv, "kty": "EC", "x": b64url(numbers.x.to_bytes(size, "big")),
                "y": b64url(numbers.y.to_bytes(size, "big"))}
    numbers_rsa = key.public_numbers()
    return {"e": b64url(_unsigned(numbers_rsa.e)), "kty": "RSA", "n": b64url(_unsigned(numbers_rsa.n))}


def _unsigned(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace."""
    canonical = json.dumps(public_jwk(key), sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def _es256_key(key: Any, what: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise StamplineError(f"{what} is not an EC P-256 key, which ES256 needs.")
    return key


def load_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """The manifest public key from a PEM (SubjectPublicKeyInfo) or JWK file."""
    data = read_bounded(path, px.MAX_PUBLIC_KEY_PEM, "public key")
    what = f"the public key in {shown(str(path), 160)}"
    if data.lstrip().startswith(b"{"):
        try:
            jwk = _strict_json(data)
            if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
                raise _Bad("it is not an EC P-256 JWK")
            x, y = (int.from_bytes(b64url_decode(jwk.get(c), c), "big") for c in ("x", "y"))
            return _es256_key(ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key(), what)
        except (_Bad, ValueError):
            raise StamplineError(f"{what} is not a valid EC P-256 JWK.") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise StamplineError(f"{what} is neither a PEM public key nor a JWK.") from None
    return _es256_key(key, what)


def write_public_key(key: ec.EllipticCurvePublicKey, path: str | os.PathLike[str]) -> None:
    """PEM, or a JWK (with its thumbprint as ``kid``) when the name ends in .jwk or .json."""
    if str(path).endswith((".jwk", ".json")):
        text = json.dumps({**public_jwk(key), "kid": jwk_thumbprint(key), "alg": "ES256", "use": "sig"}) + "\n"
    else:
        text = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    write_atomically(Path(path), text.encode())


# ---------------------------------------------------------------- signing and export

class ManifestSigner(Protocol):
    """An ES256 signer: a token key (``TokenSigner``) or, in tests, a software key."""

    public_key: Any

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 over ``data``, DER-encoded."""
        ...


def ensure_manifest_key(workspace: Workspace) -> TokenSigner:
    """The manifest key's signer; the key is generated in the station token on first use."""
    config = workspace.config()
    if MANIFEST_KEY not in config.keys:
        station = config.keys.get("sub_ca")
        if station is None:
            raise StamplineError("the station configuration names no 'sub_ca' key, so there is no station token "
                                 "to hold the manifest key.")
        token = config.token(station.token)
        if not token.has_key(MANIFEST_KEY):
            token.generate_key(MANIFEST_KEY, KeyAlgorithm.EC_P256)
        config.keys[MANIFEST_KEY] = Pkcs11Uri(token=station.token, object=MANIFEST_KEY)
        config.save()
    token, label = config.key_token(MANIFEST_KEY)
    signer = token.signer(label, Scheme.ECDSA_SHA256)
    _es256_key(signer.public_key, "the manifest key")
    return signer


def _sign_jws(signer: ManifestSigner, typ: str, payload: dict[str, Any],
              unprotected: dict[str, Any] | None = None) -> dict[str, Any]:
    protected = {"alg": "ES256", "typ": typ, "kid": jwk_thumbprint(signer.public_key)}
    encoded_protected = b64url(json.dumps(protected, separators=(",", ":")).encode())
    encoded_payload = b64url(json.dumps(payload, separators=(",", ":")).encode())
    r, s = decode_dss_signature(signer.sign(f"{encoded_protected}.{encoded_payload}".encode("ascii")))
    jws: dict[str, Any] = {"protected": encoded_protected, "payload": encoded_payload}
    if unprotected:
        jws["header"] = unprotected
    jws["signature"] = b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return jws


def _link(jws: dict[str, Any]) -> str:
    """An entry's place in the chain: SHA-256 of its signing input (signature excluded: ECDSA
    signatures are malleable, the signed bytes are not)."""
    return b64url(hashlib.sha256(f"{jws['protected']}.{jws['payload']}".encode("ascii")).digest())


def _genesis(manifest_id: str) -> str:
    return b64url(hashlib.sha256(f"{FORMAT}:{manifest_id}".encode()).digest())


def _b64der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")


def build_manifest(devices: Iterable[dict[str, Any]], sub_ca: x509.Certificate, signer: ManifestSigner,
                   station: str, batch: int | None = None, manifest_id: str | None = None) -> bytes:
    """The manifest file for ledger-export rows (serial, chip_id, chip_model, certificate PEM,
    provisioned_at, batch), in the given order."""
    manifest_id = manifest_id or str(uuid.uuid4())
    prev = _genesis(manifest_id)
    entries = []
    for seq, device in enumerate(devices):
        cert = x509.load_pem_x509_certificate(str(device["certificate"]).encode())
        if not px.verify_signed_by(cert, sub_ca.public_key()):  # type: ignore[arg-type]
            raise StamplineError(f"the certificate of device {device['serial']} was not issued by the Sub CA "
                                 "of this workspace.")
        jwk = {"kid": jwk_thumbprint(cert.public_key()), **public_jwk(cert.public_key()),  # type: ignore[arg-type]
               "x5c": [_b64der(cert), _b64der(sub_ca)]}
        payload = {"version": VERSION, "manifestId": manifest_id, "seq": seq, "prev": prev,
                   "uniqueId": device["chip_id"], "serial": device["serial"], "model": device["chip_model"],
                   "publicKeySet": {"keys": [jwk]}, "provisioningTime": device["provisioned_at"],
                   "batch": device["batch"], "station": station}
        jws = _sign_jws(signer, ENTRY_TYPE, payload, {"uniqueId": device["chip_id"]})
        entries.append(jws)
        prev = _link(jws)
    if not entries:
        raise StamplineError("there is no device to put in the manifest.")
    header = _sign_jws(signer, HEADER_TYPE, {
        "version": VERSION, "manifestId": manifest_id, "station": station,
        "createdAt": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "batch": batch, "count": len(entries), "head": prev})
    return _render(header, entries)


def _render(header: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
    """One JSON document, one entry per line: easy to grep by unique id, to diff and to count."""
    def dump(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))
    lines = [f'{{"format":{dump(FORMAT)},"version":{VERSION},', f'"header":{dump(header)},', '"entries":[']
    lines += [dump(entry) + ("," if i < len(entries) - 1 else "") for i, entry in enumerate(entries)]
    lines.append("]}")
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class ExportReport:
    manifest_id: str
    count: int
    batch: int | None
    kid: str
    path: str


def export_manifest(workspace: Workspace, out: str | os.PathLike[str], batch: int | None = None,
                    pubkey_out: str | os.PathLike[str] | None = None) -> ExportReport:
    """Sign a manifest of the finished devices in the ledger (one batch, or all) and write it
    atomically, after checking it exactly as the cloud will."""
    config = workspace.config()
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        devices = [row for row in ledger.export() if row["state"] in MANIFEST_STATES and row["certificate"]
                   and (batch is None or row["batch"] == batch)]
    if not devices:
        where = f" in batch {batch}" if batch is not None else ""
        raise StamplineError(f"the ledger holds no provisioned device{where} to put in a manifest.")
    if not workspace.sub_cert_path.exists():
        raise StamplineError(f"the workspace has no Sub CA certificate at {workspace.sub_cert_path}.")
    sub_ca = px.load_certificate(read_bounded(workspace.sub_cert_path, px.MAX_CERTIFICATE_PEM, "Sub CA certificate"),
                                 "Sub CA certificate")
    signer = ensure_manifest_key(workspace)
    data = build_manifest(devices, sub_ca, signer, config.station_id, batch)
    report = check_manifest(data, signer.public_key, sub_ca)
    if report.problems:
        raise StamplineError(f"the manifest just signed does not verify ({report.problems[0]}); nothing was written.")
    write_atomically(Path(out), data)
    if pubkey_out is not None:
        write_public_key(signer.public_key, pubkey_out)
    return ExportReport(report.manifest_id or "", len(devices), batch, jwk_thumbprint(signer.public_key), str(out))


# ---------------------------------------------------------------- verification

class _Bad(Exception):
    """Why one entry (or the header) is bad: a clause, completed into a sentence by the caller."""


@dataclass(frozen=True)
class Problem:
    """One bad entry (``index``), a missing range, or the whole manifest (``index`` None)."""

    index: int | None
    unique_id: str | None
    message: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "uniqueId": self.unique_id, "message": self.message}


@dataclass(frozen=True)
class ManifestEntry:
    """A verified device entry: what a registrar needs."""

    index: int
    unique_id: str
    serial: str
    certificate_pem: str
    ca_certificate_pem: str


@dataclass
class VerifyReport:
    manifest_id: str | None = None
    station: str | None = None
    declared: int | None = None
    entries: list[ManifestEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "manifestId": self.manifest_id, "station": self.station, "declared": self.declared,
                "verified": len(self.entries), "problems": [p.to_dict() for p in self.problems]}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Bad("a JSON object names a member twice")
    return result


def _reject_constant(name: str) -> Any:
    raise _Bad(f"it holds the non-JSON number {name}")


def _strict_json(data: bytes | str) -> Any:
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _Bad("it is not valid JSON") from None


def _shown(value: Any) -> str | None:
    """A bounded, printable rendering of an untrusted unique id for a report."""
    if not isinstance(value, str):
        return None
    clean = "".join(c if c.isprintable() else "?" for c in value)
    return clean if len(clean) <= 40 else clean[:37] + "..."


def _brief(value: Any) -> str:
    """Any value from the manifest, rendered bounded and printable for a report."""
    return shown(reprlib.repr(value), 40)


def _open_jws(jws: Any, key: ec.EllipticCurvePublicKey, kid: str, typ: str) -> dict[str, Any]:
    """The payload of a flattened JWS once its header and ES256 signature check out."""
    if not isinstance(jws, dict) or not {"protected", "payload", "signature"} <= jws.keys() \
            or not jws.keys() <= {"protected", "payload", "signature", "header"}:
        raise _Bad("it is not a flattened JWS object (protected, payload, signature)")
    if not isinstance(jws["protected"], str) or len(jws["protected"]) > MAX_PROTECTED_CHARS \
            or not isinstance(jws["payload"], str) or len(jws["payload"]) > MAX_PAYLOAD_CHARS \
            or not (jws["protected"] + jws["payload"]).isascii():
        raise _Bad("its protected header or payload is missing, too long or not base64url")
    protected = _strict_json(b64url_decode(jws["protected"], "protected header"))
    if not isinstance(protected, dict) or protected.keys() != {"alg", "typ", "kid"} \
            or (protected["alg"], protected["typ"]) != ("ES256", typ):
        raise _Bad(f"its protected header is not {{alg: ES256, typ: {typ}, kid}}")
    if protected["kid"] != kid:
        raise _Bad(f"it was signed by another key (kid {_shown(protected['kid'])}, not the manifest key's {kid})")
    raw = b64url_decode(jws["signature"], "signature")
    if len(raw) != 64:
        raise _Bad("its signature is not a 64-byte ES256 signature")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, f"{jws['protected']}.{jws['payload']}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _Bad("its signature does not verify with the manifest key (it was altered)") from None
    payload = _strict_json(b64url_decode(jws["payload"], "payload"))
    if not isinstance(payload, dict):
        raise _Bad("its payload is not a JSON object")
    return payload


def _require(payload: dict[str, Any], fields: set[str], types: dict[str, Any]) -> None:
    if payload.keys() != fields:
        odd = sorted(payload.keys() ^ fields)
        raise _Bad(f"its payload does not have the expected members (check {shown(', '.join(map(str, odd)))})")
    for name, kind in types.items():
        value = payload[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Bad(f"its payload member {name} has the wrong type")
    if payload["version"] != VERSION:
        raise _Bad(f"its payload is version {_brief(payload['version'])}, not {VERSION}")


def _check_header(payload: dict[str, Any]) -> None:
    _require(payload, _HEADER_FIELDS, {"version": int, "manifestId": str, "station": str, "createdAt": str,
                                       "batch": (int, type(None)), "count": int, "head": str})
    if payload["count"] < 1:
        raise _Bad("it declares no entry")


def _certificate(text: Any, what: str) -> x509.Certificate:
    if not isinstance(text, str):
        raise _Bad(f"its {what} in x5c is not a string")
    try:
        return px.load_certificate(base64.b64decode(text, validate=True), what)
    except (binascii.Error, ValueError, StamplineError):
        raise _Bad(f"its {what} in x5c is not a base64 DER certificate") from None


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[Any]:
    return [a.value for a in cert.subject.get_attributes_for_oid(oid)]


def _check_entry(index: int, payload: dict[str, Any], ca: x509.Certificate | None) -> ManifestEntry:
    """Schema, certificate chain, key and subject of one device entry (its place is checked apart)."""
    _require(payload, _ENTRY_FIELDS, {"version": int, "manifestId": str, "seq": int, "prev": str, "uniqueId": str,
                                      "serial": str, "model": str, "publicKeySet": dict,
                                      "provisioningTime": (str, type(None)), "batch": (int, type(None)),
                                      "station": str})
    keys = payload["publicKeySet"].get("keys")
    if payload["publicKeySet"].keys() != {"keys"} or not isinstance(keys, list) or len(keys) != 1 \
            or not isinstance(keys[0], dict):
        raise _Bad("its publicKeySet does not hold exactly one key")
    jwk = keys[0]
    chain = jwk.get("x5c")
    if not isinstance(chain, list) or len(chain) != 2:
        raise _Bad("its key's x5c is not [device certificate, Sub CA certificate]")
    cert, issuer = _certificate(chain[0], "device certificate"), _certificate(chain[1], "Sub CA certificate")
    if ca is not None and issuer != ca:
        raise _Bad("its Sub CA certificate is not the given Sub CA")
    if cert.issuer != issuer.subject or not px.verify_signed_by(cert, issuer.public_key()):  # type: ignore[arg-type]
        raise _Bad("its device certificate is not signed by its Sub CA certificate")
    public_key = cert.public_key()
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise _Bad("its device certificate holds neither an EC nor an RSA key")
    try:
        expected = {"kid": jwk_thumbprint(public_key), **public_jwk(public_key), "x5c": chain}
    except StamplineError:
        raise _Bad("its device key is on a curve stampline does not support") from None
    if jwk != expected:
        raise _Bad("its JWK is not the key of its device certificate")
    if _attribute(cert, NameOID.COMMON_NAME) != [payload["serial"]]:
        raise _Bad(f"its serial {_shown(payload['serial'])} is not the CN of its device certificate")
    if _attribute(cert, NameOID.SERIAL_NUMBER) != [payload["uniqueId"]]:
        raise _Bad("its uniqueId is not the serialNumber of its device certificate")
    return ManifestEntry(index, payload["uniqueId"], payload["serial"], _pem(cert), _pem(issuer))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _reported_id(jws: Any) -> str | None:
    """The unique id to name an entry by before (or without) trusting it."""
    if not isinstance(jws, dict):
        return None
    try:
        text = jws.get("payload")
        if isinstance(text, str) and len(text) > MAX_PAYLOAD_CHARS:
            raise _Bad("its payload is too long")
        payload = _strict_json(b64url_decode(text, "payload"))
        if isinstance(payload, dict) and isinstance(payload.get("uniqueId"), str):
            return _shown(payload["uniqueId"])
    except _Bad:
        pass
    header = jws.get("header")
    return _shown(header.get("uniqueId")) if isinstance(header, dict) else None


def _entry_problem(index: int, unique_id: str | None, clause: str) -> Problem:
    return Problem(index, unique_id, f"Entry {index} (uniqueId {unique_id or 'unknown'}): {clause}.")


def check_manifest(data: bytes, public_key: ec.EllipticCurvePublicKey,
                   ca: x509.Certificate | None = None) -> VerifyReport:
    """Verify a manifest's bytes: every entry, its place in the chain, and the header.

    Each bad entry is one problem; a check that follows from an earlier failure (the link of
    the entry after a bad one) is skipped, so that one corruption is reported once.
    """
    key = _es256_key(public_key, "the manifest public key")
    kid = jwk_thumbprint(key)
    report = VerifyReport()
    try:
        document = _strict_json(data)
        if not isinstance(document, dict) or document.keys() != {"format", "version", "header", "entries"} \
                or document["format"] != FORMAT or not isinstance(document["entries"], list):
            raise _Bad("it is not a stampline manifest (format, version, header, entries)")
        if document["version"] != VERSION:
            raise _Bad(f"it is manifest version {_brief(document['version'])}, which this stampline does not read")
    except _Bad as exc:
        cut = " (cut short or corrupt)" if str(exc) == "it is not valid JSON" else ""
        report.problems.append(Problem(None, None, f"The manifest file is unreadable: {exc}{cut}."))
        return report

    header: dict[str, Any] | None = None
    try:
        header = _open_jws(document["header"], key, kid, HEADER_TYPE)
        _check_header(header)
        report.manifest_id, report.station, report.declared = header["manifestId"], header["station"], header["count"]
    except _Bad as exc:
        header = None
        report.problems.append(Problem(None, None, f"The manifest header is bad: {exc}."))

    entries: list[Any] = document["entries"]
    expected_prev = _genesis(header["manifestId"]) if header else None
    previous_ok = True
    seen: dict[tuple[str, str], int] = {}
    for index, jws in enumerate(entries):
        unique_id = _reported_id(jws)
        try:
            payload = _open_jws(jws, key, kid, ENTRY_TYPE)
            unique_id = _shown(payload.get("uniqueId"))
            entry = _check_entry(index, payload, ca)
            if jws.get("header", {"uniqueId": entry.unique_id}) != {"uniqueId": entry.unique_id}:
                raise _Bad("its unprotected header does not repeat the uniqueId of its payload")
            if header and (payload["manifestId"], payload["station"]) != (header["manifestId"], header["station"]):
                raise _Bad("it belongs to another manifest")
            if header and header["batch"] is not None and payload["batch"] != header["batch"]:
                raise _Bad(f"it is from batch {_brief(payload['batch'])}, not from the manifest's batch "
                           f"{_brief(header['batch'])}")
            identity = (("unique id", entry.unique_id), ("serial", entry.serial), ("certificate", entry.certificate_pem))
            for what, value in identity:
                if (what, value) in seen:
                    raise _Bad(f"it repeats the {what} of entry {seen[what, value]}")
            seen.update(dict.fromkeys(identity, index))
            if payload["seq"] != index:
                raise _Bad(f"it carries sequence number {_brief(payload['seq'])} (the entries were reordered, "
                           "or one was removed or added before it)")
            if previous_ok and expected_prev is not None and payload["prev"] != expected_prev:
                raise _Bad(f"it does not chain to entry {index - 1}" if index else
                           "it does not start the chain of this manifest")
        except _Bad as exc:
            report.problems.append(_entry_problem(index, unique_id, str(exc)))
            previous_ok = False
        else:
            report.entries.append(entry)
            previous_ok = True
        expected_prev = _link(jws) if _is_jws_shaped(jws) else None

    if header:
        count, held = header["count"], len(entries)
        if held < count:
            missing = f"entry {held} is" if count - held == 1 else f"entries {held} to {count - 1} are"
            report.problems.append(Problem(held, None, f"The manifest is truncated: {missing} missing "
                                                       f"(the header declares {count} entries, the file holds {held})."))
        elif held > count:
            report.problems.append(Problem(count, None, f"The manifest holds {held} entries but its header "
                                                        f"declares {count}."))
        elif not report.problems and expected_prev != header["head"]:
            report.problems.append(Problem(None, None, "The manifest header's head hash is not the hash of the "
                                                       "last entry."))
    return report


def _is_jws_shaped(jws: Any) -> bool:
    return isinstance(jws, dict) and isinstance(jws.get("protected"), str) and isinstance(jws.get("payload"), str) \
        and jws["protected"].isascii() and jws["payload"].isascii()


def read_manifest(path: str | os.PathLike[str]) -> bytes:
    return read_bounded(path, MAX_MANIFEST_BYTES, "manifest")


def verify_manifest(path: str | os.PathLike[str], public_key: ec.EllipticCurvePublicKey,
                    ca: x509.Certificate | None = None) -> VerifyReport:
    return check_manifest(read_manifest(path), public_key, ca)


# ---------------------------------------------------------------- import

class ManifestRejected(StamplineError):
    """The manifest failed verification; ``problems`` says where. Nothing was registered."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"the manifest fails verification with {len(problems)} problem(s); nothing was imported.")
        self.problems = problems


@dataclass(frozen=True)
class ImportReport:
    manifest_id: str
    registrar: str
    total: int
    registered: int  # by this run
    already: int  # found in the progress record, not registered again
    registry_ids: dict[str, str]  # unique id -> the registry's id, for every entry


def _read_progress(path: Path, manifest_id: str, registrar: str, entries: list[ManifestEntry]) -> dict[int, str]:
    """Applied entries (index -> registry id) from the progress record. A torn last line (a
    crash while appending it) is cut off: that entry is registered again, which registrars
    accept (registration is idempotent)."""
    if not path.exists():
        return {}
    data = read_bounded(path, MAX_PROGRESS_BYTES, "progress record")
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    applied: dict[int, str] = {}
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            record = _strict_json(line)
            index = record["index"]
            ok = (record.keys() == {"manifestId", "registrar", "index", "uniqueId", "registryId"}
                  and isinstance(index, int) and 0 <= index < len(entries) and index not in applied
                  and isinstance(record["registryId"], str))
        except (_Bad, KeyError, TypeError):
            ok = False
        if not ok:
            raise StamplineError(f"line {number} of the progress record {path} is not a valid progress line.")
        if record["manifestId"] != manifest_id or record["registrar"] != registrar:
            raise StamplineError(f"the progress record {path} belongs to another import "
                                 f"(manifest {_shown(record['manifestId'])}, registrar {_shown(record['registrar'])}).")
        if record["uniqueId"] != entries[index].unique_id:
            raise StamplineError(f"line {number} of the progress record {path} names another device than entry {index}.")
        applied[index] = record["registryId"]
    return applied


def import_manifest(path: str | os.PathLike[str], public_key: ec.EllipticCurvePublicKey, registrar: Registrar,
                    progress_path: str | os.PathLike[str], ca: x509.Certificate | None = None,
                    on_entry: Callable[[int, int], None] | None = None) -> ImportReport:
    """Verify the whole manifest, then register each entry not yet in the progress record,
    recording it durably before the next. Refuses (ManifestRejected) if any entry is bad."""
    report = verify_manifest(path, public_key, ca)
    if report.problems:
        raise ManifestRejected(report.problems)
    assert report.manifest_id is not None
    progress = Path(progress_path)
    applied = _read_progress(progress, report.manifest_id, registrar.name, report.entries)
    already = len(applied)
    new_file = not progress.exists()
    with open(progress, "a", encoding="utf-8") as record:
        if new_file:
            fsync_dir(progress.parent if str(progress.parent) else Path("."))
        for entry in report.entries:
            if entry.index in applied:
                continue
            registry_id = registrar.register_device(entry.serial, entry.certificate_pem, entry.ca_certificate_pem)
            record.write(json.dumps({"manifestId": report.manifest_id, "registrar": registrar.name,
                                     "index": entry.index, "uniqueId": entry.unique_id,
                                     "registryId": registry_id}, separators=(",", ":")) + "\n")
            record.flush()
            os.fsync(record.fileno())
            applied[entry.index] = registry_id
            if on_entry:
                on_entry(len(applied), len(report.entries))
    ids = {entry.unique_id: applied[entry.index] for entry in report.entries}
    return ImportReport(report.manifest_id, registrar.name, len(report.entries), len(report.entries) - already,
                        already, ids)
