"""The peer daemon: local SGD on its shard, signed compressed gossip, churn-proof state.

One process, one event loop (hivemind's DHT child process aside). Inner training steps run in
a worker thread, so the loop keeps serving gossip and state downloads while we compute; no
network call is ever awaited on the compute path except a bounded state download when we
are too far behind to be useful. Round structure (see ``protocols/gossip.md``):

1. H local AdamW steps from the anchor (worker thread);
2. compress the pseudo-gradient with error feedback, seal, push to ``fanout`` random live
   peers in the background (each push has a deadline);
3. merge whatever updates arrived meanwhile, take the outer step, load the new anchor;
4. every ``sync_every`` rounds pull a random live peer's parameters and average; if we are
   more than ``max_round_lag`` rounds behind the swarm, download the newest state instead;
5. evaluate, write metrics, checkpoint atomically, refresh the signed DHT announcement.

SIGINT/SIGTERM: graceful leave (tombstone announcement, final checkpoint). SIGKILL: the
others' pushes time out and the DHT record expires within ``announce_ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import torch

from p2pfm.config import ConfigError, config_to_dict
from p2pfm.core.envelope import EnvelopeLimits, ReplayGuard, open_envelope, seal
from p2pfm.core.errors import Reject, RejectReason, ShapeMismatch
from p2pfm.core.gossip import (
    GossipLearner,
    choose_partners,
    decode_sync,
    encode_sync,
    expected_received,
    needs_catch_up,
)
from p2pfm.core.identity import Identity
from p2pfm.core.quorum import QuorumView, peers_to_list, quorum_view
from p2pfm.core.tensorfile import digest, pack_arrays, unpack_arrays
from p2pfm.daemon.checkpoint import load_checkpoint, save_checkpoint
from p2pfm.daemon.config import PeerConfig
from p2pfm.daemon.metrics import MetricsLog
from p2pfm.daemon.net import Announcement, PeerBook, PeerNetwork, read_frame, write_frame
from p2pfm.daemon.trainer import LocalTrainer, ModelAdapter, StepStats
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.gpt import build_model

log = logging.getLogger("p2pfm.peer")

BAN_AFTER_REJECTIONS = 50  # a sender whose messages keep failing checks is dropped unread


def load_or_create_identity(path: Path) -> Identity:
    """Load the peer's key; create it (mode 0600) on first start."""
    if path.exists():
        return Identity.load(path)
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    identity.save(path)
    log.info("created a new key at %s (peer id %s)", path, identity.peer_id)
    return identity


class Refused(Exception):
    """The peer we asked refused our request and said why (its reason, from our request's checks)."""


def raise_if_refused(frame: bytes, what: str) -> None:
    """Answers are envelopes (msgpack arrays); a refusal is a small map ``{"ok": False, "reason"}``."""
    if len(frame) > 256:
        return
    try:
        answer = msgpack.unpackb(frame)
    except Exception:  # not a refusal; the envelope checks will name what it is
        return
    if isinstance(answer, dict) and answer.get("ok") is False:
        raise Refused(f"{what} refused by the peer: {str(answer.get('reason'))[:64]}")


def shard_for(config: PeerConfig, peer_id: str) -> ShardSpec:
    if config.shard >= 0:
        return ShardSpec(config.shard, config.num_shards)
    return ShardSpec(int.from_bytes(digest(peer_id.encode())[:8], "little") % config.num_shards, config.num_shards)


