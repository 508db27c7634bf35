"""``stampline device``: run emulated devices (each on its own pty)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from stampline.cli.common import add_json, add_workdir, emit_json, non_negative_float, positive_int
from stampline.device.emulator import DeviceOptions, Emulator, existing_devices
from stampline.device.timing import TimingModel
from stampline.errors import UsageError
from stampline.recipe import parse_version
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("device", help="emulated ESP32 devices")
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    emulate = sub.add_parser("emulate", help="run emulated devices on ptys until interrupted")
    add_workdir(emulate)
    emulate.add_argument("--devices", type=int, default=0, metavar="N", help="factory-fresh devices to create")
    emulate.add_argument("--attach", action="append", default=[], metavar="CHIP_ID",
                         help="run an existing device of the workspace again (repeatable)")
    emulate.add_argument("--attach-all", action="store_true", help="run every existing device of the workspace")
    emulate.add_argument("--chip", default="esp32c3", choices=["esp32c3", "esp32s3"])
    emulate.add_argument("--time-scale", type=non_negative_float, default=0.0,
                         help="0 = instant, 1 = real device timings")
    emulate.add_argument("--baud", type=positive_int, default=115200)
    emulate.add_argument("--mfg-version", default="1.0.0", help="version of the pre-flashed manufacturing firmware")
    emulate.add_argument("--app-version", default="1.0.0", help="version of the pre-flashed application")
    add_json(emulate)
    emulate.set_defaults(run=run_emulate)


def run_emulate(args: argparse.Namespace) -> int:
    for name in ("mfg_version", "app_version"):
        if parse_version(getattr(args, name)) is None:
            raise UsageError(f"--{name.replace('_', '-')} must be a version like 1.2.3.")
    if args.devices < 0 or args.devices > 256:
        raise UsageError("--devices must be between 0 and 256.")
    workspace = Workspace.at(args.workdir, create=True)
    attach = existing_devices(workspace.devices_dir) if args.attach_all else args.attach
    if not args.devices and not attach:
        raise UsageError("nothing to run: give --devices N, --attach CHIP_ID or --attach-all.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Emulator(workspace.devices_dir, TimingModel(args.time_scale, args.baud)) as emulator:
        for chip_id in attach:
            emulator.attach(chip_id)
        emulator.add_new(args.devices, DeviceOptions(args.chip, args.mfg_version, args.app_version))
        for device in emulator.devices:
            if args.json:
                emit_json({"chip_id": device.chip_id, "port": device.port, "model": device.identity.model})
            else:
                print(f"{device.chip_id}  {device.port}")
        sys.stdout.flush()
        stop.wait()
    return 0
