"""A tensor container that never executes code on load: our checkpoint and state-transfer format.

Layout: ``MAGIC`` (8 bytes) | header length (u64 little-endian) | msgpack header | raw data.
The header is ``{"meta": map, "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}``;
array bytes are little-endian, C order, packed back to back. Loading validates every field
(dtype whitelist, shapes against byte counts, offsets inside the data, no overlaps) and builds
arrays with ``np.frombuffer``: no pickle, no ``torch.load``, no eval, so a checkpoint or a
state snapshot downloaded from a stranger can at worst be refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from p2pfm.core.errors import Malformed, Oversize, SchemaViolation, ShapeMismatch

MAGIC = b"P2PFMT01"
ALLOWED_DTYPES = {
    "<f4": np.float32,
    "<f2": np.float16,
    "<i8": np.int64,
    "<i4": np.int32,
    "|u1": np.uint8,
    "|i1": np.int8,
}
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 4096


def pack_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialize named arrays (and a small msgpack-able ``meta`` map) to bytes."""
    entries, blobs, offset = [], [], 0
    for name, array in arrays.items():
        array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        code = np.dtype(dtype).str
        if code not in ALLOWED_DTYPES:
            raise ValueError(f"array {name!r} has unsupported dtype {array.dtype}")
        blob = array.astype(code, copy=False).tobytes()
        entries.append(
            {"name": name, "dtype": code, "shape": list(array.shape), "offset": offset, "nbytes": len(blob)}
        )
        blobs.append(blob)
        offset += len(blob)
    header = msgpack.packb({"meta": dict(meta or {}), "arrays": entries}, use_bin_type=True)
    return b"".join([MAGIC, len(header).to_bytes(8, "little"), header, *blobs])


def unpack_arrays(
    data: bytes | memoryview, *, max_bytes: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse bytes made by :func:`pack_arrays`; raises a Reject subclass naming any problem."""
    view = memoryview(data)
    # [REJECT] OVERSIZE: checked before parsing anything.
    if max_bytes is not None and len(view) > max_bytes:
        raise Oversize(f"tensor file of {len(view)} bytes exceeds the limit of {max_bytes}")
    # [REJECT] MALFORMED: magic and header length must fit.
    if len(view) < 16 or bytes(view[:8]) != MAGIC:
        raise Malformed("not a p2pfm tensor file (bad magic)")
    header_len = int.from_bytes(view[8:16], "little")
    if header_len > MAX_HEADER_BYTES or 16 + header_len > len(view):
        raise Malformed(f"header length {header_len} is out of bounds")
    try:
        header = msgpack.unpackb(
            view[16 : 16 + header_len],
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_ARRAYS * 8,
            max_map_len=MAX_ARRAYS * 8,
            max_bin_len=MAX_HEADER_BYTES,
            max_str_len=MAX_HEADER_BYTES,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise Malformed(f"header is not valid msgpack: {exc}") from None
    # [REJECT] SCHEMA: header shape.
    if not isinstance(header, dict) or set(header) != {"meta", "arrays"}:
        raise SchemaViolation("header must be a map with exactly the keys meta, arrays")
    if not isinstance(header["meta"], dict) or not isinstance(header["arrays"], list):
        raise SchemaViolation("header meta must be a map and arrays a list")
    body = view[16 + header_len :]
    arrays: dict[str, np.ndarray] = {}
    end = 0
    for index, entry in enumerate(header["arrays"]):
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise SchemaViolation(f"array entry {index} must have exactly name, dtype, shape, offset, nbytes")
        name, code, shape, offset, nbytes = (entry[k] for k in ("name", "dtype", "shape", "offset", "nbytes"))
        if not isinstance(name, str) or name in arrays:
            raise SchemaViolation(f"array entry {index} has a missing or duplicate name")
        if code not in ALLOWED_DTYPES:
            raise SchemaViolation(f"array {name!r} has a disallowed dtype {code!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise SchemaViolation(f"array {name!r} has an invalid shape {shape!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
            raise SchemaViolation(f"array {name!r} has an invalid offset or size")
        itemsize = np.dtype(code).itemsize
        # [REJECT] SHAPE_MISMATCH: the bytes must be exactly what the shape announces.
        if math.prod(shape) * itemsize != nbytes:
            raise ShapeMismatch(
                f"array {name!r}: shape {shape} needs {math.prod(shape) * itemsize} bytes, header says {nbytes}"
            )
        # [REJECT] SHAPE_MISMATCH: arrays are packed back to back inside the data.
        if offset != end or offset + nbytes > len(body):
            raise ShapeMismatch(f"array {name!r} lies outside the data or overlaps another")
        end = offset + nbytes
        arrays[name] = np.frombuffer(body[offset : offset + nbytes], dtype=code).reshape(shape).copy()
    if end != len(body):
        raise ShapeMismatch(f"{len(body) - end} trailing bytes after the last array")
    return arrays, header["meta"]


def digest(data: bytes | memoryview) -> bytes:
    """SHA-256: the model hash announced by peers and checked by downloaders."""
    return hashlib.sha256(data).digest()
