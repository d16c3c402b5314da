"""The peer protocol in memory: two PeerProtocol objects talking bytes, no hivemind, no sockets.

Like h11's ``ConnectionPair``: each test moves the exact bytes one peer produces into the other,
so the whole sequence (update, merge, plans, state transfer, parameter sync, refusals, bans) is
checked without a network, and with the same code the daemon and the simulator drive.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from p2pfm.core.codecs import CodecSpec
from p2pfm.core.errors import (
    BadManifest,
    BadSignature,
    BadState,
    BadUpdate,
    Banned,
    FutureRound,
    HashMismatch,
    NotDonor,
    Oversize,
    Refusal,
    RoundRegression,
    StaleRound,
    WrongKind,
)
from p2pfm.core.gossip import GossipConfig
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import (
    TRANSITIONS,
    CatchUp,
    Event,
    InvalidTransition,
    LocalWork,
    PeerProtocol,
    PeerSetup,
    Phase,
    Sync,
    catch_up_donors,
    corroborated_round,
    join_plan,
    round_plan,
    states_agree,
)
from p2pfm.core.tensorfile import pack_arrays
from p2pfm.core.transfer import Donor, pack_state

RUN = "pair-test"
NUMEL = 256
NOW = 1_700_000_000.0
WORK = LocalWork(samples=32, inner_steps=4, train_loss=2.5)


def gossip(**changes) -> GossipConfig:
    return dataclasses.replace(GossipConfig(codec=CodecSpec("none"), fanout=1, sync_every=0), **changes)


def make_peer(seed: int = 0, **changes) -> PeerProtocol:
    identity = Identity.from_private_bytes(bytes([seed + 1]) * 32)
    initial = np.random.default_rng(99).standard_normal(NUMEL).astype(np.float32)
    setup = PeerSetup(identity=identity, run_id=RUN, gossip=gossip(**changes), max_state_bytes=1 << 20)
    return PeerProtocol(setup, initial)


class Pair:
    """Two peers and the wire between them."""

    def __init__(self, **changes) -> None:
        self.a = make_peer(0, **changes)
        self.b = make_peer(1, **changes)

    def update(self, sender: PeerProtocol, shift: float, now: float = NOW) -> bytes:
        local = sender.params - shift
        return sender.seal("update", sender.make_update(local, WORK), now)


def test_two_peers_exchange_updates_and_agree():
    """Each trains, sends its update, merges the other's: both end at the same anchor."""
    pair = Pair()
    to_b, to_a = pair.update(pair.a, 0.1), pair.update(pair.b, 0.3)
    pair.b.receive_update("a", to_b, NOW)
    pair.a.receive_update("b", to_a, NOW)
    params_a, report_a = pair.a.finish_round(live_others=1)
    params_b, report_b = pair.b.finish_round(live_others=1)
    assert report_a.received == report_b.received == 1
    np.testing.assert_allclose(params_a, params_b, rtol=0, atol=1e-6)
    assert pair.a.round == pair.b.round == 1 and pair.a.accepted == pair.b.accepted == 1


def test_lifecycle_follows_the_transition_table_and_refuses_the_rest():
    """STARTING -> JOINING -> TRAINING -> DRAINING -> LEFT; an event out of place is a driver bug."""
    peer = make_peer()
    assert peer.phase is Phase.STARTING
    for event, phase in [
        (Event.ONLINE, Phase.JOINING),
        (Event.QUORUM_SETTLED, Phase.TRAINING),
        (Event.BEHIND, Phase.CATCHING_UP),
        (Event.CAUGHT_UP, Phase.TRAINING),
        (Event.ROUNDS_DONE, Phase.DRAINING),
        (Event.STOP, Phase.LEFT),
    ]:
        assert peer.fire(event) is phase
    with pytest.raises(InvalidTransition):
        peer.fire(Event.ONLINE)
    assert all(next_phase is not Phase.STARTING for next_phase in TRANSITIONS.values())
    assert {phase for (phase, _event) in TRANSITIONS} == set(Phase) - {Phase.LEFT}


