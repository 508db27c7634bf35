"""SoftHSM2, the embedded default token: its configuration and token directory live inside the
workspace (0700). Tokens are initialised through PKCS#11 itself (C_InitToken, then C_Login as
SO and C_InitPIN) in a child Python process that receives the PINs on a pipe: a PIN is never
in a child's argv or environment (both readable in /proc by this user and root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from stampline import private
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
    tokens = private.make_dir(directory / "tokens")
    conf = directory / "softhsm2.conf"
    if not conf.exists():
        private.write_file(conf, f"directories.tokendir = {tokens.resolve()}\nobjectstore.backend = file\n"
                                 "log.level = ERROR\nslots.removable = false\n")
    return conf


def _pkcs11_tool(conf: Path, args: list[str]) -> str:
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        raise StamplineError("pkcs11-tool (OpenSC) is not installed; run the project's setup (make setup).")
    done = subprocess.run([tool, "--module", module_path(), *args], capture_output=True, text=True,
                          env=private.child_env(SOFTHSM2_CONF=str(conf)), umask=private.UMASK)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StamplineError(f"pkcs11-tool failed: {last}.")
    return done.stdout


def token_labels(conf: Path) -> list[str]:
    listing = _pkcs11_tool(conf, ["--list-slots"])
    return re.findall(r"token label\s*:\s*(.*?)\s*$", listing, re.M)


def init_token(conf: Path, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a new SoftHSM2 token ``label`` in the free slot, with its SO and user PINs.

    A child process does it, so that this process's PKCS#11 state (one module configuration,
    one login per token) is left alone; the PINs go to it on its stdin."""
    if not 0 < len(label.encode()) <= 32:
        raise StamplineError(f"the token label '{label}' must be 1-32 bytes long.")
    request = json.dumps({"module": module_path(), "label": label, "so_pin": so_pin, "user_pin": user_pin})
    done = subprocess.run([sys.executable, "-c", "from stampline.pki.softhsm import _init_child; _init_child()"],
                          input=request, capture_output=True, text=True, umask=private.UMASK,
                          env=private.child_env(*private.PYTHON_ENV, SOFTHSM2_CONF=str(conf)))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1].rstrip(".")
        raise StamplineError(f"cannot initialise token '{label}': {last}.")


def _init_child() -> None:
    """The child side of ``init_token``: module, label and PINs as JSON on stdin."""
    import PyKCS11  # type: ignore[import-untyped]

    request = json.loads(sys.stdin.read())
    label, so_pin = request["label"], request["so_pin"]
    try:
        lib = PyKCS11.PyKCS11Lib()
        lib.load(request["module"])
        infos = {slot: lib.getTokenInfo(slot) for slot in lib.getSlotList(tokenPresent=True)}
        if any(info.label.strip() == label for info in infos.values()):
            sys.exit(f"a token labelled '{label}' already exists in this workspace")
        free = [slot for slot, info in infos.items() if not info.flags & PyKCS11.CKF_TOKEN_INITIALIZED]
        if not free:
            sys.exit("SoftHSM2 offers no free slot for a new token")
        lib.initToken(free[0], so_pin, label.ljust(32))  # PKCS#11 pads labels with blanks
        slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label)
        session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
        session.login(so_pin, PyKCS11.CKU_SO)
        session.initPin(request["user_pin"])
        session.logout()
        session.closeSession()
    except PyKCS11.PyKCS11Error as exc:
        sys.exit(f"PKCS#11 error {exc}")
