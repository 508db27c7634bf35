"""``stampline ca``: the CA ceremony, export of the chain, CRLs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampline import ceremony
from stampline.cli.common import add_json, add_workdir, emit_json, positive_int
from stampline.pki.token import KeyAlgorithm
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("ca", help="the CA ceremony: root and Sub CA in tokens, export, CRL")
    sub = parser.add_subparsers(dest="ca_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    init = sub.add_parser("init", help="create tokens, the offline root CA and the station's Sub CA")
    add_workdir(init)
    init.add_argument("--org", default="Stampline Demo", help="organization name in CA subjects")
    init.add_argument("--station-id", default="line-1", help="this station's name (labels its token)")
    init.add_argument("--pin-source", default="sealed", metavar="SOURCE",
                      help="where token PINs come from: sealed (default), prompt, env:NAME")
    init.add_argument("--key-type", default="ec-p256", choices=[a.value for a in KeyAlgorithm if a != KeyAlgorithm.RSA_2048])
    init.add_argument("--root-days", type=positive_int, default=10950)
    init.add_argument("--sub-days", type=positive_int, default=9131)
    add_json(init)
    init.set_defaults(run=run_init)

    export = sub.add_parser("export", help="print the root CA and then the Sub CA certificate as PEM")
    add_workdir(export)
    export.set_defaults(run=run_export)

    crl = sub.add_parser("crl", help="issue the Sub CA's next CRL from the ledger's revocations")
    add_workdir(crl)
    crl.add_argument("--days", type=positive_int, default=7, help="validity of the CRL")
    add_json(crl)
    crl.set_defaults(run=run_crl)


def run_init(args: argparse.Namespace) -> int:
    options = ceremony.CeremonyOptions(organization=args.org, station_id=args.station_id, pin_source=args.pin_source,
                                       key_algorithm=KeyAlgorithm(args.key_type), root_days=args.root_days,
                                       sub_days=args.sub_days)
    result = ceremony.init(Workspace.at(args.workdir, create=True), options)
    if args.json:
        emit_json({"created": result.created, "root": result.root.subject.rfc4514_string(),
                   "sub_ca": result.sub.subject.rfc4514_string()})
    else:
        print("created: " + (", ".join(result.created) or "nothing (the ceremony was already complete)"))
        print(f"root CA: {result.root.subject.rfc4514_string()}")
        print(f"Sub CA:  {result.sub.subject.rfc4514_string()}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    workspace = Workspace.at(args.workdir)
    for cert in (ceremony.load_root(workspace), ceremony.load_sub(workspace)):
        sys.stdout.write(cert.public_bytes(Encoding.PEM).decode())
    return 0


def run_crl(args: argparse.Namespace) -> int:
    workspace = Workspace.at(args.workdir)
    crl, revoked = ceremony.issue_crl_from_ledger(workspace, args.days)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    if args.json:
        emit_json({"path": str(workspace.crl_path), "number": number, "revoked": revoked})
    else:
        print(f"CRL number {number} with {revoked} revoked certificate(s): {workspace.crl_path}")
    return 0
