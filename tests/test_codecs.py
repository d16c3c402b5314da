"""Update codecs: round trips, error bounds, exact top-k, varints, and every [REJECT] rule."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfm.config import ConfigError, build_config
from p2pfm.core import codecs, errors
from p2pfm.core.codecs import (
    CODEC_IDS,
    FP16_MAX,
    MAX_BLOCK,
    CodecSpec,
    decode,
    encode,
    encode_with_decoded,
    encoded_size_estimate,
    topk_count,
    topk_indices,
    varint_decode,
    varint_encode,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_SPECS = [
    CodecSpec("none"),
    CodecSpec("fp16"),
    CodecSpec("int8"),
    CodecSpec("int8", block_size=7),
    CodecSpec("topk", topk_fraction=0.1),
    CodecSpec("topk", topk_fraction=0.3, value_bits=16),
    CodecSpec("topk", topk_fraction=0.5, block_size=3),
]

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Sizes around block boundaries (256, 7, 3) and the tiny ones.
sizes = st.one_of(st.sampled_from([1, 2, 3, 6, 7, 8, 255, 256, 257, 512, 513]), st.integers(1, 700))


def vectors(elements=finite_f32):
    return sizes.flatmap(lambda n: hnp.arrays(np.float32, n, elements=elements))


def roundtrip(x: np.ndarray, spec: CodecSpec) -> np.ndarray:
    """Encode, go through msgpack like the envelope does, decode."""
    wire = msgpack.unpackb(msgpack.packb(encode(x, spec)), raw=False)
    return decode(wire, expected_numel=x.size)


def int8_bound(block_absmax: np.ndarray) -> np.ndarray:
    """Documented int8 bound: absmax/254 * (1 + 2**-13) plus 2**-140 for subnormal scales."""
    return block_absmax.astype(np.float64) / 254.0 * (1 + 2.0**-13) + 2.0**-140


def blockwise_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Per-element absmax of the element's block, (n,) float64."""
    pad = -x.size % block
    blocks = np.abs(np.concatenate([x.astype(np.float64), np.zeros(pad)])).reshape(-1, block)
    return np.repeat(blocks.max(axis=1), block)[: x.size]


# ----------------------------------------------------------------------------- spec


def test_codec_spec_defaults_are_topk_one_percent_int8():
    """The default spec is topk at 1 % with int8 values and 256-element blocks."""
    assert CodecSpec() == CodecSpec("topk", 0.01, 8, 256)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "zstd"}, "name"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"topk_fraction": float("nan")}, "topk_fraction"),
        ({"value_bits": 4}, "value_bits"),
        ({"value_bits": True}, "value_bits"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": MAX_BLOCK + 1}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
    ],
)
def test_codec_spec_rejects_bad_values_naming_the_field(kwargs, field):
    """A bad CodecSpec value raises ConfigError whose message starts with the field name."""
    with pytest.raises(ConfigError, match=f"^{field}:"):
        CodecSpec(**kwargs)


def test_codec_spec_builds_from_a_config_table():
    """CodecSpec loads through build_config like every other config (TOML tables)."""
    spec = build_config(CodecSpec, {"name": "int8", "block_size": 64})
    assert spec == CodecSpec("int8", block_size=64)
    with pytest.raises(ConfigError, match="value_bits"):
        build_config(CodecSpec, {"value_bits": 12})


def test_topk_count_is_ceil_with_floor_one():
    """k = max(1, ceil(fraction * numel)) and never above numel."""
    assert topk_count(1000, 0.01) == 10
    assert topk_count(1001, 0.01) == 11
    assert topk_count(5, 0.01) == 1
    assert topk_count(3, 1.0) == 3


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}-{s.value_bits}-{s.block_size}")
@FAST
@given(x=vectors())
def test_every_codec_round_trips_to_finite_vector_of_same_length(spec, x):
    """Any finite vector decodes to a finite float32 vector of the same length, through msgpack."""
    y = roundtrip(x, spec)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.isfinite(y).all()


@FAST
@given(x=vectors())
def test_none_codec_is_lossless(x):
    """The none codec reproduces every bit, signed zeros included."""
    y = roundtrip(x, CodecSpec("none"))
    assert y.tobytes() == x.tobytes()


