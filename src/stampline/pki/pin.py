"""Where a token PIN comes from: the sealed station configuration, an environment variable
named in the configuration, or an interactive prompt. Never argv, never a log, never a retry.

A sealed PIN is AES-256-GCM ciphertext in the station configuration. Its key lives outside the
workspace (``$STAMPLINE_SEAL_DIR`` or ``~/.config/stampline/seal``), readable only by its owner,
so a copied workspace does not open the token: the PIN works only for this station's
installation, as the seed article asks of the Manufacturing Utility's configuration.
"""

from __future__ import annotations

import base64
import getpass
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stampline.errors import StamplineError, UsageError
from stampline.files import read_bounded


class Secret:
    """A PIN held in memory; it never prints itself (repr, str, tracebacks, logs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


class PinSource(Protocol):
    def read(self, token_label: str) -> Secret: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class EnvPin:
    name: str

    def read(self, token_label: str) -> Secret:
        value = os.environ.get(self.name)
        if not value:
            raise StamplineError(
                f"the PIN for token '{token_label}' is to come from the environment variable "
                f"{self.name}, which is not set.")
        return Secret(value)

    def describe(self) -> str:
        return f"environment variable {self.name}"


@dataclass(frozen=True)
class PromptPin:
    def read(self, token_label: str) -> Secret:
        if not sys.stdin.isatty():
            raise StamplineError(
                f"the PIN for token '{token_label}' must be typed at a prompt, but there is no terminal.")
        return Secret(getpass.getpass(f"PIN for token '{token_label}': "))

    def describe(self) -> str:
        return "prompt"


def seal_dir() -> Path:
    configured = os.environ.get("STAMPLINE_SEAL_DIR")
    return Path(configured) if configured else Path.home() / ".config" / "stampline" / "seal"


@dataclass(frozen=True)
class SealedPin:
    """A PIN sealed to this installation of a station workspace (``workspace_id``)."""

    blob: str
    workspace_id: str

    def read(self, token_label: str) -> Secret:
        return Secret(unseal(self.blob, self.workspace_id, token_label).decode())

    def describe(self) -> str:
        return "sealed configuration"


def _seal_key(workspace_id: str, create: bool) -> bytes:
    if not workspace_id.isalnum() or len(workspace_id) > 64:
        raise UsageError("the workspace id in the station configuration is malformed.")
    path = seal_dir() / f"{workspace_id}.key"
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    if not path.exists():
        raise StamplineError(
            f"the sealing key of this workspace is not on this machine ({path}); "
            "a sealed PIN opens only on the station that sealed it.")
    key = read_bounded(path, 32, "sealing key")
    if len(key) != 32:
        raise StamplineError(f"the sealing key {path} is damaged.")
    return key


def seal(pin: str, workspace_id: str, token_label: str) -> str:
    """Encrypt ``pin`` for this installation; the token label is bound as associated data."""
    nonce = secrets.token_bytes(12)
    box = AESGCM(_seal_key(workspace_id, create=True)).encrypt(nonce, pin.encode(), token_label.encode())
    return "v1:" + base64.b64encode(nonce + box).decode()


def unseal(blob: str, workspace_id: str, token_label: str) -> bytes:
    if not blob.startswith("v1:"):
        raise UsageError(f"the sealed PIN for token '{token_label}' is not in a known format.")
    try:
        raw = base64.b64decode(blob[3:], validate=True)
        return AESGCM(_seal_key(workspace_id, create=False)).decrypt(raw[:12], raw[12:], token_label.encode())
    except (InvalidTag, ValueError):
        raise StamplineError(
            f"the sealed PIN for token '{token_label}' does not open with this machine's sealing key.") from None


def pin_source(spec: object, workspace_id: str, where: str) -> PinSource:
    """Build a PIN source from its configuration: ``{env: NAME}``, ``{prompt: true}`` or ``{sealed: BLOB}``."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UsageError(f"{where} must be one of {{env: NAME}}, {{prompt: true}} or {{sealed: ...}}.")
    (kind, value), = spec.items()
    if kind == "env" and isinstance(value, str) and value.replace("_", "").isalnum():
        return EnvPin(value)
    if kind == "prompt" and value is True:
        return PromptPin()
    if kind == "sealed" and isinstance(value, str):
        return SealedPin(value, workspace_id)
    raise UsageError(f"{where} must be one of {{env: NAME}}, {{prompt: true}} or {{sealed: ...}}.")
