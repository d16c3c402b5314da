"""The signed envelope: round trips, every [REJECT] rule of protocols/wire.md, the replay guard."""

import math
import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p2pfm.core.envelope as envelope_module
from p2pfm.config import ConfigError
from p2pfm.core import schema
from p2pfm.core.envelope import (
    HEADER_FIELDS,
    PROTOCOL_VERSION,
    EnvelopeLimits,
    ReplayGuard,
    open_envelope,
    pack_body,
    pack_body_with_payload,
    pack_payload,
    pack_wire,
    seal,
    signing_bytes,
)
from p2pfm.core.errors import (
    BadSignature,
    ClockSkew,
    Malformed,
    NonFinite,
    Oversize,
    Reject,
    Replay,
    SchemaViolation,
    UnknownKind,
    UnknownVersion,
    WrongRun,
)
from p2pfm.core.identity import Identity

RUN = "run-a"
NOW = 1_700_000_000.0
ALICE = Identity.from_private_bytes(bytes(range(32)))
MALLORY = Identity.from_private_bytes(bytes(range(1, 33)))
WIRE_MD = Path(__file__).resolve().parents[1] / "protocols" / "wire.md"

PAYLOADS = {
    "update": {
        "tensor": {"codec": "int8", "shape": [3], "scale": 0.5, "data": b"\x01\x02\x03"},
        "weight": 32.0,
        "inner_steps": 10,
        "train_loss": 3.25,
        "model_hash": b"\x11" * 32,
    },
    "announce": {
        "libp2p_id": "12D3KooWAbc",
        "maddrs": ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic"],
        "round": 3,
        "model_hash": b"\x22" * 32,
        "device_class": "laptop",
        "power_w": 15.0,
        "state_bytes": 1 << 20,
    },
    "state_manifest": {
        "round": 3,
        "model_hash": b"\x33" * 32,
        "total_bytes": 10,
        "chunk_size": 4,
        "chunk_hashes": [b"\x01" * 32, b"\x02" * 32, b"\x03" * 32],
    },
    "state_request": {"round": 3, "nonce": b"\x44" * 16},
}


def sealed(kind="state_request", *, seq=1, ts=NOW, run=RUN, payload=None, identity=ALICE) -> bytes:
    return seal(
        identity,
        kind=kind,
        run_id=run,
        round=3,
        seq=seq,
        timestamp=ts,
        payload=PAYLOADS[kind] if payload is None else payload,
    )


def body_fields(kind="state_request", **overrides):
    fields = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "run": RUN,
        "sender": ALICE.public_key_bytes,
        "round": 3,
        "seq": 1,
        "ts": NOW,
        "payload": PAYLOADS.get(kind, PAYLOADS["state_request"]),
    }
    fields.update(overrides)
    return fields


def signed_body(fields, *, kind=None, run=None, signer=ALICE) -> bytes:
    """Sign arbitrary fields (even invalid ones) so that checks after the signature are reached."""
    body = pack_body(fields)
    kind = kind or (fields.get("kind") if isinstance(fields.get("kind"), str) else "x")
    run = run or (fields.get("run") if isinstance(fields.get("run"), str) else RUN)
    return pack_wire(body, signer.sign(signing_bytes(kind, run, body)))


def opened(data, **kwargs):
    kwargs.setdefault("run_id", RUN)
    kwargs.setdefault("now", NOW)
    return open_envelope(data, **kwargs)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_seal_then_open_round_trips_every_kind(kind):
    """Each kind opens to exactly the fields it was sealed with."""
    env = opened(sealed(kind, seq=9, ts=NOW + 1.5))
    assert (env.version, env.kind, env.run_id, env.sender) == (1, kind, RUN, ALICE.public_key_bytes)
    assert (env.round, env.seq, env.timestamp) == (3, 9, NOW + 1.5)
    assert env.payload == PAYLOADS[kind]
    assert env.sender_id == ALICE.peer_id
    assert len(env.signature) == 64


def test_seal_is_deterministic_and_independent_of_payload_key_order():
    """Equal messages are equal bytes, whatever order the caller built the payload in."""
    reordered = dict(reversed(list(PAYLOADS["update"].items())))
    assert sealed("update") == sealed("update", payload=reordered)


def test_seal_accepts_an_int_timestamp_as_float64():
    """An int timestamp is sent as float64 (the wire type of ts)."""
    assert opened(sealed(ts=int(NOW))).timestamp == NOW


