"""The local endpoint's files and its Mosquitto: configuration, the endpoint's own TLS identity,
the trust bundle of registered CAs, the CRL, the ACL.

Layout (``<workdir>/endpoint/``): ``endpoint.json`` (ports), ``mosquitto.conf``, ``server-ca.pem``
(what clients trust), ``server.pem``/``server.key`` (the endpoint's TLS identity, 0600),
``service.pem``/``service.key`` (the registration service's client identity on the admin
listener), ``trust.pem`` (roots of the registered CAs), ``crl.pem``, ``acl``, ``registry.sqlite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stampline import private
from stampline.errors import StamplineError
from stampline.files import KiB, read_bounded, write_atomically
from stampline.pki.x509 import MAX_CERTIFICATE_PEM, MAX_CRL_PEM

MAX_STATE_BYTES = 64 * KiB  # endpoint.json, mosquitto.conf, pid files: a few hundred bytes
MAX_CRL_FILE = 4 * MAX_CRL_PEM  # crl.pem: one CRL per registered CA

SERVICE_USER = "stampline-service"
EVENT_TOPIC = "$aws/events/certificates/registered/{ca_id}"


@dataclass(frozen=True)
class Ports:
    public: int  # where devices connect (the registration service relays to Mosquitto)
    internal: str  # Mosquitto's device listener: a Unix socket in the 0700 endpoint directory,
    admin: str  # and its listener for the registration service: nobody else can bypass the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EndpointFiles:
    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir) / "endpoint"

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def exists(self) -> bool:
        return self.path("endpoint.json").exists()

    def socket_dir(self) -> Path:
        """A short private directory for the Unix sockets: a socket path is limited to 107 bytes,
        and TLS takes the path as the server name, where no dot-separated label may exceed 63."""
        digest = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"stampline-{os.getuid()}-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
            raise StamplineError(f"{path} is not a private directory of this user.")
        return path

    def ports(self) -> Ports:
        path = self.path("endpoint.json")
        try:
            raw = json.loads(read_bounded(path, MAX_STATE_BYTES, "endpoint record")) if path.exists() else {}
            return Ports(int(raw["port"]), str(raw["internal_socket"]), str(raw["admin_socket"]))
        except (ValueError, KeyError, TypeError):
            raise StamplineError(f"{self.dir} holds no endpoint; run 'stampline endpoint up' first.") from None

    def create(self, port: int) -> Ports:
        """Make the endpoint's identity and configuration (once)."""
        private.make_dir(self.dir)
        if not self.path("server-ca.pem").exists():
            self._make_identity()
        sockets = self.socket_dir()
        ports = Ports(port, str(sockets / "devices"), str(sockets / "service"))
        private.write_file(self.path("endpoint.json"), json.dumps(
            {"host": "127.0.0.1", "port": ports.public, "internal_socket": ports.internal, "admin_socket": ports.admin,
             "ca_file": str(self.path("server-ca.pem"))}))
        # OpenSSL's own configuration caps Mosquitto at TLS 1.2 (its tls_version is a minimum only)
        private.write_file(self.path("openssl.cnf"), (
            "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n"
            "system_default = system_default_sect\n[system_default_sect]\nMaxProtocol = TLSv1.2\n"))
        self.write_acl()
        if not self.path("trust.pem").exists():
            private.write_file(self.path("trust.pem"), self._server_ca())  # no device CA yet
        self.write_config(ports)
        return ports

    def _make_identity(self) -> None:
        """The endpoint's own small CA, its server certificate and the service's client certificate.
        These keys are the local endpoint's TLS identity (files, 0600), not device or CA secrets."""
        now = datetime.now(timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stampline local endpoint CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
              .not_valid_after(now + timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        self._write_pem("server-ca.pem", ca)

        def leaf(name: str, cn: str, usage: x509.ObjectIdentifier, san: bool) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                       .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=825))
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                      critical=False))
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            self._write_pem(f"{name}.pem", builder.sign(ca_key, hashes.SHA256()))
            self._write_key(f"{name}.key", key)

        leaf("server", "localhost", ExtendedKeyUsageOID.SERVER_AUTH, True)
        leaf("service", SERVICE_USER, ExtendedKeyUsageOID.CLIENT_AUTH, False)

    def _write_pem(self, name: str, cert: x509.Certificate) -> None:
        private.write_file(self.path(name), cert.public_bytes(serialization.Encoding.PEM))

    def _write_key(self, name: str, key: ec.EllipticCurvePrivateKey) -> None:
        with open(self.path(name), "wb", opener=private.opener) as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    def write_acl(self) -> None:
        private.write_file(self.path("acl"), f"user {SERVICE_USER}\ntopic readwrite #\ntopic readwrite $aws/#\n\n"
                           "# a device, authenticated by its certificate (username = its CN, the serial),\n"
                           "# may use its own topics only\npattern readwrite devices/%u/#\n")

    def write_trust(self, chains: list[list[x509.Certificate]]) -> None:
        """The roots Mosquitto verifies device chains against: those of the registered CAs."""
        pems = b"".join(c.public_bytes(serialization.Encoding.PEM) for chain in chains for c in chain)
        private.write_file(self.path("trust.pem"), pems or self._server_ca())

    def _server_ca(self) -> bytes:
        return read_bounded(self.path("server-ca.pem"), MAX_CERTIFICATE_PEM, "endpoint CA certificate")

    def write_crl(self, crls: list[x509.CertificateRevocationList]) -> None:
        write_atomically(self.path("crl.pem"), b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))

    def crls(self) -> list[x509.CertificateRevocationList]:
        path = self.path("crl.pem")
        if not path.exists():
            return []
        data = read_bounded(path, MAX_CRL_FILE, "CRL file")
        blocks = [b"-----BEGIN X509 CRL-----" + part for part in data.split(b"-----BEGIN X509 CRL-----")[1:]]
        return [x509.load_pem_x509_crl(block) for block in blocks]

    def write_config(self, ports: Ports) -> None:
        p = self.path
        crl = f"crlfile {p('crl.pem')}\n" if p("crl.pem").exists() else ""
        # Started as root, Mosquitto would drop to the 'mosquitto' user and lose access to these files.
        private.write_file(p("mosquitto.conf"), (
            f"user {pwd.getpwuid(os.getuid()).pw_name}\npersistence false\nlog_dest file {p('mosquitto.log')}\n"
            "log_type error\nlog_type warning\nlog_type notice\nconnection_messages true\n"
            f"set_tcp_nodelay true\nallow_anonymous false\nacl_file {p('acl')}\nmax_keepalive 300\n\n"
            f"# devices: mutual TLS against the registered CAs, CRL enforced; TLS 1.2 so that the\n"
            f"# registration service in front can read the client certificate from the handshake\n"
            f"listener 0 {ports.internal}\ncafile {p('trust.pem')}\ncertfile {p('server.pem')}\n"
            f"keyfile {p('server.key')}\nrequire_certificate true\nuse_identity_as_username true\n"
            f"tls_version tlsv1.2\n{crl}\n"
            f"# the registration service\nlistener 0 {ports.admin}\ncafile {p('server-ca.pem')}\n"
            f"certfile {p('server.pem')}\nkeyfile {p('server.key')}\nrequire_certificate true\n"
            "use_identity_as_username true\n"))


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if found is None:
        raise StamplineError("mosquitto is not installed; run the project's setup (make setup).")
    return found


