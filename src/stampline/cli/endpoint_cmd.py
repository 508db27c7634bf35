"""``stampline endpoint``: the local IoT endpoint (Mosquitto + Just-In-Time Registration)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stampline.cli.common import add_json, add_workdir, emit_json, positive_int
from stampline.cloud.endpoint import DEFAULT_PORT, Endpoint, serve
from stampline.files import read_bounded
from stampline.pki.x509 import MAX_CRL_PEM
from stampline.cloud.service import Limits
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("endpoint", help="the local IoT endpoint: Mosquitto with Just-In-Time Registration")
    sub = parser.add_subparsers(dest="endpoint_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    def action(name: str, help_text: str, run: Any, json_out: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        add_workdir(cmd)
        if json_out:
            add_json(cmd)
        cmd.set_defaults(run=run)
        return cmd

    up = action("up", "start Mosquitto and the registration service on 127.0.0.1", run_up)
    up.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help="where devices connect")
    defaults = Limits()
    up.add_argument("--handshake-timeout", type=seconds, default=defaults.handshake_timeout, metavar="S",
                    help="seconds a client has from its connection to the end of its handshake's clear part "
                         f"(default {defaults.handshake_timeout:g})")
    up.add_argument("--idle-timeout", type=seconds, default=defaults.idle_timeout, metavar="S",
                    help=f"seconds a client has to send its first byte (default {defaults.idle_timeout:g})")
    up.add_argument("--max-per-source", type=positive_int, default=defaults.max_per_source, metavar="N",
                    help=f"handshakes in progress from one address (default {defaults.max_per_source})")
    up.add_argument("--max-connections", type=positive_int, default=defaults.max_connections, metavar="N",
                    help=f"connections in all (default {defaults.max_connections})")
    action("down", "stop them", run_down)
    action("info", "host, port and the CA file a client needs to trust the endpoint", run_info)
    action("devices", "device certificates and their states", run_devices)
    reg = action("register-ca", "register a station's Sub CA (proof of possession through its token)", run_register)
    reg.add_argument("--station", required=True, metavar="DIR", help="the station workspace holding the Sub CA")
    imp = action("import-ledger", "take a station's ledger export: its certificates may be activated", run_import)
    imp.add_argument("--station", required=True, metavar="DIR")
    rev = action("revoke", "revoke a device at the endpoint (its connections close at once)", run_revoke)
    rev.add_argument("--serial", required=True)
    crl = action("update-crl", "load a new CRL of a registered CA", run_crl)
    crl.add_argument("--crl", required=True, metavar="FILE")
    action("serve", "run the registration service in the foreground (what 'up' starts)", run_serve, json_out=False)


def seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None


def run_up(args: argparse.Namespace) -> int:
    limits = Limits(args.handshake_timeout, args.idle_timeout, args.max_per_source, args.max_connections)
    info = Endpoint(Path(args.workdir)).up(args.port, limits)
    emit_json(info.to_dict()) if args.json else print(f"endpoint up on {info.host}:{info.port}; clients trust {info.ca_file}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    stopped = Endpoint(Path(args.workdir)).down()
    emit_json({"stopped": stopped}) if args.json else print("endpoint stopped" if stopped else "endpoint was not running")
    return 0


def run_info(args: argparse.Namespace) -> int:
    info = Endpoint(Path(args.workdir)).info()
    emit_json(info.to_dict()) if args.json else print(
        f"{info.host}:{info.port} ({'running' if info.running else 'stopped'}); CA file {info.ca_file}")
    return 0


def run_devices(args: argparse.Namespace) -> int:
    devices = Endpoint(Path(args.workdir)).devices()
    if args.json:
        emit_json([d.to_dict() for d in devices])
        return 0
    for d in devices:
        flag = "  SUSPECT" if d.suspect else ""
        print(f"{d.serial:16} {d.chip_id:12} {d.state:18} {'hello' if d.hello_at else '':5}{flag}  {d.reason}")
    return 0


def run_register(args: argparse.Namespace) -> int:
    ca_id = Endpoint(Path(args.workdir)).register_ca(Workspace.at(args.station))
    emit_json({"caCertificateId": ca_id}) if args.json else print(f"CA registered: {ca_id}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    added, activated = Endpoint(Path(args.workdir)).import_ledger(Workspace.at(args.station))
    emit_json({"added": added, "activated": activated}) if args.json else print(
        f"{added} certificate(s) taken from the ledger export; {activated} pending device(s) activated")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    revoked = Endpoint(Path(args.workdir)).revoke(args.serial)
    emit_json({"revoked": revoked}) if args.json else print(f"revoked {len(revoked)} certificate(s) of {args.serial}")
    return 0


def run_crl(args: argparse.Namespace) -> int:
    data = read_bounded(args.crl, MAX_CRL_PEM, "CRL")
    revoked = Endpoint(Path(args.workdir)).update_crl(data)
    emit_json({"revoked": revoked}) if args.json else print(f"CRL loaded; {revoked} device(s) revoked by it")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    serve(Path(args.workdir))
    return 0



