"""``stampline recipe``: print a commented template, check a recipe."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stampline import recipe
from stampline.cli.common import add_json, emit_json


def register(groups: Any) -> None:
    parser = groups.add_parser("recipe", help="the product recipe: template and validation")
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    template = sub.add_parser("template", help="print a commented example recipe")
    template.set_defaults(run=lambda args: sys.stdout.write(recipe.TEMPLATE) and 0)
    check = sub.add_parser("check", help="validate a recipe file")
    check.add_argument("file")
    add_json(check)
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    loaded = recipe.load(args.file)
    if args.json:
        emit_json({"product": loaded.product, "chip": loaded.chip, "device_key": loaded.device_key,
                   "sha256": loaded.sha256, "first_serial": loaded.serial(loaded.serial_start)})
    else:
        print(f"{args.file}: valid recipe for {loaded.product} ({loaded.chip}, {loaded.device_key}); "
              f"first serial {loaded.serial(loaded.serial_start)}")
    return 0
