"""The gossip rules, pure: who to send to, what to send, how to merge what arrives.

Algorithm (full reasoning in ``protocols/gossip.md``): *gossip SparseLoCo*.

Each round a peer starts from its anchor parameters ``x``, runs H local AdamW steps to
``y`` (done by the driver: torch in the daemon, numpy in the simulator), and forms the
pseudo-gradient ``delta = x - y`` (DiLoCo, Douillard et al. 2023). It compresses
``delta + residual`` with top-k + int8 and keeps what was not sent as the new residual
(error feedback: Stich 2018, SparseLoCo 2025); it sends the compressed delta to ``fanout``
random live peers (Epidemic Learning, de Vos 2023). At the round deadline it aggregates
its own compressed delta with whatever arrived, robustly (clipping around its own update,
after ClippedGossip, He et al. 2022), and takes an outer Nesterov step on the anchor.

Because peers average different random subsets, their anchors drift apart; every
:func:`sync_interval` rounds (often when the swarm is much larger than the fanout) a peer
pulls a random live peer's parameters and averages with them (:meth:`GossipLearner.mix_with`),
the same pull a joining peer uses to get state.

No clocks, sockets or threads: the driver passes rounds, randomness and bytes in.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from p2pfm.config import require
from p2pfm.core import tiles
from p2pfm.core.aggregation import AGGREGATIONS, norm, rule_for
from p2pfm.core.codecs import (
    CodecSpec,
    SparseVector,
    all_finite,
    decode,
    decode_sparse,
    encode_difference,
)
from p2pfm.core.errors import FutureRound, NonFinite, Outlier, RoundFull, ShapeMismatch, StaleRound
from p2pfm.core.feedback import ErrorFeedback

Aggregation = str  # a name in p2pfm.core.aggregation.AGGREGATIONS (mean, clipped_mean, ...)


@dataclass(frozen=True)
class GossipConfig:
    """The gossip algorithm's knobs, shared by the daemon and the simulator."""

    inner_steps: int = 10  # H local AdamW steps per round; DiLoCo uses 500 on GPUs, CPUs want fewer
    fanout: int = 2  # peers each update is pushed to (Epidemic Learning's s); 2 keeps bits/param low
    codec: CodecSpec = field(default_factory=CodecSpec)  # top-1% with int8 values by default
    outer_lr: float = 1.0  # SparseLoCo: error feedback already smooths; lr 1 applies the average as is
    outer_momentum: float = 0.0  # Nesterov momentum on the outer step (DiLoCo: 0.9 with lr 0.7)
    aggregation: Aggregation = "clipped_mean"
    clip_multiplier: float = 2.0  # a received update may differ from ours by at most this x ||ours||
    outlier_multiplier: float = (
        50.0  # an update over this x ||our last update|| is refused and scored (0: off)
    )
    trim_fraction: float = 0.2  # trimmed_mean drops this share at each end, at least 1 (0.2: 1 of 5)
    max_round_lag: int = 8  # updates from rounds further behind than this are refused as stale
    max_updates_per_round: int = 16  # received updates one round counts, at most one per sender
    state_agreement: float = 0.5  # a downloaded state must lie this close to a second peer's (relative)
    sync_agreement: float = 0.72  # a pulled peer's parameters are mixed only this close to ours
    sync_every: int | Literal["auto"] = (
        "auto"  # rounds between parameter pulls (0 = never); see sync_interval
    )
    sync_weight: float = 0.5  # how far to move towards the pulled parameters
    sync_codec: CodecSpec = field(
        default_factory=lambda: CodecSpec(name="int8")
    )  # of params - initial params

    def __post_init__(self) -> None:
        require(self.inner_steps >= 1, "gossip.inner_steps", "must be at least 1")
        require(self.fanout >= 0, "gossip.fanout", "must be non-negative")
        require(self.outer_lr > 0, "gossip.outer_lr", "must be positive")
        require(0.0 <= self.outer_momentum < 1.0, "gossip.outer_momentum", "must be in [0, 1)")
        require(
            isinstance(self.aggregation, str) and self.aggregation in AGGREGATIONS,
            "gossip.aggregation",
            f"must be one of {', '.join(AGGREGATIONS)}",
        )
        require(self.clip_multiplier > 0, "gossip.clip_multiplier", "must be positive")
        require(
            self.outlier_multiplier == 0 or self.outlier_multiplier >= self.clip_multiplier,
            "gossip.outlier_multiplier",
            "must be 0 (off) or at least clip_multiplier",
        )
        require(0.0 < self.trim_fraction < 0.5, "gossip.trim_fraction", "must be in (0, 0.5)")
        require(self.max_round_lag >= 0, "gossip.max_round_lag", "must be non-negative")
        require(self.max_updates_per_round >= 1, "gossip.max_updates_per_round", "must be at least 1")
        require(self.state_agreement > 0, "gossip.state_agreement", "must be positive")
        require(self.sync_agreement > 0, "gossip.sync_agreement", "must be positive")
        require(
            self.sync_every == "auto" or (isinstance(self.sync_every, int) and self.sync_every >= 0),
            "gossip.sync_every",
            f'must be "auto" or a non-negative integer, got {self.sync_every!r}',
        )
        require(0.0 < self.sync_weight <= 1.0, "gossip.sync_weight", "must be in (0, 1]")


