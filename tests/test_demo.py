"""The README's demo command: on an empty directory, then again on the same workspace."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_demo_provisions_and_secures_every_device_and_runs_again(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    first = run_cli("demo", "--devices", "3", "--workdir", str(workdir), "--json", timeout=300)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["ok"] and len(report["devices"]) == 3
    for device in report["devices"]:
        assert device["outcome"] == "secured" and device["secure_boot"] and device["flash_encryption"]
        assert device["first_boot_phases"]["flash_encryption"] > 0
        assert device["cloud_state"] == "ACTIVE" and device["hello"]  # online at the local endpoint
    again = run_cli("demo", "--devices", "4", "--workdir", str(workdir), "--json", timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ok"]
    exported = [json.loads(line) for line in run_cli("ledger", "export", "--workdir", str(workdir)).stdout.splitlines()]
    assert len(exported) == 7 and {row["state"] for row in exported} == {"secured"}
    assert len({row["serial"] for row in exported}) == 7
    # the factory workspace never holds the firmware signing key: that lives in the CI's workspace
    assert "secure_boot" not in (workdir / "station.yaml").read_text()
    assert "secure_boot" in (workdir / "ci" / "station.yaml").read_text()
