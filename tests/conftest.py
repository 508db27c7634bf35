"""Shared fixtures: a CA workspace made once per session (tokens in SoftHSM2), helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stampline import ceremony
from stampline.workspace import Workspace


@pytest.fixture(scope="session", autouse=True)
def _seal_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Sealing keys of test workspaces go to a temporary directory, not the user's home."""
    os.environ["STAMPLINE_SEAL_DIR"] = str(tmp_path_factory.mktemp("seal"))


@pytest.fixture(scope="session")
def ca_workspace(tmp_path_factory: pytest.TempPathFactory, _seal_dir: None) -> Workspace:
    """A workspace with the ceremony done; tests must not change it (copy it with `fresh_workspace`)."""
    workspace = Workspace.at(tmp_path_factory.mktemp("ca-ws"), create=True)
    ceremony.init(workspace, ceremony.CeremonyOptions(organization="Test Org"))
    return workspace


@pytest.fixture
def fresh_workspace(ca_workspace: Workspace, tmp_path: Path) -> Workspace:
    """A private copy of the CA workspace (same tokens, same sealing key), safe to change."""
    target = tmp_path / "ws"
    shutil.copytree(ca_workspace.root, target)
    conf = target / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(ca_workspace.root), str(target.resolve())))
    return Workspace.at(target)


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the stampline command line in a fresh process, as an operator would."""
    return subprocess.run([sys.executable, "-m", "stampline.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=timeout)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.fail(f"{name} is not installed; the project's setup installs it")
    return path


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory, _seal_dir: None):  # type: ignore[no-untyped-def]
    """A signing workspace (the product's CI) with its Secure Boot V2 key in a token, and a
    signed release of the reference bootloader, manufacturing firmware and application."""
    from stampline import release as releases, signing

    ci = Workspace.at(tmp_path_factory.mktemp("ci-ws"), create=True)
    signing.keygen(ci, "esp32c3")
    built = releases.build(ci, "esp32c3", ci.root / "release")
    return built


def secure_recipe(release, **versions: str) -> str:  # type: ignore[no-untyped-def]
    """The template recipe with the release's signed images and secure bootloader."""
    from stampline import recipe as recipes

    text = recipes.TEMPLATE
    return text[:text.index("firmware:")] + release.recipe_firmware(**versions)
