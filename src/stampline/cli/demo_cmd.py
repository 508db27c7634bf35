"""``stampline demo``: the whole line on one machine, on embedded defaults."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stampline import demo
from stampline.cli.common import add_json, emit_json, non_negative_float
from stampline.errors import UsageError

SUMMARY_STEPS = ("identify", "keygen", "csr", "policy", "sign", "commit", "write_cert", "verify_cert", "write_stamp")


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
        emit_json({"ok": report.ok, "created": report.created, "devices": [r.to_dict() for r in report.results],
                   "chain_problems": report.chain_problems, "ledger_problems": report.ledger_problems})
        return 0 if report.ok else 1
    if report.created:
        print("created: " + ", ".join(report.created))
    header = f"{'serial':14} {'chip id':12} " + " ".join(f"{s[:11]:>11}" for s in SUMMARY_STEPS) + f" {'total':>8}  outcome"
    print(header)
    for r in report.results:
        times = " ".join(f"{r.steps.get(s, 0.0) * 1000:9.1f}ms" for s in SUMMARY_STEPS)
        outcome = r.outcome if r.outcome != "failed" else f"FAILED at {r.step}: {r.reason}"
        print(f"{r.serial or '-':14} {r.chip_id or '-':12} {times} {r.elapsed * 1000:6.0f}ms  {outcome}")
    for problem in report.chain_problems + report.ledger_problems:
        print(problem, file=sys.stderr)
    done = sum(r.outcome == "provisioned" for r in report.results)
    print(f"{done} of {len(report.results)} devices provisioned; "
          f"chains {'verified by openssl' if report.chains_ok else 'FAILED'}; "
          f"ledger {'verified' if not report.ledger_problems else 'FAILED'}.")
    return 0 if report.ok else 1
