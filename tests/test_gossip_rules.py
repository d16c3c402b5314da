"""The gossip rules: partner choice, robust aggregation and one learner's round state machine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from p2pfm.config import ConfigError
from p2pfm.core.aggregation import norm as vector_norm
from p2pfm.core.codecs import CodecSpec, decode, encode
from p2pfm.core.errors import (
    FutureRound,
    Ignore,
    NonFinite,
    Outlier,
    Reject,
    RoundFull,
    ShapeMismatch,
    StaleRound,
)
from p2pfm.core.gossip import GossipConfig, GossipLearner, aggregate, choose_partners, sync_due, sync_interval
from p2pfm.core.tensorfile import pack_arrays, unpack_arrays

NUMEL = 64
LOSSLESS = CodecSpec("none")


def config(**changes) -> GossipConfig:
    return dataclasses.replace(GossipConfig(), **changes)


def wire_of(vector) -> dict:
    """A lossless wire dict of a vector, as a peer would send it."""
    return encode(np.asarray(vector, np.float32), LOSSLESS)


def dyadic(rng: np.random.Generator, scale: int = 8) -> np.ndarray:
    """Small multiples of 1/4: every sum and halving below stays exact in float32."""
    return (rng.integers(-scale, scale + 1, NUMEL) / 4).astype(np.float32)


# --------------------------------------------------------------------------- choose_partners

PEERS = [f"peer-{i}" for i in range(10)]


def test_partners_exclude_self_and_are_distinct():
    """We never push to ourselves, and never twice to one peer."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        picks = choose_partners(PEERS, "peer-3", 4, rng)
        assert "peer-3" not in picks
        assert len(set(picks)) == len(picks) == 4
        assert set(picks) <= set(PEERS)


@pytest.mark.parametrize(("fanout", "live", "expected"), [(2, 10, 2), (9, 10, 9), (20, 10, 9), (3, 2, 1)])
def test_partner_count_is_min_of_fanout_and_other_live_peers(fanout, live, expected):
    """min(fanout, live peers other than us) partners are chosen."""
    picks = choose_partners(PEERS[:live], "peer-0", fanout, np.random.default_rng(1))
    assert len(picks) == expected


def test_duplicate_live_entries_count_once():
    """A peer listed twice is still one candidate."""
    picks = choose_partners(["a", "b", "b", "b"], "a", 5, np.random.default_rng(0))
    assert picks == ["b"]


def test_partner_choice_depends_on_set_and_seed_not_order():
    """Same seed and same set of live peers give the same partners, whatever the input order."""
    shuffled = list(reversed(PEERS))
    for seed in range(20):
        first = choose_partners(PEERS, "peer-0", 3, np.random.default_rng(seed))
        second = choose_partners(shuffled, "peer-0", 3, np.random.default_rng(seed))
        assert first == second


def test_partner_choice_varies_with_the_seed():
    """Different seeds spread pushes over the swarm."""
    chosen = {tuple(choose_partners(PEERS, "peer-0", 2, np.random.default_rng(s))) for s in range(30)}
    assert len(chosen) > 5


@pytest.mark.parametrize(("live", "fanout"), [([], 3), (["me"], 3), (["me", "a", "b"], 0), (["a", "b"], -1)])
def test_no_partners_when_alone_or_fanout_zero(live, fanout):
    """No other live peer, or fanout 0, gives an empty list."""
    assert choose_partners(live, "me", fanout, np.random.default_rng(0)) == []


# --------------------------------------------------------------------------- aggregate


def test_mean_of_known_vectors():
    """mean averages own and received."""
    own = np.array([1, 2, 3], np.float32)
    received = [np.array([3, 4, 5], np.float32), np.array([5, 0, 1], np.float32)]
    result = aggregate(own, received, config(aggregation="mean"))
    assert np.allclose(result, [3, 2, 3])


def test_no_received_returns_own_or_own_over_expected_denominator():
    """With nothing received: own as is, or own / (1 + expected) when the denominator is fixed."""
    own = np.array([2, -4], np.float32)
    for aggregation in ("mean", "clipped_mean", "trimmed_mean", "median"):
        cfg = config(aggregation=aggregation)
        assert np.array_equal(aggregate(own, [], cfg), own)
        assert np.allclose(aggregate(own, [], cfg, expected_received=3), own / 4)


