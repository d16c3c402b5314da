"""Regenerate the golden codec vectors in ``protocols/vectors/codecs/``.

    python protocols/vectors/generate_codecs.py [OUT_DIR]   # default: this folder

Writes one folder per case under ``OUT_DIR/codecs/`` (see README below for the files).
Inputs come from ``random.Random`` with fixed seeds (a generator stable across Python
versions) plus hand-picked edge values, so running it twice gives identical files;
``tests/test_codec_vectors.py`` checks that, and checks every case in both directions
against :mod:`p2pfm.core.codecs`.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from p2pfm.core.codecs import CodecSpec, decode, encode, varint_encode
from p2pfm.core.errors import Reject, RejectReason

VECTORS_DIR = Path(__file__).resolve().parent

README = """\
# Codec vectors

Golden cases for `protocols/codecs.md` (update codecs). Each folder is one case:

- `wire.hex`: msgpack of the codec map, keys sorted (as inside the envelope's payload),
  lowercase hex, one line.
- `context.json`: the receiver's `expected_numel` and `max_numel` (null = no limit), and
  for accept cases the sender's `spec` (fields of `CodecSpec`).
- `input.json` (accept cases): the float32 input vector, as JSON numbers (exact).
- `decoded.json` (accept cases): the float32 vector the receiver reconstructs (exact).
- `expected.json`: `{"outcome": "accept"}` or `{"outcome": "reject", "reason":
  "<RejectReason value>"}`; `description` says what the case exercises.

To run a case: `decode(msgpack.unpackb(bytes.fromhex(hex), raw=False),
expected_numel=..., max_numel=...)` must return `decoded.json` bit for bit, or raise the
Reject subclass of `reason`. For accept cases, `encode(input, CodecSpec(**spec))` packed
with sorted keys must equal `wire.hex`. Regenerate with
`python protocols/vectors/generate_codecs.py` (byte-identical; a test checks it).
"""


def pack_canonical(wire: Any) -> bytes:
    """msgpack of a codec map with its keys sorted: the bytes the envelope signs for it."""
    if isinstance(wire, dict):
        wire = {key: wire[key] for key in sorted(wire, key=str)}
    return msgpack.packb(wire, use_bin_type=True)


def gauss(seed: int, n: int, sigma: float = 1.0) -> np.ndarray:
    rng = random.Random(seed)
    return np.array([rng.gauss(0.0, sigma) for _ in range(n)], np.float32)


def _input_edge_values() -> np.ndarray:
    """Zeros of both signs, ties, subnormals, huge values and fp16-saturating values."""
    values = [0.0, -0.0, 1.0, -1.0, 1.0, 0.5, -0.5, 1e-8, -1e-8, 1e-40, 65504.0, 70000.0, -1e6, 3.0e38]
    return np.concatenate([np.array(values, np.float32), gauss(11, 26, 100.0)])


def _input_ties() -> np.ndarray:
    rng = random.Random(12)
    return np.array([rng.choice([0.0, 1.0, -1.0, 2.0, -2.0, 0.25]) for _ in range(64)], np.float32)


def _input_blocks() -> np.ndarray:
    """300 values: a block of zeros, a tiny block, a normal block, a huge one, a partial tail."""
    x = gauss(13, 300)
    x[:64] = 0.0
    x[64:128] *= 1e-30
    x[192:256] *= 1e30
    return x


def _input_sparse_wide() -> np.ndarray:
    """Mostly zeros with spikes far apart, so the index gaps need 1-, 2- and 3-byte varints."""
    x = np.zeros(300, np.float32)
    x[[0, 1, 5, 130, 131, 299]] = [3.0, -2.0, 1.5, -4.0, 2.5, 5.0]
    return x


@dataclass(frozen=True)
class Accept:
    name: str
    description: str
    spec: CodecSpec
    make_input: Callable[[], np.ndarray]


@dataclass(frozen=True)
class RejectCase:
    name: str
    description: str
    reason: RejectReason
    base: str  # name of the accept case whose wire is mutated
    mutate: Callable[[dict[str, Any]], Any]
    expected_numel: int | None = None  # default: the base case's numel
    max_numel: int | None = None


ACCEPT_CASES = [
    Accept(
        "accept_none", "fp32 raw bytes, lossless, edge values included", CodecSpec("none"), _input_edge_values
    ),
    Accept(
        "accept_fp16",
        "fp16 with saturation at 65504 and underflow of tiny values",
        CodecSpec("fp16"),
        _input_edge_values,
    ),
    Accept(
        "accept_int8_single_block",
        "int8, 40 values in one partial block of 256",
        CodecSpec("int8"),
        _input_edge_values,
    ),
    Accept(
        "accept_int8_blocks",
        "int8, block 64: zero block, tiny block, huge block, partial tail",
        CodecSpec("int8", block_size=64),
        _input_blocks,
    ),
    Accept(
        "accept_int8_one_element",
        "int8 with numel 1",
        CodecSpec("int8"),
        lambda: np.array([-0.75], np.float32),
    ),
    Accept(
        "accept_topk_int8",
        "topk 5 % (k=15 of 300), int8 values, block 8",
        CodecSpec("topk", topk_fraction=0.05, block_size=8),
        lambda: gauss(14, 300),
    ),
    Accept(
        "accept_topk_fp16",
        "topk 10 % (k=20 of 200), fp16 values",
        CodecSpec("topk", topk_fraction=0.1, value_bits=16),
        lambda: gauss(15, 200),
    ),
    Accept(
        "accept_topk_ties",
        "topk k=8 of 64 with many equal magnitudes: lower index wins",
        CodecSpec("topk", topk_fraction=0.125, value_bits=16),
        _input_ties,
    ),
    Accept(
        "accept_topk_sparse_gaps",
        "topk k=6 of 300: first index 0, gaps of 1 and 2-byte varints",
        CodecSpec("topk", topk_fraction=0.02),
        _input_sparse_wide,
    ),
    Accept(
        "accept_topk_one_element",
        "topk with numel 1 keeps it",
        CodecSpec("topk"),
        lambda: np.array([2.0], np.float32),
    ),
]


def _set(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(wire: dict[str, Any]) -> dict[str, Any]:
        out = dict(wire)
        for key, value in changes.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value(out) if callable(value) else value
        return out

    return apply


def _indices(*gaps: int) -> bytes:
    return varint_encode(np.array(gaps, np.uint64))


def _f32(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


R = RejectReason
REJECT_CASES = [
    RejectCase(
        "reject_schema_not_a_map",
        "the codec field is a list, not a map",
        R.SCHEMA,
        "accept_none",
        lambda w: [w["codec"], w["numel"]],
    ),
    RejectCase("reject_schema_codec_missing", "no codec field", R.SCHEMA, "accept_none", _set(codec=None)),
    RejectCase(
        "reject_unknown_codec",
        "codec 'zstd' is not registered",
        R.UNKNOWN_CODEC,
        "accept_none",
        _set(codec="zstd"),
    ),
    RejectCase(
        "reject_schema_missing_field",
        "int8 map without scales",
        R.SCHEMA,
        "accept_int8_blocks",
        _set(scales=None),
    ),
    RejectCase(
        "reject_schema_extra_field",
        "fp16 map with an extra 'shape' field",
        R.SCHEMA,
        "accept_fp16",
        _set(shape=[40]),
    ),
    RejectCase("reject_schema_wrong_type", "numel as a string", R.SCHEMA, "accept_none", _set(numel="40")),
    RejectCase(
        "reject_schema_value_bits", "topk value_bits 4", R.SCHEMA, "accept_topk_fp16", _set(value_bits=4)
    ),
    RejectCase("reject_schema_block_zero", "int8 block 0", R.SCHEMA, "accept_int8_blocks", _set(block=0)),
    RejectCase(
        "reject_schema_int8_minus_128",
        "int8 value -128 (outside the symmetric range)",
        R.SCHEMA,
        "accept_int8_blocks",
        _set(values=lambda w: b"\x80" + w["values"][1:]),
    ),
    RejectCase(
        "reject_schema_negative_scale",
        "int8 scale -1.0",
        R.SCHEMA,
        "accept_int8_blocks",
        _set(scales=lambda w: _f32(-1.0) + w["scales"][4:]),
    ),
    RejectCase(
        "reject_oversize_numel",
        "numel 40 above max_numel 39",
        R.OVERSIZE,
        "accept_none",
        lambda w: w,
        max_numel=39,
    ),
    RejectCase(
        "reject_shape_numel_mismatch",
        "numel 40 but the receiver's model has 41",
        R.SHAPE_MISMATCH,
        "accept_none",
        lambda w: w,
        expected_numel=41,
    ),
    RejectCase(
        "reject_shape_values_length",
        "fp16 values one element short",
        R.SHAPE_MISMATCH,
        "accept_fp16",
        _set(values=lambda w: w["values"][:-2]),
    ),
    RejectCase(
        "reject_shape_scales_length",
        "int8 scales for 4 blocks instead of 5",
        R.SHAPE_MISMATCH,
        "accept_int8_blocks",
        _set(scales=lambda w: w["scales"][:-4]),
    ),
    RejectCase(
        "reject_shape_k_above_numel", "topk k = numel + 1", R.SHAPE_MISMATCH, "accept_topk_fp16", _set(k=201)
    ),
    RejectCase(
        "reject_shape_index_count",
        "topk index bytes hold k-1 varints",
        R.SHAPE_MISMATCH,
        "accept_topk_fp16",
        _set(indices=lambda w: _indices(*([1] * 19))),
    ),
    RejectCase(
        "reject_bad_index_out_of_bounds",
        "topk last index = numel",
        R.BAD_INDEX,
        "accept_topk_sparse_gaps",
        _set(indices=_indices(0, 1, 4, 125, 1, 169)),
    ),
    RejectCase(
        "reject_bad_index_duplicate",
        "topk gap 0 after the first index (duplicate)",
        R.BAD_INDEX,
        "accept_topk_sparse_gaps",
        _set(indices=_indices(0, 1, 0, 125, 1, 168)),
    ),
    RejectCase(
        "reject_bad_index_truncated_varint",
        "last varint has its continuation bit set",
        R.BAD_INDEX,
        "accept_topk_sparse_gaps",
        _set(indices=_indices(0, 1, 4, 125, 1) + b"\xa8"),
    ),
    RejectCase(
        "reject_bad_index_overlong_varint",
        "varint 0x81 0x00: value 1 in two bytes",
        R.BAD_INDEX,
        "accept_topk_sparse_gaps",
        _set(indices=_indices(0) + b"\x81\x00" + _indices(4, 125, 1, 168)),
    ),
    RejectCase(
        "reject_bad_index_varint_overflow",
        "a 6-byte varint",
        R.BAD_INDEX,
        "accept_topk_sparse_gaps",
        _set(indices=_indices(0, 1, 4, 125, 1) + b"\xff\xff\xff\xff\xff\x01"),
    ),
    RejectCase(
        "reject_non_finite_fp32",
        "NaN among fp32 values",
        R.NON_FINITE,
        "accept_none",
        _set(values=lambda w: _f32(float("nan")) + w["values"][4:]),
    ),
    RejectCase(
        "reject_non_finite_fp16",
        "+Inf among fp16 values",
        R.NON_FINITE,
        "accept_fp16",
        _set(values=lambda w: w["values"][:-2] + b"\x00\x7c"),
    ),
    RejectCase(
        "reject_non_finite_scale",
        "NaN int8 scale",
        R.NON_FINITE,
        "accept_int8_blocks",
        _set(scales=lambda w: _f32(float("nan")) + w["scales"][4:]),
    ),
    RejectCase(
        "reject_non_finite_scale_overflow",
        "scale 3e38: 127 * scale overflows float32",
        R.NON_FINITE,
        "accept_topk_int8",
        _set(scales=lambda w: _f32(3e38) + w["scales"][4:]),
    ),
]


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"


def _floats(vector: np.ndarray) -> str:
    # float32 -> Python float is exact, and json writes the shortest repr that round-trips.
    return _json([float(v) for v in vector.astype(np.float32)])


def build_cases() -> dict[str, dict[str, str]]:
    """Every case folder's files, name -> {filename: text}."""
    cases: dict[str, dict[str, str]] = {}
    wires: dict[str, dict[str, Any]] = {}
    for case in ACCEPT_CASES:
        x = case.make_input()
        wire = encode(x, case.spec)
        wires[case.name] = wire
        decoded = decode(msgpack.unpackb(pack_canonical(wire), raw=False), expected_numel=x.size)
        cases[case.name] = {
            "context.json": _json(
                {"expected_numel": int(x.size), "max_numel": None, "spec": asdict(case.spec)}
            ),
            "input.json": _floats(x),
            "wire.hex": pack_canonical(wire).hex() + "\n",
            "decoded.json": _floats(decoded),
            "expected.json": _json({"outcome": "accept", "description": case.description}),
        }
    for case in REJECT_CASES:
        base = wires[case.base]
        bad = case.mutate(dict(base))
        expected_numel = case.expected_numel or base["numel"]
        try:
            decode(
                msgpack.unpackb(pack_canonical(bad), raw=False),
                expected_numel=expected_numel,
                max_numel=case.max_numel,
            )
        except Reject as exc:
            if exc.reason is not case.reason:
                raise AssertionError(f"{case.name}: expected {case.reason.value}, got {exc}") from None
        else:
            raise AssertionError(f"{case.name}: decode accepted a bad wire")
        cases[case.name] = {
            "context.json": _json({"expected_numel": expected_numel, "max_numel": case.max_numel}),
            "wire.hex": pack_canonical(bad).hex() + "\n",
            "expected.json": _json(
                {"outcome": "reject", "reason": case.reason.value, "description": case.description}
            ),
        }
    return cases


def write_vectors(out_dir: Path) -> list[Path]:
    """Write README.md and every case under ``out_dir/codecs``; return the paths written."""
    root = Path(out_dir) / "codecs"
    root.mkdir(parents=True, exist_ok=True)
    written = [root / "README.md"]
    written[0].write_text(README)
    for name, files in build_cases().items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        for filename, text in files.items():
            path = folder / filename
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else VECTORS_DIR
    written = write_vectors(out_dir)
    print(f"wrote {len(written)} files under {out_dir / 'codecs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