def test_stale_and_future_rounds_are_ignored_without_penalty():
    """An honest laggard's stale update is ignored, counted, and never held against it."""
    pair = Pair(max_round_lag=2)
    pair.b.learner.round = 10
    for i in range(100):  # a second apart: within the sender's rate budget
        with pytest.raises(StaleRound):
            pair.b.receive_update("a", pair.update(pair.a, 0.1), NOW + i)
    pair.a.learner.round = 60
    with pytest.raises(FutureRound):
        pair.b.receive_update("a", pair.update(pair.a, 0.1), NOW)
    assert sum(pair.b.scores.rejections.values()) == 0 and not pair.b.scores.is_banned("a", NOW)
    assert pair.b.scores.ignored == {"stale_round": 100, "future_round": 1}
    assert pair.b.scores.rejected == {}


def test_rejections_lower_the_score_until_the_sender_is_banned():
    """Bad signatures count against the sender; at the limit it is banned and read no further."""
    pair = Pair()
    pair.b.scores.ban_after = 5
    good = pair.update(pair.a, 0.1)
    forged = good[:-1] + bytes([good[-1] ^ 1])  # last signature byte flipped
    for _ in range(5):
        with pytest.raises(BadSignature):
            pair.b.receive_update("a", forged, NOW)
    assert pair.b.scores.is_banned("a", NOW)  # bad signatures: the transport is all we can name
    with pytest.raises(Banned):
        pair.b.receive_update("a", good, NOW)  # even a good message: the sender is banned
    assert pair.b.scores.rejected == {"bad_signature": 5} and pair.b.scores.ignored == {"banned": 1}
    pair.b.receive_update("c", pair.update(pair.a, 0.1), NOW)  # the ban is per sender, not per swarm


def test_update_metadata_no_honest_peer_sends_is_rejected():
    """inner_steps = 0 claims an update without local work: BAD_UPDATE."""
    pair = Pair()
    payload = pair.a.make_update(pair.a.params - 0.1, WORK)
    payload["inner_steps"] = 0
    with pytest.raises(BadUpdate):
        pair.b.receive_update("a", pair.a.seal("update", payload, NOW), NOW)


@pytest.mark.parametrize("stream", ["state", "params"])
def test_state_streams_take_only_state_requests(stream):
    """An update (or any other kind) sent to the state or params stream is refused as WRONG_KIND."""
    pair = Pair()
    with pytest.raises(WrongKind):
        pair.b.open(pair.update(pair.a, 0.1), NOW, stream=stream)
    request = pair.a.state_request(b"n" * 16, NOW)
    assert pair.b.open(request, NOW, stream=stream).kind == "state_request"
    with pytest.raises(WrongKind):
        pair.b.open(pair.a.state_request(b"m" * 16, NOW), NOW, stream="gossip")


def serve(donor: PeerProtocol, chunk: int = 300) -> tuple[bytes, list[bytes], Donor]:
    snapshot = pack_state(donor.params, donor.round, {"opt.0.exp_avg": np.ones(3, np.float32)})
    manifest, chunks = donor.serve_state(snapshot, donor.round, chunk, NOW)
    from p2pfm.core.transfer import state_hash

    return (
        manifest,
        chunks,
        Donor(
            public_key=donor.identity.public_key_bytes,
            round=donor.round,
            model_hash=state_hash(snapshot, chunk),
        ),
    )


def test_state_transfer_end_to_end_then_adopt():
    """A joiner checks the manifest, every chunk and the whole state, then adopts it."""
    pair = Pair()
    pair.a.learner.round = 7
    pair.a.learner.params = pair.a.params + 1.0
    manifest_bytes, chunks, claim = serve(pair.a)
    manifest = pair.b.open_manifest(manifest_bytes, claim, NOW)
    for index, piece in enumerate(chunks):
        pair.b.check_chunk(manifest, index, piece)
    arrays, round_ = pair.b.open_state(manifest, chunks)
    pair.b.adopt(arrays["params"], round_)
    assert pair.b.round == 7 and np.array_equal(pair.b.params, pair.a.params)
    assert np.array_equal(arrays["opt.0.exp_avg"], np.ones(3, np.float32))


