"""Golden envelope vectors: the files match the code, and the generator reproduces the files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from p2pfm.core.envelope import EnvelopeLimits, ReplayGuard, open_envelope, seal
from p2pfm.core.errors import Reject, RejectReason

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors"
CASES = sorted(p for p in (VECTORS / "envelope").iterdir() if p.is_dir())


def load_generator():
    name = "p2pfm_vectors_generate_envelope"
    spec = importlib.util.spec_from_file_location(name, VECTORS / "generate_envelope.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def run_case(folder: Path):
    """Open a case as its README describes; return (envelope or None, reject or None)."""
    data = bytes.fromhex((folder / "envelope.hex").read_text().strip())
    context = json.loads((folder / "context.json").read_text())
    limits = EnvelopeLimits(**context.get("limits", {}))
    guard = ReplayGuard(window_s=limits.replay_window_s)
    for seen in context.get("replay_seen", []):
        guard.check_and_record(bytes.fromhex(seen["sender"]), seen["seq"], seen["timestamp"], context["now"])
    try:
        env = open_envelope(
            data, run_id=context["run_id"], now=context["now"], limits=limits, replay_guard=guard
        )
    except Reject as exc:
        return None, exc
    return env, None


def test_vector_folder_holds_all_generated_cases():
    """Every case the generator defines is on disk, and nothing else."""
    assert [c.name for c in CASES] == sorted(case.name for case in generator.CASES)


@pytest.mark.parametrize("folder", CASES, ids=[c.name for c in CASES])
def test_vector_outcome_matches_expected(folder):
    """Opening envelope.hex in its context gives exactly expected.json."""
    expected = json.loads((folder / "expected.json").read_text())
    env, reject = run_case(folder)
    if expected["outcome"] == "accept":
        assert reject is None, f"rejected: {reject}"
        assert generator.json_view(env) == expected["decoded"]
    else:
        assert expected["outcome"] == "reject"
        assert env is None, "accepted a message expected to be rejected"
        assert reject.reason == RejectReason(expected["reason"])


@pytest.mark.parametrize("folder", [c for c in CASES if c.name.startswith("accept_")], ids=lambda c: c.name)
def test_accepted_vectors_reseal_to_the_same_bytes(folder):
    """Sealing the decoded fields with the test key reproduces envelope.hex byte for byte."""
    env, _ = run_case(folder)
    data = seal(
        generator.load_test_identity(),
        kind=env.kind,
        run_id=env.run_id,
        round=env.round,
        seq=env.seq,
        timestamp=env.timestamp,
        payload=env.payload,
    )
    assert data.hex() == (folder / "envelope.hex").read_text().strip()


def test_vectors_cover_every_envelope_reject_reason():
    """Each reason open_envelope can raise has at least one vector."""
    reasons = {json.loads((c / "expected.json").read_text()).get("reason") for c in CASES}
    envelope_reasons = {
        RejectReason.OVERSIZE,
        RejectReason.MALFORMED,
        RejectReason.SCHEMA,
        RejectReason.UNKNOWN_VERSION,
        RejectReason.UNKNOWN_KIND,
        RejectReason.WRONG_RUN,
        RejectReason.BAD_SIGNATURE,
        RejectReason.REPLAY,
        RejectReason.CLOCK_SKEW,
        RejectReason.NON_FINITE,
    }
    assert {r.value for r in envelope_reasons} <= reasons


def test_regenerating_vectors_gives_identical_files(tmp_path):
    """The generator rewrites every file byte for byte (Ed25519 is deterministic)."""
    written = generator.write_vectors(tmp_path)
    for path in written:
        committed = VECTORS / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from a fresh generation"
    on_disk = {p.relative_to(VECTORS) for p in (VECTORS / "envelope").rglob("*") if p.is_file()}
    generated = {p.relative_to(tmp_path) for p in written if p.parts[-2:] != ("vectors", "test_key.pem")}
    assert on_disk <= generated


def test_test_key_file_is_marked_test_only_and_matches_the_generator():
    """test_key.pem says TEST-ONLY and holds the key the vectors are signed with."""
    from cryptography.hazmat.primitives import serialization

    text = (VECTORS / "test_key.pem").read_bytes()
    assert text.startswith(b"TEST-ONLY KEY")
    key = serialization.load_pem_private_key(text, password=None)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert raw == generator.load_test_identity().private_bytes()
