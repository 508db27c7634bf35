"""``stampline firmware``: the signing side as the product's CI runs it, checked with espsecure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import run_cli
from stampline.firmware import image


def espsecure(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "espsecure", *args], capture_output=True, text=True)


def test_sign_verify_info_pubkey_round_trip(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ci = str(release.files["secure_boot_key"].parent.parent)
    app = tmp_path / "app.bin"
    app.write_bytes(image.build_app_image("esp32c3", "product-app", "4.2.0", secure_version=3))
    signed = tmp_path / "app.signed.bin"
    done = run_cli("firmware", "sign", "--workdir", ci, "--chip", "esp32c3", str(app), "--out", str(signed))
    assert done.returncode == 0, done.stderr
    pem = tmp_path / "pub.pem"
    pub = run_cli("firmware", "pubkey", "--workdir", ci, "--out", str(pem), "--json")
    digest = json.loads(pub.stdout)["key_digest"]
    # Espressif's tool accepts our signature with our exported key, and computes the same digest
    assert espsecure("verify-signature", "--version", "2", "--keyfile", str(pem), str(signed)).returncode == 0
    out = tmp_path / "digest.bin"
    assert espsecure("digest-sbv2-public-key", "--keyfile", str(pem), "--output", str(out)).returncode == 0
    assert out.read_bytes().hex() == digest
    info = json.loads(run_cli("firmware", "info", str(signed), "--json").stdout)
    assert (info["project"], info["version"], info["secure_version"]) == ("product-app", "4.2.0", 3)
    assert info["signature_blocks"] == [{"key_type": "rsa-3072", "key_digest": digest, "valid": True}]
    assert run_cli("firmware", "verify", str(signed), "--pubkey", str(pem)).returncode == 0
    # a flipped byte in the signed body: espsecure and stampline both refuse
    data = bytearray(signed.read_bytes())
    data[0x3000] ^= 0x01
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(bytes(data))
    assert espsecure("verify-signature", "--version", "2", "--keyfile", str(pem), str(tampered)).returncode != 0
    refused = run_cli("firmware", "verify", str(tampered), "--pubkey", str(pem))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr


def test_signing_refusals_are_one_sentence(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ci = str(release.files["secure_boot_key"].parent.parent)
    text = tmp_path / "notes.txt"
    text.write_text("not firmware")
    cases = [
        (["firmware", "sign", "--workdir", ci, str(text), "--out", str(tmp_path / "x")], "not an ESP image"),
        (["firmware", "sign", "--workdir", ci, str(release.files["application"]), "--out", str(tmp_path / "x")],
         "already signed"),
        (["firmware", "keygen", "--workdir", ci], "never replaced"),
        (["firmware", "keygen", "--workdir", str(tmp_path / "w"), "--chip", "esp8266"], "no Secure Boot V2 scheme"),
        (["firmware", "info", str(tmp_path / "missing.bin")], "cannot read"),
    ]
    for args, needle in cases:
        done = run_cli(*args)
        assert done.returncode != 0, args
        assert needle in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()