def test_state_transfer_refuses_strangers_lies_and_tampering():
    """Signed by someone else, a contradictory manifest, a tampered chunk, a state of another model."""
    pair = Pair()
    stranger = make_peer(7)
    manifest_bytes, chunks, claim = serve(pair.a)
    with pytest.raises(NotDonor):
        pair.b.open_manifest(serve(stranger)[0], claim, NOW)
    with pytest.raises(BadManifest):  # neither the announced hash nor a round as new as announced
        pair.b.open_manifest(manifest_bytes, dataclasses.replace(claim, model_hash=b"x" * 32, round=9), NOW)
    manifest = pair.b.open_manifest(manifest_bytes, claim, NOW)
    with pytest.raises(HashMismatch):
        pair.b.check_chunk(manifest, 0, b"\x00" + chunks[0][1:])
    with pytest.raises(HashMismatch):
        pair.b.open_state(manifest, chunks[:-1])
    small = make_peer(2)
    small.setup = dataclasses.replace(small.setup, max_state_bytes=100)
    with pytest.raises(Oversize):
        small.open_manifest(manifest_bytes, claim, NOW)
    other_model = pack_arrays({"params": np.zeros(NUMEL + 1, np.float32), "round": np.array([0], np.int64)})
    manifest_bytes, chunks = pair.a.serve_state(other_model, 0, 1000, NOW)
    from p2pfm.core.transfer import state_hash

    manifest = pair.b.open_manifest(
        manifest_bytes, dataclasses.replace(claim, model_hash=state_hash(other_model, 1000)), NOW
    )
    with pytest.raises(BadState):
        pair.b.open_state(manifest, chunks)


def test_params_sync_is_bound_to_the_donor_and_the_nonce():
    """The answer must be signed by the peer we asked and echo our nonce."""
    pair = Pair()
    pair.a.learner.params = pair.a.params + 0.5
    pair.a.learner.round = 3
    request = pair.b.state_request(b"q" * 16, NOW)
    answer = pair.a.serve_params(pair.a.open(request, NOW, stream="params"), NOW)
    params, round_ = pair.b.open_params(answer, pair.a.identity.public_key_bytes, b"q" * 16, NOW)
    assert round_ == 3 and np.abs(params - pair.a.params).max() < 0.01  # int8 of the change
    pair.b.learner.params = (pair.b.params + 0.3).astype(np.float32)  # b trained too, a little less
    assert pair.b.mix(params, round_)
    assert pair.b.round == 3
    answer = pair.a.serve_params(pair.a.open(pair.b.state_request(b"r" * 16, NOW), NOW, stream="params"), NOW)
    with pytest.raises(NotDonor):
        pair.b.open_params(answer, pair.a.identity.public_key_bytes, b"s" * 16, NOW)
    answer = pair.a.serve_params(pair.a.open(pair.b.state_request(b"t" * 16, NOW), NOW, stream="params"), NOW)
    with pytest.raises(NotDonor):
        pair.b.open_params(answer, make_peer(5).identity.public_key_bytes, b"t" * 16, NOW)


def test_join_and_round_plans_follow_the_catch_up_rule():
    """Joining: catch up if the swarm is ahead at all. Training: only beyond max_round_lag; else sync if due."""
    cfg = gossip(max_round_lag=8, sync_every=5)
    assert join_plan(3, None, cfg) is None
    assert join_plan(3, 3, cfg) is None
    assert join_plan(3, 4, cfg) == CatchUp(newest=4, behind=1)
    assert round_plan(10, 18, cfg, sync_due=False) is None
    assert round_plan(10, 19, cfg, sync_due=True) == CatchUp(newest=19, behind=9)
    assert round_plan(10, 12, cfg, sync_due=True) == Sync()
    assert catch_up_donors({"a": 19, "b": 18, "c": 11, "d": 10, "liar": 1_000_000}, 19, cfg) == [
        "a",
        "b",
        "c",
    ]
    peer = make_peer(sync_every=5)
    peer.learner.round = 10
    three = {"a": 10, "b": 10, "c": 9}
    assert peer.plan_round(three) == Sync() and peer.plan_round(three, sync_requested=False) == Sync()
    peer.learner.round = 11
    assert peer.plan_round(three) is None and peer.plan_round(three, sync_requested=True) == Sync()


