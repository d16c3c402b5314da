"""Cache-tiled round passes: each model-sized array streamed through memory once per pass.

At 124M parameters a round's arithmetic is a dozen elementwise passes over 0.5 GB vectors
(delta, + residual, finiteness, ``|.|``, the top-k candidates, the outer step, finiteness
again), each a full trip through main memory: the CPU waits on memory bandwidth, not on the
arithmetic. Here the elementwise operations of one pass run on a tile of :data:`TILE`
elements that stays in the L2 cache, into small reused tile temporaries (``out=``), so each
input is read once and each output written once.

Bit for bit the untiled arithmetic: every float32 operation is elementwise (the same IEEE
operation on the same two operands gives the same bits whatever the tiling), and reductions
are only used as yes/no tests (is anything NaN or Inf). Not elementwise, and so kept out:

- dot products (norms): BLAS sums in an order of its own, so a tiled dot gives other bits;
  callers take norms over whole vectors, as before.
- the top-k threshold: it comes from ``|x|`` at fixed-seed sample positions, which
  :func:`corrected_into`'s caller computes first from the same operands with the same
  operations (:func:`sample_corrected`), so the threshold, and the candidates, are the same.
"""

from __future__ import annotations

import numpy as np

from p2pfm.core.codecs import NonFiniteVector

TILE = 1 << 15
"""Elements per tile: 256 KiB of float32 per array, so a pass's few arrays and temporaries stay in
L2 while numpy's fixed cost per call (~1900 tiles at 124M) stays small. Measured at 124M parameters
(2 shared cores, best of 3), ``corrected_into`` / ``outer_step_into``: 2^13 393 / 221 ms, 2^15
311 / 161 ms, 2^16 279 / 146 ms, 2^17 286 / 144 ms, 2^20 329 / 174 ms."""

NON_FINITE = "vector contains NaN or Inf; refusing to encode it"


def _check_tile(tile: int) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return tile