@FAST
@given(x=vectors())
def test_fp16_error_within_documented_bound(x):
    """fp16: |err| <= max(|x| * 2**-11, 2**-25) inside the half range; saturates at 65504 outside."""
    y = roundtrip(x, CodecSpec("fp16")).astype(np.float64)
    xc = np.clip(x.astype(np.float64), -FP16_MAX, FP16_MAX)
    bound = np.maximum(np.abs(xc) * 2.0**-11, 2.0**-25)
    assert (np.abs(xc - y) <= bound).all()


@pytest.mark.parametrize("block", [1, 7, 256])
@FAST
@given(x=vectors())
def test_int8_error_within_absmax_over_254(block, x):
    """int8: every element is within absmax_block / 254 of its input (up to float32 rounding)."""
    y = roundtrip(x, CodecSpec("int8", block_size=block)).astype(np.float64)
    err = np.abs(x.astype(np.float64) - y)
    assert (err <= int8_bound(blockwise_absmax(x, block))).all()


@pytest.mark.parametrize(
    "scale", [0.0, 1e-45, 1e-40, 1e-37, 1e-30, 1.0, 1e30, 3.4e38, float(np.finfo(np.float32).max)]
)
def test_int8_handles_zero_tiny_and_huge_blocks(scale):
    """Zero, subnormal and near-FLT_MAX magnitudes stay finite and within the bound."""
    rng = np.random.default_rng(1)
    x = (rng.uniform(-1, 1, 1000) * scale).astype(np.float32)
    x[0] = np.float32(scale)
    y = roundtrip(x, CodecSpec("int8")).astype(np.float64)
    assert np.isfinite(y).all()
    assert (np.abs(x - y) <= int8_bound(blockwise_absmax(x, 256))).all()


def test_int8_all_zero_block_has_zero_scale():
    """A block of zeros gets scale 0 and decodes to zeros."""
    wire = encode(np.zeros(300, np.float32), CodecSpec("int8"))
    assert np.frombuffer(wire["scales"], "<f4").tolist() == [0.0, 0.0]
    assert not decode(wire, expected_numel=300).any()


def test_encode_refuses_non_finite_and_wrong_dtype_input():
    """Encoding NaN/Inf, float64, 2-D or empty input is a local bug: ValueError, not Reject."""
    bad = np.ones(10, np.float32)
    bad[3] = np.nan
    for spec in ALL_SPECS:
        with pytest.raises(ValueError):
            encode(bad, spec)
        with pytest.raises(ValueError):
            encode(np.full(10, np.inf, np.float32), spec)
    with pytest.raises(ValueError):
        encode(np.ones(10), CodecSpec())
    with pytest.raises(ValueError):
        encode(np.ones((2, 2), np.float32), CodecSpec())
    with pytest.raises(ValueError):
        encode(np.ones(0, np.float32), CodecSpec())


def test_encode_accepts_non_contiguous_views():
    """A strided float32 view encodes like its contiguous copy."""
    x = np.arange(40, dtype=np.float32)[::2]
    for spec in ALL_SPECS:
        assert encode(x, spec) == encode(x.copy(), spec)


# ----------------------------------------------------------------------------- top-k


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Sort-based reference: by |x| descending, then index ascending."""
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))
    return np.sort(order[:k])


@FAST
@given(
    x=vectors(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0])) | vectors(),
    fraction=st.floats(0.001, 1.0),
)
def test_topk_keeps_exactly_the_k_largest_with_lower_index_ties(x, fraction):
    """topk keeps the k largest |x|, ties broken by the lower index (vs a sort-based reference)."""
    k = topk_count(x.size, fraction)
    assert topk_indices(x, k).tolist() == reference_topk(x, k).tolist()
    y = roundtrip(x, CodecSpec("topk", topk_fraction=fraction, value_bits=16))
    assert np.count_nonzero(y) <= k
    assert set(np.flatnonzero(y)) <= set(reference_topk(x, k).tolist())


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "spiky"])
def test_topk_sampled_path_is_exact_on_large_vectors(kind):
    """Above the subsample threshold the selection is still exactly the sort-based one."""
    rng = np.random.default_rng(7)
    n = 400_000
    if kind == "normal":
        x = rng.standard_normal(n).astype(np.float32)
    elif kind == "ties":
        x = rng.integers(-3, 4, n).astype(np.float32)
    elif kind == "zeros":
        x = np.zeros(n, np.float32)
        x[rng.integers(0, n, 50)] = 1.0
    else:
        x = rng.standard_normal(n).astype(np.float32)
        x[:5000] *= 1000  # all large entries packed at the front: a subsample can miss them
    for k in (1, 4000, 40_000):
        assert np.array_equal(topk_indices(x, k), reference_topk(x, k))


def test_topk_falls_back_to_the_full_vector_when_the_sample_misleads():
    """If the subsample sees only large values (too few candidates), the result is still exact."""
    n, k = 400_000, 100_000
    positions = np.random.default_rng(codecs._TOPK_SEED).integers(0, n, codecs._TOPK_SAMPLE)
    x = np.random.default_rng(8).uniform(-1, 1, n).astype(np.float32)
    x[positions] = 100.0  # the threshold lands at 100: ~63k candidates < k
    assert np.unique(positions).size < k
    assert np.array_equal(topk_indices(x, k), reference_topk(x, k))


def test_topk_int8_values_within_bound_of_kept_entries():
    """topk int8 values obey the int8 bound over blocks of kept values."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000).astype(np.float32)
    spec = CodecSpec("topk", topk_fraction=0.2, block_size=64)
    y = roundtrip(x, spec)
    idx = reference_topk(x, topk_count(x.size, 0.2))
    kept = x[idx]
    assert np.array_equal(np.flatnonzero(y), idx[kept != 0] if (kept == 0).any() else idx)
    err = np.abs(kept.astype(np.float64) - y[idx])
    assert (err <= int8_bound(blockwise_absmax(kept, 64))).all()