def test_expected_received_fixes_the_denominator():
    """expected_received=k divides by 1+k however many updates arrived."""
    own = np.ones(4, np.float32)
    received = [np.full(4, 3, np.float32)]
    assert np.allclose(aggregate(own, received, config(aggregation="mean"), expected_received=3), 1.0)
    assert np.allclose(aggregate(own, received, config(aggregation="clipped_mean"), expected_received=3), 1.0)
    assert np.allclose(aggregate(own, received, config(aggregation="mean"), expected_received=-5), 4.0)


def test_clipped_mean_passes_honest_updates_unchanged():
    """Updates within clip_multiplier * ||own|| of own are averaged as in mean."""
    rng = np.random.default_rng(0)
    own = rng.standard_normal(NUMEL).astype(np.float32)
    honest = [own + 0.1 * rng.standard_normal(NUMEL).astype(np.float32) for _ in range(3)]
    clipped = aggregate(own, honest, config(aggregation="clipped_mean"))
    plain = aggregate(own, honest, config(aggregation="mean"))
    assert np.allclose(clipped, plain, atol=1e-6)


def test_clipped_mean_bounds_a_huge_poisoned_update():
    """A poisoned update leaves the result within (clip_multiplier * ||own|| + honest spread) / count of own."""
    rng = np.random.default_rng(1)
    cfg = config(aggregation="clipped_mean", clip_multiplier=2.0)
    own = rng.standard_normal(NUMEL).astype(np.float32)
    honest = [own + 0.1 * rng.standard_normal(NUMEL).astype(np.float32) for _ in range(2)]
    poison = np.full(NUMEL, 1e6, np.float32)
    result = aggregate(own, [*honest, poison], cfg)
    own_norm = float(np.linalg.norm(own))
    spread = max(float(np.linalg.norm(h - own)) for h in honest)
    count = 4  # own + 2 honest + poison
    # each received term lies within its distance (<= radius) of own
    assert np.linalg.norm(result - own) <= (cfg.clip_multiplier * own_norm + 2 * spread) / count + 1e-4
    # the poisoned term is clipped to own + d with ||d|| <= radius: it adds at most (1 + m) ||own|| / count
    honest_only = aggregate(own, honest, cfg, expected_received=3)
    assert np.linalg.norm(result - honest_only) <= (1 + cfg.clip_multiplier) * own_norm / count + 1e-4
    # while a plain mean is dragged off by the attacker
    assert np.linalg.norm(aggregate(own, [*honest, poison], config(aggregation="mean"))) > 1e5


def test_clipped_mean_with_zero_own_accepts_updates_as_sent():
    """With nothing of our own sent this round (zero delta), received updates cannot be clipped around it."""
    own = np.zeros(3, np.float32)
    received = [np.array([2, 2, 2], np.float32)]
    assert np.allclose(aggregate(own, received, config(aggregation="clipped_mean")), [1, 1, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 2762, 100_003])
def test_vector_norm_helper_is_numpys_norm_bit_for_bit(dtype, n):
    """aggregation.norm (used by the clip and the round report) equals float(np.linalg.norm(x)) exactly."""
    rng = np.random.default_rng(n)
    for x in (
        rng.standard_normal(n),
        rng.standard_normal(n) * 1e-30,
        rng.standard_normal(n) * 1e15,
        np.zeros(n),
        np.where(rng.random(n) < 0.99, 0.0, rng.standard_normal(n)),  # sparse, like top-k deltas
    ):
        x = x.astype(dtype)
        assert vector_norm(x) == float(np.linalg.norm(x))
        assert vector_norm(x[1:] - x[:-1]) == float(np.linalg.norm(x[1:] - x[:-1]))


def test_median_is_coordinatewise():
    """median takes each coordinate's median over own + received, ignoring one outlier."""
    own = np.array([1, 10], np.float32)
    received = [np.array([2, 20], np.float32), np.array([1e9, 30], np.float32)]
    assert np.allclose(aggregate(own, received, config(aggregation="median")), [2, 20])


