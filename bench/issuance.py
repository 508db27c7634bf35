"""Issuance throughput through SoftHSM2, beside its baselines, measured in the same run.

  ours          CSR -> policy -> token signature -> durable ledger commit -> certificate,
                8 concurrent callers (as 8 ports would be), through the issuance desk
  no ledger     diagnostic: policy and token signature, 8 callers, nothing recorded
  raw cert      CSR -> certificate through the same token, no policy, no ledger, one caller
  raw sign      bare ECDSA P-256 signatures through the same token owner thread
  openssl       `openssl x509 -req` run as one process per certificate (software CA key)

Also: the station's CPU time per device and its peak memory with 8 ports at --time-scale 0.

Targets (issue 2): ours >= 20x openssl-per-process, and ours >= half the raw token rate.
Figures are medians of several rounds. Run: .venv/bin/python bench/issuance.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stampline import ceremony, recipe as recipes
from stampline.pki.policy import check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.pki.token import Scheme
from stampline.station.issuance import IssuanceDesk
from stampline.station.ledger import Ledger
from stampline.workspace import Workspace


def make_csrs(count: int) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(count):
        chip = f"7cdfa1{i:06x}"
        serial = f"BENCH-{i:06d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(csr_subject(serial, "Bench", chip))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        out.append((chip, serial, csr))
    return out


def on_ports(one: Callable[[tuple[str, str, bytes]], None], csrs: list[tuple[str, str, bytes]],
             ports: int = 8) -> float:
    """Seconds to run ``one`` over the CSRs from ``ports`` threads, each taking its share in turn
    as a port takes its devices; started together."""
    start = threading.Barrier(ports + 1)

    def port(share: list[tuple[str, str, bytes]]) -> None:
        start.wait()
        for item in share:
            one(item)
    threads = [threading.Thread(target=port, args=(csrs[i::ports],)) for i in range(ports)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def profile(serial: str) -> DeviceProfile:
    return DeviceProfile("ec-p256", 7300, {"common_name": serial, "organization": "Bench"})


def ours(workspace: Workspace, issuer: DeviceIssuer, csrs: list[tuple[str, str, bytes]], round_no: int) -> float:
    """Full issuance with 8 concurrent callers; returns certificates per second."""
    with Ledger(workspace.root / f"bench-{round_no}.sqlite", station_id="bench") as ledger, \
            IssuanceDesk(issuer, ledger) as desk:
        batch = ledger.open_batch("bench", "00" * 32)

        def one(item: tuple[str, str, bytes]) -> None:  # what a port's flow does at its issue step
            chip, serial, csr = item
            desk.issue(csr, profile(serial), csr_subject(serial, "Bench", chip), chip, batch, serial)

        for chip, serial, _ in csrs:  # devices are seen before their issuance, as on the line
            ledger.device_seen(chip, "esp32c3", "1.0.0", "1.0.0", "bench", batch)
            ledger.set_device_serial(chip, serial)
        elapsed = on_ports(one, csrs)
        assert len(ledger.certificates()) == len(csrs)
    return len(csrs) / elapsed


def without_ledger(issuer: DeviceIssuer, csrs: list[tuple[str, str, bytes]]) -> float:
    """Diagnostic: policy and token signing with 8 callers, and no ledger at all."""
    def one(item: tuple[str, str, bytes]) -> None:
        chip, serial, csr = item
        accepted = check_csr(csr, profile(serial), csr_subject(serial, "Bench", chip), lambda _: None)
        issuer.issue(accepted, profile(serial), chip)

    return len(csrs) / on_ports(one, csrs)


def raw_cert(issuer: DeviceIssuer, csrs: list[tuple[str, str, bytes]]) -> float:
    start = time.perf_counter()
    for chip, serial, csr in csrs:
        request = x509.load_der_x509_csr(csr)
        from stampline.pki.policy import AcceptedCsr
        from stampline.pki.x509 import spki_der
        der = spki_der(request.public_key())  # type: ignore[arg-type]
        issuer.issue(AcceptedCsr(request.public_key(), der, ""), profile(serial), chip)  # type: ignore[arg-type]
    return len(csrs) / (time.perf_counter() - start)


def raw_sign(workspace: Workspace, count: int) -> float:
    token, label = workspace.config().key_token("sub_ca")
    data = hashlib.sha256(b"bench").digest()
    token.sign(label, data, Scheme.ECDSA_SHA256)
    start = time.perf_counter()
    for _ in range(count):
        token.sign(label, data, Scheme.ECDSA_SHA256)
    return count / (time.perf_counter() - start)


def openssl_per_process(tmp: Path, csrs: list[tuple[str, str, bytes]]) -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(tmp / "ca.key"), "-subj", "/CN=bench",
                    "-days", "30", "-out", str(tmp / "ca.pem")], check=True, capture_output=True)
    paths = []
    for i, (_, _, csr) in enumerate(csrs):
        path = tmp / f"{i}.csr"
        path.write_bytes(x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM))
        paths.append(path)
    start = time.perf_counter()
    for path in paths:
        subprocess.run(["openssl", "x509", "-req", "-in", str(path), "-CA", str(tmp / "ca.pem"), "-CAkey",
                        str(tmp / "ca.key"), "-days", "30", "-sha256", "-out", str(path.with_suffix(".pem"))],
                       check=True, capture_output=True)
    return len(paths) / (time.perf_counter() - start)


def station_cpu(workspace: Workspace, devices: int) -> tuple[float, float, float]:
    """Provision `devices` emulated devices on 8 ports (emulator in another process);
    returns (station CPU seconds per device, peak RSS MiB, wall seconds per device)."""
    workspace.recipe_path.write_text(recipes.TEMPLATE)
    cpu, wall, peak, done = 0.0, 0.0, 0.0, 0
    while done < devices:
        emulator = subprocess.Popen([sys.executable, "-m", "stampline.cli.main", "device", "emulate", "--workdir",
                                     str(workspace.root), "--devices", "8", "--json"],
                                    stdout=subprocess.PIPE, text=True)
        assert emulator.stdout is not None
        ports = [json.loads(emulator.stdout.readline())["port"] for _ in range(8)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        station = subprocess.run([sys.executable, "-m", "stampline.cli.main", "station", "run", "--workdir",
                                  str(workspace.root), "--quiet", "--json", *[a for p in ports for a in ("--port", p)]],
                                 capture_output=True, text=True)
        wall += time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        emulator.terminate()
        emulator.wait()
        assert station.returncode == 0, station.stderr
        cpu += (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        peak = max(peak, after.ru_maxrss / 1024)
        done += 8
    return cpu / done, peak, wall / done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer certificates and rounds")
    parser.add_argument("--rounds", type=int, default=0)
    args = parser.parse_args()
    count = 300 if args.quick else 2000
    rounds = args.rounds or (3 if args.quick else 5)
    os.environ.setdefault("STAMPLINE_SEAL_DIR", tempfile.mkdtemp(prefix="stampline-seal-"))
    with tempfile.TemporaryDirectory(prefix="stampline-bench-") as tmpdir:
        tmp = Path(tmpdir)
        workspace = Workspace.at(tmp / "ws", create=True)
        ceremony.init(workspace, ceremony.CeremonyOptions(organization="Bench"))
        token, label = workspace.config().key_token("sub_ca")
        issuer = DeviceIssuer(ceremony.load_sub(workspace), token.signer(label))
        csrs = make_csrs(count)
        figures: dict[str, list[float]] = {"ours": [], "no_ledger": [], "raw_cert": [], "raw_sign": [], "openssl": []}
        for r in range(rounds):
            figures["ours"].append(ours(workspace, issuer, csrs, r))
            figures["no_ledger"].append(without_ledger(issuer, csrs))
            figures["raw_cert"].append(raw_cert(issuer, csrs))
            figures["raw_sign"].append(raw_sign(workspace, count * 2))
            figures["openssl"].append(openssl_per_process(tmp, csrs[: max(40, count // 20)]))
        med = {k: statistics.median(v) for k, v in figures.items()}
        cpu, peak, wall = station_cpu(workspace, 16 if args.quick else 32)

    print(f"issuance through SoftHSM2, {count} EC P-256 certificates per round, median of {rounds} rounds")
    print(f"{'pipeline':58} {'certs/s':>10}")
    print(f"{'ours: CSR->policy->token->durable ledger (8 callers)':58} {med['ours']:10.0f}")
    print(f"{'  diagnostic: policy->token, no ledger (8 callers)':58} {med['no_ledger']:10.0f}")
    print(f"{'raw cert: CSR->certificate through the token (1 caller)':58} {med['raw_cert']:10.0f}")
    print(f"{'raw sign: bare ECDSA signatures through the token':58} {med['raw_sign']:10.0f}")
    print(f"{'openssl x509 -req, one process per certificate':58} {med['openssl']:10.1f}")
    print()
    x_openssl = med["ours"] / med["openssl"]
    of_cert = med["ours"] / med["raw_cert"]
    of_sign = med["ours"] / med["raw_sign"]
    print(f"ours / openssl-per-process = {x_openssl:6.1f}x   (target >= 20x: {'met' if x_openssl >= 20 else 'NOT met'})")
    print(f"ours / raw cert signing    = {of_cert:6.2f}    (target >= 0.5: {'met' if of_cert >= 0.5 else 'NOT met'})")
    print(f"ours / raw ECDSA signing   = {of_sign:6.2f}    (for reference: bare signatures carry no certificate)")
    print()
    print(f"station, 8 ports, --time-scale 0: CPU {cpu * 1000:.1f} ms per device (process start included), "
          f"peak RSS {peak:.0f} MiB, wall {wall * 1000:.0f} ms per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