def test_topk_single_element_vector():
    """numel = 1 keeps its one entry (int8: up to the rounding of its scale)."""
    x = np.array([-2.5], np.float32)
    assert roundtrip(x, CodecSpec("topk", value_bits=16)).tolist() == [-2.5]
    assert roundtrip(x, CodecSpec("topk", value_bits=8)).tolist() == pytest.approx([-2.5], rel=2**-22)


def test_topk_one_percent_int8_is_under_a_fifth_of_a_bit_per_param():
    """topk 1 % + int8 costs about 0.18 bits/param before the envelope."""
    x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    size = len(msgpack.packb(encode(x, CodecSpec())))
    assert size * 8 / x.size < 0.2


# ----------------------------------------------------------------------------- encode_with_decoded

# Every codec, both topk value formats, blocks that do and do not divide the sizes below.
DECODED_SPECS = [
    CodecSpec("none"),
    CodecSpec("fp16"),
    CodecSpec("int8"),
    CodecSpec("int8", block_size=7),
    CodecSpec("int8", block_size=1),
    CodecSpec("topk"),
    CodecSpec("topk", value_bits=16),
    CodecSpec("topk", topk_fraction=0.1, block_size=7),
    CodecSpec("topk", topk_fraction=0.3, value_bits=16),
    CodecSpec("topk", topk_fraction=0.5, block_size=3),
    CodecSpec("topk", topk_fraction=1.0, block_size=5),
]
FLT_MAX = float(np.finfo(np.float32).max)


def spec_id(spec: CodecSpec) -> str:
    return f"{spec.name}-{spec.topk_fraction}-{spec.value_bits}-{spec.block_size}"


def assert_decoded_matches_wire(x: np.ndarray, spec: CodecSpec) -> None:
    """encode_with_decoded gives encode's wire and the exact bits decode() reads from it."""
    before = x.copy()
    wire, sent = encode_with_decoded(x, spec)
    assert msgpack.packb(wire) == msgpack.packb(encode(x, spec))  # same fields, same order, same bytes
    received = decode(msgpack.unpackb(msgpack.packb(wire), raw=False), expected_numel=x.size)
    assert sent.dtype == np.float32 and sent.shape == x.shape
    assert sent.tobytes() == received.tobytes()  # bit for bit: signed zeros, subnormals
    assert np.array_equal(x, before, equal_nan=True)  # input untouched
    assert sent.flags.writeable and not np.shares_memory(sent, x)  # the caller may update it in place


