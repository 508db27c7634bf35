"""Run emulated devices, each on its own pseudo-terminal, as if plugged into USB serial ports.

Bytes on the line cost time as the timing model says: each byte read or written by the device
takes ten bit times at the baud rate (scaled), so transfer times match a real UART.

With ``UsbSerial`` a device behaves like an ESP32-C3/S3 on its USB-Serial-JTAG port: at every
reset and power cut it drops off the bus (its pty closes, its port name goes away) and comes
back on a new pty, under the same name or another one.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stampline import private
from stampline.device import chip
from stampline.device.app_firmware import ApplicationFirmware
from stampline.device.boot import Boot, BootHalted, BootResult, Checkpoints, PowerCut
from stampline.device.chip import ChipIdentity, Flash
from stampline.device.cloud_client import CloudClient
from stampline.device.efuse import Efuses
from stampline.device.mfg_firmware import ManufacturingFirmware
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.protocol.messages import ErrorCode, Message, Request
from stampline.protocol.server import DeviceFault, DeviceServer


@dataclass(frozen=True)
class UsbSerial:
    """Ports as USB-Serial-JTAG gives them: each device's port is a symlink ``directory/ttyACM<n>``
    to its pty. At every reset or power cut the device drops off the bus (the pty closes, the
    symlink goes) and ``gone_seconds`` later re-enumerates on a new pty: under its old name, or
    with ``rename`` under the lowest free name other than its old one (as the kernel does while
    the old node is still held open)."""

    directory: Path
    rename: bool = False
    gone_seconds: float = 0.2


_names_lock = threading.Lock()  # port names are handed out across the devices of a directory


@dataclass(frozen=True)
class DeviceOptions:
    model: str = "esp32c3"
    mfg_version: str = "1.0.0"
    app_version: str = "1.0.0"
    images: dict[str, bytes] | None = None  # pre-flashed instead of the built-in (unsigned) ones


def create_device(devices_root: Path, options: DeviceOptions) -> ChipIdentity:
    """A factory-fresh chip: new identity, flash pre-flashed by the chip supplier."""
    identity = chip.new_identity(devices_root, options.model)
    directory = chip.device_dir(devices_root, identity.hex)
    chip.save_identity(directory, identity)
    flash = Flash(directory / "flash.bin")
    try:
        for address, data in chip.factory_image(identity, options.mfg_version, options.app_version,
                                                options.images).items():
            flash.write(address, data)
    finally:
        flash.close()
    return identity


class EmulatedDevice:
    """One device: flash, eFuses, whatever firmware its boot starts, and a pty whose other end is
    the 'USB serial port'. Rebooting (REBOOT, or `power_cycle`) runs the boot again: ROM,
    bootloader, first boot where due, then the manufacturing firmware or the application.
    With ``usb`` the port is a USB-Serial-JTAG one: it vanishes at every reset and power cut."""

    def __init__(self, devices_root: Path, chip_id: str, timing: TimingModel,
                 tap: Callable[[str, bytes], None] | None = None, power_on: bool = True,
                 cloud_trust: bytes | None = None, usb: UsbSerial | None = None) -> None:
        self.directory = chip.device_dir(devices_root, chip_id)
        self.identity = chip.load_identity(self.directory)
        self.flash = Flash(self.directory / "flash.bin")
        self.efuses = Efuses(self.identity.model, self.directory / "efuse.bin")
        self.timing = timing
        self.handler: ManufacturingFirmware | ApplicationFirmware | None = None
        self.halted = ""
        self.last_boot: BootResult | None = None
        self.cloud_trust = cloud_trust  # the endpoint's CA, as compiled into the application
        self.cloud: CloudClient | None = None
        self.usb = usb
        self.power_cuts: list[str] = []  # the checkpoints where the power went away
        self._next_cut: tuple[int, float] | None = None
        self._line_lock = threading.Lock()  # the pty, which a USB reset replaces
        self._master = self._slave = -1
        self._powered = False
        self._link_name: Path | None = None
        self.port = ""
        self._plug()
        self._tap = tap
        self._stop = threading.Event()
        self._boot_lock = threading.Lock()
        self._server = DeviceServer(self._dispatch, self._read, self._write)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(self._stop,),
                                        name=f"device-{chip_id}", daemon=True)
        if power_on:
            self.power_cycle()

    @property
    def chip_id(self) -> str:
        return self.identity.hex

    @property
    def firmware(self) -> ManufacturingFirmware:
        """The manufacturing firmware, when that is what runs (tests poke at it)."""
        assert isinstance(self.handler, ManufacturingFirmware), f"the device runs {type(self.handler).__name__}"
        return self.handler

    def start(self) -> "EmulatedDevice":
        self._thread.start()
        return self

    # -- power ----------------------------------------------------------------------------------

    def power_cycle(self, cut_at: int | None = None) -> Checkpoints:
        """Power on and boot; ``cut_at`` injects a power cut at that checkpoint (1-based).
        Returns the checkpoints passed; a cut leaves the device off (no firmware running, and
        on USB no port)."""
        checkpoints = Checkpoints(cut_at)
        with self._boot_lock:
            self._stop_cloud()
            self.handler, self.halted = None, ""
            if self.usb is not None and self._powered:  # a reset: off the bus, and back
                self._unplug()
                time.sleep(self.usb.gone_seconds)
                self._plug()
            try:
                result = Boot(self.identity, self.flash, self.efuses, self.timing, checkpoints).run()
                if result.running == "manufacturing":
                    self.handler = ManufacturingFirmware(self.identity, self.flash, self.timing,
                                                         reboot=self.reboot, running=result.partition.label)
                else:
                    app = ApplicationFirmware(self.identity, self.flash, result.flash, self.efuses, result.table,
                                              result.partition, self.timing, checkpoints)
                    result.phases.update(app.start())
                    self.handler = app
                    if self.cloud_trust is not None and app.secured:
                        self.cloud = app.connect_cloud(self.cloud_trust)
                self.last_boot = result
                self._log_boot(result, checkpoints)
            except PowerCut as cut:
                self.halted = f"powered off at {cut}"
                self.power_cuts.append(str(cut))
                if self.usb is not None:
                    self._unplug()
            except BootHalted as halted:
                self.halted = str(halted)
                self._log_boot(None, checkpoints)
            finally:
                self.flash.flush()
                self._powered = True
        return checkpoints

    def _stop_cloud(self) -> None:
        if self.cloud is not None:
            self.cloud.stop()
            self.cloud = None

    def reboot(self) -> None:
        """REBOOT from the firmware: boot again once the reply has left."""
        self.handler = None
        threading.Timer(0.02, self._reset).start()

    def cut_power_at_next_reboot(self, checkpoint: int, off_seconds: float = 0.3) -> None:
        """At the next REBOOT, cut the power at that checkpoint of the boot (1-based), and
        restore it ``off_seconds`` later: the boot starts again (a first boot resumes)."""
        self._next_cut = (checkpoint, off_seconds)

    def _reset(self) -> None:
        cut, self._next_cut = self._next_cut, None
        if self._stop.is_set():
            return
        if cut is not None:
            self.power_cycle(cut_at=cut[0])
            if self._stop.wait(cut[1]):
                return
        if not self._stop.is_set():
            self.power_cycle()

    def _log_boot(self, result: BootResult | None, checkpoints: Checkpoints) -> None:
        entry = {"at": time.time(), "halted": self.halted or None,
                 "running": result.running if result else None,
                 "partition": result.partition.label if result else None,
                 "first_boot": bool(result and result.first_boot),
                 "phases": {k: round(v, 4) for k, v in (result.phases if result else {}).items()},
                 "checkpoints": len(checkpoints.passed)}
        with open(self.directory / "boot-log.jsonl", "a", opener=private.opener) as log:
            log.write(json.dumps(entry) + "\n")

    def _dispatch(self, request: Request) -> Message:  # type: ignore[type-arg]
        handler = self.handler
        if handler is None:
            if self.halted:
                raise DeviceFault(ErrorCode.INTERNAL, f"the device does not boot: {self.halted}")
            raise DeviceFault(ErrorCode.BUSY, "booting")
        return handler(request)

    # -- the line -------------------------------------------------------------------------------

    def _plug(self) -> None:
        """A new pty: the device's port (on USB, published under its name)."""
        master, slave = os.openpty()
        tty.setraw(slave)
        with self._line_lock:
            self._master, self._slave = master, slave
        if self.usb is None:
            self.port = os.ttyname(slave)
            return
        self.usb.directory.mkdir(parents=True, exist_ok=True)
        old = self._link_name
        with _names_lock:
            if old is not None and not self.usb.rename and not os.path.lexists(old):
                name = old
            else:
                taken = {old, *self.usb.directory.iterdir()}
                name = next(path for n in range(1000) if (path := self.usb.directory / f"ttyACM{n}") not in taken)
            os.symlink(os.ttyname(slave), name)
        self._link_name = name
        self.port = str(name)

    def _unplug(self) -> None:
        """Off the bus: the port's name goes, the pty closes (the station's end reads EIO)."""
        if self._link_name is not None:
            self._link_name.unlink(missing_ok=True)
        with self._line_lock:
            fds, self._master, self._slave = (self._master, self._slave), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _read(self, n: int) -> bytes:
        with self._line_lock:  # held across select and read: a closed fd's number may be reused
            fd = self._master
            if fd >= 0 and select.select([fd], [], [], 0.05)[0]:
                data = os.read(fd, n)
                if not data:
                    raise EOFError("line closed")
            else:
                data = b""
        if fd < 0:  # off the bus
            self._stop.wait(0.05)
        if not data:
            return b""
        self.timing.sleep(self.timing.line_seconds(len(data)))
        if self._tap:
            self._tap("rx", data)
        return data

    def _write(self, data: bytes) -> None:
        self.timing.sleep(self.timing.line_seconds(len(data)))
        if self._tap:
            self._tap("tx", data)
        view = memoryview(data)
        with self._line_lock:
            if self._master < 0:
                return  # off the bus: the bytes are lost
            while view:
                view = view[os.write(self._master, view):]

    def stop(self) -> None:
        self._stop_cloud()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with self._boot_lock:  # a reset under way ends first
            self._unplug()
            self.flash.close()


def existing_devices(devices_root: Path) -> list[str]:
    if not devices_root.is_dir():
        return []
    return sorted(p.name for p in devices_root.iterdir() if (p / "chip.json").exists())


class Emulator:
    """A set of running devices."""

    def __init__(self, devices_root: Path, timing: TimingModel, cloud_trust: bytes | None = None,
                 usb: UsbSerial | None = None) -> None:
        self.devices_root = devices_root
        self.timing = timing
        self.cloud_trust = cloud_trust
        self.usb = usb
        self.devices: list[EmulatedDevice] = []

    def add_new(self, count: int, options: DeviceOptions) -> list[EmulatedDevice]:
        return [self.attach(create_device(self.devices_root, options).hex) for _ in range(count)]

    def attach(self, chip_id: str, tap: Callable[[str, bytes], None] | None = None) -> EmulatedDevice:
        if chip_id not in existing_devices(self.devices_root):
            raise StamplineError(f"there is no emulated device {chip_id} in {self.devices_root}.")
        device = EmulatedDevice(self.devices_root, chip_id, self.timing, tap, cloud_trust=self.cloud_trust,
                                usb=self.usb).start()
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
