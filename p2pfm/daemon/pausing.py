"""Carrying out the energy policy on a live peer: pause between rounds, resume like a joiner.

The decision is the core's (:class:`~p2pfm.core.policy.PolicyGate`); the readings are
:mod:`p2pfm.daemon.readings`'. Here is what a pause *means* for a running peer:

- it happens between rounds only, so a round is either finished (its update sent) or never
  started: nobody receives half an update;
- the peer writes a checkpoint and keeps its state in memory; it stays online, keeps its
  heartbeat and serves requests, and its announcement carries ``paused`` (the reason), so the
  others stop choosing it as partner or donor and stop counting it for quorum and weights;
- on resuming it announces itself training again and follows the join rule (``plan_join``):
  if the swarm's corroborated round moved ahead at all, it catches up from a donor (the usual
  download, checked against a second peer when there is one), else it trains on.
"""

from __future__ import annotations

import asyncio
import logging
import time

from p2pfm.core.policy import Decision, PolicyGate
from p2pfm.core.protocol import Event, Phase
from p2pfm.daemon.readings import ReadingSource
from p2pfm.daemon.records import PauseRecord, ResumeRecord
from p2pfm.daemon.rounds import RoundDriver
from p2pfm.daemon.runtime import PeerRuntime

log = logging.getLogger("p2pfm.peer")


class PolicyDriver:
    """One peer's policy loop: :meth:`between_rounds` returns once the peer may train (or stops)."""

    def __init__(self, runtime: PeerRuntime, driver: RoundDriver, source: ReadingSource) -> None:
        self.rt = runtime
        self.driver = driver
        self.source = source
        self.gate = PolicyGate(runtime.config.policy)
        self.check_every_s = runtime.config.policy.check_every_s

    async def between_rounds(self) -> None:
        """Ask the gate; if it says pause, pause until it says run (or we are stopped), then resume.

        Re-entrant: if a pause or resume raised half-way (the round loop counts it as a failed
        round and calls again), the phase tells where we are, and we carry on from there.
        """
        paused = self.rt.phase is Phase.PAUSED
        decision = self.gate.decide(self.source.read())
        if decision.run and not paused:
            return
        if not decision.run and not paused:
            await self.pause(decision)
        while not decision.run:
            try:
                await asyncio.wait_for(self.rt.stop_event.wait(), self.check_every_s)
                return  # stopping: PeerDaemon.stop leaves from the paused phase
            except TimeoutError:
                pass
            decision = self.gate.decide(self.source.read())
        await self.resume(decision)

    async def pause(self, decision: Decision) -> None:
        rt, protocol = self.rt, self.rt.protocol
        protocol.fire(Event.PAUSE)
        rt.paused = (decision.reason[:64], time.time())
        await asyncio.get_running_loop().run_in_executor(None, rt.write_checkpoint)
        await rt.announce()  # the others stop choosing us at their next lookup
        rt.record(PauseRecord(protocol.round, decision.reason, rt.snapshot.hash.hex(), rt.wall_time()))
        rt.write_status()
        log.info("paused by the energy policy at round %d: %s", protocol.round, decision.reason)

    async def resume(self, decision: Decision) -> None:
        rt, protocol = self.rt, self.rt.protocol
        _, since = rt.paused or ("", time.time())
        paused_round, state_hash = protocol.round, rt.snapshot.hash.hex()
        rt.paused = None
        try:
            await rt.refresh_live()
            await rt.announce()  # training again: partners may choose us from their next lookup
            plan = protocol.plan_join(rt.live_rounds())
        except BaseException:
            protocol.fire(Event.RESUME)  # train on from our own state; the round plan catches up later
            raise
        adopted = False
        if plan is None:
            protocol.fire(Event.RESUME)
        else:
            protocol.fire(Event.BEHIND)
            rt.write_status()
            try:
                adopted = await self.driver.catch_up(plan, "resume")
            finally:  # as the join does: never left in catching_up by an exception
                protocol.fire(Event.CAUGHT_UP)
        rt.record(
            ResumeRecord(
                round=protocol.round, paused_round=paused_round, paused_s=time.time() - since,
                reason=decision.reason, state_hash=state_hash, behind=plan.behind if plan else 0,
                caught_up=adopted, wall_time=rt.wall_time(),
            )
        )  # fmt: skip
        rt.write_status()
        log.info(
            "resumed at round %d after %.1f s paused (%s)%s", protocol.round, time.time() - since,
            decision.reason, f"; caught up {plan.behind} round(s)" if adopted and plan else "",
        )  # fmt: skip
