"""``stampline``: the entry point. Errors become one sentence and an exit code."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Sequence

from stampline import __version__, private
from stampline.cli import (aws_cmd, ca_cmd, demo_cmd, device_cmd, endpoint_cmd, firmware_cmd, ledger_cmd, manifest_cmd, recipe_cmd,
                           station_cmd)
from stampline.cli.common import Parser
from stampline.errors import StamplineError

COMMANDS = (demo_cmd, ca_cmd, recipe_cmd, station_cmd, device_cmd, ledger_cmd, firmware_cmd, endpoint_cmd, manifest_cmd, aws_cmd)


def build_parser() -> Parser:
    parser = Parser(prog="stampline", description="Secure manufacturing and provisioning of IoT devices.")
    parser.add_argument("--version", action="version", version=f"stampline {__version__}")
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    groups.required = True
    for module in COMMANDS:
        module.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(private.UMASK)  # whatever this process or a library creates is its user's alone
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except StamplineError as exc:
        message = str(exc)
        if message[:1].isupper() and message[1:2].islower():  # "The device ..." reads on as "stampline: the device ..."
            message = message[0].lower() + message[1:]
        print(f"stampline: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("stampline: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug: say so in one line; the trace only on request
        if os.environ.get("STAMPLINE_DEBUG"):
            traceback.print_exc()
        print(f"stampline: internal error ({type(exc).__name__}); set STAMPLINE_DEBUG=1 for details.", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