UPDATES_PER_SENDER = 2
"""Rounds of one sender a round counts: its current update and one that arrived late."""

MAX_ROUND = 1 << 40
"""No honest run reaches this round (100 rounds a second for 300 years), and round arithmetic
stays far inside int64. A round beyond it, in an announcement, a state or a sync answer, is refused
(``BAD_ROUND``): one stranger's round 2^63-1, taken as the max of two rounds and incremented, used
to overflow and crash every peer that synced with it (and, checkpointed, again after a restart)."""


def future_window(config: GossipConfig) -> int:
    """How far ahead of ours a round may be and still be taken from one peer's word (updates, syncs)."""
    return max(config.max_round_lag, 1) * 4


def choose_partners(
    live_peers: Sequence[str], self_id: str, fanout: int, rng: np.random.Generator
) -> list[str]:
    """``fanout`` distinct random live peers other than ourselves (fewer if fewer are live).

    Sorting first makes the choice a function of the set and the RNG alone, whatever order
    the DHT returned peers in: the simulator replays bit-for-bit.
    """
    candidates = sorted(set(live_peers) - {self_id})
    if not candidates or fanout <= 0:
        return []
    count = min(fanout, len(candidates))
    picks = rng.choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(picks)]


def expected_received(fanout: int, live_others: int) -> int:
    """Updates a peer can expect per round: ``fanout``, or fewer if fewer peers are live.

    The denominator of the sum-preserving merge (section 3 of gossip.md); both drivers call this.
    """
    return min(fanout, max(0, live_others))


AUTO_SYNC_MAX_INTERVAL = 50  # small swarms: every peer hears (nearly) every update, syncs are rare
AUTO_SYNC_MIN_INTERVAL = 2  # large swarms: measured in the simulator (protocols/gossip.md section 3)


def sync_interval(config: GossipConfig, live_others: int) -> int:
    """Rounds between consensus pulls (0 = never), for ``sync_every = "auto"`` a function of the swarm.

    Gossiped pseudo-gradients share progress but never pull parameters together; peers drift
    apart at a rate set by the share of the swarm's updates each one never hears,
    ``1 - fanout / live_others``. When a peer hears every update (swarm <= fanout + 1) there is
    nothing to correct and a pull every 50 rounds only mops up lost messages; as the share
    heard falls, so does the interval, down to a pull every 2 rounds for swarms much larger
    than the fanout. The two ends are measured (3-peer daemon swarms; 100-peer simulator:
    ``sim/results/README.md``); between them the interval is proportional to the share heard.
    """
    if config.sync_every != "auto":
        return int(config.sync_every)
    heard = 1.0 if live_others <= config.fanout else config.fanout / live_others
    return max(AUTO_SYNC_MIN_INTERVAL, round(AUTO_SYNC_MAX_INTERVAL * heard))


