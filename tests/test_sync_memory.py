"""Syncs, catch-ups and joins without model-sized temporaries, with the old arithmetic.

At 124M parameters a joiner's confirmation (``state_disagreement``), its adoption
(``GossipLearner.adopt``), a consensus pull's decode (``decode_sync``) and a sync's blend
(``mix_with``) made 4-6 fresh 0.5-1 GB arrays each; the joiner's peak in ``p2pfm bench scale``
was ~2x the plain training loop. Each is now computed in place or a block at a time; these
tests hold each to the whole-vector formula it replaced (bit for bit where the result is
state, to the last bits where it is a ratio compared with a tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest

import p2pfm.core.protocol as protocol
from p2pfm.core.codecs import CodecSpec
from p2pfm.core.errors import NonFinite, ShapeMismatch
from p2pfm.core.gossip import GossipConfig, GossipLearner, decode_sync, encode_sync


def _old_disagreement(candidate: np.ndarray, witness: np.ndarray, initial: np.ndarray) -> float:
    def norm(x: np.ndarray) -> float:
        return float(np.sqrt(x.dot(x)))

    moved = norm((candidate - initial).astype(np.float64)) + norm((witness - initial).astype(np.float64))
    apart = norm((candidate - witness).astype(np.float64))
    return apart / moved if moved > 0 else (0.0 if apart == 0 else float("inf"))


@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
@pytest.mark.parametrize("block", [3, 1024, 1 << 20])
def test_state_disagreement_a_block_at_a_time_is_the_whole_vector_formula(monkeypatch, n, block):
    monkeypatch.setattr(protocol, "DISAGREEMENT_BLOCK", block)
    rng = np.random.default_rng(n)
    initial = rng.standard_normal(n).astype(np.float32)
    witness = (initial + rng.standard_normal(n).astype(np.float32) * 0.1).astype(np.float32)
    for candidate in (
        witness.copy(),  # equal: 0
        (witness + rng.standard_normal(n).astype(np.float32) * 0.01).astype(np.float32),
        np.zeros(n, np.float32),  # an insider's zero model
        (-witness).astype(np.float32),
    ):
        got = protocol.state_disagreement(candidate, witness, initial)
        assert got == pytest.approx(_old_disagreement(candidate, witness, initial), rel=1e-12, abs=0.0)
    assert protocol.state_disagreement(initial, initial, initial) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        protocol.state_disagreement(initial, initial[:-1] if n > 1 else np.zeros(2, np.float32), initial)


def test_adopt_is_an_exact_copy_with_fresh_zero_momentum():
    config = GossipConfig(outer_momentum=0.9)
    learner = GossipLearner(np.ones(6, np.float32), config)
    learner.momentum[:] = 5.0
    theirs = np.array([-0.0, 0.0, 1.5, -2.25, 3e-38, -1e30], np.float32)
    learner.adopt(theirs, 12)
    assert learner.round == 12
    assert np.array_equal(learner.params.view(np.uint32), theirs.view(np.uint32))  # -0.0 stays -0.0
    assert not np.shares_memory(learner.params, theirs) and learner.params.flags.writeable
    theirs[2] = 9.0
    assert learner.params[2] == 1.5
    assert np.array_equal(learner.momentum, np.zeros(6, np.float32))
    assert not learner.feedback.residual.any()
    with pytest.raises(NonFinite):
        learner.adopt(np.array([0, 0, 0, 0, 0, np.nan], np.float32), 13)
    with pytest.raises(ShapeMismatch):
        learner.adopt(np.zeros(5, np.float32), 13)
    assert learner.round == 12


@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0])
def test_mix_with_blends_bit_for_bit_as_the_whole_vector_formula(alpha):
    rng = np.random.default_rng(3)
    ours = rng.standard_normal(5000).astype(np.float32)
    theirs = rng.standard_normal(5000).astype(np.float32)
    learner = GossipLearner(ours.copy(), GossipConfig(sync_weight=alpha))
    anchor = learner.params
    learner.mix_with(theirs, 4)
    expected = ((1.0 - alpha) * ours + alpha * theirs).astype(np.float32)
    assert np.array_equal(learner.params.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(anchor, ours)  # the old anchor is never written (others may still read it)


@pytest.mark.parametrize("spec", [CodecSpec("int8"), CodecSpec("fp16"), CodecSpec("none")])
def test_decode_sync_is_initial_plus_the_difference_bit_for_bit(spec):
    rng = np.random.default_rng(5)
    initial = rng.standard_normal(3000).astype(np.float32)
    params = (initial + rng.standard_normal(3000).astype(np.float32) * 0.05).astype(np.float32)
    config = GossipConfig(sync_codec=spec)
    wire = encode_sync(params, initial, config)
    from p2pfm.core.codecs import decode

    expected = (initial + decode(wire, expected_numel=initial.size)).astype(np.float32)
    got = decode_sync(wire, initial)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert not np.shares_memory(got, initial)


def test_mix_with_blends_into_the_round_buffer_and_recycles_the_old_anchor():
    """A sync's blend is written into the learner's round buffer, which becomes the anchor; the old
    anchor (nobody else holds it) is the next buffer: no model-sized array allocated, none kept."""
    import tracemalloc

    rng = np.random.default_rng(4)
    numel = 2_000_000  # 8 MB a vector
    ours = rng.standard_normal(numel).astype(np.float32)
    theirs = rng.standard_normal(numel).astype(np.float32)
    expected = ((1.0 - 0.5) * ours + 0.5 * theirs).astype(np.float32)
    learner = GossipLearner(ours, GossipConfig(sync_weight=0.5))
    del ours
    buffer = learner.local_buffer()
    allocated = learner.buffers_allocated
    old_anchor_address = learner.params.__array_interface__["data"][0]
    tracemalloc.start()
    try:
        learner.mix_with(theirs, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < numel * 4 // 4, peak  # tile temporaries only (was two 8 MB arrays)
    assert learner.params is buffer and learner.buffers_allocated == allocated
    assert np.array_equal(learner.params.view(np.uint32), expected.view(np.uint32))
    assert learner.local_buffer().__array_interface__["data"][0] == old_anchor_address  # recycled
    assert learner.buffers_allocated == allocated


def test_blend_into_refuses_an_output_that_overlaps_an_operand():
    from p2pfm.core import tiles

    a = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        tiles.blend_into(a, np.ones(10, np.float32), 0.5, a)


def test_a_round_whose_local_steps_diverged_sends_nothing_and_keeps_its_residual(tmp_path):
    """The daemon's round has no separate finiteness pass over the local parameters: the encoder's
    own pass refuses a NaN (NonFiniteVector), the round is counted as diverged, nothing is sent,
    the residual is untouched and the anchor stays finite."""
    import asyncio
    import time

    import torch

    from p2pfm.daemon.handlers import StreamClient
    from p2pfm.daemon.rounds import RoundDriver
    from p2pfm.daemon.trainer import StepStats
    from tests.test_state_transfer import peer_runtime

    rt = peer_runtime(tmp_path, "peer", seed=0)
    learner = rt.protocol.learner
    learner.feedback.residual[:] = 0.25
    residual = learner.feedback.residual.copy()
    anchor = learner.params.copy()
    with torch.no_grad():
        next(rt.trainer.model.parameters()).view(-1)[7] = float("nan")  # the local steps diverged
    driver = RoundDriver(rt, StreamClient(rt))
    asyncio.run(
        driver.gossip_round(
            StepStats(steps=1, samples=1, mean_loss=1.0, compute_seconds=0.1), time.perf_counter()
        )
    )
    assert rt.counters["diverged_rounds"] == 1 and rt.counters["update_bytes_sent"] == 0
    assert np.array_equal(learner.feedback.residual, residual)
    assert np.array_equal(learner.params, anchor) and np.isfinite(learner.params).all()
    assert np.isfinite(rt.trainer.flat()).all()  # the model is back on the (finite) anchor
