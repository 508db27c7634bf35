"""A station workspace (``--workdir``): where its configuration, tokens, CA certificates, ledger
and (for the emulator) device images live.

``station.yaml`` names the tokens (module, label, PIN source) and the keys (PKCS#11 URIs). It
holds no secret in plain text: a PIN in it is sealed to this installation (see ``pki.pin``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stampline import private, yamlfile
from stampline.errors import StamplineError, UsageError, shown
from stampline.files import KiB, write_atomically
from stampline.pki import softhsm
from stampline.pki.pin import pin_source
from stampline.pki.token import Token, TokenSpec
from stampline.pki.uri import Pkcs11Uri

SOFTHSM = "softhsm"  # module shorthand: SoftHSM2 with its token directory inside the workspace
#: A configuration names a few tokens and keys (about 1 KiB with sealed PINs).
MAX_CONFIG_BYTES = 64 * KiB


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str], create: bool = False) -> "Workspace":
        """The workspace at ``path`` (made 0700 with ``create``); a warning on stderr if group or
        others can reach it or one of its entries."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise UsageError(f"the workspace {root} is not a directory.")
        if create:
            private.make_dir(root)
        elif not root.is_dir():
            raise UsageError(f"there is no workspace at {root}.")
        private.warn_if_exposed(root.resolve())
        return cls(root.resolve())

    # paths
    @property
    def config_path(self) -> Path:
        return self.root / "station.yaml"

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def softhsm_dir(self) -> Path:
        return self.root / "softhsm"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def root_cert_path(self) -> Path:
        return self.ca_dir / "root-ca.pem"

    @property
    def sub_cert_path(self) -> Path:
        return self.ca_dir / "sub-ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.ca_dir / "sub-ca.crl.pem"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    def has_config(self) -> bool:
        return self.config_path.exists()

    def config(self) -> "StationConfig":
        if not self.config_path.exists():
            raise UsageError(f"{self.root} has no station configuration; run 'stampline ca init --workdir {self.root}' first.")
        raw = yamlfile.load_mapping(self.config_path, MAX_CONFIG_BYTES, "station configuration")
        return StationConfig.from_dict(raw, self)


@dataclass(frozen=True)
class StationConfig:
    workspace: Workspace
    workspace_id: str
    station_id: str
    tokens: dict[str, dict[str, Any]]
    keys: dict[str, Pkcs11Uri]

    @classmethod
    def from_dict(cls, raw: Any, workspace: Workspace) -> "StationConfig":
        where = workspace.config_path.name
        if not isinstance(raw, dict):
            raise UsageError(f"{where} must be a mapping.")
        for field in ("workspace_id", "station_id", "tokens", "keys"):
            if field not in raw:
                raise UsageError(f"{where}: '{field}' is missing.")
        if not isinstance(raw["tokens"], dict) or not isinstance(raw["keys"], dict):
            raise UsageError(f"{where}: 'tokens' and 'keys' must be mappings.")
        for name, uri in raw["keys"].items():
            if not isinstance(uri, str):
                raise UsageError(f"{where}: key '{shown(str(name))}' must be a PKCS#11 URI (a string).")
        keys = {name: Pkcs11Uri.parse(uri) for name, uri in raw["keys"].items()}
        for name, uri in keys.items():
            if uri.token not in raw["tokens"]:
                raise UsageError(f"{where}: key '{shown(str(name))}' names token '{shown(uri.token)}', "
                                 "which 'tokens' does not configure.")
        for label, spec in raw["tokens"].items():
            if not isinstance(spec, dict) or "module" not in spec or "pin" not in spec:
                raise UsageError(f"{where}: token '{shown(str(label))}' needs 'module' and 'pin'.")
            pin_source(spec["pin"], str(raw["workspace_id"]), f"{where}: tokens.{shown(str(label))}.pin")
        return cls(workspace, str(raw["workspace_id"]), str(raw["station_id"]), raw["tokens"], keys)

    def to_dict(self) -> dict[str, Any]:
        return {"workspace_id": self.workspace_id, "station_id": self.station_id, "tokens": self.tokens,
                "keys": {name: str(uri) for name, uri in self.keys.items()}}

    def save(self) -> None:
        path = self.workspace.config_path
        write_atomically(path, ("# stampline station configuration: no secret is stored here in plain text.\n"
                                + yaml.safe_dump(self.to_dict(), sort_keys=False)).encode(), mode=0o600)

    def token(self, label: str) -> Token:
        spec = self.tokens.get(label)
        if spec is None:
            raise UsageError(f"the station configuration has no token '{label}'.")
        module = spec["module"]
        env: tuple[tuple[str, str], ...] = ()
        if module == SOFTHSM:
            module = softhsm.module_path()
            env = (("SOFTHSM2_CONF", str(self.workspace.softhsm_dir / "softhsm2.conf")),)
        elif not os.path.exists(module):
            raise StamplineError(f"the PKCS#11 module {module} of token '{label}' does not exist.")
        return Token(TokenSpec(label, module, pin_source(spec["pin"], self.workspace_id, f"tokens.{label}.pin"), env))

    def key_token(self, key: str) -> tuple[Token, str]:
        """The token and object label of a configured key (``root_ca``, ``sub_ca``, ...)."""
        uri = self.keys.get(key)
        if uri is None:
            raise UsageError(f"the station configuration names no key '{key}'.")
        return self.token(uri.token), uri.object


def new_workspace_id() -> str:
    return secrets.token_hex(8)