def test_body_header_is_in_canonical_field_order():
    """The body map's keys appear in HEADER_FIELDS order."""
    body, _ = envelope_module._decode_outer(sealed())
    assert tuple(msgpack.unpackb(body)) == HEADER_FIELDS


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_body_with_a_payload_packed_once_is_pack_body_byte_for_byte(kind):
    """pack_body_with_payload(header, pack_payload(p)) == pack_body({**header, "payload": p})."""
    fields = body_fields(kind)
    header = {k: v for k, v in fields.items() if k != "payload"}
    payload = dict(reversed(list(fields["payload"].items())))  # canonicalised in both paths
    assert pack_body_with_payload(header, pack_payload(payload)) == pack_body(fields)


@settings(max_examples=100, deadline=None)
@given(
    header=st.dictionaries(
        st.text(max_size=6).filter(lambda k: k != "payload"),
        st.one_of(st.integers(0, 2**64 - 1), st.floats(allow_nan=False), st.binary(max_size=40), st.text()),
        max_size=40,
    ),
    payload=st.dictionaries(
        st.text(max_size=6),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(0, 2**32), st.binary(max_size=300), st.text()),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=20,
    ),
)
def test_body_with_packed_payload_matches_pack_body_for_any_map_size(header, payload):
    """Also across msgpack's fixmap/map16 boundary (15 vs 16 entries) and with nested payloads."""
    expected = pack_body({**header, "payload": payload})
    assert pack_body_with_payload(header, pack_payload(payload)) == expected


def test_body_with_packed_payload_refuses_a_header_that_has_one():
    with pytest.raises(ValueError, match="payload"):
        pack_body_with_payload({"v": 1, "payload": {}}, pack_payload({}))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "gradient"}, "not registered"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": "a\x00b"}, "run_id"),
        ({"round": -1}, "round"),
        ({"seq": True}, "seq"),
        ({"timestamp": math.nan}, "timestamp"),
        ({"payload": {"round": 1}}, r"payload\.nonce"),
        ({"payload": {"round": 1, "nonce": b"short"}}, "16 bytes"),
    ],
)
def test_seal_refuses_what_a_receiver_would_reject(kwargs, match):
    """seal validates its arguments and the payload schema before signing (ValueError)."""
    args = {"kind": "state_request", "run_id": RUN, "round": 1, "seq": 1, "timestamp": NOW}
    args["payload"] = PAYLOADS["state_request"]
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        seal(ALICE, **args)


# --- integrity: every byte matters ---------------------------------------------------------


def test_open_rejects_every_single_byte_flip():
    """Flipping any bit pattern of any byte of a signed envelope is rejected (exhaustive)."""
    data = sealed()
    for index in range(len(data)):
        for mask in (0x01, 0x02, 0x10, 0x80, 0xFF):
            mutated = data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]
            with pytest.raises(Reject):
                opened(mutated)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_open_rejects_random_byte_changes(data):
    """Any change of one or more bytes to a signed envelope is rejected (hypothesis)."""
    original = bytearray(sealed(data.draw(st.sampled_from(sorted(PAYLOADS)))))
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    if mutated == original:
        return
    with pytest.raises(Reject):
        opened(bytes(mutated))


def test_open_rejects_every_truncation():
    """Every proper prefix of a signed envelope is rejected."""
    data = sealed("announce")
    for length in range(len(data)):
        with pytest.raises(Reject):
            opened(data[:length])


def test_open_rejects_appended_bytes():
    """Trailing bytes after [body, sig] are rejected as malformed."""
    with pytest.raises(Malformed, match="trailing"):
        opened(sealed() + b"\x00")


def test_open_rejects_non_canonical_wrapper():
    """The same body and signature under a longer bin header are rejected (one encoding only)."""
    data = sealed()
    assert data[1] == 0xC4
    with pytest.raises(Malformed, match="non-canonical"):
        opened(b"\x92\xc5\x00" + data[2:])


# --- order of checks and each rule ---------------------------------------------------------


