"""The local IoT endpoint: bring it up and down, register a CA, take in a ledger export, revoke.

``up`` starts Mosquitto and the registration service as background processes (pid files in the
endpoint directory) and returns when devices can connect; ``down`` stops both.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampline import ceremony, private
from stampline.cloud import broker, jitr
from stampline.cloud.registry import REVOKED, DeviceEntry, Registry
from stampline.cloud.service import LIMITS_FILE, Limits
from stampline.cloud.verification import verification_certificate
from stampline.errors import StamplineError, UsageError
from stampline.files import read_bounded
from stampline.pki.x509 import MAX_CERTIFICATE_PEM, MAX_CRL_PEM
from stampline.station.ledger import Ledger
from stampline.workspace import Workspace

DEFAULT_PORT = 8883


@dataclass(frozen=True)
class EndpointInfo:
    host: str
    port: int
    ca_file: str
    running: bool

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "ca_file": self.ca_file, "running": self.running}


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return -1


class Endpoint:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.files = broker.EndpointFiles(self.workdir)
        if self.files.dir.is_dir():
            private.warn_if_exposed(self.files.dir.resolve())

    def registry(self) -> Registry:
        if not self.files.exists:
            raise UsageError(f"{self.workdir} holds no endpoint; run 'stampline endpoint up --workdir {self.workdir}'.")
        return Registry(self.files.path("registry.sqlite"))

    # -- processes ------------------------------------------------------------------------------

    def up(self, port: int = DEFAULT_PORT, limits: Limits | None = None) -> EndpointInfo:
        """Start the endpoint on ``port`` with the service's ``limits`` (the defaults if None);
        if it runs already, return its info and change nothing."""
        if broker.running(self.files, "service.pid"):
            return self.info()
        if not 1 <= port <= 65535:
            raise UsageError("--port must be between 1 and 65535.")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise StamplineError(f"port {port} on 127.0.0.1 is in use; choose another with --port.") from None
        self.files.create(port)
        private.create_file(self.files.path(LIMITS_FILE))  # 0600, before it is written
        (limits or Limits()).save(self.files.path(LIMITS_FILE))
        Registry(self.files.path("registry.sqlite")).close()
        self._refresh_trust()
        broker.start_mosquitto(self.files)
        log = open(self.files.path("service.log"), "ab", opener=private.opener)
        proc = subprocess.Popen([sys.executable, "-m", "stampline.cli.main", "endpoint", "serve",
                                 "--workdir", str(self.workdir)], stdout=log, stderr=log, start_new_session=True,
                                umask=private.UMASK, env=private.child_env(*private.PYTHON_ENV))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                broker.stop_pid(self.files, "mosquitto.pid")
                raise StamplineError(f"the registration service did not start; see {self.files.path('service.log')}.")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    private.write_file(self.files.path("service.pid"), str(proc.pid))
                    return self.info()
            except OSError:
                time.sleep(0.05)
        proc.kill()
        broker.stop_pid(self.files, "mosquitto.pid")
        raise StamplineError("the registration service did not open its port within 30 s.")

    def down(self) -> bool:
        stopped = broker.stop_pid(self.files, "service.pid")
        stopped = broker.stop_pid(self.files, "mosquitto.pid") or stopped
        if self.files.exists:  # leave no socket directory behind in the temp dir
            ports = self.files.ports()
            for path in (Path(ports.internal), Path(ports.admin)):
                path.unlink(missing_ok=True)
            try:
                Path(ports.internal).parent.rmdir()
            except OSError:
                pass
        return stopped

    def info(self) -> EndpointInfo:
        ports = self.files.ports()
        return EndpointInfo("127.0.0.1", ports.public, str(self.files.path("server-ca.pem")),
                            broker.running(self.files, "service.pid") and broker.running(self.files, "mosquitto.pid"))

    def _refresh_trust(self) -> None:
        """Trust bundle = each registered CA with the chain stored beside it; restart Mosquitto if running."""
        chains = []
        for path in sorted(self.files.dir.glob("ca-*.pem")):
            chains.append(x509.load_pem_x509_certificates(read_bounded(path, MAX_CERTIFICATE_PEM, "CA chain")))
        self.files.write_trust(chains)
        self.files.write_config(self.files.ports())

    def _restart_broker(self) -> None:
        if broker.running(self.files, "mosquitto.pid"):
            broker.stop_pid(self.files, "mosquitto.pid")
            broker.start_mosquitto(self.files)

    # -- CAs, exports, revocation ---------------------------------------------------------------

    def register_ca(self, station: Workspace) -> str:
        """Register the station's Sub CA with proof of possession (the verification certificate is
        signed through the station token), with its chain and its current CRL."""
        registry = self.registry()
        try:
            sub, root = ceremony.load_sub(station), ceremony.load_root(station)
            token, label = station.config().key_token("sub_ca")
            code = registry.registration_code()
            verification = verification_certificate(sub, token.signer(label), code)
            ca_id = registry.register_ca(sub, verification)
        finally:
            registry.close()
        private.write_file(self.files.dir / f"ca-{ca_id[:16]}.pem",
                           b"".join(c.public_bytes(Encoding.PEM) for c in (root, sub)))
        crl = ceremony.issue_crl(station, []) if not station.crl_path.exists() else \
            x509.load_pem_x509_crl(read_bounded(station.crl_path, MAX_CRL_PEM, "CRL"))
        self._merge_crl(crl)
        self._refresh_trust()
        self._restart_broker()
        return ca_id

    def _merge_crl(self, crl: x509.CertificateRevocationList) -> None:
        others = [c for c in self.files.crls() if c.issuer != crl.issuer]
        self.files.write_crl(others + [crl])

    def update_crl(self, crl_pem: bytes) -> int:
        """Take a new CRL (Mosquitto rereads it on SIGHUP) and revoke what it lists; returns revocations."""
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError:
            raise UsageError("the CRL is not a PEM X.509 CRL.") from None
        registry = self.registry()
        try:
            issuers = {ca.subject: ca for ca in registry.cas()}
            ca = issuers.get(crl.issuer)
            if ca is None or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                raise StamplineError("the CRL is not signed by a CA registered at this endpoint.")
            if crl.next_update_utc is not None and crl.next_update_utc < datetime.now(timezone.utc):
                raise StamplineError("the CRL has expired; Mosquitto would refuse every device of its CA with it.")
            current = next((c for c in self.files.crls() if c.issuer == crl.issuer), None)
            if current is not None and _crl_number(crl) <= _crl_number(current) and crl != current:
                raise StamplineError(f"the CRL's number {_crl_number(crl)} is not newer than the loaded "
                                     f"{_crl_number(current)}.")
            self._merge_crl(crl)
            if b"crlfile" not in read_bounded(self.files.path("mosquitto.conf"), broker.MAX_STATE_BYTES,
                                              "Mosquitto configuration"):
                self.files.write_config(self.files.ports())
                self._restart_broker()
            else:
                broker.reload_mosquitto(self.files)
            revoked = 0
            for device in registry.devices():
                if device.state != REVOKED:
                    cert = x509.load_pem_x509_certificate(registry.pem(device.cert_id).encode())  # type: ignore[union-attr]
                    if jitr.revoked_by(cert, [crl]):
                        registry.set_state(device.cert_id, REVOKED, "listed in the CA's CRL")
                        revoked += 1
            return revoked
        finally:
            registry.close()

    def import_ledger(self, station: Workspace) -> tuple[int, int]:
        """Take the station's ledger export; returns (new certificates, pending ones now activated)."""
        with Ledger.open_readonly(station.ledger_path) as ledger:
            rows = list(ledger.export())
        registry = self.registry()
        try:
            added = registry.import_export(rows, source=str(station.root))
            return added, jitr.reconsider_pending(registry, self.files.crls())
        finally:
            registry.close()

    def revoke(self, serial: str) -> list[str]:
        registry = self.registry()
        try:
            found = [d for d in registry.by_serial(serial) if d.state != REVOKED]
            if not found:
                raise StamplineError(f"no live certificate of '{serial}' is known to this endpoint.")
            for device in found:
                registry.set_state(device.cert_id, REVOKED, "revoked by the operator")
            return [d.cert_id for d in found]
        finally:
            registry.close()

    def devices(self) -> list[DeviceEntry]:
        registry = self.registry()
        try:
            return registry.devices()
        finally:
            registry.close()


def serve(workdir: Path) -> None:
    """Run the registration service in the foreground (``endpoint up`` starts it in the background)."""
    import asyncio
    import signal

    from stampline.cloud.service import RegistrationService

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    service = RegistrationService(Path(workdir))
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    try:
        loop.run_until_complete(service.serve())
    finally:
        loop.close()
