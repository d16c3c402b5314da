"""The tensor container: round trips exactly, and every corruption is a typed Reject."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfm.core.errors import Malformed, Oversize, Reject, SchemaViolation, ShapeMismatch
from p2pfm.core.tensorfile import ALLOWED_DTYPES, MAGIC, MAX_HEADER_BYTES, digest, pack_arrays, unpack_arrays


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "weights": rng.standard_normal((3, 4)).astype(np.float32),
        "half": rng.standard_normal(5).astype(np.float16),
        "round": np.array([7], dtype=np.int64),
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
        "bytes": np.frombuffer(b"hello", dtype=np.uint8),
        "signed": np.array([-128, 0, 127], dtype=np.int8),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "cube": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    }


def build(header: dict, body: bytes = b"") -> bytes:
    """A file with a hand-made header (to express corruptions pack_arrays never makes)."""
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(packed).to_bytes(8, "little") + packed + body


def entry(name="a", dtype="<f4", shape=(2,), offset=0, nbytes=8) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


# --------------------------------------------------------------------------- round trip


def test_round_trip_preserves_names_dtypes_shapes_values_and_meta():
    """Every allowed dtype and shape (1-d, empty, 3-d) comes back identical, with the meta map."""
    arrays = sample_arrays()
    meta = {"round": 12, "run_id": "r", "config": {"lr": 0.5, "tags": [1, 2]}, "hash": b"\x00\x01"}
    loaded, loaded_meta = unpack_arrays(pack_arrays(arrays, meta))
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name
    assert loaded_meta == meta


def test_zero_dimensional_array_keeps_its_value():
    """A 0-d array's single value survives (its shape comes back as (1,): see the report)."""
    loaded, _ = unpack_arrays(pack_arrays({"scalar": np.array(2.5, dtype=np.float32)}))
    assert loaded["scalar"].size == 1 and loaded["scalar"].dtype == np.float32
    assert float(loaded["scalar"].reshape(())) == 2.5


def test_round_trip_of_nothing():
    """No arrays and no meta is a valid, tiny file."""
    assert unpack_arrays(pack_arrays({})) == ({}, {})


def test_big_endian_and_non_contiguous_arrays_are_stored_little_endian_c_order():
    """Big-endian input is converted; a transposed view is stored in C order."""
    big = np.arange(4, dtype=">f4")
    view = np.arange(6, dtype=np.float32).reshape(2, 3).T
    loaded, _ = unpack_arrays(pack_arrays({"big": big, "view": view}))
    assert loaded["big"].dtype.str == "<f4" and np.array_equal(loaded["big"], big)
    assert np.array_equal(loaded["view"], view)


def test_loaded_arrays_are_writable_copies():
    """Loaded arrays own their memory (not views of the input bytes)."""
    loaded, _ = unpack_arrays(pack_arrays({"a": np.ones(3, np.float32)}))
    assert loaded["a"].flags.writeable  # a view of immutable bytes would be read-only
    loaded["a"][0] = 5.0
    assert loaded["a"][0] == 5.0


@pytest.mark.parametrize("dtype", [np.float64, np.complex64, object, np.bool_, np.uint16])
def test_pack_refuses_dtypes_outside_the_whitelist(dtype):
    """Packing a dtype the loader would refuse is a local ValueError."""
    with pytest.raises(ValueError, match="unsupported dtype"):
        pack_arrays({"a": np.zeros(2, dtype=dtype)})


def test_unpack_accepts_memoryview_and_max_bytes_at_the_limit():
    """A memoryview is accepted, and a file exactly at max_bytes passes."""
    data = pack_arrays({"a": np.ones(3, np.float32)})
    arrays, _ = unpack_arrays(memoryview(data), max_bytes=len(data))
    assert np.array_equal(arrays["a"], np.ones(3, np.float32))


def test_digest_is_sha256_of_the_bytes():
    """digest() is 32 bytes and changes when one byte changes."""
    data = pack_arrays({"a": np.ones(3, np.float32)})
    flipped = bytearray(data)
    flipped[-1] ^= 1
    assert len(digest(data)) == 32
    assert digest(data) != digest(bytes(flipped))


# --------------------------------------------------------------------------- corruptions


def test_oversize_is_rejected_before_parsing():
    """More bytes than max_bytes is Oversize even if the rest is garbage."""
    with pytest.raises(Oversize):
        unpack_arrays(b"\xff" * 100, max_bytes=99)


@pytest.mark.parametrize("data", [b"", b"P2PFMT01", b"NOTMAGIC" + bytes(8), b"p2pfmt01" + bytes(8)])
def test_bad_magic_or_too_short_is_malformed(data):
    """A file that does not start with the magic (or is shorter than 16 bytes) is Malformed."""
    with pytest.raises(Malformed, match="bad magic"):
        unpack_arrays(data)


@pytest.mark.parametrize("header_len", [MAX_HEADER_BYTES + 1, 2**64 - 1, 100])
def test_header_length_out_of_bounds_is_malformed(header_len):
    """A header length beyond the limit or beyond the data is Malformed."""
    data = MAGIC + header_len.to_bytes(8, "little") + b"\x80" * 10
    with pytest.raises(Malformed, match="header length"):
        unpack_arrays(data)


@pytest.mark.parametrize("header", [b"\xc1", b"\x92\x01", b"\x81\x01\x02", b"\xdc\xff"])
def test_header_that_is_not_msgpack_is_malformed(header):
    """Undecodable, truncated or int-keyed msgpack headers are Malformed."""
    data = MAGIC + len(header).to_bytes(8, "little") + header
    with pytest.raises(Malformed, match="msgpack"):
        unpack_arrays(data)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],  # not a map
        {"arrays": []},  # missing meta
        {"meta": {}},  # missing arrays
        {"meta": {}, "arrays": [], "extra": 1},  # extra key
        {"meta": [], "arrays": []},  # meta not a map
        {"meta": {}, "arrays": {}},  # arrays not a list
    ],
)
def test_header_with_wrong_keys_or_types_is_a_schema_violation(header):
    """The header must be exactly {meta: map, arrays: list}."""
    with pytest.raises(SchemaViolation):
        unpack_arrays(build(header))