def test_open_rejects_oversize_before_decoding_anything(monkeypatch):
    """A message over max_bytes is refused before msgpack sees a byte."""
    data = sealed("update")

    def explode(*args, **kwargs):
        raise AssertionError("decoded an oversize message")

    monkeypatch.setattr(envelope_module.msgpack, "unpackb", explode)
    monkeypatch.setattr(envelope_module, "_decode_outer", explode)
    with pytest.raises(Oversize, match=f"{len(data)} bytes exceeds the limit of {len(data) - 1}"):
        opened(data, limits=EnvelopeLimits(max_bytes=len(data) - 1))


def test_open_accepts_a_message_of_exactly_max_bytes():
    """The size limit is inclusive."""
    data = sealed()
    opened(data, limits=EnvelopeLimits(max_bytes=len(data)))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x90", b"\x91\xc4\x00", b"\x93\xc4\x00\xc4\x00\xc4\x00", b"\x92\xa1x\xc4\x00", b"\x80"],
)
def test_open_rejects_wrong_top_level_shape_as_malformed(data):
    """Anything but [bin, bin] at the top level is malformed."""
    with pytest.raises(Malformed):
        opened(data)


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, 2]),
        b"\xc1",
        msgpack.packb({"v": 1}) + b"\x00",
        b"\x81\xa1v\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x81\x01\x01",  # int map key
        b"\x82\xa1v\x01\xa1v\x01",  # duplicate key
        msgpack.packb({"v": msgpack.ExtType(1, b"")}),
        msgpack.packb({"v": msgpack.Timestamp(1)}),
        b"\x91" * 3000 + b"\xc0",  # nesting deeper than the decoder's stack
        b"\x81\xa1v\xdd\xff\xff\xff\xff",  # array claiming 4G items
    ],
)
def test_open_rejects_undecodable_body_as_malformed(body):
    """A signed body that is not strict msgpack of a map is malformed."""
    with pytest.raises(Malformed):
        opened(pack_wire(body, ALICE.sign(signing_bytes("state_request", RUN, body))))


def test_open_checks_version_before_the_field_set():
    """A v2 body with other fields is UnknownVersion, not a schema fault (wire.md rule 4)."""
    with pytest.raises(UnknownVersion, match="version 2"):
        opened(signed_body({"v": 2, "whatever": 1}))


@pytest.mark.parametrize("version", ["1", 1.0, None, True])
def test_open_rejects_a_version_of_the_wrong_type(version):
    """v must be an int."""
    with pytest.raises(SchemaViolation, match="^schema: v:"):
        opened(signed_body(body_fields(v=version)))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"kind": 5}, "kind"),
        ({"kind": ""}, "kind"),
        ({"kind": "k" * 65}, "kind"),
        ({"run": b"run-a"}, "run"),
        ({"run": "run\x00a"}, "run"),
        ({"run": "r" * 129}, "run"),
        ({"sender": ALICE.public_key_bytes[:31]}, "sender"),
        ({"sender": ALICE.public_key_bytes.hex()}, "sender"),
        ({"round": -1}, "round"),
        ({"round": 2**63}, "round"),
        ({"round": False}, "round"),
        ({"seq": 1.0}, "seq"),
        ({"ts": int(NOW)}, "ts"),
        ({"ts": str(NOW)}, "ts"),
        ({"payload": [1]}, "payload"),
        ({"payload": None}, "payload"),
        ({"hop": 1}, "hop"),
    ],
)
def test_open_rejects_header_fields_of_wrong_type_or_range(overrides, field):
    """Each header field's type and bounds are enforced, naming the field."""
    with pytest.raises(SchemaViolation, match=f"^schema: {field}:"):
        opened(signed_body(body_fields(**overrides)))


@pytest.mark.parametrize("field", HEADER_FIELDS[1:])
def test_open_rejects_a_missing_header_field(field):
    """Every header field is required."""
    fields = body_fields()
    del fields[field]
    with pytest.raises(SchemaViolation, match=f"{field}: missing field"):
        opened(signed_body(fields))


def test_open_rejects_a_signature_of_the_wrong_length():
    """sig must be 64 bytes."""
    body = pack_body(body_fields())
    with pytest.raises(SchemaViolation, match="sig: expected 64 bytes"):
        opened(pack_wire(body, ALICE.sign(signing_bytes("state_request", RUN, body))[:63]))


def test_open_rejects_unknown_kind():
    """A validly signed message of an unregistered kind is UnknownKind."""
    with pytest.raises(UnknownKind, match="gradient"):
        opened(signed_body(body_fields(kind="gradient")))


