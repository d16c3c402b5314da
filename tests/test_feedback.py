"""Error feedback: what the codec drops is kept in the residual and sent later."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfm.core.codecs import CodecSpec, decode
from p2pfm.core.feedback import ErrorFeedback

LOSSY = [
    CodecSpec("fp16"),
    CodecSpec("int8", block_size=32),
    CodecSpec("topk", topk_fraction=0.01),
    CodecSpec("topk", topk_fraction=0.05, value_bits=16),
]


def run_rounds(spec: CodecSpec, rounds: int, numel: int, seed: int):
    """Feed `rounds` random updates; return (sum of inputs, sum of decoded, feedback, residual norms)."""
    rng = np.random.default_rng(seed)
    feedback = ErrorFeedback(numel)
    total_in = np.zeros(numel, np.float64)
    total_out = np.zeros(numel, np.float64)
    norms = []
    for _ in range(rounds):
        update = rng.standard_normal(numel).astype(np.float32)
        wire, sent = feedback.compress(update, spec)
        assert np.array_equal(sent, decode(wire, expected_numel=numel))  # what receivers get
        total_in += update
        total_out += sent
        norms.append(float(np.linalg.norm(feedback.residual)))
    return total_in, total_out, feedback, norms


@pytest.mark.parametrize("spec", LOSSY, ids=lambda s: f"{s.name}-{s.value_bits}")
def test_sum_of_decoded_tracks_sum_of_inputs_up_to_the_residual(spec):
    """After T rounds, sum(inputs) - sum(decoded) equals the residual (float32 rounding aside)."""
    total_in, total_out, feedback, _ = run_rounds(spec, rounds=50, numel=2000, seed=1)
    gap = total_in - total_out
    residual = feedback.residual.astype(np.float64)
    assert np.linalg.norm(gap - residual) <= 1e-4 * (1 + np.linalg.norm(total_in))
    assert np.linalg.norm(gap) == pytest.approx(np.linalg.norm(residual), rel=1e-3, abs=1e-4)


def test_topk_residual_stays_bounded_over_many_rounds():
    """With top-1 %, the residual norm plateaus instead of growing with the number of rounds."""
    _, _, _, norms = run_rounds(CodecSpec("topk", topk_fraction=0.01), rounds=400, numel=1000, seed=2)
    # Without feedback the dropped mass would random-walk: norm ~ sqrt(T * numel) ~ 630 at T=400.
    # With it, each coordinate waits ~1/fraction rounds: norm ~ sqrt(numel / fraction) ~ 316 at most.
    assert max(norms[300:]) < 1.25 * max(norms[100:200])
    assert max(norms) < 400


def test_lossless_codec_leaves_zero_residual():
    """The none codec sends everything: the residual stays exactly zero."""
    _, _, feedback, norms = run_rounds(CodecSpec("none"), rounds=3, numel=100, seed=3)
    assert norms == [0.0, 0.0, 0.0]
    assert not feedback.residual.any()


def test_dropped_entry_is_sent_in_a_later_round():
    """An entry too small to make the top-k accumulates until it is sent."""
    feedback = ErrorFeedback(4)
    spec = CodecSpec("topk", topk_fraction=0.25, value_bits=16)  # k = 1
    update = np.array([1.0, 0.6, 0.0, 0.0], np.float32)
    _, first = feedback.compress(update, spec)
    assert first.tolist() == [1.0, 0.0, 0.0, 0.0]
    _, second = feedback.compress(update, spec)
    assert second.tolist() == pytest.approx([0.0, 1.2, 0.0, 0.0], rel=1e-3)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fraction=st.floats(0.01, 1.0), bits=st.sampled_from([8, 16]))
def test_residual_identity_holds_for_any_topk_setting(seed, fraction, bits):
    """residual == sum(inputs) - sum(decoded) for random top-k fractions and value formats."""
    spec = CodecSpec("topk", topk_fraction=fraction, value_bits=bits)
    total_in, total_out, feedback, _ = run_rounds(spec, rounds=5, numel=97, seed=seed)
    assert np.allclose(total_in - total_out, feedback.residual, atol=1e-4)


def test_failed_encode_leaves_residual_untouched():
    """A NaN update raises ValueError and does not corrupt the residual."""
    feedback = ErrorFeedback(10)
    feedback.compress(np.arange(10, dtype=np.float32), CodecSpec("topk", topk_fraction=0.1))
    before = feedback.residual.copy()
    bad = np.full(10, np.nan, np.float32)
    with pytest.raises(ValueError):
        feedback.compress(bad, CodecSpec())
    assert np.array_equal(feedback.residual, before)


def test_compress_rejects_wrong_shape_or_dtype():
    """Updates must be float32 of the configured length."""
    feedback = ErrorFeedback(10)
    with pytest.raises(ValueError):
        feedback.compress(np.zeros(9, np.float32), CodecSpec())
    with pytest.raises(ValueError):
        feedback.compress(np.zeros(10, np.float64), CodecSpec())


def test_state_dict_round_trips_and_reset_clears():
    """state_dict/load_state_dict restore the residual as a plain array; reset zeroes it."""
    _, _, feedback, _ = run_rounds(CodecSpec(), rounds=3, numel=500, seed=4)
    state = feedback.state_dict()
    assert set(state) == {"residual"} and isinstance(state["residual"], np.ndarray)
    restored = ErrorFeedback(500)
    restored.load_state_dict(state)
    assert np.array_equal(restored.residual, feedback.residual)
    state["residual"][0] += 1  # the checkpoint is a copy, not a view
    assert not np.array_equal(restored.residual, state["residual"])
    restored.reset()
    assert not restored.residual.any()


@pytest.mark.parametrize(
    "state",
    [
        {"residual": np.zeros(5, np.float32)},
        {"residual": np.zeros(10, np.float64)},
        {"residual": np.full(10, np.inf, np.float32)},
        {"residual": np.zeros(10, np.float32), "extra": np.zeros(1)},
        {},
    ],
)
def test_load_state_dict_refuses_mismatched_state(state):
    """Wrong length, dtype, non-finite values or keys raise ValueError."""
    with pytest.raises(ValueError):
        ErrorFeedback(10).load_state_dict(state)