def test_trimmed_mean_drops_extremes_per_coordinate():
    """trimmed_mean over 5 vectors drops the smallest and largest value of each coordinate."""
    own = np.array([0.0, 5.0], np.float32)
    received = [np.array(v, np.float32) for v in ([1, 1e9], [2, -1e9], [3, 6], [1e9, 7])]
    # column 0: 0 1 2 3 1e9 -> mean(1, 2, 3) = 2; column 1: -1e9 5 6 7 1e9 -> mean(5, 6, 7) = 6
    assert np.allclose(aggregate(own, received, config(aggregation="trimmed_mean")), [2, 6])


def test_trimmed_mean_of_two_is_the_mean():
    """With fewer than 3 vectors nothing can be trimmed: plain mean."""
    own = np.array([0, 4], np.float32)
    assert np.allclose(
        aggregate(own, [np.array([2, 0], np.float32)], config(aggregation="trimmed_mean")), [1, 2]
    )


@pytest.mark.parametrize("aggregation", ["mean", "clipped_mean"])
def test_fixed_denominator_makes_sums_commute_across_rounds(aggregation):
    """Two learners receiving the same updates in different rounds end with identical params."""
    rng = np.random.default_rng(2)
    start = dyadic(rng)
    u1, u2, u3 = dyadic(rng), dyadic(rng), dyadic(rng)
    cfg = config(aggregation=aggregation, codec=LOSSLESS)
    a, b = GossipLearner(start, cfg), GossipLearner(start, cfg)
    # a sees {u1} then {u2, u3}; b sees {u1, u2} then {u3}. Neither sends (relays only).
    a.receive("p1", 0, wire_of(u1))
    a.finish_round(expected_received=1)
    a.receive("p2", 0, wire_of(u2))
    a.receive("p3", 1, wire_of(u3))
    a.finish_round(expected_received=1)
    b.receive("p1", 0, wire_of(u1))
    b.receive("p2", 0, wire_of(u2))
    b.finish_round(expected_received=1)
    b.receive("p3", 1, wire_of(u3))
    b.finish_round(expected_received=1)
    assert np.array_equal(a.params, b.params)
    assert np.array_equal(a.params, start - (u1 + u2 + u3) / 2)


def test_count_based_denominator_does_not_commute():
    """Without expected_received the same updates in different rounds give different params (the reason for it)."""
    rng = np.random.default_rng(2)
    start = dyadic(rng)
    u1, u2, u3 = dyadic(rng), dyadic(rng), dyadic(rng)
    cfg = config(aggregation="mean", codec=LOSSLESS)
    a, b = GossipLearner(start, cfg), GossipLearner(start, cfg)
    a.receive("p1", 0, wire_of(u1))
    a.finish_round()
    a.receive("p2", 0, wire_of(u2))
    a.receive("p3", 1, wire_of(u3))
    a.finish_round()
    b.receive("p1", 0, wire_of(u1))
    b.receive("p2", 0, wire_of(u2))
    b.finish_round()
    b.receive("p3", 1, wire_of(u3))
    b.finish_round()
    assert not np.allclose(a.params, b.params)


# --------------------------------------------------------------------------- GossipLearner


def learner(**changes) -> GossipLearner:
    params = np.random.default_rng(3).standard_normal(NUMEL).astype(np.float32)
    return GossipLearner(params, config(**changes))


def test_round_without_inbox_applies_own_compressed_delta():
    """make_update + finish_round with nothing received moves the anchor by exactly what we sent."""
    node = learner(codec=CodecSpec("topk", topk_fraction=0.1))
    anchor = node.params.copy()
    local = anchor - np.random.default_rng(4).standard_normal(NUMEL).astype(np.float32)
    wire = node.make_update(local)
    sent = decode(wire, expected_numel=NUMEL)
    new, report = node.finish_round()
    assert np.array_equal(new, (anchor - sent).astype(np.float32))
    assert np.count_nonzero(sent) == 7  # ceil(0.1 * 64): the rest waits in the residual
    assert report.received == 0 and report.round == 0
    assert report.own_norm == pytest.approx(float(np.linalg.norm(sent)))
    assert node.round == 1


