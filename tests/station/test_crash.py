"""The station killed with SIGKILL mid-run, and started again: it finishes the remaining devices,
never issues a second certificate for a chip, and the ledger still verifies."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

from conftest import run_cli
from stampline import recipe as recipes
from stampline.workspace import Workspace


def start_emulator(workspace: Workspace, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "stampline.cli.main", "device", "emulate",
                             "--workdir", str(workspace.root), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ports = []
    count = int(args[args.index("--devices") + 1]) if "--devices" in args else None
    while count is None or len(ports) < count:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the emulator stopped: {proc.stderr.read() if proc.stderr else ''}")
        ports.append(json.loads(line)["port"])
    return proc, ports


def issued_count(workspace: Workspace) -> int:
    if not workspace.ledger_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{workspace.ledger_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM certificates").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_station_killed_mid_run_resumes_without_a_second_certificate(fresh_workspace: Workspace) -> None:
    workspace = fresh_workspace
    # RSA keys and real-ish timings so that the kill lands while devices are mid-flow
    workspace.recipe_path.write_text(recipes.TEMPLATE.replace("device_key: ec-p256", "device_key: rsa-2048"))
    emulator, ports = start_emulator(workspace, "--devices", "4", "--time-scale", "0.04")
    try:
        port_args = [a for p in ports for a in ("--port", p)]
        station = subprocess.Popen([sys.executable, "-m", "stampline.cli.main", "station", "run", "--workdir",
                                    str(workspace.root), "--quiet", "--json", *port_args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while issued_count(workspace) < 1 and time.monotonic() < deadline and station.poll() is None:
            time.sleep(0.01)
        assert station.poll() is None, "the station finished before it could be killed"
        os.kill(station.pid, signal.SIGKILL)
        station.wait()
        killed_at = issued_count(workspace)
        assert 1 <= killed_at < 4, killed_at

        again = run_cli("station", "run", "--workdir", str(workspace.root), "--quiet", "--json", *port_args)
        assert again.returncode == 0, again.stdout + again.stderr
        summary = json.loads(again.stdout)
        assert summary["failed"] == 0
        assert {d["outcome"] for d in summary["devices"]} <= {"provisioned", "already-provisioned"}
    finally:
        emulator.terminate()
        emulator.wait(10)

    exported = [json.loads(line) for line in run_cli("ledger", "export", "--workdir", str(workspace.root)).stdout.splitlines()]
    assert len(exported) == 4 and all(row["state"] == "provisioned" for row in exported)
    with sqlite3.connect(workspace.ledger_path) as db:
        per_chip = Counter(chip for (chip,) in db.execute("SELECT chip_id FROM certificates"))
    assert set(per_chip.values()) == {1}, per_chip
    verify = run_cli("ledger", "verify", "--workdir", str(workspace.root))
    assert verify.returncode == 0, verify.stderr


def test_edited_ledger_row_fails_verify(fresh_workspace: Workspace) -> None:
    workspace = fresh_workspace
    workspace.recipe_path.write_text(recipes.TEMPLATE)
    emulator, ports = start_emulator(workspace, "--devices", "2")
    try:
        done = run_cli("station", "run", "--workdir", str(workspace.root), "--quiet",
                       *[a for p in ports for a in ("--port", p)])
        assert done.returncode == 0, done.stderr
    finally:
        emulator.terminate()
        emulator.wait(10)
    assert run_cli("ledger", "verify", "--workdir", str(workspace.root)).returncode == 0
    with sqlite3.connect(workspace.ledger_path) as db:
        db.execute("UPDATE devices SET state = 'seen' WHERE rowid = (SELECT min(rowid) FROM devices)")
    verify = run_cli("ledger", "verify", "--workdir", str(workspace.root))
    assert verify.returncode == 1
    assert "differs from its audit record" in verify.stderr and "in state" in verify.stderr, verify.stderr
    assert "Traceback" not in verify.stderr
