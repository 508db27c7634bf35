"""``stampline firmware``: the Secure Boot V2 signing side, run in the product's CI."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from stampline import signing
from stampline.cli.common import add_json, add_workdir, emit_json
from stampline.errors import StamplineError, UsageError, shown
from stampline.files import read_bounded, write_atomically
from stampline.firmware import image as esp_image
from stampline.firmware import secure_boot
from stampline.pki.x509 import MAX_PUBLIC_KEY_PEM
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("firmware", help="sign and inspect firmware images (Secure Boot V2)")
    sub = parser.add_subparsers(dest="firmware_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    keygen = sub.add_parser("keygen", help="generate the secure boot signing key in the signing workspace's token")
    add_workdir(keygen)
    keygen.add_argument("--chip", default="esp32c3")
    keygen.add_argument("--pin-source", default="sealed", metavar="SOURCE")
    add_json(keygen)
    keygen.set_defaults(run=run_keygen)

    sign = sub.add_parser("sign", help="append a Secure Boot V2 signature block to a bootloader or app image")
    add_workdir(sign)
    sign.add_argument("--chip", default="esp32c3")
    sign.add_argument("--append", action="store_true", help="add a signature to an image signed by another key")
    sign.add_argument("image")
    sign.add_argument("--out", required=True, metavar="FILE")
    add_json(sign)
    sign.set_defaults(run=run_sign)

    verify = sub.add_parser("verify", help="check an image's signature (against a public key, if given)")
    verify.add_argument("image")
    verify.add_argument("--pubkey", metavar="PEM", help="the secure boot public key the device trusts")
    add_json(verify)
    verify.set_defaults(run=run_verify)

    info = sub.add_parser("info", help="project, version, secure_version, signature blocks and key digests")
    info.add_argument("image")
    add_json(info)
    info.set_defaults(run=run_info)

    pubkey = sub.add_parser("pubkey", help="write the secure boot public key as PEM and print its eFuse digest")
    add_workdir(pubkey)
    pubkey.add_argument("--out", required=True, metavar="FILE")
    add_json(pubkey)
    pubkey.set_defaults(run=run_pubkey)


def _read(path: str) -> bytes:
    return read_bounded(path, esp_image.MAX_IMAGE_BYTES, "firmware image")


def _write(path: str, data: bytes) -> None:
    try:
        write_atomically(Path(path), data)
    except OSError:
        raise UsageError(f"cannot write {path}.") from None


def run_keygen(args: argparse.Namespace) -> int:
    result = signing.keygen(Workspace.at(args.workdir, create=True), args.chip, args.pin_source)
    if args.json:
        emit_json({"key_type": result.key_type, "key_digest": result.digest.hex(), "created": result.created})
    else:
        print(f"created: {', '.join(result.created)}")
        print(f"eFuse key digest (SECURE_BOOT_DIGEST): {result.digest.hex()}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    signed = signing.sign(Workspace.at(args.workdir), _read(args.image), args.chip, append=args.append)
    _write(args.out, signed)
    blocks = secure_boot.parse_signature_blocks(signed)
    if args.json:
        emit_json({"out": args.out, "sha256": hashlib.sha256(signed).hexdigest(), "signature_blocks": len(blocks)})
    else:
        print(f"{args.out}: {len(blocks)} signature block(s), sha256 {hashlib.sha256(signed).hexdigest()}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    data = _read(args.image)
    key = None
    if args.pubkey:
        try:
            key = serialization.load_pem_public_key(read_bounded(args.pubkey, MAX_PUBLIC_KEY_PEM, "public key"))
        except ValueError:
            raise UsageError(f"{shown(args.pubkey, 160)} is not a PEM public key.") from None
    block = secure_boot.verify_image(data, key)  # type: ignore[arg-type]
    if args.json:
        emit_json({"ok": True, "key_type": block.key_type, "key_digest": block.key_digest.hex()})
    else:
        print(f"{args.image}: signature valid ({block.key_type}, key digest {block.key_digest.hex()})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    data = _read(args.image)
    parsed = esp_image.parse_image(data)
    blocks = secure_boot.parse_signature_blocks(data)
    valid = []
    for block in blocks:
        try:
            secure_boot.verify_image(data, block.public_key)
            valid.append(True)
        except StamplineError:
            valid.append(False)
    out = {
        "chip": parsed.chip, "sha256": hashlib.sha256(data).hexdigest(),
        "kind": "app" if parsed.app else "bootloader",
        "project": parsed.app.project_name if parsed.app else None,
        "version": parsed.app.version if parsed.app else None,
        "secure_version": parsed.app.secure_version if parsed.app else None,
        "idf_version": parsed.app.idf_ver if parsed.app else None,
        "signature_blocks": [{"key_type": b.key_type, "key_digest": b.key_digest.hex(), "valid": ok}
                             for b, ok in zip(blocks, valid)],
    }
    if args.json:
        emit_json(out)
        return 0
    for key in ("chip", "kind", "project", "version", "secure_version", "idf_version", "sha256"):
        if out[key] is not None:
            print(f"{key:15} {out[key]}")
    if not blocks:
        print(f"{'signatures':15} none (unsigned)")
    for i, block in enumerate(out["signature_blocks"]):  # type: ignore[union-attr]
        print(f"{'signature ' + str(i):15} {block['key_type']} key digest {block['key_digest']} "
              f"({'valid' if block['valid'] else 'INVALID'})")
    return 0


def run_pubkey(args: argparse.Namespace) -> int:
    info = signing.key_info(Workspace.at(args.workdir))
    _write(args.out, info.pem)
    if args.json:
        emit_json({"out": args.out, "key_type": info.key_type, "key_digest": info.digest.hex()})
    else:
        print(f"{args.out}: {info.key_type} public key")
        print(f"eFuse key digest (SECURE_BOOT_DIGEST): {info.digest.hex()}")
    return 0
