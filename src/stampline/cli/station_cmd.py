"""``stampline station``: the Manufacturing Utility on the line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stampline import recipe as recipes
from stampline.cli.common import add_json, add_workdir, emit_json, positive_int
from stampline.errors import UsageError
from stampline.station.line import Display, open_station, run_line
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("station", help="the Manufacturing Utility")
    sub = parser.add_subparsers(dest="station_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    run = sub.add_parser("run", help="provision the devices on the given ports, all at once")
    add_workdir(run)
    run.add_argument("--port", action="append", required=True, metavar="PORT",
                     help="serial port of a device: /dev/ttyUSB0, a pty, socket://host:port (repeatable)")
    run.add_argument("--recipe", metavar="FILE", help="the product recipe (default: recipe.yaml in the workspace)")
    run.add_argument("--rework", action="store_true",
                     help="provision devices that already hold a certificate again, revoking the earlier one")
    run.add_argument("--baud", type=positive_int, default=115200)
    run.add_argument("--quiet", action="store_true", help="no progress display")
    add_json(run)
    run.set_defaults(run=run_station)


def run_station(args: argparse.Namespace) -> int:
    if len(set(args.port)) != len(args.port):
        raise UsageError("a port is named twice.")
    workspace = Workspace.at(args.workdir)
    recipe = recipes.load(args.recipe or workspace.recipe_path)
    with open_station(workspace, recipe, rework=args.rework) as context, \
            Display(args.port, enabled=not args.quiet) as display:
        results = run_line(context, args.port, display, baudrate=args.baud)
    failed = [r for r in results if r.outcome == "failed"]
    if args.json:
        emit_json({"batch": context.batch_id, "devices": [r.to_dict() for r in results],
                   "provisioned": sum(r.outcome == "provisioned" for r in results),
                   "secured": sum(r.outcome == "secured" for r in results),
                   "already_provisioned": sum(r.outcome == "already-provisioned" for r in results),
                   "failed": len(failed)})
    else:
        for r in results:
            status = r.outcome if r.outcome != "failed" else f"FAILED at {r.step}: {r.reason}"
            print(f"{r.port}  {r.chip_id or '-':12}  {r.serial or '-':16}  {r.elapsed:6.2f}s  {status}")
        print(f"{len(results) - len(failed)} of {len(results)} devices done, {len(failed)} failed.",
              file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
