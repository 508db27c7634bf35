"""The line: one flow per port, all ports at once, with a progress display for the operator.

A failure stays with its device: the other ports go on. A stop request (``StopRequest``) starts
no new device and stops each flow at a safe point; every port still gets its result. Ports
run on threads (the work is
waiting on serial lines); certificates are signed and recorded by the issuance desk, in batches,
through the token's single owner thread and the ledger's group-commit writer, so neither is
touched concurrently.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from stampline import ceremony
from stampline.errors import StamplineError
from stampline.pki.profile import DeviceIssuer
from stampline.protocol.link import Link
from stampline.recipe import Recipe
from stampline.station.firmware_set import FirmwareSet
from stampline.station.flow import DeviceResult, Flow, StationContext, StopRequest
from stampline.station.issuance import IssuanceDesk
from stampline.station.ledger import Ledger
from stampline.station.ports import PortFinder
from stampline.workspace import Workspace


@contextmanager
def open_station(workspace: Workspace, recipe: Recipe, rework: bool = False, note: str = "") -> Iterator[StationContext]:
    """Check the recipe's firmware images, log in to the station token (a wrong PIN stops here,
    before any device), open the ledger and a batch."""
    firmware = FirmwareSet.load(recipe)
    config = workspace.config()
    token, label = config.key_token("sub_ca")
    token.login()
    issuer = DeviceIssuer(ceremony.load_sub(workspace), token.signer(label))
    ledger = Ledger(workspace.ledger_path, station_id=config.station_id)
    try:
        batch = ledger.open_batch(recipe.product, recipe.sha256, note)
        with IssuanceDesk(issuer, ledger) as desk:
            yield StationContext(recipe=recipe, issuer=issuer, ledger=ledger, batch_id=batch, firmware=firmware,
                                 desk=desk, rework=rework)
    finally:
        ledger.close()


class Display:
    """Each port's device, step and elapsed time: redrawn in place on a terminal, one line per
    change otherwise (a log)."""

    def __init__(self, ports: list[str], stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.rows: dict[str, list[object]] = {p: ["", "", "waiting", time.monotonic()] for p in ports}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = 0
        self._thread = threading.Thread(target=self._loop, daemon=True) if self.live else None

    def note(self, text: str) -> None:
        """A line for the operator (e.g. that the station is stopping), shown above the table."""
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._drawn = 0  # the live table is drawn again below it

    def update(self, port: str, chip_id: str, serial: str, step: str) -> None:
        with self._lock:
            row = self.rows[port]
            changed = row[2] != step
            row[0], row[1], row[2] = chip_id, serial, step
            if step == "identify" and not chip_id:
                row[3] = time.monotonic()
        if self.enabled and not self.live and changed:
            elapsed = time.monotonic() - float(row[3])  # type: ignore[arg-type]
            self.stream.write(f"{port}  {chip_id or '-':12}  {serial or '-':16}  {step:16}  {elapsed:7.2f}s\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            lines = [f"{'port':24}  {'chip id':12}  {'serial':16}  {'step':16}  elapsed"]
            for port, (chip_id, serial, step, since) in self.rows.items():
                elapsed = time.monotonic() - float(since)  # type: ignore[arg-type]
                lines.append(f"{port[-24:]:24}  {chip_id or '-':12}  {serial or '-':16}  {step:16}  {elapsed:6.1f}s")
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def __enter__(self) -> "Display":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._draw()


LinkOpener = Callable[[str], Link]


def run_line(context: StationContext, ports: list[str], display: Display | None = None,
             open_link: LinkOpener | None = None, baudrate: int = 115200, *,
             stop: StopRequest | None = None, finder: PortFinder | None = None) -> list[DeviceResult]:
    """Provision the device on every port concurrently; results in port order.

    ``stop`` lets the caller stop the line (see ``StopRequest``); ``finder`` says where a device
    that left the bus may come back (its own port only, by default)."""
    if len(set(ports)) != len(ports):
        raise StamplineError("a port is named twice.")
    opener = open_link or (lambda port: Link.open(port, baudrate))
    update = display.update if display else None
    stop = stop or StopRequest()
    finder = finder or PortFinder()
    claimed = {port: finder.claim(port, port) for port in ports}  # before any flow searches

    def one(port: str) -> DeviceResult:
        if stop.level:
            finder.release(port)
            return DeviceResult(port, outcome="stopped", step="connect", reason="the station was stopped.")
        if not claimed[port]:
            return DeviceResult(port, step="connect", reason="another port of this run names the same device.")
        try:
            link = opener(port)
        except StamplineError as exc:
            finder.release(port)
            return DeviceResult(port, step="connect", reason=str(exc))
        flow = Flow(context, link, port, update, stop=stop, finder=finder, opener=opener)
        try:
            return flow.run()  # it reports every failure of its device in its result
        finally:
            flow.link.close()  # the flow may have reopened it
            finder.release(port)

    with ThreadPoolExecutor(max_workers=max(1, len(ports)), thread_name_prefix="port") as pool:
        return list(pool.map(one, ports))
