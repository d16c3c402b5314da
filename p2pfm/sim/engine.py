"""The discrete-event engine: a virtual clock, a heap of events, and N peers driving the real core.

Time model (all virtual seconds; nothing here reads a clock):

- Rounds are paced by a deadline of ``round_seconds``, as the daemon paces them: round r
  runs on [r*T, (r+1)*T). At the start every online, ready peer runs H local steps
  (``inner_steps``) taking ``H * step_seconds`` of its device; a peer that cannot finish
  before the deadline is a straggler and sends nothing that round.
- Every peer is a :class:`~p2pfm.core.protocol.PeerProtocol`, the object the daemon drives:
  the engine feeds it bytes and virtual time and carries out its plans.
- When its computation ends, a peer's protocol builds the update (``make_update``), the
  engine seals one envelope per partner (``choose_partners`` over the live peers it learned from the DHT) and sends
  them one after another on its uplink: each takes ``size / min(up_sender, down_receiver)``
  plus both ends' latency. Sizes are the real sealed bytes.
- On arrival the receiver's ``receive_update`` runs every rule (envelope, kind, update
  metadata, round window, codec); refusals are counted by reason, rejected or ignored. A message is lost if its
  sender left before the last byte went out, or the receiver is offline, left and came
  back, or is still downloading state.
- At the deadline each peer that took part calls ``finish_round`` (the daemon's
  sum-preserving weights) and follows its ``plan_round``: a sync pulls a random live peer's
  parameters as the daemon does (``sync_codec`` of params - initial params; download time on
  both links) and mixes them in at the start of the next round; a peer lagging beyond
  ``max_round_lag`` downloads a donor's state instead, as the daemon does.
- Churn: leaving loses the computation and the messages in flight, and keeps the state
  (a checkpoint). A rejoining peer restarts from that stale checkpoint and follows the
  daemon's join rule (``plan_join``): if the swarm's corroborated round is ahead of it at all, it
  downloads a donor's full fp32 state over its own link and adopts it if a second ready peer's
  parameters agree (``state_agrees``; else it counts a refusal and trains on from its own state);
  it trains again from the next round.

Byzantine peers (``[byzantine]``, :mod:`p2pfm.sim.adversary`): the same protocol, but the
engine hands each update they make to the :class:`~p2pfm.sim.adversary.Adversary` and seals
what it returns (a forged tensor; for the protocol-level attacks, other rounds or an old
update). Their messages are counted apart; the loss of the honest peers is measured apart.

Determinism: one seed feeds a :class:`numpy.random.SeedSequence` whose children drive
devices, churn, data, partner choice, identities and the Byzantine peers; heap entries are
``(time, priority, counter)`` so equal times resolve the same way every run.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from p2pfm.core.codecs import CodecSpec, encode
from p2pfm.core.envelope import (
    PROTOCOL_VERSION,
    EnvelopeLimits,
    pack_body_with_payload,
    pack_payload,
    pack_wire,
    seal,
)
from p2pfm.core.errors import Refusal
from p2pfm.core.gossip import (
    choose_partners,
    consensus_distance,
    decode_sync,
    encode_sync,
)
from p2pfm.core.identity import SIGNATURE_BYTES, Identity
from p2pfm.core.protocol import CatchUp, LocalWork, PeerProtocol, PeerSetup, Sync
from p2pfm.sim.adversary import Adversary
from p2pfm.sim.churn import build_availability
from p2pfm.sim.devices import DeviceProfile, assign_devices, resolve_profiles
from p2pfm.sim.energy import grid_intensity
from p2pfm.sim.policy_model import CarbonLedger, PolicyModel
from p2pfm.sim.scenario import Scenario
from p2pfm.sim.traces import load_trace

# Event kinds; the number is also the tie-break priority at equal times (lower first):
# departures before arrivals, a round's end before the next round's start.
LEAVE, JOIN, ROUND_END, ROUND_START, COMPUTE_DONE, MESSAGE, STATE, SYNC = range(8)

RUN_ID = "p2pfm-sim"
UNSIGNED = bytes(SIGNATURE_BYTES)  # verify_signatures = false: same size on the wire, no Ed25519


@dataclass
class Tracker:
    """A rejoined peer being watched until its loss is back near the live mean."""

    rounds: int = 0


@dataclass
class Metrics:
    rows: list[dict[str, Any]] = field(default_factory=list)
    online_curve: list[tuple[float, int]] = field(default_factory=list)
    catchup: list[int] = field(default_factory=list)
    catchup_interrupted: int = 0
    leaves: int = 0
    joins: int = 0
    messages_sent: int = 0
    messages_delivered: int = 0
    lost_sender_left: int = 0
    lost_receiver_gone: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    computations_lost: int = 0
    straggler_rounds: int = 0
    state_downloads: int = 0
    syncs_refused: int = 0  # pulled parameters too far from ours to mix (the daemon's rule)
    states_refused: int = 0  # a second peer's parameters disagreed with the donor's state: not adopted
    adopted: int = 0
    mixed: int = 0
    syncs: int = 0
    useful_steps: int = 0
    time_to_target_s: float | None = None
    time_to_target_round: int | None = None  # the metrics.csv round at which time_to_target_s was measured
    # Byzantine runs only: the honest peers' loss at each full evaluation, and the fate of the
    # Byzantine peers' messages (sent; accepted; refused by reason; lost to churn).
    honest_rows: list[dict[str, Any]] = field(default_factory=list)
    byzantine_sent: int = 0
    byzantine_accepted: int = 0
    byzantine_rejected: dict[str, int] = field(default_factory=dict)
    byzantine_ignored: dict[str, int] = field(default_factory=dict)
    byzantine_lost: int = 0
    diverged_computations: int = 0  # local steps that ended in NaN/Inf (a poisoned model): nothing sent
    pauses: int = 0  # energy policy: peers paused (between rounds) and resumed
    resumes: int = 0


class Simulation:
    """One run of a scenario; :meth:`run` returns the raw results for :mod:`p2pfm.sim.report`."""

    def __init__(self, scenario: Scenario, *, progress: bool = False) -> None:
        self.scenario = scenario
        self.progress = progress
        sc = scenario
        # A seventh child for the Byzantine peers leaves the first six (and honest runs) as they were;
        # an eighth for the energy policies' owners leaves the first seven.
        streams = np.random.SeedSequence(sc.seed).spawn(8)
        rng_devices, rng_churn, rng_work, rng_partners, rng_view, rng_keys, rng_byzantine, rng_policy = (
            np.random.default_rng(s) for s in streams
        )
        self.rng_partners, self.rng_view = rng_partners, rng_view
        n = sc.peers
        self.n = n
        base = sc.resolve(".")
        self.profiles: dict[str, DeviceProfile] = resolve_profiles(sc.devices, base)
        self.device_of = assign_devices(sc.devices.mix, n, rng_devices)
        trace = (
            load_trace(sc.resolve(sc.churn.trace)).scaled(sc.churn.trace_time_scale)
            if sc.churn.model == "trace"
            else None
        )
        self.availability = build_availability(sc.churn, n, rng_churn, trace)
        self.workload = _build_workload(sc, rng_work)
        self.gossip = sc.gossip
        # Identities are derived from the seed, so peer ids (and partner choices) replay.
        self.identities = [Identity.from_private_bytes(rng_keys.bytes(32)) for _ in range(n)]
        self.ids = [ident.peer_id for ident in self.identities]
        self.index_of = {pid: i for i, pid in enumerate(self.ids)}
        init = self.workload.initial_params()
        self.initial = init
        self.limits = EnvelopeLimits()
        self.setups = [
            PeerSetup(identity=ident, run_id=RUN_ID, gossip=sc.gossip, limits=self.limits,
                      verify_signatures=sc.verify_signatures)
            for ident in self.identities
        ]  # fmt: skip
        self.peers = [PeerProtocol(setup, init) for setup in self.setups]
        self.adversary = (
            Adversary(sc.byzantine, n, sc.gossip.codec, rng_byzantine) if sc.byzantine is not None else None
        )
        self.byzantine = self.adversary.mask if self.adversary is not None else np.zeros(n, bool)
        self.checkpoints: list[dict[str, np.ndarray] | None] = [None] * n
        # Per-device arrays, indexed by peer.
        prof = [self.profiles[d] for d in self.device_of]
        self.step_s = np.array([p.step_seconds(self.workload.flops_per_step) for p in prof])
        self.up = np.array([p.up_bytes_per_s for p in prof])
        self.down = np.array([p.down_bytes_per_s for p in prof])
        self.latency = np.array([p.latency_ms / 1000.0 for p in prof])
        self.state_bytes = len(msgpack.packb(encode(init, CodecSpec(name="none")), use_bin_type=True))
        self.update_bytes = self._probe_update_bytes(init)
        self.envelope_overhead = self.update_bytes - self._probe_wire_bytes
        self.round_seconds = sc.round_seconds or self._auto_round_seconds()
        # Peer state.
        self.online = np.zeros(n, bool)
        self.ready = np.zeros(n, bool)  # online and holding current state (not downloading)
        self.in_round = np.zeros(n, bool)  # started the current round's computation
        self.straggling = np.zeros(n, bool)  # cannot finish this round's computation by the deadline
        self.session = np.zeros(n, np.int64)  # bumped on every leave and join
        self.left_at = np.full(n, -math.inf)
        self.online_since = np.zeros(n)
        self.online_s = np.zeros(n)
        self.compute_s = np.zeros(n)
        self.busy_start = np.zeros(n)
        self.busy_end = np.full(n, -math.inf)
        self.uplink_free = np.zeros(n)
        self.bytes_sent = np.zeros(n)
        self.sync_bytes_sent = 0  # the consensus pulls' share of bytes_sent (the rest: updates, state)
        self.bytes_received = np.zeros(n)
        self.local: list[tuple[np.ndarray, float] | None] = [None] * n
        self.pending_mix: list[tuple[np.ndarray, int] | None] = [None] * n
        self.trackers: dict[int, Tracker] = {}
        self.metrics = Metrics()
        self.round = 0
        self.now = 0.0
        self._heap: list[tuple[float, int, int, tuple]] = []
        self._counter = 0
        self._live_cache: tuple[list[str], np.ndarray] | None = None
        self._ready_cache: tuple[list[str], np.ndarray] | None = None
        # Energy policies: paused peers are online, keep their state, and are nobody's partner.
        self.paused = np.zeros(n, bool)
        self.paused_since = np.zeros(n)
        self.paused_s = np.zeros(n)
        self.policy, self.ledger = policy_hooks(self, rng_policy)

    # --- setup helpers ------------------------------------------------------------------
    def _probe_update_bytes(self, init: np.ndarray) -> int:
        """Size of one sealed update message, measured on a throwaway learner and key."""
        probe = PeerProtocol(PeerSetup(identity=self.identities[0], run_id=RUN_ID, gossip=self.gossip), init)
        noise = np.random.default_rng(0).standard_normal(init.size).astype(np.float32) * 1e-3
        payload = probe.make_update(init + noise, self._work(0.0))
        self._probe_wire_bytes = len(msgpack.packb(payload["tensor"], use_bin_type=True))
        return len(self._seal(0, 0, 1, payload, self._pack(payload), 0.0))

    def _auto_round_seconds(self) -> float:
        """The slowest peer's compute + sending fanout updates + latency, with 25% slack."""
        h, fanout = self.gossip.inner_steps, max(1, self.gossip.fanout)
        needed = h * self.step_s + fanout * self.update_bytes / self.up + 2 * self.latency.max()
        return float(round(1.25 * needed.max(), 3))

    # --- event heap -----------------------------------------------------------------------
    def _push(self, time: float, kind: int, data: tuple) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (time, kind, self._counter, data))

    def _invalidate_views(self) -> None:
        self._live_cache = None
        self._ready_cache = None

    def _live(self) -> tuple[list[str], np.ndarray]:
        if self._live_cache is None:
            idx = np.flatnonzero(self.online & ~self.paused)
            self._live_cache = ([self.ids[i] for i in idx], idx)
        return self._live_cache

    def _ready_peers(self) -> tuple[list[str], np.ndarray]:
        if self._ready_cache is None:
            idx = np.flatnonzero(self.ready)
            self._ready_cache = ([self.ids[i] for i in idx], idx)
        return self._ready_cache

    def _view(self, pool: tuple[list[str], np.ndarray]) -> list[str]:
        """The live peers a peer learns from the DHT: a random sample of ``view_size`` of them."""
        names, _ = pool
        size = self.scenario.view_size
        if size == 0 or len(names) <= size:
            return names
        picks = self.rng_view.integers(0, len(names), size=size)
        return [names[i] for i in picks.tolist()]  # Python ints index a list faster than numpy's

    def _pick(self, peer: int, pool: tuple[list[str], np.ndarray], count: int) -> list[int]:
        chosen = choose_partners(self._view(pool), self.ids[peer], count, self.rng_partners)
        return [self.index_of[pid] for pid in chosen]

    # --- wire -----------------------------------------------------------------------------
    def _work(self, train_loss: float) -> LocalWork:
        """One round of a simulated peer's local work, as its update reports it."""
        steps = self.gossip.inner_steps
        return LocalWork(
            samples=self.workload.samples_per_step * steps, inner_steps=steps, train_loss=train_loss
        )

    def _pack(self, payload: dict[str, Any]) -> bytes | None:
        """The payload's canonical bytes for unsigned sealing, packed once for all partners (None if signed)."""
        return None if self.scenario.verify_signatures else pack_payload(payload)

    def _seal(
        self, peer: int, round: int, seq: int, payload: dict[str, Any], packed: bytes | None, now: float
    ) -> bytes:
        """One partner's message: signed by :func:`seal`, or the same bytes with a zero signature.

        Unsigned, the body is :func:`pack_body_with_payload` of the header and ``packed``
        (= ``pack_payload(payload)``), byte-identical to what :func:`seal` would sign.
        """
        identity = self.identities[peer]
        if packed is None:
            return seal(
                identity, kind="update", run_id=RUN_ID, round=round, seq=seq, timestamp=now, payload=payload
            )
        body = pack_body_with_payload(
            {"v": PROTOCOL_VERSION, "kind": "update", "run": RUN_ID, "sender": identity.public_key_bytes,
             "round": round, "seq": seq, "ts": float(now)},
            packed,
        )  # fmt: skip
        return pack_wire(body, UNSIGNED)

    def _transfer(self, sender: int, receiver: int, size: int, start: float) -> tuple[float, float]:
        """(last byte leaves, arrival) for ``size`` bytes on the sender's serial uplink."""
        begin = max(start, self.uplink_free[sender])
        done = begin + size / min(self.up[sender], self.down[receiver])
        self.uplink_free[sender] = done
        return done, done + self.latency[sender] + self.latency[receiver]

    # --- the run --------------------------------------------------------------------------
    def run(self) -> Simulation:
        sc = self.scenario
        for peer in range(self.n):
            if self.availability.initial_online(peer):
                self.online[peer] = self.ready[peer] = True
            change = self.availability.next_change(peer, 0.0, bool(self.online[peer]))
            if change is not None:
                self._push(change, LEAVE if self.online[peer] else JOIN, (peer,))
        self.metrics.online_curve.append((0.0, int(self.online.sum())))
        initial = self.workload.evaluate(self.peers[0].params[None, :])
        self.initial_loss = float(initial[0])
        self._push(0.0, ROUND_START, (0,))
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=sc.rounds, desc=sc.name, unit="round", leave=False)
        heap = self._heap
        while heap:
            time, kind, _, data = heapq.heappop(heap)
            self.now = time
            if kind == MESSAGE:
                self._on_message(*data)
            elif kind == COMPUTE_DONE:
                self._on_compute_done(*data)
            elif kind == ROUND_START:
                self._on_round_start(*data)
            elif kind == ROUND_END:
                self._on_round_end(*data)
                if bar is not None:
                    bar.update(1)
                if data[0] == sc.rounds - 1:
                    break
            elif kind == LEAVE:
                self._on_leave(*data)
            elif kind == JOIN:
                self._on_join(*data)
            elif kind == STATE:
                self._on_state(*data)
            elif kind == SYNC:
                self._on_sync(*data)
        if bar is not None:
            bar.close()
        self.end_time = self.now
        for peer in np.flatnonzero(self.online):
            if self.paused[peer]:
                self.paused_s[peer] += self.end_time - self.paused_since[peer]
            else:
                self.online_s[peer] += self.end_time - self.online_since[peer]
        return self

    # --- rounds ---------------------------------------------------------------------------
    def _on_round_start(self, r: int) -> None:
        self.round = r
        period = self.round_seconds
        for time, peer, joins in self.availability.round_events(r, self.now, period, self.online.copy()):
            self._push(time, JOIN if joins else LEAVE, (peer,))
        if self.policy is not None:
            self._apply_policy()
        active = np.flatnonzero(self.ready)
        for peer in active:
            pending = self.pending_mix[peer]
            if pending is not None:
                if not self.peers[peer].mix(*pending):
                    self.metrics.syncs_refused += 1
                self.pending_mix[peer] = None
        self.in_round[:] = False
        self.in_round[active] = True
        if active.size:
            anchors = np.stack([self.peers[i].params for i in active])
            local, losses = self.workload.local_steps(active, anchors, self.gossip.inner_steps)
            durations = self.gossip.inner_steps * self.step_s[active]
            for row, peer in enumerate(active.tolist()):
                self.busy_start[peer] = self.now
                if durations[row] < period:
                    self.busy_end[peer] = self.now + durations[row]
                    self.local[peer] = (local[row], float(losses[row]))
                    self._push(self.now + durations[row], COMPUTE_DONE, (peer, int(self.session[peer])))
                else:  # straggler: works until the deadline, then drops the round's work
                    self.busy_end[peer] = self.now + period
                    self.local[peer] = None
                    self.straggling[peer] = True
        self._push(self.now + period, ROUND_END, (r,))
        if r + 1 < self.scenario.rounds:
            self._push((r + 1) * period, ROUND_START, (r + 1,))

    def _on_compute_done(self, peer: int, session: int) -> None:
        if self.session[peer] != session:
            return  # left mid-computation; the loss is accounted in _on_leave
        local = self.local[peer]
        self.local[peer] = None
        self.compute_s[peer] += self.now - self.busy_start[peer]
        self.busy_end[peer] = -math.inf
        if local is None:
            return
        params, train_loss = local
        if not np.isfinite(params).all():
            # Local steps from a poisoned (finite but huge) anchor overflowed: there is nothing to
            # send, the encoder refuses NaN/Inf. Only Byzantine runs get here; the anchor stays.
            self.metrics.diverged_computations += 1
            return
        self.metrics.useful_steps += self.gossip.inner_steps
        protocol = self.peers[peer]
        payload = protocol.make_update(params, self._work(train_loss))
        sends = [(protocol.round, payload)]
        if self.adversary is not None and self.byzantine[peer]:  # forged: (claimed round, payload) pairs
            sends = self.adversary.updates(peer, protocol.round, payload, protocol.learner.numel)
        partners = self._pick(peer, self._live(), self.gossip.fanout)
        if not partners:
            return
        packed = [self._pack(message) for _, message in sends]  # packed once, not once per partner
        for partner in partners:
            for (claimed, message), body in zip(sends, packed, strict=True):
                data = self._seal(peer, claimed, protocol.next_seq(), message, body, self.now)
                done, arrival = self._transfer(peer, partner, len(data), self.now)
                self.bytes_sent[peer] += len(data)
                self.metrics.messages_sent += 1
                self.metrics.byzantine_sent += int(self.byzantine[peer])
                self._push(
                    arrival,
                    MESSAGE,
                    (peer, int(self.session[peer]), partner, int(self.session[partner]), done, data),
                )

    def _on_message(
        self, sender: int, sender_session: int, receiver: int, receiver_session: int, done: float, data: bytes
    ) -> None:
        byzantine = bool(self.byzantine[sender])
        if self.session[sender] != sender_session and self.left_at[sender] < done:
            self.metrics.lost_sender_left += 1  # connection died before the last byte
            self.metrics.byzantine_lost += byzantine
            return
        if self.session[receiver] != receiver_session or not self.ready[receiver]:
            self.metrics.lost_receiver_gone += 1
            self.metrics.byzantine_lost += byzantine
            return
        self.bytes_received[receiver] += len(data)
        try:
            self.peers[receiver].receive_update(self.ids[sender], data, self.now)
        except Refusal as exc:
            reason = exc.reason.value
            counts = self.metrics.rejected if exc.lowers_score else self.metrics.ignored
            counts[reason] = counts.get(reason, 0) + 1
            if byzantine:
                counts = (
                    self.metrics.byzantine_rejected if exc.lowers_score else self.metrics.byzantine_ignored
                )
                counts[reason] = counts.get(reason, 0) + 1
            return
        self.metrics.messages_delivered += 1
        self.metrics.byzantine_accepted += byzantine

    def _on_round_end(self, r: int) -> None:
        period = self.round_seconds
        finishing = np.flatnonzero(self.in_round & self.online)
        # As the daemon: sum-preserving weights, expecting `fanout` updates if that many peers are live.
        live_others = int((self.online & ~self.paused).sum()) - 1  # paused peers send nothing
        for peer in finishing.tolist():
            if self.straggling[peer]:  # computed until the deadline for nothing
                self.compute_s[peer] += period
                self.busy_end[peer] = -math.inf
                self.metrics.straggler_rounds += 1
            self.peers[peer].finish_round(live_others)
        self.straggling[:] = False
        self.in_round[:] = False
        # The rounds the swarm announces (the daemon reads them from the DHT records): the top
        # three decide the corroborated round of every peer, whichever one of them it is.
        ready = self._ready_peers()[1]
        top = sorted(((self.peers[i].round, i) for i in ready.tolist()), reverse=True)[:3]
        syncing = []
        for peer in finishing.tolist():
            others = {self.ids[i]: r for r, i in top if i != peer}
            plan = self.peers[peer].plan_round(others, live_others=live_others)
            if isinstance(plan, CatchUp):  # lagging beyond max_round_lag: download state, as the daemon
                self.ready[peer] = False
                self._invalidate_views()
                self._request_state(peer)
            elif isinstance(plan, Sync):
                syncing.append(peer)
        for peer in syncing:
            donors = self._pick(peer, self._ready_peers(), 1)
            if donors:
                donor = donors[0]
                # The daemon serves a consensus pull as sync_codec(params - initial params).
                wire = encode_sync(self.peers[donor].params, self.initial, self.gossip)
                size = len(msgpack.packb(wire, use_bin_type=True)) + self.envelope_overhead
                pulled = decode_sync(wire, self.initial)
                snapshot = (pulled.astype(np.float32), self.peers[donor].round, size)
                done, arrival = self._transfer(donor, peer, size, self.now)
                self.bytes_sent[donor] += size
                self.sync_bytes_sent += size
                self._push(
                    arrival,
                    SYNC,
                    (peer, int(self.session[peer]), donor, int(self.session[donor]), done, snapshot),
                )
        if self.ledger is not None:
            self.ledger.charge(
                self.now, self.policy_grid(self.now - period / 2), self.compute_s, self._online_so_far(),
                self.bytes_sent + self.bytes_received,
            )  # fmt: skip
        self._measure(r)

    def _measure(self, r: int) -> None:
        sc = self.scenario
        full = r % sc.eval_every == 0 or r == sc.rounds - 1
        ready = np.flatnonzero(self.ready)
        tracked = [p for p in sorted(self.trackers) if self.ready[p]]
        for peer in sorted(self.trackers):
            self.trackers[peer].rounds += 1
        if not full and not tracked:
            return
        if full:
            sample = ready
        else:
            untracked = np.setdiff1d(ready, np.array(tracked, dtype=np.int64))
            size = min(sc.catchup_sample, untracked.size)
            sample = np.sort(self.rng_view.choice(untracked, size=size, replace=False)) if size else untracked
        evaluate = np.union1d(sample, np.array(tracked, dtype=np.int64)).astype(np.int64)
        losses = (
            dict(
                zip(
                    evaluate.tolist(),
                    self.workload.evaluate(np.stack([self.peers[i].params for i in evaluate])).tolist(),
                    strict=True,
                )
            )
            if evaluate.size
            else {}
        )
        reference_peers = [p for p in sample.tolist() if p not in self.trackers] or sample.tolist()
        if reference_peers:
            reference = float(np.mean([losses[p] for p in reference_peers]))
            for peer in tracked:
                if losses[peer] <= reference * (1.0 + sc.catchup_tolerance):
                    self.metrics.catchup.append(self.trackers.pop(peer).rounds)
        if not full:
            return
        if ready.size == 0:
            # Nobody online and holding state: still a row, so metrics.csv has every evaluation
            # round (the last one above all) and a reader sees the gap instead of a silently
            # older "final" figure. Losses and distance are NaN (written "nan", null in JSON).
            self.metrics.rows.append(self._row(r, ready, math.nan, math.nan, math.nan, math.nan))
            return
        if self.adversary is not None:
            honest = [p for p in ready.tolist() if not self.byzantine[p]]
            self.metrics.honest_rows.append(
                {
                    "round": r + 1,
                    "time_s": self.now,
                    "honest_ready": len(honest),
                    "honest_mean_loss": float(np.mean([losses[p] for p in honest])) if honest else math.nan,
                }
            )
        distance = consensus_distance([self.peers[i].params for i in ready.tolist()])
        mean_loss = float(np.mean([losses[p] for p in ready.tolist()]))
        if (
            self.metrics.time_to_target_s is None
            and sc.target_loss is not None
            and mean_loss <= sc.target_loss
        ):
            self.metrics.time_to_target_s = self.now
            self.metrics.time_to_target_round = r + 1
        self.metrics.rows.append(
            self._row(
                r,
                ready,
                mean_loss,
                float(min(losses[p] for p in ready.tolist())),
                float(max(losses[p] for p in ready.tolist())),
                distance,
            )
        )

    def _row(
        self, r: int, ready: np.ndarray, mean_loss: float, min_loss: float, max_loss: float, distance: float
    ) -> dict[str, Any]:
        """One metrics.csv row after round ``r`` (0-based; the row says ``r + 1`` rounds done)."""
        return {
            "round": r + 1,
            "time_s": self.now,
            "online": int(self.online.sum()),
            "ready": int(ready.size),
            "mean_loss": mean_loss,
            "min_loss": min_loss,
            "max_loss": max_loss,
            "consensus_distance": distance,
            "bytes_sent": float(self.bytes_sent.sum()),
            "messages_sent": self.metrics.messages_sent,
            "messages_lost": self.metrics.lost_sender_left + self.metrics.lost_receiver_gone,
            "rejected": sum(self.metrics.rejected.values()),
        }

    # --- energy policies -------------------------------------------------------------------
    def policy_grid(self, time: float) -> float:
        assert self.policy is not None
        return self.policy.grid_at(time)

    def _online_so_far(self) -> np.ndarray:
        """Unpaused online seconds of every peer up to now (the ledger's idle time)."""
        running = self.online & ~self.paused
        return self.online_s + np.where(running, self.now - self.online_since, 0.0)

    def _apply_policy(self) -> None:
        """At a round start, before anyone computes: each online peer's gate decides (the daemon
        checks between rounds too, so no half round is ever sent)."""
        assert self.policy is not None
        for peer in np.flatnonzero(self.online).tolist():
            decision = self.policy.decide(peer, self.now)
            if not decision.changed:
                continue
            if decision.run:
                self._resume(peer)
            else:
                self._pause(peer)

    def _policy_allows_join(self, peer: int) -> bool:
        """A device coming online asks its gate before it trains (the daemon checks before its first
        round too); a change here counts as a pause or resume like one at a round start."""
        assert self.policy is not None
        decision = self.policy.decide(peer, self.now)
        if decision.changed:
            if decision.run:
                self.metrics.resumes += 1
            else:
                self.metrics.pauses += 1
        return decision.run

    def _pause(self, peer: int) -> None:
        """Leave the rounds, keep the state: no longer ready nor anyone's partner; in-flight
        messages, state and syncs addressed to it are dropped (a new session)."""
        self.metrics.pauses += 1
        self.paused[peer], self.paused_since[peer] = True, self.now
        self.ready[peer] = self.in_round[peer] = self.straggling[peer] = False
        self.session[peer] += 1
        self.online_s[peer] += self.now - self.online_since[peer]
        self.local[peer] = self.pending_mix[peer] = None
        self.trackers.pop(peer, None)
        self._invalidate_views()

    def _resume(self, peer: int) -> None:
        """Back to training as a joiner does: catch up if the swarm moved on (``plan_join``)."""
        self.metrics.resumes += 1
        self.paused[peer] = False
        self.paused_s[peer] += self.now - self.paused_since[peer]
        self.online_since[peer] = self.uplink_free[peer] = self.now
        self._invalidate_views()
        self._request_state(peer)

    # --- churn ----------------------------------------------------------------------------
    def _on_leave(self, peer: int) -> None:
        if not self.online[peer]:
            return
        self.metrics.leaves += 1
        self.online[peer] = self.ready[peer] = False
        self._invalidate_views()
        self.session[peer] += 1
        self.left_at[peer] = self.now
        if self.paused[peer]:  # its paused time was charged to nobody: nothing to add
            self.paused[peer] = False
            self.paused_s[peer] += self.now - self.paused_since[peer]
        else:
            self.online_s[peer] += self.now - self.online_since[peer]
        if self.busy_end[peer] > self.now:  # dies mid-computation: energy spent, work lost
            self.compute_s[peer] += self.now - self.busy_start[peer]
            self.metrics.computations_lost += 1
        self.busy_end[peer] = -math.inf
        self.in_round[peer] = self.straggling[peer] = False
        self.local[peer] = None
        self.pending_mix[peer] = None
        if self.trackers.pop(peer, None) is not None:
            self.metrics.catchup_interrupted += 1
        self.checkpoints[peer] = {k: v.copy() for k, v in self.peers[peer].learner.state_arrays().items()}
        self.metrics.online_curve.append((self.now, int(self.online.sum())))
        change = self.availability.next_change(peer, self.now, False)
        if change is not None:
            self._push(max(change, self.now), JOIN, (peer,))

    def _on_join(self, peer: int) -> None:
        if self.online[peer]:
            return
        self.metrics.joins += 1
        self.online[peer] = True
        self._invalidate_views()
        self.session[peer] += 1
        self.online_since[peer] = self.now
        self.uplink_free[peer] = self.now
        # A restart: a fresh protocol (replay guard, scores) from the peer's own (stale) checkpoint.
        protocol = PeerProtocol(
            self.setups[peer], self.initial, seq=self.peers[peer].seq, round=self.peers[peer].round
        )
        protocol.learner.params = self.peers[peer].params.copy()
        if self.checkpoints[peer] is not None:
            protocol.learner.load_state_arrays(self.checkpoints[peer])
        self.peers[peer] = protocol
        self.metrics.online_curve.append((self.now, int(self.online.sum())))
        if self.policy is not None and not self._policy_allows_join(peer):
            self.paused[peer], self.paused_since[peer] = True, self.now  # online, but its policy objects
        else:
            self.trackers[peer] = Tracker()
            self._request_state(peer)
        change = self.availability.next_change(peer, self.now, True)
        if change is not None:
            self._push(max(change, self.now), LEAVE, (peer,))

    def _request_state(self, peer: int) -> None:
        """The daemon's join rule: download a donor's state if the corroborated round of the peers
        we see is ahead of ours at all."""
        view = self._view(self._ready_peers())
        rounds = {pid: self.peers[self.index_of[pid]].round for pid in view if pid != self.ids[peer]}
        plan = self.peers[peer].plan_join(rounds)
        chosen = (
            choose_partners(
                self.peers[peer].donors(rounds, plan, self.now), self.ids[peer], 1, self.rng_partners
            )
            if plan is not None
            else []
        )
        if not chosen:  # nobody ahead to ask: carry on from the checkpoint
            self.ready[peer] = True
            self._invalidate_views()
            return
        donor = self.index_of[chosen[0]]
        snapshot = (self.peers[donor].params.copy(), self.peers[donor].round)
        done, arrival = self._transfer(donor, peer, self.state_bytes, self.now)
        self.bytes_sent[donor] += self.state_bytes
        self.metrics.state_downloads += 1
        self._push(
            arrival, STATE, (peer, int(self.session[peer]), donor, int(self.session[donor]), done, snapshot)
        )

    def _on_state(
        self, peer: int, session: int, donor: int, donor_session: int, done: float, snapshot: tuple
    ) -> None:
        if self.session[peer] != session:
            return  # left again while downloading
        if self.session[donor] != donor_session and self.left_at[donor] < done:
            self._request_state(peer)  # donor vanished mid-transfer: ask someone else
            return
        self.bytes_received[peer] += self.state_bytes
        params, round = snapshot
        if not self._state_confirmed(peer, donor, params, round):
            self.metrics.states_refused += 1  # as the daemon: not adopted; carry on from our own state
            self.ready[peer] = True
            self._invalidate_views()
            return
        if round - self.peers[peer].round > self.gossip.max_round_lag:
            self.metrics.adopted += 1  # too far behind to mix
        else:
            self.metrics.mixed += 1  # close enough that mixing would do; the daemon adopts anyway
        self.peers[peer].adopt(params, round)  # as the daemon does on (re)join or when lagging
        self.ready[peer] = True
        self._invalidate_views()

    def _state_confirmed(self, peer: int, donor: int, params: np.ndarray, round: int) -> bool:
        """The daemon's evidence rule: the donor's state must agree with some second live peer's
        parameters (``PeerProtocol.witnesses`` / ``state_agrees``); a lone donor is believed."""
        protocol = self.peers[peer]
        names, _ = self._ready_peers()
        rounds = {pid: self.peers[self.index_of[pid]].round for pid in names if pid != self.ids[peer]}
        rounds[self.ids[donor]] = round
        witnesses = protocol.witnesses(rounds, self.ids[donor], CatchUp(round, 0), self.now)
        if not witnesses:
            return True
        return any(protocol.state_agrees(params, self.peers[self.index_of[w]].params) for w in witnesses)

    def _on_sync(
        self, peer: int, session: int, donor: int, donor_session: int, done: float, snapshot: tuple
    ) -> None:
        if self.session[peer] != session or not self.ready[peer]:
            return
        if self.session[donor] != donor_session and self.left_at[donor] < done:
            return  # donor left mid-transfer; the next sync will try again
        params, round, size = snapshot
        self.bytes_received[peer] += size
        self.pending_mix[peer] = (params, round)  # applied at the next round start, between computations
        self.metrics.syncs += 1


def policy_hooks(sim: Simulation, rng: np.random.Generator) -> tuple[PolicyModel | None, CarbonLedger | None]:
    """The scenario's energy policy (None if it has none, or only ``always``) and the hourly carbon
    ledger (whenever a ``[policy]`` table is given, so ``always`` is measured the same way)."""
    config = sim.scenario.policy
    if config is None:
        return None, None
    energy = sim.scenario.energy
    flat = grid_intensity(energy, energy.country)
    model = PolicyModel(config, sim.device_of, sim.scenario.churn.day_length_s, flat, rng)
    prof = [sim.profiles[d] for d in sim.device_of]
    ledger = CarbonLedger(
        np.array([p.active_w for p in prof]), np.array([p.idle_w for p in prof]),
        np.array([p.wall_factor for p in prof]), energy.network_nj_per_byte,
    )  # fmt: skip
    return model, ledger


def _build_workload(scenario: Scenario, rng: np.random.Generator):
    from p2pfm.sim.workloads import GPTWorkload, MLPWorkload

    if scenario.workload.kind == "mlp":
        return MLPWorkload(scenario.workload.mlp, scenario.peers, rng)
    return GPTWorkload(scenario.workload.gpt, scenario.peers, rng, base_dir=scenario.base_dir)
