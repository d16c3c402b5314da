"""The learner's reused round buffers give, bit for bit, the arithmetic of fresh dense vectors.

``GossipLearner`` keeps its sent update and the received ones sparse, computes the delta, the error
feedback and the merge in one reused buffer and the residual array, and hands the anchor back without
a copy (issue 13: a 124M-parameter peer's round held ~8 fresh 0.5 GB arrays). Simulations replay
from a seed and golden results are checked, so none of this may change a bit: here several peers
run rounds through the learner and, side by side, through a reference written with plain dense
numpy (the arithmetic before the buffers), and every params, momentum and residual bit must agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from p2pfm.core.codecs import CodecSpec, decode, decode_sparse, encode, encode_sparse, encode_with_decoded
from p2pfm.core.feedback import ErrorFeedback
from p2pfm.core.gossip import GossipConfig, GossipLearner, aggregate


class ReferenceLearner:
    """The round arithmetic on fresh dense vectors: delta, corrected, decoded sent, dense merge."""

    def __init__(self, params: np.ndarray, config: GossipConfig) -> None:
        self.config = config
        self.params = params.copy()
        self.momentum = np.zeros_like(params)
        self.residual = np.zeros_like(params)
        self.own: np.ndarray | None = None

    def make_update(self, local: np.ndarray) -> dict:
        delta = self.params - local
        corrected = delta + self.residual
        wire, sent = encode_with_decoded(corrected, self.config.codec)
        self.residual = corrected - sent
        self.own = sent
        return wire

    def finish_round(self, expected: int | None, wires: list[dict]) -> np.ndarray:
        own = self.own if self.own is not None else np.zeros_like(self.params)
        received = [decode(w, expected_numel=self.params.size) for w in wires]
        with np.errstate(over="ignore", invalid="ignore"):
            combined = aggregate(own, received, self.config, expected)
            mu = self.config.outer_momentum
            momentum, step = self.momentum, combined
            if mu > 0.0:
                momentum = mu * self.momentum + combined
                step = combined + mu * momentum
            candidate = self.params - np.float32(self.config.outer_lr) * step
        if np.isfinite(candidate).all():
            self.params, self.momentum = candidate.astype(np.float32), momentum
        self.own = None
        return self.params


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)  # -0.0 != +0.0 here


CASES = {
    "topk-int8-clipped": GossipConfig(),
    "topk-fp16-momentum": GossipConfig(
        codec=CodecSpec("topk", topk_fraction=0.02, value_bits=16), outer_momentum=0.9, outer_lr=0.7
    ),
    "int8-dense-clipped": GossipConfig(codec=CodecSpec("int8", block_size=64)),
    "none-dense-mean": GossipConfig(codec=CodecSpec("none"), aggregation="mean"),
    "topk-trimmed": GossipConfig(aggregation="trimmed_mean"),
    "topk-dense-support": GossipConfig(codec=CodecSpec("topk", topk_fraction=0.2)),  # > 25 %: dense path
}


@pytest.mark.parametrize("name", list(CASES))
def test_rounds_through_the_buffers_match_the_dense_reference_bit_for_bit(name):
    config = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    n, peers = 30_011, 4  # not a multiple of the int8 block
    init = rng.standard_normal(n).astype(np.float32)
    learners = [GossipLearner(init, config) for _ in range(peers)]
    refs = [ReferenceLearner(init, config) for _ in range(peers)]
    held: list[np.ndarray] = []  # anchors a caller keeps must never change under it
    for rnd in range(6):
        wires: dict[int, dict] = {}
        for i in range(peers):
            if rnd == 2 and i == 0:
                continue  # diverged local steps: no update of ours this round
            scale = 30.0 if (rnd, i) == (3, 1) else 1.0  # one far update: clipped by the others
            noise = (rng.standard_normal(n) * 1e-2 * scale).astype(np.float32)
            local = refs[i].params - noise
            wires[i] = refs[i].make_update(local)
            if i % 2:  # the daemon's way: local parameters written into the learner's own buffer
                buffer = learners[i].local_buffer()
                np.copyto(buffer, local)
                got = learners[i].make_update(buffer)
            else:
                got = learners[i].make_update(local)
            assert got == wires[i]
        for i in range(peers):
            senders = [j for j in sorted(wires) if j != i and (rnd + i + j) % 3]  # some get nothing
            for j in senders:
                learners[i].receive(f"peer-{j}", learners[i].round, wires[j])
            expected = None if rnd % 2 else 2
            anchor, _ = learners[i].finish_round(expected)
            want = refs[i].finish_round(expected, [wires[j] for j in senders])
            assert not anchor.flags.writeable
            np.testing.assert_array_equal(bits(anchor), bits(want))
            np.testing.assert_array_equal(bits(learners[i].params), bits(refs[i].params))
            np.testing.assert_array_equal(bits(learners[i].momentum), bits(refs[i].momentum))
            np.testing.assert_array_equal(bits(learners[i].feedback.residual), bits(refs[i].residual))
            if i == 3 and rnd % 2 == 0:
                held.append((anchor, anchor.copy()))
    for anchor, copy in held:  # never recycled as a buffer while held
        np.testing.assert_array_equal(bits(anchor), bits(copy))


def test_anchor_no_one_holds_becomes_the_next_round_buffer():
    """The previous anchor is reused as the round buffer only when nothing else refers to it."""
    rng = np.random.default_rng(1)
    learner = GossipLearner(rng.standard_normal(5000).astype(np.float32), GossipConfig())
    learner.make_update(learner.params - 1e-3)
    before = learner.params
    anchor, _ = learner.finish_round(1)
    assert learner._buffer is None  # `before` is still ours to read: not recycled
    del anchor
    learner.make_update(learner.params - 1e-3)
    previous = id(learner.params)
    del before
    learner.finish_round(1)
    assert learner._buffer is not None and id(learner._buffer) == previous


def test_compress_into_matches_compress_and_leaves_the_residual_on_failure():
    rng = np.random.default_rng(2)
    spec = CodecSpec("topk", topk_fraction=0.05)
    plain, buffered = ErrorFeedback(4000), ErrorFeedback(4000)
    for _ in range(4):
        update = rng.standard_normal(4000).astype(np.float32)
        wire, sent = plain.compress(update, spec)
        wire2, sparse, spare = buffered.compress_into(update.copy(), spec)
        assert wire2 == wire
        np.testing.assert_array_equal(bits(sparse.dense()), bits(sent))
        np.testing.assert_array_equal(bits(buffered.residual), bits(plain.residual))
        assert spare is not buffered.residual
    kept = buffered.residual.copy()
    bad = rng.standard_normal(4000).astype(np.float32)
    bad[7] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        buffered.compress_into(bad, spec)
    np.testing.assert_array_equal(bits(buffered.residual), bits(kept))
    with pytest.raises(ValueError, match="not the residual"):
        buffered.compress_into(buffered.residual, spec)


@pytest.mark.parametrize(
    "spec", [CodecSpec(), CodecSpec("topk", value_bits=16, topk_fraction=0.3), CodecSpec("fp16")]
)
def test_sparse_forms_are_the_dense_vectors(spec):
    rng = np.random.default_rng(3)
    vector = rng.standard_normal(10_007).astype(np.float32)
    scratch = np.empty_like(vector)
    wire, sparse = encode_sparse(vector, spec, scratch=scratch)
    assert wire == encode(vector, spec)
    dense = decode(wire, expected_numel=vector.size)
    np.testing.assert_array_equal(bits(sparse.dense()), bits(dense))
    np.testing.assert_array_equal(bits(decode_sparse(wire, expected_numel=vector.size).dense()), bits(dense))
    np.testing.assert_array_equal(
        decode_sparse(wire, expected_numel=vector.size).nonzero(), np.flatnonzero(dense)
    )


@pytest.mark.parametrize(
    "spec", [CodecSpec(), CodecSpec("topk", topk_fraction=0.2, value_bits=16), CodecSpec("int8")]
)
def test_the_outlier_rule_decides_as_the_dense_norm_does(spec):
    """receive keeps a top-k update sparse; the outlier decision (and the norm it reports) is the
    dense float32 norm's, also within an ulp of the limit, where only the exact norm can tell."""
    from p2pfm.core.aggregation import norm
    from p2pfm.core.errors import Outlier

    rng = np.random.default_rng(4)
    n = 50_000
    wire = encode(rng.standard_normal(n).astype(np.float32), spec)
    exact = norm(decode(wire, expected_numel=n))
    config = GossipConfig(outlier_multiplier=50.0)
    for factor in (0.5, 1 - 1e-7, 1.0, 1 + 1e-7, 2.0):
        learner = GossipLearner(np.zeros(n, np.float32), config)
        learner._last_own_norm = exact * factor / 50.0
        limit = 50.0 * learner._last_own_norm
        if exact > limit:
            with pytest.raises(Outlier, match=f"norm {exact:.3g} "):
                learner.receive("peer", 0, wire)
        else:
            got = learner.receive("peer", 0, wire)
            np.testing.assert_array_equal(bits(got.dense()), bits(decode(wire, expected_numel=n)))


