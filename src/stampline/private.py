"""Keeping secrets in reach of this user only: private files and directories, and children that
see only the environment they need.

Workspaces hold secrets at rest (SoftHSM2's token objects, an emulated chip's eFuse file with its
flash encryption key, the ledger), and our environment may hold a PIN (``env:NAME`` PIN
sources). So every directory of a workspace is created 0700 and every file 0600, and a child
process gets an explicit, minimal environment, never a copy of ours. The CLI sets the umask to
``UMASK`` once, which also covers what libraries create (SQLite's -wal/-shm, SoftHSM2's files);
the explicit modes here cover library use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
PYTHON_ENV = ("PYTHONPATH", "VIRTUAL_ENV")  # for our own Python children (the registration service, ...)

_warned: set[Path] = set()


def child_env(*names: str, **values: str) -> dict[str, str]:
    """The environment for a child process: the harmless ``BASE_ENV`` variables, the variables
    ``names`` (when set here) and ``values``; nothing else of ours, never a PIN variable."""
    env = {name: os.environ[name] for name in (*BASE_ENV, *names) if name in os.environ}
    env.update(values)
    return env


def make_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents, each 0700 (an existing directory is left as it is)."""
    path = Path(path)
    missing = []
    step = path
    while not step.is_dir() and step != step.parent:
        missing.append(step)
        step = step.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
    return path


def opener(path: str, flags: int) -> int:
    """For ``open(path, mode, opener=private.opener)``: a file created by it is 0600."""
    return os.open(path, flags, FILE_MODE)


def write_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` (created 0600; an existing file keeps its mode)."""
    with open(path, "w" if isinstance(data, str) else "wb", opener=opener) as f:
        f.write(data)


def create_file(path: Path) -> None:
    """Create ``path`` empty and 0600 if it does not exist (e.g. before SQLite opens it, whose
    -wal and -shm files then take the same mode)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))


def exposed(root: Path) -> Path | None:
    """The first of ``root`` and its entries that group or others may reach, if any."""
    try:
        if root.lstat().st_mode & 0o077:
            return root
        with os.scandir(root) as entries:
            for entry in entries:
                if not entry.is_symlink() and entry.stat(follow_symlinks=False).st_mode & 0o077:
                    return Path(entry.path)
    except OSError:
        return None
    return None


def warn_if_exposed(root: Path) -> None:
    """One line on stderr (once per workspace and process) when a workspace is not private."""
    found = exposed(root)
    if found is None or root in _warned:
        return
    _warned.add(root)
    mode = found.lstat().st_mode & 0o777
    print(f"stampline: warning: {found} is open to other users (mode {mode:04o}); "
          f"run: chmod -R go-rwx {root}", file=sys.stderr)