def test_open_rejects_another_run():
    """A message sealed for another run is WrongRun."""
    with pytest.raises(WrongRun, match="run-b"):
        opened(sealed(run="run-b"))


def test_open_rejects_bad_signature():
    """A signature by someone other than sender is BadSignature."""
    with pytest.raises(BadSignature, match=ALICE.peer_id):
        opened(signed_body(body_fields(), signer=MALLORY))


def test_signature_does_not_transfer_between_runs():
    """A valid signature spliced onto the same message for another run does not verify."""
    original = sealed(run="run-a")
    sig = original[-64:]
    body_b = pack_body(body_fields(run="run-b"))
    spliced = pack_wire(body_b, sig)
    with pytest.raises(BadSignature):
        opened(spliced, run_id="run-b")
    with pytest.raises(WrongRun):
        opened(spliced, run_id="run-a")


def test_signature_does_not_transfer_between_kinds():
    """A signature made under one kind's prefix never verifies under another kind's prefix."""
    body = pack_body(body_fields(kind="announce", payload=PAYLOADS["announce"]))
    sig_for_other_kind = ALICE.sign(signing_bytes("state_request", RUN, body))
    with pytest.raises(BadSignature):
        opened(pack_wire(body, sig_for_other_kind))
    sig_for_other_run = ALICE.sign(signing_bytes("announce", "run-b", body))
    with pytest.raises(BadSignature):
        opened(pack_wire(body, sig_for_other_run))


def test_bad_signature_is_checked_before_the_payload():
    """A forged message with a broken payload is BadSignature: the payload is not examined."""
    fields = body_fields("update", payload={"tensor": 1})
    with pytest.raises(BadSignature):
        opened(signed_body(fields, signer=MALLORY))


def test_verify_signature_false_skips_only_the_signature():
    """With verify_signature=False a forged message passes rule 8 but not the others."""
    forged = signed_body(body_fields(), signer=MALLORY)
    assert opened(forged, verify_signature=False).seq == 1
    with pytest.raises(WrongRun):
        opened(forged, run_id="other", verify_signature=False)


@pytest.mark.parametrize("delta", [120.001, -120.001, 3600.0, -1e9])
def test_open_rejects_clock_skew(delta):
    """Timestamps more than max_clock_skew_s from now are ClockSkew."""
    with pytest.raises(ClockSkew, match="^clock_skew: ts:"):
        opened(sealed(ts=NOW + delta))


@pytest.mark.parametrize("delta", [120.0, -120.0, 0.0])
def test_open_accepts_skew_up_to_the_limit(delta):
    """The skew limit is inclusive."""
    opened(sealed(ts=NOW + delta))


@pytest.mark.parametrize("ts", [math.inf, -math.inf, math.nan])
def test_open_rejects_non_finite_timestamp(ts):
    """ts = NaN/Inf is NonFinite (before the skew comparison, which NaN would slip through)."""
    with pytest.raises(NonFinite, match="^non_finite: ts:"):
        opened(signed_body(body_fields(ts=ts)))


# --- replay --------------------------------------------------------------------------------


def test_open_rejects_replayed_bytes_and_accepts_a_new_seq():
    """The same bytes twice are Replay; the same sender with a new seq is fine."""
    guard = ReplayGuard()
    opened(sealed(seq=1), replay_guard=guard)
    with pytest.raises(Replay, match="seq: 1"):
        opened(sealed(seq=1), replay_guard=guard)
    opened(sealed(seq=2), replay_guard=guard)


def test_replay_is_per_sender():
    """Two senders may use the same seq."""
    guard = ReplayGuard()
    opened(sealed(seq=1), replay_guard=guard)
    opened(sealed(seq=1, identity=MALLORY), replay_guard=guard)


def test_forged_messages_do_not_poison_the_replay_guard():
    """A forged (sender, seq) is not recorded, so the real message still gets through."""
    guard = ReplayGuard()
    with pytest.raises(BadSignature):
        opened(signed_body(body_fields(seq=5), signer=MALLORY), replay_guard=guard)
    assert len(guard) == 0
    opened(sealed(seq=5), replay_guard=guard)


def test_messages_failing_the_clock_check_are_not_recorded():
    """A message refused for skew leaves no trace in the guard."""
    guard = ReplayGuard()
    with pytest.raises(ClockSkew):
        opened(sealed(ts=NOW + 500), replay_guard=guard)
    assert len(guard) == 0