class PeerDaemon:
    """A running peer. ``await run()`` returns when the configured rounds are done or on stop."""

    def __init__(self, config: PeerConfig, adapter: ModelAdapter | None = None) -> None:
        """``adapter``: a user's own model and optimizer (library API); None = the default GPT workload."""
        self.config = config
        self.identity = load_or_create_identity(config.key)
        self.peer_id = self.identity.peer_id
        self.shard = shard_for(config, self.peer_id)
        if adapter is None:
            threads = config.train.threads or os.cpu_count() or 1
            torch.set_num_threads(threads)
            dataset = ByteDataset(
                config.data, self.shard, block_size=config.model.block_size,
                max_shard_bytes=config.train.max_shard_bytes, seed=config.seed,
            )
            adapter = LocalTrainer(
                build_model(config.model, config.seed), dataset, lr=config.train.lr,
                weight_decay=config.train.weight_decay, batch_size=config.train.batch_size,
                seed=int.from_bytes(digest(self.peer_id.encode())[:4], "little"),
                eval_batches=config.train.eval_batches, eval_batch_size=config.train.eval_batch_size,
            )
        self.trainer = adapter
        # Every peer builds the same initial weights from the run seed: the shared reference
        # that parameter syncs are encoded against.
        self.initial_params = self.trainer.flat()
        self.learner = GossipLearner(self.initial_params, config.gossip)
        self.numel = self.learner.numel
        self.rng = np.random.default_rng(int.from_bytes(secrets.token_bytes(8), "little"))
        self.seq = time.time_ns() // 1_000_000  # monotone across restarts: never reuse (key, seq)
        self.limits = EnvelopeLimits(max_bytes=config.net.max_message_bytes)
        self.replay_guard = ReplayGuard.for_limits(self.limits)
        self.net = PeerNetwork(config.net, self.identity, config.run_id)
        self.metrics = MetricsLog(config.work_dir)
        self.stop_event = asyncio.Event()
        self.stop_flag = threading.Event()  # seen by the training thread between steps
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.rejections_by_remote: Counter[str] = Counter()
        self.live: dict[str, Announcement] = {}
        self.peer_book = PeerBook(config.net.announce_ttl_s)
        self.snapshot = b""
        self.snapshot_hash = bytes(32)
        self.eval_loss = float("nan")
        self.train_loss = float("nan")
        self.compute_seconds = 0.0
        self.started = time.time()
        self.background: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None
        self.sync_soon = False  # set when lost peers reappear: sync at the next round
        self.resumed = False
        self.on_online: Callable[[list[str]], None] | None = None  # called with our addresses once reachable
        self.heard_update = asyncio.Event()  # set by the first update accepted from a partner
        self.await_first_update = False  # after round 1, wait (bounded) until a partner's update arrives

    # --- state: checkpoint and snapshot ---------------------------------------------
    def _state_meta(self) -> dict:
        return {
            "round": self.learner.round, "seq": self.seq, "peer_id": self.peer_id, "numel": self.numel,
            "config": {k: v for k, v in config_to_dict(self.config).items() if k in ("run_id", "seed", "model")},
        }

    def restore_checkpoint(self) -> bool:
        found = load_checkpoint(self.config.work_dir)
        if found is None:
            return False
        arrays, meta = found
        expected = {"run_id": self.config.run_id, "seed": self.config.seed, "model": config_to_dict(self.config.model)}
        saved = meta.get("config", {})
        if {k: saved.get(k) for k in expected} != expected:
            raise ConfigError(
                f"work_dir: {self.config.work_dir} holds a checkpoint of another run or model ({saved}); "
                "use a fresh --work-dir or the same run_id, seed and model"
            )
        self.learner.load_state_arrays({k: arrays[k] for k in ("params", "momentum", "residual", "round")})
        self.trainer.load_flat(self.learner.params)
        self.trainer.load_optimizer_arrays({k: v for k, v in arrays.items() if k.startswith("opt.")})
        self.seq = max(self.seq, int(meta.get("seq", 0)) + 1)
        log.info("resumed from checkpoint at round %d", self.learner.round)
        return True

    def write_checkpoint(self) -> None:
        arrays = {**self.learner.state_arrays(), **self.trainer.optimizer_arrays()}
        save_checkpoint(self.config.work_dir, arrays, self._state_meta())

    def refresh_snapshot(self) -> None:
        """The state we serve to joiners: exactly what our next announcement's hash covers."""
        # Inner AdamW moments travel too: a joiner that restarted Adam from zero would take
        # sign-sized first steps at full lr and wreck the model it just downloaded.
        self.snapshot = pack_arrays(
            {"params": self.learner.params, "round": np.array([self.learner.round], dtype=np.int64),
             **self.trainer.optimizer_arrays()},
            {"numel": self.numel},
        )
        self.snapshot_hash = digest(self.snapshot)

    def announcement_payload(self) -> dict:
        return {
            "libp2p_id": self.net.libp2p_id, "maddrs": self.net.maddrs[:16], "round": self.learner.round,
            "model_hash": self.snapshot_hash, "device": self.config.device[:64],
            "power_w": float(self.config.power_w), "state_bytes": len(self.snapshot),
            "sees": self.sees(),
        }

    def sees(self) -> list[str]:
        """The libp2p ids of the live peers we see: tells joiners that we can hear them."""
        return peers_to_list(self.peer_book.first_seen(), {p: a.libp2p_id for p, a in self.live.items()})

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # --- handlers ----------------------------------------------------------------------
    def _count_reject(self, remote: str, exc: Reject) -> None:
        self.rejected[exc.reason.value] += 1
        # [IGNORE] a stale round is an honest laggard's misfortune, not misbehaviour: no penalty.
        if exc.reason is not RejectReason.STALE_ROUND:
            self.rejections_by_remote[remote] += 1
        log.warning("rejected a message from libp2p peer %s: %s", remote, exc)

    async def _refuse(self, remote: str, writer: asyncio.StreamWriter, exc: Reject) -> None:
        """Count a refusal and tell the asker why (a map, where an answer would be an envelope)."""
        self._count_reject(remote, exc)
        await write_frame(writer, msgpack.packb({"ok": False, "reason": exc.reason.value}))

    async def handle_gossip(self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.rejections_by_remote[remote] >= BAN_AFTER_REJECTIONS:
            self.rejected["banned"] += 1
            return
        try:
            data = await asyncio.wait_for(read_frame(reader, self.config.net.max_message_bytes),
                                          self.config.net.request_timeout_s * 4)
        except Reject as exc:
            await self._refuse(remote, writer, exc)
            return
        self.counters["bytes_received"] += len(data)
        try:
            envelope = open_envelope(data, run_id=self.config.run_id, now=time.time(), limits=self.limits,
                                     replay_guard=self.replay_guard)
            if envelope.kind != "update":
                raise ShapeMismatch(f"kind {envelope.kind!r} sent to the gossip handler, which takes updates")
            self.learner.receive(envelope.sender_id, envelope.round, envelope.payload["tensor"])
        except Reject as exc:
            await self._refuse(remote, writer, exc)
            return
        self.counters["messages_accepted"] += 1
        self.heard_update.set()
        await write_frame(writer, msgpack.packb({"ok": True}))

    async def handle_state(self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve our current snapshot: a signed manifest, then hash-checked chunks."""
        try:
            data = await asyncio.wait_for(read_frame(reader, 4096), self.config.net.request_timeout_s)
            request = open_envelope(data, run_id=self.config.run_id, now=time.time(), limits=self.limits,
                                    replay_guard=self.replay_guard)
            # [REJECT] SHAPE_MISMATCH: only a state request gets the snapshot, not any signed message.
            if request.kind != "state_request":
                raise ShapeMismatch(f"kind {request.kind!r} sent to the state handler, which takes state_request")
        except Reject as exc:
            await self._refuse(remote, writer, exc)
            return
        snapshot, snapshot_hash, round_ = self.snapshot, self.snapshot_hash, self.learner.round
        chunk = self.config.net.state_chunk_bytes
        chunks = [snapshot[i : i + chunk] for i in range(0, len(snapshot), chunk)]
        manifest = seal(
            self.identity, kind="state_manifest", run_id=self.config.run_id, round=round_, seq=self.next_seq(),
            timestamp=time.time(),
            payload={"round": round_, "model_hash": snapshot_hash, "total_bytes": len(snapshot),
                     "chunk_size": chunk, "chunk_hashes": [digest(c) for c in chunks]},
        )
        await write_frame(writer, manifest)
        for piece in chunks:
            await write_frame(writer, piece)
        self.counters["state_bytes_served"] += len(snapshot)
        self.counters["bytes_sent"] += len(snapshot)

    async def handle_params(self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve our parameters for a consensus pull: int8 of (params - initial), signed."""
        try:
            data = await asyncio.wait_for(read_frame(reader, 4096), self.config.net.request_timeout_s)
            request = open_envelope(data, run_id=self.config.run_id, now=time.time(), limits=self.limits,
                                    replay_guard=self.replay_guard)
            if request.kind != "state_request":
                raise ShapeMismatch(f"kind {request.kind!r} sent to the params handler, which takes state_request")
        except Reject as exc:
            await self._refuse(remote, writer, exc)
            return
        loop = asyncio.get_running_loop()
        wire = await loop.run_in_executor(None, encode_sync, self.learner.params, self.initial_params,
                                          self.config.gossip)
        message = seal(self.identity, kind="params_sync", run_id=self.config.run_id, round=self.learner.round,
                       seq=self.next_seq(), timestamp=time.time(),
                       payload={"tensor": wire, "round": self.learner.round, "nonce": request.payload["nonce"]})
        await write_frame(writer, message)
        self.counters["bytes_sent"] += len(message)
        self.counters["sync_bytes_sent"] += len(message)

    async def pull_params(self, donor: Announcement) -> tuple[np.ndarray, int]:
        """A live peer's parameters (decoded against the shared initial weights) and its round."""
        timeout = self.config.net.request_timeout_s * 2
        reader, writer = await asyncio.wait_for(self.net.open_stream(donor.libp2p_id, "params"), timeout)
        try:
            nonce = secrets.token_bytes(16)
            request = seal(self.identity, kind="state_request", run_id=self.config.run_id, round=self.learner.round,
                           seq=self.next_seq(), timestamp=time.time(), payload={"round": self.learner.round, "nonce": nonce})
            await write_frame(writer, request)
            data = await asyncio.wait_for(read_frame(reader, self.config.net.max_message_bytes), timeout)
        finally:
            writer.close()
        self.counters["bytes_received"] += len(data)
        raise_if_refused(data, "parameter sync")
        answer = open_envelope(data, run_id=self.config.run_id, now=time.time(), limits=self.limits,
                               replay_guard=self.replay_guard)
        # [REJECT] the answer must come from the peer we asked, for the ask we made.
        if answer.kind != "params_sync" or answer.sender != donor.public_key or answer.payload["nonce"] != nonce:
            raise ShapeMismatch("params answer is not from the donor we asked, or not for our request")
        params = await asyncio.get_running_loop().run_in_executor(
            None, decode_sync, answer.payload["tensor"], self.initial_params)
        return params, answer.payload["round"]

    # --- outgoing ----------------------------------------------------------------------
    async def push_update(self, target: Announcement, message: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(self.net.open_stream(target.libp2p_id, "gossip"),
                                                    self.config.net.request_timeout_s)
            try:
                await asyncio.wait_for(write_frame(writer, message), self.config.net.request_timeout_s)
                reply = await asyncio.wait_for(read_frame(reader, 1024), self.config.net.request_timeout_s)
            finally:
                writer.close()
            self.counters["bytes_sent"] += len(message)
            self.counters["update_bytes_sent"] += len(message)
            answer = msgpack.unpackb(reply)
            if not answer.get("ok"):
                log.info("peer %s refused our update: %s", target.peer_id, answer.get("reason"))
                self.counters["updates_refused"] += 1
        except Exception as exc:  # timeouts, dead peers, resets: never our compute's problem
            self.counters["push_failures"] += 1
            self.peer_book.suspect(target.peer_id)
            log.info("push to %s failed: %r", target.peer_id, exc)

    async def download_state(self, donor: Announcement) -> tuple[dict[str, np.ndarray], int]:
        """Fetch and verify a donor's snapshot; raise on any mismatch or timeout."""
        net = self.config.net

        async def fetch() -> tuple[dict[str, np.ndarray], int]:
            reader, writer = await self.net.open_stream(donor.libp2p_id, "state")
            try:
                request = seal(self.identity, kind="state_request", run_id=self.config.run_id,
                               round=self.learner.round, seq=self.next_seq(), timestamp=time.time(),
                               payload={"round": self.learner.round, "nonce": secrets.token_bytes(16)})
                await write_frame(writer, request)
                first = await read_frame(reader, 4 << 20)
                raise_if_refused(first, "state download")
                manifest = open_envelope(first, run_id=self.config.run_id, now=time.time(), limits=self.limits)
                m = manifest.payload
                # The donor's announced key must have signed the manifest: no stranger's state.
                if manifest.kind != "state_manifest" or manifest.sender != donor.public_key:
                    raise ShapeMismatch("state manifest not signed by the announced donor")
                if m["model_hash"] != donor.model_hash and m["round"] < donor.round:
                    raise ShapeMismatch("state manifest matches neither the announced hash nor a newer round")
                if m["total_bytes"] > net.max_state_bytes:
                    raise ShapeMismatch(f"state of {m['total_bytes']} bytes exceeds max_state_bytes")
                expected_chunks = -(-m["total_bytes"] // m["chunk_size"])
                if expected_chunks != len(m["chunk_hashes"]):
                    raise ShapeMismatch("state manifest chunk count disagrees with its size")
                pieces = []
                for index, chunk_hash in enumerate(m["chunk_hashes"]):
                    piece = await read_frame(reader, m["chunk_size"])
                    if digest(piece) != chunk_hash:
                        raise ShapeMismatch(f"state chunk {index} does not match its hash")
                    pieces.append(piece)
                blob = b"".join(pieces)
                if len(blob) != m["total_bytes"] or digest(blob) != m["model_hash"]:
                    raise ShapeMismatch("downloaded state does not match the manifest hash")
            finally:
                writer.close()
            self.counters["state_bytes_downloaded"] += len(blob)
            self.counters["bytes_received"] += len(blob)
            arrays, _ = unpack_arrays(blob, max_bytes=net.max_state_bytes)
            params = arrays.get("params")
            if params is None or params.dtype != np.float32 or params.shape != (self.numel,):
                raise ShapeMismatch("donor state has no float32 params of our model's size")
            if "round" not in arrays or arrays["round"].shape != (1,) or arrays["round"].dtype != np.int64:
                raise ShapeMismatch("donor state has no round counter")
            return arrays, int(arrays["round"][0])

        return await asyncio.wait_for(fetch(), net.state_timeout_s)

    async def fetch_from_some_donor(
        self, candidates: list[Announcement]
    ) -> tuple[dict[str, np.ndarray], int, str] | None:
        """Try candidates in random order (spreads joiners over donors); None if all fail."""
        order = self.rng.permutation(len(candidates))
        for index in order[:3]:
            donor = candidates[index]
            try:
                arrays, round_ = await self.download_state(donor)
                return arrays, round_, donor.peer_id
            except Exception as exc:  # Reject, timeouts, resets: try the next donor
                log.warning("state download from %s failed: %r", donor.peer_id, exc)
        return None

    # --- the main loop -----------------------------------------------------------------
    async def refresh_live(self) -> None:
        self.peer_book.merge(await self.net.lookup(time.time()))
        self.live = self.peer_book.live(time.time())

    async def heartbeat(self) -> None:
        beats = 0
        while not self.stop_event.is_set():
            # Look first, then announce: our ``sees`` list is then at most one lookup old, so a
            # joiner waiting for us to hear it is confirmed within one heartbeat.
            await self.refresh_live()
            await self.net.announce(self.announcement_payload(), time.time())
            beats += 1
            lost = self.peer_book.lost()
            if lost and beats % 3 == 0:  # every ~12 s while peers are missing: heal partitions
                targets = [(a.libp2p_id, list(a.maddrs)) for a in lost.values()][:8]
                if await self.net.redial(targets):
                    log.info("re-dialed %d lost peer(s); refreshing the swarm view", len(targets))
                    await self.refresh_live()
                    # Peers came back (a healed partition): models drifted apart meanwhile, and
                    # only a parameter sync pulls them together, so do one next round.
                    self.sync_soon = True
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.config.net.heartbeat_s)
            except TimeoutError:
                pass

    async def catch_up_if_behind(self, reason: str, *, force: bool = False) -> bool:
        """Adopt the newest state of the swarm if we are far behind it (or force, on first join)."""
        if not self.live:
            return False
        newest = max(a.round for a in self.live.values())
        behind = newest - self.learner.round
        if not needs_catch_up(self.learner.round, newest, self.config.gossip, joining=force):
            return False
        donors = [a for a in self.live.values() if a.round >= newest - 1]
        got = await self.fetch_from_some_donor(donors)
        if got is None:
            return False
        arrays, round_, donor = got
        self.learner.adopt(arrays["params"], round_)
        self.trainer.load_flat(self.learner.params)
        try:
            self.trainer.load_optimizer_arrays({k: v for k, v in arrays.items() if k.startswith("opt.")})
        except (ValueError, KeyError) as exc:
            log.warning("donor optimizer state unusable (%s); keeping ours", exc)
        self.refresh_snapshot()
        self.metrics.write({"event": "state_download", "reason": reason, "donor": donor, "round": round_,
                            "behind": behind, "wall_time": time.time() - self.started})
        log.info("adopted state of round %d from %s (%s)", round_, donor, reason)
        return True

    async def sync_with_random_peer(self) -> None:
        """Periodic consensus pull: average parameters with one random live peer."""
        partners = choose_partners(list(self.live), self.peer_id, 1, self.rng)
        if not partners:
            return
        donor = self.live[partners[0]]
        try:
            params, round_ = await self.pull_params(donor)
        except Exception as exc:
            log.info("sync with %s failed: %r", donor.peer_id, exc)
            return
        self.learner.mix_with(params, round_)
        self.trainer.load_flat(self.learner.params)
        self.counters["syncs"] += 1

    async def final_drain(self) -> None:
        """Run finished: wait (bounded) for peers still in earlier rounds, then apply their last updates.

        We stay announced meanwhile, so their final pushes still reach us; without this the
        peers that finish first would miss the others' last rounds and the run would end with
        its models a round apart.
        """
        final = self.learner.round
        deadline = time.time() + self.config.final_drain_s
        self.write_status("draining")
        while time.time() < deadline and not self.stop_event.is_set():
            await self.refresh_live()
            if all(a.round >= final for a in self.live.values()):
                break
            await asyncio.sleep(0.3)
        # The last announcements go out right after the pushes are started: give them a moment.
        await asyncio.sleep(min(2.0, max(0.0, deadline - time.time())))
        params, applied = self.learner.drain(expected_received(self.config.gossip.fanout, len(self.live)))
        self.trainer.load_flat(params)
        self.refresh_snapshot()
        if self.config.train.eval_every:
            self.eval_loss = await asyncio.get_running_loop().run_in_executor(None, self.trainer.evaluate)
        self.metrics.write({"event": "drain", "round": final, "applied": applied, "eval_loss": self.eval_loss,
                            "wall_time": time.time() - self.started})

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass

    def request_stop(self) -> None:
        if not self.stop_event.is_set():
            log.info("stopping: leaving the swarm gracefully")
        self.stop_event.set()
        self.stop_flag.set()

    def write_status(self, state: str, quorum: dict | None = None) -> None:
        status = {
            "peer_id": self.peer_id, "libp2p_id": self.net.libp2p_id, "maddrs": self.net.maddrs,
            "round": self.learner.round, "live_peers": sorted(self.live), "eval_loss": self.eval_loss,
            "state": state, "shard": self.shard.index, "pid": os.getpid(), "run_id": self.config.run_id,
        }
        if quorum is not None:
            status["quorum"] = quorum
        self.metrics.status(status)

    def quorum_now(self) -> QuorumView:
        need = max(self.config.min_peers, 2 if self.config.net.initial_peers else 1)
        return quorum_view(self.net.libp2p_id, {p: a.sees for p, a in self.live.items()}, need)

    async def wait_for_first_update(self) -> None:
        """After our first round, wait (bounded) until some partner's update has reached us.

        The quorum handshake guarantees that partners *can* hear us, but each peer learns it
        at its own next DHT lookup, so one may start a fraction of a second before another.
        A job whose rounds take milliseconds would spend that gap running far ahead, and the
        later peer's updates would then be refused as stale. One round of lock-step at the
        start aligns the peers to within a message's latency; afterwards nobody waits.
        """
        if self.heard_update.is_set():
            return
        patience = 3 * self.config.net.heartbeat_s + self.config.net.request_timeout_s
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.heard_update.wait(), patience)
            log.info("first update from a partner arrived after %.2f s: the swarm is training together",
                     time.perf_counter() - started)
        except TimeoutError:
            log.warning("no partner's update within %.0f s of our first round; training on without waiting", patience)

    async def wait_for_quorum(self) -> QuorumView:
        """Wait until the peers we expect can hear us; say whom we have and whom we wait for.

        ``min_peers`` >= 2 is a hard quorum (wait up to ``min_peers_timeout_s``). A peer pointed
        at a swarm (``initial_peers``) with ``min_peers`` = 1 still expects one partner, but
        only for a short settling time: if nobody is there it trains alone, as before. A
        partner counts once its announcement lists our libp2p id (``p2pfm.core.quorum``), so no
        peer runs rounds its partners cannot hear, whatever the machines' speeds.
        """
        hard = self.config.min_peers >= 2
        patience = self.config.min_peers_timeout_s if hard else 3 * self.config.net.heartbeat_s + 5.0
        started = time.time()
        deadline = started + patience
        announced: list[str] = []
        last_log = float("-inf")
        while True:
            await self.refresh_live()
            view = self.quorum_now()
            listed = self.sees()
            if listed != announced:  # our view changed: tell the others at once that we hear them
                await self.net.announce(self.announcement_payload(), time.time())
                announced = listed
            now = time.time()
            waited = now - started
            self.write_status("joining", {**view.as_status(), "waited_s": round(waited, 1),
                                          "deadline_s": round(patience, 1)})
            if view.ready or self.stop_event.is_set():
                if view.need > 1:
                    log.info("quorum reached after %.1f s: %s", waited, view.describe())
                return view
            if not hard and not view.seen and waited >= 5.0:  # pointed at a swarm that is not there
                log.warning("no peer of the swarm found after %.0f s; training alone until peers appear", waited)
                return view
            if now > deadline:
                log.warning("gave up waiting for a quorum after %.0f s (deadline %.0f s): %s; %s", waited, patience,
                            view.describe(), "training alone until peers appear" if view.have == 1 else
                            f"training with the {view.have - 1} partner(s) that hear us")
                self.metrics.write({"event": "quorum_timeout", **view.as_status(), "waited_s": waited,
                                    "wall_time": now - self.started})
                return view
            if now - last_log >= 5.0:
                log.info("waiting for a quorum: %s; waited %.0f s of %.0f s", view.describe(), waited, patience)
                last_log = now
            await asyncio.sleep(0.25)

    async def start(self) -> None:
        """Restore, go online, join the swarm (download state if it moved ahead), start heartbeats."""
        loop = asyncio.get_running_loop()
        log.info("config: %s", config_to_dict(self.config))
        self.resumed = self.restore_checkpoint()
        self.refresh_snapshot()
        # Fork the DHT child before installing our signal handlers: a child inheriting them
        # would swallow SIGTERM/SIGINT (Ctrl-C reaches the whole process group) and never exit.
        await self.net.start()
        self._install_signal_handlers()
        await self.net.add_handler("gossip", self.handle_gossip)
        await self.net.add_handler("state", self.handle_state)
        await self.net.add_handler("params", self.handle_params)
        log.info("peer %s (libp2p %s) listening on %s", self.peer_id, self.net.libp2p_id, " ".join(self.net.maddrs))
        print(f"p2pfm peer {self.peer_id} ready; others join with --initial-peers {self.net.maddrs[0]}", flush=True)
        self.write_status("joining")
        if self.on_online is not None:
            self.on_online(list(self.net.maddrs))
        await self.net.announce(self.announcement_payload(), time.time())
        quorum = await self.wait_for_quorum()
        self.await_first_update = quorum.ready and quorum.need > 1
        initial_eval_loss = await loop.run_in_executor(None, self.trainer.evaluate)
        # The byte split this peer trains and evaluates on (absent for a user's own model).
        data_sizes = self.trainer.dataset.sizes() if isinstance(self.trainer, LocalTrainer) else {}
        self.metrics.write({"event": "start", "round": self.learner.round, "resumed": self.resumed,
                            "params": self.numel, "shard": self.shard.index, "initial_eval_loss": initial_eval_loss,
                            "wall_time": time.time() - self.started, **data_sizes})
        joined = await self.catch_up_if_behind("rejoin" if self.resumed else "join", force=True)
        self.eval_loss = await loop.run_in_executor(None, self.trainer.evaluate) if joined else initial_eval_loss
        self._heartbeat = asyncio.create_task(self.heartbeat())
        self.write_status("training")

    async def stop(self) -> None:
        """Graceful leave: finish pushes, checkpoint, withdraw the announcement, go offline."""
        loop = asyncio.get_running_loop()
        self.stop_flag.set()
        self.stop_event.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.background:
            await asyncio.wait(self.background, timeout=self.config.net.request_timeout_s)
        await loop.run_in_executor(None, self.write_checkpoint)
        await self.net.withdraw(self.announcement_payload())
        self.metrics.write({"event": "leave", "round": self.learner.round, "wall_time": time.time() - self.started})
        self.write_status("left")
        self.metrics.close()
        await self.net.shutdown()

    async def run(self) -> int:
        """The daemon: start, train round after round until done or stopped, leave."""
        try:
            await self.start()
        except BaseException:
            await self.net.shutdown()
            self.metrics.close()
            raise
        try:
            while not self.stop_event.is_set():
                if self.config.rounds and self.learner.round >= self.config.rounds:
                    await self.final_drain()
                    break
                await self.one_round()
        finally:
            await self.stop()
        return 0

    async def one_round(self) -> None:
        """H inner steps in the worker thread, then a gossip round."""
        loop = asyncio.get_running_loop()
        round_start = time.perf_counter()
        stats = await loop.run_in_executor(None, self.trainer.train_steps, self.config.gossip.inner_steps, self.stop_flag)
        if stats.steps < self.config.gossip.inner_steps:  # stopping mid-round: keep the anchor
            self.trainer.load_flat(self.learner.params)
            return
        await self.gossip_round(stats, round_start)

    async def gossip_round(self, stats: StepStats, round_start: float) -> None:
        """Compress and push our pseudo-gradient, merge what arrived, sync/catch up, record."""
        loop = asyncio.get_running_loop()
        self.compute_seconds += stats.compute_seconds
        self.train_loss = stats.mean_loss
        gossip_start = time.perf_counter()
        wire = self.learner.make_update(self.trainer.flat())
        message = seal(
            self.identity, kind="update", run_id=self.config.run_id, round=self.learner.round, seq=self.next_seq(),
            timestamp=time.time(),
            payload={"tensor": wire, "weight": float(stats.samples), "inner_steps": stats.steps,
                     "train_loss": float(stats.mean_loss), "model_hash": self.snapshot_hash},
        )
        for target in choose_partners(list(self.live), self.peer_id, self.config.gossip.fanout, self.rng):
            task = asyncio.create_task(self.push_update(self.live[target], message))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        params, report = self.learner.finish_round(expected_received(self.config.gossip.fanout, len(self.live)))
        self.trainer.load_flat(params)
        synced = False
        if not await self.catch_up_if_behind("lagging") and (self.learner.should_sync(len(self.live)) or self.sync_soon):
            self.sync_soon = False
            await self.sync_with_random_peer()
            synced = True
        self.refresh_snapshot()
        if self.await_first_update:
            self.await_first_update = False
            await self.wait_for_first_update()
        gossip_seconds = time.perf_counter() - gossip_start
        eval_start = time.perf_counter()
        every = self.config.train.eval_every
        if every and self.learner.round % every == 0:
            self.eval_loss = await loop.run_in_executor(None, self.trainer.evaluate)
        eval_seconds = time.perf_counter() - eval_start
        if self.learner.round % self.config.checkpoint_every == 0:
            await loop.run_in_executor(None, self.write_checkpoint)
        energy_wh = self.config.power_w * self.compute_seconds / 3600.0
        self.metrics.write({
            "event": "round", "round": self.learner.round, "step": self.trainer.steps_done,
            "samples": self.trainer.samples_seen, "train_loss": self.train_loss, "eval_loss": self.eval_loss,
            "received_updates": report.received, "synced": synced, "live_peers": len(self.live),
            "bytes_sent": self.counters["bytes_sent"], "update_bytes_sent": self.counters["update_bytes_sent"],
            "sync_bytes_sent": self.counters["sync_bytes_sent"], "state_bytes_served": self.counters["state_bytes_served"],
            "bytes_received": self.counters["bytes_received"],
            "state_bytes_downloaded": self.counters["state_bytes_downloaded"],
            "messages_accepted": self.counters["messages_accepted"], "messages_rejected": dict(self.rejected),
            "push_failures": self.counters["push_failures"], "compute_seconds": self.compute_seconds,
            "round_seconds": time.perf_counter() - round_start, "gossip_seconds": gossip_seconds,
            "eval_seconds": eval_seconds, "wall_time": time.time() - self.started, "energy_wh": energy_wh,
            "carbon_g": energy_wh / 1000.0 * self.config.grid_g_per_kwh, "params": self.numel,
            "dht_records_ignored": dict(self.net.ignored_records.by_reason),
        })
        self.write_status("training")


def run_peer(config: PeerConfig) -> int:
    """Run one peer until done or stopped; the CLI's ``p2pfm peer`` calls this."""
    return asyncio.run(PeerDaemon(config).run())