def _pid(path: Path) -> int | None:
    try:
        pid = int(read_bounded(path, MAX_STATE_BYTES, "pid file").strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, StamplineError):
        return None


def _tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of a log (as text), however long it grew; "" if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read(size).decode(errors="replace")
    except OSError:
        return ""


def start_mosquitto(files: EndpointFiles) -> int:
    log = open(files.path("mosquitto.stderr"), "ab", opener=private.opener)
    ports = files.ports()
    for path in (ports.internal, ports.admin):
        Path(path).unlink(missing_ok=True)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(files.path("mosquitto.conf"))], stdout=log, stderr=log,
                            start_new_session=True, umask=private.UMASK,
                            env=private.child_env(OPENSSL_CONF=str(files.path("openssl.cnf"))))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(files.path("mosquitto.log"), 300)
            raise StamplineError(f"mosquitto did not start: {tail.strip().splitlines()[-1] if tail.strip() else 'see its log'}.")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(0.2)
                probe.connect(ports.internal)
                private.write_file(files.path("mosquitto.pid"), str(proc.pid))
                return proc.pid
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise StamplineError("mosquitto did not open its listener within 10 s.")


def stop_pid(files: EndpointFiles, name: str) -> bool:
    pid = _pid(files.path(name))
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it (a zombie still "exists")
                break
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.05)
    files.path(name).unlink(missing_ok=True)
    return True


def reload_mosquitto(files: EndpointFiles) -> None:
    """SIGHUP: Mosquitto rereads its CRL (and certificates)."""
    pid = _pid(files.path("mosquitto.pid"))
    if pid is not None:
        os.kill(pid, signal.SIGHUP)


def running(files: EndpointFiles, name: str) -> bool:
    return _pid(files.path(name)) is not None