def test_round_without_update_or_inbox_leaves_params():
    """A round where we neither sent nor received changes nothing but the round number."""
    node = learner()
    before = node.params.copy()
    new, report = node.finish_round()
    assert np.array_equal(new, before) and report.received == 0 and node.round == 1


def test_outer_momentum_is_nesterov():
    """With momentum mu the step is delta + mu * (mu * m + delta)."""
    node = learner(codec=LOSSLESS, outer_momentum=0.5)
    anchor = node.params.copy()
    delta = np.full(NUMEL, 0.25, np.float32)
    node.make_update(anchor - delta)
    first, _ = node.finish_round()
    assert np.allclose(first, anchor - (delta + 0.5 * delta))
    node.make_update(first - delta)
    second, _ = node.finish_round()
    momentum = 0.5 * delta + delta
    assert np.allclose(second, first - (delta + 0.5 * momentum))


def test_make_update_refuses_wrong_shape():
    """Local params of another size are a local bug (ValueError)."""
    with pytest.raises(ValueError):
        learner().make_update(np.zeros(NUMEL + 1, np.float32))


def test_learner_requires_flat_float32_params():
    """Params must be a flat float32 vector."""
    with pytest.raises(ValueError):
        GossipLearner(np.zeros((2, 2), np.float32), GossipConfig())
    with pytest.raises(ValueError):
        GossipLearner(np.zeros(4, np.float64), GossipConfig())


@pytest.mark.parametrize(("sender_round", "ok"), [(1, False), (2, True), (10, True), (42, True), (43, False)])
def test_receive_accepts_rounds_within_lag_and_ignores_the_rest(sender_round, ok):
    """At round 10 with max_round_lag 8: rounds 2..42 are accepted, older ones are ignored as
    StaleRound, far-ahead ones as FutureRound; neither is a rejection (no score penalty)."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(max_round_lag=8), round=10)
    update = wire_of(np.ones(NUMEL))
    if ok:
        assert np.array_equal(node.receive("p", sender_round, update), np.ones(NUMEL, np.float32))
    else:
        with pytest.raises(StaleRound if sender_round < 10 else FutureRound) as ignored:
            node.receive("p", sender_round, update)
        assert isinstance(ignored.value, Ignore) and not ignored.value.lowers_score


def test_receive_with_zero_lag_still_tolerates_a_few_rounds_ahead():
    """max_round_lag 0 refuses any older round but accepts up to 4 rounds ahead."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(max_round_lag=0), round=5)
    with pytest.raises(StaleRound):
        node.receive("p", 4, wire_of(np.ones(NUMEL)))
    node.receive("p", 9, wire_of(np.ones(NUMEL)))
    with pytest.raises(FutureRound):
        node.receive("p", 10, wire_of(np.ones(NUMEL)))


@pytest.mark.parametrize("numel", [NUMEL - 1, NUMEL + 1, 1])
def test_receive_rejects_wrong_size_as_shape_mismatch(numel):
    """An update for another model size is refused by decode as ShapeMismatch."""
    node = learner()
    with pytest.raises(ShapeMismatch):
        node.receive("p", 0, wire_of(np.ones(numel)))
    _, report = node.finish_round()
    assert report.received == 0


def test_receive_rejects_non_finite_values():
    """NaN in a lossless update is refused (NonFinite is a Reject)."""
    values = np.ones(NUMEL, np.float32)
    values[5] = np.nan
    wire = {"codec": "none", "numel": NUMEL, "values": values.tobytes()}
    with pytest.raises(NonFinite):
        learner().receive("p", 0, wire)


def test_receive_rejects_garbage_wire_as_reject():
    """A malformed wire dict is some Reject, never a crash."""
    with pytest.raises(Reject):
        learner().receive("p", 0, {"codec": "zip", "numel": NUMEL})


