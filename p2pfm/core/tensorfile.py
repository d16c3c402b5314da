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
import mmap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

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
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 4096


@dataclass(frozen=True)
class LazyArray:
    """An array written by :func:`write_arrays` without being held beside the others.

    ``load`` is called once, when the writer reaches this array; what it returns must have
    ``dtype`` and ``shape``. A state snapshot of a 124M model holds ~1.5 GB of optimizer moments:
    converting them all before writing (``optimizer_arrays``) doubled the peer's memory for the
    moment of packing; converting one tensor at a time costs one tensor.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


WRITE_PIECE_BYTES = 8 << 20  # slices handed to the sink: big enough for hashlib/OS calls to be cheap


def _code_of(dtype: np.dtype, name: str) -> str:
    dtype = np.dtype(dtype)
    dtype = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    code = dtype.str
    if code not in ALLOWED_DTYPES:
        raise ValueError(f"array {name!r} has unsupported dtype {dtype}")
    return code


def write_arrays(
    sink: Callable[[memoryview], object],
    arrays: Mapping[str, np.ndarray | LazyArray],
    meta: Mapping[str, Any] | None = None,
) -> int:
    """Stream the tensor file of ``arrays`` into ``sink`` (e.g. a file's ``write`` and a hasher);
    returns the bytes written.

    Nothing is joined: the header, then each array's own memory in slices of
    ``WRITE_PIECE_BYTES``, so the peak extra memory is one converted array at most (none for
    little-endian, C-ordered arrays, the usual case), not a second copy of the whole file.
    """
    entries: list[dict[str, Any]] = []
    offset = 0
    for name, array in arrays.items():
        if isinstance(array, LazyArray):
            code, shape = _code_of(array.dtype, name), tuple(array.shape)
        else:
            code, shape = _code_of(np.asarray(array).dtype, name), tuple(np.shape(array))
        nbytes = math.prod(shape) * np.dtype(code).itemsize
        entries.append(
            {"name": name, "dtype": code, "shape": list(shape), "offset": offset, "nbytes": nbytes}
        )
        offset += nbytes
    header = msgpack.packb({"meta": dict(meta or {}), "arrays": entries}, use_bin_type=True)
    written = 0
    for piece in (MAGIC, len(header).to_bytes(8, "little"), header):
        sink(memoryview(piece))
        written += len(piece)
    for entry, array in zip(entries, arrays.values(), strict=True):
        data = array.load() if isinstance(array, LazyArray) else array
        # keeps 0-d arrays 0-d (ascontiguousarray would not); copies only to fix order or dtype
        code = str(entry["dtype"])
        data = np.asarray(data, order="C").astype(code, copy=False)
        if list(data.shape) != entry["shape"]:
            raise ValueError(f"array {entry['name']!r} has shape {data.shape}, announced {entry['shape']}")
        view = data.reshape(-1).view(np.uint8).data if data.size else memoryview(b"")
        for start in range(0, len(view), WRITE_PIECE_BYTES):
            sink(view[start : start + WRITE_PIECE_BYTES])
        written += len(view)
    return written


def pack_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialize named arrays (and a small msgpack-able ``meta`` map) to bytes."""
    out = bytearray()
    write_arrays(out.extend, arrays, meta)
    return bytes(out)


def unpack_arrays(
    data: Buffer, *, max_bytes: int | None = None, copy: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse bytes made by :func:`pack_arrays`; raises a Reject subclass naming any problem.

    ``copy=False`` returns read-only views into ``data`` (e.g. an ``mmap`` of a downloaded state
    file, which then costs page cache, not a second copy in the heap); the views keep ``data``
    alive. Every check is the same either way.
    """
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
        array = np.frombuffer(body[offset : offset + nbytes], dtype=code).reshape(shape)
        arrays[name] = array.copy() if copy else array
    if end != len(body):
        raise ShapeMismatch(f"{len(body) - end} trailing bytes after the last array")
    return arrays, header["meta"]


def digest(data: Buffer) -> bytes:
    """SHA-256: of a state chunk (the state's own hash is their root, ``transfer.state_root``)."""
    return hashlib.sha256(data).digest()
