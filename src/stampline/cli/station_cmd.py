"""``stampline station``: the Manufacturing Utility on the line."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from stampline import recipe as recipes
from stampline.cli.common import add_json, add_workdir, emit_json, positive_int
from stampline.errors import UsageError
from stampline.station.flow import StopRequest
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


STOPPING = {
    StopRequest.FINISH: "stopping: no new device starts; each device under way finishes or stops at a safe "
                        "step (press Ctrl-C again to stop at the next step).",
    StopRequest.NOW: "stopping at each device's next safe step.",
}


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, display: Display) -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM become stop requests while the line runs (one level per signal);
    yields the signals received. A flow never stops inside a step, so no signature is left
    unrecorded and no flash write is cut short."""
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        level = stop.request()
        # the note takes the display's lock: never from inside the handler, which may have
        # interrupted a holder of that lock on this thread
        threading.Thread(target=display.note, args=(f"stampline: {STOPPING[level]}",), daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_station(args: argparse.Namespace) -> int:
    if len(set(args.port)) != len(args.port):
        raise UsageError("a port is named twice.")
    workspace = Workspace.at(args.workdir)
    recipe = recipes.load(args.recipe or workspace.recipe_path)
    stop = StopRequest()
    with open_station(workspace, recipe, rework=args.rework) as context, \
            Display(args.port, enabled=not args.quiet) as display, \
            stop_on_signals(stop, display) as received:
        results = run_line(context, args.port, display, baudrate=args.baud, stop=stop)
    failed = [r for r in results if r.outcome == "failed"]
    stopped = [r for r in results if r.outcome == "stopped"]
    if args.json:
        emit_json({"batch": context.batch_id, "devices": [r.to_dict() for r in results],
                   "provisioned": sum(r.outcome == "provisioned" for r in results),
                   "secured": sum(r.outcome == "secured" for r in results),
                   "already_provisioned": sum(r.outcome == "already-provisioned" for r in results),
                   "stopped": len(stopped), "failed": len(failed)})
    else:
        for r in results:
            if r.outcome == "failed":
                status = f"FAILED at {r.step}: {r.reason}"
            elif r.outcome == "stopped":
                status = f"stopped at {r.step}"
            else:
                status = r.outcome
            print(f"{r.port}  {r.chip_id or '-':12}  {r.serial or '-':16}  {r.elapsed:6.2f}s  {status}")
        done = len(results) - len(failed) - len(stopped)
        summary = f"{done} of {len(results)} devices done, {len(failed)} failed"
        summary += f", {len(stopped)} stopped." if stopped else "."
        print(summary, file=sys.stderr if failed or stopped else sys.stdout)
    if received:
        print("stampline: stopped; the next run resumes each stopped device.", file=sys.stderr)
        return 128 + received[0]  # 130 for Ctrl-C, 143 for SIGTERM
    return 1 if failed else 0