def test_replay_guard_forgets_entries_older_than_the_window():
    """Entries whose message time is older than the window are evicted."""
    guard = ReplayGuard(window_s=10.0)
    guard.check_and_record(b"a" * 32, 1, 100.0, now=100.0)
    guard.check_and_record(b"a" * 32, 2, 105.0, now=105.0)
    assert len(guard) == 2
    guard.check_and_record(b"a" * 32, 3, 111.0, now=111.0)
    assert len(guard) == 2  # seq 1 (t=100) expired at now=111


def test_replay_guard_refuses_messages_older_than_its_window():
    """A message older than the window is Replay: its first copy may have been forgotten."""
    guard = ReplayGuard(window_s=10.0)
    with pytest.raises(Replay, match="older than the replay window"):
        guard.check_and_record(b"a" * 32, 1, 89.0, now=100.0)


def test_replay_guard_cap_never_lets_a_replay_through():
    """When max_entries forces evictions, the evicted pairs (and older) are still refused."""
    guard = ReplayGuard(window_s=1000.0, max_entries=3)
    for seq in range(10):
        guard.check_and_record(b"a" * 32, seq, 100.0 + seq, now=110.0)
    assert len(guard) == 3
    for seq in range(10):
        with pytest.raises(Replay):
            guard.check_and_record(b"a" * 32, seq, 100.0 + seq, now=110.0)
    guard.check_and_record(b"a" * 32, 10, 110.0, now=110.0)  # newer than everything dropped


@pytest.mark.parametrize("ts", [math.nan, math.inf])
def test_replay_guard_refuses_non_finite_times_without_recording(ts):
    """A NaN/Inf message time is refused and leaves the guard unchanged."""
    guard = ReplayGuard()
    with pytest.raises(Replay, match="not a finite time"):
        guard.check_and_record(b"a" * 32, 1, ts, now=100.0)
    assert len(guard) == 0


def test_replay_guard_for_limits_uses_the_configured_window():
    """ReplayGuard.for_limits takes the window from EnvelopeLimits."""
    assert ReplayGuard.for_limits(EnvelopeLimits(replay_window_s=900.0)).window_s == 900.0


@pytest.mark.parametrize("kwargs", [{"window_s": 0}, {"window_s": math.inf}, {"max_entries": 0}])
def test_replay_guard_refuses_nonsense_settings(kwargs):
    """A zero or infinite window or no room is a local bug."""
    with pytest.raises(ValueError):
        ReplayGuard(**kwargs)


# --- payload schemas -----------------------------------------------------------------------

PAYLOAD_VIOLATIONS = [
    ("update", {"weight": -1.0}, SchemaViolation, "payload.weight"),
    ("update", {"weight": 1}, SchemaViolation, "payload.weight: expected float"),
    ("update", {"inner_steps": -1}, SchemaViolation, "payload.inner_steps"),
    ("update", {"inner_steps": True}, SchemaViolation, "payload.inner_steps: expected int"),
    ("update", {"model_hash": b"\x00" * 31}, SchemaViolation, "payload.model_hash: expected exactly 32"),
    ("update", {"tensor": b"raw"}, SchemaViolation, "payload.tensor: expected map"),
    ("update", {"tensor": {b"k": 2}}, SchemaViolation, "payload.tensor: map key b.k. is not a string"),
    ("update", {"train_loss": math.nan}, NonFinite, "payload.train_loss"),
    ("update", {"train_loss": -math.inf}, NonFinite, "payload.train_loss"),
    ("update", {"weight": math.inf}, NonFinite, "payload.weight"),
    ("update", {"tensor": {"scale": math.nan}}, NonFinite, "payload.tensor.scale"),
    ("update", {"weight": -1.0, "train_loss": math.nan}, SchemaViolation, "payload.weight"),
    ("announce", {"libp2p_id": "x" * 129}, SchemaViolation, "payload.libp2p_id"),
    ("announce", {"maddrs": ["/ip4/1.2.3.4"] * 17}, SchemaViolation, "payload.maddrs"),
    ("announce", {"maddrs": ["x" * 257]}, SchemaViolation, r"payload.maddrs\[0\]"),
    ("announce", {"maddrs": "/ip4/1.2.3.4"}, SchemaViolation, "payload.maddrs: expected list"),
    ("announce", {"device_class": "d" * 65}, SchemaViolation, "payload.device_class"),
    ("announce", {"power_w": -0.5}, SchemaViolation, "payload.power_w"),
    ("announce", {"power_w": math.nan}, NonFinite, "payload.power_w"),
    ("announce", {"state_bytes": 2**63}, SchemaViolation, "payload.state_bytes"),
    ("state_manifest", {"chunk_size": 0}, SchemaViolation, "payload.chunk_size"),
    ("state_manifest", {"chunk_hashes": [b"\x00" * 33]}, SchemaViolation, r"payload.chunk_hashes\[0\]"),
    ("state_manifest", {"total_bytes": None}, SchemaViolation, "payload.total_bytes: expected int, got nil"),
    ("state_request", {"nonce": b"\x00" * 15}, SchemaViolation, "payload.nonce"),
    ("state_request", {"extra": 1}, SchemaViolation, "payload: unexpected field extra"),
]


