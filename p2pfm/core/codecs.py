"""Update codecs: a flat float32 vector to a msgpack-friendly dict of primitives, and back.

A gossip update is the whole model's parameter difference, flattened to one 1-D float32
vector. :func:`encode` turns it into a plain dict (``str``, ``int``, ``bytes`` only) that
travels as a field of the signed envelope; :func:`decode` validates *everything* in such a
dict and raises a :class:`~p2pfm.core.errors.Reject` subclass on the first broken rule.
The normative description (field tables, bit layouts, error bounds, [REJECT] rules) is
``protocols/codecs.md``; golden vectors live in ``protocols/vectors/codecs/``.

Each codec is one :class:`Codec` subclass in the registry :data:`CODECS`, keyed by its id
(which travels in the ``codec`` field); :func:`encode`, :func:`decode` and
:func:`encoded_size_estimate` only dispatch, after the checks every codec needs. Built in:

- ``none``  fp32 little-endian, lossless. 32 bits/param.
- ``fp16``  IEEE half, saturating at +-65504. 16 bits/param.
- ``int8``  blockwise absmax: per block of ``block`` elements one fp32 scale
            ``s = absmax/127``, values ``q = round(x/s)`` in [-127, 127]. ~8.1 bits/param.
- ``topk``  exactly ``k`` entries of largest magnitude (ties -> lower index), indices as
            LEB128 varints of their gaps, values int8 (blockwise absmax) or fp16.
            At 1 % with int8 values: ~0.18 bits/param.

Everything is vectorised numpy (no Python loop per element): encode and decode of int8
and topk run at several hundred MB/s of fp32 input on one core (``p2pfm bench codecs``).
The one exception is small: a top-k of at most 128 indices (256 index bytes), or one int8
block, is handled with Python ints or numpy scalars, where numpy's fixed cost per call would
dominate (the simulator's 2,762-parameter model sends 28 values); the results are the same bits.
Bytes are always read with explicit little-endian dtypes; nothing is ever unpickled.

:func:`encode_sparse` and :func:`decode_sparse` give the same vectors as :class:`SparseVector`,
kept as indices and values for topk: the gossip learner never builds a dense copy of a top-k
update (0.5 GB each at 124M parameters) except in the one buffer it reuses every round.
"""

from __future__ import annotations

import itertools
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import numpy as np

from p2pfm.config import ConfigError, require
from p2pfm.core.errors import (
    BadIndex,
    NonFinite,
    Oversize,
    SchemaViolation,
    ShapeMismatch,
    UnknownCodec,
)

MAX_NUMEL = 1 << 32
"""Largest vector any codec carries (4 Gi params); gaps then fit a 5-byte varint."""

MAX_BLOCK = 1 << 20
"""Largest int8 block. Blocks are a quality/size knob; beyond this one scale is as good."""

MAX_VARINT_BYTES = 5
"""ceil(32 / 7): enough for any gap below MAX_NUMEL; longer groups are rejected."""

FP16_MAX = 65504.0
"""Largest finite half; the fp16 paths saturate here instead of producing inf."""

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("i1")
_U8 = np.dtype("u1")
_U32 = np.dtype("<u4")

# q * s stays finite iff the exact product is below FLT_MAX + half an ulp (round to nearest).
_SCALE_PRODUCT_LIMIT = 2.0**128 - 2.0**103
_F32_127 = np.float32(127.0)
_F32_ONE = np.float32(1.0)
_F32_INF = np.float32(np.inf)
_F32_ZERO = np.float32(0.0)

# Top-k threshold estimation: a fixed-seed subsample, so the *work* is reproducible; the
# *result* never depends on it (the selection is exact whatever the sample says).
_TOPK_SAMPLE = 65536
_TOPK_SEED = 0x7032_7066