def sample_corrected(
    params: np.ndarray, local: np.ndarray, residual: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """``|(params - local) + residual|`` at ``positions``: float32, the same operations, in the same order,
    as :func:`corrected_into` applies to every entry (and the untiled ``params - local``, then ``+ residual``)."""
    values = np.subtract(params[positions], local[positions])
    np.add(values, residual[positions], out=values)
    return np.abs(values, out=values)


def corrected_into(
    params: np.ndarray,
    local: np.ndarray,
    residual: np.ndarray,
    out: np.ndarray,
    *,
    threshold: np.floating | None = None,
    tile: int = TILE,
) -> np.ndarray | None:
    """``out = (params - local) + residual``, one tile at a time; ValueError if any entry is NaN or Inf.

    With ``threshold``: also the sorted int64 positions where ``|out| >= threshold`` (top-k's
    candidates), else None. ``local`` may be ``out`` itself (then it is consumed); ``out`` must
    not overlap ``params`` or ``residual`` in any other way (the caller checks). On the error,
    ``out`` holds garbage up to the bad tile; ``params``, ``local`` (unless it is ``out``) and
    ``residual`` are only read.
    """
    tile = _check_tile(tile)
    n = out.size
    absolute = np.empty(min(tile, n), np.float32)
    mask = np.empty(absolute.size, np.bool_)
    found: list[np.ndarray] = []
    for start in range(0, n, tile):
        end = min(n, start + tile)
        chunk = out[start:end]
        np.subtract(params[start:end], local[start:end], out=chunk)
        np.add(chunk, residual[start:end], out=chunk)
        size = np.abs(chunk, out=absolute[: end - start])
        if not np.isfinite(np.maximum.reduce(size)):  # max propagates NaN and keeps Inf
            raise NonFiniteVector(NON_FINITE)
        if threshold is not None:
            above = np.greater_equal(size, threshold, out=mask[: end - start])
            positions = np.flatnonzero(above)
            if positions.size:
                found.append(positions + start)
    if threshold is None:
        return None
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def nesterov_into(
    momentum: np.ndarray,
    combined: np.ndarray,
    mu: float,
    momentum_out: np.ndarray,
    step_out: np.ndarray,
    *,
    tile: int = TILE,
) -> None:
    """``momentum_out = momentum * mu + combined`` and ``step_out = momentum_out * mu + combined``, tiled.

    The outer Nesterov step's two vectors with the operations (and operand order) of the untiled
    ``np.multiply(momentum, mu)``, ``+= combined``, ``np.multiply(new momentum, mu)``, ``+= combined``.
    ``step_out`` may be ``combined`` itself (it is then overwritten), and ``momentum_out`` may be
    ``momentum`` itself (updated in place); otherwise the arrays must not overlap.
    """
    tile = _check_tile(tile)
    n = momentum_out.size
    scaled = np.empty(min(tile, n), np.float32)
    for start in range(0, n, tile):
        end = min(n, start + tile)
        new = np.multiply(momentum[start:end], mu, out=momentum_out[start:end])
        np.add(new, combined[start:end], out=new)
        np.add(np.multiply(new, mu, out=scaled[: end - start]), combined[start:end], out=step_out[start:end])


def nesterov_step_is_finite(
    params: np.ndarray,
    momentum: np.ndarray,
    combined: np.ndarray,
    mu: float,
    lr: float,
    *,
    tile: int = TILE,
) -> bool:
    """Whether :func:`nesterov_into` then :func:`outer_step_into` would give a finite anchor; writes nothing.

    The same operations on the same operands, tile by tile, into tile temporaries: the answer is
    the one :func:`outer_step_into` would give afterwards, so the caller may update ``momentum`` in
    place only once it knows the round is kept.
    """
    tile = _check_tile(tile)
    n = params.size
    new = np.empty(min(tile, n), np.float32)
    step = np.empty(new.size, np.float32)
    for start in range(0, n, tile):
        end = min(n, start + tile)
        size = end - start
        np.multiply(momentum[start:end], mu, out=new[:size])
        np.add(new[:size], combined[start:end], out=new[:size])
        np.multiply(new[:size], mu, out=step[:size])
        np.add(step[:size], combined[start:end], out=step[:size])
        np.multiply(step[:size], lr, out=step[:size])
        candidate = np.subtract(params[start:end], step[:size], out=step[:size])
        if not (np.isfinite(candidate.max()) and np.isfinite(candidate.min())):
            return False
    return True


def outer_step_into(
    params: np.ndarray, step: np.ndarray, lr: float, out: np.ndarray, *, tile: int = TILE
) -> bool:
    """``out = params - step * lr``, tiled; whether every entry is finite (it stops at the first that is not).

    ``out`` may be ``step`` itself. On False, ``out`` holds garbage: the caller drops it.
    """
    tile = _check_tile(tile)
    for start in range(0, out.size, tile):
        end = min(out.size, start + tile)
        chunk = np.multiply(step[start:end], lr, out=out[start:end])
        np.subtract(params[start:end], chunk, out=chunk)
        if not (np.isfinite(chunk.max()) and np.isfinite(chunk.min())):
            return False
    return True


def blend_into(
    params: np.ndarray, partner: np.ndarray, alpha: float, out: np.ndarray, *, tile: int = TILE
) -> None:
    """``out = params * (1 - alpha) + partner * alpha`` in float32, tiled: the operations of
    ``np.multiply(params, 1 - alpha)`` then ``+= np.multiply(partner, alpha)``, bit for bit, with
    temporaries of one tile instead of two model-sized arrays (a periodic sync at 124M parameters
    held ~1 GB of them). ``out`` must not overlap ``params`` or ``partner``."""
    tile = _check_tile(tile)
    if np.may_share_memory(out, params) or np.may_share_memory(out, partner):
        raise ValueError("blend_into: out overlaps an operand")
    keep = 1.0 - alpha
    for start in range(0, out.size, tile):
        end = min(out.size, start + tile)
        chunk = np.multiply(params[start:end], keep, out=out[start:end])
        chunk += np.multiply(partner[start:end], alpha)
