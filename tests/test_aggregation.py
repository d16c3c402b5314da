"""Aggregation rules: the registry gives the old aggregate() bit for bit, and a new rule is one class."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
import pytest

from p2pfm.config import ConfigError, build_config
from p2pfm.core import aggregation
from p2pfm.core.aggregation import (
    AGGREGATIONS,
    AggregationRule,
    TrimmedMean,
    denominator,
    register_aggregation,
    rule_for,
)
from p2pfm.core.codecs import CodecSpec
from p2pfm.core.gossip import GossipConfig, GossipLearner, aggregate

BUILTIN = ("mean", "clipped_mean", "trimmed_mean", "median")


def reference_aggregate(own, received, config, expected_received=None):
    """aggregate() as it was before the registry (commit 457c51e), kept verbatim as the reference."""
    denominator = 1 + (len(received) if expected_received is None else max(expected_received, 0))
    denominator = max(denominator, 1)
    if not received:
        return own / denominator if expected_received is not None else own.copy()
    if config.aggregation == "mean":
        return (own + np.sum(received, axis=0)) / denominator
    if config.aggregation == "clipped_mean":
        radius = config.clip_multiplier * float(np.sqrt(own.dot(own)))
        total = own.astype(np.float64, copy=True)
        for update in received:
            difference = update - own
            distance = float(np.sqrt(difference.dot(difference)))
            if radius == 0.0:
                total += update
            elif distance > radius:
                total += own + difference * (radius / distance)
            else:
                total += update
        return (total / denominator).astype(np.float32)
    stacked = np.stack([own, *received])  # (n, numel)
    if config.aggregation == "median":
        return np.median(stacked, axis=0).astype(np.float32)
    trim = max(1, len(stacked) // 5) if len(stacked) >= 3 else 0
    if trim == 0:
        return stacked.mean(axis=0).astype(np.float32)
    ordered = np.sort(stacked, axis=0)
    return ordered[trim : len(stacked) - trim].mean(axis=0).astype(np.float32)


def random_inputs(rng: np.random.Generator, count: int, numel: int, zero_own: bool):
    scale = rng.choice([1e-6, 1.0, 1e4])
    own = np.zeros(numel, np.float32) if zero_own else (rng.standard_normal(numel) * scale).astype(np.float32)
    received = [
        (rng.standard_normal(numel) * scale * rng.choice([0.1, 1, 50])).astype(np.float32)
        for _ in range(count)
    ]
    if count and rng.random() < 0.3:
        received[0] = own.copy()  # an update equal to ours: distance 0
    if count and rng.random() < 0.3:
        received[-1] = np.full(numel, 1e6, np.float32)  # a poisoned one, far outside the clip
    return own, received


def test_builtin_rules_are_registered_in_listing_order():
    """The four rules are registered in the order config errors and help texts list them."""
    assert tuple(AGGREGATIONS)[:4] == BUILTIN
    assert all(AGGREGATIONS[name].name == name for name in BUILTIN)


@pytest.mark.parametrize("rule", BUILTIN)
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 14, 15, 16, 23])
@pytest.mark.parametrize("expected_received", [None, -2, 0, 1, 2, 5])
def test_aggregate_is_bit_identical_to_the_reference(rule, count, expected_received):
    """Every rule, inbox size and fixed denominator gives exactly the old aggregate()'s bits and dtype."""
    rng = np.random.default_rng(
        [BUILTIN.index(rule), count, 7 if expected_received is None else expected_received + 3]
    )
    for zero_own in (False, True):
        for numel in (1, 7, 300):
            own, received = random_inputs(rng, count, numel, zero_own)
            cfg = GossipConfig(aggregation=rule)
            got = aggregate(own, received, cfg, expected_received)
            want = reference_aggregate(own, received, cfg, expected_received)
            assert got.dtype == want.dtype
            assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("clip_multiplier", [0.5, 1, 3.0])
def test_clipped_mean_reads_clip_multiplier_bit_identically(clip_multiplier):
    """The clip radius comes from GossipConfig.clip_multiplier, as before the registry."""
    rng = np.random.default_rng(11)
    cfg = GossipConfig(aggregation="clipped_mean", clip_multiplier=clip_multiplier)
    for count in (1, 3, 8):
        own, received = random_inputs(rng, count, 50, zero_own=False)
        got = aggregate(own, received, cfg, 2)
        assert got.tobytes() == reference_aggregate(own, received, cfg, 2).tobytes()