@pytest.mark.parametrize("spec", DECODED_SPECS, ids=spec_id)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 255, 256, 257, 300, 513, 2762, 70_001, 300_001])
def test_encode_with_decoded_is_bit_identical_to_decode(spec, n):
    """For every codec and size (block multiples or not, top-k's sampled path), sent == decode(wire)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    assert_decoded_matches_wire(x, spec)
    assert_decoded_matches_wire(x * np.float32(1e-40), spec)  # subnormals (and fp16 underflow)
    assert_decoded_matches_wire(np.zeros(n, np.float32), spec)  # zero scales, ties everywhere
    assert_decoded_matches_wire(-np.zeros(n, np.float32), spec)  # signed zeros
    huge = (rng.uniform(-1, 1, n) * FLT_MAX).astype(np.float32)
    huge[0] = FLT_MAX  # the int8 overflow guard and fp16 saturation
    assert_decoded_matches_wire(huge, spec)
    assert_decoded_matches_wire(rng.integers(-2, 3, n).astype(np.float32), spec)  # many ties


@pytest.mark.parametrize("spec", DECODED_SPECS, ids=spec_id)
@FAST
@given(x=vectors())
def test_encode_with_decoded_matches_decode_on_any_finite_vector(spec, x):
    """Property: for any finite float32 vector, the encoder's decoded vector is decode(wire)'s bits."""
    assert_decoded_matches_wire(x, spec)


def test_encode_with_decoded_refuses_what_encode_refuses():
    """Same ValueError and TypeError as encode for bad input."""
    bad = np.ones(10, np.float32)
    bad[3] = np.nan
    for spec in DECODED_SPECS:
        with pytest.raises(ValueError):
            encode_with_decoded(bad, spec)
    with pytest.raises(TypeError):
        encode_with_decoded(np.ones(10, np.float32), "topk")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- varints


@FAST
@given(st.lists(st.integers(0, 2**35 - 1), max_size=200))
def test_varint_round_trips_any_values_below_2_pow_35(values):
    """LEB128 encode/decode round-trips, byte-for-byte equal to a scalar reference."""
    data = varint_encode(np.array(values, np.uint64))
    assert data == b"".join(scalar_leb128(v) for v in values)
    assert varint_decode(data, len(values)).tolist() == values


def scalar_leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize(
    ("data", "count", "reject"),
    [
        (b"\x80", 1, errors.BadIndex),  # truncated
        (b"\x01\x82", 2, errors.BadIndex),  # truncated last
        (b"\xff\xff\xff\xff\xff\x01", 1, errors.BadIndex),  # 6 bytes: overflow
        (b"\x80\x00", 1, errors.BadIndex),  # overlong zero
        (b"\x81\x80\x00", 1, errors.BadIndex),  # overlong
        (b"\x01\x02", 3, errors.ShapeMismatch),  # fewer values than k
        (b"", 1, errors.ShapeMismatch),
    ],
)
def test_varint_decode_rejects_truncated_overflowing_overlong_and_miscounted(data, count, reject):
    """Broken varint streams raise BadIndex (or ShapeMismatch for a wrong count)."""
    with pytest.raises(reject):
        varint_decode(data, count)


@FAST
@given(st.lists(st.integers(0, 2**35 - 1), max_size=300))
def test_varint_small_and_vectorised_encoders_agree(values):
    """The Python loop for short streams and the vectorised encoder give the same bytes."""
    array = np.array(values, np.uint64)
    assert codecs._varint_encode_small(values) == codecs._varint_encode_vector(array)


def test_varint_encoders_refuse_values_of_2_pow_35_and_above():
    """Both encoders raise the same ValueError for a value that needs more than 5 bytes."""
    for values in ([2**35], [1, 2, 2**40]):
        with pytest.raises(ValueError, match="too large"):
            codecs._varint_encode_small(values)
        with pytest.raises(ValueError, match="too large"):
            codecs._varint_encode_vector(np.array(values, np.uint64))
    with pytest.raises(ValueError, match="too large"):
        varint_encode(np.full(1000, 2**35, np.uint64))


@FAST
@given(st.sets(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
def test_index_bytes_are_the_varints_of_the_gaps(indices):
    """topk's index field (Python path up to 128 indices, numpy beyond) is varint_encode of the gaps."""
    idx = np.array(sorted(indices), np.int64)
    expected = varint_encode(np.diff(idx, prepend=0).astype(np.uint64))
    assert codecs._index_bytes(idx) == expected
    assert codecs._gaps(idx).tolist() == np.diff(idx, prepend=0).tolist()


def varint_outcome(decoder, data: bytes, count: int):
    """(values, None) or (None, (Reject type, detail)) of one varint decoder."""
    try:
        return [int(v) for v in decoder(data, count)], None
    except errors.Reject as exc:
        return None, (type(exc), exc.detail)