def test_duplicate_sender_and_round_counts_once():
    """Many copies from one sender for one round count once (the last replaces the first)."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(aggregation="mean", codec=LOSSLESS))
    for value in (100.0, 100.0, 4.0):
        node.receive("p", 0, wire_of(np.full(NUMEL, value)))
    new, report = node.finish_round()
    assert report.received == 1
    assert np.allclose(new, -2.0)  # (own 0 + 4) / 2


def test_same_sender_different_rounds_count_separately():
    """A faster peer's updates for two of its rounds are both real work."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(aggregation="mean"))
    node.receive("p", 0, wire_of(np.ones(NUMEL)))
    node.receive("p", 1, wire_of(np.ones(NUMEL)))
    node.receive("q", 0, wire_of(np.ones(NUMEL)))
    _, report = node.finish_round()
    assert report.received == 3


def test_one_key_claiming_many_rounds_counts_at_most_twice():
    """The observed attack: one key sent updates for 33 rounds into one round (all inside the
    round window) and each counted. Now a round counts a sender's two newest rounds; older ones
    are ignored (round_full), and a newer one replaces the oldest."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(aggregation="mean", max_round_lag=8))
    node.round = 10
    refused = 0
    for r in range(2, 35):
        try:
            node.receive("liar", r, wire_of(np.full(NUMEL, 100.0)))
        except RoundFull:
            refused += 1
    assert refused == 0  # ascending rounds: each newer one replaces the oldest
    assert sorted(node._inbox["liar"]) == [33, 34]
    with pytest.raises(RoundFull):
        node.receive("liar", 20, wire_of(np.ones(NUMEL)))
    _, report = node.finish_round()
    assert report.received == 2


def test_a_round_counts_at_most_its_cap_of_updates_and_memory_stays_sparse():
    """400 valid top-k updates from 400 keys: the round counts max_updates_per_round of them, and
    holds them in their compressed form (what the peer that grew to 2.4 GB held densely)."""
    cfg = config(
        aggregation="mean", max_updates_per_round=16, codec=CodecSpec(name="topk", topk_fraction=0.01)
    )
    node = GossipLearner(np.zeros(10_000, np.float32), cfg)
    rng = np.random.default_rng(0)
    wire = encode(rng.standard_normal(10_000).astype(np.float32), cfg.codec)
    refused = 0
    for sender in range(400):
        try:
            node.receive(f"k{sender}", 0, wire)
        except RoundFull:
            refused += 1
    assert refused == 400 - 16
    assert all(isinstance(w, dict) for queued in node._inbox.values() for w in queued.values())
    _, report = node.finish_round()
    assert report.received == 16


def test_finish_round_is_independent_of_arrival_order():
    """The same inbox in a different arrival order gives bit-identical params."""
    rng = np.random.default_rng(5)
    updates = {f"p{i}": rng.standard_normal(NUMEL).astype(np.float32) for i in range(5)}
    results = []
    for order in (sorted(updates), sorted(updates, reverse=True)):
        node = learner(aggregation="clipped_mean")
        node.make_update(node.params - 0.5)
        for sender in order:
            node.receive(sender, 0, wire_of(updates[sender]))
        results.append(node.finish_round(expected_received=2)[0])
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize(("expected", "denominator"), [(None, 3), (4, 5)])
def test_drain_applies_late_updates_without_advancing_the_round(expected, denominator):
    """drain() applies what arrived after our last round: params move, the round stays."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(codec=LOSSLESS))
    node.finish_round()
    node.receive("p", 0, wire_of(np.full(NUMEL, 2.0)))
    node.receive("q", 1, wire_of(np.full(NUMEL, 4.0)))
    params, applied = node.drain(expected)
    assert applied == 2
    assert node.round == 1
    assert np.allclose(params, -6.0 / denominator)
    assert np.array_equal(params, node.params)
    again, applied_again = node.drain(expected)  # the inbox was emptied
    assert applied_again == 0 and np.array_equal(again, params)


def test_drain_with_nothing_received_changes_nothing():
    """An empty inbox drains to the same params."""
    node = learner()
    before = node.params.copy()
    params, applied = node.drain(2)
    assert applied == 0 and np.array_equal(params, before) and node.round == 0


