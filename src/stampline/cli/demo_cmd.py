"""``stampline demo``: the whole line on one machine, on embedded defaults."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stampline import demo
from stampline.cli.common import add_json, emit_json, non_negative_float
from stampline.errors import UsageError



def register(groups: Any) -> None:
    parser = groups.add_parser("demo", help="provision N emulated devices end to end on embedded defaults")
    parser.add_argument("--devices", type=int, default=8, metavar="N")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="the demo workspace (created if missing)")
    parser.add_argument("--time-scale", type=non_negative_float, default=0.0,
                        help="0 = instant (default), 1 = real device timings")
    add_json(parser)
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.devices <= 256:
        raise UsageError("--devices must be between 1 and 256.")
    report = demo.run(Path(args.workdir), args.devices, args.time_scale, show_progress=not args.json)
    if args.json:
        emit_json({"ok": report.ok, "created": report.created,
                   "devices": [{**r.to_dict(), **_security(report, r.chip_id)} for r in report.results],
                   "chain_problems": report.chain_problems, "ledger_problems": report.ledger_problems})
        return 0 if report.ok else 1
    if report.created:
        print("created: " + ", ".join(report.created))
    print(f"{'serial':12} {'chip id':12} {'station':>8} {'keygen':>7} {'issue':>6} "
          f"{'flash':>7} {'1st boot':>9} {'(encrypt)':>9}  secure boot  flash enc.  cloud            outcome")
    for r in report.results:
        sec = _security(report, r.chip_id)
        flash = sum(v for k, v in r.steps.items() if k.startswith(("flash_", "write_bootloader")))
        station = r.elapsed - r.steps.get("first_boot", 0.0)
        outcome = r.outcome if r.outcome != "failed" else f"FAILED at {r.step}: {r.reason}"
        phases = sec["first_boot_phases"]
        print(f"{r.serial or '-':12} {r.chip_id or '-':12} {station * 1000:6.0f}ms {_ms(r, 'keygen'):>7} "
              f"{_ms(r, 'issue'):>6} {flash * 1000:5.0f}ms "
              f"{sum(phases.values()):8.1f}s {phases.get('flash_encryption', 0.0):8.1f}s  "
              f"{'on' if sec['secure_boot'] else 'OFF':11}  {'on' if sec['flash_encryption'] else 'OFF':10}  "
              f"{(sec['cloud_state'] or '-') + (' + hello' if sec['hello'] else ''):15}  {outcome}")
    for problem in report.chain_problems + report.ledger_problems:
        print(problem, file=sys.stderr)
    done = sum(r.outcome == "secured" for r in report.results)
    online = sum(_security(report, r.chip_id)["hello"] for r in report.results)
    print(f"{done} of {len(report.results)} devices provisioned and secured, {online} activated and online; "
          f"chains {'verified by openssl' if report.chains_ok else 'FAILED'}; "
          f"ledger {'verified' if not report.ledger_problems else 'FAILED'}.")
    print("station times are measured; first-boot times are the device timing model's (real-chip seconds).")
    return 0 if report.ok else 1


def _ms(result: Any, step: str) -> str:
    return f"{result.steps.get(step, 0.0) * 1000:.0f}ms"


def _security(report: demo.DemoReport, chip_id: str) -> dict[str, Any]:
    sec = report.security.get(chip_id)
    if sec is None:
        return {"secure_boot": False, "flash_encryption": False, "first_boot_phases": {}, "cloud_state": "",
                "hello": False}
    return {"secure_boot": sec.secure_boot, "flash_encryption": sec.flash_encryption,
            "first_boot_phases": {k: round(v, 3) for k, v in sec.first_boot_phases.items()},
            "cloud_state": sec.cloud_state, "hello": sec.hello}
