"""One peer's protocol, sans-IO: lifecycle, round sequence and policy in one place.

The daemon (asyncio + libp2p) and the simulator (a virtual clock) both drive a
:class:`PeerProtocol`: they feed it bytes, time and randomness, and carry out what it
decides. Everything a peer *decides* lives here or in the pure modules it calls:

- the lifecycle (:class:`Phase`, changed only through :data:`TRANSITIONS`);
- the update message (:func:`update_payload`, the one builder) and its receiving rules
  (envelope checks, the stream's kind, round window, codec) with the reject/ignore split and
  the score/ban policy (:class:`~p2pfm.core.scoring.Scoreboard`);
- what to do after a round or on joining (:func:`join_plan`, :func:`round_plan`: catch up from
  donors, sync with a random peer, or carry on), on the rules of ``p2pfm.core.gossip``;
- state transfer and the consensus pull, both sides (``p2pfm.core.transfer``).

The peer's lifecycle and round are drawn in ``protocols/peer.md`` from :data:`TRANSITIONS`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from p2pfm.core.admission import Admission
from p2pfm.core.envelope import Envelope, EnvelopeLimits, ReplayGuard, open_envelope, seal
from p2pfm.core.errors import (
    BadRound,
    BadUpdate,
    Banned,
    RateLimited,
    Refusal,
    RoundRegression,
    UnknownSender,
)
from p2pfm.core.gossip import (
    MAX_ROUND,
    GossipConfig,
    GossipLearner,
    RoundReport,
    decode_sync,
    encode_sync,
    expected_received,
    needs_catch_up,
    sync_due,
)
from p2pfm.core.identity import Identity
from p2pfm.core.lane import LaneOffer
from p2pfm.core.limits import RateLimiter, RateLimits
from p2pfm.core.scoring import Scoreboard
from p2pfm.core.tensorfile import Buffer, digest
from p2pfm.core.transfer import (
    Donor,
    Manifest,
    StateLayout,
    check_chunk,
    check_manifest,
    check_params_answer,
    check_request_kind,
    check_state,
    check_state_buffer,
    layout_payload,
    manifest_payload,
    params_answer_limit,
    wanted_chunks,
)

MAX_INNER_STEPS = 1 << 20  # an update claiming more local steps than this is not an honest peer's
MAX_WITNESSES = 3  # second peers asked to confirm a state; one that agrees is enough


# --- lifecycle ---------------------------------------------------------------------------------
class Phase(enum.Enum):
    """Where a peer is in its life; the value is what ``status.json`` says (``state``)."""

    STARTING = "starting"  # restored from its checkpoint (if any), not yet reachable
    JOINING = "joining"  # online and announced, waiting for the partners it expects
    CATCHING_UP = "catching_up"  # downloading a donor's state (on joining, or too far behind)
    TRAINING = "training"  # running rounds
    PAUSED = "paused"  # the energy policy paused training (p2pfm.core.policy); state kept, still announced
    DRAINING = "draining"  # rounds done; applying the last updates of slower peers
    LEFT = "left"  # tombstone announced, checkpoint written, offline


class Event(enum.Enum):
    """What moves a peer from one phase to the next."""

    ONLINE = "online"  # listening and announced
    QUORUM_SETTLED = "quorum_settled"  # the partners hear us, or we stopped waiting
    BEHIND = "behind"  # the swarm is ahead (joining: at all; training: beyond max_round_lag)
    CAUGHT_UP = "caught_up"  # adopted a donor's state, or no donor could serve one
    ROUNDS_DONE = "rounds_done"  # the configured number of rounds is done
    STOP = "stop"  # asked to leave (signal, library call, end of the drain)
    PAUSE = "pause"  # the energy policy objects (between rounds: no half update is ever sent)
    RESUME = "resume"  # the policy allows training again and the swarm is not ahead of us


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.STARTING, Event.ONLINE): Phase.JOINING,
    (Phase.JOINING, Event.BEHIND): Phase.CATCHING_UP,
    (Phase.JOINING, Event.QUORUM_SETTLED): Phase.TRAINING,
    (Phase.TRAINING, Event.BEHIND): Phase.CATCHING_UP,
    (Phase.CATCHING_UP, Event.CAUGHT_UP): Phase.TRAINING,
    (Phase.TRAINING, Event.ROUNDS_DONE): Phase.DRAINING,
    (Phase.TRAINING, Event.PAUSE): Phase.PAUSED,
    (Phase.PAUSED, Event.RESUME): Phase.TRAINING,
    (Phase.PAUSED, Event.BEHIND): Phase.CATCHING_UP,
    (Phase.STARTING, Event.STOP): Phase.LEFT,
    (Phase.JOINING, Event.STOP): Phase.LEFT,
    (Phase.CATCHING_UP, Event.STOP): Phase.LEFT,
    (Phase.TRAINING, Event.STOP): Phase.LEFT,
    (Phase.PAUSED, Event.STOP): Phase.LEFT,
    (Phase.DRAINING, Event.STOP): Phase.LEFT,
}
"""The lifecycle, as data: (phase, event) -> next phase. Anything not listed is a driver bug."""


class InvalidTransition(RuntimeError):
    """A driver fired an event its peer's phase does not take (a local bug, never remote input)."""


