"""Golden transfer vectors (wire.md section 6): the files match the code, and the generator reproduces them."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from p2pfm.core.errors import IgnoreReason, Refusal, RejectReason

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors"
ROOT = VECTORS / "transfer"
CASES = sorted(p for p in ROOT.iterdir() if p.is_dir())
WIRE_MD = VECTORS.parent / "wire.md"


def load_generator():
    name = "p2pfm_vectors_generate_transfer"
    spec = importlib.util.spec_from_file_location(name, VECTORS / "generate_transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def run_folder(folder: Path):
    """Run a case as its README says; return (context, peer, result or None, refusal or None)."""
    context = read(folder, "context.json")
    peer = generator.receiver(context)
    data = generator.read_input(folder, context["group"])
    try:
        return context, peer, generator.run_case(context, data, peer), None
    except Refusal as exc:
        return context, peer, None, exc


def test_vector_folder_holds_all_generated_cases():
    """Every case the generator defines is on disk, and nothing else."""
    assert [c.name for c in CASES] == sorted(case.name for case in generator.CASES)


@pytest.mark.parametrize("folder", CASES, ids=[c.name for c in CASES])
def test_vector_outcome_matches_expected(folder):
    """Running the case in its context gives exactly expected.json (result, or reason and reject/ignore)."""
    expected = read(folder, "expected.json")
    _, _, result, refusal = run_folder(folder)
    if expected["outcome"] == "accept":
        assert refusal is None, f"refused: {refusal}"
        assert result == expected["result"]
        return
    assert result is None, "accepted a case expected to be refused"
    assert refusal.reason.value == expected["reason"]
    assert refusal.lowers_score is (expected["outcome"] == "reject")
    kind = RejectReason if expected["outcome"] == "reject" else IgnoreReason
    assert isinstance(refusal.reason, kind)


@pytest.mark.parametrize("folder", [c for c in CASES if c.name.startswith("update_")], ids=lambda c: c.name)
def test_update_refusals_score_the_sender_as_wire_md_says(folder):
    """receive_update counts its own refusals: a reject adds one rejection (against the transport
    for envelope rules, against the signing key after them), an ignore none."""
    expected = read(folder, "expected.json")
    context, peer, _, _ = run_folder(folder)
    added = 1 if expected["outcome"] == "reject" else 0
    assert sum(peer.scores.rejections.values()) == added
    assert peer.scores.is_banned(context["remote"], context["now"]) is bool(context["banned"])
    counted = {"accept": {}, "reject": peer.scores.rejected, "ignore": peer.scores.ignored}[
        expected["outcome"]
    ]
    assert dict(counted) == ({expected["reason"]: 1} if "reason" in expected else {})
    assert peer.accepted == (expected["outcome"] == "accept")


REQUIRED = {
    "stream": {"accept", "wrong_kind"},
    "update": {
        "accept",
        "banned",
        "wrong_kind",
        "bad_update",
        "stale_round",
        "future_round",
        "shape_mismatch",
    },
    "manifest": {"accept", "wrong_kind", "not_donor", "bad_manifest", "oversize"},
    "chunk": {"accept", "hash_mismatch"},
    "state": {"accept", "hash_mismatch", "malformed", "schema", "shape_mismatch", "bad_state"},
    "want": {"accept", "bad_index", "schema"},
    "params": {"accept", "replay", "wrong_kind", "not_donor", "shape_mismatch"},
    "announce": {"accept", "malformed", "clock_skew", "wrong_kind", "subkey_mismatch"},
}


def test_vectors_cover_every_rule_of_each_group():
    """Each group has an accept case and a case for every reason its rules name."""
    seen: dict[str, set[str]] = {}
    for folder in CASES:
        expected = read(folder, "expected.json")
        seen.setdefault(read(folder, "context.json")["group"], set()).add(expected.get("reason", "accept"))
    assert {group: REQUIRED[group] - seen.get(group, set()) for group in REQUIRED} == {
        g: set() for g in REQUIRED
    }


def tags(text: str) -> set[tuple[str, str]]:
    """The ([REJECT]/[IGNORE], REASON) pairs a spec text tags, e.g. "[REJECT] `WRONG_KIND`"."""
    return {(o, r.upper()) for o, r in re.findall(r"\[(REJECT|IGNORE)\] `([A-Za-z_]+)`", text)}


def test_the_specs_tag_every_reason_the_vectors_use():
    """Every refusal in the vectors is a tagged rule of wire.md section 6, or of the envelope
    (section 3) and codec (codecs.md) rules it invokes; the reasons new to section 6 are tagged there."""
    wire = WIRE_MD.read_text()
    section6 = wire.split("\n## 6.", 1)[1].split("\n## ", 1)[0]
    section3 = wire.split("\n## 3.", 1)[1].split("\n## ", 1)[0]
    known = tags(section6) | tags(section3) | tags((VECTORS.parent / "codecs.md").read_text())
    used = {
        (read(c, "expected.json")["outcome"].upper(), read(c, "expected.json").get("reason", "").upper())
        for c in CASES
        if read(c, "expected.json")["outcome"] != "accept"
    }
    assert used - known == set()
    envelope_or_codec = {
        "OVERSIZE",
        "MALFORMED",
        "SCHEMA",
        "BAD_SIGNATURE",
        "REPLAY",
        "CLOCK_SKEW",
        "SHAPE_MISMATCH",
        "UNKNOWN_CODEC",
    }
    assert {pair for pair in used if pair[1] not in envelope_or_codec} - tags(section6) == set()


def test_regenerating_vectors_gives_identical_files(tmp_path):
    """The generator rewrites every file byte for byte (fixed clocks and nonces, deterministic Ed25519)."""
    written = generator.write_vectors(tmp_path)
    for path in written:
        committed = VECTORS / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from a fresh generation"
    on_disk = {p.relative_to(VECTORS) for p in ROOT.rglob("*") if p.is_file()}
    assert on_disk == {p.relative_to(tmp_path) for p in written}


def test_vectors_are_signed_by_the_test_key_file():
    """The donor key of the vectors is the key in test_key.pem; the stranger's is another."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((VECTORS / "test_key.pem").read_bytes(), password=None)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert raw == generator.DONOR.private_bytes()
    assert generator.STRANGER.public_key_bytes != generator.DONOR.public_key_bytes
    assert read(ROOT / "params_accept", "context.json")["donor_key"] == generator.DONOR.public_key_bytes.hex()
