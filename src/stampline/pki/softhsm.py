"""SoftHSM2, the embedded default token: its configuration and token directory live inside the
workspace, and tokens are initialised with OpenSC's pkcs11-tool, PINs passed by environment
(``--pin env:NAME``) so that they never appear on a command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from stampline.errors import StamplineError

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def module_path() -> str:
    for candidate in MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise StamplineError("SoftHSM2 is not installed (no libsofthsm2.so); run the project's setup (make setup).")


def write_config(directory: Path) -> Path:
    """Create ``softhsm2.conf`` and the token directory under ``directory``; return the conf path."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(f"directories.tokendir = {tokens.resolve()}\nobjectstore.backend = file\n"
                        "log.level = ERROR\nslots.removable = false\n")
    return conf


def _pkcs11_tool(conf: Path, args: list[str], pins: dict[str, str]) -> str:
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        raise StamplineError("pkcs11-tool (OpenSC) is not installed; run the project's setup (make setup).")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), **pins}
    done = subprocess.run([tool, "--module", module_path(), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StamplineError(f"pkcs11-tool failed: {last}.")
    return done.stdout


def token_labels(conf: Path) -> list[str]:
    listing = _pkcs11_tool(conf, ["--list-slots"], {})
    return re.findall(r"token label\s*:\s*(.*?)\s*$", listing, re.M)


def init_token(conf: Path, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a new SoftHSM2 token ``label`` in the free slot, with its SO and user PINs."""
    if label in token_labels(conf):
        raise StamplineError(f"a token labelled '{label}' already exists in this workspace.")
    listing = _pkcs11_tool(conf, ["--list-slots"], {})
    free = re.search(r"^Slot \d+ \((0x[0-9a-f]+)\).*\n\s*token state:\s*uninitialized", listing, re.M)
    if free is None:
        raise StamplineError("SoftHSM2 offers no free slot for a new token.")
    pins = {"STAMPLINE_SO_PIN": so_pin, "STAMPLINE_USER_PIN": user_pin}
    _pkcs11_tool(conf, ["--slot", free.group(1), "--init-token", "--label", label, "--so-pin", "env:STAMPLINE_SO_PIN"], pins)
    _pkcs11_tool(conf, ["--token-label", label, "--login", "--login-type", "so", "--so-pin", "env:STAMPLINE_SO_PIN",
                        "--init-pin", "--pin", "env:STAMPLINE_USER_PIN"], pins)
