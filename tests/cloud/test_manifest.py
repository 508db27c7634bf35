"""Bulk manifests: export from a real station ledger, verification of every kind of corruption
(reported per entry), import through a registrar with a durable, resumable progress record."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import run_cli
from stampline import recipe as recipes
from stampline.cli import main as cli_main, manifest_cmd
from stampline.cloud import manifest as mf
from stampline.device.emulator import DeviceOptions, Emulator
from stampline.device.timing import TimingModel
from stampline.errors import StamplineError
from stampline.station.ledger import Ledger
from stampline.station.line import open_station, run_line
from stampline.workspace import Workspace


@dataclass(frozen=True)
class Built:
    workspace: Workspace
    manifest: Path
    pubkey: Path
    rows: list[dict[str, Any]]
    sub_ca: x509.Certificate


@pytest.fixture(scope="module")
def built(ca_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A copy of the CA workspace with 3 devices provisioned in batch 1, 1 in batch 2, exported."""
    root = tmp_path_factory.mktemp("manifest") / "ws"
    shutil.copytree(ca_workspace.root, root)
    conf = root / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(ca_workspace.root), str(root.resolve())))
    workspace = Workspace.at(root)
    recipe = recipes.parse(recipes.TEMPLATE)
    with Emulator(workspace.devices_dir, TimingModel(0)) as emulator:
        for count in (3, 1):
            devices = emulator.add_new(count, DeviceOptions())
            with open_station(workspace, recipe) as context:
                assert {r.outcome for r in run_line(context, [d.port for d in devices])} == {"provisioned"}
    with Ledger.open_readonly(workspace.ledger_path) as ledger:
        rows = list(ledger.export())
    out, pubkey = root.parent / "m.json", root.parent / "m.pem"
    mf.export_manifest(workspace, out, pubkey_out=pubkey)
    sub_ca = x509.load_pem_x509_certificate(workspace.sub_cert_path.read_bytes())
    return Built(workspace, out, pubkey, rows, sub_ca)


