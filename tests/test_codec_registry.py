"""The codec registry: a codec defined in one class works end to end, with nothing else edited."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import msgpack
import numpy as np
import pytest

from p2pfm.config import ConfigError, build_config
from p2pfm.core.codecs import (
    CODEC_IDS,
    CODECS,
    COMMON_FIELDS,
    Codec,
    CodecSpec,
    decode,
    encode,
    encode_with_decoded,
    encoded_size_estimate,
    register_codec,
)
from p2pfm.core.envelope import open_envelope, seal
from p2pfm.core.errors import NonFinite, Oversize, SchemaViolation, ShapeMismatch, UnknownCodec
from p2pfm.core.gossip import GossipConfig, GossipLearner
from p2pfm.core.identity import Identity


class TruncatedBf16(Codec):
    """A toy codec, here and nowhere else: the top 16 bits of each fp32 value (bfloat16, rounded to zero)."""

    id = "toy-bf16"
    FIELDS: ClassVar[Mapping[str, type]] = {**COMMON_FIELDS, "values": bytes}

    def encode(
        self, x: np.ndarray, spec: CodecSpec, *, with_decoded: bool
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        if not np.isfinite(x).all():
            raise ValueError("vector contains NaN or Inf; refusing to encode it")
        high = (x.view("<u4") >> 16).astype("<u2")
        wire = {"codec": self.id, "numel": int(x.size), "values": high.tobytes()}
        return wire, (self._widen(high) if with_decoded else None)

    def decode(self, wire: dict[str, Any], numel: int) -> np.ndarray:
        if len(wire["values"]) != 2 * numel:
            # [REJECT] byte length disagrees with numel.
            raise ShapeMismatch(f"field 'values' has {len(wire['values'])} bytes, expected {2 * numel}")
        high = np.frombuffer(wire["values"], "<u2")
        if ((high & 0x7F80) == 0x7F80).any():
            # [REJECT] NaN or Inf among the values.
            raise NonFinite("values: NaN or Inf in bf16 values")
        return self._widen(high)

    def size_estimate(self, numel: int, spec: CodecSpec) -> int:
        return len(msgpack.packb({"codec": self.id, "numel": numel, "values": bytes(2 * numel)}))

    @staticmethod
    def _widen(high: np.ndarray) -> np.ndarray:
        return (high.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture
def toy() -> Iterator[Codec]:
    """The toy codec, registered for one test and removed after it (other tests list the registry)."""
    codec = register_codec(TruncatedBf16())
    yield codec
    del CODECS[codec.id]


def roundtrip(wire: dict[str, Any]) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)


def test_builtin_codecs_are_registered_in_listing_order():
    """none, fp16, int8 and topk are registered, in the order error messages list them."""
    assert CODEC_IDS == ("none", "fp16", "int8", "topk")
    assert tuple(CODECS)[:4] == CODEC_IDS
    assert all(CODECS[name].id == name for name in CODEC_IDS)


def test_registered_codec_round_trips_through_spec_encode_and_decode(toy):
    """A registered codec is accepted by CodecSpec (and config files) and round-trips bit for bit."""
    spec = build_config(CodecSpec, {"name": toy.id})
    x = np.random.default_rng(0).standard_normal(1000, dtype=np.float32)
    wire, sent = encode_with_decoded(x, spec)
    assert wire == encode(x, spec)
    assert list(wire) == ["codec", "numel", "values"]
    got = decode(roundtrip(wire), expected_numel=x.size)
    assert got.tobytes() == sent.tobytes()
    assert np.all(np.abs(got - x) <= np.abs(x) * 2.0**-7)  # bf16 keeps 8 significant bits
    assert encoded_size_estimate(x.size, spec) == len(msgpack.packb(wire, use_bin_type=True))


def test_registered_codec_gets_the_generic_checks(toy):
    """The field table, numel limits and unknown ids are checked for a new codec without its own code."""
    x = np.linspace(-1, 1, 40, dtype=np.float32)
    wire = encode(x, CodecSpec(toy.id))
    with pytest.raises(SchemaViolation):
        decode({**wire, "shape": [40]}, expected_numel=40)
    with pytest.raises(SchemaViolation):
        decode({**wire, "numel": -1}, expected_numel=40)
    with pytest.raises(Oversize):
        decode(wire, expected_numel=40, max_numel=39)
    with pytest.raises(ShapeMismatch):
        decode(wire, expected_numel=41)
    with pytest.raises(UnknownCodec, match=f"not one of none, fp16, int8, topk, {toy.id}"):
        decode({**wire, "codec": "zstd"}, expected_numel=40)


def test_registered_codec_applies_its_own_rules(toy):
    """The codec's own [REJECT] rules run after the generic ones."""
    wire = encode(np.ones(4, np.float32), CodecSpec(toy.id))
    with pytest.raises(ShapeMismatch):
        decode({**wire, "values": wire["values"][:-2]}, expected_numel=4)
    with pytest.raises(NonFinite):
        decode({**wire, "values": wire["values"][:-2] + b"\x80\x7f"}, expected_numel=4)  # +Inf


