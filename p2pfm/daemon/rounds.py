"""The round driver: joins the swarm, runs rounds, and carries out the protocol's plans.

Round structure (see ``protocols/peer.md``):

1. H local AdamW steps from the anchor (worker thread);
2. the protocol builds the update; we seal it once and push it to ``fanout`` random live
   peers in the background (each push has a deadline);
3. the protocol merges whatever arrived meanwhile and takes the outer step; we load the anchor;
4. the protocol's plan: catch up from a donor (we lag beyond ``max_round_lag``), sync with a
   random live peer (every ``sync_every`` rounds, or after a healed partition), or carry on;
5. evaluate, write metrics, checkpoint atomically; heartbeats refresh the announcement.

The driver decides nothing itself: every *whether* is a call into ``PeerProtocol``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import numpy as np

from p2pfm.core.codecs import NonFiniteVector
from p2pfm.core.gossip import choose_partners
from p2pfm.core.protocol import CatchUp, Event, LocalWork, Sync
from p2pfm.core.quorum import QuorumView
from p2pfm.daemon.handlers import StreamClient
from p2pfm.daemon.heap import release_free_heap
from p2pfm.daemon.records import (
    DrainRecord,
    QuorumTimeoutRecord,
    RoundRecord,
    StateDownloadRecord,
    StateRefusedRecord,
)
from p2pfm.daemon.runtime import PeerRuntime
from p2pfm.daemon.snapshots import drop_mapped_pages
from p2pfm.daemon.trainer import StepStats

log = logging.getLogger("p2pfm.peer")


class RoundDriver:
    """Runs one peer's rounds on its runtime, asking its protocol object what to do."""

    def __init__(self, runtime: PeerRuntime, client: StreamClient) -> None:
        self.rt = runtime
        self.protocol = runtime.protocol
        self.client = client
        self.await_first_update = False  # after round 1, wait (bounded) until a partner's update arrives

    # --- joining ---------------------------------------------------------------------------------
    async def wait_for_quorum(self) -> QuorumView:
        """Wait until the peers we expect can hear us; say whom we have and whom we wait for.

        ``min_peers`` >= 2 is a hard quorum (wait up to ``min_peers_timeout_s``). A peer pointed
        at a swarm (``initial_peers``) with ``min_peers`` = 1 still expects one partner, but
        only for a short settling time: if nobody is there it trains alone, as before. A
        partner counts once its announcement lists our libp2p id (``p2pfm.core.quorum``), so no
        peer runs rounds its partners cannot hear, whatever the machines' speeds.
        """
        rt = self.rt
        hard = rt.config.min_peers >= 2
        patience = rt.config.min_peers_timeout_s if hard else 3 * rt.config.net.heartbeat_s + 5.0
        started = time.time()
        deadline = started + patience
        announced: list[str] = []
        last_log = float("-inf")
        while True:
            await rt.refresh_live()
            view = rt.quorum_now()
            listed = rt.sees()
            if listed != announced:  # our view changed: tell the others at once that we hear them
                await rt.announce()
                announced = listed
            now = time.time()
            waited = now - started
            rt.write_status(
                {**view.as_status(), "waited_s": round(waited, 1), "deadline_s": round(patience, 1)}
            )
            if view.ready or rt.stop_event.is_set():
                if view.need > 1:
                    log.info("quorum reached after %.1f s: %s", waited, view.describe())
                return view
            if not hard and not view.seen and waited >= 5.0:  # pointed at a swarm that is not there
                log.warning(
                    "no peer of the swarm found after %.0f s; training alone until peers appear", waited
                )
                return view
            if now > deadline:
                log.warning(
                    "gave up waiting for a quorum after %.0f s (deadline %.0f s): %s; %s",
                    waited,
                    patience,
                    view.describe(),
                    "training alone until peers appear"
                    if view.have == 1
                    else f"training with the {view.have - 1} partner(s) that hear us",
                )
                rt.record(
                    QuorumTimeoutRecord(
                        need=view.need,
                        have=view.have,
                        seen=list(view.seen),
                        confirmed=list(view.confirmed),
                        unconfirmed=list(view.unconfirmed),
                        waited_s=waited,
                        wall_time=rt.wall_time(),
                    )
                )
                return view
            if now - last_log >= 5.0:
                log.info(
                    "waiting for a quorum: %s; waited %.0f s of %.0f s", view.describe(), waited, patience
                )
                last_log = now
            await asyncio.sleep(0.25)

    async def join(self, reason: str) -> bool:
        """After the quorum: adopt the swarm's newest state if it is ahead of us at all."""
        plan = self.protocol.plan_join(self.rt.live_rounds())
        if plan is None:
            self.protocol.fire(Event.QUORUM_SETTLED)
            return False
        self.protocol.fire(Event.BEHIND)
        try:
            adopted = await self.catch_up(plan, reason)
        finally:  # a catch-up that raised must not leave us in catching_up (the next BEHIND is invalid)
            self.protocol.fire(Event.CAUGHT_UP)
        return adopted

    async def wait_for_first_update(self) -> None:
        """After our first round, wait (bounded) until some partner's update has reached us.

        The quorum handshake guarantees that partners *can* hear us, but each peer learns it
        at its own next DHT lookup, so one may start a fraction of a second before another.
        A job whose rounds take milliseconds would spend that gap running far ahead, and the
        later peer's updates would then be refused as stale. One round of lock-step at the
        start aligns the peers to within a message's latency; afterwards nobody waits.
        """
        if self.rt.heard_update.is_set():
            return
        net = self.rt.config.net
        patience = 3 * net.heartbeat_s + net.request_timeout_s
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.rt.heard_update.wait(), patience)
            log.info(
                "first update from a partner arrived after %.2f s: the swarm is training together",
                time.perf_counter() - started,
            )
        except TimeoutError:
            log.warning(
                "no partner's update within %.0f s of our first round; training on without waiting", patience
            )

    # --- background: heartbeats ------------------------------------------------------------------
    async def heartbeat(self) -> None:
        rt = self.rt
        beats = 0
        while not rt.stop_event.is_set():
            # Look first, then announce: our ``sees`` list is then at most one lookup old, so a
            # joiner waiting for us to hear it is confirmed within one heartbeat.
            await rt.refresh_live()
            await rt.announce()
            beats += 1
            if beats % 3 == 1:  # revocations: read every ~12 s, re-published every ~36 s
                await rt.refresh_revocations(publish=beats % 9 == 1)
            lost = rt.book.lost()
            if lost and beats % 3 == 0:  # every ~12 s while peers are missing: heal partitions
                targets = [(a.libp2p_id, list(a.maddrs)) for a in lost.values()][:8]
                if await rt.net.redial(targets):
                    log.info("re-dialed %d lost peer(s); refreshing the swarm view", len(targets))
                    await rt.refresh_live()
                    # Peers came back (a healed partition): models drifted apart meanwhile, and
                    # only a parameter sync pulls them together, so do one next round.
                    rt.sync_soon = True
            try:
                await asyncio.wait_for(rt.stop_event.wait(), rt.config.net.heartbeat_s)
            except TimeoutError:
                pass

    # --- plans ---------------------------------------------------------------------------------
    async def catch_up(self, plan: CatchUp, reason: str) -> bool:
        """Download the state of the corroborated round from a donor, check it against a second
        peer's parameters, adopt it. Up to three donors, in random order (spreads joiners)."""
        rt = self.rt
        rounds = rt.live_rounds()
        live = dict(rt.live)  # as the plan saw it: a donor may expire from rt.live during a download
        donors = self.protocol.donors(rounds, plan, time.time())
        for index in rt.rng.permutation(len(donors))[:3]:
            donor = live[donors[index]]
            try:
                arrays, round_ = await self.client.download_state(donor)
            except Exception as exc:  # Reject, timeouts, resets: try the next donor
                log.warning("state download from %s failed: %r", donor.peer_id, exc)
                continue
            if not await self.confirm_state(arrays["params"], round_, donor.peer_id, rounds, plan):
                continue
            self.protocol.adopt(arrays["params"], round_)
            rt.trainer.load_flat(self.protocol.params)
            # The arrays are views of the downloaded file's mapping: whatever was read of it counts
            # in our RSS until dropped (1.5 GB at 124M). Copied now, so their pages leave, and the
            # initial parameters' pages the confirmation read with them.
            drop_mapped_pages(arrays["params"])
            rt.release_cold_pages()
            try:
                rt.trainer.load_optimizer_arrays({k: v for k, v in arrays.items() if k.startswith("opt.")})
            except (ValueError, KeyError) as exc:
                log.warning("donor optimizer state unusable (%s); keeping ours", exc)
            drop_mapped_pages(arrays["params"])  # the moments' pages too (one mapping for the state)
            self.client.partial().discard()  # adopted: the file goes (our copies are made)
            del arrays
            rt.refresh_snapshot()
            figures = self.client.last_download
            rt.record(
                StateDownloadRecord(
                    reason=reason,
                    donor=donor.peer_id,
                    round=round_,
                    behind=plan.behind,
                    wall_time=rt.wall_time(),
                    bytes=figures.total_bytes if figures else 0,
                    bytes_fetched=figures.fetched if figures else 0,
                    bytes_reused=figures.reused if figures else 0,
                    seconds=figures.seconds if figures else 0.0,
                    rate_bps=figures.rate_bps if figures else 0.0,
                    model_hash=figures.model_hash.hex() if figures else "",
                    via=figures.via if figures else "stream",
                )
            )
            log.info("adopted state of round %d from %s (%s)", round_, donor.peer_id, reason)
            return True
        return False

    async def confirm_state(
        self, params: np.ndarray, round_: int, donor: str, rounds: dict[str, int], plan: CatchUp
    ) -> bool:
        """Independent evidence before adopting: some second peer's parameters must agree with the
        donor's state (``PeerProtocol.state_agrees``; up to three are asked). A lone donor (nobody
        else live) is believed."""
        rt = self.rt
        witnesses = self.protocol.witnesses(rounds, donor, plan, time.time())
        if not witnesses:
            log.info(
                "no second peer to check %s's state against: adopting on its word (one peer in view)", donor
            )
            return True
        disagreed = []
        for witness in witnesses:
            try:
                seen, _ = await self.client.pull_params(rt.live[witness])
            except Exception as exc:
                log.info("could not ask %s to confirm %s's state: %r", witness, donor, exc)
                continue
            if self.protocol.state_agrees(params, seen):
                return True
            disagreed.append(witness)
            log.warning(
                "state of round %d from %s disagrees with %s's parameters (%.3f apart, tolerance %.3f)",
                round_, donor, witness, self.protocol.state_disagreement(params, seen),
                self.protocol.config.state_agreement,
            )  # fmt: skip
        reason = "disagrees" if disagreed else "unconfirmed"
        log.warning("state of round %d from %s not adopted: %s", round_, donor, reason)
        rt.record(StateRefusedRecord(donor, round_, ",".join(disagreed), reason, rt.wall_time()))
        return False

    async def sync_with_random_peer(self) -> bool:
        """Consensus pull: average parameters with one random live peer."""
        rt = self.rt
        askable = [p for p in rt.live if self.protocol.may_ask(p, time.time())]
        partners = choose_partners(askable, rt.peer_id, 1, rt.rng)
        if not partners:
            return False
        donor = rt.live[partners[0]]
        try:
            params, round_ = await self.client.pull_params(donor)
        except Exception as exc:
            log.info("sync with %s failed: %r", donor.peer_id, exc)
            return False
        if not self.protocol.mix(params, round_):
            rt.counters["syncs_refused"] += 1
            log.warning(
                "parameters pulled from %s are %.3f apart from ours (over %.3f): not mixed",
                donor.peer_id, self.protocol.state_disagreement(params, self.protocol.params),
                self.protocol.config.sync_agreement,
            )  # fmt: skip
            return False
        rt.trainer.load_flat(self.protocol.params)
        rt.counters["syncs"] += 1
        return True

    # --- rounds --------------------------------------------------------------------------------
    async def one_round(self) -> None:
        """H inner steps in the worker thread, then a gossip round."""
        rt = self.rt
        loop = asyncio.get_running_loop()
        round_start = time.perf_counter()
        rt.energy.start()  # training from now on (a no-op while the window is open)
        # The update names the anchor it applies to by its SHA-256 (~0.3 s at 124M parameters): taken
        # beside the local steps (the anchor does not change during them), not after them.
        anchor_hashed = loop.run_in_executor(None, self.protocol.anchor_hash)
        try:
            stats = await loop.run_in_executor(
                None, rt.trainer.train_steps, rt.config.gossip.inner_steps, rt.stop_flag
            )
        finally:
            await anchor_hashed
        if stats.steps < rt.config.gossip.inner_steps:  # stopping mid-round: keep the anchor
            rt.trainer.load_flat(self.protocol.params)
            return
        await self.gossip_round(stats, round_start)

    async def gossip_round(self, stats: StepStats, round_start: float) -> None:
        """Push our update, merge what arrived, follow the protocol's plan, record."""
        rt = self.rt
        loop = asyncio.get_running_loop()
        rt.compute_seconds += stats.compute_seconds
        rt.energy.start()  # rounds driven by the library API (p2pfm.api) start here
        rt.energy.add_tokens(stats.samples * rt.tokens_per_sample)
        rt.train_loss = stats.mean_loss
        gossip_start = time.perf_counter()
        work = LocalWork(samples=stats.samples, inner_steps=stats.steps, train_loss=stats.mean_loss)
        # Encoding (top-k over every parameter) and the merge take seconds at 100M+ parameters:
        # both run in a worker thread so the event loop keeps answering pushes and requests.
        # The local parameters go into the learner's round buffer, which make_update then consumes.
        # No separate finiteness pass over them (two 0.5 GB reductions at 124M): the encoder's own
        # tiled pass refuses a NaN or Inf in the delta (NonFiniteVector), residual untouched.
        local = await loop.run_in_executor(
            None, functools.partial(rt.trainer.flat, out=self.protocol.learner.local_buffer())
        )
        try:
            payload = await loop.run_in_executor(None, self.protocol.make_update, local, work)
        except (
            NonFiniteVector
        ):  # local steps diverged (a poisoned or unlucky anchor): send nothing, merge the others'
            rt.counters["diverged_rounds"] += 1
            encode_seconds = time.perf_counter() - gossip_start
            log.warning(
                "round %d: local training produced NaN/Inf; no update sent this round", self.protocol.round
            )
        else:
            message = self.protocol.seal("update", payload, time.time())
            del payload
            encode_seconds = time.perf_counter() - gossip_start
            for target in choose_partners(list(rt.live), rt.peer_id, rt.config.gossip.fanout, rt.rng):
                task = asyncio.create_task(self.client.push_update(rt.live[target], message))
                rt.background.add(task)
                task.add_done_callback(rt.background.discard)
        del local
        merge_start = time.perf_counter()
        inbox = self.protocol.close_inbox()  # on the loop: later arrivals count for the next round
        params, report = await loop.run_in_executor(None, self.protocol.finish_round, len(rt.live), inbox)
        del inbox
        if report.rolled_back:
            rt.counters["rolled_back_steps"] += 1
            log.warning(
                "round %d: the merged step would have made the model NaN/Inf; step dropped", report.round
            )
        await loop.run_in_executor(None, rt.trainer.load_flat, params)
        del params
        merge_seconds = time.perf_counter() - merge_start
        plan = self.protocol.plan_round(rt.live_rounds(), sync_requested=rt.sync_soon)
        synced = False
        if isinstance(plan, CatchUp):
            self.protocol.fire(Event.BEHIND)
            rt.write_status()
            try:
                adopted = await self.catch_up(plan, "lagging")
            finally:  # as in the join: never left in catching_up by an exception
                self.protocol.fire(Event.CAUGHT_UP)
            if not adopted and self.protocol.sync_due(len(rt.live), sync_requested=rt.sync_soon):
                plan = Sync()  # no donor could serve: the pull that was due still is
        if isinstance(plan, Sync):
            rt.sync_soon = False
            await self.sync_with_random_peer()
            synced = True
        snapshot_start = time.perf_counter()
        # Writing and hashing the served state takes seconds at 124M parameters (1.5 GB): in a worker
        # thread, while the loop goes on serving the previous snapshot. No training runs meanwhile.
        await loop.run_in_executor(None, rt.refresh_snapshot)
        snapshot_seconds = time.perf_counter() - snapshot_start
        rt.release_cold_pages()  # a sync, catch-up or state check this round read the initial parameters
        release_free_heap()  # what the round's threads freed goes back to the system (p2pfm.daemon.heap)
        if self.await_first_update:
            self.await_first_update = False
            await self.wait_for_first_update()
        gossip_seconds = time.perf_counter() - gossip_start
        eval_start = time.perf_counter()
        every = rt.config.train.eval_every
        if every and self.protocol.round % every == 0:
            rt.eval_loss = await loop.run_in_executor(None, rt.trainer.evaluate)
        eval_seconds = time.perf_counter() - eval_start
        if self.protocol.round % rt.config.checkpoint_every == 0:
            await loop.run_in_executor(None, rt.write_checkpoint)
        rt.log_bans()  # bans decided on answers we pulled (donors) are reported here
        energy = rt.energy.totals()
        c = rt.counters
        rt.record(RoundRecord(
            round=self.protocol.round, step=rt.trainer.steps_done, samples=rt.trainer.samples_seen,
            train_loss=rt.train_loss, eval_loss=rt.eval_loss, received_updates=report.received, synced=synced,
            live_peers=len(rt.live), bytes_sent=c["bytes_sent"], update_bytes_sent=c["update_bytes_sent"],
            sync_bytes_sent=c["sync_bytes_sent"], state_bytes_served=c["state_bytes_served"],
            bytes_received=c["bytes_received"], state_bytes_downloaded=c["state_bytes_downloaded"],
            messages_accepted=self.protocol.accepted, messages_rejected=dict(self.protocol.scores.rejected),
            messages_ignored=dict(self.protocol.scores.ignored), push_failures=c["push_failures"],
            rolled_back_steps=c["rolled_back_steps"], diverged_rounds=c["diverged_rounds"],
            round_errors=c["round_errors"], bans=self.protocol.scores.bans_decided,
            syncs_refused=c["syncs_refused"],
            compute_seconds=rt.compute_seconds, round_seconds=time.perf_counter() - round_start,
            gossip_seconds=gossip_seconds, eval_seconds=eval_seconds, encode_seconds=encode_seconds,
            merge_seconds=merge_seconds, snapshot_seconds=snapshot_seconds,
            receive_seconds=c["receive_seconds"], wall_time=rt.wall_time(), energy_wh=energy.energy_wh,
            carbon_g=energy.carbon_g, params=self.protocol.learner.numel,
            dht_records_ignored=dict(rt.net.ignored_records.by_reason), marginal_wh=energy.marginal_wh,
            marginal_carbon_g=energy.marginal_carbon_g, tokens=energy.tokens, j_per_token=energy.j_per_token,
            energy_source=energy.energy_source, idle_w=energy.idle_w,
        ))  # fmt: skip
        rt.write_status()

    async def final_drain(self) -> None:
        """Run finished: wait (bounded) for peers still in earlier rounds, then apply their last updates.

        We stay announced meanwhile, so their final pushes still reach us; without this the
        peers that finish first would miss the others' last rounds and the run would end with
        its models a round apart.
        """
        rt = self.rt
        rt.energy.stop()  # waiting for slower peers is not training
        self.protocol.fire(Event.ROUNDS_DONE)
        final = self.protocol.round
        deadline = time.time() + rt.config.final_drain_s
        rt.write_status()
        while time.time() < deadline and not rt.stop_event.is_set():
            await rt.refresh_live()
            if all(a.round >= final for a in rt.live.values()):
                break
            await asyncio.sleep(0.3)
        # The last announcements go out right after the pushes are started: give them a moment.
        await asyncio.sleep(min(2.0, max(0.0, deadline - time.time())))
        params, applied = self.protocol.drain(len(rt.live))
        rt.trainer.load_flat(params)
        rt.refresh_snapshot()
        if rt.config.train.eval_every:
            rt.eval_loss = await asyncio.get_running_loop().run_in_executor(None, rt.trainer.evaluate)
        rt.record(DrainRecord(round=final, applied=applied, eval_loss=rt.eval_loss, wall_time=rt.wall_time()))
