"""``stampline ledger``: export and verify the station's durable record."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stampline.cli.common import add_json, add_workdir, emit_json
from stampline.station.ledger import Ledger
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("ledger", help="the station ledger")
    sub = parser.add_subparsers(dest="ledger_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    export = sub.add_parser("export", help="one JSON object per line per device")
    add_workdir(export)
    export.set_defaults(run=run_export)
    verify = sub.add_parser("verify", help="check the hash chain and the consistency of the records")
    add_workdir(verify)
    add_json(verify)
    verify.set_defaults(run=run_verify)


def run_export(args: argparse.Namespace) -> int:
    with Ledger.open_readonly(Workspace.at(args.workdir).ledger_path) as ledger:
        for record in ledger.export():
            sys.stdout.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    with Ledger.open_readonly(Workspace.at(args.workdir).ledger_path) as ledger:
        problems = ledger.verify()
        seq, head = ledger.head()
    if args.json:
        emit_json({"ok": not problems, "records": seq, "head": head, "problems": problems})
    elif problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"the ledger fails verification: {len(problems)} problem(s).", file=sys.stderr)
    else:
        print(f"ledger verified: {seq} audit records, chain and records consistent.")
        print(f"head {head} (publish it elsewhere: a rewritten chain would have another head)")
    return 1 if problems else 0
