"""Error feedback: remember what a lossy codec did not send, and send it later.

Compressing gossip updates without memory diverges (CHOCO-SGD, Koloskova 2019; DCD/ECD);
with a residual carried from round to round, top-1 % sparsification matches dense
training (Stich 2018, "Sparsified SGD with memory"; Deep Gradient Compression). Each round

    corrected = update + residual
    wire      = encode(corrected)
    sent      = decode(wire)          # exactly what every receiver will reconstruct
    residual  = corrected - sent      # i.e. residual += update - sent

so after T rounds ``sum(updates) - sum(sent) == residual``: nothing is lost, only delayed.
For topk the residual stays bounded (each round sends the k largest corrected entries).
``sent`` comes from :func:`~p2pfm.core.codecs.encode_with_decoded`: the same bits as
decoding the wire, without parsing the bytes just produced.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from p2pfm.core import tiles
from p2pfm.core.codecs import (
    CODECS,
    CodecSpec,
    NonFiniteVector,
    SparseVector,
    TopkCodec,
    all_finite,
    encode_sparse,
    encode_with_decoded,
    topk_count,
    topk_sample_positions,
    topk_samples,
    topk_select,
    topk_threshold,
)


class ErrorFeedback:
    """The residual of one sender for one flat parameter vector (float32, length numel)."""

    def __init__(self, numel: int) -> None:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
            raise ValueError(f"numel must be a positive integer, got {numel!r}")
        self.numel = numel
        self.residual = np.zeros(numel, np.float32)

    def compress(self, update: np.ndarray, spec: CodecSpec) -> tuple[dict[str, Any], np.ndarray]:
        """Encode update + residual; return (wire dict, decoded vector actually sent) and keep the rest.

        The residual is left untouched if encoding fails (e.g. a NaN in ``update``).
        """
        if not isinstance(update, np.ndarray) or update.dtype != np.float32 or update.shape != (self.numel,):
            raise ValueError(
                f"update must be float32 of shape ({self.numel},), got "
                f"{getattr(update, 'dtype', type(update).__name__)} {getattr(update, 'shape', '')}"
            )
        corrected = update + self.residual  # (numel,) float32, a new array
        # The residual must be relative to what receivers really get: the encoder returns the
        # vector decode(wire) gives (bit for bit), without parsing its own bytes again.
        wire, sent = encode_with_decoded(corrected, spec)
        np.subtract(corrected, sent, out=corrected)
        self.residual = corrected
        return wire, sent

    def compress_into(
        self, update: np.ndarray, spec: CodecSpec
    ) -> tuple[dict[str, Any], SparseVector, np.ndarray]:
        """:meth:`compress` without a model-sized temporary: ``update`` is consumed.

        ``update`` (float32, numel; not the residual) becomes ``update + residual`` in place, is
        encoded, and, less what was sent, becomes the new residual. The old residual array serves
        as the encoder's scratch and is returned (third item) for the caller to reuse: the three
        model-sized vectors of a round (``update + residual``, ``|.|`` for top-k, and the sent
        vector) were fresh 0.5 GB arrays at 124M parameters. The sent vector comes back sparse
        for top-k (its indices and values), which is all a merge needs.

        Bit for bit :meth:`compress`: ``update + residual`` is the same IEEE sum in either order,
        and ``corrected - sent`` is ``corrected`` wherever ``sent`` is +0.0 (``x - 0.0 == x``, -0.0
        included), so subtracting only at the sent positions leaves the same residual. If encoding
        fails (NaN/Inf in ``update + residual``), the residual is left untouched, as in
        :meth:`compress`; ``update`` is then garbage.
        """
        self._check_out(update)
        corrected = np.add(update, self.residual, out=update)
        if not all_finite(corrected):  # before the residual serves as scratch: a failure leaves it intact
            raise NonFiniteVector("vector contains NaN or Inf; refusing to encode it")
        spare = self.residual
        wire, sent = encode_sparse(corrected, spec, scratch=spare)
        self.residual = _less_sent(corrected, sent)
        return wire, sent, spare

    def compress_difference_into(
        self,
        params: np.ndarray,
        local: np.ndarray,
        out: np.ndarray,
        spec: CodecSpec,
        *,
        tile: int = tiles.TILE,
    ) -> tuple[dict[str, Any], SparseVector, np.ndarray]:
        """:meth:`compress_into` of ``params - local``, written into ``out``, in one cache-tiled pass.

        ``out`` (writeable contiguous float32, numel; not the residual) receives ``params - local``,
        then ``+ residual``, tile by tile (:func:`~p2pfm.core.tiles.corrected_into`); ``local`` may be
        ``out`` itself. Bit for bit ``compress_into(params - local)``, with the same refusal (ValueError,
        residual untouched) for NaN or Inf, and the same return values (``out`` becomes the residual,
        the old residual array comes back as the caller's next buffer).

        Untiled, the delta, the sum, the finiteness check, ``|.|`` and top-k's candidate search were
        seven passes over three 0.5 GB arrays at 124M parameters; tiled, ``params``, ``local`` and
        the residual are read once and ``out`` written once. Top-k's threshold comes from ``|x|`` at
        fixed sample positions, which are computed first from the same operands with the same
        float32 operations, so the threshold, the candidates and the exact selection among them are
        those of :func:`~p2pfm.core.codecs.topk_indices` (including its fall back to the whole vector
        when the sample leaves fewer than k candidates).
        """
        self._check_out(out)
        if not (
            isinstance(params, np.ndarray)
            and isinstance(local, np.ndarray)
            and params.shape == local.shape == (self.numel,)
            and params.dtype == np.float32
            and np.result_type(params, local) == np.float32
        ):
            raise ValueError(f"params and local must be float32-compatible of shape ({self.numel},)")
        if (local is not out and np.may_share_memory(local, out)) or np.may_share_memory(params, out):
            # An overlap other than "local is out" could change operands under a tile: untiled instead.
            return self.compress_into(np.subtract(params, local, out=out), spec)
        if not isinstance(spec, CodecSpec):
            raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
        n = self.numel
        topk = isinstance(CODECS.get(spec.name), TopkCodec)  # what encode_sparse dispatches on
        k = topk_count(n, spec.topk_fraction) if topk else n
        threshold = None
        if topk and k < n and topk_samples(n):
            sample = tiles.sample_corrected(params, local, self.residual, topk_sample_positions(n))
            threshold = topk_threshold(sample, n, k)
        found = tiles.corrected_into(params, local, self.residual, out, threshold=threshold, tile=tile)
        spare = self.residual  # finite: from here on the old residual is only scratch
        indices: np.ndarray | None = None
        if topk:
            if k == n:
                indices = np.arange(n, dtype=np.int64)
            elif found is not None and found.size >= k:
                indices = topk_select(np.abs(out[found]), k, found)
            else:  # no sample (a small vector), or an unlucky one: the whole vector, as topk_indices does
                indices = topk_select(np.abs(out, out=spare), k, None)
        wire, sent = encode_sparse(out, spec, indices=indices)
        self.residual = _less_sent(out, sent)
        return wire, sent, spare

    def _check_out(self, update: np.ndarray) -> None:
        if (
            not isinstance(update, np.ndarray)
            or update.dtype != np.float32
            or update.shape != (self.numel,)
            or not update.flags.c_contiguous
            or not update.flags.writeable
            or np.shares_memory(update, self.residual)
        ):
            raise ValueError(
                f"update must be a writeable contiguous float32 array of shape ({self.numel},), not the residual"
            )

    def reset(self) -> None:
        """Forget the residual (e.g. after loading a fresh model from a peer)."""
        self.residual = np.zeros(self.numel, np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Checkpoint state: plain numpy arrays only."""
        return {"residual": self.residual.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`; the residual must match numel and be finite."""
        if set(state) != {"residual"}:
            raise ValueError(
                f"error feedback state must have exactly the key 'residual', got {sorted(state)}"
            )
        residual = np.asarray(state["residual"])
        if residual.shape != (self.numel,):
            raise ValueError(f"residual has shape {residual.shape}, expected ({self.numel},)")
        if residual.dtype != np.float32:
            raise ValueError(f"residual must be float32, got {residual.dtype}")
        if not np.isfinite(residual).all():
            raise ValueError("residual contains NaN or Inf")
        self.residual = residual.copy()


def _less_sent(corrected: np.ndarray, sent: SparseVector) -> np.ndarray:
    """``corrected - sent`` in place (the next residual): only at the sent positions for top-k,
    where ``x - 0.0 == x`` everywhere else leaves the same bits as the dense subtraction."""
    if sent.indices is None:
        np.subtract(corrected, sent.values, out=corrected)
    else:
        corrected[sent.indices] -= sent.values
    return corrected
