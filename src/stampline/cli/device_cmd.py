"""``stampline device``: run emulated devices (each on its own pty)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from stampline.cli.common import add_json, add_workdir, emit_json, non_negative_float, positive_int
from stampline.device.emulator import DeviceOptions, Emulator, existing_devices
from stampline.device.timing import TimingModel
from stampline.errors import UsageError, shown
from stampline.files import read_bounded
from stampline.firmware.image import MAX_IMAGE_BYTES
from stampline.pki.x509 import MAX_CERTIFICATE_PEM
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
    emulate.add_argument("--endpoint-ca", metavar="FILE",
                         help="the IoT endpoint's CA (as built into the application): secured devices go online")
    emulate.add_argument("--image", action="append", default=[], metavar="PART=FILE",
                         help="pre-flash FILE as bootloader, manufacturing or application (repeatable)")
    add_json(emulate)
    emulate.set_defaults(run=run_emulate)

    for name, help_text in (("dump", "write the device's raw flash (encrypted where encrypted) to a file"),
                            ("efuse", "print the device's eFuse summary (espefuse's)"),
                            ("secrets", "EMULATOR ONLY: print the keys a real chip never reveals")):
        cmd = sub.add_parser(name, help=help_text)
        add_workdir(cmd)
        cmd.add_argument("--serial", required=True, metavar="SERIAL", help="device serial (or chip id)")
        if name == "dump":
            cmd.add_argument("--out", required=True, metavar="FILE")
        if name == "secrets":
            add_json(cmd)
        cmd.set_defaults(run=run_inspect, action=name)


def run_emulate(args: argparse.Namespace) -> int:
    for name in ("mfg_version", "app_version"):
        if parse_version(getattr(args, name)) is None:
            raise UsageError(f"--{name.replace('_', '-')} must be a version like 1.2.3.")
    if args.devices < 0 or args.devices > 256:
        raise UsageError("--devices must be between 0 and 256.")
    images = {}
    for spec in args.image:
        part, eq, path = spec.partition("=")
        if not eq or part not in ("bootloader", "manufacturing", "application"):
            raise UsageError(f"--image takes PART=FILE with PART bootloader, manufacturing or application, "
                             f"not '{shown(spec, 160)}'.")
        images[part] = read_bounded(path, MAX_IMAGE_BYTES, "firmware image")
    trust = None
    if args.endpoint_ca:
        trust = read_bounded(args.endpoint_ca, MAX_CERTIFICATE_PEM, "endpoint CA certificate")
    workspace = Workspace.at(args.workdir, create=True)
    attach = existing_devices(workspace.devices_dir) if args.attach_all else args.attach
    if not args.devices and not attach:
        raise UsageError("nothing to run: give --devices N, --attach CHIP_ID or --attach-all.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Emulator(workspace.devices_dir, TimingModel(args.time_scale, args.baud), cloud_trust=trust) as emulator:
        for chip_id in attach:
            emulator.attach(chip_id)
        emulator.add_new(args.devices, DeviceOptions(args.chip, args.mfg_version, args.app_version, images or None))
        for device in emulator.devices:
            if args.json:
                emit_json({"chip_id": device.chip_id, "port": device.port, "model": device.identity.model})
            else:
                print(f"{device.chip_id}  {device.port}")
        sys.stdout.flush()
        stop.wait()
    return 0


def _chip_id(workspace: Workspace, serial: str) -> str:
    """A serial from the ledger, or a chip id as it is."""
    if workspace.ledger_path.exists():
        from stampline.station.ledger import Ledger
        with Ledger.open_readonly(workspace.ledger_path) as ledger:
            for row in ledger.export():
                if row["serial"] == serial:
                    return str(row["chip_id"])
    if serial in existing_devices(workspace.devices_dir):
        return serial
    raise UsageError(f"no emulated device has the serial or chip id '{serial}'.")


def run_inspect(args: argparse.Namespace) -> int:
    from stampline.device import inspect

    workspace = Workspace.at(args.workdir)
    chip_id = _chip_id(workspace, args.serial)
    if args.action == "dump":
        Path(args.out).write_bytes(inspect.dump(workspace.devices_dir, chip_id))
        print(f"{args.out}: raw flash of device {chip_id}")
    elif args.action == "efuse":
        sys.stdout.write(inspect.efuse_summary(workspace.devices_dir, chip_id))
    else:
        found = inspect.secrets(workspace.devices_dir, chip_id)
        if args.json:
            emit_json(found)
        else:
            print(json.dumps(found, indent=2))
    return 0
