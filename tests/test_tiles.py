"""The cache-tiled round passes give, bit for bit, the untiled arithmetic (issue 13).

``p2pfm.core.tiles`` runs a round's elementwise passes a tile at a time; the learner's delta,
error feedback, top-k candidate search and outer step go through it. Here each tiled function is
compared with the plain numpy it replaces, at sizes around the tile edges, with tiny tiles so
that many edges are crossed, on the sampled top-k path (over 4 x 65536 entries) and its fall
back, and with NaN/Inf anywhere (the same refusal, the residual untouched).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import p2pfm.core.feedback as feedback_module
from p2pfm.core import tiles
from p2pfm.core.aggregation import union_support
from p2pfm.core.codecs import (
    CodecSpec,
    topk_count,
    topk_indices,
    topk_sample_positions,
    topk_samples,
    topk_threshold,
)
from p2pfm.core.feedback import ErrorFeedback
from p2pfm.core.gossip import GossipConfig, GossipLearner, aggregate

SAMPLED = 300_007  # over 4 x 65536: top-k takes its threshold from a sample


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)  # -0.0 != +0.0 here


def vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(n).astype(np.float32)
    local = params - (rng.standard_normal(n) * 1e-2).astype(np.float32)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    return params, local, residual


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 64, 1000, 4099])
@pytest.mark.parametrize("tile", [1, 3, 8, 1 << 16])
def test_corrected_into_is_the_untiled_sum_and_its_candidates(n, tile):
    params, local, residual = vectors(n, n + tile)
    want = (params - local) + residual
    threshold = np.float32(np.quantile(np.abs(want), 0.9))
    out = np.empty(n, np.float32)
    found = tiles.corrected_into(params, local, residual, out, threshold=threshold, tile=tile)
    np.testing.assert_array_equal(bits(out), bits(want))
    assert found is not None and found.dtype == np.int64
    np.testing.assert_array_equal(found, np.flatnonzero(np.abs(want) >= threshold))
    again = np.empty(n, np.float32)
    assert tiles.corrected_into(params, local, residual, again, tile=tile) is None
    np.testing.assert_array_equal(bits(again), bits(want))


def test_corrected_into_consumes_local_when_it_is_out():
    params, local, residual = vectors(1000, 5)
    want = (params - local) + residual
    tiles.corrected_into(params, local, residual, local, tile=7)
    np.testing.assert_array_equal(bits(local), bits(want))


@pytest.mark.parametrize("where", [0, 6, 7, 8, 13, 999])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_corrected_into_refuses_nan_and_inf_in_any_tile(where, bad):
    params, local, residual = vectors(1000, 6)
    residual[where] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiles.corrected_into(
            params, local, residual, np.empty(1000, np.float32), threshold=np.float32(1.0), tile=7
        )


def test_corrected_into_refuses_a_sum_that_overflows():
    """Finite operands whose float32 difference or sum is Inf are refused like an Inf operand."""
    params, local, residual = vectors(100, 7)
    params[10], local[10] = np.float32(3e38), np.float32(-3e38)  # difference overflows
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="NaN or Inf"):
        tiles.corrected_into(params, local, residual, np.empty(100, np.float32), tile=8)
    params, local, residual = vectors(100, 7)
    params[50], local[50], residual[50] = np.float32(3e38), np.float32(0.0), np.float32(3e38)  # sum does
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="NaN or Inf"):
        tiles.corrected_into(params, local, residual, np.empty(100, np.float32), tile=8)


@pytest.mark.parametrize("tile", [0, -1, True, 2.0])
def test_a_tile_must_be_a_positive_integer(tile):
    params, local, residual = vectors(10, 8)
    with pytest.raises(ValueError, match="tile"):
        tiles.corrected_into(params, local, residual, np.empty(10, np.float32), tile=tile)
    with pytest.raises(ValueError, match="tile"):
        tiles.outer_step_into(params, local, 1.0, np.empty(10, np.float32), tile=tile)


@pytest.mark.parametrize("n,tile", [(1, 1), (9, 4), (1000, 7), (1000, 1 << 16)])
@pytest.mark.parametrize("in_place", [False, True])
def test_nesterov_and_outer_step_are_the_untiled_operations(n, tile, in_place):
    rng = np.random.default_rng(n + tile)
    params, momentum, combined = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    mu, lr = 0.9, 0.7
    want_momentum = np.multiply(momentum, mu)
    want_momentum += combined
    want_step = np.multiply(want_momentum, mu)
    want_step += combined
    want_params = params - np.multiply(want_step, lr)
    new_momentum = np.empty(n, np.float32)
    step = combined if in_place else np.empty(n, np.float32)
    tiles.nesterov_into(momentum, combined, mu, new_momentum, step, tile=tile)
    np.testing.assert_array_equal(bits(new_momentum), bits(want_momentum))
    np.testing.assert_array_equal(bits(step), bits(want_step))
    out = step if in_place else np.empty(n, np.float32)
    assert tiles.outer_step_into(params, step, lr, out, tile=tile)
    np.testing.assert_array_equal(bits(out), bits(want_params))


@pytest.mark.parametrize("where", [0, 6, 7, 999])
def test_outer_step_reports_an_overflow_in_any_tile(where):
    params = np.ones(1000, np.float32)
    step = np.zeros(1000, np.float32)
    params[where], step[where] = np.float32(3e38), np.float32(-3e38)  # 3e38 + 3e38 overflows
    with np.errstate(over="ignore"):
        assert not tiles.outer_step_into(params, step, 1.0, np.empty(1000, np.float32), tile=7)
    step[where] = np.float32(3e38)
    assert tiles.outer_step_into(params, step, 1.0, np.empty(1000, np.float32), tile=7)


SPECS = [
    CodecSpec(),
    CodecSpec("topk", topk_fraction=0.03, value_bits=16),
    CodecSpec("topk", topk_fraction=1.0),  # k == n
    CodecSpec("int8", block_size=64),
    CodecSpec("fp16"),
    CodecSpec("none"),
]


@pytest.mark.parametrize("n", [1, 2, 5, 4099, SAMPLED])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.topk_fraction}-{s.value_bits}")
def test_compress_difference_into_is_compress_of_the_difference(n, spec):
    """Over rounds (the residual grows), with local given apart and as the buffer itself."""
    tile = 4099 if n == SAMPLED else 3  # many tile edges, the sample path included
    plain, tiled = ErrorFeedback(n), ErrorFeedback(n)
    out = np.empty(n, np.float32)
    for round_ in range(3):
        params, local, _ = vectors(n, round_)
        wire, sent = plain.compress(params - local, spec)
        if round_ % 2:
            np.copyto(out, local)
            local = out  # the daemon's way: local parameters written into the round buffer
        got, sparse, spare = tiled.compress_difference_into(params, local, out, spec, tile=tile)
        assert got == wire
        np.testing.assert_array_equal(bits(sparse.dense()), bits(sent))
        np.testing.assert_array_equal(bits(tiled.residual), bits(plain.residual))
        assert tiled.residual is out and spare is not out
        out = spare


def test_compress_difference_into_refuses_nan_and_leaves_the_residual():
    spec = CodecSpec()
    feedback = ErrorFeedback(SAMPLED)
    params, local, _ = vectors(SAMPLED, 9)
    feedback.compress_difference_into(params, local, np.empty(SAMPLED, np.float32), spec)
    kept = feedback.residual.copy()
    for where in (0, SAMPLED // 2, SAMPLED - 1):
        bad = local.copy()
        bad[where] = np.nan
        with pytest.raises(ValueError, match="NaN or Inf"):
            feedback.compress_difference_into(params, bad, np.empty(SAMPLED, np.float32), spec, tile=1000)
        np.testing.assert_array_equal(bits(feedback.residual), bits(kept))
    with pytest.raises(ValueError, match="not the residual"):
        feedback.compress_difference_into(params, local, feedback.residual, spec)
    with pytest.raises(ValueError, match="float32-compatible"):
        feedback.compress_difference_into(
            params, local.astype(np.float64), np.empty(SAMPLED, np.float32), spec
        )
    with pytest.raises(TypeError, match="CodecSpec"):
        feedback.compress_difference_into(params, local, np.empty(SAMPLED, np.float32), "topk")


class SelectSpy:
    """Records whether the exact selection ran on candidates (the sample's) or on the whole vector."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[bool] = []
        real = feedback_module.topk_select

        def spy(values: np.ndarray, k: int, cand: np.ndarray | None) -> np.ndarray:
            self.calls.append(cand is not None)
            return real(values, k, cand)

        monkeypatch.setattr(feedback_module, "topk_select", spy)


def test_an_unlucky_sample_falls_back_to_the_whole_vector_with_the_same_answer(monkeypatch):
    """Large entries at exactly the sample positions push the threshold above all but ~65536 entries,
    fewer than k: topk_indices then searches the whole vector, and so must the tiled path."""
    n = SAMPLED
    spec = CodecSpec("topk", topk_fraction=0.3)
    k = topk_count(n, spec.topk_fraction)
    params = np.full(n, 1e-3, np.float32)
    params[topk_sample_positions(n)] = 5.0
    local = np.zeros(n, np.float32)
    assert topk_samples(n)
    corrected = params - local
    sample = np.abs(corrected)[topk_sample_positions(n)]
    assert np.count_nonzero(np.abs(corrected) >= topk_threshold(sample, n, k)) < k  # unlucky indeed
    spy = SelectSpy(monkeypatch)
    wire, sent = ErrorFeedback(n).compress(corrected, spec)
    tiled = ErrorFeedback(n)
    got, sparse, _ = tiled.compress_difference_into(params, local, np.empty(n, np.float32), spec, tile=1000)
    assert spy.calls == [False]
    assert got == wire
    np.testing.assert_array_equal(sparse.indices, topk_indices(corrected, k))
    np.testing.assert_array_equal(bits(sparse.dense()), bits(sent))


def test_a_lucky_sample_searches_only_the_candidates(monkeypatch):
    spy = SelectSpy(monkeypatch)
    params, local, _ = vectors(SAMPLED, 10)
    ErrorFeedback(SAMPLED).compress_difference_into(params, local, np.empty(SAMPLED, np.float32), CodecSpec())
    assert spy.calls == [True]


def test_an_overlapping_local_falls_back_to_the_untiled_subtraction():
    """A local that overlaps the buffer other than as the buffer itself (here: reversed) is not tiled."""
    n = 5000
    spec = CodecSpec()
    params, local, _ = vectors(n, 11)
    out = local.copy()
    reversed_view = out[::-1]
    wire, sent = ErrorFeedback(n).compress(params - out[::-1], spec)
    tiled = ErrorFeedback(n)
    got, sparse, _ = tiled.compress_difference_into(params, reversed_view, out, spec, tile=7)
    assert got == wire
    np.testing.assert_array_equal(bits(sparse.dense()), bits(sent))


def test_half_precision_local_parameters_subtract_as_numpy_does():
    n = 4099
    params, local, _ = vectors(n, 12)
    half = local.astype(np.float16)
    wire, sent = ErrorFeedback(n).compress(params - half, CodecSpec())
    got, sparse, _ = ErrorFeedback(n).compress_difference_into(
        params, half, np.empty(n, np.float32), CodecSpec(), tile=5
    )
    assert got == wire
    np.testing.assert_array_equal(bits(sparse.dense()), bits(sent))


def test_compress_difference_into_makes_no_model_sized_temporary():
    """numpy reports its allocations to tracemalloc: the tiled pass holds tiles, candidates and the
    ~1 % sent, never another vector of the model's size (untiled: |x| and a comparison mask)."""
    n = 2_000_003
    params, local, _ = vectors(n, 13)
    feedback = ErrorFeedback(n)
    out = np.empty(n, np.float32)
    feedback.compress_difference_into(params, local, out, CodecSpec())  # warm: numpy's caches
    out = np.empty(n, np.float32)
    tracemalloc.start()
    try:
        feedback.compress_difference_into(params, local, out, CodecSpec())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n  # bytes: a quarter of one float32 vector (the untiled pass held two)


@pytest.mark.parametrize("sizes", [[], [0], [5], [3, 3], [1000, 1000, 1000], [100] * 17])
def test_union_support_merges_or_marks_with_the_same_answer(sizes):
    rng = np.random.default_rng(len(sizes))
    positions = [np.sort(rng.choice(4000, size, replace=False)).astype(np.int64) for size in sizes]
    want = np.union1d(np.concatenate(positions), []).astype(np.int64) if positions else np.zeros(0, np.int64)
    for numel in (4000, 4_000_000):  # small buffer: marked in it; large: merged
        buffer = np.zeros(numel, np.float32)
        got = union_support(positions, buffer)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64 and not buffer.any()


@pytest.mark.parametrize(
    "config",
    [GossipConfig(), GossipConfig(outer_momentum=0.9, outer_lr=0.7), GossipConfig(aggregation="mean")],
    ids=["clipped", "momentum", "mean"],
)
def test_learner_rounds_on_the_sampled_path_match_plain_numpy(config):
    """test_round_buffers' dense reference at a size where top-k samples its threshold."""
    n, peers = SAMPLED, 2
    rng = np.random.default_rng(14)
    init = rng.standard_normal(n).astype(np.float32)
    learners = [GossipLearner(init, config) for _ in range(peers)]
    ref_params = [init.copy() for _ in range(peers)]
    ref_momentum = [np.zeros(n, np.float32) for _ in range(peers)]
    ref_feedback = [ErrorFeedback(n) for _ in range(peers)]
    for _ in range(3):
        wires, sents = [], []
        for i in range(peers):
            local = ref_params[i] - (rng.standard_normal(n) * 1e-2).astype(np.float32)
            wire, sent = ref_feedback[i].compress(ref_params[i] - local, config.codec)
            wires.append(wire)
            sents.append(sent)
            buffer = learners[i].local_buffer()
            np.copyto(buffer, local)
            assert learners[i].make_update(buffer) == wire
        for i in range(peers):
            j = 1 - i
            learners[i].receive(f"peer-{j}", learners[i].round, wires[j])
            learners[i].finish_round(1)
            combined = aggregate(sents[i], [sents[j]], config, 1)
            mu = config.outer_momentum
            step = combined
            if mu > 0.0:
                ref_momentum[i] = mu * ref_momentum[i] + combined
                step = combined + mu * ref_momentum[i]
            ref_params[i] = ref_params[i] - np.float32(config.outer_lr) * step
            np.testing.assert_array_equal(bits(learners[i].params), bits(ref_params[i]))
            np.testing.assert_array_equal(bits(learners[i].momentum), bits(ref_momentum[i]))
            np.testing.assert_array_equal(bits(learners[i].feedback.residual), bits(ref_feedback[i].residual))


@pytest.mark.parametrize("n,tile", [(1, 1), (1000, 7), (1000, 1 << 16)])
def test_nesterov_updates_momentum_in_place_with_the_same_bits(n, tile):
    rng = np.random.default_rng(n)
    params, momentum, combined = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    want_momentum = np.multiply(momentum, 0.9)
    want_momentum += combined
    want_step = np.multiply(want_momentum, 0.9)
    want_step += combined
    assert tiles.nesterov_step_is_finite(params, momentum, combined, 0.9, 0.7, tile=tile)
    tiles.nesterov_into(momentum, combined, 0.9, momentum, combined, tile=tile)
    np.testing.assert_array_equal(bits(momentum), bits(want_momentum))
    np.testing.assert_array_equal(bits(combined), bits(want_step))


@pytest.mark.parametrize("where", [0, 6, 7, 999])
def test_nesterov_step_is_finite_finds_an_overflow_in_any_tile_and_writes_nothing(where):
    rng = np.random.default_rng(where)
    params, momentum, combined = (rng.standard_normal(1000).astype(np.float32) for _ in range(3))
    combined[where] = np.float32(-3e38)  # step = 1.9 x that overflows
    kept = [array.copy() for array in (params, momentum, combined)]
    with np.errstate(over="ignore", invalid="ignore"):
        assert not tiles.nesterov_step_is_finite(params, momentum, combined, 0.9, 1.0, tile=7)
    for array, copy in zip((params, momentum, combined), kept, strict=True):
        np.testing.assert_array_equal(bits(array), bits(copy))


def test_a_round_that_would_overflow_is_dropped_and_leaves_the_momentum_alone():
    """With outer momentum the new momentum is written in place, so only after the round is known kept."""
    n = 1000
    config = GossipConfig(aggregation="mean", outer_momentum=0.9, outer_lr=0.7)
    rng = np.random.default_rng(15)
    init = rng.standard_normal(n).astype(np.float32)
    learner = GossipLearner(init, config)
    learner.momentum[:] = rng.standard_normal(n).astype(np.float32)
    params, momentum = learner.params.copy(), learner.momentum.copy()
    learner.make_update(init - np.float32(1e-3))
    for sender in ("a", "c"):  # two updates of -3e38: their sum overflows float32
        peer = GossipLearner(init, config)
        learner.receive(sender, 0, peer.make_update(init + np.float32(3e38)))
    with np.errstate(over="ignore", invalid="ignore"):
        anchor, report = learner.finish_round(2)
    assert report.rolled_back and report.applied_norm == 0.0
    np.testing.assert_array_equal(bits(anchor), bits(params))
    np.testing.assert_array_equal(bits(learner.momentum), bits(momentum))