varint_streams = st.one_of(
    st.binary(max_size=40),
    st.lists(st.integers(0, 2**35 - 1), max_size=20).map(lambda v: varint_encode(np.array(v, np.uint64))),
    st.lists(
        st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\x81\x00", b"\xff" * 5]), max_size=12
    ).map(b"".join),
)


@settings(max_examples=400, deadline=None)
@given(data=varint_streams, extra=st.integers(-2, 2))
def test_varint_small_and_vectorised_decoders_agree_on_any_bytes(data, extra):
    """Same values, or the same Reject with the same text, from both decoders, on valid and broken streams."""
    count = max(0, sum(1 for byte in data if byte < 0x80) + extra)
    assert varint_outcome(codecs._varint_decode_small, data, count) == varint_outcome(
        codecs._varint_decode_vector, data, count
    )


@pytest.mark.parametrize("size", [codecs._SMALL_VARINT_BYTES + d for d in (-1, 0, 1)])
def test_varint_decode_rejects_the_same_on_both_sides_of_the_size_switch(size):
    """Every varint rule still holds just below, at and above the stream size where decoding switches path."""
    good = b"\x81\x01" + b"\x05" * (size - 2)  # count = size - 1
    assert varint_decode(good, size - 1).tolist() == [129] + [5] * (size - 2)
    for data, count, reject in [
        (good[:-1] + b"\x85", size - 2, errors.BadIndex),  # truncated
        (good, size, errors.ShapeMismatch),  # miscounted
        (b"\xff" * 6 + b"\x01" + b"\x05" * (size - 7), size - 6, errors.BadIndex),  # overflow
        (b"\x80\x00" + b"\x05" * (size - 2), size - 1, errors.BadIndex),  # overlong
    ]:
        assert len(data) == size
        with pytest.raises(reject):
            varint_decode(data, count)


FLT_TINY = float(np.finfo(np.float32).smallest_subnormal)


@pytest.mark.parametrize("n", [1, 2, 3, 28, 255, 256])
@pytest.mark.parametrize(
    "scale", [0.0, FLT_TINY, 1e-42, 1e-38, 1e-3, 1.0, 3.0e38, 3.3e38, FLT_MAX], ids=lambda v: f"{v:g}"
)
def test_int8_one_block_path_gives_the_blockwise_bytes(n, scale):
    """The scalar path for vectors within one block equals the blockwise path, scales and values."""
    rng = np.random.default_rng(n)
    for x in (
        (rng.uniform(-1, 1, n) * scale).astype(np.float32),
        np.full(n, scale, np.float32),
        -np.full(n, scale, np.float32),
        np.where(rng.random(n) < 0.5, -0.0, 0.0).astype(np.float32),
    ):
        one_scales, one_q = codecs._quantize_int8_one_block(x)
        scales, q = codecs._quantize_int8_blocks(x, 256)
        assert (one_scales.dtype, one_q.dtype) == (scales.dtype, q.dtype)
        assert one_scales.tobytes() == scales.tobytes() and one_q.tobytes() == q.tobytes()


@FAST
@given(x=hnp.arrays(np.float32, st.integers(1, 256), elements=finite_f32))
def test_int8_one_block_path_matches_blockwise_on_any_vector(x):
    one_scales, one_q = codecs._quantize_int8_one_block(x)
    scales, q = codecs._quantize_int8_blocks(x, 256)
    assert one_scales.tobytes() == scales.tobytes() and one_q.tobytes() == q.tobytes()


def test_int8_one_block_path_refuses_non_finite_input():
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError):
            codecs._quantize_int8_one_block(np.array([1.0, bad], np.float32))


def reference_positions(gaps: list[int], n: int):
    """The topk index rules on a list of gaps: positions, or (Reject type, detail)."""
    if 0 in gaps[1:]:
        return errors.BadIndex, "indices: not strictly increasing (zero gap)"
    positions = list(itertools.accumulate(gaps))
    if positions[-1] >= n:
        return errors.BadIndex, f"indices: index {positions[-1]} out of bounds for numel={n}"
    return positions


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 300), min_size=1, max_size=400)
    | st.lists(st.integers(1, 2**20), min_size=1, max_size=120),
    slack=st.integers(-3, 3),
)
def test_topk_positions_follow_the_rules_on_both_sides_of_the_size_switch(gaps, slack):
    """Short (Python) and long (numpy) index streams: same positions, or the same Reject and text."""
    n = max(1, sum(gaps) + 1 + slack)  # around the out-of-bounds boundary
    data = varint_encode(np.array(gaps, np.uint64))
    try:
        got = [int(i) for i in codecs._topk_positions(data, len(gaps), n)]
    except errors.Reject as exc:
        got = (type(exc), exc.detail)
    assert got == reference_positions(gaps, n)


