"""Ctrl-C and SIGTERM during `station run`: the station says it is stopping, starts no new
device, stops each flow only at a safe step, prints every port's result and exits 128+signal;
the next run finishes the devices without a second certificate."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import run_cli
from stampline import recipe as recipes
from stampline.workspace import Workspace
from test_crash import issued_count, start_emulator

DEVICES = 4


def one_certificate_per_chip(workspace: Workspace) -> Counter[str]:
    with sqlite3.connect(workspace.ledger_path) as db:
        return Counter(chip for (chip,) in db.execute("SELECT chip_id FROM certificates"))


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM)],
                         ids=["ctrl-c", "ctrl-c-twice", "sigterm-twice"])
def test_a_stopped_station_reports_every_port_and_the_next_run_finishes(
        fresh_workspace: Workspace, signals: tuple[signal.Signals, ...]) -> None:
    workspace = fresh_workspace
    workspace.recipe_path.write_text(recipes.TEMPLATE.replace("device_key: ec-p256", "device_key: rsa-2048"))
    emulator, ports = start_emulator(workspace, "--devices", str(DEVICES), "--time-scale", "0.04")
    port_args = [a for p in ports for a in ("--port", p)]
    try:
        station = subprocess.Popen([sys.executable, "-m", "stampline.cli.main", "station", "run", "--workdir",
                                    str(workspace.root), "--quiet", "--json", *port_args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while issued_count(workspace) < 1 and time.monotonic() < deadline and station.poll() is None:
            time.sleep(0.01)
        assert station.poll() is None, "the station finished before it could be stopped"
        for sig in signals:
            os.kill(station.pid, sig)
            time.sleep(0.05)
        out, err = station.communicate(timeout=60)
        assert station.returncode == 128 + signals[0], err
        assert "stopping: no new device starts" in err
        assert ("stopping at each device's next safe step" in err) == (len(signals) > 1)
        assert "Traceback" not in err and "internal error" not in err
        summary = json.loads(out)
        assert sorted(d["port"] for d in summary["devices"]) == sorted(ports)  # every port has its result
        outcomes = Counter(d["outcome"] for d in summary["devices"])
        assert set(outcomes) <= {"provisioned", "stopped"}, summary
        if len(signals) == 1:  # devices under way finish
            assert outcomes["provisioned"] == DEVICES, summary
        assert run_cli("ledger", "verify", "--workdir", str(workspace.root)).returncode == 0

        again = run_cli("station", "run", "--workdir", str(workspace.root), "--quiet", "--json", *port_args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert {d["outcome"] for d in json.loads(again.stdout)["devices"]} <= {"provisioned", "already-provisioned"}
    finally:
        emulator.terminate()
        emulator.wait(10)
    per_chip = one_certificate_per_chip(workspace)
    assert len(per_chip) == DEVICES and set(per_chip.values()) == {1}, per_chip
    assert run_cli("ledger", "verify", "--workdir", str(workspace.root)).returncode == 0