def test_one_peers_word_moves_nobody():
    """A far-ahead round counts only once a second live peer reaches it (the takeover of issue 12)."""
    assert corroborated_round({}) is None
    assert corroborated_round({"a": 7}) == 7  # alone with one peer: nobody to corroborate with
    assert corroborated_round({"a": 7, "b": 7, "liar": 1_000_000}) == 7
    assert corroborated_round({"a": 7, "b": 9, "c": 12}) == 9
    peer = make_peer(max_round_lag=8)
    peer.learner.round = 7
    assert peer.plan_join({"a": 7, "b": 7, "liar": 10}) is None  # 3 ahead, to catch joiners: no
    assert peer.plan_round({"a": 8, "b": 8, "liar": 1_000_000}) is None
    assert peer.plan_round({"a": 30, "b": 29, "liar": 1_000_000}) == CatchUp(newest=30, behind=23)
    plan = CatchUp(newest=30, behind=23)
    assert peer.donors({"a": 30, "b": 29, "liar": 1_000_000}, plan, NOW) == ["a", "b"]
    # The liar alone in the donor window still faces every other live peer as a witness.
    view = {"liar": 33, "a": 40, "b": 20}
    assert peer.witnesses(view, "liar", CatchUp(newest=33, behind=26), NOW) == ["a", "b"]


def test_a_state_is_adopted_only_when_a_second_peer_agrees():
    """Zero, sign-flipped, random and 4x scaled states disagree with an honest witness; an honest
    state a round apart agrees."""
    rng = np.random.default_rng(1)
    initial = rng.standard_normal(5000).astype(np.float32)
    step = rng.standard_normal(5000).astype(np.float32) * 0.01
    honest_a = initial + 10 * step + rng.standard_normal(5000).astype(np.float32) * 0.002
    honest_b = initial + 11 * step
    assert states_agree(honest_a, honest_b, initial, 0.5)
    assert states_agree(initial + step, initial + 2 * step, initial, 0.5)  # early: rounds 1 and 2
    for poisoned in (np.zeros_like(initial), initial - 10 * step, initial + 4 * (honest_a - initial),
                     rng.standard_normal(5000).astype(np.float32)):  # fmt: skip
        assert not states_agree(poisoned, honest_b, initial, 0.5)
        assert not states_agree(honest_b, poisoned, initial, 0.5)  # a lying witness blocks, never admits


def test_chunk_frames_are_bounded_by_their_exact_length_not_by_chunk_size():
    """A manifest may claim any chunk_size; the reader's bound is what the chunk must weigh."""
    from p2pfm.core.transfer import Manifest

    lying = Manifest(
        round=0, model_hash=b"h" * 32, total_bytes=100, chunk_size=1 << 40, chunk_hashes=(b"c" * 32,)
    )
    assert lying.chunk_length(0) == 100
    honest = Manifest(
        round=0,
        model_hash=b"h" * 32,
        total_bytes=2500,
        chunk_size=1000,
        chunk_hashes=(b"a" * 32, b"b" * 32, b"c" * 32),
    )
    assert [honest.chunk_length(i) for i in range(3)] == [1000, 1000, 500]