def sync_due(round: int, live_others: int, config: GossipConfig) -> bool:
    """Whether the round just finished (``round`` = rounds done) ends with a consensus pull."""
    every = sync_interval(config, live_others)
    return every > 0 and round > 0 and round % every == 0


def needs_catch_up(own_round: int, newest_round: int, config: GossipConfig, *, joining: bool) -> bool:
    """Whether to download a live peer's full state instead of training on.

    On (re)join: whenever the swarm is ahead of us at all. Gossiped deltas share progress but
    never pull parameters together, so a restarted peer that resumed a few rounds behind would
    stay behind (until a sync); adopting the swarm's state costs one download. While training:
    when the swarm's newest round is more than ``max_round_lag`` ahead, beyond which our updates
    would be refused as stale.
    """
    if joining:
        return newest_round > own_round
    return newest_round - own_round > config.max_round_lag


def encode_sync(
    params: np.ndarray,
    initial: np.ndarray,
    config: GossipConfig,
    *,
    after_block: Callable[[int, int], None] | None = None,
) -> dict:
    """A consensus-pull answer: ``sync_codec`` of the parameters' difference from the run's initial ones.

    Every peer builds the initial parameters from the run seed, so the codec's error is relative to
    what training changed, not to the weights themselves. ``after_block``: see
    :func:`~p2pfm.core.codecs.encode_difference` (int8: no 0.5 GB temporaries at 124M).
    """
    return encode_difference(params, initial, config.sync_codec, after_block=after_block)


def decode_sync(wire: dict, initial: np.ndarray) -> np.ndarray:
    """Parameters from an :func:`encode_sync` answer (raises a Reject subclass on bad input).

    The decoded difference is added to ``initial`` in its own array when it is a float32 one of
    ours (the same IEEE sum): ``(initial + d).astype(float32)`` made two more 0.5 GB arrays at 124M.
    """
    difference = decode(wire, expected_numel=initial.size)
    if initial.dtype == np.float32 and difference.dtype == np.float32 and difference.flags.writeable:
        return np.add(difference, initial.reshape(difference.shape), out=difference)
    return (initial + difference).astype(np.float32)


def aggregate(
    own: np.ndarray,
    received: Sequence[np.ndarray],
    config: GossipConfig,
    expected_received: int | None = None,
) -> np.ndarray:
    """Combine our own compressed delta with the received ones, by the rule ``config.aggregation`` names.

    The rules and their parameters live in :mod:`p2pfm.core.aggregation`:

    - ``mean``: plain average (fastest, no protection).
    - ``clipped_mean``: each received delta is clipped to lie within
      ``clip_multiplier * ||own||`` of our own, then everything is averaged. Our own update
      is the one thing we trust (ClippedGossip); honest deltas of similar size pass unchanged,
      a poisoned one moves us by at most a bounded step.
    - ``trimmed_mean`` / ``median``: coordinate-wise, over own + received (need >= 3 to trim;
      ``trim_fraction`` at each end, at least one).

    ``expected_received`` fixes the denominator of the (clipped) mean at ``1 + expected``
    instead of ``1 + len(received)``. In steady state every peer receives ``fanout`` updates
    per round, so each update then carries total weight 1 across the swarm whenever it
    arrives: sums commute, and peers that saw the same updates in different rounds end up
    with the same parameters. A count-based mean instead weighs an update by the accident
    of how many others arrived beside it, and peers drift apart.
    """
    return rule_for(config).combine(own, received, expected_received)


_F32_UNIT = 2.0**-24  # unit roundoff of float32


