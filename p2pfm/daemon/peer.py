"""The peer daemon's composition root: builds one peer and runs its life.

A running peer is four parts, each in its own module:

- the protocol (``p2pfm.core.protocol.PeerProtocol``): every rule and decision, sans-IO;
- its runtime (:mod:`p2pfm.daemon.runtime`): model, trainer, network, peer book, snapshot;
- the network handlers and calls (:mod:`p2pfm.daemon.handlers`);
- the round driver (:mod:`p2pfm.daemon.rounds`): joining, rounds, plans, drain.

One process, one event loop (hivemind's DHT child process aside). Inner training steps run in
a worker thread, so the loop keeps serving gossip and state downloads while we compute.
SIGINT/SIGTERM: graceful leave (tombstone announcement, final checkpoint). SIGKILL: the
others' pushes time out and the DHT record expires within ``announce_ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from p2pfm.config import ConfigError, config_to_dict
from p2pfm.core.admission import Admission
from p2pfm.core.envelope import EnvelopeLimits
from p2pfm.core.errors import Refusal
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import Event, PeerProtocol, PeerSetup, Phase
from p2pfm.core.tensorfile import digest
from p2pfm.daemon.config import PeerConfig
from p2pfm.daemon.handlers import StreamClient, StreamHandlers
from p2pfm.daemon.heap import fix_mmap_threshold
from p2pfm.daemon.metrics import MetricsLog
from p2pfm.daemon.net import PeerNetwork
from p2pfm.daemon.pausing import PolicyDriver
from p2pfm.daemon.readings import ReadingSource
from p2pfm.daemon.records import LeaveRecord, StartRecord
from p2pfm.daemon.rounds import RoundDriver
from p2pfm.daemon.runtime import PeerRuntime, load_or_create_identity
from p2pfm.daemon.snapshots import drop_mapped_pages, map_initial_params
from p2pfm.daemon.trainer import LocalTrainer, ModelAdapter
from p2pfm.model.data import ShardSpec
from p2pfm.model.device import resolve_device
from p2pfm.model.source import load_workload

log = logging.getLogger("p2pfm.peer")

__all__ = ["PeerDaemon", "load_or_create_identity", "run_peer", "shard_for"]


def shard_for(config: PeerConfig, peer_id: str) -> ShardSpec:
    if config.shard >= 0:
        return ShardSpec(config.shard, config.num_shards)
    return ShardSpec(
        int.from_bytes(digest(peer_id.encode())[:8], "little") % config.num_shards, config.num_shards
    )


def default_trainer(config: PeerConfig, shard: ShardSpec, peer_id: str) -> LocalTrainer:
    """The configured workload (``model_source``: the byte-level GPT, a preset, or hf:DIR) on this peer's shard."""
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    workload = load_workload(
        config.model_source, config.model, config.data, shard,
        seed=config.seed, max_shard_bytes=config.train.max_shard_bytes, seq_len=config.train.seq_len,
    )  # fmt: skip
    log.info("model: %s, %s parameters", workload.loaded.name, f"{workload.loaded.params:,}")
    return LocalTrainer(
        workload.model, workload.dataset, lr=config.train.lr,
        weight_decay=config.train.weight_decay, batch_size=config.train.batch_size,
        seed=int.from_bytes(digest(peer_id.encode())[:4], "little"),
        eval_batches=config.train.eval_batches, eval_batch_size=config.train.eval_batch_size,
        device=resolve_device(config.train.device), precision=config.train.precision,
    )  # fmt: skip


MAX_FAILED_ROUNDS = 5  # consecutive rounds that raised before the peer gives up (a local bug)

OPEN_SWARM_WARNING = (
    "OPEN SWARM: no swarm authority is configured, so ANY process that can reach this peer may join, "
    "send updates and download its state. Fine for experiments on one machine; for anything else make "
    "an authority (p2pfm keygen --out authority.key), certify each peer (p2pfm admit) and run peers "
    "with --authority ID --cert CERT (p2pfm swarm does this by itself)"
)