@dataclass(frozen=True)
class CodecSpec:
    """How a sender compresses its updates. Receivers do not need it: the wire is self-describing."""

    name: str = "topk"
    """Codec id, a key of CODECS. topk + int8 + error feedback is the default: ~0.2 bits/param."""

    topk_fraction: float = 0.01
    """Share of entries topk keeps: k = max(1, ceil(fraction * numel)). 1 % as in DGC/CHOCO."""

    value_bits: Literal[8, 16] = 8
    """topk value format: 8 = int8 with blockwise absmax scales, 16 = fp16."""

    block_size: int = 256
    """Elements per int8 scale (int8 codec and topk int8 values): 4 B per 256 = 0.125 bits/value."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str) and self.name in CODECS,
            "name",
            f"must be one of {', '.join(CODECS)}, got {self.name!r}",
        )
        fraction = self.topk_fraction
        require(
            isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 < fraction <= 1.0,
            "topk_fraction",
            f"must be a number in (0, 1], got {fraction!r}",
        )
        require(
            self.value_bits in (8, 16) and not isinstance(self.value_bits, bool),
            "value_bits",
            f"must be 8 or 16, got {self.value_bits!r}",
        )
        block = self.block_size
        require(
            isinstance(block, int) and not isinstance(block, bool) and 1 <= block <= MAX_BLOCK,
            "block_size",
            f"must be an integer in [1, {MAX_BLOCK}], got {block!r}",
        )


# --------------------------------------------------------------------------- the interface

COMMON_FIELDS: Mapping[str, type] = {"codec": str, "numel": int}
"""The fields every codec map starts with: the id and the element count checked before any byte string."""


class Codec(ABC):
    """One wire format: an id, an encoder, a field table, a decoder and a size estimate.

    A new codec is a subclass registered with :func:`register_codec`, its section in
    ``protocols/codecs.md`` and its golden vectors; nothing else changes. What every codec
    needs is done around it, once, so no codec can forget it: :func:`encode` checks the input
    vector; :func:`decode` checks that the wire is a map, looks its id up in :data:`CODECS`,
    checks the field set and exact types against :meth:`fields` and ``numel`` against the
    receiver's limits, all before the codec reads a byte string. Codecs are stateless:
    knobs come from the :class:`CodecSpec`, everything else from the wire.
    """

    id: ClassVar[str]
    """The wire name: the ``codec`` field of every map this codec writes."""

    FIELDS: ClassVar[Mapping[str, type]]
    """The field table (name -> exact type: str, int or bytes), COMMON_FIELDS first, in wire order."""

    def fields(self, wire: dict[str, Any]) -> Mapping[str, type]:
        """The field table this map must match exactly (ints are also checked to be non-negative).

        A codec whose field set depends on a variant field (topk's ``value_bits``) overrides
        this, checks that field and raises SchemaViolation if it is bad.
        """
        return self.FIELDS

    @abstractmethod
    def encode(
        self, x: np.ndarray, spec: CodecSpec, *, with_decoded: bool
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """The wire map of ``x`` and, if ``with_decoded``, the vector :meth:`decode` returns for it.

        ``x`` is 1-D contiguous float32 with 1..MAX_NUMEL elements; NaN or Inf in it must raise
        ValueError (a local bug, never sent; the built-in codecs raise :class:`NonFiniteVector`, and
        the learner refuses a non-finite delta before any codec sees it). The map holds ``codec`` and ``numel`` first, then
        this codec's fields in table order. The decoded vector must be bit-identical to
        decoding the map (error feedback relies on it) and fresh (the caller may write to it);
        a flag rather than always building it because it costs a pass over the output that
        plain :func:`encode` does not need.
        """

    @abstractmethod
    def decode(self, wire: dict[str, Any], numel: int) -> np.ndarray:
        """The ``numel`` finite float32 values a map carries, or the Reject of the first broken rule.

        The map already matches :meth:`fields` and its ``numel`` is what the receiver
        expects: check lengths before contents, tag each check ``[REJECT]`` as in the spec.
        """

    @abstractmethod
    def size_estimate(self, numel: int, spec: CodecSpec) -> int:
        """msgpack bytes of :meth:`encode`'s map for ``numel`` elements (exact unless data-dependent)."""


CODECS: dict[str, Codec] = {}
"""The codec registry: wire id -> codec. Insertion order is the order names are listed in."""


def register_codec(codec: Codec, *, replace: bool = False) -> Codec:
    """Add ``codec`` to :data:`CODECS` under its id and return it.

    A taken id is a ValueError unless ``replace``; so is a field table without COMMON_FIELDS first.
    """
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a Codec instance, got {type(codec).__name__}")
    name = getattr(codec, "id", None)
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        raise ValueError(f"codec id must be a string of 1..32 characters, got {name!r}")
    table = getattr(codec, "FIELDS", None)
    if not isinstance(table, Mapping) or list(table.items())[:2] != list(COMMON_FIELDS.items()):
        # decode reads numel from every map before the codec does: the table must have it
        raise ValueError(f"codec {name!r}: FIELDS must start with COMMON_FIELDS (codec: str, numel: int)")
    if not set(table.values()) <= {str, int, bytes}:
        raise ValueError(f"codec {name!r}: field types must be str, int or bytes (msgpack str, int, bin)")
    if name in CODECS and not replace:
        raise ValueError(f"codec id {name!r} is already registered")
    CODECS[name] = codec
    return codec


def topk_count(numel: int, fraction: float) -> int:
    """k = max(1, ceil(fraction * numel)), never more than numel."""
    return min(numel, max(1, math.ceil(fraction * numel)))


# --------------------------------------------------------------------------- encode


def encode(vector: np.ndarray, spec: CodecSpec) -> dict[str, Any]:
    """Compress a 1-D float32 vector; the dict holds only str, int and bytes, in canonical key order.

    Raises ValueError (a local bug, not a Reject) for non-float32, non-1-D, empty,
    oversized or non-finite input.
    """
    return _encode(vector, spec, with_decoded=False)[0]


def encode_with_decoded(vector: np.ndarray, spec: CodecSpec) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`encode`, plus the float32 vector every receiver will reconstruct from the wire.

    The second item is bit-identical to ``decode(wire, expected_numel=vector.size)`` (a test
    checks it for every codec), but is built from the encoder's own arrays instead of parsing
    and re-validating the bytes just produced. Error feedback needs exactly this vector every
    round; for small models decoding our own wire again used to cost as much as encoding it.
    The returned array is fresh: the caller may modify it.
    """
    wire, decoded = _encode(vector, spec, with_decoded=True)
    if decoded is None:
        raise TypeError(f"codec {spec.name!r} returned no decoded vector")  # breaks Codec.encode's contract
    return wire, decoded


def _encode(
    vector: np.ndarray, spec: CodecSpec, *, with_decoded: bool
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The one entry behind :func:`encode` and :func:`encode_with_decoded`: check, then dispatch.

    The codecs compute the decoded vector with the same operations :func:`decode` applies to
    the bytes (fp16 -> fp32 cast, int8 * fp32 scale per block, scatter into zeros), from arrays
    that hold exactly those bytes, so both paths give the same bits.
    """
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    x = _check_input(vector)
    return _codec_of(spec).encode(x, spec, with_decoded=with_decoded)


def _codec_of(spec: CodecSpec) -> Codec:
    codec = CODECS.get(spec.name)
    if codec is None:  # CodecSpec checked the name; the codec was unregistered since
        raise ValueError(f"codec {spec.name!r} is not registered")
    return codec


def _index_bytes(idx: np.ndarray) -> bytes:
    """The topk ``indices`` field: :func:`varint_encode` of the gaps between sorted indices.

    The first gap is idx[0] itself. A few dozen indices (a small model's top-k) are differenced
    and encoded as Python ints, more with numpy; both give varint_encode's bytes.
    """
    if idx.size <= _SMALL_VARINT_COUNT:
        positions = idx.tolist()
        return _varint_encode_small(map(operator.sub, positions, [0, *positions[:-1]]))
    return _varint_encode_vector(_gaps(idx))


def _gaps(idx: np.ndarray) -> np.ndarray:
    """Gaps between sorted indices as uint64, the first gap being idx[0] itself (np.diff, prepend 0)."""
    gaps = np.empty(idx.size, np.uint64)
    gaps[:1] = idx[:1]
    np.subtract(idx[1:], idx[:-1], out=gaps[1:], casting="unsafe")  # sorted: never negative
    return gaps


def _check_input(vector: np.ndarray) -> np.ndarray:
    if not isinstance(vector, np.ndarray):
        raise ValueError(f"vector must be a numpy array, got {type(vector).__name__}")
    if vector.dtype != np.float32 or vector.ndim != 1:
        raise ValueError(f"vector must be 1-D float32, got {vector.ndim}-D {vector.dtype}")
    if not 1 <= vector.size <= MAX_NUMEL:
        raise ValueError(f"vector must have 1..{MAX_NUMEL} elements, got {vector.size}")
    return np.ascontiguousarray(vector)


class NonFiniteVector(ValueError):
    """A vector we were asked to encode holds NaN or Inf (local steps diverged, or a delta
    overflowed float32): nothing is sent, and the error-feedback residual is left as it was."""


def all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` without its bool array (124 MB at 124M parameters): max and min
    propagate NaN and keep inf, two allocation-free reductions."""
    return bool(np.isfinite(x.max()) and np.isfinite(x.min()))


def _require_finite(x: np.ndarray) -> None:
    if not all_finite(x):
        raise NonFiniteVector("vector contains NaN or Inf; refusing to encode it")


def _to_fp16(x: np.ndarray) -> np.ndarray:
    """x as little-endian halves; the caller sends ``.tobytes()``."""
    # Saturate instead of overflowing to inf: receivers reject inf, so inf would lose the update.
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(_F16)


def _int8_scales(absmax: np.ndarray) -> np.ndarray:
    """Per-block fp32 scales s ~ absmax/127, rounded so |x|/s <= 127 and 127*s stays finite."""
    absmax = np.abs(absmax)  # max(-0.0, +0.0) may be -0.0; canonical scales are never negative
    s = (absmax / np.float32(127.0)).astype(np.float32)
    wide = s.astype(np.float64) * 127.0
    low = wide < absmax.astype(np.float64)  # rounded down: bump up one ulp so no |q| exceeds 127
    if low.any():
        s[low] = np.nextafter(s[low], np.float32(np.inf))
    high = s.astype(np.float64) * 127.0 >= _SCALE_PRODUCT_LIMIT  # would decode to inf
    if high.any():
        s[high] = np.nextafter(s[high], np.float32(0.0))
    return s


def _quantize_int8(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax int8: returns (scales as float32, q as int8); the wire holds their bytes."""
    if x.size <= block:
        return _quantize_int8_one_block(x)
    return _quantize_int8_blocks(x, block)


def _quantize_int8_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_quantize_int8` for any size, vectorised over the blocks."""
    n = x.size
    full = n // block
    tail = n - full * block
    nblocks = full + (1 if tail else 0)
    absmax = np.empty(nblocks, np.float32)
    q = np.empty(n, _I8)
    if full:
        body = x[: full * block].reshape(full, block)  # (full, block)
        np.maximum(body.max(axis=1), -body.min(axis=1), out=absmax[:full])
    if tail:
        rest = x[full * block :]
        absmax[full] = max(rest.max(), -rest.min())
    if not np.isfinite(absmax).all():
        raise NonFiniteVector("vector contains NaN or Inf; refusing to encode it")
    scales = _int8_scales(absmax)
    safe = np.where(scales > 0, scales, np.float32(1.0))  # all-zero block: q = 0 whatever the divisor
    # No clip needed: 127*s >= absmax exactly, so |x/s| <= 127 after correctly rounded division
    # (the one-ulp-down overflow guard can give 127.00001, which still rounds to 127).
    if full:
        tmp = x[: full * block].reshape(full, block) / safe[:full, None]  # (full, block) float32
        np.rint(tmp, out=q[: full * block].reshape(full, block), casting="unsafe")  # fused cast
    if tail:
        np.rint(x[full * block :] / safe[full], out=q[full * block :], casting="unsafe")
    return scales, q


def _quantize_int8_one_block(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_quantize_int8` of a vector that fits in one block (every small model's top-k).

    The same float32 and float64 operations as :func:`_int8_scales` on one numpy float32 scalar
    instead of one-element arrays: the scale needs no array call at all, which leaves a third of
    the numpy calls. A test checks it gives the bytes of the blockwise path.
    """
    absmax = max(np.maximum.reduce(x), -np.minimum.reduce(x))
    if not math.isfinite(absmax):
        raise NonFiniteVector("vector contains NaN or Inf; refusing to encode it")
    absmax = abs(absmax)  # a float32 scalar; -0.0 becomes +0.0
    s = absmax / _F32_127  # float32 division, as in _int8_scales
    if float(s) * 127.0 < float(absmax):  # exact in float64; rounded down: one ulp up
        s = np.nextafter(s, _F32_INF)
    if float(s) * 127.0 >= _SCALE_PRODUCT_LIMIT:  # would decode to inf: one ulp down
        s = np.nextafter(s, _F32_ZERO)
    q = np.empty(x.size, _I8)
    np.rint(x / (s if s > 0 else _F32_ONE), out=q, casting="unsafe")  # all-zero: q = 0
    return np.array([s], np.float32), q


def topk_indices(x: np.ndarray, k: int, *, scratch: np.ndarray | None = None) -> np.ndarray:
    """Sorted int64 indices of exactly the k entries with the largest |x|; ties go to the lower index.

    ``scratch``: a float32 array shaped like ``x`` (not ``x`` itself) that receives ``|x|`` instead
    of a fresh one; at 124M parameters that is 0.5 GB and its first-touch page faults every round.
    Its contents afterwards are unspecified; the indices are the same either way.

    A fixed-seed subsample gives a threshold t that leaves a little more than k candidates
    (|x| >= t); only those are partitioned. If the sample was unlucky and fewer than k
    candidates pass, the full vector is used. Either way the answer is exact: every entry
    at least as large as the k-th largest is a candidate. (:mod:`p2pfm.core.tiles` finds the
    same candidates in one cache-tiled pass that also builds ``x``: the same three steps.)
    """
    n = x.size
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if scratch is not None and (scratch.shape != x.shape or scratch.dtype != np.float32 or scratch is x):
        raise ValueError("scratch must be a separate float32 array shaped like x")
    a = np.abs(x) if scratch is None else np.abs(x, out=scratch)
    if not math.isfinite(np.maximum.reduce(a)):
        raise NonFiniteVector("vector contains NaN or Inf; refusing to encode it")
    if k == n:
        return np.arange(n, dtype=np.int64)
    cand: np.ndarray | None = None
    if topk_samples(n):
        found = np.flatnonzero(a >= topk_threshold(a[topk_sample_positions(n)], n, k))
        if found.size >= k:
            cand = found
    return topk_select(a if cand is None else a[cand], k, cand)


def topk_samples(n: int) -> bool:
    """Whether a top-k of ``n`` entries estimates its threshold from a sample (else: all entries)."""
    return n > 4 * _TOPK_SAMPLE


def topk_sample_positions(n: int) -> np.ndarray:
    """The fixed-seed sample positions (with repeats) a top-k of ``n`` entries takes its threshold from."""
    return np.random.default_rng(_TOPK_SEED).integers(0, n, _TOPK_SAMPLE)


def topk_threshold(sample: np.ndarray, n: int, k: int) -> np.float32:
    """The candidate threshold from ``|x|`` at :func:`topk_sample_positions` (``sample`` is reordered).

    A rank a few standard deviations below the sample's expected count of top-k entries: a little
    more than k entries of ``|x|`` are at least the threshold, unless the sample was unlucky.
    """
    expected = _TOPK_SAMPLE * k / n
    rank = min(_TOPK_SAMPLE, math.ceil(expected + 4.0 * math.sqrt(expected) + 8.0))
    sample.partition(_TOPK_SAMPLE - rank)
    return cast(np.float32, sample[_TOPK_SAMPLE - rank])


def topk_select(values: np.ndarray, k: int, cand: np.ndarray | None) -> np.ndarray:
    """The exact top-k among candidates: ``values`` is ``|x|`` at the sorted positions ``cand``
    (None: at every position), holding every entry at least as large as the k-th largest of ``|x|``.

    Sorted int64 positions in ``x``; ties at the k-th magnitude go to the lower index.
    """
    kth = np.partition(values, values.size - k)[values.size - k]  # k-th largest magnitude
    picked = (values >= kth).nonzero()[0]  # at least k: everything above kth, and every tie with it
    if picked.size != k:  # ties at the k-th magnitude: all above it, then the lowest-index ties
        keep = values > kth
        need = k - int(np.count_nonzero(keep))
        keep[np.flatnonzero(values == kth)[:need]] = True  # cand is sorted, so lowest indices first
        picked = np.flatnonzero(keep)
    return (picked if cand is None else cand[picked]).astype(np.int64, copy=False)


# Varint streams up to these sizes are coded by a plain Python loop: for the few dozen indices
# of a small model's top-k, numpy's fixed cost per call (~20 calls) is 5-10x the loop's cost.
# Larger ones go through the vectorised code, whose cost per value is far lower. Both paths
# give the same bytes, values and Reject for every input (tests compare them).
_SMALL_VARINT_COUNT = 128
_SMALL_VARINT_BYTES = 256


def varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value (< 2**35), concatenated: 7 bits per byte, low first, high bit = more."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size <= _SMALL_VARINT_COUNT:
        return _varint_encode_small(v.tolist())
    return _varint_encode_vector(v)


def _varint_encode_vector(v: np.ndarray) -> bytes:
    """:func:`varint_encode` of a uint64 array, vectorised: a few passes per byte position."""
    if v.size == 0:
        return b""
    lengths = np.ones(v.size, np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lengths += v >= np.uint64(1 << (7 * j))
    if (v >> np.uint64(7 * MAX_VARINT_BYTES)).any():
        raise ValueError("varint value too large")
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), _U8)
    for j in range(MAX_VARINT_BYTES):
        sel = np.flatnonzero(lengths > j) if j else None
        vj = v if sel is None else v[sel]
        if vj.size == 0:
            break
        lj = lengths if sel is None else lengths[sel]
        sj = starts if sel is None else starts[sel]
        byte = (vj >> np.uint64(7 * j)) & np.uint64(0x7F)
        byte |= (lj > j + 1).astype(np.uint64) << np.uint64(7)  # continuation bit
        out[sj + j] = byte
    return out.tobytes()


