"""Modelled line time per device at --time-scale 1, beside the seed article's figures.

The station runs against emulated devices whose waits follow the timing model at real-device
speed (key generation, bytes on the UART at the baud rate, flash erase, the boot): the station's
share is measured wall time from identify to the device's reboot into its first boot. The first
boot is not waited through here: its figure is the timing model's sum for the same images
(real-chip seconds), printed separately.

Configurations: EC P-256 and RSA-2048 device keys, firmware pre-flashed by the chip supplier or
flashed at the station (application and manufacturing firmware older than the recipe's minimum).
Images: a 900 KiB application and a 256 KiB manufacturing firmware, signed; a 16 KiB bootloader.

Target (issue 3): station share under 3 s per device with EC P-256 and pre-flashed firmware.
Run: .venv/bin/python bench/line_time.py [--devices N] [--baud B]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from stampline import ceremony, recipe as recipes, release as releases, signing
from stampline.device.emulator import DeviceOptions, Emulator
from stampline.device.timing import TimingModel
from stampline.firmware import image
from stampline.station.line import open_station, run_line
from stampline.workspace import Workspace

ARTICLE = {"certificate": 30.0, "flashing": 60.0, "first boot": 60.0}


def run(workspace: Workspace, recipe_text: str, options: DeviceOptions, devices: int, baud: int) -> tuple[list[float], list[float]]:
    recipe = recipes.parse(recipe_text)
    with Emulator(workspace.devices_dir, TimingModel(1.0, baud, boot_scale=0.0)) as emulator:
        emulated = emulator.add_new(devices, options)
        with open_station(workspace, recipe) as context:
            results = run_line(context, [d.port for d in emulated], baudrate=baud)
        bad = [r for r in results if r.outcome != "secured"]
        if bad:
            raise SystemExit(f"a device failed: {bad[0].step}: {bad[0].reason}")
        station = [r.elapsed - r.steps.get("first_boot", 0.0) for r in results]
        first_boot = [sum(d.last_boot.phases.values()) for d in emulated if d.last_boot]
    return station, first_boot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=3, help="devices per configuration, on parallel ports")
    parser.add_argument("--baud", type=int, default=460800, help="UART rate of the line (esptool's default)")
    args = parser.parse_args()
    os.environ.setdefault("STAMPLINE_SEAL_DIR", tempfile.mkdtemp(prefix="stampline-seal-"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="stampline-bench-") as tmpdir:
        tmp = Path(tmpdir)
        ci = Workspace.at(tmp / "ci", create=True)
        signing.keygen(ci, "esp32c3")
        release = releases.build(ci, "esp32c3", tmp / "release", app_size=900 * 1024)
        mfg = signing.sign(ci, image.build_app_image("esp32c3", image.MFG_PROJECT, "1.0.0", payload_size=256 * 1024),
                           "esp32c3")
        (tmp / "release" / "manufacturing-1.0.0.signed.bin").write_bytes(mfg)
        release = releases.Release(release.directory, release.files)
        template = recipes.TEMPLATE
        base = template[:template.index("firmware:")] + release.recipe_firmware()
        preflashed = DeviceOptions(images={"manufacturing": release.data("manufacturing"),
                                           "application": release.data("application")})
        old = DeviceOptions(images={"manufacturing": image.build_app_image("esp32c3", image.MFG_PROJECT, "0.9.0"),
                                    "application": image.build_app_image("esp32c3", "product-app", "0.9.0")})
        for key in ("ec-p256", "rsa-2048"):
            text = base.replace("device_key: ec-p256", f"device_key: {key}")
            for label, options in (("pre-flashed", preflashed), ("flashed at the station", old)):
                workspace = Workspace.at(tmp / f"ws-{key}-{len(rows)}", create=True)
                ceremony.init(workspace, ceremony.CeremonyOptions(organization="Bench"))
                started = time.perf_counter()
                station, first_boot = run(workspace, text, options, args.devices, args.baud)
                rows.append((key, label, statistics.median(station), statistics.median(first_boot),
                             time.perf_counter() - started))

    print(f"modelled line time per device, --time-scale 1, {args.devices} devices per row on parallel ports, "
          f"UART {args.baud} baud; medians")
    print(f"{'device key':10} {'firmware':24} {'station share':>14} {'first boot':>11} {'line total':>11}")
    for key, label, station, first_boot, _ in rows:
        print(f"{key:10} {label:24} {station:13.2f}s {first_boot:10.1f}s {station + first_boot:10.1f}s")
    article = ARTICLE["certificate"] + ARTICLE["first boot"]
    print(f"{'article':10} {'pre-flashed':24} {ARTICLE['certificate']:13.1f}s {ARTICLE['first boot']:10.1f}s "
          f"{article:10.1f}s")
    print(f"{'article':10} {'flashed (optional step)':24} {ARTICLE['certificate'] + ARTICLE['flashing']:13.1f}s "
          f"{ARTICLE['first boot']:10.1f}s {article + ARTICLE['flashing']:10.1f}s")
    ec_pre = next(r for r in rows if r[0] == "ec-p256" and r[1] == "pre-flashed")[2]
    print(f"\ntarget: station share < 3 s with EC P-256 and pre-flashed firmware: {ec_pre:.2f} s, "
          f"{'met' if ec_pre < 3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
