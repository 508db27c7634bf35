"""Which ports the flows of a line hold, and where a device that left the bus may come back.

An ESP32-C3/S3 on USB-Serial-JTAG drops off the USB bus at every reset and re-enumerates,
perhaps under another name (``/dev/ttyACM0`` becomes ``/dev/ttyACM1``). A flow that lost its
device looks for it on its own port first, then on the finder's candidates, and takes a
candidate only if it answers HELLO with the device's chip id. A port is held by one flow at a
time, so a search never opens a port another flow is using.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable, Iterable, Sequence


def _key(port: str) -> str:
    """One name per device node: a symlink (``/dev/serial/by-id/…``) and its target are one port."""
    return os.path.realpath(port) if os.path.exists(port) else port


class PortFinder:
    """Port claims for the flows of one line, and the candidate ports to search.

    ``candidates`` returns the ports a lost device may reappear on (e.g. the matches of
    ``/dev/ttyACM*``); none by default, so a device is looked for on its own port only.
    """

    def __init__(self, candidates: Callable[[], Iterable[str]] | None = None) -> None:
        self._candidates = candidates
        self._held: dict[str, str] = {}  # port key -> owner
        self._lock = threading.Lock()

    @classmethod
    def globbing(cls, patterns: Sequence[str]) -> PortFinder:
        """Candidates: whatever matches the glob patterns at the time of the search."""
        if not patterns:
            return cls()
        return cls(lambda: sorted({path for pattern in patterns for path in glob.glob(pattern)}))

    @property
    def searches(self) -> bool:
        """Whether a lost device is looked for beyond its own port."""
        return self._candidates is not None

    def candidates(self) -> list[str]:
        return list(self._candidates()) if self._candidates else []

    def claim(self, port: str, owner: str) -> bool:
        """Hold ``port`` for ``owner``; False if another owner holds it."""
        key = _key(port)
        with self._lock:
            return self._held.setdefault(key, owner) == owner

    def release(self, owner: str) -> None:
        """Let go of every port ``owner`` holds."""
        with self._lock:
            for key in [k for k, held_by in self._held.items() if held_by == owner]:
                del self._held[key]

    def holder(self, port: str) -> str | None:
        with self._lock:
            return self._held.get(_key(port))