# --- plans: what the driver should do next -----------------------------------------------------
@dataclass(frozen=True)
class CatchUp:
    """Download the newest state from a donor (:func:`catch_up_donors`) and adopt it."""

    newest: int  # the newest round we see
    behind: int  # how far behind it we are


@dataclass(frozen=True)
class Sync:
    """Pull one random live peer's parameters and average with them."""


Plan = CatchUp | Sync | None


def corroborated_round(live_rounds: Mapping[str, int], need: int = 2) -> int | None:
    """The newest round that at least ``need`` live peers have reached (all of them, if fewer live).

    One peer's word moves nobody: a stranger announcing round 1,000,000 (or three rounds ahead,
    to catch joiners) used to make every peer download its state. With two or more peers in
    view, a round counts only once a second peer vouches for it by reaching it too. A peer
    alone with one other has nobody to corroborate with (admission is its defence there).
    None if nobody is live.
    """
    rounds = sorted(live_rounds.values(), reverse=True)
    if not rounds:
        return None
    return rounds[min(need, len(rounds)) - 1]


def catch_up_donors(live_rounds: Mapping[str, int], target: int, config: GossipConfig) -> list[str]:
    """Peers whose state is near the swarm's at ``target``: within ``max_round_lag`` of it either
    way (announcements lag fast rounds by up to a heartbeat, so honest peers' announced rounds
    spread). A peer claiming far more than the corroborated round is no donor."""
    lag = max(config.max_round_lag, 1)
    return sorted(p for p, r in live_rounds.items() if target - lag <= r <= target + lag)


def state_witnesses(live_rounds: Mapping[str, int], donor: str, target: int) -> list[str]:
    """Who to check a donor's state against: every other live peer, closest in round to ``target``
    first. Not only the donors: a liar that is the only donor in its round window must still
    face a second opinion (only with nobody else live is a donor believed on its word)."""
    others = [p for p in live_rounds if p != donor]
    return sorted(others, key=lambda p: (abs(live_rounds[p] - target), p))


DISAGREEMENT_BLOCK = 1 << 20  # elements per block of state_disagreement's float64 sums


