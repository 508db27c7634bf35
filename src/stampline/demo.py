"""The demo: a whole line on one machine, on embedded defaults.

Tokens in SoftHSM2, the CA ceremony, a default recipe, N factory-fresh emulated ESP32-C3s on
ptys, all provisioned at once by the station; then every chain is checked by ``openssl verify``.
Run it again on the same workspace and it provisions N more.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampline import ceremony, recipe as recipes
from stampline.device.emulator import DeviceOptions, Emulator
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.station.flow import DeviceResult
from stampline.station.ledger import Ledger
from stampline.station.line import Display, open_station, run_line
from stampline.workspace import Workspace


@dataclass
class DemoReport:
    results: list[DeviceResult]
    chains_ok: bool
    chain_problems: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    ledger_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.chains_ok and not self.ledger_problems
                and all(r.outcome == "provisioned" for r in self.results))


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
                               *files], capture_output=True, text=True)
    ok_lines = {line.split(":")[0] for line in done.stdout.splitlines() if line.endswith(": OK")}
    return [f"the chain of {Path(f).stem} does not verify." for f in files if f not in ok_lines]


def run(workdir: Path, devices: int, time_scale: float = 0.0, show_progress: bool = True) -> DemoReport:
    workspace = Workspace.at(workdir, create=True)
    result = ceremony.init(workspace, ceremony.CeremonyOptions())
    created = list(result.created)
    if not workspace.recipe_path.exists():
        workspace.recipe_path.write_text(recipes.TEMPLATE)
        created.append("default recipe")
    recipe = recipes.load(workspace.recipe_path)
    with Emulator(workspace.devices_dir, TimingModel(time_scale)) as emulator:
        emulated = emulator.add_new(devices, DeviceOptions(model=recipe.chip))
        ports = [d.port for d in emulated]
        with open_station(workspace, recipe, note=f"demo, {devices} devices") as context, \
                Display(ports, enabled=show_progress) as display:
            results = run_line(context, ports, display)
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        certs = {}
        for r in results:
            live = ledger.live_certificate(r.chip_id) if r.chip_id else None
            if live is not None:
                certs[r.serial] = live.der
        ledger_problems = ledger.verify()
    problems = verify_chains(workspace, certs)
    missing = [r for r in results if r.outcome == "provisioned" and r.serial not in certs]
    problems += [f"device {r.chip_id} has no certificate in the ledger." for r in missing]
    return DemoReport(results, chains_ok=not problems, chain_problems=problems, created=created,
                      ledger_problems=ledger_problems)