def admission_for(config: PeerConfig, identity: Identity) -> tuple[Admission, bytes | None, bytes | None]:
    """The swarm's admission policy, our certificate and a revocation list to publish (if any).

    Refuses to start (ConfigError) with a certificate that does not admit this very key now: a
    peer the others would ignore should say so at once, not train alone.
    """
    settings = config.admission
    if not settings.authority:
        log.warning(OPEN_SWARM_WARNING)
        return Admission(config.run_id), None, None
    admission = Admission(config.run_id, settings.authority)
    assert settings.cert is not None  # AdmissionConfig requires it with an authority
    certificate = settings.cert.read_bytes()[:4096]
    try:
        admission.check(identity.peer_id, certificate, time.time())
    except Refusal as exc:
        raise ConfigError(
            f"admission.cert: {settings.cert} does not admit this peer: {exc.detail}. Ask the authority for "
            f"one: p2pfm admit --authority KEY --peer {identity.peer_id} --run-id {config.run_id} --out CERT"
        ) from None
    revocations = None
    if settings.revocations is not None:
        revocations = settings.revocations.read_bytes()
        try:
            admission.revoke(revocations)
        except Refusal as exc:
            raise ConfigError(f"admission.revocations: {settings.revocations}: {exc.detail}") from None
    log.info("admitted swarm: authority %s, certificate %s", settings.authority, settings.cert)
    return admission, certificate, revocations