def dense_norm_unless_below(update: SparseVector, limit: float) -> float:
    """``norm(update.dense())``, or a number no larger than ``limit`` if that norm is certainly not larger.

    The outlier rule compares the dense float32 norm (a BLAS dot product, summed in an order of its
    own) with a limit. Summing m non-negative rounded squares in any order is within
    ``gamma_m = m u / (1 - m u)`` of the exact sum (u = 2^-24; Higham, *Accuracy and Stability of
    Numerical Algorithms*, 2nd ed., sections 3.1 and 4.2); the zeros of a sparse vector add exactly,
    so m is the count of stored values, and the square root adds one more u. A float64 norm of the
    stored values times ``1 + gamma_m`` (plus slack) below the limit therefore decides as the dense
    norm would, with no dense vector: an honest update is ~1x ours, the limit 50x. Near or over the
    limit, for dense forms, and for huge or tiny values (overflow, underflow) the dense norm is
    computed as before, so the decision and the reported size never change.
    """
    k = 0 if update.indices is None else int(update.values.size)
    if 0 < k and k * _F32_UNIT < 0.5:
        values = update.values.astype(np.float64)
        squares = float(values.dot(values))
        gamma = k * _F32_UNIT / (1.0 - k * _F32_UNIT)
        # + k 2^-149: a square that underflows to a subnormal may be off by that much, absolutely.
        bound = math.sqrt(squares * (1.0 + gamma) + k * 2.0**-149) * (1.0 + 1e-6)
        if bound < limit and squares < 1e36:  # far below float32's overflow to inf
            return bound
    return norm(update.dense())


@dataclass
class RoundReport:
    """What happened in one round, for metrics."""

    round: int
    received: int
    own_norm: float
    applied_norm: float
    rolled_back: bool = False  # the step would have made the model NaN/Inf: not taken


