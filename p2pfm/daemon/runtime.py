"""What one running peer holds, shared by its network handlers and its round driver.

The protocol (``p2pfm.core.protocol.PeerProtocol``) owns every decision; this object owns the
I/O-side state around it: the model and its trainer, the network, the peer book, the state
snapshot we serve, counters, and the stop signals. The composition root
(:mod:`p2pfm.daemon.peer`) builds it; handlers and the round driver read and update it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2pfm.config import ConfigError, config_to_dict
from p2pfm.core.announce import Announcement, PeerBook
from p2pfm.core.errors import Refusal
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import PeerProtocol, Phase
from p2pfm.core.quorum import QuorumView, peers_to_list, quorum_view
from p2pfm.core.schema import MAX_ENERGY_WH, MAX_GRID_G_PER_KWH, MAX_TOKENS
from p2pfm.core.transfer import write_state
from p2pfm.daemon.checkpoint import load_checkpoint, save_checkpoint
from p2pfm.daemon.config import PeerConfig
from p2pfm.daemon.energy import open_tracker
from p2pfm.daemon.lanes import LaneServer
from p2pfm.daemon.memory import buffer_breakdown, process_rss
from p2pfm.daemon.metrics import MetricsLog
from p2pfm.daemon.net import PeerNetwork
from p2pfm.daemon.records import Record, as_record
from p2pfm.daemon.snapshots import Snapshot, SnapshotStore, drop_mapped_pages
from p2pfm.daemon.trainer import LocalTrainer, ModelAdapter
from p2pfm.energy.meters import PowerModel
from p2pfm.energy.report import energy_report, peer_figures, report_from_announcements
from p2pfm.energy.tracker import EnergyTracker
from p2pfm.model.device import describe as describe_device

log = logging.getLogger("p2pfm.peer")


def load_or_create_identity(path: Path) -> Identity:
    """Load the peer's key; create it (mode 0600) on first start."""
    if path.exists():
        return Identity.load(path)
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    identity.save(path)
    log.info("created a new key at %s (peer id %s)", path, identity.peer_id)
    return identity