def test_mix_with_moves_by_sync_weight_and_takes_max_round():
    """mix_with averages towards a partner with sync_weight and catches up its round."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(sync_weight=0.25), round=3)
    node.mix_with(np.full(NUMEL, 4.0, np.float32), partner_round=7)
    assert np.allclose(node.params, 1.0) and node.round == 7
    node.mix_with(np.full(NUMEL, 1.0, np.float32), partner_round=2, weight=1.0)
    assert np.allclose(node.params, 1.0) and node.round == 7  # never goes back


def test_mix_with_rejects_wrong_shape_and_non_finite():
    """A partner state of another size or with NaN is refused, params untouched."""
    node = learner()
    before = node.params.copy()
    with pytest.raises(ShapeMismatch):
        node.mix_with(np.zeros(NUMEL + 1, np.float32), 0)
    bad = np.zeros(NUMEL, np.float32)
    bad[0] = np.inf
    with pytest.raises(NonFinite):
        node.mix_with(bad, 0)
    assert np.array_equal(node.params, before)


def test_adopt_replaces_params_round_momentum_and_residual():
    """adopt() takes the partner's params and round (even a lower one) and forgets local state."""
    node = learner(outer_momentum=0.9, codec=CodecSpec("topk", topk_fraction=0.05))
    node.make_update(node.params - 1.0)
    node.finish_round()
    node.round = 20
    assert np.any(node.momentum) and np.any(node.feedback.residual)
    partner = np.arange(NUMEL, dtype=np.float32)
    node.adopt(partner, round=12)
    assert np.array_equal(node.params, partner)
    assert node.round == 12
    assert not np.any(node.momentum) and not np.any(node.feedback.residual)


def test_state_arrays_round_trip_continues_identically():
    """A learner restored from state_arrays (through a tensor file) behaves bit-identically."""
    node = learner(outer_momentum=0.5, codec=CodecSpec("topk", topk_fraction=0.1))
    rng = np.random.default_rng(6)
    for _ in range(3):
        node.make_update(node.params - rng.standard_normal(NUMEL).astype(np.float32))
        node.finish_round()
    arrays, _ = unpack_arrays(pack_arrays(node.state_arrays()))
    clone = GossipLearner(np.zeros(NUMEL, np.float32), node.config)
    clone.load_state_arrays(arrays)
    assert clone.round == node.round == 3
    step = rng.standard_normal(NUMEL).astype(np.float32)
    incoming = wire_of(rng.standard_normal(NUMEL))
    outcomes = []
    for each in (node, clone):
        wire = each.make_update(each.params - step)
        each.receive("p", 3, incoming)
        outcomes.append((wire, each.finish_round(expected_received=1)[0], each.feedback.residual.copy()))
    assert outcomes[0][0] == outcomes[1][0]  # same bytes sent
    assert np.array_equal(outcomes[0][1], outcomes[1][1])
    assert np.array_equal(outcomes[0][2], outcomes[1][2])


def test_load_state_arrays_refuses_wrong_shapes():
    """A checkpoint of another model size is refused (local ValueError)."""
    node = learner()
    state = {k: v.copy() for k, v in node.state_arrays().items()}
    state["momentum"] = np.zeros(NUMEL + 1, np.float32)
    with pytest.raises(ValueError, match="momentum"):
        node.load_state_arrays(state)


@pytest.mark.parametrize(("every", "rounds_true"), [(3, {3, 6, 9}), (1, set(range(1, 10))), (0, set())])
def test_sync_due_every_n_rounds_never_at_round_zero(every, rounds_true):
    """sync_due is true at multiples of sync_every (never at round 0; never if 0)."""
    observed = {r for r in range(10) if sync_due(r, 0, config(sync_every=every))}
    assert observed == rounds_true