def test_rounds_beyond_any_run_are_refused_everywhere_they_enter():
    """Round 2^63-1 (the observed swarm crash: max() then +1 overflowed int64) is BAD_ROUND in a
    manifest, a params answer and an announcement, and a sync never carries us far ahead."""
    from p2pfm.core.announce import announcement_limits, check_announcement
    from p2pfm.core.envelope import EnvelopeLimits
    from p2pfm.core.errors import BadRound
    from p2pfm.core.gossip import MAX_ROUND
    from p2pfm.core.tensorfile import digest
    from p2pfm.core.transfer import state_hash

    pair = Pair()
    liar = pair.a
    huge = 2**63 - 1
    snapshot = pack_state(liar.params, 0, {})
    payload = {
        "round": huge,
        "model_hash": state_hash(snapshot, len(snapshot)),
        "total_bytes": len(snapshot),
        "chunk_size": len(snapshot),
        "chunk_hashes": [digest(snapshot)],
    }
    manifest = liar.seal("state_manifest", payload, NOW, round=huge)
    claim = Donor(
        public_key=liar.identity.public_key_bytes, round=huge, model_hash=state_hash(snapshot, len(snapshot))
    )
    with pytest.raises(BadRound):
        pair.b.open_manifest(manifest, claim, NOW)
    request = pair.b.state_request(b"z" * 16, NOW)
    answer = liar.seal("params_sync", {**_params_payload(liar, request, NOW), "round": MAX_ROUND + 1}, NOW)
    with pytest.raises(BadRound):
        pair.b.open_params(answer, liar.identity.public_key_bytes, b"z" * 16, NOW)
    record = liar.seal(
        "announce",
        {
            "libp2p_id": "x",
            "maddrs": ["/ip4/127.0.0.1/tcp/1"],
            "round": huge,
            "model_hash": bytes(32),
            "device_class": "cpu",
            "power_w": 1.0,
            "state_bytes": 1,
        },
        NOW,
        round=0,
    )
    with pytest.raises(BadRound):
        check_announcement(
            liar.peer_id, record, run_id=RUN, now=NOW, limits=announcement_limits(EnvelopeLimits(), 15.0)
        )
    pair.b.mix(pair.b.params, MAX_ROUND)  # within the bound, but one peer's word moves us 4 x lag at most
    assert pair.b.round == 4 * pair.b.config.max_round_lag


def _params_payload(donor: PeerProtocol, request: bytes, now: float) -> dict:
    from p2pfm.core.gossip import encode_sync

    return {
        "tensor": encode_sync(donor.params, donor.initial_params, donor.config),
        "round": 0,
        "nonce": donor.open(request, now, stream="params").payload["nonce"],
    }


def test_a_step_that_would_make_the_model_non_finite_is_dropped():
    """Finite updates whose sum overflows float32: the round's step is not taken, the model stays finite."""
    pair = Pair(aggregation="mean")
    before = pair.b.params.copy()
    for sender, shift in (("a", -3e38), ("c", -3e38)):
        peer = make_peer(3 if sender == "c" else 0, aggregation="mean")
        pair.b.receive_update(
            sender, peer.seal("update", peer.make_update(peer.params - shift, WORK), NOW), NOW
        )
    params, report = pair.b.finish_round(live_others=2)
    assert report.rolled_back and report.received == 2
    assert np.isfinite(params).all() and np.array_equal(params, before) and pair.b.round == 1


def test_a_sender_whose_rounds_go_back_and_forth_is_rejected_and_soon_banned():
    """One key claiming rounds r..r+7 every round (issue 12, many rounds per key): the claims go
    back, an honest peer's never do (one round of slack for a late update)."""
    pair = Pair(max_round_lag=8)
    pair.b.learner.round = 10
    for r in (10, 11, 10):  # a late update of the previous round is fine
        pair.a.learner.round = r
        pair.b.receive_update("a", pair.update(pair.a, 0.1), NOW + r)
    pair.a.learner.round = 9
    with pytest.raises(RoundRegression):
        pair.b.receive_update("a", pair.update(pair.a, 0.1), NOW + 20)
    assert pair.b.scores.score(pair.a.peer_id, NOW + 20) == 5.0  # severity 5: deliberate