class SoftSigner:
    """An ES256 key in memory: 'another key' for the tests."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = self.key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


class MemoryRegistrar:
    """An in-memory registry: idempotent by certificate, optionally failing on the n-th call."""

    name = "memory"

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.fail_on_call = fail_on_call
        self.calls: list[str] = []
        self.devices: dict[str, str] = {}

    def register_device(self, serial: str, certificate_pem: str, ca_certificate_pem: str | None) -> str:
        self.calls.append(serial)
        if self.fail_on_call == len(self.calls):
            raise StamplineError("the registry is unreachable.")
        assert ca_certificate_pem and "BEGIN CERTIFICATE" in ca_certificate_pem
        return self.devices.setdefault(certificate_pem, "reg-" + hashlib.sha256(certificate_pem.encode()).hexdigest()[:12])


def decode(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def encode(value: Any) -> str:
    return mf.b64url(json.dumps(value, separators=(",", ":")).encode())


def document(built: Built) -> dict[str, Any]:
    return json.loads(built.manifest.read_bytes())


def check(built: Built, data: bytes, ca: x509.Certificate | None = None) -> mf.VerifyReport:
    return mf.check_manifest(data, mf.load_public_key(built.pubkey), ca)


def dumped(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- export and verify

def test_good_manifest_exports_and_verifies(built: Built) -> None:
    doc = document(built)
    provisioned = [r for r in built.rows if r["state"] == "provisioned"]
    assert len(provisioned) == 4 and len(doc["entries"]) == 4
    report = mf.verify_manifest(built.manifest, mf.load_public_key(built.pubkey), built.sub_ca)
    assert report.ok and report.problems == [] and report.declared == 4
    assert [e.unique_id for e in report.entries] == [r["chip_id"] for r in provisioned]

    header = decode(doc["header"]["payload"])
    assert header["count"] == 4 and header["station"] == built.workspace.config().station_id
    # the header's head is the hash of the last entry's signing input, each entry chains to the one before
    links = [mf.b64url(hashlib.sha256(f"{e['protected']}.{e['payload']}".encode()).digest()) for e in doc["entries"]]
    assert header["head"] == links[-1]
    payloads = [decode(e["payload"]) for e in doc["entries"]]
    assert [p["prev"] for p in payloads[1:]] == links[:-1]
    assert [p["seq"] for p in payloads] == [0, 1, 2, 3]

    first, row = payloads[0], provisioned[0]
    assert (first["uniqueId"], first["serial"], first["batch"]) == (row["chip_id"], row["serial"], row["batch"])
    assert first["provisioningTime"] == row["provisioned_at"] and first["station"] == header["station"]
    assert doc["entries"][0]["header"] == {"uniqueId": row["chip_id"]}
    jwk = first["publicKeySet"]["keys"][0]
    cert = x509.load_der_x509_certificate(base64.b64decode(jwk["x5c"][0]))
    assert cert.public_bytes(serialization.Encoding.PEM).decode() == row["certificate"]
    assert base64.b64decode(jwk["x5c"][1]) == built.sub_ca.public_bytes(serialization.Encoding.DER)
    numbers = cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    assert base64.urlsafe_b64decode(jwk["x"] + "=") == numbers.x.to_bytes(32, "big")  # type: ignore[union-attr]

    protected = decode(doc["entries"][0]["protected"])
    assert protected == {"alg": "ES256", "typ": mf.ENTRY_TYPE, "kid": mf.jwk_thumbprint(mf.load_public_key(built.pubkey))}


def test_manifest_key_lives_in_the_station_token(built: Built) -> None:
    config = built.workspace.config()
    uri = config.keys["manifest"]
    assert uri.token == config.keys["sub_ca"].token and uri.object == "manifest"
    token, label = config.key_token("manifest")
    assert token.private_key_attributes(label)["extractable"] is False
    exported = mf.load_public_key(built.pubkey)
    assert mf.jwk_thumbprint(token.public_key(label)) == mf.jwk_thumbprint(exported)  # type: ignore[arg-type]
    # a second export reuses the key
    again = built.manifest.parent / "again.json"
    report = mf.export_manifest(built.workspace, again, batch=2, pubkey_out=again.with_suffix(".jwk"))
    assert report.count == 1 and report.kid == mf.jwk_thumbprint(exported)
    assert mf.load_public_key(again.with_suffix(".jwk")).public_numbers() == exported.public_numbers()
    assert mf.verify_manifest(again, exported).ok


def test_jwk_thumbprint_matches_rfc7638_example() -> None:
    # the RFC 7638 section 3.1 example is RSA; this checks the same rule on an EC key by hand
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = mf.public_jwk(key)
    text = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (jwk["x"], jwk["y"])
    assert mf.jwk_thumbprint(key) == mf.b64url(hashlib.sha256(text.encode()).digest())


def _without_last(doc: dict[str, Any]) -> None:
    doc["entries"].pop()


def _swap(doc: dict[str, Any]) -> None:
    e = doc["entries"]
    e[1], e[2] = e[2], e[1]


def _duplicate(doc: dict[str, Any]) -> None:
    doc["entries"].append(copy.deepcopy(doc["entries"][1]))


def _remove_middle(doc: dict[str, Any]) -> None:
    del doc["entries"][1]


def _alter_payload(doc: dict[str, Any]) -> None:
    entry = doc["entries"][2]
    payload = decode(entry["payload"])
    payload["serial"] = payload["serial"][:-1] + ("0" if payload["serial"][-1] != "0" else "1")
    entry["payload"] = encode(payload)


def _swap_certificate(doc: dict[str, Any]) -> None:
    entry = doc["entries"][0]
    payload = decode(entry["payload"])
    other = decode(doc["entries"][3]["payload"])
    payload["publicKeySet"]["keys"][0]["x5c"][0] = other["publicKeySet"]["keys"][0]["x5c"][0]
    entry["payload"] = encode(payload)


def _flip_signature(doc: dict[str, Any]) -> None:
    entry = doc["entries"][3]
    raw = bytearray(base64.urlsafe_b64decode(entry["signature"] + "=="))
    raw[10] ^= 1
    entry["signature"] = mf.b64url(bytes(raw))


# name -> (mutation, {index: words in its sentence}, words of a whole-manifest problem or None)
CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], dict[int, str], str | None]] = {
    "truncated-last": (_without_last, {}, "entry 3 is missing"),
    "reordered": (_swap, {1: "sequence number 2", 2: "sequence number 1"}, None),
    "duplicated": (_duplicate, {4: "repeats the unique id of entry 1"}, "holds 5 entries but its header declares 4"),
    "removed-middle": (_remove_middle, {1: "sequence number 2", 2: "sequence number 3"}, "entry 3 is missing"),
    "altered-payload": (_alter_payload, {2: "signature does not verify"}, None),
    "swapped-certificate": (_swap_certificate, {0: "signature does not verify"}, None),
    "altered-signature": (_flip_signature, {3: "signature does not verify"}, None),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_each_corruption_is_reported_by_entry(built: Built, case: str) -> None:
    mutate, expected, whole = CORRUPTIONS[case]
    doc = document(built)
    ids = [decode(e["payload"])["uniqueId"] for e in doc["entries"]]
    mutate(doc)
    report = check(built, dumped(doc))
    assert not report.ok
    by_index = {p.index: p for p in report.problems if p.message.startswith("Entry ")}
    assert sorted(by_index) == sorted(expected), [str(p) for p in report.problems]
    for index, words in expected.items():
        problem = by_index[index]
        shown_id = decode(doc["entries"][index]["payload"])["uniqueId"] if index < len(doc["entries"]) else None
        assert words in problem.message and f"Entry {index} (uniqueId {shown_id})" in problem.message
        assert problem.unique_id == shown_id and shown_id in ids
        assert problem.message.count(". ") == 0 and problem.message.endswith(".")
    others = [p.message for p in report.problems if not p.message.startswith("Entry ")]
    if whole is None:
        assert others == []
    else:
        assert len(others) == 1 and whole in others[0]


def test_cut_file_is_one_sentence(built: Built) -> None:
    data = built.manifest.read_bytes()
    report = check(built, data[: len(data) * 2 // 3])
    assert [str(p) for p in report.problems] == [
        "The manifest file is unreadable: it is not valid JSON (cut short or corrupt)."]


def test_manifest_signed_by_another_key_fails_everywhere(built: Built) -> None:
    rows = [r for r in built.rows if r["state"] == "provisioned"]
    data = mf.build_manifest(rows, built.sub_ca, SoftSigner(), "evil-station")
    report = check(built, data)
    assert [p.index for p in report.problems] == [None, 0, 1, 2, 3]
    assert all("signed by another key" in p.message for p in report.problems)
    assert report.problems[0].message.startswith("The manifest header is bad")


def test_signed_but_inconsistent_entries_are_caught(built: Built) -> None:
    """What the signature cannot vouch for: a station bug pairing a certificate with another device."""
    signer = SoftSigner()
    rows = [dict(r) for r in built.rows if r["state"] == "provisioned"]
    rows[1]["certificate"], rows[2]["certificate"] = rows[2]["certificate"], rows[1]["certificate"]
    data = mf.build_manifest(rows, built.sub_ca, signer, "station")
    report = mf.check_manifest(data, signer.public_key, built.sub_ca)
    assert {p.index: p.message for p in report.problems}.keys() == {1, 2}
    assert all("is not the CN of its device certificate" in p.message for p in report.problems)


def test_device_certificates_must_chain_to_the_given_sub_ca(built: Built) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Another Sub CA")])
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
             .sign(key, hashes.SHA256()))
    report = check(built, built.manifest.read_bytes(), ca=other)
    assert [p.index for p in report.problems] == [0, 1, 2, 3]
    assert all("is not the given Sub CA" in p.message for p in report.problems)


def test_export_refuses_an_empty_batch(built: Built, tmp_path: Path) -> None:
    with pytest.raises(StamplineError, match="no provisioned device in batch 9"):
        mf.export_manifest(built.workspace, tmp_path / "x.json", batch=9)
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- import

def test_import_registers_every_entry_once(built: Built, tmp_path: Path) -> None:
    registrar, progress = MemoryRegistrar(), tmp_path / "progress.jsonl"
    key = mf.load_public_key(built.pubkey)
    report = mf.import_manifest(built.manifest, key, registrar, progress, built.sub_ca)
    serials = [decode(e["payload"])["serial"] for e in document(built)["entries"]]
    assert registrar.calls == serials and (report.registered, report.already, report.total) == (4, 0, 4)
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["registryId"] for line in lines] == list(report.registry_ids.values())
    again = mf.import_manifest(built.manifest, key, registrar, progress)
    assert (again.registered, again.already) == (0, 4) and len(registrar.calls) == 4


def test_interrupted_import_resumes_without_registering_twice(built: Built, tmp_path: Path) -> None:
    progress, key, k = tmp_path / "progress.jsonl", mf.load_public_key(built.pubkey), 2
    failing = MemoryRegistrar(fail_on_call=k + 1)
    with pytest.raises(StamplineError, match="unreachable"):
        mf.import_manifest(built.manifest, key, failing, progress)
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(k))
    serials = [decode(e["payload"])["serial"] for e in document(built)["entries"]]
    resumed = MemoryRegistrar()
    report = mf.import_manifest(built.manifest, key, resumed, progress)
    assert resumed.calls == serials[k:] and (report.registered, report.already) == (4 - k, k)
    assert [json.loads(line)["index"] for line in progress.read_text().splitlines()] == [0, 1, 2, 3]


def test_torn_progress_line_is_cut_and_that_entry_registered_again(built: Built, tmp_path: Path) -> None:
    progress, key = tmp_path / "progress.jsonl", mf.load_public_key(built.pubkey)
    with pytest.raises(StamplineError):
        mf.import_manifest(built.manifest, key, MemoryRegistrar(fail_on_call=2), progress)
    with progress.open("a") as f:
        f.write('{"manifestId":"')  # a crash while appending the second line
    resumed = MemoryRegistrar()
    report = mf.import_manifest(built.manifest, key, resumed, progress)
    assert len(resumed.calls) == 3 and report.already == 1
    assert len(progress.read_text().splitlines()) == 4


def test_bad_manifest_imports_nothing(built: Built, tmp_path: Path) -> None:
    doc = document(built)
    _swap(doc)
    bad, progress = tmp_path / "bad.json", tmp_path / "progress.jsonl"
    bad.write_bytes(dumped(doc))
    registrar = MemoryRegistrar()
    with pytest.raises(mf.ManifestRejected) as caught:
        mf.import_manifest(bad, mf.load_public_key(built.pubkey), registrar, progress)
    assert [p.index for p in caught.value.problems] == [1, 2]
    assert registrar.calls == [] and not progress.exists()


def test_progress_of_another_manifest_is_refused(built: Built, tmp_path: Path) -> None:
    progress, key = tmp_path / "progress.jsonl", mf.load_public_key(built.pubkey)
    progress.write_text(json.dumps({"manifestId": "other", "registrar": "memory", "index": 0,
                                    "uniqueId": "x", "registryId": "r"}) + "\n")
    registrar = MemoryRegistrar()
    with pytest.raises(StamplineError, match="belongs to another import"):
        mf.import_manifest(built.manifest, key, registrar, progress)
    assert registrar.calls == []


# ---------------------------------------------------------------- command line

@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    if manifest_cmd not in cli_main.COMMANDS:  # until the lead wires the group into main
        monkeypatch.setattr(cli_main, "COMMANDS", (*cli_main.COMMANDS, manifest_cmd))

    def run(*args: str) -> tuple[int, str, str]:
        code = cli_main.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_cli_export_verify_import(built: Built, tmp_path: Path, cli: Callable[..., tuple[int, str, str]],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out, pub = tmp_path / "b1.json", tmp_path / "b1.jwk"
    code, stdout, err = cli("manifest", "export", "--workdir", str(built.workspace.root), "--batch", "1",
                            "--out", str(out), "--pubkey-out", str(pub), "--json")
    assert code == 0, err
    assert json.loads(stdout)["count"] == 3
    code, stdout, err = cli("manifest", "verify", str(out), "--pubkey", str(pub),
                            "--ca", str(built.workspace.sub_cert_path))
    assert code == 0 and "3 entries" in stdout, err
    registrar = MemoryRegistrar()
    monkeypatch.setattr(manifest_cmd, "make_registrar", lambda args: registrar)
    code, stdout, err = cli("manifest", "import", str(out), "--pubkey", str(pub), "--json")
    assert code == 0, err
    assert json.loads(stdout)["registered"] == 3 and len(registrar.calls) == 3
    assert Path(f"{out}.progress.jsonl").exists()


def test_cli_reports_each_bad_entry(built: Built, tmp_path: Path, cli: Callable[..., tuple[int, str, str]]) -> None:
    doc = document(built)
    _swap(doc)
    bad = tmp_path / "bad.json"
    bad.write_bytes(dumped(doc))
    code, stdout, err = cli("manifest", "verify", str(bad), "--pubkey", str(built.pubkey))
    lines = err.splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[0].startswith("Entry 1 (uniqueId ") and lines[1].startswith("Entry 2 (uniqueId ")
    code, stdout, _ = cli("manifest", "verify", str(bad), "--pubkey", str(built.pubkey), "--json")
    assert code == 1 and [p["index"] for p in json.loads(stdout)["problems"]] == [1, 2]


@pytest.mark.parametrize("args, words", [
    (("manifest", "verify", "{m}", "--pubkey", "{missing}"), "cannot read the public key"),
    (("manifest", "verify", "{m}", "--pubkey", "{ca}"), "neither a PEM public key nor a JWK"),
    (("manifest", "verify", "{m}", "--pubkey", "{m}"), "not a valid EC P-256 JWK"),
    (("manifest", "verify", "{missing}", "--pubkey", "{pub}"), "cannot read the manifest"),
    (("manifest", "verify", "{m}", "--pubkey", "{pub}", "--ca", "{m}"), "not a well-formed X.509 certificate"),
    (("manifest", "export", "--workdir", "{ws}", "--out", "{out}", "--batch", "0"), "must be at least 1"),
    (("manifest", "export", "--workdir", "{missing}", "--out", "{out}"), "there is no workspace"),
    (("manifest", "import", "{m}", "--pubkey", "{pub}"), "choose where to import"),
])
def test_cli_bad_input_is_one_sentence(built: Built, tmp_path: Path, cli: Callable[..., tuple[int, str, str]],
                                       args: tuple[str, ...], words: str) -> None:
    values = {"m": str(built.manifest), "pub": str(built.pubkey), "missing": str(tmp_path / "nope"),
              "ws": str(built.workspace.root), "ca": str(built.workspace.sub_cert_path), "out": str(tmp_path / "o.json")}
    code, stdout, err = cli(*(a.format(**values) for a in args))
    assert code != 0 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_import_into_the_local_endpoint_registry(tmp_path: Path, built: Built) -> None:
    """The CLI wiring: `manifest import --local-endpoint` registers every entry with the endpoint's registry."""
    from stampline import ceremony
    from stampline.cloud.endpoint import Endpoint
    from stampline.cloud.verification import verification_certificate

    ledger_ws, out, pub = built.workspace, built.manifest, built.pubkey
    endpoint = Endpoint(tmp_path / "cloud")
    endpoint.files.create(free_port_for_test())
    registry = endpoint.registry()
    try:
        token, label = ledger_ws.config().key_token("sub_ca")
        sub = ceremony.load_sub(ledger_ws)
        registry.register_ca(sub, verification_certificate(sub, token.signer(label), registry.registration_code()))
    finally:
        registry.close()
    done = run_cli("manifest", "import", str(out), "--pubkey", str(pub), "--local-endpoint",
                   "--workdir", str(tmp_path / "cloud"), "--progress", str(tmp_path / "p.jsonl"))
    assert done.returncode == 0, done.stderr
    states = {d.serial: d.state for d in endpoint.devices()}
    assert len(states) == len(built.rows) and set(states.values()) == {"ACTIVE"}


def free_port_for_test() -> int:
    from stampline.cloud.broker import free_port
    return free_port()