@pytest.mark.parametrize("n", [600, 60_000])  # index bytes below / above _SMALL_VARINT_BYTES
def test_topk_decode_index_rejections_for_short_and_long_index_streams(n):
    """Duplicate and out-of-bounds indices are BadIndex whichever path decodes them."""
    x = np.linspace(-3, 3, n, dtype=np.float32)
    wire = encode(x, CodecSpec("topk", topk_fraction=0.05, value_bits=16))
    k = wire["k"]
    assert (len(wire["indices"]) <= codecs._SMALL_VARINT_BYTES) == (n == 600)
    ones = b"\x00" + b"\x01" * (k - 1)  # positions 0..k-1: valid
    assert np.flatnonzero(decode(mutate(wire, indices=ones), expected_numel=n)).size <= k
    with pytest.raises(errors.BadIndex, match="zero gap"):
        decode(mutate(wire, indices=b"\x00" * k), expected_numel=n)
    last = varint_encode(np.array([n], np.uint64))
    with pytest.raises(errors.BadIndex, match=f"index {k - 2 + n} out of bounds"):
        decode(mutate(wire, indices=ones[:-1] + last), expected_numel=n)


def slow_scale_reason(scale: np.float32) -> type | None:
    """The three int8 scale rules in protocols/codecs.md order, one scale at a time."""
    if not np.isfinite(scale):
        return errors.NonFinite
    if np.signbit(scale):
        return errors.SchemaViolation
    if float(scale) * 127.0 >= codecs._SCALE_PRODUCT_LIMIT:
        return errors.NonFinite
    return None


def scale_candidates() -> list[np.float32]:
    top = np.array([codecs._MAX_SCALE_BITS], "<u4").view("<f4")[0]
    up, down = np.float32(np.inf), np.float32(0.0)
    values = [0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, 3e38, FLT_MAX, -FLT_MAX, np.inf, -np.inf, np.nan, -np.nan]
    return [np.float32(v) for v in values] + [top, np.nextafter(top, up), np.nextafter(top, down)]