def state_disagreement(candidate: np.ndarray, witness: np.ndarray, initial: np.ndarray) -> float:
    """``||candidate - witness|| / (||candidate - initial|| + ||witness - initial||)``: 0 for equal
    states, about 1 when one of them is unrelated to the other (zero, sign-flipped, random).

    Differences are taken in float32 and summed in float64 a block at a time: the whole-vector
    form made a float32 and a float64 temporary per term (1.5 GB at 124M parameters, on top of a
    joiner's freshly adopted state). The sums differ from one whole-vector dot product only in the
    last bits; the result is compared with a tolerance.
    """
    if not (candidate.shape == witness.shape == initial.shape):
        raise ValueError("candidate, witness and initial must have the same shape")
    c, w, i = (np.ravel(a) for a in (candidate, witness, initial))
    squares = [0.0, 0.0, 0.0]  # ||c - i||^2, ||w - i||^2, ||c - w||^2
    for start in range(0, c.size, DISAGREEMENT_BLOCK):
        block = slice(start, start + DISAGREEMENT_BLOCK)
        for term, (a, b) in enumerate(((c, i), (w, i), (c, w))):
            d = (a[block] - b[block]).astype(np.float64)
            squares[term] += float(d.dot(d))
    moved = math.sqrt(squares[0]) + math.sqrt(squares[1])
    distance = math.sqrt(squares[2])
    return distance / moved if moved > 0 else (0.0 if distance == 0 else float("inf"))


def states_agree(candidate: np.ndarray, witness: np.ndarray, initial: np.ndarray, tolerance: float) -> bool:
    """Whether a downloaded state lies close enough to a second peer's parameters to be adopted.

    :func:`state_disagreement` <= ``tolerance``: distance measured against how far training
    moved both from the run's initial weights (honest peers a round or two apart pass easily;
    an all-zero, sign-flipped or random state does not; a state scaled by k passes only for
    k < 3 at the default 0.5). Pure numpy.
    """
    return state_disagreement(candidate, witness, initial) <= tolerance


def join_plan(own_round: int, newest: int | None, config: GossipConfig) -> CatchUp | None:
    """On (re)joining: catch up whenever the swarm is ahead of us at all (``needs_catch_up``).

    ``newest``: the swarm's corroborated round (:func:`corroborated_round`; None: we see nobody).
    """
    if newest is None or not needs_catch_up(own_round, newest, config, joining=True):
        return None
    return CatchUp(newest, newest - own_round)


def round_plan(own_round: int, newest: int | None, config: GossipConfig, *, sync_due: bool) -> Plan:
    """After a round: catch up if we lag beyond ``max_round_lag``, else sync when one is due."""
    if newest is not None and needs_catch_up(own_round, newest, config, joining=False):
        return CatchUp(newest, newest - own_round)
    return Sync() if sync_due else None


# --- the update message ------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalWork:
    """What one round of local training produced, as the update message reports it."""

    samples: int  # samples the local steps consumed
    inner_steps: int  # local optimizer steps
    train_loss: float  # mean training loss over those steps (NaN if unknown)


def anchor_hash(params: np.ndarray) -> bytes:
    """The ``model_hash`` of an update: SHA-256 of the anchor parameters its delta applies to."""
    # The array's own buffer, not ``tobytes()``: that was a 0.5 GB copy every round at 124M parameters.
    return digest(np.ascontiguousarray(params, dtype=np.float32).data.cast("B"))


def update_payload(wire: dict, work: LocalWork, anchor: bytes) -> dict:
    """The one builder of an ``update`` payload (``protocols/wire.md``: ``update``).

    ``weight`` is the samples behind the delta and ``inner_steps`` its local steps; receivers
    check both (``BAD_UPDATE``) and report them, but merge with the sum-preserving equal
    weights of ``protocols/gossip.md`` section 3: a sample count is the sender's claim, and
    weighting by claims would let one liar outweigh the swarm.
    """
    loss = float(work.train_loss)
    return {
        "tensor": wire,
        "weight": float(max(work.samples, 0)),
        "inner_steps": int(work.inner_steps),
        "train_loss": loss if np.isfinite(loss) else 0.0,
        "model_hash": anchor,
    }


