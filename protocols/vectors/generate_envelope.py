"""Regenerate the golden envelope vectors in ``protocols/vectors/envelope/``.

    python protocols/vectors/generate_envelope.py [OUT_DIR]   # default: this folder

Writes ``OUT_DIR/test_key.pem`` and one folder per case under ``OUT_DIR/envelope/`` with
``envelope.hex`` (the wire bytes), ``context.json`` (the receiver's run id, clock, limits and
replay memory) and ``expected.json`` (accept + decoded fields, or reject + reason).
Ed25519 signatures are deterministic (RFC 8032), so running it twice gives identical files;
``tests/test_envelope_vectors.py`` checks that, and checks every case against
:func:`p2pfm.core.envelope.open_envelope`.

The key is TEST-ONLY: its seed is public (below), so it proves nothing about anybody.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfm.core.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    pack_body,
    pack_wire,
    seal,
    signing_bytes,
)
from p2pfm.core.identity import Identity

VECTORS_DIR = Path(__file__).resolve().parent
TEST_KEY_SEED = hashlib.sha256(b"p2pfm TEST-ONLY vector key v1").digest()
OTHER_KEY_SEED = hashlib.sha256(b"p2pfm TEST-ONLY vector key v1 (other)").digest()
RUN = "vector-run"
NOW = 1_700_000_000.0
TS = NOW + 0.25

TEST_KEY_NOTE = (
    "TEST-ONLY KEY for the golden vectors in protocols/vectors/. Its seed is public\n"
    "(SHA-256 of b'p2pfm TEST-ONLY vector key v1', see generate_envelope.py), so anyone can\n"
    "sign with it: never use it for a real peer. It is deliberately not mode 0600, so\n"
    "Identity.load refuses it; tests read it with load_test_identity().\n\n"
)

README = """\
# Envelope vectors

Golden cases for `protocols/wire.md` (the signed envelope). Each folder is one case:

- `envelope.hex`: the message bytes, hex, one line.
- `context.json`: the receiver's state: `run_id`, `now` (unix seconds), optional `limits`
  (fields of `EnvelopeLimits`) and optional `replay_seen` (`[{sender, seq, timestamp}]`
  recorded in a `ReplayGuard(window_s=limits.replay_window_s)` before the case is opened).
- `expected.json`: `{"outcome": "accept", "decoded": {...}}` with the wire field names and
  bytes as lowercase hex, or `{"outcome": "reject", "reason": "<RejectReason value>"}`;
  `description` says what the case exercises.

