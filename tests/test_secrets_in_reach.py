"""Secrets in reach: no PIN in a child's argv or environment, children see only what they need,
and workspaces are private to their user (0700 directories, 0600 files)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import run_cli
from stampline import ceremony, demo, private, signing
from stampline.cloud.broker import free_port
from stampline.cloud.endpoint import Endpoint
from stampline.device.emulator import DeviceOptions, Emulator
from stampline.device.timing import TimingModel
from stampline.pki.pin import unseal
from stampline.station.ledger import Ledger
from stampline.workspace import Workspace

ALLOWED_ENV = {*private.BASE_ENV, *private.PYTHON_ENV, "SOFTHSM2_CONF", "OPENSSL_CONF"}
SECRET = "planted-secret-7d1e0c"

Child = tuple[list[str], dict[str, str] | None]


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[Child]:
    """Every child process started through subprocess, with its argv and environment."""
    seen: list[Child] = []

    class Spy(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            seen.append(([str(a) for a in args], kwargs.get("env")))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Spy)
    return seen


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A library caller's usual umask: only explicit modes keep the workspace private."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _leaks(seen: list[Child], secrets: list[str]) -> list[str]:
    return [f"{argv[0]}: {where}" for argv, env in seen for secret in secrets
            for where, text in (("argv", " ".join(argv)), ("env", repr(env))) if secret in text]


def test_token_init_puts_no_pin_in_a_child(tmp_path: Path, children: list[Child],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEW_PIN", "user-pin-31415926")
    monkeypatch.setenv("NEW_PIN_ROOT", "root-pin-27182818")
    env_ws = Workspace.at(tmp_path / "env", create=True)
    ceremony.init(env_ws, ceremony.CeremonyOptions(pin_source="env:NEW_PIN"))
    sealed_ws = Workspace.at(tmp_path / "sealed", create=True)
    ceremony.init(sealed_ws, ceremony.CeremonyOptions())
    config = sealed_ws.config()
    pins = ["user-pin-31415926", "root-pin-27182818"]
    for label, spec in config.tokens.items():
        pins.append(unseal(spec["pin"]["sealed"], config.workspace_id, label).decode())
        pins.append(unseal(spec["so_pin"]["sealed"], config.workspace_id, label + "/so").decode())
    assert len(children) >= 4, "the ceremony initialises tokens in child processes"
    assert all(env is not None for _, env in children), "a child inherited our whole environment"
    assert not _leaks(children, pins)


def test_children_see_only_the_environment_they_need(tmp_path: Path, children: list[Child],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMPLINE_TEST_SECRET", SECRET)
    report = demo.run(tmp_path / "demo", 1, show_progress=False)
    assert report.ok, report
    programs = {Path(argv[0]).name for argv, _ in children}
    assert {"pkcs11-tool", "mosquitto", "openssl"} <= programs and any("python" in p for p in programs), programs
    for argv, env in children:
        assert env is not None, f"{argv[0]} inherited our whole environment"
        assert set(env) <= ALLOWED_ENV, (argv[0], set(env) - ALLOWED_ENV)
    assert not _leaks(children, [SECRET])


def _not_private(*roots: Path) -> list[str]:
    wrong = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            if stat.S_IMODE(mode) != want:
                wrong.append(f"{stat.S_IMODE(mode):04o} {path.relative_to(root.parent)}")
    return wrong


def test_workspaces_are_private_in_library_use(tmp_path: Path, loose_umask: None) -> None:
    workspace = Workspace.at(tmp_path / "station" / "ws", create=True)
    ceremony.init(workspace, ceremony.CeremonyOptions())
    Ledger(workspace.ledger_path, "line-1").close()
    with Emulator(workspace.devices_dir, TimingModel(0.0)) as emulator:
        emulator.add_new(1, DeviceOptions())
    endpoint = Endpoint(tmp_path / "cloud")
    try:
        endpoint.up(free_port())
        endpoint.register_ca(workspace)
    finally:
        endpoint.down()
    ci = Workspace.at(tmp_path / "ci", create=True)
    signing.keygen(ci, "esp32c3")
    assert list((workspace.softhsm_dir / "tokens").rglob("token.object")), "SoftHSM2's token files are walked"
    assert list(workspace.devices_dir.rglob("efuse.bin")) and list(workspace.devices_dir.rglob("flash.bin"))
    assert (tmp_path / "cloud" / "endpoint" / "mosquitto.log").exists()
    assert _not_private(tmp_path / "station", tmp_path / "cloud", tmp_path / "ci") == []


def test_workspace_is_private_from_the_command_line(tmp_path: Path, loose_umask: None) -> None:
    done = run_cli("ca", "init", "--workdir", str(tmp_path / "ws"))
    assert done.returncode == 0, done.stderr
    assert _not_private(tmp_path / "ws") == []


def test_an_open_workspace_gets_one_warning(ca_workspace: Workspace, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    private_ws = Workspace.at(tmp_path / "private", create=True)
    open_ws = Workspace.at(tmp_path / "open", create=True)
    assert capsys.readouterr().err == ""
    open_ws.root.chmod(0o755)
    Workspace.at(open_ws.root)
    Workspace.at(open_ws.root)
    Workspace.at(private_ws.root)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{open_ws.root} is open to other users (mode 0755)" in err, err
    assert f"chmod -R go-rwx {open_ws.root}" in err
    # a file in it, made by hand or by an old version, is found too
    (private_ws.root / "recipe.yaml").write_text("chip: esp32c3\n")
    (private_ws.root / "recipe.yaml").chmod(0o644)
    private._warned.clear()
    Workspace.at(private_ws.root)
    assert f"{private_ws.root / 'recipe.yaml'} is open to other users (mode 0644)" in capsys.readouterr().err
    # from the command line: one line, and the command still works
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(ca_workspace.root), str(copy)], check=True)
    copy.chmod(0o755)
    done = run_cli("ca", "export", "--workdir", str(copy))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1 and f"{copy} is open to other users" in done.stderr, done.stderr