@dataclass
class PeerRuntime:
    """One peer's live state around its protocol object."""

    config: PeerConfig
    protocol: PeerProtocol
    trainer: ModelAdapter
    net: PeerNetwork
    metrics: MetricsLog
    shard_index: int
    rng: np.random.Generator
    counters: Counter[str] = field(default_factory=Counter)
    book: PeerBook = field(init=False)  # what we know of the swarm, merged over lookups
    live: dict[str, Announcement] = field(default_factory=dict)
    snapshot: Snapshot = field(default_factory=Snapshot)
    snapshots: SnapshotStore = field(init=False)  # the served snapshot's file, in the work dir
    lanes: LaneServer | None = None  # the direct lane we serve state downloads on (StreamHandlers.install)
    eval_loss: float = float("nan")
    train_loss: float = float("nan")
    compute_seconds: float = 0.0
    started: float = field(default_factory=time.time)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    stop_flag: threading.Event = field(default_factory=threading.Event)  # seen by the training thread
    heard_update: asyncio.Event = field(default_factory=asyncio.Event)  # a partner's update was accepted
    background: set[asyncio.Task] = field(default_factory=set)
    sync_soon: bool = False  # set when lost peers reappear: sync at the next round
    resumed: bool = False
    certificate: bytes | None = None  # ours, presented in every announcement (admitted swarms)
    revocation_list: bytes | None = None  # the newest list we took: we re-publish it
    paused: tuple[str, float] | None = None  # (reason, since) while our energy policy pauses us
    paused_peers: list[str] = field(default_factory=list)  # others announcing paused: not partners
    energy: EnergyTracker = field(init=False)  # training windows over this device's meter (p2pfm.energy)
    power: PowerModel = field(init=False)

    def __post_init__(self) -> None:
        self.book = PeerBook(self.config.net.announce_ttl_s)
        self.snapshots = SnapshotStore(self.config.work_dir / "snapshots")
        device = next((p.device for p in self.trainer.model.parameters()), None)
        gpus = [device.index or 0] if device is not None and device.type == "cuda" else []
        self.energy, self.power = open_tracker(self.config, gpus)

    @property
    def tokens_per_sample(self) -> int:
        """Tokens in one training sample: the block size for the byte-level GPT (bytes), else 1."""
        if isinstance(self.trainer, LocalTrainer):
            return self.config.model.block_size
        return int(getattr(self.trainer, "tokens_per_sample", 1))

    def energy_claims(self) -> dict:
        """Our energy totals for the announcement, clamped to the schema's bounds (p2pfm.core.schema)."""
        t = self.energy.totals()
        return {
            "energy_wh": min(float(t.energy_wh), MAX_ENERGY_WH), "marginal_wh": min(float(t.marginal_wh), MAX_ENERGY_WH),
            "tokens": min(int(t.tokens), MAX_TOKENS), "energy_source": t.energy_source[:32],
            "grid_g_per_kwh": min(float(t.grid_g_per_kwh), MAX_GRID_G_PER_KWH),
        }  # fmt: skip

    @property
    def peer_id(self) -> str:
        return self.protocol.peer_id

    # --- the swarm as we see it ----------------------------------------------------------------
    async def refresh_live(self) -> None:
        """Merge a DHT lookup into the book, keeping only admitted peers; tell the protocol who counts."""
        now = time.time()
        admission = self.protocol.admission
        admitted: dict[str, Announcement] = {}
        for peer_id, announcement in (await self.net.lookup(now)).items():
            try:
                admission.check(peer_id, announcement.cert, now)
            except Refusal as exc:  # not admitted: counted like any foreign record, logged once a minute
                self.net.ignored_records.note(peer_id, exc, now)
                continue
            admitted[peer_id] = announcement
        self.book.merge(admitted)
        for peer_id in [p for p in self.book.known() if admission.is_revoked(p)]:
            self.book.forget(peer_id)
        # A paused peer (its energy policy) is no partner, donor or quorum member until it resumes.
        live = self.book.live(now)
        self.live = {p: a for p, a in live.items() if a.training}
        self.paused_peers = sorted(p for p, a in live.items() if not a.training)
        self.protocol.know({p: a.libp2p_id for p, a in self.book.known().items()})

    async def refresh_revocations(self, *, publish: bool) -> None:
        """Take the newest revocation list in the DHT (if it is our authority's); re-publish ours."""
        if self.protocol.admission.open:
            return
        for data in await self.net.fetch_revocations():
            try:
                if self.protocol.admission.revoke(data):
                    self.revocation_list = data
                    listed = self.protocol.admission.revocations
                    log.warning(
                        "took revocation list %d: %d peer(s) no longer admitted",
                        listed.serial if listed else -1, len(listed.revoked) if listed else 0,
                    )  # fmt: skip
            except Refusal as exc:
                self.net.ignored_records.note("revocations", exc, time.time())
        listed = self.protocol.admission.revocations
        if publish and listed is not None and self.revocation_list is not None:
            await self.net.publish_revocations(self.revocation_list, listed.serial, time.time())

    def live_rounds(self) -> dict[str, int]:
        return {p: a.round for p, a in self.live.items()}

    def sees(self) -> list[str]:
        """The libp2p ids of the live peers we see: tells joiners that we can hear them."""
        return peers_to_list(self.book.first_seen(), {p: a.libp2p_id for p, a in self.live.items()})

    def quorum_now(self) -> QuorumView:
        need = max(self.config.min_peers, 2 if self.config.net.initial_peers else 1)
        return quorum_view(self.net.libp2p_id, {p: a.sees for p, a in self.live.items()}, need)

    def announcement_payload(self) -> dict:
        return {
            "libp2p_id": self.net.libp2p_id, "maddrs": self.net.maddrs[:16], "round": self.protocol.round,
            "model_hash": self.snapshot.hash, "device_class": self.config.device_class[:64],
            "power_w": float(self.power.active_w), "state_bytes": self.snapshot.size,
            "sees": self.sees(), **({"cert": self.certificate} if self.certificate else {}),
            **({"paused": self.paused[0][:64]} if self.paused else {}),
            **self.energy_claims(),
        }  # fmt: skip

    async def announce(self) -> None:
        await self.net.announce(self.announcement_payload(), time.time())

    # --- state: snapshot and checkpoint --------------------------------------------------------
    @property
    def between_steps(self) -> bool:
        """Whether snapshots and checkpoints may read the optimizer's live tensors (no copies).

        True for the daemon's own trainer: its round driver writes them between rounds, when no
        step runs. A library user's optimizer may step in their own thread at any moment: copies.
        """
        return isinstance(self.trainer, LocalTrainer)

    def refresh_snapshot(self) -> None:
        """Write the state we serve (parameters, round, inner optimizer) to its file, hashing as it
        goes (:mod:`p2pfm.daemon.snapshots`): no full-size copy of it stays in memory."""
        round_, chunk = self.protocol.round, self.config.net.state_chunk_bytes
        params, optimizer = self.protocol.params, self.trainer.optimizer_arrays(views=self.between_steps)
        self.snapshot = self.snapshots.write(
            lambda write: write_state(write, params, round_, optimizer, chunk), round_
        )

    def _state_meta(self) -> dict:
        return {
            "round": self.protocol.round, "seq": self.protocol.seq, "peer_id": self.peer_id,
            "numel": self.protocol.learner.numel,
            "config": {
                k: v for k, v in config_to_dict(self.config).items() if k in ("run_id", "seed", "model_source", "model")
            },
        }  # fmt: skip

    def restore_checkpoint(self) -> bool:
        found = load_checkpoint(self.config.work_dir)
        if found is None:
            return False
        arrays, meta = found
        expected = {
            "run_id": self.config.run_id,
            "seed": self.config.seed,
            "model_source": self.config.model_source,
            "model": config_to_dict(self.config.model),
        }
        saved = {
            "model_source": "",
            **meta.get("config", {}),
        }  # checkpoints before model_source: the [model] GPT
        if {k: saved.get(k) for k in expected} != expected:
            raise ConfigError(
                f"work_dir: {self.config.work_dir} holds a checkpoint of another run or model ({saved}); "
                "use a fresh --work-dir or the same run_id, seed and model"
            )
        try:
            self.protocol.learner.load_state_arrays(
                {k: arrays[k] for k in ("params", "momentum", "residual", "round")}
            )
        except ValueError as exc:
            raise ConfigError(
                f"work_dir: the checkpoint in {self.config.work_dir} is unusable ({exc}); move it away to start "
                "fresh (the peer then downloads the swarm's state when it joins)"
            ) from None
        self.trainer.load_flat(self.protocol.params)
        self.trainer.load_optimizer_arrays({k: v for k, v in arrays.items() if k.startswith("opt.")})
        self.protocol.seq = max(self.protocol.seq, int(meta.get("seq", 0)) + 1)
        log.info("resumed from checkpoint at round %d", self.protocol.round)
        return True

    def write_checkpoint(self) -> None:
        arrays = {
            **self.protocol.learner.state_arrays(),
            **self.trainer.optimizer_arrays(views=self.between_steps),
        }
        save_checkpoint(self.config.work_dir, arrays, self._state_meta(), self.trainer.parameter_shapes())

    # --- reporting ---------------------------------------------------------------------------
    def log_bans(self) -> None:
        """Log each ban the protocol decided since the last call, once, with its reason."""
        for sender, reason, length in self.protocol.scores.take_decisions():
            log.warning(
                "banned %s for %.0f s: too many rejected messages (the last: %s)", sender, length, reason
            )

    def record(self, record: Record) -> None:
        self.metrics.write(as_record(record))

    def wall_time(self) -> float:
        return time.time() - self.started

    def write_status(self, quorum: dict | None = None) -> None:
        """status.json: the phase (``state``), round, live peers; ``quorum`` while joining."""
        status = {
            "peer_id": self.peer_id, "libp2p_id": self.net.libp2p_id, "maddrs": self.net.maddrs,
            "round": self.protocol.round, "live_peers": sorted(self.live), "eval_loss": self.eval_loss,
            "state": self.protocol.phase.value, "shard": self.shard_index, "pid": os.getpid(),
            "run_id": self.config.run_id, "admission": "open" if self.protocol.admission.open else "certificate",
            "device": self.compute_device, "precision": getattr(self.trainer, "precision", "fp32"),
        }  # fmt: skip
        if quorum is not None:
            status["quorum"] = quorum
        status["paused_peers"] = self.paused_peers
        if self.paused is not None:
            status["paused"] = {"reason": self.paused[0], "since": self.paused[1]}
        status["memory"] = self.memory_report()
        status["energy"] = self.energy.totals().as_dict()
        status["swarm_energy"] = self.swarm_energy()
        self.metrics.status(status)

    def swarm_energy(self) -> dict:
        """The swarm's energy report from the live peers' verified announcements, and our own totals."""
        report = report_from_announcements(self.live.values())
        rows = dict(report["per_peer"])
        claims = self.energy_claims()
        rows[self.peer_id] = peer_figures(
            claims["energy_wh"], claims["marginal_wh"], claims["tokens"], claims["energy_source"],
            claims["grid_g_per_kwh"],
        )  # fmt: skip
        return {**energy_report(rows), "unreported": report["unreported"]}

    def release_cold_pages(self) -> None:
        """Unmap the pages of the file-backed initial parameters from our resident set (they are read
        only every few rounds; :func:`p2pfm.daemon.snapshots.drop_mapped_pages`)."""
        drop_mapped_pages(self.protocol.initial_params)

    def memory_report(self) -> dict:
        """The process's RSS (now, peak) and its full-size buffers by name (p2pfm.daemon.memory)."""
        learner = self.protocol.learner
        named = {
            "gossip_anchor": learner.params, "outer_momentum": learner.momentum,
            "error_feedback_residual": learner.feedback.residual, "round_buffer": learner.scratch,
            "initial_params": self.protocol.initial_params,
        }  # fmt: skip
        report = buffer_breakdown(self.trainer.model, self.trainer.optimizer, named)
        if self.snapshot.size:  # a file, read a chunk at a time (p2pfm.daemon.snapshots): no heap copy
            report["on_disk"] = {"served_snapshot": self.snapshot.size}
            spare = self.snapshots.spare  # the replaced one, kept to be rewritten in place next round
            try:  # (a write in a worker thread may be taking it right now)
                if spare is not None:
                    report["on_disk"]["spare_snapshot"] = spare.stat().st_size
            except OSError:
                pass
        return {**process_rss(), **report, "round_buffers_allocated": learner.buffers_allocated}

    @property
    def compute_device(self) -> str:
        """Where the model computes, for status.json and logs (``cuda:0 (NVIDIA H200)``, ``cpu``)."""
        device = next((p.device for p in self.trainer.model.parameters()), None)
        return describe_device(device) if device is not None else "none"

    @property
    def phase(self) -> Phase:
        return self.protocol.phase
