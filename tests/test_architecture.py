"""The one-way flow of DESIGN.md, checked on the source: nothing imports back up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stampline"
FORBIDDEN = {
    "device": ("stampline.station", "stampline.pki", "stampline.cloud", "stampline.cli"),
    "pki": ("stampline.station", "stampline.device", "stampline.protocol", "stampline.cli", "stampline.firmware"),
    "protocol": ("stampline.station", "stampline.device", "stampline.pki", "stampline.cli"),
    "firmware": ("stampline.station", "stampline.device", "stampline.cli", "stampline.protocol"),
    "station": ("stampline.device", "stampline.cli"),
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upstream(package: str) -> None:
    files = sorted((SRC / package).rglob("*.py"))
    assert files
    offending = {f"{path.relative_to(SRC)} imports {name}" for path in files for name in imports(path)
                 if name.startswith(FORBIDDEN[package])}
    assert not offending, offending
