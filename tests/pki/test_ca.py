"""The CA ceremony: chain, profile, key protection, PIN handling, CRL."""

from __future__ import annotations

import os
import subprocess

import pytest
from cryptography import x509

from conftest import run_cli, tool
from stampline import ceremony
from stampline.errors import StamplineError
from stampline.pki import softhsm
from stampline.pki.pin import EnvPin
from stampline.pki.token import Token, TokenSpec
from stampline.pki.uri import Pkcs11Uri
from stampline.workspace import Workspace


def test_chain_verifies_with_openssl(ca_workspace: Workspace) -> None:
    done = subprocess.run([tool("openssl"), "verify", "-x509_strict", "-CAfile", str(ca_workspace.root_cert_path),
                           str(ca_workspace.sub_cert_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("which", ["root_cert_path", "sub_cert_path"])
def test_pkilint_finds_no_warning(ca_workspace: Workspace, which: str) -> None:
    done = subprocess.run([tool("lint_pkix_cert"), "lint", "-s", "WARNING", str(getattr(ca_workspace, which))],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout


def test_sub_ca_profile(ca_workspace: Workspace) -> None:
    root = ceremony.load_root(ca_workspace)
    sub = ceremony.load_sub(ca_workspace)
    bc = sub.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = sub.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    aki = sub.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert sub.issuer == root.subject
    assert sub.serial_number.bit_length() >= 64


def test_export_prints_root_then_sub(ca_workspace: Workspace) -> None:
    done = run_cli("ca", "export", "--workdir", str(ca_workspace.root))
    assert done.returncode == 0, done.stderr
    certs = x509.load_pem_x509_certificates(done.stdout.encode())
    assert [c.subject for c in certs] == [ceremony.load_root(ca_workspace).subject, ceremony.load_sub(ca_workspace).subject]


@pytest.mark.parametrize("key", ["root_ca", "sub_ca"])
def test_ca_private_keys_cannot_be_read_out(ca_workspace: Workspace, key: str) -> None:
    token, label = ca_workspace.config().key_token(key)
    attrs = token.private_key_attributes(label)
    assert attrs == {"sensitive": True, "extractable": False, "never_extractable": True,
                     "always_sensitive": True, "local": True}
    # Reading the key value through PKCS#11 fails ...
    from pkcs11 import Attribute, AttributeSensitive, ObjectClass
    from stampline.pki.token import owner

    def read_value(state):  # type: ignore[no-untyped-def]
        private = state.key(token.spec, label, ObjectClass.PRIVATE_KEY)
        with pytest.raises(AttributeSensitive):
            private[Attribute.VALUE]
        return True

    assert owner().call(read_value)
    # ... and an independent tool, logged in with the right PIN, sees the same protection.
    pin = token.spec.pin.read(token.label).reveal()
    done = subprocess.run(
        [tool("pkcs11-tool"), "--module", softhsm.module_path(), "--token-label", token.label, "--login",
         "--pin", "env:TEST_PIN", "--list-objects", "--type", "privkey", "--label", label],
        capture_output=True, text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(ca_workspace.softhsm_dir / "softhsm2.conf"), "TEST_PIN": pin})
    assert done.returncode == 0, done.stderr
    assert "sensitive, always sensitive, never extractable, local" in done.stdout, done.stdout


def test_wrong_pin_is_reported_and_not_retried(ca_workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    class CountingPin(EnvPin):
        reads = 0

        def read(self, token_label: str):  # type: ignore[no-untyped-def]
            CountingPin.reads += 1
            return super().read(token_label)

    conf = ca_workspace.softhsm_dir / "softhsm2.conf"
    monkeypatch.setenv("WRONG_PIN", "not-the-pin")
    spec = TokenSpec("stampline-line-1", softhsm.module_path(), CountingPin("WRONG_PIN"), (("SOFTHSM2_CONF", str(conf)),))
    Token(spec).logout()  # this process may hold a session from another test
    with pytest.raises(StamplineError, match="PIN for token 'stampline-line-1' is wrong; stampline does not retry"):
        Token(spec).login()
    assert CountingPin.reads == 1
    # the right PIN still works afterwards: one wrong try did not lock the token
    ca_workspace.config().key_token("sub_ca")[0].login()


def test_pins_never_reach_argv(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real_run = subprocess.run

    def spy(argv, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(list(argv))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    monkeypatch.setenv("NEW_PIN", "pin-4-test-9876")
    monkeypatch.setenv("NEW_PIN_ROOT", "root-pin-5432")
    workspace = Workspace.at(tmp_path / "w", create=True)
    ceremony.init(workspace, ceremony.CeremonyOptions(pin_source="env:NEW_PIN"))
    assert seen, "the ceremony initialises tokens with pkcs11-tool"
    assert not any(pin in arg for argv in seen for arg in argv for pin in ("pin-4-test-9876", "root-pin-5432"))
    config_text = workspace.config_path.read_text()
    assert "pin-4-test-9876" not in config_text and "root-pin-5432" not in config_text
    assert "NEW_PIN_ROOT" in config_text and "so_pin" not in config_text  # no reset path left on disk
    assert workspace.config_path.stat().st_mode & 0o077 == 0
    # and the configuration names the variable, so the station can log in with it
    token, _ = workspace.config().key_token("sub_ca")
    token.login()


def test_uri_refuses_pin_and_round_trips() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=line%201;object=sub-ca")
    assert uri.token == "line 1" and str(uri) == "pkcs11:token=line%201;object=sub-ca"
    with pytest.raises(StamplineError, match="must not carry a PIN"):
        Pkcs11Uri.parse("pkcs11:token=a;object=b?pin-value=1234")
    with pytest.raises(StamplineError, match="must name both"):
        Pkcs11Uri.parse("pkcs11:token=a")
    with pytest.raises(StamplineError, match="not a PKCS#11 URI"):
        Pkcs11Uri.parse("file:///etc/passwd")


def test_crl_is_signed_by_the_sub_ca(fresh_workspace: Workspace) -> None:
    revoked = [ceremony.revoked_entry("0a1b2c", 1_700_000_000, "rework")]
    crl = ceremony.issue_crl(fresh_workspace, revoked)
    assert crl.is_signature_valid(ceremony.load_sub(fresh_workspace).public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(0x0A1B2C) is not None
    bundle = fresh_workspace.root / "bundle.pem"
    bundle.write_bytes(fresh_workspace.root_cert_path.read_bytes() + fresh_workspace.sub_cert_path.read_bytes())
    done = subprocess.run([tool("openssl"), "crl", "-in", str(fresh_workspace.crl_path), "-CAfile", str(bundle),
                           "-noout"], capture_output=True, text=True)
    assert done.returncode == 0 and "verify OK" in done.stderr + done.stdout, done.stderr
    lint = subprocess.run([tool("lint_crl"), "lint", "-t", "CRL", "-p", "PKIX", "-s", "WARNING",
                           str(fresh_workspace.crl_path)], capture_output=True, text=True)
    assert lint.stdout.strip() == "", lint.stdout
    assert ceremony.issue_crl(fresh_workspace, []).extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number == 2


def test_ceremony_never_replaces_an_existing_root(fresh_workspace: Workspace) -> None:
    fresh_workspace.root_cert_path.unlink()
    with pytest.raises(StamplineError, match="holds a root key but the workspace has no root certificate"):
        ceremony.init(fresh_workspace, ceremony.CeremonyOptions())


def test_a_ceremony_cut_short_can_be_run_again(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second token's initialisation fails: the rerun makes it, then the CAs."""
    real = softhsm.init_token
    calls = []

    def failing_second(conf, label, so_pin, user_pin):  # type: ignore[no-untyped-def]
        calls.append(label)
        if len(calls) == 2:
            raise StamplineError("pkcs11-tool failed: simulated.")
        return real(conf, label, so_pin, user_pin)

    monkeypatch.setattr(softhsm, "init_token", failing_second)
    workspace = Workspace.at(tmp_path / "w", create=True)
    with pytest.raises(StamplineError, match="simulated"):
        ceremony.init(workspace, ceremony.CeremonyOptions())
    monkeypatch.setattr(softhsm, "init_token", real)
    result = ceremony.init(workspace, ceremony.CeremonyOptions())
    assert "token stampline-line-1" in result.created and "root CA" in result.created
    assert ceremony.load_sub(workspace).issuer == ceremony.load_root(workspace).subject
