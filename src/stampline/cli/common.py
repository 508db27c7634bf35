"""What every command shares: the parser that reports in one sentence, output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from stampline.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one sentence and exit code 2, without a usage dump."""

    def error(self, message: str) -> NoReturn:
        text = message[0].upper() + message[1:] if message else "Bad command line"
        raise UsageError(f"{text.rstrip('.')} (see '{self.prog} --help').")


def add_workdir(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--workdir", required=required, metavar="DIR", help="the station workspace")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def emit_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=None, separators=(",", ":"), default=str)
    sys.stdout.write("\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"'{text}' must be between 0 and 100")
    return value