def test_a_flood_over_the_rate_budget_bans_itself():
    """Messages over the budget are ignored (rate_limited) and cost a tenth of a point each."""
    pair = Pair()
    banned_at = None
    for i in range(2000):
        try:
            pair.b.receive_update("a", pair.update(pair.a, 0.1), NOW)
        except Banned:
            banned_at = i
            break
        except Refusal:
            continue
    assert banned_at is not None and banned_at < 600  # 40 within the burst, then ~500 over it
    assert pair.b.scores.is_banned(pair.a.peer_id, NOW)


def test_a_pulled_model_far_from_ours_is_not_mixed():
    """An insider answering a parameter pull with an all-zero model: not mixed; an honest peer's is."""
    peer = make_peer()
    rng = np.random.default_rng(3)
    moved = 0.3 * rng.standard_normal(NUMEL)  # training moves a model by a fraction of its size
    peer.learner.params = (peer.initial_params + moved).astype(np.float32)
    honest = (peer.learner.params + 0.05 * rng.standard_normal(NUMEL)).astype(np.float32)
    before = peer.params.copy()
    assert not peer.mix(np.zeros(NUMEL, np.float32), peer.round)
    assert np.array_equal(peer.params, before)
    assert peer.mix(honest, peer.round) and not np.array_equal(peer.params, before)


def test_params_answers_are_bounded_by_the_model_not_the_gossip_limit():
    """A 124M model's int8 answer (~126 MB) is over the 64 MiB gossip limit: pulls and state
    confirmations failed at that size. The bound is our model's float32 size plus 1 MiB."""
    from p2pfm.core.envelope import EnvelopeLimits
    from p2pfm.core.transfer import params_answer_limit

    small = EnvelopeLimits(max_bytes=200)  # far below one answer for NUMEL parameters
    a, b = make_peer(0), make_peer(1)
    b.setup = dataclasses.replace(b.setup, limits=small)
    a.learner.params = a.params + 0.25
    answer = a.serve_params(a.open(b.state_request(b"q" * 16, NOW), NOW, stream="params"), NOW)
    assert len(answer) > small.max_bytes
    params, _ = b.open_params(answer, a.identity.public_key_bytes, b"q" * 16, NOW)
    assert np.abs(params - a.params).max() < 0.01
    assert params_answer_limit(124_072_000, 64 << 20) == 4 * 124_072_000 + (1 << 20)
    assert params_answer_limit(1000, 64 << 20) == 64 << 20  # small models: the gossip limit is larger
    with pytest.raises(Oversize):  # an update is still held to the gossip limit
        b.receive_update(a.identity.peer_id, b"\x00" * 300, NOW)


def test_the_anchor_hash_is_computed_once_per_anchor_and_again_after_any_change(monkeypatch):
    """PeerProtocol.anchor_hash caches by the learner's params_version: the daemon hashes the anchor
    while the local steps run and make_update finds it; any new anchor (a round, an adoption, a
    sync, a plain assignment) is hashed again, and the cache never holds the array itself."""
    import sys

    import p2pfm.core.protocol as protocol_module

    calls = []
    real = protocol_module.anchor_hash
    monkeypatch.setattr(protocol_module, "anchor_hash", lambda params: calls.append(1) or real(params))
    pair = Pair()
    peer = pair.a
    first = peer.anchor_hash()
    assert first == real(peer.params) and len(calls) == 1
    payload = peer.make_update(peer.params - 0.1, WORK)
    assert payload["model_hash"] == first and len(calls) == 1  # found ready
    assert sys.getrefcount(peer.learner.params) <= 3  # no reference kept beside the learner's

    peer.finish_round(live_others=0)
    assert peer.anchor_hash() == real(peer.params) != first and len(calls) == 2
    for change in (
        lambda: peer.adopt((peer.params + 1.0).astype(np.float32), 5),
        lambda: peer.learner.mix_with((peer.params - 1.0).astype(np.float32), 5, weight=0.5),
        lambda: setattr(peer.learner, "params", (peer.params * 2.0).astype(np.float32)),
    ):
        before = peer.anchor_hash()
        change()
        assert peer.anchor_hash() == real(peer.params) != before
