"""Fuzz campaign over every parser of untrusted input (issue 8), beside its target.

  target        at least 100,000 cases per target, 0 crashes, 0 internal errors, 0 bad messages
  targets       frame, tlv, link, server (protocol/), csr (pki/policy.py), recipe, station-config,
                manifest, manifest-key (cloud/manifest.py), tls (cloud/tap.py): see bench/fuzz_targets.py

A *crash* is an exception other than the refusal type the code under test may raise, a hang
(a case running longer than --timeout) or a broken invariant; an *internal error* is a refusal
that says "internal error" (or a device reply INTERNAL); a *bad message* is a refusal longer
than 300 characters or holding non-printable characters (refusals are short, sanitised
sentences). Each distinct finding is saved once, with its input, under --findings
(bench/fuzz-findings/TARGET/KIND-ID.bin and .txt), and replays with --replay.

Engines: ``atheris`` (coverage-guided libFuzzer, one process per target) when it is installed,
else ``mutate`` (a built-in seeded mutator: havoc, splices, dictionary tokens, a corpus grown by
new outcomes). Either is deterministic given --seed. Exit status 1 when anything was found.

  .venv/bin/python bench/fuzz.py [--cases N] [--seed S] [--target NAME] [--engine E]
  .venv/bin/python bench/fuzz.py --target csr --replay bench/fuzz-findings/csr/crash-0123456789.bin
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_targets  # noqa: E402
from fuzz_targets import TARGETS, Target, Violation, message_problem  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = 100_000
DEFAULT_FINDINGS = HERE / "fuzz-findings"
KINDS = ("crash", "internal", "message")
MAX_SAVED = 40  # distinct findings saved per target (the rest are counted)


class Hang(BaseException):
    """A case ran past --timeout (a BaseException: the code under test must not swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _where(exc: BaseException) -> str:
    """The innermost stampline frame (else the innermost frame) of an exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}stampline{os.sep}" in f.filename]
    if not frames:
        return "?"
    def short(frame: traceback.FrameSummary) -> str:
        parts = Path(frame.filename).parts
        name = "/".join(parts[parts.index("stampline"):]) if "stampline" in parts else "/".join(parts[-2:])
        return f"{name}:{frame.lineno}"

    where = short((ours or frames)[-1])
    return where if not ours or ours[-1] is frames[-1] else f"{where} (in {short(frames[-1])})"


def _normal(text: str) -> str:
    return re.sub(r"\d+", "N", text)[:120]


@dataclass
class Finding:
    kind: str
    signature: str
    detail: str
    count: int
    first_case: int
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "signature": self.signature, "detail": self.detail, "count": self.count,
                "first_case": self.first_case, "input": self.path}


@dataclass
class Campaign:
    """Runs cases against one target, classifies what comes out, keeps one input per finding."""

    target: Target
    findings_dir: Path | None = None
    timeout: float = 10.0
    seed: int = 0
    engine: str = "mutate"
    cases: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    findings: dict[str, Finding] = field(default_factory=dict)
    seconds: float = 0.0
    slowest: float = 0.0

    def __post_init__(self) -> None:
        if self.timeout and hasattr(signal, "setitimer"):
            signal.signal(signal.SIGALRM, _on_alarm)

    def run_one(self, data: bytes) -> str:
        """Run one case; returns its outcome ("ok", a refusal's origin, or a finding's kind)."""
        self.cases += 1
        start = time.perf_counter()
        outcome = "ok"
        try:
            if self.timeout:
                signal.setitimer(signal.ITIMER_REAL, self.timeout)
            try:
                self.target.run(data)
            finally:
                if self.timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except Violation as v:
            outcome = self._found(v.kind, f"{v.kind}: {_normal(v.key)}", v.detail, data, v)
        except self.target.allowed as exc:
            where = _where(exc)
            outcome = f"{type(exc).__name__}@{where}"
            problem = message_problem(str(exc), self.target.internal_phrase)
            if problem:
                detail = f"{type(exc).__name__} at {where}: {problem[1]}: {str(exc)[:300]!r}"
                outcome = self._found(problem[0], f"{problem[0]}: {type(exc).__name__}@{where}", detail, data, exc)
        except Hang as exc:
            outcome = self._found("crash", f"crash: hang@{_where(exc)}",
                                  f"the case ran longer than {self.timeout} s (at {_where(exc)})", data, exc)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - this is what a fuzzer is for
            detail = f"{type(exc).__name__} at {_where(exc)}: {str(exc)[:300]!r}"
            outcome = self._found("crash", f"crash: {type(exc).__name__}@{_where(exc)}", detail, data, exc)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.slowest = max(self.slowest, elapsed)
        return outcome

    def _found(self, kind: str, signature: str, detail: str, data: bytes, exc: BaseException) -> str:
        self.counts[kind] += 1
        finding = self.findings.get(signature)
        if finding is not None:
            finding.count += 1
            return kind
        finding = self.findings[signature] = Finding(kind, signature, detail, 1, self.cases)
        if self.findings_dir is not None and len(self.findings) <= MAX_SAVED:
            folder = self.findings_dir / self.target.name
            folder.mkdir(parents=True, exist_ok=True)
            ignore = self.findings_dir / ".gitignore"
            if not ignore.exists():
                ignore.write_text("*\n")
            stem = folder / f"{kind}-{hashlib.sha1(signature.encode()).hexdigest()[:10]}"
            stem.with_suffix(".bin").write_bytes(data)
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            stem.with_suffix(".txt").write_text(
                f"target:    {self.target.name}\nkind:      {kind}\nsignature: {signature}\n"
                f"found by:  engine {self.engine}, seed {self.seed}, case {self.cases}\n"
                f"input:     {len(data)} bytes, hex {data.hex()[:4000]}\n"
                f"replay:    .venv/bin/python bench/fuzz.py --target {self.target.name} --replay {stem}.bin\n\n"
                f"{detail}\n\n{trace}")
            finding.path = str(stem.with_suffix(".bin"))
        return kind

    def summary(self) -> dict[str, Any]:
        return {"target": self.target.name, "engine": self.engine, "seed": self.seed, "cases": self.cases,
                "crashes": self.counts["crash"], "internal": self.counts["internal"],
                "messages": self.counts["message"], "seconds": round(self.seconds, 3),
                "slowest": round(self.slowest, 4), "findings": [f.to_dict() for f in self.findings.values()]}


# ------------------------------------------------------------------------ the built-in mutator

INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x40, 0x20, 0x0A, 0x00]
INTERESTING_WIDE = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0x401, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


class Mutator:
    """Seeded havoc mutations of a corpus (the seeds, plus inputs that reached a new outcome)."""

    MAX_CORPUS = 600

    def __init__(self, target: Target, seed: int) -> None:
        self.rng = random.Random(f"stampline-fuzz:{seed}:{target.name}")
        self.corpus = [bytes(s) for s in target.seeds]
        self.tokens = list(target.tokens) or [b"\0", b"\xff"]
        self.max_len = target.max_len
        self.outcomes: set[str] = set()

    def learn(self, data: bytes, outcome: str) -> None:
        if outcome not in self.outcomes:
            self.outcomes.add(outcome)
            if len(self.corpus) < self.MAX_CORPUS:
                self.corpus.append(data)

    def cases(self, count: int) -> Iterator[bytes]:
        first = self.corpus[:count]
        yield from first  # every seed runs as it is first
        for _ in range(count - len(first)):
            yield self.mutate(self.rng.choice(self.corpus))

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(1 << rng.randrange(4)):  # 1, 2, 4 or 8 stacked mutations
            self._one(out, rng)
        return bytes(out[: self.max_len])

    def _one(self, out: bytearray, rng: random.Random) -> None:
        op = rng.randrange(14)
        n = len(out)
        at = rng.randrange(n) if n else 0
        if op == 0 and n:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[at] = rng.choice(INTERESTING) if rng.randrange(2) else rng.randrange(256)
        elif op == 2 and n:
            out[at] = (out[at] + rng.choice((-2, -1, 1, 2, 16, -16))) & 0xFF
        elif op == 3:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 4 and n:
            del out[at: at + rng.randrange(1, 1 + min(64, n - at))]
        elif op == 5 and n:  # copy a range elsewhere
            length = rng.randrange(1, 1 + min(128, n - at))
            piece = out[at: at + length]
            where = rng.randrange(n + 1)
            if rng.randrange(2):
                out[where:where] = piece
            else:
                out[where: where + length] = piece
        elif op in (6, 7):
            token = rng.choice(self.tokens)
            if op == 6:
                out[at:at] = token
            else:
                out[at: at + len(token)] = token
        elif op == 8 and n:  # splice with another corpus entry
            other = rng.choice(self.corpus)
            cut = rng.randrange(len(other) + 1)
            out[at:] = other[cut:]
        elif op == 9 and n >= 2:  # an integer field: 16 or 32 bits, either byte order
            width = rng.choice((2, 4))
            value = rng.choice(INTERESTING_WIDE + [n, n - 1, n + 1, rng.randrange(1 << 32)]) & ((1 << 8 * width) - 1)
            at = min(at, max(0, n - width))
            out[at: at + width] = value.to_bytes(width, rng.choice(("little", "big")))
        elif op == 10 and n:
            del out[rng.randrange(n):]
        elif op == 11 and n:  # a run of one printable character class
            alphabet = rng.choice((b"0123456789", b"abcdefABCDEF", b" \t\n", b"{}[]:,-", bytes(range(0x20))))
            out[at: at + rng.randrange(1, 9)] = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 9)))
        elif op == 12 and n:  # the mode byte
            out[0] = rng.randrange(256)
        elif op == 13 and n:  # repeat a range (lengths, nesting, sizes)
            length = rng.randrange(1, 1 + min(32, n - at))
            out[at:at] = out[at: at + length] * rng.randrange(2, 64)


def run_mutate(target: Target, cases: int, seed: int, findings_dir: Path | None, timeout: float,
               progress: bool = False) -> dict[str, Any]:
    campaign = Campaign(target, findings_dir, timeout, seed, "mutate")
    mutator = Mutator(target, seed)
    started = time.monotonic()
    for number, data in enumerate(mutator.cases(cases), 1):
        mutator.learn(data, campaign.run_one(data))
        if progress and number % 5000 == 0:
            print(f"  {target.name}: {number}/{cases} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)
    result = campaign.summary()
    result["corpus"] = len(mutator.corpus)
    return result


# ---------------------------------------------------------------------------- atheris engine

def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _libfuzzer_seed(seed: int, name: str) -> int:
    return (zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF) | 1  # 0 would mean "random"


def _dictionary(tokens: list[bytes]) -> str:
    return "".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in tokens if token)


def atheris_worker(name: str, cases: int, seed: int, findings_dir: Path | None, timeout: float, work: Path,
                   result_path: Path) -> None:
    """One target under libFuzzer (this process is its own: libFuzzer exits when it is done)."""
    import atheris

    target = fuzz_targets.build(name)
    campaign = Campaign(target, findings_dir, timeout, seed, "atheris")
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for number, data in enumerate(target.seeds):
        (corpus / f"seed-{number:03d}").write_bytes(data)
    (work / "tokens.dict").write_text(_dictionary(target.tokens))
    started = time.monotonic()

    def flush() -> None:
        result = campaign.summary()
        result["wall"] = round(time.monotonic() - started, 1)
        result_path.write_text(json.dumps(result))

    def one(data: bytes) -> None:
        if campaign.cases >= cases:
            return
        campaign.run_one(data)
        if campaign.cases % 2000 == 0 or campaign.cases == cases:
            flush()
            if campaign.cases == cases and target.cleanup:
                target.cleanup()

    flush()
    atheris.instrument_all()
    argv = [sys.argv[0], str(corpus), f"-runs={cases}", f"-seed={_libfuzzer_seed(seed, name)}",
            f"-max_len={target.max_len}", f"-dict={work / 'tokens.dict'}", "-timeout=0", "-rss_limit_mb=6144",
            f"-artifact_prefix={work}{os.sep}", "-print_final_stats=1", "-reload=0"]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def run_atheris(name: str, cases: int, seed: int, findings_dir: Path | None, timeout: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"stampline-fuzz-{name}-"))
    result_path, log_path = work / "result.json", work / "libfuzzer.log"
    try:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--cases", str(cases),
                   "--seed", str(seed), "--timeout", str(timeout), "--work", str(work),
                   "--findings", str(findings_dir) if findings_dir else "-"]
        with open(log_path, "wb") as log:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"}).returncode
        result = json.loads(result_path.read_text()) if result_path.exists() else {
            "target": name, "engine": "atheris", "seed": seed, "cases": 0, "crashes": 0, "internal": 0,
            "messages": 0, "seconds": 0.0, "slowest": 0.0, "findings": []}
        log_text = log_path.read_text(errors="replace")
        coverage = re.findall(r"cov: (\d+) ft: (\d+)", log_text)
        if coverage:
            result["coverage"] = {"edges": int(coverage[-1][0]), "features": int(coverage[-1][1])}
        if rc != 0 or result["cases"] < cases:  # libFuzzer stopped the run: a signal, OOM, a Python-level abort
            artifacts = [p for p in work.iterdir() if p.name.split("-")[0] in ("crash", "oom", "timeout", "leak", "slow")]
            saved = None
            if artifacts and findings_dir is not None:
                (findings_dir / name).mkdir(parents=True, exist_ok=True)
                saved = findings_dir / name / f"worker-{artifacts[0].name}.bin"
                shutil.copy(artifacts[0], saved)
                (findings_dir / name / f"worker-{artifacts[0].name}.txt").write_text(log_text[-20000:])
            tail = " | ".join(log_text.strip().splitlines()[-3:])[-400:]
            result["crashes"] += 1
            result["findings"].append({"kind": "crash", "signature": f"crash: worker exit {rc}",
                                       "detail": f"the atheris worker stopped after {result['cases']} of {cases} "
                                                 f"cases (exit {rc}): {tail}",
                                       "count": 1, "first_case": result["cases"], "input": str(saved) if saved else None})
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------- reporting

def run_target(name: str, engine: str, cases: int, seed: int, findings_dir: Path | None, timeout: float,
               progress: bool = False) -> dict[str, Any]:
    if engine == "atheris":
        return run_atheris(name, cases, seed, findings_dir, timeout)
    target = fuzz_targets.build(name)
    try:
        return run_mutate(target, cases, seed, findings_dir, timeout, progress)
    finally:
        if target.cleanup:
            target.cleanup()


def _row(cells: list[Any], widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


WIDTHS = [15, 9, 8, 9, 9, 8, 9, 9]
HEADER = ["target", "cases", "crashes", "internal", "messages", "unique", "seconds", "cases/s"]


def print_row(result: dict[str, Any]) -> None:
    rate = result["cases"] / result["seconds"] if result["seconds"] else 0.0
    print(_row([result["target"], f"{result['cases']:,}", result["crashes"], result["internal"], result["messages"],
                len(result["findings"]), f"{result['seconds']:.1f}", f"{rate:,.0f}"], WIDTHS), flush=True)


def print_findings(results: list[dict[str, Any]]) -> None:
    for result in results:
        for finding in result["findings"]:
            where = f"\n      input: {finding['input']}" if finding.get("input") else ""
            print(f"  {result['target']}: {finding['kind']} x{finding['count']}: {finding['detail'][:400]}{where}")


def replay(name: str, path: Path, timeout: float) -> int:
    target = fuzz_targets.build(name)
    campaign = Campaign(target, None, timeout, engine="replay")
    data = path.read_bytes()
    target_run = target.run
    try:
        target_run(data)
        print(f"{name}: the input runs without an exception.")
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc()
        print(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
    outcome = campaign.run_one(data)
    print(f"{name}: outcome {outcome}; {campaign.counts}")
    if target.cleanup:
        target.cleanup()
    return 1 if any(campaign.counts.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help="cases per target (default 100,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="only this target (repeatable)")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--findings", default=str(DEFAULT_FINDINGS), help="where to save inputs ('-': nowhere)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--replay", metavar="FILE", help="run one saved input against --target")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    findings_dir = None if args.findings == "-" else Path(args.findings)

    if args.worker:
        atheris_worker(args.worker, args.cases, args.seed, findings_dir, args.timeout, Path(args.work),
                       Path(args.work) / "result.json")
        return 0
    if args.replay:
        if not args.target or len(args.target) != 1:
            parser.error("--replay needs exactly one --target")
        return replay(args.target[0], Path(args.replay), args.timeout)

    engine = args.engine
    if engine == "auto":
        engine = "atheris" if atheris_available() else "mutate"
    elif engine == "atheris" and not atheris_available():
        parser.error("atheris is not installed (pip install atheris, or --engine mutate)")
    names = args.target or list(TARGETS)
    print(f"fuzz campaign: engine {engine}, seed {args.seed}, {args.cases:,} cases per target; "
          f"target: >= {DEFAULT_CASES:,} cases per target, 0 crashes, 0 internal errors, 0 bad messages")
    print(_row(HEADER, WIDTHS))
    results = []
    for name in names:
        result = run_target(name, engine, args.cases, args.seed, findings_dir, args.timeout, args.progress)
        results.append(result)
        print_row(result)
    total = {"target": "total", "cases": sum(r["cases"] for r in results),
             "crashes": sum(r["crashes"] for r in results), "internal": sum(r["internal"] for r in results),
             "messages": sum(r["messages"] for r in results), "seconds": sum(r["seconds"] for r in results),
             "findings": [f for r in results for f in r["findings"]]}
    print_row(total)
    if total["findings"]:
        print("\nfindings (one input each, replay with --replay):")
        print_findings(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"engine": engine, "seed": args.seed, "results": results,
                                               "total": {k: v for k, v in total.items() if k != "findings"}}, indent=2))
    failed = total["crashes"] + total["internal"] + total["messages"]
    short = [r["target"] for r in results if r["cases"] < args.cases]
    if short:
        print(f"\nthese targets ran short of {args.cases:,} cases: {', '.join(short)}")
    return 1 if failed or short else 0


if __name__ == "__main__":
    sys.exit(main())
