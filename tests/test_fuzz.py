"""A short seeded sample of the fuzz campaign (bench/fuzz.py) over every parser of untrusted
input; the full campaign (100,000 cases per target) runs from `make campaign`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import fuzz  # noqa: E402
import fuzz_targets  # noqa: E402

SAMPLE = 1500  # cases per target: about 10 s for all of them on one core


def test_seeded_sample_of_every_target_finds_nothing(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, str(BENCH / "fuzz.py"), "--engine", "mutate", "--seed", "20261204",
                          "--cases", str(SAMPLE), "--findings", str(tmp_path / "findings"), "--json", str(report)],
                         capture_output=True, text=True, timeout=300)
    results = json.loads(report.read_text())["results"]
    assert {r["target"] for r in results} == set(fuzz_targets.TARGETS)
    found = [f for r in results for f in r["findings"]]
    assert not found, run.stdout
    assert all(r["cases"] == SAMPLE for r in results), run.stdout
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("kind", ["crash", "internal", "message"])
def test_the_harness_reports_what_it_is_built_to_find(kind: str) -> None:
    """The sample above could pass by finding nothing at all: a target that fails on purpose
    must be reported, with one saved finding per kind."""
    def parse(data: bytes) -> None:
        if data[:1] == b"!":
            if kind == "crash":
                raise KeyError(data[:4])
            raise ValueError("internal error (KeyError)" if kind == "internal" else "x" * 500)

    target = fuzz_targets.Target(name="broken", doc="fails on purpose", run=parse, seeds=[b"!abc", b"abc"],
                                 allowed=(ValueError,))
    result = fuzz.run_mutate(target, 200, seed=1, findings_dir=None, timeout=0)
    assert result[{"crash": "crashes", "internal": "internal", "message": "messages"}[kind]] > 0, result
