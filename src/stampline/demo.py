"""The demo: a whole line on one machine, on embedded defaults.

Tokens in SoftHSM2, the CA ceremony, a signing workspace standing for the product's CI (its own
token, the Secure Boot V2 key, a signed release), a recipe naming that release, N factory-fresh
emulated ESP32-C3s on ptys (pre-flashed with the signed firmware), all provisioned at once by
the station, locked by their first boot, then brought online: the local endpoint (Mosquitto with
Just-In-Time Registration) activates each device once the station's ledger export arrives, and
each device says hello on its own topic. Every chain is checked by ``openssl verify``.
Run it again on the same workspace and it provisions N more.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampline import ceremony, private, recipe as recipes, release as releases, signing
from stampline.cloud.broker import free_port
from stampline.cloud.endpoint import Endpoint
from stampline.device.emulator import DeviceOptions, Emulator
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.files import read_bounded
from stampline.pki.x509 import MAX_CERTIFICATE_PEM
from stampline.station.flow import DeviceResult
from stampline.station.ledger import Ledger
from stampline.station.line import Display, open_station, run_line
from stampline.workspace import Workspace


@dataclass(frozen=True)
class DeviceSecurity:
    secure_boot: bool
    flash_encryption: bool
    first_boot_phases: dict[str, float]  # modelled seconds of the device's first boot, per phase
    cloud_state: str = ""  # at the local endpoint: PENDING_ACTIVATION, ACTIVE, REVOKED
    hello: bool = False  # its hello reached the endpoint on its own topic


@dataclass
class DemoReport:
    results: list[DeviceResult]
    chains_ok: bool
    chain_problems: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    ledger_problems: list[str] = field(default_factory=list)
    security: dict[str, DeviceSecurity] = field(default_factory=dict)  # by chip id

    @property
    def ok(self) -> bool:
        secured = all(self.security.get(r.chip_id, DeviceSecurity(False, False, {})).secure_boot
                      and self.security[r.chip_id].flash_encryption and self.security[r.chip_id].cloud_state == "ACTIVE"
                      and self.security[r.chip_id].hello for r in self.results)
        return (self.chains_ok and not self.ledger_problems and secured
                and all(r.outcome == "secured" for r in self.results))


def verify_chains(workspace: Workspace, certs: dict[str, bytes]) -> list[str]:
    """``openssl verify`` every device certificate against root and Sub CA, in one process."""
    if not certs:
        return []
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StamplineError("openssl is not installed; it checks the demo's chains.")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for serial, der in certs.items():
            path = Path(tmp) / f"{serial}.pem"
            path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM))
            files.append(str(path))
        done = subprocess.run([openssl, "verify", "-x509_strict", "-purpose", "sslclient",
                               "-CAfile", str(workspace.root_cert_path), "-untrusted", str(workspace.sub_cert_path),
                               *files], capture_output=True, text=True, env=private.child_env())
    ok_lines = {line.split(":")[0] for line in done.stdout.splitlines() if line.endswith(": OK")}
    return [f"the chain of {Path(f).stem} does not verify." for f in files if f not in ok_lines]


def _release(workspace: Workspace, chip: str, created: list[str]) -> releases.Release:
    """The product CI's side, in a workspace of its own: the factory never holds this key."""
    ci = Workspace.at(workspace.root / "ci", create=True)
    if not ci.has_config():
        signing.keygen(ci, chip)
        created.append("signing workspace with its Secure Boot V2 key")
    out = ci.root / "release"
    built = releases.existing(out)
    if built is not None:
        return built
    created.append("signed firmware release")
    return releases.build(ci, chip, out)


def _endpoint_port(workspace: Workspace, template: str) -> tuple[str, int]:
    """The recipe's endpoint: the template's port if it is free on this machine, else a free one."""
    port = 8883
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            port = free_port()
    return template.replace("mqtts://127.0.0.1:8883", f"mqtts://127.0.0.1:{port}"), port