@pytest.mark.parametrize("count", range(3, 60))
def test_default_trim_fraction_trims_count_over_five_at_least_one(count):
    """trim_fraction 0.2 drops max(1, n // 5) at each end: today's rule, for every inbox size."""
    values = np.arange(count, dtype=np.float32)[:, None]
    trim = max(1, count // 5)
    got = TrimmedMean(0.2).combine(values[0], list(values[1:]))
    assert got.tobytes() == values[trim : count - trim].mean(axis=0).astype(np.float32).tobytes()


@pytest.mark.parametrize(
    ("fraction", "count", "trimmed"),
    [
        (0.1, 10, 1),
        (0.1, 20, 2),
        (0.29, 100, 29),
        (0.3, 10, 3),
        (0.01, 5, 1),
        (0.49, 4, 1),
        (0.4999999999, 100, 49),
    ],
)
def test_trim_fraction_sets_how_many_are_dropped_at_each_end(fraction, count, trimmed):
    """floor(fraction * n) at each end (decimal fractions as written), at least 1, never the whole inbox."""
    values = np.arange(count, dtype=np.float32)[:, None]
    cfg = GossipConfig(aggregation="trimmed_mean", trim_fraction=fraction)
    got = aggregate(values[0], list(values[1:]), cfg)
    assert got.tobytes() == values[trimmed : count - trimmed].mean(axis=0).astype(np.float32).tobytes()


@pytest.mark.parametrize("value", [0.0, -0.1, 0.5, 0.7])
def test_trim_fraction_outside_open_half_interval_is_a_config_error(value):
    """trim_fraction must be in (0, 0.5): 0 would still trim one (use mean), 0.5 would trim everything."""
    with pytest.raises(ConfigError, match=r"^gossip\.trim_fraction: "):
        GossipConfig(trim_fraction=value)


def test_trim_fraction_is_read_from_config_files():
    """gossip.trim_fraction is an ordinary config key (TOML tables and --trim-fraction)."""
    cfg = build_config(GossipConfig, {"aggregation": "trimmed_mean", "trim_fraction": 0.1})
    assert rule_for(cfg) == TrimmedMean(trim_fraction=0.1)


def test_denominator_counts_received_or_the_fixed_expectation():
    """1 + received, or 1 + max(expected, 0) when fixed; never below 1."""
    assert [denominator(3, None), denominator(3, 1), denominator(0, -4), denominator(0, None)] == [4, 2, 1, 1]


def test_norm_is_numpys_norm_bit_for_bit():
    """aggregation.norm (the clip) equals float(np.linalg.norm(x)) exactly."""
    rng = np.random.default_rng(3)
    for x in (rng.standard_normal(2762), rng.standard_normal(33).astype(np.float32) * 1e-30, np.zeros(5)):
        assert aggregation.norm(x) == float(np.linalg.norm(x))


# --------------------------------------------------------------------------- a new rule


@dataclasses.dataclass(frozen=True)
class NormClippedMean(AggregationRule):
    """A toy rule, here only: scale each received update to at most clip_multiplier * ||own||, average."""

    name: ClassVar[str] = "toy_norm_clip"
    parameters: ClassVar[tuple[str, ...]] = ("clip_multiplier",)
    clip_multiplier: float = 2.0

    def merge(
        self, own: np.ndarray, received: Sequence[np.ndarray], expected_received: int | None
    ) -> np.ndarray:
        bound = self.clip_multiplier * aggregation.norm(own)
        total = own.astype(np.float64)
        for update in received:
            size = aggregation.norm(update)
            total += update * (bound / size) if size > bound > 0 else update
        return (total / denominator(len(received), expected_received)).astype(np.float32)


@pytest.fixture
def toy_rule() -> Iterator[type[AggregationRule]]:
    """The toy rule, registered for one test and removed after it (other tests list the registry)."""
    rule = register_aggregation(NormClippedMean)
    yield rule
    del AGGREGATIONS[rule.name]


def test_registered_rule_is_selectable_and_gets_its_parameters(toy_rule):
    """A registered rule is a valid gossip.aggregation, built with its parameters from the config."""
    cfg = build_config(GossipConfig, {"aggregation": toy_rule.name, "clip_multiplier": 1.0})
    assert rule_for(cfg) == NormClippedMean(clip_multiplier=1.0)
    own = np.array([3.0, 4.0], np.float32)  # norm 5
    huge = np.array([0.0, 500.0], np.float32)  # scaled to norm 5
    assert np.array_equal(aggregate(own, [huge], cfg), np.array([1.5, 4.5], np.float32))
    assert np.array_equal(
        aggregate(own, [], cfg, expected_received=1), own / 2
    )  # the shared empty-inbox rule


def test_registered_rule_runs_a_learner_round(toy_rule):
    """A learner configured with the new rule aggregates its inbox with it at the round's end."""
    cfg = GossipConfig(aggregation=toy_rule.name, codec=CodecSpec("none"))
    peer = GossipLearner(np.zeros(4, np.float32), cfg)
    peer.make_update(np.full(4, -1.0, np.float32))  # own delta: ones, norm 2
    peer.receive("other", 0, {"codec": "none", "numel": 4, "values": np.full(4, 3.0, "<f4").tobytes()})
    params, report = peer.finish_round(expected_received=1)
    assert report.received == 1
    # the received (norm 6) is scaled to norm 4: twos; mean with ones = 1.5; params = 0 - 1.5
    assert np.allclose(params, -1.5)


def test_unknown_rule_is_a_config_error_listing_the_registry(toy_rule):
    """An unknown name is refused with every registered name, the new one included."""
    with pytest.raises(
        ConfigError, match=rf"^gossip\.aggregation: must be one of {', '.join(BUILTIN)}, {toy_rule.name}"
    ):
        GossipConfig(aggregation="mode")


def test_register_aggregation_refuses_taken_names_and_non_rules(toy_rule):
    """A name is registered once unless replace=True; only AggregationRule subclasses are accepted."""
    with pytest.raises(ValueError, match="already registered"):
        register_aggregation(NormClippedMean)
    assert register_aggregation(NormClippedMean, replace=True) is NormClippedMean
    with pytest.raises(TypeError):
        register_aggregation(NormClippedMean())  # an instance, not the class
    with pytest.raises(TypeError):
        register_aggregation(dict)


def _dense_clipped_mean(own, received, expected_received, clip_multiplier=2.0):
    """The clipped mean as written before the sparse path (the reference, on every coordinate)."""
    from p2pfm.core.aggregation import denominator, norm

    radius = clip_multiplier * norm(own)
    total = own.astype(np.float64, copy=True)
    for update in received:
        difference = update - own
        distance = norm(difference)
        if radius == 0.0:
            total += update
        elif distance > radius:
            total += own + difference * (radius / distance)
        else:
            total += update
    return (total / denominator(len(received), expected_received)).astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_sparse_clipped_mean_is_bit_identical_to_the_dense_arithmetic(seed):
    """Top-k updates take the sparse path; it must give the dense result bit for bit (clipping or not)."""
    from p2pfm.core.aggregation import ClippedMean

    rng = np.random.default_rng(seed)
    n, k = 20_000, 200

    def sparse(scale):
        vector = np.zeros(n, np.float32)
        vector[rng.choice(n, k, replace=False)] = rng.standard_normal(k).astype(np.float32) * scale
        return vector

    own = sparse(1.0) if seed % 4 else np.zeros(n, np.float32)  # a zero own update: no yardstick
    received = [sparse(rng.choice([0.5, 1.0, 30.0])) for _ in range(1 + seed % 5)]
    expected = None if seed % 2 else 2
    got = ClippedMean().merge(own, received, expected)
    want = _dense_clipped_mean(own, received, expected)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    dense_own = rng.standard_normal(n).astype(np.float32)  # dense updates keep the dense path
    np.testing.assert_array_equal(
        ClippedMean().merge(dense_own, received, expected), _dense_clipped_mean(dense_own, received, expected)
    )


@pytest.mark.parametrize("outer_momentum", [0.0, 0.9])
def test_outer_step_in_place_matches_the_formula_bit_for_bit(outer_momentum):
    """finish_round's in-place Nesterov step gives exactly params - lr * (c + mu * (mu * m + c))."""
    from p2pfm.core.gossip import GossipConfig, GossipLearner, aggregate

    rng = np.random.default_rng(3)
    params = rng.standard_normal(5000).astype(np.float32)
    config = GossipConfig(outer_momentum=outer_momentum, outer_lr=0.7)
    learner = GossipLearner(params, config)
    for _ in range(3):  # momentum builds up over rounds
        old_params, old_momentum = learner.params.copy(), learner.momentum.copy()
        local = learner.params - 0.01 * rng.standard_normal(5000).astype(np.float32)
        learner.make_update(local)
        own = learner._own.dense().copy()
        new, report = learner.finish_round(1)
        combined = aggregate(own, [], config, 1)
        if outer_momentum:
            momentum = outer_momentum * old_momentum + combined
            step = combined + outer_momentum * momentum
        else:
            momentum, step = old_momentum, combined
        want = (old_params - config.outer_lr * step).astype(np.float32)
        np.testing.assert_array_equal(new.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(learner.momentum.view(np.uint32), momentum.view(np.uint32))
        assert report.applied_norm == pytest.approx(float(np.linalg.norm(step)) * config.outer_lr, rel=1e-6)
