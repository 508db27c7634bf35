"""Just-In-Time Registration throughput at the local endpoint, beside Mosquitto's bare
mutual-TLS connection rate, measured in the same run, loopback only.

N device clients with certificates from the station's Sub CA (in SoftHSM2) connect for the
first time at once. Through the registration service each one is refused at its first
connection (registered PENDING_ACTIVATION, event, activation policy: ACTIVE), then connects
again and gets its CONNACK. The baseline: the same clients straight to Mosquitto's device
listener (its Unix socket; TLS 1.2 mutual authentication + MQTT CONNECT/CONNACK), no registration.

Targets (issue 4): at least 200 activations per second, and the service's full connection rate
no worse than half the bare one.
Run: .venv/bin/python bench/jitr.py [--devices 100 1000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stampline import ceremony
from stampline.cloud.endpoint import Endpoint
from stampline.cloud.broker import free_port
from stampline.cloud.registry import ACTIVE
from stampline.device.cloud_client import tls_context
from stampline.pki.policy import check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.workspace import Workspace


def make_devices(workspace: Workspace, count: int, offset: int) -> list[tuple[str, bytes, bytes]]:
    token, label = workspace.config().key_token("sub_ca")
    issuer = DeviceIssuer(ceremony.load_sub(workspace), token.signer(label))
    out = []
    for i in range(offset, offset + count):
        serial, chip = f"BENCH-{i:06d}", f"7cdfa1{i:06x}"
        key = ec.generate_private_key(ec.SECP256R1())
        subject = csr_subject(serial, "Bench", chip)
        csr = (x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
               .public_bytes(serialization.Encoding.DER))
        profile = DeviceProfile("ec-p256", 7300, {"common_name": serial, "organization": "Bench"})
        cert = issuer.issue(check_csr(csr, profile, subject, lambda _: None), profile, chip)
        out.append((serial, cert, key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())))
    return out


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes((0x10, len(body))) + body


async def connect_once(where: int | str, context: ssl.SSLContext, client_id: str) -> bool:
    """TLS + MQTT CONNECT to a loopback port or Mosquitto's Unix socket; True on a CONNACK that accepts."""
    try:
        opening = (asyncio.open_unix_connection(where, ssl=context, server_hostname="127.0.0.1")
                   if isinstance(where, str) else
                   asyncio.open_connection("127.0.0.1", where, ssl=context, server_hostname="127.0.0.1"))
        reader, writer = await asyncio.wait_for(opening, 10)
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        return False
    try:
        writer.write(_connect_packet(client_id))
        await writer.drain()
        ack = await asyncio.wait_for(reader.readexactly(4), 10)
        return ack[0] == 0x20 and ack[3] == 0
    except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def run_clients(port: int | str, clients: list[tuple[str, ssl.SSLContext]], concurrency: int,
                      until_accepted: bool) -> tuple[float, list[int]]:
    """All clients at once (bounded); returns wall time and the attempts each needed."""
    gate = asyncio.Semaphore(concurrency)
    attempts: list[int] = []

    async def one(client_id: str, context: ssl.SSLContext) -> None:
        tries = 0
        while True:
            tries += 1
            async with gate:
                ok = await connect_once(port, context, client_id)
            if ok or not until_accepted or tries >= 20:
                attempts.append(tries)
                return
            await asyncio.sleep(0.01)

    start = time.perf_counter()
    await asyncio.gather(*(one(cid, ctx) for cid, ctx in clients))
    return time.perf_counter() - start, attempts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="bare-connection rounds (median)")
    args = parser.parse_args()
    os.environ.setdefault("STAMPLINE_SEAL_DIR", tempfile.mkdtemp(prefix="stampline-seal-"))
    with tempfile.TemporaryDirectory(prefix="stampline-bench-") as tmpdir:
        workspace = Workspace.at(Path(tmpdir) / "ws", create=True)
        ceremony.init(workspace, ceremony.CeremonyOptions(organization="Bench"))
        endpoint = Endpoint(workspace.root)
        endpoint.up(free_port())
        try:
            endpoint.register_ca(workspace)
            trust = Path(endpoint.info().ca_file).read_bytes()
            sub_der = ceremony.load_sub(workspace).public_bytes(serialization.Encoding.DER)
            ports = endpoint.files.ports()
            print(f"JITR at the local endpoint, loopback, {args.concurrency} connections in flight, TLS 1.2 mutual "
                  "authentication with EC P-256 device certificates")
            print(f"{'N':>6} {'bare conn/s':>12} {'registrations/s':>16} {'activations/s':>14} "
                  f"{'JITR conn/s':>12} {'devices/s':>10} {'all activated':>14} {'bare/JITR conn':>15}")
            offset = 0
            for n in args.devices:
                devices = make_devices(workspace, n, offset)
                offset += n
                clients = [(serial, tls_context(cert, sub_der, key, trust)) for serial, cert, key in devices]
                registry = endpoint.registry()
                registry.import_export([{"serial": s, "certificate": x509.load_der_x509_certificate(c).public_bytes(
                    serialization.Encoding.PEM).decode()} for s, c, _ in devices], source="bench")
                registry.close()
                bare = statistics.median(
                    n / asyncio.run(run_clients(ports.internal, clients, args.concurrency, False))[0]
                    for _ in range(args.rounds))
                started = time.time()
                wall, attempts = asyncio.run(run_clients(ports.public, clients, args.concurrency, True))
                registry = endpoint.registry()
                states = {d.serial: d for d in registry.devices() if d.serial.startswith("BENCH-")}
                registry.close()
                mine = [states[s] for s, _, _ in devices if s in states]
                active = [d for d in mine if d.state == ACTIVE]
                if len(active) != n or max(attempts) >= 20:
                    print(f"  only {len(active)} of {n} activated", file=sys.stderr)
                first = min(d.first_seen or started for d in mine)
                last_seen = max(d.first_seen or started for d in mine)
                last_active = max(d.activated_at or started for d in active) if active else started
                registrations = n / max(last_seen - first, 1e-6)
                activations = len(active) / max(last_active - first, 1e-6)
                devices_rate = n / wall  # devices fully online per second (each connects twice)
                connection_rate = sum(attempts) / wall  # TLS connections through the service per second
                print(f"{n:>6} {bare:12.0f} {registrations:16.0f} {activations:14.0f} {connection_rate:12.0f} "
                      f"{devices_rate:10.0f} {last_active - started:13.2f}s {bare / connection_rate:15.2f}")
            print("\ntargets: >= 200 activations/s; bare/JITR conn <= 2 (the same TLS connection, relayed and decided, "
                  "against Mosquitto alone; a JITR device needs two of them: refused, then accepted)")
        finally:
            endpoint.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