@pytest.mark.parametrize(
    ("live_others", "interval"), [(0, 50), (1, 50), (2, 50), (3, 33), (7, 14), (19, 5), (99, 2), (999, 2)]
)
def test_auto_sync_interval_falls_with_the_share_of_updates_heard(live_others, interval):
    """sync_every = "auto": 50 rounds when a peer hears every update, down to 2 in large swarms."""
    assert sync_interval(config(sync_every="auto", fanout=2), live_others) == interval
    assert sync_interval(config(sync_every=7, fanout=2), live_others) == 7  # a number is taken as is


def test_auto_sync_pulls_more_often_in_a_larger_swarm():
    """The same peer syncs every 50 rounds among 3 peers and every 2 among 100."""
    cfg = config(sync_every="auto", fanout=2)
    small = {r for r in range(1, 101) if sync_due(r, 2, cfg)}
    large = {r for r in range(1, 101) if sync_due(r, 99, cfg)}
    assert small == {50, 100}
    assert large == set(range(2, 101, 2))


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"sync_every": "often"}, "gossip.sync_every"),
        ({"inner_steps": 0}, "gossip.inner_steps"),
        ({"fanout": -1}, "gossip.fanout"),
        ({"outer_lr": 0.0}, "gossip.outer_lr"),
        ({"outer_momentum": 1.0}, "gossip.outer_momentum"),
        ({"outer_momentum": -0.1}, "gossip.outer_momentum"),
        ({"aggregation": "mode"}, "gossip.aggregation"),
        ({"clip_multiplier": 0.0}, "gossip.clip_multiplier"),
        ({"max_round_lag": -1}, "gossip.max_round_lag"),
        ({"sync_every": -1}, "gossip.sync_every"),
        ({"sync_weight": 0.0}, "gossip.sync_weight"),
        ({"sync_weight": 1.5}, "gossip.sync_weight"),
    ],
)
def test_gossip_config_validation_names_the_field(changes, field_name):
    """Each invalid GossipConfig value is a ConfigError starting with the field's dotted name."""
    with pytest.raises(ConfigError, match=rf"^{field_name}: "):
        GossipConfig(**changes)


def test_drain_clips_late_updates_to_the_size_of_our_last_update():
    """A stranger's huge update arriving after our last round moves us by a bounded step (issue 12);
    the outlier rule is off here to show the drain's own clipping."""
    cfg = config(aggregation="clipped_mean", clip_multiplier=2.0, outlier_multiplier=0.0)
    node = GossipLearner(np.zeros(NUMEL, np.float32), cfg)
    node.make_update(np.full(NUMEL, -0.01, np.float32))  # our own update: norm 0.08
    node.finish_round(expected_received=1)
    own_norm = 0.01 * np.sqrt(NUMEL)
    before = node.params.copy()
    node.receive("stranger", 1, wire_of(np.full(NUMEL, 1e6)))
    params, applied = node.drain(expected_received=1)
    assert applied == 1
    assert (
        np.linalg.norm(params - before) <= 2.0 * own_norm / 2 * 1.0001
    )  # clipped to 2 x, halved by the mean


def test_an_update_fifty_times_ours_is_rejected_as_an_outlier():
    """Clipping bounds a x1e4 update, but only a rejection (severity 10) gets its sender ignored."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config(aggregation="clipped_mean", codec=LOSSLESS))
    node.receive("early", 0, wire_of(np.full(NUMEL, 1e6)))  # before our first update: nothing to compare
    node.make_update(np.full(NUMEL, -0.01, np.float32))
    node.finish_round(expected_received=1)
    node.receive("honest", 1, wire_of(np.full(NUMEL, 0.1)))  # 10x ours: heterogeneous, still fine
    with pytest.raises(Outlier) as caught:
        node.receive("liar", 1, wire_of(np.full(NUMEL, 0.6)))  # 60x ours
    assert caught.value.severity == 10


def test_checkpoint_with_a_poisoned_round_is_refused():
    """A checkpointed round beyond MAX_ROUND (as the overflow attack left them) is refused on load."""
    node = GossipLearner(np.zeros(NUMEL, np.float32), config())
    state = node.state_arrays()
    state["round"] = np.array([2**63 - 1], np.int64)
    with pytest.raises(ValueError, match="round"):
        GossipLearner(np.zeros(NUMEL, np.float32), config()).load_state_arrays(state)