def _varint_encode_small(values: Iterable[int]) -> bytes:
    """:func:`varint_encode` for a short list of Python ints (same bytes, same ValueError)."""
    out = bytearray()
    append = out.append
    for value in values:
        if value >> (7 * MAX_VARINT_BYTES):
            raise ValueError("varint value too large")
        while value >= 0x80:
            append((value & 0x7F) | 0x80)
            value >>= 7
        append(value)
    return bytes(out)


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """Exactly ``count`` canonical LEB128 values from ``data`` as uint64; BadIndex/ShapeMismatch otherwise."""
    if len(data) <= _SMALL_VARINT_BYTES:
        return np.array(_varint_decode_small(data, count), dtype=np.uint64)
    return _varint_decode_vector(data, count)


def _varint_decode_vector(data: bytes, count: int) -> np.ndarray:
    """:func:`varint_decode`, vectorised: terminators, lengths and shifts as whole arrays."""
    b = np.frombuffer(data, _U8)
    if b.size and b[-1] & 0x80:
        # [REJECT] the last varint has its continuation bit set: truncated.
        raise BadIndex("indices: last varint is truncated (continuation bit set on the final byte)")
    ends = np.flatnonzero(b < 0x80)  # one terminator byte per value
    if ends.size != count:
        # [REJECT] the index bytes hold a different number of varints than k.
        raise ShapeMismatch(f"indices: {ends.size} varints, expected k={count}")
    if count == 0:
        return np.zeros(0, np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > MAX_VARINT_BYTES:
        # [REJECT] a varint longer than 5 bytes overflows every valid index.
        raise BadIndex(f"indices: varint of {longest} bytes overflows (at most {MAX_VARINT_BYTES})")
    if longest == 1:
        return b.astype(np.uint64)
    if ((lengths > 1) & (b[ends] == 0)).any():
        # [REJECT] overlong encoding (trailing zero group): one value, one byte string.
        raise BadIndex("indices: non-canonical varint (overlong encoding)")
    payload = (b & 0x7F).astype(np.uint64)
    shift = (np.arange(b.size, dtype=np.int64) - np.repeat(starts, lengths)) * 7
    payload <<= shift.astype(np.uint64)
    return np.add.reduceat(payload, starts)


def _varint_decode_small(data: bytes, count: int) -> list[int]:
    """:func:`varint_decode` for a short byte string, as Python ints: the same rules, in the same order.

    The whole string is scanned before any rule is applied, so the Reject (and its text, which
    names the longest varint) is the one the vectorised path raises.
    """
    if data and data[-1] & 0x80:
        # [REJECT] the last varint has its continuation bit set: truncated.
        raise BadIndex("indices: last varint is truncated (continuation bit set on the final byte)")
    values: list[int] = []
    append = values.append
    longest = 1
    overlong = False
    value = shift = 0
    for byte in data:
        if byte & 0x80:  # a continuation byte: 7 more bits of the current value
            value |= (byte & 0x7F) << shift
            shift += 7
        elif shift:  # the last byte of a varint of shift // 7 + 1 bytes
            append(value | (byte << shift))
            if shift >= 7 * longest:
                longest = shift // 7 + 1
            if not byte:
                overlong = True
            value = shift = 0
        else:  # a one-byte varint, the common case for dense top-k indices
            append(byte)
    if len(values) != count:
        # [REJECT] the index bytes hold a different number of varints than k.
        raise ShapeMismatch(f"indices: {len(values)} varints, expected k={count}")
    if longest > MAX_VARINT_BYTES:
        # [REJECT] a varint longer than 5 bytes overflows every valid index.
        raise BadIndex(f"indices: varint of {longest} bytes overflows (at most {MAX_VARINT_BYTES})")
    if overlong:
        # [REJECT] overlong encoding (trailing zero group): one value, one byte string.
        raise BadIndex("indices: non-canonical varint (overlong encoding)")
    return values


# --------------------------------------------------------------------------- decode


def decode(wire: Any, *, expected_numel: int, max_numel: int | None = None) -> np.ndarray:
    """Validate a wire dict and return the float32 vector it carries (length expected_numel, all finite).

    Every broken rule raises its Reject subclass (UnknownCodec, SchemaViolation, Oversize,
    ShapeMismatch, BadIndex, NonFinite); checks run cheapest first, sizes before contents:
    the map, the id and the field table here, then the codec's own rules.
    """
    codec, n = _checked_codec(wire, expected_numel, max_numel)
    return codec.decode(wire, n)


def _checked_codec(wire: Any, expected_numel: int, max_numel: int | None) -> tuple[Codec, int]:
    """The map's codec and numel after the checks every codec shares (:func:`decode`'s first half)."""
    expected_numel = operator.index(expected_numel)  # int or numpy integer; TypeError otherwise
    if not 1 <= expected_numel <= MAX_NUMEL:
        raise ValueError(f"expected_numel must be in [1, {MAX_NUMEL}], got {expected_numel!r}")
    codec = _check_schema(wire)
    n = wire["numel"]
    limit = MAX_NUMEL if max_numel is None else min(max_numel, MAX_NUMEL)
    if n > limit:
        # [REJECT] more elements than the receiver accepts; checked before any allocation.
        raise Oversize(f"numel={n} exceeds the limit {limit}")
    if n != expected_numel:
        # [REJECT] the update does not fit the receiver's model.
        raise ShapeMismatch(f"numel={n}, expected {expected_numel}")
    return codec, n


# --------------------------------------------------------------------------- sparse forms
# A top-k update of a 124M-parameter model is ~1.2M values, 1 % of its dense 0.5 GB vector. The
# gossip learner keeps its own sent update and the received ones in this form and scatters them
# into one reused buffer when it needs dense arithmetic, instead of holding a dense copy of each.


@dataclass(frozen=True, eq=False)
class SparseVector:
    """A float32 vector of ``numel`` entries: ``values`` at the sorted, distinct ``indices``, +0.0 elsewhere.

    ``indices`` None: ``values`` is the whole vector (a dense codec's). :meth:`dense` is bit for bit
    what :func:`decode` returns for the same wire (or ``encode_with_decoded``'s vector).
    """

    numel: int
    values: np.ndarray
    indices: np.ndarray | None = None

    @classmethod
    def zeros(cls, numel: int) -> SparseVector:
        return cls(numel, np.zeros(0, np.float32), np.zeros(0, np.int64))

    def dense(self) -> np.ndarray:
        """The vector as a float32 array (fresh for sparse forms; the dense values themselves otherwise)."""
        if self.indices is None:
            return self.values
        out = np.zeros(self.numel, np.float32)
        out[self.indices] = self.values
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(sparse)`` is :meth:`dense` (a fresh model-sized array: for tests and small models)."""
        dense = self.dense()
        return dense if dtype is None else dense.astype(dtype)

    def scatter(self, out: np.ndarray) -> None:
        """Write the stored entries into ``out`` (all of it for a dense form); a zero ``out`` becomes the vector."""
        if self.indices is None:
            np.copyto(out, self.values)
        else:
            out[self.indices] = self.values

    def clear(self, out: np.ndarray) -> None:
        """Set back to +0.0 what :meth:`scatter` wrote."""
        if self.indices is None:
            out.fill(0.0)
        else:
            out[self.indices] = 0.0

    def nonzero(self) -> np.ndarray:
        """Sorted int64 positions of the nonzero entries (what ``np.flatnonzero(self.dense())`` gives)."""
        if self.indices is None:
            return np.flatnonzero(self.values)
        return self.indices[self.values != 0]


def encode_sparse(
    vector: np.ndarray,
    spec: CodecSpec,
    *,
    scratch: np.ndarray | None = None,
    indices: np.ndarray | None = None,
) -> tuple[dict[str, Any], SparseVector]:
    """:func:`encode_with_decoded`, with the decoded vector kept sparse where the codec is (topk).

    The wire is the one :func:`encode` gives. ``scratch`` (topk only; see :func:`topk_indices`)
    takes the encoder's model-sized temporary; a dense codec ignores it. ``indices`` (topk only):
    what ``topk_indices(vector, k)`` returns, found by the caller (:mod:`p2pfm.core.tiles` finds
    them while it builds ``vector``, which it also checked finite); they are not searched again.
    """
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    x = _check_input(vector)
    codec = _codec_of(spec)
    if isinstance(codec, TopkCodec):
        wire, idx, values = codec.encode_parts(x, spec, with_decoded=True, scratch=scratch, indices=indices)
        if values is None:  # with_decoded=True always gives values
            raise TypeError("topk returned no decoded values")
        return wire, SparseVector(int(x.size), values, idx)
    if indices is not None:
        raise ValueError(f"indices are for the topk codec, not {spec.name!r}")
    wire, dense = encode_with_decoded(x, spec)
    return wire, SparseVector(int(x.size), dense)


def encode_difference(
    a: np.ndarray,
    b: np.ndarray,
    spec: CodecSpec,
    *,
    chunk_elements: int = 1 << 20,
    after_block: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """:func:`encode` of ``a - b``; for int8 a block-aligned chunk at a time, with no full-size temporary.

    A 124M-parameter peer answering a consensus pull or confirming a joiner's state encoded
    ``params - initial`` (0.5 GB) through int8, whose division made another 0.5 GB: the peak of a
    whole bench run. int8 works block by block, so chunks that start on a block boundary give the
    same scales and values, byte for byte (a test compares them); only the two output arrays are
    full-size (1 byte per value). Other codecs get ``encode(a - b, spec)``.

    ``after_block(start, end)`` is called once elements ``[start, end)`` of both inputs have been
    read for the last time (once, with ``(0, n)``, for other codecs): a caller whose ``b`` is a
    file mapping takes the pages it just read back out of its resident set (0.5 GB at 124M).
    """
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape:
        raise ValueError("a and b must be numpy arrays of the same shape")
    if spec.name != "int8" or not isinstance(_codec_of(spec), Int8Codec):
        wire = encode(a - b, spec)
        if after_block is not None:
            after_block(0, int(a.size))
        return wire
    x, y = _check_input(a), _check_input(b)  # 1-D float32 of an allowed size
    n, block = int(x.size), spec.block_size
    step = max(1, chunk_elements // block) * block
    scales = np.empty(-(-n // block), np.float32)
    q = np.empty(n, _I8)
    for start in range(0, n, step):
        end = min(n, start + step)
        chunk_scales, chunk_q = _quantize_int8(x[start:end] - y[start:end], block)  # checks finiteness
        scales[start // block : start // block + chunk_scales.size] = chunk_scales
        q[start:end] = chunk_q
        if after_block is not None:
            after_block(start, end)
    return {"codec": "int8", "numel": n, "block": block, "scales": scales.tobytes(), "values": q.tobytes()}


def decode_sparse(wire: Any, *, expected_numel: int, max_numel: int | None = None) -> SparseVector:
    """:func:`decode` (the same checks and Rejects, in the same order), kept sparse for topk."""
    codec, n = _checked_codec(wire, expected_numel, max_numel)
    if isinstance(codec, TopkCodec):
        idx, values = codec.decode_parts(wire, n)
        return SparseVector(n, values, np.asarray(idx, dtype=np.int64))
    return SparseVector(n, codec.decode(wire, n))


def _topk_positions(indices: bytes, k: int, n: int) -> np.ndarray | list[int]:
    """The k positions a topk wire's index bytes encode, checked: strictly increasing, below numel.

    A short stream stays in Python ints throughout (varints, zero-gap check, running sum):
    for a small model's few dozen indices numpy's fixed cost per call was most of the work.
    A long one is done in numpy. Both apply the same two rules, in the same order, with the
    same texts (tests compare them on both sides of the switch).
    """
    if len(indices) <= _SMALL_VARINT_BYTES:
        gaps = _varint_decode_small(indices, k)
        if 0 in gaps[1:]:
            # [REJECT] a zero gap after the first index: duplicated / not strictly increasing.
            raise BadIndex("indices: not strictly increasing (zero gap)")
        positions = list(itertools.accumulate(gaps))
        if positions[-1] >= n:
            # [REJECT] the last (largest) index is out of bounds.
            raise BadIndex(f"indices: index {positions[-1]} out of bounds for numel={n}")
        return positions
    gaps_array = _varint_decode_vector(indices, k)
    if k > 1 and not gaps_array[1:].all():
        # [REJECT] a zero gap after the first index: duplicated / not strictly increasing.
        raise BadIndex("indices: not strictly increasing (zero gap)")
    idx = gaps_array.cumsum()  # uint64; no overflow: k * 2**35 < 2**64
    if idx[-1] >= n:
        # [REJECT] the last (largest) index is out of bounds.
        raise BadIndex(f"indices: index {int(idx[-1])} out of bounds for numel={n}")
    return idx.astype(np.int64)


def _check_schema(wire: Any) -> Codec:
    """The registered codec of a wire map whose field set and types match that codec's table."""
    if not isinstance(wire, dict):
        # [REJECT] the codec field of a message must be a map.
        raise SchemaViolation(f"codec wire must be a map, got {type(wire).__name__}")
    name = wire.get("codec")
    if not isinstance(name, str):
        # [REJECT] missing or non-string codec id.
        raise SchemaViolation("field 'codec' missing or not a string")
    codec = CODECS.get(name)
    if codec is None:
        # [REJECT] codec id not in the registry.
        raise UnknownCodec(f"codec {name[:32]!r} is not one of {', '.join(CODECS)}")
    schema = codec.fields(wire)  # a variant field (topk's value_bits) is checked here
    keys = set(wire)
    if keys != set(schema):
        missing = sorted(map(str, set(schema) - keys))
        extra = sorted(map(repr, keys - set(schema)))
        # [REJECT] exactly the fields of the codec's table, no more, no fewer.
        raise SchemaViolation(f"{name}: missing fields {missing}, unexpected fields {extra}")
    for field_name, kind in schema.items():
        value = wire[field_name]
        if type(value) is not kind:  # exact types: bool is not int, bytearray is not bytes
            # [REJECT] wrong msgpack type for a field.
            raise SchemaViolation(f"field {field_name!r} must be {kind.__name__}, got {type(value).__name__}")
        if kind is int and cast(int, value) < 0:  # cast: mypy narrows value to object above
            # [REJECT] negative counts.
            raise SchemaViolation(f"field {field_name!r} must be non-negative, got {value}")
    return codec


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_block(block: int) -> int:
    if not 1 <= block <= MAX_BLOCK:
        # [REJECT] block outside [1, MAX_BLOCK].
        raise SchemaViolation(f"field 'block' must be in [1, {MAX_BLOCK}], got {block}")
    return block


def _check_len(name: str, data: bytes, expected: int) -> None:
    if len(data) != expected:
        # [REJECT] byte length disagrees with numel / k / block count.
        raise ShapeMismatch(f"field {name!r} has {len(data)} bytes, expected {expected}")


def _fp16_values(data: bytes) -> np.ndarray:
    bits = np.frombuffer(data, np.dtype("<u2"))
    if ((bits & 0x7C00) == 0x7C00).any():  # exponent all ones: inf or NaN
        # [REJECT] NaN or Inf among fp16 values.
        raise NonFinite("values: NaN or Inf in fp16 values")
    return np.frombuffer(data, _F16).astype(np.float32)


def _dequantize_int8(scales_bytes: bytes, q_bytes: bytes, n: int, block: int) -> np.ndarray:
    scales = np.frombuffer(scales_bytes, _F32)
    # One comparison accepts every valid scale vector (see _MAX_SCALE_BITS); only a failing one
    # goes through the three rules below, in order, to name the right reason. A single scale (a
    # small top-k) is compared as a Python int: no array call for one number.
    if len(scales_bytes) == 4:
        worst = int.from_bytes(scales_bytes, "little")
    else:
        worst = int(np.maximum.reduce(np.frombuffer(scales_bytes, _U32)))
    if worst > _MAX_SCALE_BITS:
        if not np.isfinite(scales).all():
            # [REJECT] NaN or Inf scale.
            raise NonFinite("scales: NaN or Inf")
        if np.signbit(scales).any():
            # [REJECT] negative scale, -0.0 included (canonical scales are absmax/127 >= +0).
            raise SchemaViolation("scales: negative scale")
        wide = scales.astype(np.float64)
        if (wide * 127.0 >= _SCALE_PRODUCT_LIMIT).any():
            # [REJECT] 127 * scale overflows float32: the decoded values would be infinite.
            raise NonFinite("scales: 127 * scale overflows float32")
        raise AssertionError("unreachable: every scale above _MAX_SCALE_BITS breaks a rule")
    if b"\x80" in q_bytes:  # the int8 -128 is the byte 0x80: a C byte search, no array needed
        # [REJECT] -128 is never produced (symmetric range [-127, 127]).
        raise SchemaViolation("values: int8 value -128 outside [-127, 127]")
    q = np.frombuffer(q_bytes, _I8)
    return _dequantize(scales, q, n, block)


def _dequantize(scales: np.ndarray, q: np.ndarray, n: int, block: int) -> np.ndarray:
    """q * scale of its block, as float32: the one formula both decode and encode_with_decoded use."""
    out = np.empty(n, np.float32)
    full = n // block
    if full:
        np.multiply(
            q[: full * block].reshape(full, block),
            scales[:full, None],
            out=out[: full * block].reshape(full, block),
        )
    if n > full * block:
        np.multiply(q[full * block :], scales[full], out=out[full * block :])
    return out


def _largest_valid_scale_bits() -> int:
    """Bit pattern of the largest float32 scale s with 127 * s finite (exactly: below _SCALE_PRODUCT_LIMIT).

    A valid scale is +0.0 or positive, finite and at most this. As uint32, the bit patterns of
    non-negative floats sort like their values, inf and NaN above every finite one, and every
    negative float (sign bit set) above all of them: so "bits <= this" is the whole rule.
    """
    s = np.float32(_SCALE_PRODUCT_LIMIT / 127.0)
    while float(s) * 127.0 >= _SCALE_PRODUCT_LIMIT:
        s = np.nextafter(s, np.float32(0.0))
    while float(np.nextafter(s, np.float32(np.inf))) * 127.0 < _SCALE_PRODUCT_LIMIT:
        s = np.nextafter(s, np.float32(np.inf))
    return int(np.array([s], _F32).view(_U32)[0])


_MAX_SCALE_BITS = _largest_valid_scale_bits()


# --------------------------------------------------------------------------- sizes


def _bin_len(size: int) -> int:
    """msgpack bytes of a bin (or str) object of ``size`` payload bytes."""
    return size + (2 if size < 1 << 8 else 3 if size < 1 << 16 else 5)


def _int_len(value: int) -> int:
    """msgpack bytes of a non-negative int."""
    if value < 128:
        return 1
    return 2 if value < 1 << 8 else 3 if value < 1 << 16 else 5 if value < 1 << 32 else 9


def _str_len(text: str) -> int:
    size = len(text.encode())
    return 1 + size if size < 32 else _bin_len(size)


def _map_len(codec_id: str, numel: int, **value_sizes: int) -> int:
    """msgpack bytes of a codec map: header, keys and values (``codec`` and ``numel`` added here)."""
    sizes = {"codec": _str_len(codec_id), "numel": _int_len(numel), **value_sizes}
    map_header = 1  # fixmap: fewer than 16 fields
    return map_header + sum(_str_len(name) + size for name, size in sizes.items())


def encoded_size_estimate(numel: int, spec: CodecSpec) -> int:
    """msgpack bytes of encode(vector, spec) for a vector of numel elements (before the envelope).

    Exact for none, fp16 and int8. For topk the index bytes depend on where the kept
    entries fall; the estimate assumes they are spread at random (geometric gaps of mean
    numel/k), which is what error feedback produces in practice.
    """
    if numel < 1:
        raise ValueError("numel must be >= 1")
    return _codec_of(spec).size_estimate(numel, spec)


# --------------------------------------------------------------------------- the built-in codecs
# One class per section of protocols/codecs.md; each [REJECT] comment names a rule listed there.


class NoneCodec(Codec):
    """``none``: the fp32 bytes as they are. Lossless; the reference the lossy codecs are measured against."""

    id = "none"
    FIELDS: ClassVar[Mapping[str, type]] = {**COMMON_FIELDS, "values": bytes}

    def encode(
        self, x: np.ndarray, spec: CodecSpec, *, with_decoded: bool
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        _require_finite(x)
        wire: dict[str, Any] = {
            "codec": "none",
            "numel": int(x.size),
            "values": x.astype(_F32, copy=False).tobytes(),
        }
        return wire, (x.copy() if with_decoded else None)  # lossless: the bytes are x

    def decode(self, wire: dict[str, Any], numel: int) -> np.ndarray:
        _check_len("values", wire["values"], 4 * numel)
        out = np.frombuffer(wire["values"], _F32).astype(np.float32)
        if not (np.isfinite(out.max()) and np.isfinite(out.min())):
            # [REJECT] NaN or Inf among the values.
            raise NonFinite("values: NaN or Inf in fp32 values")
        return out

    def size_estimate(self, numel: int, spec: CodecSpec) -> int:
        return _map_len(self.id, numel, values=_bin_len(4 * numel))


class Fp16Codec(Codec):
    """``fp16``: IEEE halves, saturating at +-65504 so a large value is not lost as an Inf."""

    id = "fp16"
    FIELDS: ClassVar[Mapping[str, type]] = {**COMMON_FIELDS, "values": bytes}

    def encode(
        self, x: np.ndarray, spec: CodecSpec, *, with_decoded: bool
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        _require_finite(x)
        half = _to_fp16(x)
        wire = {"codec": "fp16", "numel": int(x.size), "values": half.tobytes()}
        return wire, (half.astype(np.float32) if with_decoded else None)

    def decode(self, wire: dict[str, Any], numel: int) -> np.ndarray:
        _check_len("values", wire["values"], 2 * numel)
        return _fp16_values(wire["values"])

    def size_estimate(self, numel: int, spec: CodecSpec) -> int:
        return _map_len(self.id, numel, values=_bin_len(2 * numel))


class Int8Codec(Codec):
    """``int8``: blockwise absmax, one fp32 scale per ``block`` int8 values (~8.1 bits/param)."""

    id = "int8"
    FIELDS: ClassVar[Mapping[str, type]] = {**COMMON_FIELDS, "block": int, "scales": bytes, "values": bytes}

    def encode(
        self, x: np.ndarray, spec: CodecSpec, *, with_decoded: bool
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        n = int(x.size)
        scales, q = _quantize_int8(x, spec.block_size)  # checks finiteness via the block maxima
        wire = {
            "codec": "int8",
            "numel": n,
            "block": spec.block_size,
            "scales": scales.tobytes(),
            "values": q.tobytes(),
        }
        return wire, (_dequantize(scales, q, n, spec.block_size) if with_decoded else None)

    def decode(self, wire: dict[str, Any], numel: int) -> np.ndarray:
        block = _check_block(wire["block"])
        nblocks = -(-numel // block)
        _check_len("scales", wire["scales"], 4 * nblocks)
        _check_len("values", wire["values"], numel)
        return _dequantize_int8(wire["scales"], wire["values"], numel, block)

    def size_estimate(self, numel: int, spec: CodecSpec) -> int:
        return _map_len(
            self.id,
            numel,
            block=_int_len(spec.block_size),
            scales=_bin_len(4 * -(-numel // spec.block_size)),
            values=_bin_len(numel),
        )


class TopkCodec(Codec):
    """``topk``: exactly k largest-magnitude entries, varint index gaps, int8 or fp16 values.

    The field set depends on ``value_bits`` (int8 values carry ``block`` and ``scales``), so
    :meth:`fields` checks that variant before the table is applied.
    """

    id = "topk"
    FIELDS_FP16: ClassVar[Mapping[str, type]] = {
        **COMMON_FIELDS,
        "k": int,
        "value_bits": int,
        "indices": bytes,
        "values": bytes,
    }
    FIELDS: ClassVar[Mapping[str, type]] = {
        **COMMON_FIELDS,
        "k": int,
        "value_bits": int,
        "indices": bytes,
        "block": int,
        "scales": bytes,
        "values": bytes,
    }

    def fields(self, wire: dict[str, Any]) -> Mapping[str, type]:
        variant = wire.get("value_bits")
        if type(variant) is not int or variant not in (8, 16):
            # [REJECT] topk value_bits must be 8 or 16.
            raise SchemaViolation(f"field 'value_bits' must be 8 or 16, got {_short(variant)}")
        return self.FIELDS if variant == 8 else self.FIELDS_FP16

    def encode(
        self, x: np.ndarray, spec: CodecSpec, *, with_decoded: bool
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        wire, idx, values = self.encode_parts(x, spec, with_decoded=with_decoded)
        if values is None:
            return wire, None
        out = np.zeros(x.size, np.float32)
        out[idx] = values
        return wire, out

    def encode_parts(
        self,
        x: np.ndarray,
        spec: CodecSpec,
        *,
        with_decoded: bool,
        scratch: np.ndarray | None = None,
        indices: np.ndarray | None = None,
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
        """The wire map, the sorted kept indices and (if ``with_decoded``) their decoded values.

        :meth:`encode` scatters the values into zeros; :func:`encode_sparse` keeps them sparse.
        ``scratch``: see :func:`topk_indices`; ``indices``: see :func:`encode_sparse`.
        """
        n = int(x.size)
        k = topk_count(n, spec.topk_fraction)
        if indices is None:
            idx = topk_indices(x, k, scratch=scratch)  # checks finiteness
        elif indices.dtype != np.int64 or indices.shape != (k,):
            raise ValueError(f"indices must be {k} int64 positions, got {indices.dtype} {indices.shape}")
        else:
            idx = indices
        picked = x[idx]
        wire = {
            "codec": "topk",
            "numel": n,
            "k": k,
            "value_bits": spec.value_bits,
            "indices": _index_bytes(idx),
        }
        values: np.ndarray | None = None
        if spec.value_bits == 8:
            scales, q = _quantize_int8(picked, spec.block_size)
            wire.update(block=spec.block_size, scales=scales.tobytes(), values=q.tobytes())
            if with_decoded:
                values = _dequantize(scales, q, k, spec.block_size)
        else:
            half = _to_fp16(picked)
            wire["values"] = half.tobytes()
            if with_decoded:
                values = half.astype(np.float32)
        return wire, idx, values

    def decode(self, wire: dict[str, Any], numel: int) -> np.ndarray:
        idx, values = self.decode_parts(wire, numel)
        out = np.zeros(numel, np.float32)
        out[idx] = values
        return out

    def decode_parts(self, wire: dict[str, Any], numel: int) -> tuple[np.ndarray | list[int], np.ndarray]:
        """The checked positions and values of a map (every [REJECT] rule of :meth:`decode`), unscattered."""
        n = numel
        k = wire["k"]
        if wire["value_bits"] == 8:
            block = _check_block(wire["block"])
        if not 1 <= k <= n:
            # [REJECT] k outside [1, numel].
            raise ShapeMismatch(f"k={k} outside [1, numel={n}]")
        if wire["value_bits"] == 8:
            _check_len("scales", wire["scales"], 4 * -(-k // block))
            _check_len("values", wire["values"], k)
        else:
            _check_len("values", wire["values"], 2 * k)
        if len(wire["indices"]) > MAX_VARINT_BYTES * k:
            # [REJECT] more index bytes than k varints can take (cheap bound before scanning).
            raise ShapeMismatch(f"indices: {len(wire['indices'])} bytes for k={k}")
        idx = _topk_positions(wire["indices"], k, n)
        if wire["value_bits"] == 8:
            values = _dequantize_int8(wire["scales"], wire["values"], k, wire["block"])
        else:
            values = _fp16_values(wire["values"])
        return idx, values

    def size_estimate(self, numel: int, spec: CodecSpec) -> int:
        k = topk_count(numel, spec.topk_fraction)
        mean_gap = numel / k
        # P(gap >= 128**j) for geometric gaps, each adds one varint byte.
        per_index = (
            1.0 + sum(math.exp(-(128**j) / mean_gap) for j in range(1, MAX_VARINT_BYTES))
            if k < numel
            else 1.0
        )
        sizes = {
            "k": _int_len(k),
            "value_bits": _int_len(spec.value_bits),
            "indices": _bin_len(round(k * per_index)),
        }
        if spec.value_bits == 8:
            sizes.update(
                block=_int_len(spec.block_size),
                scales=_bin_len(4 * -(-k // spec.block_size)),
                values=_bin_len(k),
            )
        else:
            sizes["values"] = _bin_len(2 * k)
        return _map_len(self.id, numel, **sizes)


for _builtin in (NoneCodec(), Fp16Codec(), Int8Codec(), TopkCodec()):
    register_codec(_builtin)

CODEC_IDS = tuple(CODECS)
"""The built-in codec ids (every peer speaks these); CODECS may hold more, registered later."""


__all__ = [
    "all_finite",
    "CODECS",
    "CODEC_IDS",
    "COMMON_FIELDS",
    "Codec",
    "CodecSpec",
    "ConfigError",
    "FP16_MAX",
    "MAX_BLOCK",
    "MAX_NUMEL",
    "SparseVector",
    "decode",
    "decode_sparse",
    "encode",
    "encode_difference",
    "encode_sparse",
    "encode_with_decoded",
    "encoded_size_estimate",
    "register_codec",
    "topk_count",
    "topk_indices",
    "topk_sample_positions",
    "topk_samples",
    "topk_select",
    "topk_threshold",
    "varint_decode",
    "varint_encode",
]
