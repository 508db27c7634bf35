"""The CA ceremony on a workspace: station configuration, tokens, root CA, Sub CA, CRL.

Each step looks at what already exists and does only what is missing, so a ceremony that was
interrupted can be run again; nothing that exists is ever replaced.
"""

from __future__ import annotations

import getpass
import os
import secrets
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampline import private
from stampline.errors import StamplineError, UsageError
from stampline.files import read_bounded, write_atomically
from stampline.pki import ca, softhsm
from stampline.pki import x509 as px
from stampline.pki.pin import seal, unseal
from stampline.pki.token import KeyAlgorithm
from stampline.pki.uri import Pkcs11Uri
from stampline.workspace import SOFTHSM, StationConfig, Workspace, new_workspace_id

ROOT_TOKEN = "stampline-root"
ROOT_KEY = "root-ca"
SUB_KEY = "sub-ca"


@dataclass(frozen=True)
class CeremonyOptions:
    organization: str = "Stampline Demo"
    station_id: str = "line-1"
    pin_source: str = "sealed"  # sealed | prompt | env:NAME
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    root_days: int = 10950  # 30 years: outlives the Sub CA
    sub_days: int = 9131  # 25 years: outlives the devices' 20-year certificates


@dataclass(frozen=True)
class CeremonyResult:
    root: x509.Certificate
    sub: x509.Certificate
    created: list[str]


def _pin_spec(source: str, workspace_id: str, label: str, pin: str) -> dict[str, object]:
    if source == "sealed":
        return {"sealed": seal(pin, workspace_id, label)}
    if source == "prompt":
        return {"prompt": True}
    return {"env": source.split(":", 1)[1]}


def _new_pin(source: str, label: str) -> str:
    if source == "sealed":
        return secrets.token_urlsafe(12)
    if source == "prompt":
        if not sys.stdin.isatty():
            raise UsageError("--pin-source prompt needs a terminal to type the new PINs.")
        first = getpass.getpass(f"New PIN for token '{label}': ")
        if first != getpass.getpass("Again: "):
            raise UsageError("the two PINs differ; nothing was created.")
        return first
    name = source.split(":", 1)[1]
    value = os.environ.get(name, "")
    if len(value) < 4:
        raise UsageError(f"the environment variable {name} must hold the new token PIN (at least 4 characters).")
    return value


def check_pin_source(pin_source: str) -> None:
    if not (pin_source in ("sealed", "prompt") or
            (pin_source.startswith("env:") and pin_source[4:].replace("_", "").isalnum())):
        raise UsageError(f"--pin-source must be sealed, prompt or env:NAME, not '{pin_source}'.")


def _check_options(options: CeremonyOptions) -> None:
    check_pin_source(options.pin_source)
    if not options.station_id.replace("-", "").isalnum() or len(options.station_id) > 24:
        raise UsageError("--station-id must be 1-24 letters, digits or '-'.")
    if not (0 < len(options.organization) <= 64 and options.organization.isprintable()):
        raise UsageError("--org must be 1-64 printable characters.")


def _pin_source_for(pin_source: str, label: str) -> str:
    """The offline root's token never shares the station's PIN: ``env:NAME`` means NAME for the
    station (or signing) token and NAME_ROOT for the root token."""
    if pin_source.startswith("env:") and label == ROOT_TOKEN:
        return pin_source + "_ROOT"
    return pin_source


def configure_workspace(workspace: Workspace, station_id: str, keys: dict[str, Pkcs11Uri], pin_source: str,
                        created: list[str]) -> StationConfig:
    """A new workspace configuration whose tokens are SoftHSM2 tokens in the workspace, one per
    token the keys name, each with its own PIN (from ``pin_source``).

    Every PIN is obtained before anything is created. The SO PIN is random; it is kept (sealed)
    only when the user PINs are sealed too: with PINs from the environment or a prompt, a stolen
    disk must not hold a way to reset them, so a locked token is re-initialised by a new ceremony."""
    labels = list(dict.fromkeys(uri.token for uri in keys.values()))
    sources = {label: _pin_source_for(pin_source, label) for label in labels}
    pins = {label: _new_pin(sources[label], label) for label in labels}
    workspace_id = new_workspace_id()
    softhsm.write_config(workspace.softhsm_dir)
    tokens: dict[str, dict[str, object]] = {}
    so_pins = {label: secrets.token_urlsafe(16) for label in labels}
    for label in labels:
        tokens[label] = {"module": SOFTHSM, "pin": _pin_spec(sources[label], workspace_id, label, pins[label])}
        if pin_source == "sealed":
            tokens[label]["so_pin"] = {"sealed": seal(so_pins[label], workspace_id, label + "/so")}
    # the configuration first: a ceremony cut short after it can be run again and makes the rest
    config = StationConfig(workspace, workspace_id, station_id, tokens, keys)
    config.save()
    created.append("workspace configuration")
    _ensure_tokens(config, created, {label: (so_pins[label], pins[label]) for label in labels})
    return config


def _ensure_tokens(config: StationConfig, created: list[str],
                   known: dict[str, tuple[str, str]] | None = None) -> None:
    """Initialise every configured SoftHSM2 token that does not exist yet (PINs from their sources)."""
    conf = softhsm.write_config(config.workspace.softhsm_dir)
    present = set(softhsm.token_labels(conf))
    for label, spec in config.tokens.items():
        if spec.get("module") != SOFTHSM or label in present:
            continue
        if known and label in known:
            so_pin, user_pin = known[label]
        else:
            sealed_so = spec.get("so_pin")
            so_pin = (unseal(sealed_so["sealed"], config.workspace_id, label + "/so").decode()
                      if isinstance(sealed_so, dict) and "sealed" in sealed_so else secrets.token_urlsafe(16))
            user_pin = config.token(label).spec.pin.read(label).reveal()
        softhsm.init_token(conf, label, so_pin, user_pin)
        created.append(f"token {label}")