@pytest.mark.parametrize("kind, changes, error, match", PAYLOAD_VIOLATIONS)
def test_open_rejects_payload_schema_violations(kind, changes, error, match):
    """Each payload rule is enforced after the signature, naming the field path."""
    payload = {**PAYLOADS[kind], **changes}
    with pytest.raises(error, match=match):
        opened(signed_body(body_fields(kind, payload=payload)))


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_open_rejects_payload_with_a_missing_field(kind):
    """Every payload field is required."""
    for name in PAYLOADS[kind]:
        payload = {k: v for k, v in PAYLOADS[kind].items() if k != name}
        with pytest.raises(SchemaViolation, match=f"payload.{name}: missing field"):
            opened(signed_body(body_fields(kind, payload=payload)))


def test_open_rejects_deeply_nested_opaque_maps():
    """The codec map may not nest deeper than max_payload_depth."""
    tensor = {"a": [[[[[[[[[1]]]]]]]]]}
    with pytest.raises(SchemaViolation, match="nesting deeper"):
        opened(signed_body(body_fields("update", payload={**PAYLOADS["update"], "tensor": tensor})))


def test_open_rejects_opaque_maps_with_too_many_items():
    """The codec map may not hold more than max_opaque_items nodes."""
    tensor = {"shape": list(range(100))}
    payload = {**PAYLOADS["update"], "tensor": tensor}
    with pytest.raises(SchemaViolation, match="more than 50 items"):
        opened(
            signed_body(body_fields("update", payload=payload)), limits=EnvelopeLimits(max_opaque_items=50)
        )


def test_registered_kinds_can_be_added(monkeypatch):
    """register_kind adds a kind that seals and opens like the built-in ones."""
    monkeypatch.setattr(schema, "KIND_SCHEMAS", dict(schema.KIND_SCHEMAS))
    monkeypatch.setattr(envelope_module, "KIND_SCHEMAS", schema.KIND_SCHEMAS)
    schema.register_kind("ping", schema.Map({"hello": schema.Str(8), "ok": schema.Bool()}))
    data = seal(
        ALICE, kind="ping", run_id=RUN, round=0, seq=0, timestamp=NOW, payload={"hello": "hi", "ok": True}
    )
    env = opened(data)
    assert env.kind == "ping" and env.payload == {"hello": "hi", "ok": True}
    with pytest.raises(ValueError, match="already registered"):
        schema.register_kind("ping", schema.Map({}))


# --- limits and documentation --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_bytes": 0},
        {"max_clock_skew_s": -1.0},
        {"max_clock_skew_s": math.nan},
        {"replay_window_s": 60.0},  # shorter than the default skew
        {"max_payload_depth": 1},
    ],
)
def test_envelope_limits_refuse_nonsense_with_config_error(kwargs):
    """Bad limits are ConfigError naming the field."""
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        EnvelopeLimits(**kwargs)


def test_wire_md_documents_every_kind_and_field():
    """protocols/wire.md names every header field, kind and payload field the code defines."""
    text = WIRE_MD.read_text()
    for name in HEADER_FIELDS:
        assert f"`{name}`" in text, name
    for kind, spec in schema.KIND_SCHEMAS.items():
        assert f"`{kind}`" in text, kind
        for name in spec.fields:
            assert re.search(rf"\|\s*`{name}`\s*\|", text), f"{kind}.{name}"