class GossipLearner:
    """One peer's gossip state: anchor parameters, outer momentum, error-feedback residual, inbox.

    The driver calls, per round: :meth:`make_update` with the parameters after its local
    steps (gets a wire dict to sign and send), :meth:`receive` for each verified incoming
    update, then :meth:`finish_round` at the deadline, which returns the new anchor to load
    into the model. Parameters are flat float32 vectors.
    """

    def __init__(self, params: np.ndarray, config: GossipConfig, *, round: int = 0) -> None:
        if params.dtype != np.float32 or params.ndim != 1:
            raise ValueError("params must be a flat float32 vector")
        self.config = config
        self.params_version = 0  # bumped by every assignment to params (see the property)
        # A plain array even from a memory-mapped one (the initial parameters are mapped from a file):
        # ``memmap.copy()`` and ``zeros_like(memmap)`` keep the subclass, which is no mapping at all.
        self.params = np.array(params, dtype=np.float32, copy=True, subok=False)
        self.momentum = np.zeros(self.params.shape, np.float32)
        self.feedback = ErrorFeedback(self.params.size)
        self.round = round
        self._own: SparseVector | None = None  # the update we sent this round, as receivers decode it
        # One model-sized scratch vector, reused every round (see local_buffer): at 124M parameters
        # each fresh 0.5 GB array also costs its first-touch page faults (0.5-1.7 s on shared cores).
        self._buffer: np.ndarray | None = None
        # Round buffers allocated so far: one, then one per round whose old anchor someone still
        # held (_recycle). Fresh 0.5 GB arrays cost their page faults every round at 124M.
        self.buffers_allocated = 0
        self._last_own_norm = 0.0  # size of our last update: the drain's clipping radius
        self._inbox: dict[str, dict[int, dict]] = {}  # sender -> its round -> compressed update
        self._queued = 0  # updates in the inbox

    @property
    def numel(self) -> int:
        return int(self.params.size)

    @property
    def scratch(self) -> np.ndarray | None:
        """The round buffer if one is allocated now (for memory reports); see :meth:`local_buffer`."""
        return self._buffer

    @property
    def params(self) -> np.ndarray:
        """The anchor. Never written in place (every change assigns a new array), so
        :attr:`params_version`, bumped on each assignment, names its contents: what a cache of
        something computed from the anchor (its hash, :meth:`PeerProtocol.anchor_hash`) keys on."""
        return self._params

    @params.setter
    def params(self, value: np.ndarray) -> None:
        self._params = value
        self.params_version += 1

    def local_buffer(self) -> np.ndarray:
        """The learner's round buffer: a float32 vector shaped like ``params`` for the driver to fill.

        A driver may write the local parameters into it (``trainer.flat(out=...)``) and pass it to
        :meth:`make_update`, which then needs no model-sized array of its own. Its contents belong
        to the learner: :meth:`make_update` and :meth:`finish_round` overwrite them (and may swap
        in another array: ask again each round). A peer's round then holds its anchor, residual
        and this one buffer, instead of ~8 fresh 0.5 GB temporaries at 124M parameters.
        """
        if self._buffer is None:
            self._buffer = np.empty(self.params.shape, np.float32)
            self.buffers_allocated += 1
        return self._buffer

    def make_update(self, local_params: np.ndarray) -> dict:
        """Compress this round's pseudo-gradient (anchor - local) with error feedback.

        ``local_params`` may be :meth:`local_buffer` (it is then consumed); any other array is only read.
        """
        if local_params.shape != self.params.shape:
            raise ValueError(f"local params have shape {local_params.shape}, expected {self.params.shape}")
        if np.result_type(self.params, local_params) != np.float32:  # as before: a float64 delta is refused
            raise ValueError(f"update must be float32, got local params of {local_params.dtype}")
        buffer = self.local_buffer()
        # (anchor - local) + residual into the buffer, its finiteness and top-k's candidates in one
        # cache-tiled pass: the float32 operations of np.subtract, then compress_into, bit for bit.
        wire, sent, spare = self.feedback.compress_difference_into(
            self.params, local_params, buffer, self.config.codec
        )
        self._buffer = spare  # the delta became the residual; the old residual is the next buffer
        self._own = sent
        return wire

    def receive(self, sender_id: str, sender_round: int, wire: dict) -> SparseVector:
        """Decode and queue a verified peer's update; raises a Refusal if it is not used.

        A round counts at most one update per (sender, sender round) (a duplicate replaces
        the earlier one) and at most
        :data:`UPDATES_PER_SENDER` rounds per sender (an honest peer's late update of its last
        round beside its current one; a newer round replaces the oldest), and at most
        ``max_updates_per_round`` in all, first come first counted. One key claiming 33 rounds
        used to count 33 times; many keys are bounded by the cap (and by admission), and the
        inbox stays bounded whatever arrives.
        It holds the compressed wire form (top-k: ~1 % of a dense vector), decoded again when
        the round ends. Returns the decoded update (sparse for top-k; ``.dense()`` for the vector).
        """
        # [IGNORE] STALE_ROUND: updates from far behind would drag us back to old parameters.
        # An honest laggard sends them until it catches up: not held against the sender.
        if sender_round < self.round - self.config.max_round_lag:
            raise StaleRound(f"update for round {sender_round}, we are at round {self.round}")
        # [IGNORE] FUTURE_ROUND: an update claiming a round far ahead is a clock bug, a lie, or
        # we are the laggard (we catch up at the end of the round): unusable either way.
        if sender_round > self.round + future_window(self.config):
            raise FutureRound(f"update claims round {sender_round}, far ahead of our round {self.round}")
        # [IGNORE] ROUND_FULL: two newer updates of this sender are counted already, or the round
        # counts its cap of updates. (A second update for a round it has replaces the first.)
        queued = self._inbox.get(sender_id, {})
        if sender_round not in queued:
            if len(queued) >= UPDATES_PER_SENDER and sender_round < min(queued):
                raise RoundFull(
                    f"{sender_id} already has its updates for rounds {sorted(queued)} in this round"
                )
            if len(queued) < UPDATES_PER_SENDER and self._queued >= self.config.max_updates_per_round:
                raise RoundFull(f"this round already counts {self._queued} updates (the cap)")
        # decode raises NonFinite for NaN/Inf anywhere in the wire and never returns such a vector,
        # so there is no second finiteness pass over the decoded vector here. Kept sparse (top-k):
        # a dense decode was a fresh 0.5 GB vector per update at 124M parameters.
        decoded = decode_sparse(wire, expected_numel=self.numel)
        if decoded.numel != self.numel:  # decode enforces it; keep the rule visible
            raise ShapeMismatch(f"update has {decoded.numel} entries, model has {self.numel}")
        # [REJECT] OUTLIER (severity 10): honest updates of one round are of similar size (same H
        # steps, same schedule); one 50x ours is deliberate (20x was seen once in an honest churn run). Clipping would bound its effect, but
        # only a rejection lets the sender's score fall until it is ignored.
        limit = self.config.outlier_multiplier * self._last_own_norm
        if limit > 0 and (size := dense_norm_unless_below(decoded, limit)) > limit:
            raise Outlier(
                f"update of norm {size:.3g} is over {self.config.outlier_multiplier:g}x ours ({self._last_own_norm:.3g})"
            )
        queued = self._inbox.setdefault(sender_id, {})
        if sender_round not in queued:
            if len(queued) >= UPDATES_PER_SENDER:  # a newer round of the same peer replaces its oldest
                del queued[min(queued)]
            else:
                self._queued += 1
        queued[sender_round] = wire
        return decoded

    def close_inbox(self) -> dict[str, dict[int, dict]]:
        """Take this round's queued updates and start an empty inbox (cheap: a swap).

        A driver that merges off its event loop takes the inbox on the loop, then calls
        :meth:`finish_round` with it in a worker thread: updates arriving meanwhile go to the
        next round's inbox instead of racing the merge.
        """
        inbox, self._inbox, self._queued = self._inbox, {}, 0
        return inbox

    def _received(self, inbox: dict[str, dict[int, dict]] | None = None) -> list[np.ndarray]:
        """The queued updates, decoded, in sender order (an order-independent result); empties the inbox."""
        return [update.dense() for update in self._received_sparse(inbox)]

    def _received_sparse(self, inbox: dict[str, dict[int, dict]] | None = None) -> list[SparseVector]:
        """:meth:`_received` kept sparse: top-k updates as their indices and values (~1 % of a dense vector)."""
        if inbox is None:
            inbox = self.close_inbox()
        return [
            decode_sparse(inbox[sender][r], expected_numel=self.numel)
            for sender in sorted(inbox)
            for r in sorted(inbox[sender])
        ]

    def finish_round(
        self, expected_received: int | None = None, inbox: dict[str, dict[int, dict]] | None = None
    ) -> tuple[np.ndarray, RoundReport]:
        """Aggregate own + received deltas, take the outer step, return the new anchor.

        Pass ``expected_received = min(fanout, live peers)`` for sum-preserving weights (see
        :func:`aggregate`); None averages over what actually arrived. ``inbox``: what
        :meth:`close_inbox` took (None = take it now).

        The anchor comes back as a read-only view of :attr:`params`, not a copy: the learner never
        writes into an anchor array (each round's is a new one), so it stays valid as long as the
        caller holds it. Bit for bit the arithmetic of :func:`aggregate` on dense vectors (a test
        compares them over several rounds); top-k updates stay sparse and are scattered into the
        round buffer where a dense dot product is needed, so norms round exactly as before.
        """
        own = self._own if self._own is not None else SparseVector.zeros(self.numel)
        received = self._received_sparse(inbox)
        buffer = self.local_buffer()
        buffer.fill(0.0)  # the merge's scratch is kept all +0.0 between uses (see combine_sparse)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below, not warned about
            own.scatter(buffer)
            own_norm, received_count = norm(buffer), len(received)
            own.clear(buffer)
            combined = rule_for(self.config).combine_sparse(
                own, received, expected_received, buffer, own_norm=own_norm
            )
            del own, received
            # The step and the new anchor are written into the round buffer (which becomes the
            # anchor): no model-sized temporary. Cache-tiled (p2pfm.core.tiles): the float32
            # operations of ``momentum * mu + combined``, ``momentum * mu + combined`` again for
            # the Nesterov step, ``params - step * lr`` and the finiteness test, each vector read
            # once; the step's norm stays a dot product over the whole vector, so it rounds as before.
            # Decoded updates are finite, but finite sums can overflow float32: a model with NaN/Inf
            # is never taken (nor checkpointed, served or announced); the round's step is dropped.
            mu, lr = self.config.outer_momentum, self.config.outer_lr
            step_norm = 0.0
            if mu > 0.0:
                # The new momentum goes into the old one's array, so it must be known first that
                # the round is kept: a read-only pass computes the candidate anchor tile by tile
                # (the same operations as below) and only tests it. A fresh 0.5 GB momentum array
                # a round (at 124M) cost more in page faults than this pass reads.
                rolled_back = not tiles.nesterov_step_is_finite(self.params, self.momentum, combined, mu, lr)
                if not rolled_back:
                    tiles.nesterov_into(self.momentum, combined, mu, self.momentum, buffer)
                    step_norm = norm(buffer)
                    # The same operations on the same operands as the test: finite again.
                    tiles.outer_step_into(self.params, buffer, lr, buffer)
            else:
                step_norm = norm(combined)
                rolled_back = not tiles.outer_step_into(self.params, combined, lr, buffer)
            del combined
        if not rolled_back:
            old = self.params
            self.params = buffer
            self._buffer = None
            self._recycle(old)
            del old
        report = RoundReport(
            round=self.round,
            received=received_count,
            own_norm=own_norm,
            applied_norm=0.0 if rolled_back else step_norm * self.config.outer_lr,
            rolled_back=rolled_back,
        )
        self._last_own_norm = report.own_norm
        self._own = None
        self.round += 1
        anchor = self.params.view()
        anchor.flags.writeable = False
        return anchor, report

    def _recycle(self, old: np.ndarray) -> None:
        """Keep the previous anchor as the next round buffer if nothing else can see it.

        Two references are ours (the argument and getrefcount's); any other (a caller's array, a
        view of it, a snapshot) keeps it out, and the next round allocates a fresh buffer instead.
        """
        if (
            type(old) is np.ndarray
            and old.flags.owndata
            and old.flags.writeable
            and old.shape == self.params.shape
            and old.dtype == np.float32
            and sys.getrefcount(old) <= 3
        ):
            self._buffer = old

    def drain(self, expected_received: int | None = None) -> tuple[np.ndarray, int]:
        """Apply updates that arrived after our last round, without a round or update of our own.

        Used once at the end of a run: peers finish their last round at different moments,
        so each one's final updates would otherwise be missing from the peers that finished
        first. Returns the new anchor and how many updates were applied.
        """
        received = self._received()
        if received:
            combined = rule_for(self.config).drain(
                received, expected_received, anchor_norm=self._last_own_norm
            )
            candidate = (self.params - self.config.outer_lr * combined).astype(np.float32)
            if np.isfinite(candidate).all():  # as in finish_round: never a NaN/Inf model
                self.params = candidate
        return self.params.copy(), len(received)

    def _check_partner(self, partner_params: np.ndarray) -> None:
        if partner_params.shape != self.params.shape:
            raise ShapeMismatch(f"partner state has {partner_params.size} entries, model has {self.numel}")
        if not all_finite(partner_params):  # no 124 MB bool array at 124M parameters
            raise NonFinite("partner state contains NaN or Inf")

    def mix_with(self, partner_params: np.ndarray, partner_round: int, weight: float | None = None) -> None:
        """Move towards a peer's parameters (periodic sync). Rounds take the max, so laggards catch up."""
        self._check_partner(partner_params)
        alpha = self.config.sync_weight if weight is None else weight
        if partner_params.dtype == np.float32 and not np.may_share_memory(
            partner_params, self.local_buffer()
        ):
            # ``(1 - a) * params + a * partner`` in float32, the same three operations and bits,
            # written tile by tile into the round buffer, which becomes the anchor (as in
            # finish_round; the old anchor is never written: it may still be read, and is recycled
            # as the next buffer once nobody does). Was two fresh model-sized arrays per sync.
            buffer = self.local_buffer()
            tiles.blend_into(self.params, partner_params, alpha, buffer)
            old = self.params
            self.params = buffer
            self._buffer = None
            self._recycle(old)
            del old
        else:
            self.params = ((1.0 - alpha) * self.params + alpha * partner_params).astype(np.float32)
        # A laggard catches up, but never further than one peer's word may carry it.
        self.round = max(self.round, min(partner_round, self.round + future_window(self.config)))

    def adopt(self, params: np.ndarray, round: int) -> None:
        """Replace our state with a live peer's (joining, or too far behind to mix).

        An exact float32 copy of ``params`` (not ``0 * ours + 1 * theirs``, which made four 0.5 GB
        arrays at 124M parameters and could turn a -0.0 into +0.0), and fresh zero momentum
        (``np.zeros``: pages untouched until a momentum step writes them; zeroing the old array
        in place made all 0.5 GB resident even at outer momentum 0).
        """
        self._check_partner(params)
        self.params = np.array(params, dtype=np.float32)
        self.round = round
        self.momentum = np.zeros(self.params.shape, np.float32)
        self.feedback.reset()

    # --- checkpoints: plain arrays and ints only, nothing executable -----------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The live arrays, not copies: later rounds overwrite the momentum and residual arrays in
        place (and reuse the anchor's as a buffer once no one refers to it); copy what is kept."""
        return {
            "params": self.params,
            "momentum": self.momentum,
            "residual": self.feedback.residual,
            "round": np.array([self.round], dtype=np.int64),
        }

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in ("params", "momentum", "residual"):
            if arrays[name].shape != self.params.shape:
                raise ValueError(
                    f"checkpoint {name} has shape {arrays[name].shape}, expected {self.params.shape}"
                )
        self.params = arrays["params"].astype(np.float32).copy()
        self.momentum = arrays["momentum"].astype(np.float32).copy()
        self.feedback.residual[:] = arrays["residual"]
        round_ = int(arrays["round"][0])
        if not 0 <= round_ <= MAX_ROUND:
            raise ValueError(f"checkpoint round {round_} is outside [0, {MAX_ROUND}] (a poisoned round?)")
        if not (np.isfinite(self.params).all() and np.isfinite(self.momentum).all()):
            raise ValueError("checkpoint parameters contain NaN or Inf")
        self.round = round_


def consensus_distance(vectors: Sequence[np.ndarray]) -> float | None:
    """Mean L2 distance of peers' parameters to their mean, over the norm of the mean.

    Relative, so that it reads the same for any model: 0.01 means the peers agree to about 1 %.
    The daemon's swarm summary and the simulator both report this.
    """
    if len(vectors) < 2:
        return 0.0 if len(vectors) else None
    stacked = np.stack(vectors).astype(np.float64)
    mean = stacked.mean(axis=0)
    return float(np.mean(np.linalg.norm(stacked - mean, axis=1)) / max(np.linalg.norm(mean), 1e-12))


def bits_per_param(wire_bytes: int, numel: int) -> float:
    """Bits on the wire per model parameter (for one message)."""
    return 8.0 * wire_bytes / max(1, numel)


def expected_round_bits_per_param(message_bytes: int, numel: int, fanout: int) -> float:
    """Bits per parameter a peer sends per round: ``fanout`` copies of one update message."""
    return bits_per_param(message_bytes * fanout, numel) if numel else math.nan