def _configure(workspace: Workspace, options: CeremonyOptions, created: list[str]) -> StationConfig:
    if workspace.has_config():
        config = workspace.config()
        _ensure_tokens(config, created)
        return config
    _check_options(options)
    return configure_workspace(workspace, options.station_id, {
        "root_ca": Pkcs11Uri(token=ROOT_TOKEN, object=ROOT_KEY),
        "sub_ca": Pkcs11Uri(token=f"stampline-{options.station_id}", object=SUB_KEY),
    }, options.pin_source, created)


def _write_pem(path: Path, cert: x509.Certificate) -> None:
    private.make_dir(path.parent)
    write_atomically(path, cert.public_bytes(Encoding.PEM))


def init(workspace: Workspace, options: CeremonyOptions) -> CeremonyResult:
    """Run whatever part of the ceremony this workspace still lacks."""
    created: list[str] = []
    config = _configure(workspace, options, created)
    root_token, root_label = config.key_token("root_ca")
    sub_token, sub_label = config.key_token("sub_ca")
    organization = options.organization

    if workspace.root_cert_path.exists():
        root_cert = load_root(workspace)
    else:
        if root_token.has_key(root_label):
            raise StamplineError(f"token '{root_token.label}' holds a root key but the workspace has no root "
                                 "certificate; restore ca/root-ca.pem instead of making a new root.")
        root_cert = ca.create_root(root_token, root_label, ca.name(f"{organization} Root CA", organization),
                                   options.root_days, options.key_algorithm)
        _write_pem(workspace.root_cert_path, root_cert)
        created.append("root CA")

    if workspace.sub_cert_path.exists():
        sub_cert = load_sub(workspace)
    else:
        subject = ca.name(f"{organization} {config.station_id} Sub CA", organization)
        if sub_token.has_key(sub_label):
            csr = px.build_csr(subject, sub_token.signer(sub_label), [(x509.BasicConstraints(ca=True, path_length=0), True)])
        else:
            csr = ca.create_sub_ca_request(sub_token, sub_label, subject, options.key_algorithm)
        private.write_file(workspace.ca_dir / "sub-ca.csr.der", csr)
        sub_cert = ca.sign_sub_ca(root_token.signer(root_label), root_cert, csr, options.sub_days)
        _write_pem(workspace.sub_cert_path, sub_cert)
        created.append("Sub CA")
    return CeremonyResult(root_cert, sub_cert, created)


def _load(path: Path, what: str) -> x509.Certificate:
    if not path.exists():
        raise UsageError(f"the workspace has no {what} certificate ({path.name}); run 'stampline ca init' first.")
    return px.load_certificate(read_bounded(path, px.MAX_CERTIFICATE_PEM, f"{what} certificate"), f"{what} certificate")


def load_root(workspace: Workspace) -> x509.Certificate:
    return _load(workspace.root_cert_path, "root CA")


def load_sub(workspace: Workspace) -> x509.Certificate:
    return _load(workspace.sub_cert_path, "Sub CA")


def issue_crl(workspace: Workspace, revoked: list[px.Revoked], days: int = 7) -> x509.CertificateRevocationList:
    """Issue the next CRL of the Sub CA and write it to the workspace."""
    config = workspace.config()
    token, label = config.key_token("sub_ca")
    number_path = workspace.ca_dir / "crl-number"
    number = _crl_number(number_path) + 1 if number_path.exists() else 1
    crl = ca.issue_crl(token.signer(label), load_sub(workspace), revoked, number, days)
    write_atomically(number_path, str(number).encode())  # first: a crash never reuses a number
    write_atomically(workspace.crl_path, crl.public_bytes(Encoding.PEM))
    return crl


def _crl_number(path: Path) -> int:
    """The number of the last CRL issued (``ca/crl-number``: a decimal number)."""
    text = read_bounded(path, 64, "CRL number file").strip()  # RFC 5280: at most 20 octets, 49 digits
    if not text.isdigit():
        raise StamplineError(f"{path} does not hold a CRL number; restore it (a CRL number is never reused).")
    return int(text)


def issue_crl_from_ledger(workspace: Workspace, days: int = 7) -> tuple[x509.CertificateRevocationList, int]:
    """The next CRL, listing every certificate the station's ledger revoked; (CRL, revoked count)."""
    from stampline.station.ledger import Ledger

    revoked = []
    if workspace.ledger_path.exists():
        with Ledger.open_readonly(workspace.ledger_path) as ledger:
            revoked = [revoked_entry(c.cert_serial, c.revoked_at, c.revocation_reason or "")
                       for c in ledger.certificates(include_revoked=True) if c.revoked_at is not None]
    return issue_crl(workspace, revoked, days), len(revoked)


def revoked_entry(serial_hex: str, revoked_at: float, reason: str) -> px.Revoked:
    flag = {"rework": x509.ReasonFlags.superseded, "superseded": x509.ReasonFlags.superseded,
            "key-compromise": x509.ReasonFlags.key_compromise}.get(reason, x509.ReasonFlags.unspecified)
    return px.Revoked(int(serial_hex, 16), datetime.fromtimestamp(revoked_at, timezone.utc).replace(microsecond=0), flag)