@pytest.mark.parametrize("scale", scale_candidates(), ids=lambda s: hex(np.array([s], "<f4").view("<u4")[0]))
def test_int8_scale_check_accepts_and_rejects_exactly_as_the_three_rules(scale):
    """The one-comparison scale check accepts what the three rules accept, else raises their reason."""
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    wire = dict(encode(x, CodecSpec("int8", block_size=5)))
    wire["scales"] = np.array([0.5, scale], "<f4").tobytes()
    reason = slow_scale_reason(scale)
    if reason is None:
        assert np.isfinite(decode(wire, expected_numel=10)).all()
    else:
        with pytest.raises(reason):
            decode(wire, expected_numel=10)
    top = np.array([codecs._MAX_SCALE_BITS], "<u4").view("<f4")[0]  # the boundary itself is right
    assert slow_scale_reason(top) is None
    assert slow_scale_reason(np.nextafter(top, np.float32(np.inf))) is not None


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("spec", ALL_SPECS + [CodecSpec("int8", block_size=MAX_BLOCK)], ids=str)
@pytest.mark.parametrize("n", [1, 7, 300, 70_000])
def test_encoded_size_estimate_is_exact_for_dense_and_close_for_topk(spec, n):
    """The size estimate equals msgpack's size for none/fp16/int8 and is within 10 % for topk."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    real = len(msgpack.packb(encode(x, spec)))
    estimate = encoded_size_estimate(n, spec)
    if spec.name == "topk":
        assert abs(estimate - real) <= 0.1 * real + 8
    else:
        assert estimate == real


# ----------------------------------------------------------------------------- rejections


def valid_wires() -> dict[str, dict]:
    x = np.linspace(-3, 3, 600, dtype=np.float32)
    return {
        "none": encode(x, CodecSpec("none")),
        "fp16": encode(x, CodecSpec("fp16")),
        "int8": encode(x, CodecSpec("int8", block_size=64)),
        "topk8": encode(x, CodecSpec("topk", topk_fraction=0.05, block_size=8)),
        "topk16": encode(x, CodecSpec("topk", topk_fraction=0.05, value_bits=16)),
    }


def mutate(wire: dict, **changes) -> dict:
    out = dict(wire)
    for key, value in changes.items():
        if value is DROP:
            del out[key]
        else:
            out[key] = value
    return out


DROP = object()
NAN32 = np.array([np.nan], "<f4").tobytes()
INF16 = np.array([np.inf], "<f2").tobytes()


def reject_cases():
    w = valid_wires()
    n = 600
    k = w["topk8"]["k"]
    return [
        ("not_a_map", [1, 2], errors.SchemaViolation),
        ("codec_missing", mutate(w["none"], codec=DROP), errors.SchemaViolation),
        ("codec_not_str", mutate(w["none"], codec=b"none"), errors.SchemaViolation),
        ("codec_unknown", mutate(w["none"], codec="zstd"), errors.UnknownCodec),
        ("field_missing", mutate(w["int8"], scales=DROP), errors.SchemaViolation),
        ("field_extra", mutate(w["fp16"], extra=1), errors.SchemaViolation),
        ("numel_str", mutate(w["none"], numel="600"), errors.SchemaViolation),
        ("numel_bool", mutate(w["none"], numel=True), errors.SchemaViolation),
        ("numel_negative", mutate(w["none"], numel=-1), errors.SchemaViolation),
        ("values_str", mutate(w["none"], values="abc"), errors.SchemaViolation),
        (
            "values_bytearray",
            mutate(w["none"], values=bytearray(w["none"]["values"])),
            errors.SchemaViolation,
        ),
        ("value_bits_bad", mutate(w["topk8"], value_bits=4), errors.SchemaViolation),
        ("value_bits_16_with_scales", mutate(w["topk8"], value_bits=16), errors.SchemaViolation),
        ("block_zero", mutate(w["int8"], block=0), errors.SchemaViolation),
        ("block_huge", mutate(w["int8"], block=MAX_BLOCK + 1), errors.SchemaViolation),
        ("numel_mismatch", mutate(w["none"], numel=599), errors.ShapeMismatch),
        ("none_short", mutate(w["none"], values=w["none"]["values"][:-4]), errors.ShapeMismatch),
        ("fp16_long", mutate(w["fp16"], values=w["fp16"]["values"] + b"\0\0"), errors.ShapeMismatch),
        ("int8_scales_short", mutate(w["int8"], scales=w["int8"]["scales"][:-4]), errors.ShapeMismatch),
        ("int8_block_changed", mutate(w["int8"], block=128), errors.ShapeMismatch),
        ("int8_values_short", mutate(w["int8"], values=w["int8"]["values"][:-1]), errors.ShapeMismatch),
        ("topk_k_zero", mutate(w["topk8"], k=0), errors.ShapeMismatch),
        ("topk_k_above_numel", mutate(w["topk8"], k=n + 1), errors.ShapeMismatch),
        (
            "topk_k_mismatch",
            mutate(w["topk16"], k=k - 1, values=w["topk16"]["values"][:-2]),
            errors.ShapeMismatch,
        ),
        ("topk_values_short", mutate(w["topk16"], values=w["topk16"]["values"][:-2]), errors.ShapeMismatch),
        ("topk_indices_too_long", mutate(w["topk16"], indices=b"\x01" * (5 * k + 1)), errors.ShapeMismatch),
        (
            "topk_out_of_bounds",
            mutate(
                w["topk16"], indices=b"\x00" + b"\x01" * (k - 2) + varint_encode(np.array([n], np.uint64))
            ),
            errors.BadIndex,
        ),
        ("topk_duplicate", mutate(w["topk16"], indices=b"\x00" * k), errors.BadIndex),
        ("topk_truncated", mutate(w["topk16"], indices=b"\x01" * (k - 1) + b"\x81"), errors.BadIndex),
        ("topk_overlong", mutate(w["topk16"], indices=b"\x01" * (k - 1) + b"\x81\x00"), errors.BadIndex),
        (
            "topk_overflow",
            mutate(w["topk16"], indices=b"\x01" * (k - 1) + b"\xff" * 5 + b"\x01"),
            errors.BadIndex,
        ),
        ("none_nan", mutate(w["none"], values=NAN32 + w["none"]["values"][4:]), errors.NonFinite),
        ("fp16_inf", mutate(w["fp16"], values=INF16 + w["fp16"]["values"][2:]), errors.NonFinite),
        ("int8_nan_scale", mutate(w["int8"], scales=NAN32 + w["int8"]["scales"][4:]), errors.NonFinite),
        (
            "int8_huge_scale",
            mutate(w["int8"], scales=np.array([3e38], "<f4").tobytes() + w["int8"]["scales"][4:]),
            errors.NonFinite,
        ),
        (
            "int8_negative_scale",
            mutate(w["int8"], scales=np.array([-1.0], "<f4").tobytes() + w["int8"]["scales"][4:]),
            errors.SchemaViolation,
        ),
        (
            "int8_minus_128",
            mutate(w["int8"], values=b"\x80" + w["int8"]["values"][1:]),
            errors.SchemaViolation,
        ),
        ("topk8_nan_scale", mutate(w["topk8"], scales=NAN32 + w["topk8"]["scales"][4:]), errors.NonFinite),
        ("topk16_inf", mutate(w["topk16"], values=INF16 + w["topk16"]["values"][2:]), errors.NonFinite),
    ]


@pytest.mark.parametrize(("case", "wire", "reject"), reject_cases(), ids=[c[0] for c in reject_cases()])
def test_decode_rejects_malformed_wire_with_the_right_reason(case, wire, reject):
    """Each broken rule raises its own Reject subclass, whose message names the problem."""
    with pytest.raises(reject) as info:
        decode(wire, expected_numel=600)
    assert type(info.value) is reject
    assert info.value.detail


def test_decode_rejects_numel_above_max_numel_as_oversize():
    """numel above the receiver's max_numel is Oversize, checked before the model-size match."""
    wire = valid_wires()["int8"]
    with pytest.raises(errors.Oversize):
        decode(wire, expected_numel=600, max_numel=599)
    assert decode(wire, expected_numel=600, max_numel=600).shape == (600,)


