"""The command line: bad input is one sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from stampline import recipe
from stampline.workspace import Workspace


@pytest.mark.parametrize("args,needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["station", "run", "--workdir", "/nonexistent/ws", "--port", "/dev/null"], "there is no workspace at /nonexistent/ws."),
    (["station", "run", "--workdir", "."], "--port"),
    (["demo", "--devices", "0", "--workdir", "x"], "--devices must be between 1 and 256."),
    (["demo", "--devices", "two", "--workdir", "x"], "invalid int value: 'two'"),
    (["device", "emulate", "--workdir", "WS"], "nothing to run"),
    (["device", "emulate", "--workdir", "WS", "--devices", "1", "--mfg-version", "new"], "--mfg-version must be a version"),
    (["ledger", "verify", "--workdir", "WS"], "no ledger at"),
    (["ca", "export", "--workdir", "WS"], "has no root CA certificate"),
    (["ca", "init", "--workdir", "WS", "--pin-source", "argv:1234"], "--pin-source must be sealed, prompt or env:NAME"),
    (["recipe", "check", "/nonexistent.yaml"], "there is no recipe at /nonexistent.yaml."),
])
def test_bad_command_lines_get_one_sentence(tmp_path: Path, args: list[str], needle: str) -> None:
    args = [a.replace("WS", str(tmp_path)) for a in args]
    done = run_cli(*args)
    assert done.returncode in (1, 2)
    assert needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_bad_recipe_on_the_station_changes_nothing(ca_workspace: Workspace, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.TEMPLATE.replace("device_key: ec-p256", "device_key: dsa"))
    before = sorted(p.name for p in ca_workspace.root.iterdir())
    done = run_cli("station", "run", "--workdir", str(ca_workspace.root), "--port", "/dev/null", "--recipe", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip() == f"stampline: {bad}: device_key: 'dsa' is not one of ec-p256, rsa-2048, rsa-3072."
    assert sorted(p.name for p in ca_workspace.root.iterdir()) == before


def test_unopenable_port_fails_that_port_only(ca_workspace: Workspace, tmp_path: Path) -> None:
    done = run_cli("station", "run", "--workdir", str(ca_workspace.root), "--port", "/nonexistent/tty",
                   "--recipe", str(_template(tmp_path)), "--quiet")
    assert done.returncode == 1
    assert "FAILED at connect" in done.stdout and "Traceback" not in done.stderr


def test_recipe_template_and_check(tmp_path: Path) -> None:
    done = run_cli("recipe", "template")
    assert done.returncode == 0 and done.stdout == recipe.TEMPLATE
    assert run_cli("recipe", "check", str(_template(tmp_path))).returncode == 0


def _template(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.TEMPLATE)
    return path
