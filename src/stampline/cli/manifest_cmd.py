"""``stampline manifest``: export, verify and import bulk-registration manifests."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stampline.cli.common import add_json, add_workdir, emit_json, positive_int
from stampline.cloud import manifest
from stampline.cloud.registrar import Registrar
from stampline.errors import UsageError
from stampline.files import read_bounded
from stampline.pki import x509 as px
from stampline.workspace import Workspace


def register(groups: Any) -> None:
    parser = groups.add_parser("manifest", help="bulk-registration manifests (signed JWS per device)")
    sub = parser.add_subparsers(dest="manifest_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    export = sub.add_parser("export", help="sign a manifest of the provisioned devices in the ledger")
    add_workdir(export)
    export.add_argument("--batch", type=positive_int, metavar="N", help="only the devices of this batch")
    export.add_argument("--out", required=True, metavar="FILE", help="where to write the manifest (atomically)")
    export.add_argument("--pubkey-out", metavar="FILE",
                        help="also write the manifest public key (PEM; a JWK if FILE ends in .jwk or .json)")
    add_json(export)
    export.set_defaults(run=run_export)

    verify = sub.add_parser("verify", help="check every entry, the chain and the header of a manifest")
    _add_checks(verify)
    add_json(verify)
    verify.set_defaults(run=run_verify)

    imp = sub.add_parser("import", help="verify a manifest, then register each device with a registrar")
    _add_checks(imp)
    imp.add_argument("--progress", metavar="FILE",
                     help="the progress record, for resuming (default: FILE.progress.jsonl)")
    imp.add_argument("--local-endpoint", action="store_true", help="register with the local endpoint's registry")
    add_workdir(imp, required=False)
    add_json(imp)
    imp.set_defaults(run=run_import)


def _add_checks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the manifest")
    parser.add_argument("--pubkey", required=True, metavar="FILE", help="the manifest public key (PEM or JWK)")
    parser.add_argument("--ca", metavar="PEM", help="require every device certificate to chain to this Sub CA")


def _load_ca(path: str | None) -> Any:
    if path is None:
        return None
    return px.load_certificate(read_bounded(path, px.MAX_CERTIFICATE_PEM, "Sub CA certificate"), "Sub CA certificate")


def make_registrar(args: argparse.Namespace) -> Registrar:
    """The registrar the command line selects: the local endpoint's registry (``--local-endpoint
    --workdir DIR``, DIR holding the endpoint)."""
    if getattr(args, "local_endpoint", False):
        if not getattr(args, "workdir", None):
            raise UsageError("--local-endpoint needs --workdir, the directory that holds the endpoint.")
        from pathlib import Path

        from stampline.cloud.endpoint import Endpoint
        return Endpoint(Path(args.workdir)).registry()
    raise UsageError("choose where to import: --local-endpoint --workdir DIR (for AWS: stampline aws bulk-register).")


def run_export(args: argparse.Namespace) -> int:
    report = manifest.export_manifest(Workspace.at(args.workdir), args.out, args.batch, args.pubkey_out)
    if args.json:
        emit_json({"manifestId": report.manifest_id, "count": report.count, "batch": report.batch,
                   "kid": report.kid, "path": report.path, "pubkey": args.pubkey_out})
    else:
        scope = f"batch {report.batch}" if report.batch is not None else "all batches"
        print(f"manifest {report.manifest_id}: {report.count} devices ({scope}), signed by kid {report.kid}, "
              f"written to {report.path}.")
        if args.pubkey_out:
            print(f"manifest public key written to {args.pubkey_out}.")
    return 0


def _print_problems(problems: list[manifest.Problem]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def run_verify(args: argparse.Namespace) -> int:
    report = manifest.verify_manifest(args.file, manifest.load_public_key(args.pubkey), _load_ca(args.ca))
    if args.json:
        emit_json(report.to_dict())
    elif report.problems:
        _print_problems(report.problems)
        print(f"the manifest fails verification: {len(report.problems)} problem(s).", file=sys.stderr)
    else:
        print(f"manifest {report.manifest_id} from station {report.station} verified: "
              f"{len(report.entries)} entries, signatures, chain and header consistent.")
    return 0 if report.ok else 1


def run_import(args: argparse.Namespace) -> int:
    key = manifest.load_public_key(args.pubkey)
    ca = _load_ca(args.ca)
    registrar = make_registrar(args)
    progress = args.progress or f"{args.file}.progress.jsonl"

    def show(done: int, total: int) -> None:
        if not args.json and (done % 1000 == 0 or done == total):
            print(f"registered {done}/{total}", file=sys.stderr)
    try:
        report = manifest.import_manifest(args.file, key, registrar, progress, ca, show)
    except manifest.ManifestRejected as exc:
        if args.json:
            emit_json({"ok": False, "problems": [p.to_dict() for p in exc.problems]})
            return 1
        _print_problems(exc.problems)
        raise
    if args.json:
        emit_json({"ok": True, "manifestId": report.manifest_id, "registrar": report.registrar,
                   "total": report.total, "registered": report.registered, "already": report.already,
                   "progress": progress})
    else:
        print(f"manifest {report.manifest_id}: {report.registered} devices registered with {report.registrar}, "
              f"{report.already} already done earlier ({report.total} in all); progress in {progress}.")
    return 0