class PeerDaemon:
    """A running peer. ``await run()`` returns when the configured rounds are done or on stop."""

    def __init__(self, config: PeerConfig, adapter: ModelAdapter | None = None) -> None:
        """``adapter``: a user's own model and optimizer (library API); None = the default GPT workload."""
        self.config = config
        identity = load_or_create_identity(config.key)
        self.peer_id = identity.peer_id
        self.shard = shard_for(config, self.peer_id)
        trainer = adapter if adapter is not None else default_trainer(config, self.shard, self.peer_id)
        # Every peer builds the same initial weights from the run seed: the shared reference
        # that parameter syncs are encoded against.
        admission, certificate, revocations = admission_for(config, identity)
        setup = PeerSetup(
            identity=identity, run_id=config.run_id, gossip=config.gossip,
            limits=EnvelopeLimits(max_bytes=config.net.max_message_bytes), max_state_bytes=config.net.max_state_bytes,
            admission=admission, rate_limits=config.limits, certificate=certificate,
        )  # fmt: skip
        # Sequence numbers start at the clock in ms: monotone across restarts, never reusing (key, seq).
        initial = map_initial_params(config.work_dir / "snapshots", trainer.flat())  # file-backed, not heap
        self.protocol = PeerProtocol(setup, initial, seq=time.time_ns() // 1_000_000)
        # A params answer reads the mapping once, block by block: each block's pages leave our RSS behind it.
        self.protocol.initial_read = partial(drop_mapped_pages, initial)
        self.runtime = PeerRuntime(
            config=config, protocol=self.protocol, trainer=trainer,
            net=PeerNetwork(config.net, identity, config.run_id, admission),
            metrics=MetricsLog(config.work_dir), shard_index=self.shard.index,
            rng=np.random.default_rng(int.from_bytes(secrets.token_bytes(8), "little")),
        )  # fmt: skip
        self.runtime.certificate, self.runtime.revocation_list = certificate, revocations
        self.handlers = StreamHandlers(self.runtime)
        self.driver = RoundDriver(self.runtime, StreamClient(self.runtime))
        # The energy policy (None: "always", nothing to check).
        self.policy = (
            PolicyDriver(self.runtime, self.driver, ReadingSource(config.policy))
            if config.policy.active
            else None
        )
        self.trainer = trainer
        self.net = self.runtime.net
        self.metrics = self.runtime.metrics
        self.stop_event = self.runtime.stop_event
        self._heartbeat: asyncio.Task | None = None
        self.on_online: Callable[[list[str]], None] | None = None  # called with our addresses once reachable

    @property
    def round(self) -> int:
        return self.protocol.round

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass

    def request_stop(self) -> None:
        if not self.runtime.stop_event.is_set():
            log.info("stopping: leaving the swarm gracefully")
        self.runtime.stop_event.set()
        self.runtime.stop_flag.set()

    async def start(self) -> None:
        """Restore, go online, wait for the quorum, join (download state if the swarm moved ahead)."""
        rt, loop = self.runtime, asyncio.get_running_loop()
        log.info("config: %s", config_to_dict(self.config))
        log.info("computing on %s in %s", rt.compute_device, getattr(self.trainer, "precision", "fp32"))
        rt.resumed = rt.restore_checkpoint()
        rt.refresh_snapshot()
        # The idle baseline (measured meters only), before the network and training add any load.
        idle_w = await rt.energy.measure_idle_async(self.config.energy.idle_measure_s)
        log.info("energy: idle baseline %.2f W (%s)", idle_w, rt.energy.idle_source)
        # Fork the DHT child before installing our signal handlers: a child inheriting them
        # would swallow SIGTERM/SIGINT (Ctrl-C reaches the whole process group) and never exit.
        await self.net.start()
        self._install_signal_handlers()
        await self.handlers.install()
        log.info(
            "peer %s (libp2p %s) listening on %s", self.peer_id, self.net.libp2p_id, " ".join(self.net.maddrs)
        )
        print(
            f"p2pfm peer {self.peer_id} ready; others join with --initial-peers {self.net.maddrs[0]}",
            flush=True,
        )
        self.protocol.fire(Event.ONLINE)
        rt.write_status()
        if self.on_online is not None:
            self.on_online(list(self.net.maddrs))
        await rt.announce()
        quorum = await self.driver.wait_for_quorum()
        self.driver.await_first_update = quorum.ready and quorum.need > 1
        initial_eval_loss = await loop.run_in_executor(None, self.trainer.evaluate)
        # The byte split this peer trains and evaluates on (absent for a user's own model).
        data_sizes = self.trainer.dataset.sizes() if isinstance(self.trainer, LocalTrainer) else {}
        rt.record(
            StartRecord(
                round=self.protocol.round,
                resumed=rt.resumed,
                params=self.protocol.learner.numel,
                shard=self.shard.index,
                initial_eval_loss=initial_eval_loss,
                wall_time=rt.wall_time(),
                data_split=data_sizes,
            )
        )
        joined = await self.driver.join("rejoin" if rt.resumed else "join")
        rt.eval_loss = (
            await loop.run_in_executor(None, self.trainer.evaluate) if joined else initial_eval_loss
        )
        self._heartbeat = asyncio.create_task(self.driver.heartbeat())
        rt.write_status()

    async def stop(self) -> None:
        """Graceful leave: finish pushes, checkpoint, withdraw the announcement, go offline."""
        rt, loop = self.runtime, asyncio.get_running_loop()
        rt.stop_flag.set()
        rt.stop_event.set()
        rt.energy.stop()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if rt.background:
            await asyncio.wait(rt.background, timeout=self.config.net.request_timeout_s)
        await loop.run_in_executor(None, rt.write_checkpoint)
        await self.net.withdraw(rt.announcement_payload())
        rt.record(LeaveRecord(round=self.protocol.round, wall_time=rt.wall_time()))
        if self.protocol.phase is not Phase.LEFT:
            self.protocol.fire(Event.STOP)
        rt.write_status()
        self.metrics.close()
        rt.energy.close()
        await self.handlers.close()
        await self.net.shutdown()

    async def run(self) -> int:
        """The daemon: start, train round after round until done or stopped, leave."""
        try:
            await self.start()
        except BaseException:
            await self.handlers.close()
            await self.net.shutdown()
            self.metrics.close()
            raise
        failures = 0
        try:
            while not self.runtime.stop_event.is_set():
                if self.config.rounds and self.protocol.round >= self.config.rounds:
                    await self.driver.final_drain()
                    break
                try:
                    if self.policy is not None:
                        await self.policy.between_rounds()
                        if self.runtime.stop_event.is_set():
                            break
                    await self.driver.one_round()
                    failures = 0
                except Exception:
                    # Whatever another peer sent, one round's failure must not end the peer: go back to
                    # the last good anchor and carry on. Several in a row is our own bug: stop and say so.
                    failures += 1
                    log.exception("round %d failed (%d in a row)", self.protocol.round, failures)
                    self.runtime.counters["round_errors"] += 1
                    if failures >= MAX_FAILED_ROUNDS:
                        raise
                    self.trainer.load_flat(self.protocol.params)
                    await asyncio.sleep(1.0)
        finally:
            await self.stop()
        return 0


def run_peer(config: PeerConfig) -> int:
    """Run one peer until done or stopped; the CLI's ``p2pfm peer`` calls this.

    A peer process owns its allocator: large buffers get their own mappings, returned on free
    (:mod:`p2pfm.daemon.heap`; a library user's process keeps its own settings).
    """
    fix_mmap_threshold()
    return asyncio.run(PeerDaemon(config).run())