def test_registered_codec_carries_gossip_updates_in_signed_envelopes(toy):
    """A learner configured with the new codec sends updates another learner accepts."""
    cfg = GossipConfig(codec=CodecSpec(toy.id), aggregation="mean")
    sender = GossipLearner(np.zeros(64, np.float32), cfg)
    receiver = GossipLearner(np.zeros(64, np.float32), cfg)
    wire = sender.make_update(-np.arange(64, dtype=np.float32))
    identity = Identity.generate()
    payload = {"tensor": wire, "weight": 1.0, "inner_steps": 1, "train_loss": 0.0, "model_hash": bytes(32)}
    sealed = seal(identity, kind="update", run_id="toy", round=0, seq=1, timestamp=10.0, payload=payload)
    envelope = open_envelope(sealed, run_id="toy", now=10.0)
    received = receiver.receive(identity.peer_id, 0, envelope.payload["tensor"])
    assert np.array_equal(received.dense(), np.arange(64, dtype=np.float32))  # small ints are exact in bf16


def test_unregistered_codec_name_is_a_config_error_again(toy):
    """Removing a codec from the registry makes its name unknown to CodecSpec."""
    del CODECS[toy.id]
    try:
        with pytest.raises(ConfigError, match=r"^name: must be one of none, fp16, int8, topk, got"):
            CodecSpec(toy.id)
    finally:
        register_codec(toy)


def test_register_codec_refuses_taken_ids_and_non_codecs(toy):
    """An id is registered once unless replace=True; only Codec instances are accepted."""
    with pytest.raises(ValueError, match="already registered"):
        register_codec(TruncatedBf16())
    assert register_codec(TruncatedBf16(), replace=True).id == toy.id
    with pytest.raises(TypeError):
        register_codec(TruncatedBf16)  # the class, not an instance
    nameless = type("Nameless", (TruncatedBf16,), {"id": ""})()
    with pytest.raises(ValueError, match="1..32 characters"):
        register_codec(nameless)


@pytest.mark.parametrize(
    "fields",
    [
        {"values": bytes},  # no codec and numel: decode could not check numel before the codec runs
        {"numel": int, "codec": str, "values": bytes},  # not in wire order
        {**COMMON_FIELDS, "values": float},  # not a type the codec maps carry
    ],
)
def test_register_codec_refuses_field_tables_without_the_common_fields(fields):
    """A table must start with codec: str, numel: int and use only str, int and bytes."""
    broken = type("Broken", (TruncatedBf16,), {"id": "toy-broken", "FIELDS": fields})()
    with pytest.raises(ValueError, match="toy-broken"):
        register_codec(broken)
    assert "toy-broken" not in CODECS