@pytest.mark.parametrize("n", [1, 100, 256, 257, 10_000, 70_001])
@pytest.mark.parametrize("spec", [CodecSpec("int8"), CodecSpec("int8", block_size=3), CodecSpec("fp16")])
def test_encode_difference_is_encode_of_the_difference_byte_for_byte(n, spec):
    """encode_sync's chunked int8 (no full-size temporaries) writes the map encode(a - b) writes."""
    from p2pfm.core.codecs import encode_difference

    rng = np.random.default_rng(n)
    a = rng.standard_normal(n).astype(np.float32)
    b = (a + rng.standard_normal(n).astype(np.float32) * 1e-2).astype(np.float32)
    b[: n // 3] = a[: n // 3]  # whole zero blocks too
    assert encode_difference(a, b, spec, chunk_elements=512) == encode(a - b, spec)
    assert encode_difference(a, b, spec) == encode(a - b, spec)
    blocks: list[tuple[int, int]] = []
    assert encode_difference(
        a, b, spec, chunk_elements=512, after_block=lambda *r: blocks.append(r)
    ) == encode(a - b, spec)
    # after_block covers [0, n) once, in order, in blocks no larger than the chunk (whole for fp16)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(end == start for (_, end), (start, _) in zip(blocks, blocks[1:], strict=False))
    if spec.name == "int8":
        assert max(end - start for start, end in blocks) <= max(512, spec.block_size)
    a[n // 2] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_difference(a, b, spec, chunk_elements=512)
