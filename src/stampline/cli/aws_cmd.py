"""``stampline aws``: the Sub CA, device activation, bulk registration, revocation and status in
AWS IoT Core. Credentials come from boto3's chain (environment, profile, role), never argv."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stampline.cli.common import add_json, add_workdir, emit_json
from stampline.cloud import aws
from stampline.errors import UsageError
from stampline.files import KiB, read_bounded
from stampline.workspace import Workspace

MAX_EVENT_BYTES = 64 * KiB  # a JITR event is a few hundred bytes of JSON
EXIT_SUSPECT = 3  # activate: the certificate is not in the ledger (counterfeit?)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value <= 10_000:
        raise argparse.ArgumentTypeError(f"'{text}' must be more than 0 and at most 10000")
    return value


def _common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    add_workdir(parser)
    parser.add_argument("--endpoint-url", metavar="URL", help="AWS IoT control-plane endpoint (moto, VPC endpoint)")
    parser.add_argument("--region", metavar="REGION", help="AWS region (default: boto3's configuration)")
    if json_output:
        add_json(parser)


def _policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default=aws.POLICY_NAME, metavar="NAME",
                        help=f"the device policy to attach (created if missing; default {aws.POLICY_NAME})")


def register(groups: Any) -> None:
    parser = groups.add_parser("aws", help="AWS IoT Core: CA, activation, bulk registration, revocation")
    sub = parser.add_subparsers(dest="aws_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    ca = sub.add_parser("register-ca", help="register the Sub CA (proof of possession through its token)")
    _common(ca)
    ca.set_defaults(run=run_register_ca)

    activate = sub.add_parser("activate", help="handle one JITR 'certificate registered' event")
    _common(activate)
    activate.add_argument("--event", required=True, metavar="FILE", help="the event JSON ('-' for standard input)")
    _policy(activate)
    activate.set_defaults(run=run_activate)

    bulk = sub.add_parser("bulk-register", help="register every live certificate of the ledger, resumably")
    _common(bulk)
    bulk.add_argument("--without-ca", action="store_true", help="RegisterCertificateWithoutCA (no CA in AWS)")
    bulk.add_argument("--rate", type=_rate, default=aws.DEFAULT_RATE, metavar="N",
                      help=f"devices per second (default {aws.DEFAULT_RATE:g}: AWS's default quota)")
    _policy(bulk)
    bulk.set_defaults(run=run_bulk)

    revoke = sub.add_parser("revoke", help="revoke a device's certificates, detach its policy and thing")
    _common(revoke)
    revoke.add_argument("--serial", required=True, metavar="S", help="the device serial (its thing name)")
    revoke.set_defaults(run=run_revoke)

    revoke_ca = sub.add_parser("revoke-ca", help="deactivate the Sub CA and revoke the certificates under it")
    _common(revoke_ca)
    revoke_ca.add_argument("--ca-only", action="store_true", help="deactivate the CA, leave device certificates")
    revoke_ca.add_argument("--rate", type=_rate, default=aws.DEFAULT_RATE, metavar="N", help="revocations per second")
    revoke_ca.set_defaults(run=run_revoke_ca)

    status = sub.add_parser("status", help="the CA and each device as AWS IoT sees them, beside the ledger")
    _common(status)
    status.set_defaults(run=run_status)


def _open(args: argparse.Namespace) -> tuple[Workspace, aws.IotApi]:
    workspace = Workspace.at(args.workdir)
    return workspace, aws.client_api(args.region, args.endpoint_url)


def run_register_ca(args: argparse.Namespace) -> int:
    workspace, api = _open(args)
    result = aws.register_ca(workspace, api)
    if args.json:
        emit_json(result)
    else:
        verb = "registered" if result["registered_now"] else "already registered"
        print(f"Sub CA {verb} in AWS IoT ({api.region}): {result['certificate_id']} {result['status']}, "
              "auto-registration on.")
    return 0


def _read_event(source: str) -> dict[str, Any]:
    data = read_bounded(source, MAX_EVENT_BYTES, "event", stdin=True)
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UsageError("the event is not JSON.") from None
    if not isinstance(event, dict):
        raise UsageError("the event is not a JSON object.")
    return event


def run_activate(args: argparse.Namespace) -> int:
    event = _read_event(args.event)
    workspace, api = _open(args)
    report = aws.handle_registration_event(event, api, aws.ledger_index(workspace), aws.load_crl(workspace),
                                           args.policy)
    if args.json:
        emit_json(report)
    else:
        print(f"{report['serial']}: {report['outcome']} ({report['status']}): {report['reason']}")
        for change in report["changes"]:
            print(f"  {change}")
    return EXIT_SUSPECT if report["outcome"] == "suspect" else 0


def run_bulk(args: argparse.Namespace) -> int:
    workspace, api = _open(args)

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"registered {done}/{total}", file=sys.stderr)

    result = aws.bulk_register(workspace, api, without_ca=args.without_ca, rate=args.rate, policy_name=args.policy,
                               on_progress=None if args.json else progress)
    if args.json:
        emit_json(result)
    else:
        print(f"{result['registered']} registered, {result['already_registered']} already registered, "
              f"{len(result['refused'])} refused, of {result['certificates']} live certificates "
              f"({result['mode']}, {result['rate']:g}/s, {api.region}).")
        for item in result["refused"]:
            print(f"refused: {item['reason']}", file=sys.stderr)
    return 1 if result["refused"] else 0


def run_revoke(args: argparse.Namespace) -> int:
    workspace, api = _open(args)
    result = aws.revoke_device(workspace, api, args.serial)
    if args.json:
        emit_json(result)
    else:
        print(f"{args.serial}: {len(result['certificates'])} certificate(s) revoked in AWS IoT ({api.region}).")
        for change in result["changes"]:
            print(f"  {change}")
    return 0


def run_revoke_ca(args: argparse.Namespace) -> int:
    workspace, api = _open(args)
    result = aws.revoke_ca(workspace, api, devices=not args.ca_only, rate=args.rate)
    if args.json:
        emit_json(result)
    else:
        print(f"Sub CA {result['certificate_id']} is INACTIVE in AWS IoT ({api.region}), auto-registration off; "
              f"{len(result['revoked'])} device certificate(s) revoked.")
    return 0


def run_status(args: argparse.Namespace) -> int:
    workspace, api = _open(args)
    result = aws.status(workspace, api)
    if args.json:
        emit_json(result)
        return 0
    ca = result["ca"]
    print(f"Sub CA in AWS IoT ({result['region']}): " +
          (f"{ca['certificate_id']} {ca['status']}" if ca["registered"] else "not registered from this workspace"))
    print(f"{'SERIAL':<20} {'LEDGER':<12} {'AWS':<20} THING")
    for device in result["devices"]:
        held = ",".join(c["status"] for c in device["aws"]) or "-"
        print(f"{device['serial']:<20} {device['ledger_state']:<12} {held:<20} {'yes' if device['thing'] else 'no'}"
              + (f"  ! {device['attention']}" if device["attention"] else ""))
    if result["unmatched_certificates"]:
        print(f"{len(result['unmatched_certificates'])} certificate(s) under the Sub CA match no ledger device "
              "(suspects, or devices registered elsewhere).")
    return 0
