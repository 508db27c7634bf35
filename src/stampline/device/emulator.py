"""Run emulated devices, each on its own pseudo-terminal, as if plugged into USB serial ports.

Bytes on the line cost time as the timing model says: each byte read or written by the device
takes ten bit times at the baud rate (scaled), so transfer times match a real UART.
"""

from __future__ import annotations

import os
import select
import threading
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stampline.device import chip
from stampline.device.chip import ChipIdentity, Flash
from stampline.device.mfg_firmware import ManufacturingFirmware
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.protocol.server import DeviceServer


@dataclass(frozen=True)
class DeviceOptions:
    model: str = "esp32c3"
    mfg_version: str = "1.0.0"
    app_version: str = "1.0.0"


def create_device(devices_root: Path, options: DeviceOptions) -> ChipIdentity:
    """A factory-fresh chip: new identity, flash pre-flashed by the chip supplier."""
    identity = chip.new_identity(devices_root, options.model)
    directory = chip.device_dir(devices_root, identity.hex)
    chip.save_identity(directory, identity)
    flash = Flash(directory / "flash.bin")
    try:
        for address, data in chip.factory_image(identity, options.mfg_version, options.app_version).items():
            flash.write(address, data)
    finally:
        flash.close()
    return identity


class EmulatedDevice:
    """One device: its flash, its firmware, and a pty whose other end is the 'USB serial port'."""

    def __init__(self, devices_root: Path, chip_id: str, timing: TimingModel,
                 tap: Callable[[str, bytes], None] | None = None) -> None:
        self.directory = chip.device_dir(devices_root, chip_id)
        self.identity = chip.load_identity(self.directory)
        self.flash = Flash(self.directory / "flash.bin")
        self.timing = timing
        self.firmware = ManufacturingFirmware(self.identity, self.flash, timing)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._tap = tap
        self._stop = threading.Event()
        self._server = DeviceServer(self.firmware, self._read, self._write)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(self._stop,),
                                        name=f"device-{chip_id}", daemon=True)

    @property
    def chip_id(self) -> str:
        return self.identity.hex

    def start(self) -> "EmulatedDevice":
        self._thread.start()
        return self

    def _read(self, n: int) -> bytes:
        if not select.select([self._master], [], [], 0.05)[0]:
            return b""
        data = os.read(self._master, n)
        if not data:
            raise EOFError("line closed")
        self.timing.sleep(self.timing.line_seconds(len(data)))
        if self._tap:
            self._tap("rx", data)
        return data

    def _write(self, data: bytes) -> None:
        self.timing.sleep(self.timing.line_seconds(len(data)))
        if self._tap:
            self._tap("tx", data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._master, view):]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.flash.close()


def existing_devices(devices_root: Path) -> list[str]:
    if not devices_root.is_dir():
        return []
    return sorted(p.name for p in devices_root.iterdir() if (p / "chip.json").exists())


class Emulator:
    """A set of running devices."""

    def __init__(self, devices_root: Path, timing: TimingModel) -> None:
        self.devices_root = devices_root
        self.timing = timing
        self.devices: list[EmulatedDevice] = []

    def add_new(self, count: int, options: DeviceOptions) -> list[EmulatedDevice]:
        return [self.attach(create_device(self.devices_root, options).hex) for _ in range(count)]

    def attach(self, chip_id: str, tap: Callable[[str, bytes], None] | None = None) -> EmulatedDevice:
        if chip_id not in existing_devices(self.devices_root):
            raise StamplineError(f"there is no emulated device {chip_id} in {self.devices_root}.")
        device = EmulatedDevice(self.devices_root, chip_id, self.timing, tap).start()
        self.devices.append(device)
        return device

    def stop(self) -> None:
        for device in self.devices:
            device.stop()
        self.devices.clear()

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