@pytest.mark.parametrize(
    "bad_entry",
    [
        {k: v for k, v in entry().items() if k != "nbytes"},  # missing key
        {**entry(), "extra": 1},  # extra key
        "not a map",
        {**entry(), "name": 5},  # name not a string
        entry(shape=(-1,)),  # negative dimension
        entry(shape=(True,)),  # bool dimension
        {**entry(), "shape": "2"},  # shape not a list
        entry(shape=(1,) * 9),  # too many dimensions
        entry(offset=-1),
        {**entry(), "nbytes": 8.0},  # float size
        {**entry(), "offset": True},  # bool offset
    ],
)
def test_bad_array_entry_is_a_schema_violation(bad_entry):
    """Array entries must have exactly name, dtype, shape, offset, nbytes of the right types."""
    with pytest.raises(SchemaViolation):
        unpack_arrays(build({"meta": {}, "arrays": [bad_entry]}, bytes(8)))


def test_duplicate_array_name_is_a_schema_violation():
    """Two arrays of the same name are refused."""
    header = {"meta": {}, "arrays": [entry(), entry(offset=8)]}
    with pytest.raises(SchemaViolation, match="duplicate"):
        unpack_arrays(build(header, bytes(16)))


@pytest.mark.parametrize("code", ["|O", "<c8", "<f8", ">f4", "|b1", "<U4", "float32", "", 4])
def test_disallowed_dtype_is_a_schema_violation(code):
    """Object, complex, double, big-endian and any non-whitelisted dtype code is refused."""
    assert code not in ALLOWED_DTYPES
    with pytest.raises(SchemaViolation, match="dtype"):
        unpack_arrays(build({"meta": {}, "arrays": [entry(dtype=code)]}, bytes(8)))


@pytest.mark.parametrize(("shape", "nbytes"), [((2,), 4), ((2,), 12), ((3, 3), 8), ((0,), 8)])
def test_shape_disagreeing_with_nbytes_is_a_shape_mismatch(shape, nbytes):
    """nbytes must be exactly prod(shape) * itemsize."""
    header = {"meta": {}, "arrays": [entry(shape=shape, nbytes=nbytes)]}
    with pytest.raises(ShapeMismatch, match="needs"):
        unpack_arrays(build(header, bytes(nbytes)))


def test_offset_beyond_the_data_is_a_shape_mismatch():
    """An array that would read past the end of the data is refused."""
    with pytest.raises(ShapeMismatch, match="outside"):
        unpack_arrays(build({"meta": {}, "arrays": [entry()]}, bytes(4)))


def test_overlapping_arrays_are_a_shape_mismatch():
    """A second array starting inside the first is refused."""
    header = {"meta": {}, "arrays": [entry("a"), entry("b", offset=4)]}
    with pytest.raises(ShapeMismatch, match="overlaps"):
        unpack_arrays(build(header, bytes(16)))


def test_gap_between_arrays_is_a_shape_mismatch():
    """Arrays must be packed back to back: a hole is refused too."""
    header = {"meta": {}, "arrays": [entry("a"), entry("b", offset=12)]}
    with pytest.raises(ShapeMismatch):
        unpack_arrays(build(header, bytes(20)))


def test_trailing_bytes_are_a_shape_mismatch():
    """Bytes after the last array are refused (no hidden payload)."""
    data = pack_arrays({"a": np.ones(2, np.float32)}) + b"\x00"
    with pytest.raises(ShapeMismatch, match="trailing"):
        unpack_arrays(data)


def test_truncated_file_is_refused():
    """A file cut anywhere is a Reject, never an arbitrary exception or a partial result."""
    data = pack_arrays(sample_arrays(), {"k": "v"})
    for cut in range(len(data)):
        with pytest.raises(Reject):
            unpack_arrays(data[:cut])


# --------------------------------------------------------------------------- fuzz

FUZZ_BASE = pack_arrays(
    {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "n": np.array([3], np.int64),
        "b": np.arange(5, dtype=np.uint8),
    },
    {"round": 1},
)


def check_consistent(arrays: dict[str, np.ndarray]) -> None:
    for array in arrays.values():
        assert isinstance(array, np.ndarray)
        assert array.dtype.str in ALLOWED_DTYPES
        assert array.size == math.prod(array.shape)
        assert array.nbytes == array.size * array.dtype.itemsize


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(1, 255)), min_size=1, max_size=8
    ),
    cut=st.integers(0, 8),
    extra=st.binary(max_size=8),
)
def test_random_byte_flips_raise_only_reject_and_never_inconsistent_arrays(flips, cut, extra):
    """Any flipped, truncated or extended file either loads consistently or raises a Reject."""
    data = bytearray(FUZZ_BASE)
    for position, mask in flips:
        data[position] ^= mask
    data = bytes(data[: len(data) - cut]) + extra
    try:
        arrays, meta = unpack_arrays(data, max_bytes=len(FUZZ_BASE) + 8)
    except Reject:
        return
    assert isinstance(meta, dict)
    check_consistent(arrays)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_the_magic_raise_only_reject(tail):
    """Random bytes behind a valid magic never raise anything but a Reject."""
    try:
        arrays, _ = unpack_arrays(MAGIC + tail)
    except Reject:
        return
    check_consistent(arrays)