def check_update_meta(payload: dict) -> None:
    """[REJECT] BAD_UPDATE if ``inner_steps`` is outside [1, 2^20]: no honest peer sends that."""
    steps = payload["inner_steps"]
    if not 1 <= steps <= MAX_INNER_STEPS:
        raise BadUpdate(f"update claims {steps} inner steps (allowed 1..{MAX_INNER_STEPS})")


# --- the peer ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerSetup:
    """What a peer's protocol needs to know that never changes during its life."""

    identity: Identity
    run_id: str
    gossip: GossipConfig
    limits: EnvelopeLimits = EnvelopeLimits()  # noqa: RUF009 - frozen, so sharing is safe
    max_state_bytes: int = 1 << 30
    verify_signatures: bool = True  # False only for bytes the driver produced itself (simulator)
    admission: Admission | None = None  # None: an open swarm (Admission(run_id) with no authority)
    certificate: bytes | None = None  # ours, sent with state and params requests (admitted swarms)
    rate_limits: RateLimits = RateLimits()  # noqa: RUF009 - frozen, so sharing is safe


class PeerProtocol:
    """One peer: gossip state, lifecycle, sequence numbers, replay guard and scores.

    Not thread-safe: the daemon calls it from its event loop (and hands parameter vectors
    to its worker thread as copies); the simulator from its event loop.
    """

    def __init__(self, setup: PeerSetup, initial_params: np.ndarray, *, seq: int = 0, round: int = 0) -> None:
        self.setup = setup
        self.config = setup.gossip
        self.identity = setup.identity
        self.peer_id = setup.identity.peer_id
        self.initial_params = initial_params
        # Told which elements of ``initial_params`` a params answer has read for the last time
        # (``encode_sync``'s ``after_block``): the daemon, whose initial parameters are a file
        # mapping, takes those pages back out of its resident set block by block.
        self.initial_read: Callable[[int, int], None] | None = None
        self.learner = GossipLearner(initial_params, setup.gossip, round=round)
        self._anchor_hash: tuple[int, bytes] | None = None  # (learner.params_version, its hash)
        self.phase = Phase.STARTING
        self.seq = seq
        self.replay_guard = ReplayGuard.for_limits(setup.limits)
        self.scores = Scoreboard()
        self.admission = setup.admission or Admission(setup.run_id)
        limits = setup.rate_limits
        self.update_limiter = RateLimiter(limits.updates_per_s, limits.update_burst, limits.max_senders)
        self.request_limiter = RateLimiter(limits.requests_per_s, limits.request_burst, limits.max_senders)
        # Peer id -> libp2p id of the peers whose messages count: announced and (in an admitted
        # swarm) holding a valid certificate, as the driver's peer book says. None: everyone
        # counts (a driver with no discovery of its own, e.g. unit tests).
        self.members: dict[str, str] | None = None
        self.newest_from: OrderedDict[str, int] = OrderedDict()  # sender -> newest round it sent us
        self.accepted = 0
        self.heard_update = False  # an update from a partner was accepted (start-up lock-step)

    # --- lifecycle ----------------------------------------------------------------------
    def fire(self, event: Event) -> Phase:
        """Move along :data:`TRANSITIONS`; raises :class:`InvalidTransition` for a driver bug."""
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise InvalidTransition(f"event {event.value!r} in phase {self.phase.value!r}") from None
        return self.phase

    @property
    def round(self) -> int:
        return self.learner.round

    @property
    def params(self) -> np.ndarray:
        return self.learner.params

    # --- sending ------------------------------------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def seal(self, kind: str, payload: dict, now: float, *, round: int | None = None) -> bytes:
        """Sign one message of ours (a fresh sequence number each)."""
        return seal(
            self.identity, kind=kind, run_id=self.setup.run_id, round=self.round if round is None else round,
            seq=self.next_seq(), timestamp=now, payload=payload,
        )  # fmt: skip

    def make_update(self, local_params: np.ndarray, work: LocalWork) -> dict:
        """This round's update payload: the compressed pseudo-gradient (with error feedback)."""
        anchor = self.anchor_hash()
        return update_payload(self.learner.make_update(local_params), work, anchor)

    def anchor_hash(self) -> bytes:
        """:func:`anchor_hash` of our anchor, computed once per anchor (keyed on the learner's
        ``params_version``, never on the array: holding it would keep the learner from reusing it).

        SHA-256 of 0.5 GB takes ~0.3 s at 124M parameters: a driver may call this from a worker
        thread while the round's local steps run, so :meth:`make_update` finds it ready. The version
        is read before the anchor: a change in between only leaves a stale key, never a wrong hash.
        """
        version = self.learner.params_version
        cached = self._anchor_hash
        if cached is None or cached[0] != version:
            cached = (version, anchor_hash(self.learner.params))
            self._anchor_hash = cached
        return cached[1]

    def state_request(
        self, nonce: bytes, now: float, want: dict | None = None, *, lane: bool = False
    ) -> bytes:
        """A signed ``state_request`` (both the state and the params streams take one); ``want``
        (``{"model_hash", "ranges"}``) resumes a state download (:func:`wanted_chunks`); ``lane``
        says we can take the chunks on a direct lane (:mod:`p2pfm.core.lane`)."""
        payload: dict = {"round": self.round, "nonce": nonce}
        if want is not None:
            payload["want"] = want
        if lane:
            payload["lane"] = True
        if self.setup.certificate is not None:
            payload["cert"] = self.setup.certificate
        return self.seal("state_request", payload, now)

    # --- receiving ------------------------------------------------------------------------
    def open(self, data: bytes, now: float, *, stream: str) -> Envelope:
        """Every envelope rule, then the stream's kind rule; raises a Reject subclass."""
        envelope = open_envelope(
            data, run_id=self.setup.run_id, now=now, limits=self.setup.limits, replay_guard=self.replay_guard,
            verify_signature=self.setup.verify_signatures,
        )  # fmt: skip
        check_request_kind(stream, envelope)
        return envelope

    def know(self, members: Mapping[str, str] | None) -> None:
        """The driver's view of who counts: peer id -> libp2p id of announced (admitted) peers."""
        self.members = None if members is None else dict(members)

    def may_ask(self, peer_id: str, now: float) -> bool:
        """Whether to ask a peer for state or parameters: not once its answers got it banned."""
        return not self.scores.is_banned(peer_id, now)

    def check_sender(self, remote: str, now: float) -> None:
        """[IGNORE] BANNED: a banned transport's messages (or a banned member's) are dropped unread."""
        if self.scores.is_banned(remote, now):
            self.scores.note_banned()
            raise Banned(
                f"transport {remote} is banned after {self.scores.rejections[remote]} rejected messages"
            )

    def _check_key(self, envelope: Envelope, remote: str, now: float, *, serving: bool) -> None:
        """The rules on a verified sender, in order: ban, then membership.

        [IGNORE] BANNED if the sender's key is banned. Updates count only from members: peers we
        know announced (in an admitted swarm: with a valid certificate) from the transport the
        stream comes from; else [IGNORE] UNKNOWN_SENDER (perhaps an honest peer whose
        announcement we have not read yet). State and parameters are served to anyone in an open
        swarm, and in an admitted one to members or to a key whose request carries a certificate
        that admits it; else [REJECT] NOT_ADMITTED (nothing is served).
        """
        sender = envelope.sender_id
        if self.scores.is_banned(sender, now):
            self.scores.note_banned()
            raise Banned(f"{sender} is banned after {self.scores.rejections[sender]} rejected messages")
        if serving:
            if self.admission.open or (self.members is not None and sender in self.members):
                return
            self.admission.check(sender, envelope.payload.get("cert"), now)  # raises NotAdmitted
            return
        if self.members is None:
            return
        transport = self.members.get(sender)
        if transport == remote:
            return
        what = (
            "not an announced peer" if transport is None else f"announced transport {transport}, not {remote}"
        )
        raise UnknownSender(f"{sender} is {what}")

    def _open_scored(self, remote: str, data: bytes, now: float, stream: str) -> Envelope:
        """:meth:`open`, a refusal counted against the transport (no key is proven yet)."""
        try:
            return self.open(data, now, stream=stream)
        except Refusal as exc:
            self.refused(remote, exc, now)
            raise

    def open_request(self, remote: str, data: bytes, now: float, *, stream: str) -> Envelope:
        """A state or params request: envelope and kind, then the sender's key, then its budget.

        Raises a Refusal, already counted (envelope problems against the transport, the rest
        against the key). Only members are served, at most ``requests_per_s`` each.
        """
        envelope = self._open_scored(remote, data, now, stream)
        try:
            self._check_key(envelope, remote, now, serving=True)
            self.request_limiter.check(envelope.sender_id, now, "state or params request")
            if max(envelope.round, envelope.payload["round"]) > MAX_ROUND:  # unused, but bounded
                raise BadRound(f"request claims round {envelope.payload['round']}, beyond any run")
        except Refusal as exc:
            self.refused(envelope.sender_id, exc, now)
            raise
        return envelope

    def receive_update(self, remote: str, data: bytes, now: float) -> Envelope:
        """An update from ``remote`` (transport identity): checked, queued for this round.

        Raises a :class:`~p2pfm.core.errors.Refusal` (already counted and scored) if it is not
        used. Rules in order: transport ban, envelope, kind (scored against the transport); key
        ban, membership, rate, update metadata, round window, one per sender and round, cap,
        codec (scored against the key: the identity that costs something).
        """
        self.check_sender(remote, now)
        envelope = self._open_scored(remote, data, now, "gossip")
        try:
            self._check_key(envelope, remote, now, serving=False)
            self.update_limiter.check(envelope.sender_id, now, "update")
            check_update_meta(envelope.payload)
            self.check_round_order(envelope.sender_id, envelope.round)
            self.learner.receive(envelope.sender_id, envelope.round, envelope.payload["tensor"])
        except Refusal as exc:
            self.refused(envelope.sender_id, exc, now)
            raise
        self.note_round(envelope.sender_id, envelope.round)
        self.accepted += 1
        self.heard_update = True
        return envelope

    def refused(self, sender: str, exc: Refusal, now: float) -> bool:
        """Count a refusal of ``sender``'s message (rejections lower its score by their severity,
        messages over its rate budget by a tenth each); True if now banned."""
        if isinstance(exc, RateLimited):
            return self.scores.note_overuse(sender, now)
        return self.scores.note(sender, exc, now)

    def check_round_order(self, sender: str, round: int) -> None:
        """[REJECT] ROUND_REGRESSION (severity 5) if ``round`` is more than one below the newest
        round ``sender`` already sent us: an honest peer's rounds only grow (its last update may
        arrive after its next one, hence the one round of slack). One key claiming many rounds
        per round goes back and forth and ends here."""
        newest = self.newest_from.get(sender)
        if newest is not None and round < newest - 1:
            raise RoundRegression(f"{sender} sends round {round} after round {newest}")

    def note_round(self, sender: str, round: int) -> None:
        self.newest_from[sender] = max(round, self.newest_from.pop(sender, round))
        while len(self.newest_from) > self.scores.max_tracked:
            self.newest_from.popitem(last=False)

    # --- the round ------------------------------------------------------------------------
    def close_inbox(self) -> dict[str, dict[int, dict]]:
        """This round's updates, taken out of the inbox (see :meth:`GossipLearner.close_inbox`)."""
        return self.learner.close_inbox()

    def finish_round(
        self, live_others: int, inbox: dict[str, dict[int, dict]] | None = None
    ) -> tuple[np.ndarray, RoundReport]:
        """Merge with the sum-preserving weights (``expected_received``) and take the outer step.

        ``inbox``: what :meth:`close_inbox` took, when the merge runs off the receiving thread.
        """
        return self.learner.finish_round(expected_received(self.config.fanout, live_others), inbox)

    def drain(self, live_others: int) -> tuple[np.ndarray, int]:
        """Apply the last updates that arrived after our last round."""
        return self.learner.drain(expected_received(self.config.fanout, live_others))

    def plan_join(self, live_rounds: Mapping[str, int]) -> CatchUp | None:
        """On joining, or resuming from a pause: catch up to the swarm's corroborated round
        (``live_rounds``: the others')?"""
        return join_plan(self.round, corroborated_round(live_rounds), self.config)

    def sync_due(self, live_others: int, *, sync_requested: bool = False) -> bool:
        """Whether the round just finished ends with a consensus pull (or the driver asks for one:
        lost peers came back, and only a pull brings drifted models together)."""
        return sync_requested or sync_due(self.round, live_others, self.config)

    def plan_round(
        self, live_rounds: Mapping[str, int], *, live_others: int | None = None, sync_requested: bool = False
    ) -> Plan:
        """After :meth:`finish_round`: catch up (to the corroborated round), sync, or carry on.

        ``live_rounds``: the other live peers' announced rounds (a driver that knows the swarm's
        size otherwise may pass just the top few and ``live_others``)."""
        others = len(live_rounds) if live_others is None else live_others
        due = self.sync_due(others, sync_requested=sync_requested)
        return round_plan(self.round, corroborated_round(live_rounds), self.config, sync_due=due)

    def donors(self, live_rounds: Mapping[str, int], plan: CatchUp, now: float) -> list[str]:
        """Who may serve the state of ``plan``: near its round, ahead of ours (adopting a state behind
        us would send our rounds back), and not banned."""
        return [
            p
            for p in catch_up_donors(live_rounds, plan.newest, self.config)
            if live_rounds[p] > self.round and self.may_ask(p, now)
        ]

    def witnesses(self, live_rounds: Mapping[str, int], donor: str, plan: CatchUp, now: float) -> list[str]:
        """Whom to check ``donor``'s state against (:func:`state_witnesses`), banned peers left out,
        at most :data:`MAX_WITNESSES`. The state is adopted if any one of them agrees: a lying
        witness can delay an honest donor's state (the next witness is asked), not admit a bad one."""
        found = [p for p in state_witnesses(live_rounds, donor, plan.newest) if self.may_ask(p, now)]
        return found[:MAX_WITNESSES]

    def state_agrees(self, candidate: np.ndarray, witness: np.ndarray) -> bool:
        """:func:`states_agree` with this run's initial weights and ``gossip.state_agreement``."""
        return states_agree(candidate, witness, self.initial_params, self.config.state_agreement)

    def state_disagreement(self, candidate: np.ndarray, witness: np.ndarray) -> float:
        return state_disagreement(candidate, witness, self.initial_params)

    # --- state transfer: donor -----------------------------------------------------------------
    def serve_state(
        self, snapshot: bytes, snapshot_round: int, chunk_size: int, now: float
    ) -> tuple[bytes, list[bytes]]:
        """The signed manifest for ``snapshot`` and the chunks that follow it."""
        payload, chunks = manifest_payload(snapshot, snapshot_round, chunk_size)
        return self.seal("state_manifest", payload, now, round=snapshot_round), chunks

    def serve_layout(
        self,
        request: Envelope,
        layout: StateLayout,
        snapshot_round: int,
        now: float,
        lane: LaneOffer | None = None,
    ) -> tuple[bytes, list[int], LaneOffer | None]:
        """The signed manifest of a snapshot laid out as ``layout``, the chunk indexes to send
        after it (those the request's ``want`` asks for, [REJECT] BAD_INDEX, or all of them), and
        the lane offered in it: ``lane`` if the request asked for one, else None."""
        indexes = wanted_chunks(request.payload.get("want"), layout)
        payload = layout_payload(layout, snapshot_round)
        offered = lane if lane is not None and request.payload.get("lane") is True else None
        if offered is not None:
            payload["lane"] = offered.payload()
        manifest = self.seal("state_manifest", payload, now, round=snapshot_round)
        return manifest, indexes, offered

    def serve_params(self, request: Envelope, now: float) -> bytes:
        """A signed ``params_sync`` answer: ``sync_codec`` of our params - initial, echoing the nonce."""
        wire = encode_sync(
            self.learner.params, self.initial_params, self.config, after_block=self.initial_read
        )
        return self.seal(
            "params_sync", {"tensor": wire, "round": self.round, "nonce": request.payload["nonce"]}, now
        )

    # --- state transfer: joiner ----------------------------------------------------------------
    def open_manifest(self, data: bytes, donor: Donor, now: float) -> Manifest:
        """A donor's first frame: envelope rules (no replay guard: answers are bound by the
        donor's key and our fresh request instead), then the manifest rules."""
        envelope = open_envelope(
            data,
            run_id=self.setup.run_id,
            now=now,
            limits=self.setup.limits,
            verify_signature=self.setup.verify_signatures,
        )
        return check_manifest(envelope, donor, max_state_bytes=self.setup.max_state_bytes)

    @staticmethod
    def check_chunk(manifest: Manifest, index: int, piece: bytes) -> None:
        check_chunk(manifest, index, piece)

    def open_state(self, manifest: Manifest, pieces: list[bytes]) -> tuple[dict[str, np.ndarray], int]:
        return check_state(
            manifest, pieces, numel=self.learner.numel, max_state_bytes=self.setup.max_state_bytes
        )

    def open_state_buffer(
        self, manifest: Manifest, blob: Buffer, chunks_checked: bool = False
    ) -> tuple[dict[str, np.ndarray], int]:
        """:meth:`open_state` of a state assembled in a file (``mmap``): the arrays are views of it.
        ``chunks_checked``: every chunk of it was checked as it was written (``check_state_buffer``)."""
        return check_state_buffer(
            manifest, blob, numel=self.learner.numel, max_state_bytes=self.setup.max_state_bytes,
            copy=False, chunks_checked=chunks_checked,
        )  # fmt: skip

    def adopt(self, params: np.ndarray, round: int) -> None:
        """Replace our state with a donor's (joining, or too far behind to mix)."""
        self.learner.adopt(params, round)

    def open_params(self, data: bytes, donor_key: bytes, nonce: bytes, now: float) -> tuple[np.ndarray, int]:
        """A consensus-pull answer: envelope rules, then the binding to our ask, then the codec.

        Its size bound is our model's in float32 (:func:`params_answer_limit`), not the gossip limit:
        a 124M model's int8 answer is ~126 MB.
        """
        limit = params_answer_limit(self.learner.numel, self.setup.limits.max_bytes)
        envelope = open_envelope(
            data,
            run_id=self.setup.run_id,
            now=now,
            limits=dataclasses.replace(self.setup.limits, max_bytes=limit),
            replay_guard=self.replay_guard,
            verify_signature=self.setup.verify_signatures,
        )
        check_params_answer(envelope, donor_key, nonce)
        return decode_sync(envelope.payload["tensor"], self.initial_params), envelope.payload["round"]

    def mix(self, params: np.ndarray, round: int) -> bool:
        """Average with a pulled peer's parameters (``sync_weight``), if they agree with ours.

        One random peer's word: an insider answering a pull with an all-zero model halved every
        puller's model. Parameters further from ours than ``sync_agreement`` (the measure of
        :func:`state_disagreement`; honest pulls in the 100-peer churn simulation: 99 % below 0.5,
        all below 0.72; an all-zero model 0.74) are not mixed. Returns whether we mixed.
        """
        if state_disagreement(params, self.learner.params, self.initial_params) > self.config.sync_agreement:
            return False
        self.learner.mix_with(params, round)
        return True