To run a case: build the limits and guard from `context.json`, call
`open_envelope(bytes.fromhex(hex), run_id=..., now=..., limits=..., replay_guard=...)`
and compare with `expected.json`. All messages are signed with `../test_key.pem`, a
TEST-ONLY key whose seed is public. Regenerate with
`python protocols/vectors/generate_envelope.py` (byte-identical; a test checks it).
"""


def load_test_identity(seed: bytes = TEST_KEY_SEED) -> Identity:
    """The TEST-ONLY vector identity (no file-mode check: this key is public on purpose)."""
    return Identity.from_private_bytes(seed)


def test_key_pem() -> bytes:
    pem = Ed25519PrivateKey.from_private_bytes(TEST_KEY_SEED).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TEST_KEY_NOTE.encode("ascii") + pem


def _hexify(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hexify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hexify(v) for v in value]
    return value


def json_view(env: Envelope) -> dict[str, Any]:
    """The decoded fields under their wire names, bytes as hex (the ``decoded`` of expected.json)."""
    return {
        "v": env.version,
        "kind": env.kind,
        "run": env.run_id,
        "sender": env.sender.hex(),
        "sender_id": env.sender_id,
        "round": env.round,
        "seq": env.seq,
        "ts": env.timestamp,
        "payload": _hexify(env.payload),
        "sig": env.signature.hex(),
    }


# --- building blocks -----------------------------------------------------------------------

_DROP = object()  # as an override value: remove the field

PAYLOADS: dict[str, dict[str, Any]] = {
    "update": {
        "tensor": {"codec": "fp16", "shape": [2, 2], "data": bytes.fromhex("003c0040004200c4")},
        "weight": 256.0,
        "inner_steps": 50,
        "train_loss": 2.5,
        "model_hash": bytes(range(32)),
    },
    "announce": {
        "libp2p_id": "12D3KooWExampleExampleExampleExampleExampleExample",
        "maddrs": ["/ip4/127.0.0.1/tcp/31337"],
        "round": 7,
        "model_hash": bytes(range(32)),
        "device_class": "raspberry-pi-4",
        "power_w": 6.4,
        "state_bytes": 12_582_912,
    },
    "state_manifest": {
        "round": 7,
        "model_hash": bytes(range(32)),
        "total_bytes": 1_500_000,
        "chunk_size": 1_048_576,
        "chunk_hashes": [hashlib.sha256(b"chunk0").digest(), hashlib.sha256(b"chunk1").digest()],
    },
    "state_request": {"round": 7, "nonce": bytes(range(16))},
}


ENERGY: dict[str, Any] = {  # the announcement's optional energy totals (wire.md, `announce`)
    "energy_wh": 1.5, "marginal_wh": 0.75, "tokens": 1_200_000, "energy_source": "modelled:profile",
    "grid_g_per_kwh": 475.0,
}  # fmt: skip


def fields(kind: str = "state_request", **overrides: Any) -> dict[str, Any]:
    """Header fields of a valid message in canonical order; ``overrides`` replace/remove (None)."""
    base: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "run": RUN,
        "sender": load_test_identity().public_key_bytes,
        "round": 7,
        "seq": 1,
        "ts": TS,
        "payload": PAYLOADS.get(kind, PAYLOADS["state_request"]),
    }
    for name, value in overrides.items():
        if value is _DROP:
            base.pop(name)
        else:
            base[name] = value
    return base


def signed(body: bytes, kind: str = "state_request", run: str = RUN, signer: Identity | None = None) -> bytes:
    """Wire bytes of ``body`` signed by the test key over (kind, run) — even if the body disagrees."""
    signer = signer or load_test_identity()
    return pack_wire(body, signer.sign(signing_bytes(kind, run, body)))


def sign_fields(f: dict[str, Any]) -> bytes:
    kind = f.get("kind") if isinstance(f.get("kind"), str) else "state_request"
    run = f.get("run") if isinstance(f.get("run"), str) else RUN
    return signed(pack_body(f), kind, run)


def valid(kind: str = "state_request", seq: int = 1, ts: float = TS) -> bytes:
    return seal(
        load_test_identity(),
        kind=kind,
        run_id=RUN,
        round=7,
        seq=seq,
        timestamp=ts,
        payload=PAYLOADS[kind],
    )


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _raw_map(pairs: list[tuple[str, Any]]) -> bytes:
    """A msgpack map from pairs as given, duplicates included (packb would merge them)."""
    if len(pairs) >= 16:
        raise ValueError("fixmap holds at most 15 pairs")
    return bytes([0x80 | len(pairs)]) + b"".join(_packed(k) + _packed(v) for k, v in pairs)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _payload(kind: str, **changes: Any) -> dict[str, Any]:
    payload = dict(PAYLOADS[kind])
    for name, value in changes.items():
        if value is _DROP:
            payload.pop(name)
        else:
            payload[name] = value
    return payload


# --- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[], bytes]
    reason: str | None = None  # None = accept
    context: dict[str, Any] = field(default_factory=dict)


def _skewed(delta: float) -> bytes:
    return valid(ts=NOW + delta)


CASES: list[Case] = [
    Case("accept_update", "a valid update with an fp16 codec map", lambda: valid("update")),
    Case("accept_announce", "a valid announcement", lambda: valid("announce")),
    Case("accept_state_manifest", "a valid state manifest", lambda: valid("state_manifest")),
    Case("accept_state_request", "a valid state request", lambda: valid("state_request")),
    Case(
        "accept_clock_skew_at_limit",
        "timestamp exactly max_clock_skew_s behind now is still accepted",
        lambda: _skewed(-120.0),
    ),
    Case(
        "reject_oversize",
        "a valid message one byte over max_bytes is refused before decoding",
        lambda: valid("update"),
        "oversize",
        {"limits": {"max_bytes": len(valid("update")) - 1}},
    ),
    Case("reject_malformed_empty", "zero bytes", lambda: b"", "malformed"),
    Case(
        "reject_malformed_not_array",
        "a bare msgpack map instead of [body, sig]",
        lambda: pack_body(fields()),
        "malformed",
    ),
    Case(
        "reject_malformed_truncated", "a valid message minus its last byte", lambda: valid()[:-1], "malformed"
    ),
    Case(
        "reject_malformed_trailing_byte",
        "a valid message plus one byte",
        lambda: valid() + b"\x00",
        "malformed",
    ),
    Case(
        "reject_malformed_noncanonical_wrapper",
        "body under a bin16 header where bin8 suffices (same body, same signature)",
        lambda: b"\x92\xc5\x00" + valid()[2:],
        "malformed",
    ),
    Case(
        "reject_malformed_body_not_map",
        "signed body that is a msgpack array",
        lambda: signed(_packed([1, "state_request"])),
        "malformed",
    ),
    Case(
        "reject_malformed_body_duplicate_key",
        "signed body with the seq key twice",
        lambda: signed(_raw_map([*fields().items(), ("seq", 2)])),
        "malformed",
    ),
    Case(
        "reject_malformed_ext_type",
        "signed body with a msgpack ext value in the payload",
        lambda: sign_fields(fields(payload={"round": 7, "nonce": msgpack.ExtType(5, b"x" * 16)})),
        "malformed",
    ),
    Case(
        "reject_unknown_version", "signed body with v=2", lambda: sign_fields(fields(v=2)), "unknown_version"
    ),
    Case("reject_schema_version_type", "v is a string", lambda: sign_fields(fields(v="1")), "schema"),
    Case("reject_schema_missing_field", "no seq field", lambda: sign_fields(fields(seq=_DROP)), "schema"),
    Case(
        "reject_schema_extra_field",
        "an extra hop field",
        lambda: sign_fields({**fields(), "hop": 1}),
        "schema",
    ),
    Case(
        "reject_schema_sender_length",
        "sender of 31 bytes",
        lambda: sign_fields(fields(sender=bytes(31))),
        "schema",
    ),
    Case("reject_schema_negative_seq", "seq = -1", lambda: sign_fields(fields(seq=-1)), "schema"),
    Case(
        "reject_schema_ts_int",
        "ts packed as an int, not float64",
        lambda: sign_fields(fields(ts=int(NOW))),
        "schema",
    ),
    Case(
        "reject_schema_sig_length",
        "a 63-byte signature",
        lambda: pack_wire(pack_body(fields()), valid()[-64:-1]),
        "schema",
    ),
    Case(
        "reject_unknown_kind",
        "kind 'gradient' is not registered",
        lambda: sign_fields(fields(kind="gradient")),
        "unknown_kind",
    ),
    Case(
        "reject_wrong_run",
        "validly signed for run 'other-run'",
        lambda: sign_fields(fields(run="other-run")),
        "wrong_run",
    ),
    Case(
        "reject_bad_signature_flipped_bit",
        "last signature byte xor 1",
        lambda: _flip(valid(), len(valid()) - 1),
        "bad_signature",
    ),
    Case(
        "reject_bad_signature_other_kind_domain",
        "body of kind state_request, signature over the prefix of kind announce (domain separation)",
        lambda: signed(pack_body(fields()), kind="announce"),
        "bad_signature",
    ),
    Case(
        "reject_bad_signature_other_run_domain",
        "body of this run, signature over the prefix of another run (domain separation)",
        lambda: signed(pack_body(fields()), run="other-run"),
        "bad_signature",
    ),
    Case(
        "reject_bad_signature_other_key",
        "signed by a different key than the one in sender",
        lambda: signed(pack_body(fields()), signer=load_test_identity(OTHER_KEY_SEED)),
        "bad_signature",
    ),
    Case("reject_non_finite_ts", "ts = +Inf", lambda: sign_fields(fields(ts=float("inf"))), "non_finite"),
    Case("reject_clock_skew_future", "ts 120.5 s ahead of now", lambda: _skewed(120.5), "clock_skew"),
    Case("reject_clock_skew_past", "ts 120.5 s behind now", lambda: _skewed(-120.5), "clock_skew"),
    Case(
        "reject_replay",
        "(sender, seq) already recorded in the receiver's replay window",
        lambda: valid(),
        "replay",
        {"replay_seen": [{"seq": 1, "timestamp": TS - 30.0}]},
    ),
    Case(
        "reject_schema_payload_missing_field",
        "announce without device_class",
        lambda: sign_fields(fields("announce", payload=_payload("announce", device_class=_DROP))),
        "schema",
    ),
    Case(
        "reject_schema_payload_negative_weight",
        "update weight -1.0",
        lambda: sign_fields(fields("update", payload=_payload("update", weight=-1.0))),
        "schema",
    ),
    Case(
        "reject_schema_payload_hash_length",
        "model_hash of 31 bytes",
        lambda: sign_fields(fields("update", payload=_payload("update", model_hash=bytes(31)))),
        "schema",
    ),
    Case(
        "reject_schema_payload_bool_as_int",
        "inner_steps = true",
        lambda: sign_fields(fields("update", payload=_payload("update", inner_steps=True))),
        "schema",
    ),
    Case(
        "reject_schema_payload_too_many_maddrs",
        "17 multiaddrs (limit 16)",
        lambda: sign_fields(
            fields("announce", payload=_payload("announce", maddrs=["/ip4/1.2.3.4/tcp/1"] * 17))
        ),
        "schema",
    ),
    Case(
        "reject_schema_payload_paused_too_long",
        "announce with a paused reason of 65 characters (limit 64)",
        lambda: sign_fields(fields("announce", payload=_payload("announce", paused="x" * 65))),
        "schema",
    ),
    Case(
        "accept_announce_energy_claims",
        "announce with the optional energy totals (p2pfm.energy)",
        lambda: sign_fields(fields("announce", payload=_payload("announce", **ENERGY))),
    ),
    Case(
        "reject_schema_payload_energy_above_bound",
        "announce energy_wh 1e7 + 1 Wh, above the 10 MWh bound",
        lambda: sign_fields(
            fields("announce", payload=_payload("announce", **{**ENERGY, "energy_wh": 1e7 + 1.0}))
        ),
        "schema",
    ),
    Case(
        "reject_schema_payload_energy_negative",
        "announce marginal_wh -0.5",
        lambda: sign_fields(
            fields("announce", payload=_payload("announce", **{**ENERGY, "marginal_wh": -0.5}))
        ),
        "schema",
    ),
    Case(
        "reject_schema_payload_tokens_above_bound",
        "announce tokens 10^15 + 1",
        lambda: sign_fields(
            fields("announce", payload=_payload("announce", **{**ENERGY, "tokens": 10**15 + 1}))
        ),
        "schema",
    ),
    Case(
        "reject_non_finite_energy",
        "announce energy_wh = +Inf",
        lambda: sign_fields(
            fields("announce", payload=_payload("announce", **{**ENERGY, "energy_wh": float("inf")}))
        ),
        "non_finite",
    ),
    Case(
        "reject_non_finite_payload",
        "update train_loss = NaN",
        lambda: sign_fields(fields("update", payload=_payload("update", train_loss=float("nan")))),
        "non_finite",
    ),
    Case(
        "reject_schema_before_non_finite",
        "weight -1.0 and train_loss NaN: the structural fault is reported first",
        lambda: sign_fields(
            fields("update", payload=_payload("update", weight=-1.0, train_loss=float("nan")))
        ),
        "schema",
    ),
]


def _context(case: Case) -> dict[str, Any]:
    context: dict[str, Any] = {"run_id": RUN, "now": NOW}
    if "limits" in case.context:
        context["limits"] = case.context["limits"]
    if "replay_seen" in case.context:
        sender = load_test_identity().public_key_bytes.hex()
        context["replay_seen"] = [{"sender": sender, **item} for item in case.context["replay_seen"]]
    return context


def _expected(case: Case, data: bytes) -> dict[str, Any]:
    if case.reason is not None:
        return {"outcome": "reject", "reason": case.reason, "description": case.description}
    from p2pfm.core.envelope import open_envelope

    env = open_envelope(data, run_id=RUN, now=NOW)
    return {"outcome": "accept", "description": case.description, "decoded": json_view(env)}


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=True) + "\n"


def write_vectors(out_dir: Path) -> list[Path]:
    """Write the key and every case under ``out_dir``; return the files written."""
    out_dir = Path(out_dir)
    written = []
    key_path = out_dir / "test_key.pem"
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(test_key_pem())
    written.append(key_path)
    root = out_dir / "envelope"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(README)
    written.append(root / "README.md")
    for case in CASES:
        data = case.build()
        folder = root / case.name
        folder.mkdir(exist_ok=True)
        files = {
            "envelope.hex": data.hex() + "\n",
            "context.json": _dump(_context(case)),
            "expected.json": _dump(_expected(case, data)),
        }
        for name, text in files.items():
            (folder / name).write_text(text)
            written.append(folder / name)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else VECTORS_DIR
    written = write_vectors(out_dir)
    print(f"wrote {len(written)} files under {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