def test_decode_accepts_every_valid_wire():
    """The unmutated wires used by the reject cases all decode."""
    for wire in valid_wires().values():
        assert decode(wire, expected_numel=600).shape == (600,)


def any_value():
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=64),
        st.lists(st.integers(), max_size=3),
        st.sampled_from(CODEC_IDS),
        st.sampled_from([0, 1, 8, 16, 599, 600, 601]),
    )


@st.composite
def mutated_wires(draw):
    wires = list(valid_wires().values())
    wire = dict(draw(st.sampled_from(wires)))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(wire) + ["extra"]))
        action = draw(st.sampled_from(["drop", "set", "flip", "truncate", "extend"]))
        value = wire.get(key)
        if action == "drop":
            wire.pop(key, None)
        elif action == "set" or not isinstance(value, bytes) or not value:
            wire[key] = draw(any_value())
        elif action == "flip":
            data = bytearray(value)
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
            wire[key] = bytes(data)
        elif action == "truncate":
            wire[key] = value[: draw(st.integers(0, len(value) - 1))]
        else:
            wire[key] = value + draw(st.binary(min_size=1, max_size=8))
    return wire


@settings(max_examples=400, deadline=None)
@given(wire=mutated_wires())
def test_fuzzed_wires_only_ever_reject_or_decode_a_finite_vector_of_the_right_length(wire):
    """Random mutations of valid wires raise only Reject, or decode to 600 finite float32 values."""
    try:
        y = decode(wire, expected_numel=600, max_numel=10_000)
    except errors.Reject:
        return
    assert y.dtype == np.float32 and y.shape == (600,)
    assert np.isfinite(y).all()


# ----------------------------------------------------------------------------- bench CLI


def test_bench_codecs_cli_prints_json_rows_for_every_codec():
    """`p2pfm bench codecs --size 100000 --json` prints one row per codec with the documented keys."""
    result = subprocess.run(
        [sys.executable, "-m", "p2pfm", "bench", "codecs", "--size", "100000", "--json", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["codec"] for row in rows] == ["none", "fp16", "int8", "topk-int8", "topk-fp16"]
    for row in rows:
        assert {"codec", "bits_per_param", "encode_mb_s", "decode_mb_s", "rel_error"} <= set(row)
        assert all(
            math.isfinite(row[key]) for key in ("bits_per_param", "encode_mb_s", "decode_mb_s", "rel_error")
        )
    by_codec = {row["codec"]: row for row in rows}
    assert by_codec["none"]["rel_error"] == 0.0
    assert by_codec["topk-int8"]["bits_per_param"] <= 0.5