def run(workdir: Path, devices: int, time_scale: float = 0.0, show_progress: bool = True,
        cloud_timeout: float = 60.0) -> DemoReport:
    workspace = Workspace.at(workdir, create=True)
    result = ceremony.init(workspace, ceremony.CeremonyOptions())
    created = list(result.created)
    release = _release(workspace, "esp32c3", created)
    if not workspace.recipe_path.exists():
        template = recipes.TEMPLATE
        text, _ = _endpoint_port(workspace, template[:template.index("firmware:")] + release.recipe_firmware())
        private.write_file(workspace.recipe_path, text)
        created.append("recipe naming the signed release")
    recipe = recipes.load(workspace.recipe_path)
    endpoint = Endpoint(workspace.root)
    endpoint.up(urlparse(recipe.endpoint).port or 8883)
    try:
        registry = endpoint.registry()
        try:
            registered = bool(registry.cas())
        finally:
            registry.close()
        if not registered:
            endpoint.register_ca(workspace)
            created.append("local endpoint with the Sub CA registered")
        else:  # a CRL lasts days: the endpoint gets a fresh one at every run, as a cloud would
            crl, _ = ceremony.issue_crl_from_ledger(workspace)
            endpoint.update_crl(crl.public_bytes(Encoding.PEM))
        return _line(workspace, recipe, release, endpoint, devices, time_scale, show_progress, created, cloud_timeout)
    finally:
        endpoint.down()


def _line(workspace: Workspace, recipe: recipes.Recipe, release: releases.Release, endpoint: Endpoint, devices: int,
          time_scale: float, show_progress: bool, created: list[str], cloud_timeout: float) -> DemoReport:
    images = {part: release.data(part) for part in ("manufacturing", "application")}
    security: dict[str, DeviceSecurity] = {}
    trust = read_bounded(endpoint.info().ca_file, MAX_CERTIFICATE_PEM, "endpoint CA certificate")
    with Emulator(workspace.devices_dir, TimingModel(time_scale), cloud_trust=trust) as emulator:
        emulated = emulator.add_new(devices, DeviceOptions(model=recipe.chip, images=images))
        ports = [d.port for d in emulated]
        with open_station(workspace, recipe, note=f"demo, {devices} devices") as context, \
                Display(ports, enabled=show_progress) as display:
            results = run_line(context, ports, display)
        endpoint.import_ledger(workspace)  # the cloud learns what the station built
        cloud = _await_cloud(endpoint, [r.serial for r in results if r.serial], cloud_timeout)
        for device, r in zip(emulated, results):
            boot = device.last_boot
            state, hello = cloud.get(r.serial, ("", False))
            security[device.chip_id] = DeviceSecurity(
                device.efuses.secure_boot_enabled(), device.efuses.flash_encryption_enabled(),
                dict(boot.phases) if boot and boot.first_boot else {}, state, hello)
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        certs = {}
        for r in results:
            live = ledger.live_certificate(r.chip_id) if r.chip_id else None
            if live is not None:
                certs[r.serial] = live.der
        ledger_problems = ledger.verify()
    problems = verify_chains(workspace, certs)
    missing = [r for r in results if r.outcome in ("provisioned", "secured") and r.serial not in certs]
    problems += [f"device {r.chip_id} has no certificate in the ledger." for r in missing]
    return DemoReport(results, chains_ok=not problems, chain_problems=problems, created=created,
                      ledger_problems=ledger_problems, security=security)


def _await_cloud(endpoint: Endpoint, serials: list[str], timeout: float) -> dict[str, tuple[str, bool]]:
    """Wait until every device is ACTIVE at the endpoint and its hello arrived (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {d.serial: (d.state, d.hello_at is not None) for d in endpoint.devices() if d.serial in serials}
        if all(found.get(s) == ("ACTIVE", True) for s in serials) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
