"""Aggregation rules: how a peer combines its own update with the ones that arrived in a round.

Each rule is one :class:`AggregationRule` subclass in the registry :data:`AGGREGATIONS`, keyed
by the name ``GossipConfig.aggregation`` selects; its parameters are named ``GossipConfig``
fields, handed to it by keyword (explicit, like Flower's ``FedTrimmedAvg(beta=0.2)``).
:func:`p2pfm.core.gossip.aggregate` is ``rule_for(config).combine(...)``. Built in:

- ``mean``          plain average (fastest, no protection).
- ``clipped_mean``  each received update clipped to within ``clip_multiplier * ||own||`` of
                    our own, then averaged (ClippedGossip, He, Karimireddy & Jaggi 2022).
- ``trimmed_mean``  coordinate-wise: drop the ``trim_fraction`` smallest and largest values.
- ``median``        coordinate-wise median.

The reasoning, and what each protects against, is section 4 of ``protocols/gossip.md``.
Pure numpy, no clocks or I/O: the daemon and the simulator call the same code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from p2pfm.core.codecs import SparseVector

if TYPE_CHECKING:
    from p2pfm.core.gossip import GossipConfig


def norm(x: np.ndarray) -> float:
    """``float(np.linalg.norm(x))`` of a 1-D vector, without numpy's generic argument handling.

    The same sqrt(x . x) in x's dtype, so the same bits (a test pins the equality); on small
    models numpy's handling cost more than the arithmetic (a norm per update and per round report).
    """
    return float(np.sqrt(x.dot(x)))


SPARSE_MERGE_DENSITY = 0.25  # above this share of touched coordinates the dense path is as cheap


def _sparse_support(own: np.ndarray, received: Sequence[np.ndarray]) -> np.ndarray | None:
    """Sorted indices where own or any received update is nonzero; None if that is most of them."""
    touched = own != 0
    for update in received:
        touched |= update != 0
    support = np.flatnonzero(touched)
    return support if support.size <= SPARSE_MERGE_DENSITY * own.size else None


def union_support(positions: Sequence[np.ndarray], buffer: np.ndarray) -> np.ndarray:
    """The sorted distinct positions in any of the sorted int64 arrays ``positions`` (each distinct).

    Two ways, the same answer, whichever streams less memory: few positions (top-k updates: ~1 %
    each) are concatenated and sorted, which for a few sorted runs is a linear merge (numpy's stable
    sort of int64 is timsort); many are marked in ``buffer`` (all +0.0 on entry and on return) and
    found with one scan of it. At 124M parameters with one received update the scan of the 0.5 GB
    buffer took ~0.2 s, the merge of 2.5M positions ~0.03 s; np.unique (a hash table) took 2.6 s.
    """
    total = sum(int(p.size) for p in positions)
    if total * max(1.0, math.log2(max(len(positions), 1))) * 8 <= buffer.size:
        merged = np.sort(np.concatenate(positions), kind="stable") if positions else np.zeros(0, np.int64)
        if merged.size < 2:
            return merged
        keep = np.empty(merged.size, np.bool_)
        keep[0] = True
        np.not_equal(merged[1:], merged[:-1], out=keep[1:])
        return merged[keep]
    for p in positions:
        buffer[p] = 1.0
    support = np.flatnonzero(buffer)
    buffer[support] = 0.0
    return support


def denominator(received: int, expected_received: int | None) -> int:
    """The (clipped) mean's divisor: ``1 + expected_received`` when fixed, else ``1 + received``; at least 1.

    A fixed denominator gives every update total weight 1 across the swarm whenever it arrives,
    so sums commute and peers that saw the same updates in different rounds agree (gossip.md
    section 3). A negative expectation counts as 0.
    """
    count = received if expected_received is None else max(expected_received, 0)
    return max(1 + count, 1)


class AggregationRule(ABC):
    """One way to combine our own update with the received ones.

    A new rule is a subclass registered with :func:`register_aggregation` and a note in
    ``protocols/gossip.md``; a parameter is a ``GossipConfig`` field named in
    :attr:`parameters` and taken by the constructor under the same name.
    """

    name: ClassVar[str]
    """The value of ``GossipConfig.aggregation`` that selects this rule."""

    parameters: ClassVar[tuple[str, ...]] = ()
    """GossipConfig fields passed to the constructor by keyword (see :meth:`from_config`)."""

    @classmethod
    def from_config(cls, config: GossipConfig) -> AggregationRule:
        """This rule with its parameters read from ``config`` (which validated them)."""
        return cls(**{parameter: getattr(config, parameter) for parameter in cls.parameters})

    def combine(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None = None
    ) -> np.ndarray:
        """Our own compressed delta combined with the received ones: the step the outer optimizer takes.

        With nothing received every rule gives the same answer, part of the sum-preserving
        merge rather than of any rule: our own update as it is, or with a fixed denominator its
        ``1 / (1 + expected_received)`` share. Otherwise :meth:`merge` decides.
        """
        if not received:
            return own / denominator(0, expected_received) if expected_received is not None else own.copy()
        return self.merge(own, received, expected_received)

    def combine_sparse(
        self,
        own: SparseVector,
        received: Sequence[SparseVector],
        expected_received: int | None,
        buffer: np.ndarray,
        *,
        own_norm: float | None = None,
    ) -> np.ndarray:
        """:meth:`combine` of updates in sparse form, bit for bit, with ``buffer`` as its scratch.

        ``buffer`` (float32, numel) must be all +0.0 on entry; the result is either ``buffer``
        itself, filled, or a fresh array (then ``buffer`` is left all +0.0 or unspecified: the
        caller must zero it before the next use). With nothing received the result is built in
        ``buffer``; otherwise :meth:`merge_sparse` may, and a rule without it gets dense vectors.
        ``own_norm``: ``norm(own.dense())`` if the caller has it already (a rule that needs it
        then skips one pass over the buffer); None: computed where needed.
        """
        if not received:
            if own.indices is None:
                if expected_received is None:
                    np.copyto(buffer, own.values)
                else:
                    np.divide(own.values, denominator(0, expected_received), out=buffer)
            elif expected_received is None:
                buffer[own.indices] = own.values
            else:  # elsewhere 0.0 / d == +0.0, what the buffer holds
                buffer[own.indices] = own.values / denominator(0, expected_received)
            return buffer
        merged = self.merge_sparse(own, received, expected_received, buffer, own_norm=own_norm)
        if merged is not None:
            return merged
        return self.merge(own.dense(), [update.dense() for update in received], expected_received)

    def merge_sparse(
        self,
        own: SparseVector,
        received: Sequence[SparseVector],
        expected_received: int | None,
        buffer: np.ndarray,
        *,
        own_norm: float | None = None,
    ) -> np.ndarray | None:
        """:meth:`merge` of sparse forms into the zero ``buffer``, or None: use dense vectors instead.

        The default is None; a rule that can work on supports overrides it (``clipped_mean``).
        ``own_norm``: see :meth:`combine_sparse`.
        """
        return None

    def drain(
        self,
        received: Sequence[np.ndarray],
        expected_received: int | None = None,
        *,
        anchor_norm: float = 0.0,
    ) -> np.ndarray:
        """Updates that arrived after our last round, combined without an update of our own.

        By default :meth:`combine` with a zero update of ours; a rule that needs our own update
        as an anchor overrides this (``clipped_mean`` clips around zero with the size of our last
        update, ``anchor_norm``, as the yardstick). ``received`` holds at least one update.
        """
        return self.combine(np.zeros_like(received[0]), received, expected_received)

    @abstractmethod
    def merge(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None
    ) -> np.ndarray:
        """:meth:`combine` for at least one received update: a fresh float32 vector shaped like ``own``.

        ``expected_received`` is the fixed denominator's count (None: count what arrived); rules
        that are not means may ignore it, as median and trimmed_mean do.
        """


AGGREGATIONS: dict[str, type[AggregationRule]] = {}
"""The rule registry: name -> rule class. Insertion order is the order names are listed in."""


def register_aggregation(rule: type[AggregationRule], *, replace: bool = False) -> type[AggregationRule]:
    """Add ``rule`` to :data:`AGGREGATIONS` under its name and return it (usable as a class decorator).

    A name already taken is a ValueError unless ``replace``.
    """
    if not (isinstance(rule, type) and issubclass(rule, AggregationRule)):
        raise TypeError(f"rule must be an AggregationRule subclass, got {rule!r}")
    name = getattr(rule, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"aggregation rule name must be a non-empty string, got {name!r}")
    if name in AGGREGATIONS and not replace:
        raise ValueError(f"aggregation rule {name!r} is already registered")
    AGGREGATIONS[name] = rule
    return rule


def rule_for(config: GossipConfig) -> AggregationRule:
    """The rule ``config.aggregation`` names, with its parameters from ``config``."""
    rule = AGGREGATIONS.get(config.aggregation)
    if rule is None:  # GossipConfig checked the name; the rule was unregistered since
        raise ValueError(f"aggregation rule {config.aggregation!r} is not registered")
    return rule.from_config(config)


# --------------------------------------------------------------------------- the built-in rules


@register_aggregation
@dataclass(frozen=True)
class Mean(AggregationRule):
    """Plain average of own + received: the fastest rule, with no protection from a bad update."""

    name: ClassVar[str] = "mean"

    def merge(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None
    ) -> np.ndarray:
        return (own + np.sum(received, axis=0)) / denominator(len(received), expected_received)


@register_aggregation
@dataclass(frozen=True)
class ClippedMean(AggregationRule):
    """Average after clipping each received update to within ``clip_multiplier * ||own||`` of our own.

    Our own update is the one thing we trust (ClippedGossip): honest updates of similar size pass
    unchanged, a poisoned one moves us by at most a bounded step. Sums in float64 so a long
    inbox does not lose the small updates beside a large one.
    """

    name: ClassVar[str] = "clipped_mean"
    parameters: ClassVar[tuple[str, ...]] = ("clip_multiplier",)
    clip_multiplier: float = 2.0

    def drain(
        self,
        received: Sequence[np.ndarray],
        expected_received: int | None = None,
        *,
        anchor_norm: float = 0.0,
    ) -> np.ndarray:
        """No update of ours this time: each received one is clipped to ``clip_multiplier`` times the
        size of our last update (``anchor_norm``), then the sum-preserving mean.

        An unclipped drain let one stranger's update, arriving after our last round, take the final
        model from eval 2.14 to 4.28 (issue 12). With ``anchor_norm`` 0 (we never sent an update)
        there is no yardstick and the plain mean applies, as a normal round does.
        """
        radius = self.clip_multiplier * anchor_norm
        total = np.zeros_like(received[0], dtype=np.float64)
        for update in received:
            size = norm(update)
            total += update * (radius / size) if radius > 0.0 and size > radius else update
        return (total / denominator(len(received), expected_received)).astype(np.float32)

    def merge(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None
    ) -> np.ndarray:
        radius = self.clip_multiplier * norm(own)
        divisor = denominator(len(received), expected_received)
        support = _sparse_support(own, received)
        if support is None:  # dense updates: the arithmetic on every coordinate
            total = own.astype(np.float64, copy=True)
            for update in received:
                difference = update - own
                total += self._clipped(own, update, difference, norm(difference), radius)
            return (total / divisor).astype(np.float32)
        # Top-k updates touch ~1 % of the coordinates: the same arithmetic on the union of their
        # supports only (elsewhere every term is exactly 0, so the result is bit for bit the
        # dense one). Distances stay dense dot products, so they round exactly as before.
        own_s = own[support]
        total_s = own_s.astype(np.float64)
        for update in received:
            update_s = update[support]
            distance = norm(update - own)
            total_s += self._clipped(own_s, update_s, update_s - own_s, distance, radius)
        result = np.zeros_like(own)
        result[support] = (total_s / divisor).astype(np.float32)
        return result

    def merge_sparse(
        self,
        own: SparseVector,
        received: Sequence[SparseVector],
        expected_received: int | None,
        buffer: np.ndarray,
        *,
        own_norm: float | None = None,
    ) -> np.ndarray | None:
        """:meth:`merge`'s sparse path with every update kept sparse: no dense copy of any of them.

        The dense vectors the distances need are scattered into ``buffer`` one at a time (``update``
        there, minus ``own`` at own's positions: the exact ``update - own`` of every coordinate,
        since ``u - 0.0 == u``) and cleared again, so the dot products, and every other operation,
        are those of :meth:`merge`. None (use :meth:`merge`) for a dense input or a dense support.
        """
        own_idx = own.indices
        if own_idx is None or any(update.indices is None for update in received):
            return None
        support = union_support([vector.nonzero() for vector in (own, *received)], buffer)
        if support.size > SPARSE_MERGE_DENSITY * own.numel:
            return None
        own.scatter(buffer)
        if own_norm is None:  # the same dot product over the same buffer: the same bits either way
            own_norm = norm(buffer)
        radius = self.clip_multiplier * own_norm
        own_s = buffer[support]
        own.clear(buffer)
        divisor = denominator(len(received), expected_received)
        total_s = own_s.astype(np.float64)
        for update in received:
            update.scatter(buffer)
            update_s = buffer[support]
            buffer[own_idx] -= own.values  # buffer = update - own, coordinate by coordinate
            distance = norm(buffer)
            update.clear(buffer)
            own.clear(buffer)
            total_s += self._clipped(own_s, update_s, update_s - own_s, distance, radius)
        buffer[support] = (total_s / divisor).astype(np.float32)
        return buffer

    @staticmethod
    def _clipped(
        own: np.ndarray, update: np.ndarray, difference: np.ndarray, distance: float, radius: float
    ) -> np.ndarray:
        """``update``, or our own plus the difference scaled down to ``radius`` if it is farther."""
        if radius == 0.0:
            # We sent nothing this round (all in the residual): accept bounded by the
            # received update's own size; a zero-size own update cannot anchor the clip.
            return update
        if distance > radius:
            return own + difference * (radius / distance)
        return update


@register_aggregation
@dataclass(frozen=True)
class TrimmedMean(AggregationRule):
    """Coordinate-wise mean after dropping the ``trim_fraction`` smallest and largest values.

    Over own + received (n vectors) it drops ``max(1, floor(trim_fraction * n))`` at each end,
    so it always trims when it can; with fewer than 3 vectors nothing can be trimmed and it is
    the plain mean (of what arrived: no fixed denominator). 0.2 drops 1 of 5 at each end.
    """

    name: ClassVar[str] = "trimmed_mean"
    parameters: ClassVar[tuple[str, ...]] = ("trim_fraction",)
    trim_fraction: float = 0.2

    def merge(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None
    ) -> np.ndarray:
        stacked = np.stack([own, *received])  # (n, numel)
        count = len(stacked)
        if count < 3:
            return stacked.mean(axis=0).astype(np.float32)
        # + 1e-9: a decimal fraction is not exact in binary (100 * 0.29 = 28.999999999999996 must
        # trim 29); at least one at each end, and at least one value left in the middle.
        trim = min(max(1, math.floor(count * self.trim_fraction + 1e-9)), (count - 1) // 2)
        ordered = np.sort(stacked, axis=0)
        return ordered[trim : count - trim].mean(axis=0).astype(np.float32)


@register_aggregation
@dataclass(frozen=True)
class Median(AggregationRule):
    """Coordinate-wise median of own + received: ignores up to half of the inputs being arbitrary."""

    name: ClassVar[str] = "median"

    def merge(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None
    ) -> np.ndarray:
        return np.median(np.stack([own, *received]), axis=0).astype(np.float32)


__all__ = [
    "AGGREGATIONS",
    "AggregationRule",
    "ClippedMean",
    "Mean",
    "Median",
    "TrimmedMean",
    "denominator",
    "norm",
    "register_aggregation",
    "rule_for",
]
