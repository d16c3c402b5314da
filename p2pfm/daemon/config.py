"""The peer daemon's configuration: one frozen dataclass per component, strict loading.

A peer is configured by a TOML file (``peers/peer.example.toml``), flags, or both (flags
win). Unknown keys and bad values raise :class:`p2pfm.config.ConfigError` naming the field.
The resolved config is logged at start-up and saved in every checkpoint's metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfm.config import build_config, load_toml, require
from p2pfm.core.gossip import GossipConfig
from p2pfm.core.limits import RateLimits
from p2pfm.core.policy import PolicyConfig
from p2pfm.core.transfer import MAX_CHUNK_BYTES
from p2pfm.model.config import (
    HF_PREFIX,
    PRECISIONS,
    GPTConfig,
    InnerTrainConfig,
    check_device_spec,
    check_model_source,
)


@dataclass(frozen=True)
class TrainConfig(InnerTrainConfig):
    """Local training on this peer's shard: the inner loop (shared with the simulator) and its schedule.

    The inner-loop fields (batch size, lr, weight decay, held-out set, shard size) are
    :class:`p2pfm.model.config.InnerTrainConfig`'s; the ``[train]`` table's keys are unchanged.
    """

    eval_every: int = 1  # rounds between evaluations (0 = never)
    threads: int = 0  # torch threads; 0 = all cores (the swarm sets cores / peers)
    device: str = "auto"  # torch device: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast; weights and moments stay fp32 either way
    seq_len: int = 0  # training window (bytes, or tokens for hf:DIR); 0 = the model's whole context

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = check_device_spec(self.device)
        require(problem is None, "train.device", problem or "")
        require(self.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}")
        require(self.seq_len >= 0, "train.seq_len", "must be non-negative (0 = the model's context)")
        require(self.eval_every >= 0, "train.eval_every", "must be non-negative")
        require(self.threads >= 0, "train.threads", "must be non-negative")


@dataclass(frozen=True)
class NetConfig:
    """Discovery and transport (hivemind DHT + libp2p)."""

    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # loopback by default: opt in to exposure
    announce: tuple[str, ...] = ()  # addresses to advertise if they differ from listen (NAT, containers)
    initial_peers: tuple[str, ...] = ()  # any live peer's multiaddr; empty = start a new swarm
    announce_ttl_s: float = 15.0  # a dead peer vanishes from discovery within this (hivemind: 60 s+)
    heartbeat_s: float = 4.0  # re-announce period; well under the TTL so a live peer never lapses
    request_timeout_s: float = (
        5.0  # gossip push deadline: a dead partner costs at most this, off the compute path
    )
    # A state download (either side) ends when no chunk moved for state_stall_s, or after
    # state_timeout_s + total_bytes / state_min_rate_bps in all: the deadline scales with the
    # state's size (60 s for 1M parameters was 4 s short of a 124M state at 25 MB/s).
    state_timeout_s: float = 60.0  # fixed part of a state transfer's total deadline
    state_stall_s: float = 30.0  # no verified chunk for this long: try another donor (keeping the chunks)
    state_min_rate_bps: float = 1e6  # the slowest link a whole transfer must be allowed (bytes/s)
    state_serve_rate_bps: float = 0.0  # cap on each state upload we serve (bytes/s); 0 = none
    max_message_bytes: int = 64 << 20  # larger gossip messages are refused unread
    max_state_bytes: int = 2 << 30  # cap on a downloaded state snapshot
    state_chunk_bytes: int = 4 << 20  # chunk of the state we serve (ours; a donor's is bounded by 64 MiB)
    # The direct lane of state downloads (p2pfm.core.lane: sealed chunks over plain TCP, the signed
    # manifest still over libp2p): the TCP port we serve it on, on the listen hosts; 0 = any free
    # port (the manifest names it), -1 = no lane either way (chunks only over the libp2p stream).
    state_lane_port: int = 0

    def __post_init__(self) -> None:
        require(len(self.listen) > 0, "net.listen", "needs at least one multiaddr")
        for name, values in (
            ("net.listen", self.listen),
            ("net.announce", self.announce),
            ("net.initial_peers", self.initial_peers),
        ):
            for value in values:
                require(
                    value.startswith("/"),
                    name,
                    f"{value!r} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/31337)",
                )
        for value in self.initial_peers:
            require(
                "/p2p/" in value,
                "net.initial_peers",
                f"{value!r} lacks the /p2p/<peer id> part; copy the full address a peer prints at start",
            )
        require(self.announce_ttl_s >= 2, "net.announce_ttl_s", "must be at least 2 seconds")
        require(
            0 < self.heartbeat_s < self.announce_ttl_s,
            "net.heartbeat_s",
            "must be positive and below announce_ttl_s",
        )
        require(self.request_timeout_s > 0, "net.request_timeout_s", "must be positive")
        require(self.state_timeout_s > 0, "net.state_timeout_s", "must be positive")
        require(self.max_message_bytes >= 4096, "net.max_message_bytes", "must be at least 4096")
        require(self.max_state_bytes >= 4096, "net.max_state_bytes", "must be at least 4096")
        require(
            -1 <= self.state_lane_port <= 65535,
            "net.state_lane_port",
            "must be a TCP port, 0 for any free one, or -1 for no direct lane",
        )
        require(
            1024 <= self.state_chunk_bytes <= MAX_CHUNK_BYTES,
            "net.state_chunk_bytes",
            f"must be between 1024 and {MAX_CHUNK_BYTES}",
        )
        require(self.state_stall_s > 0, "net.state_stall_s", "must be positive")
        require(self.state_min_rate_bps > 0, "net.state_min_rate_bps", "must be positive")
        require(
            self.state_serve_rate_bps >= 0, "net.state_serve_rate_bps", "must be non-negative (0 = no cap)"
        )

    def state_deadline_s(self, total_bytes: int) -> float:
        """The whole deadline of a state transfer of ``total_bytes``: fixed part plus the floor rate."""
        return self.state_timeout_s + total_bytes / self.state_min_rate_bps


@dataclass(frozen=True)
class AdmissionConfig:
    """Who may join: holders of the swarm authority's certificates, or (explicitly) anyone.

    ``authority`` is the authority's peer id (``p2pfm keygen --out authority.key`` prints it;
    ``p2pfm admit`` signs certificates with that key). Without an authority a peer runs an
    *open* swarm: allowed on loopback (one machine) with a loud warning, and beyond it only
    with ``open = true``. See ``p2pfm.core.admission``.
    """

    authority: str = ""  # the swarm authority's peer id (p2pfm1...); "" = no authority
    cert: Path | None = None  # this peer's certificate (p2pfm admit); required with an authority
    open: bool = False  # run an open swarm beyond loopback: anyone may join (experiments only)
    revocations: Path | None = None  # a revocation list (p2pfm revoke) to publish in the DHT

    def __post_init__(self) -> None:
        if self.authority:
            require(
                self.authority.startswith("p2pfm1") and len(self.authority) == 38,
                "admission.authority",
                f"{self.authority!r} is not a peer id (p2pfm1 + 32 characters; `p2pfm id KEY` prints it)",
            )
            require(not self.open, "admission.open", "cannot be combined with an authority: choose one")
            require(
                self.cert is not None and self.cert.is_file(),
                "admission.cert",
                f"{self.cert} is not a file; an admitted peer needs its certificate "
                "(p2pfm admit --authority KEY --peer ID --out CERT)",
            )
        else:
            require(
                self.cert is None, "admission.cert", "needs admission.authority (whose certificate is it?)"
            )
        if self.revocations is not None:
            require(self.revocations.is_file(), "admission.revocations", f"{self.revocations} is not a file")


@dataclass(frozen=True)
class EnergyConfig:
    """How the peer meters its energy (``p2pfm.energy``); ``[energy]`` in the TOML file."""

    meter: str = "auto"  # auto (Zeus RAPL/NVML where readable, else the model), rapl, nvml, model
    idle_measure_s: float = 3.0  # idle baseline window at start-up, measured meters only (0 = profile idle)
    idle_w: float | None = None  # idle power for the model; None = the device profile's (or 4 W)
    powercap_root: Path | None = None  # None = $P2PFM_POWERCAP_ROOT or /sys/class/powercap

    def __post_init__(self) -> None:
        from p2pfm.energy.meters import METER_KINDS

        require(self.meter in METER_KINDS, "energy.meter", f"must be one of {', '.join(METER_KINDS)}")
        require(0 <= self.idle_measure_s <= 30, "energy.idle_measure_s", "must be in [0, 30] seconds")
        require(self.idle_w is None or self.idle_w >= 0, "energy.idle_w", "must be non-negative")


def _is_loopback(maddr: str) -> bool:
    parts = maddr.split("/")
    return len(parts) > 2 and (
        (parts[1] == "ip4" and parts[2].startswith("127.")) or (parts[1] == "ip6" and parts[2] == "::1")
    )


@dataclass(frozen=True)
class PeerConfig:
    """Everything one peer needs. All peers of a run must agree on run_id, seed and model."""

    # Ed25519 private key (PEM, mode 0600); created if missing. None = WORK_DIR/peer.key: the
    # identity belongs with the checkpoint it signed, not in whatever directory the peer was started from.
    key: Path | None = None
    work_dir: Path = Path("p2pfm-peer")  # checkpoint, metrics.jsonl, status.json
    run_id: str = "p2pfm-default"  # swarm name: messages of other runs are refused
    seed: int = 0  # run seed: identical initial weights on every peer
    rounds: int = 0  # stop after this round (0 = run until stopped)
    data: Path | None = None  # folder of text files, or one text file; default: this machine's Python stdlib
    shard: int = -1  # which shard to train on; -1 = derived from the peer id
    num_shards: int = 8
    device_class: str = "cpu-host"  # energy profile name, announced (energy accounting); not the torch device
    power_w: float | None = (
        None  # active power (W) for the energy model; None = the device profile's (or 15 W)
    )
    grid_g_per_kwh: float = 475.0  # grid carbon intensity (world average, codecarbon table)
    checkpoint_every: int = 1  # rounds between checkpoints
    min_peers: int = 1  # wait until this many peers (us included) are live before training
    min_peers_timeout_s: float = 300.0  # ... but no longer than this: then train with whoever is there
    final_drain_s: float = 30.0  # after the last round, wait at most this for slower peers' last updates
    # What to train: "" = the built-in GPT sized by [model]; a preset name (p2pfm.model.config.GPT_PRESETS,
    # which then sets [model]); or "hf:DIR", a local Hugging Face causal LM (p2pfm.model.hf).
    model_source: str = ""
    model: GPTConfig = field(default_factory=GPTConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    net: NetConfig = field(default_factory=NetConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    limits: RateLimits = field(default_factory=RateLimits)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # energy policy: when this device trains
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    @property
    def open_swarm(self) -> bool:
        """Whether anyone may join (no authority): loopback-only peers, or ``admission.open``."""
        return not self.admission.authority

    def __post_init__(self) -> None:
        if self.key is None:  # resolved here so that every user of the config sees one real path
            object.__setattr__(self, "key", self.work_dir / "peer.key")
        require(
            0 < len(self.run_id) <= 64 and self.run_id.isprintable(),
            "run_id",
            "must be 1-64 printable characters",
        )
        require(self.rounds >= 0, "rounds", "must be non-negative")
        require(self.num_shards >= 1, "num_shards", "must be at least 1")
        require(
            -1 <= self.shard < self.num_shards, "shard", f"must be -1 (auto) or in [0, {self.num_shards})"
        )
        require(self.power_w is None or self.power_w >= 0, "power_w", "must be non-negative")
        require(self.grid_g_per_kwh >= 0, "grid_g_per_kwh", "must be non-negative")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
        require(self.min_peers >= 1, "min_peers", "must be at least 1")
        require(self.min_peers_timeout_s >= 0, "min_peers_timeout_s", "must be non-negative")
        require(self.final_drain_s >= 0, "final_drain_s", "must be non-negative")
        require(
            bool(self.admission.authority) or self.admission.open or all(map(_is_loopback, self.net.listen)),
            "admission",
            f"this peer listens beyond loopback ({', '.join(self.net.listen)}) with no swarm authority: "
            "anyone could join and feed it updates. Pass --authority ID --cert FILE (make them with "
            "`p2pfm keygen` and `p2pfm admit`; `p2pfm swarm` does it for you), or --open for an open "
            "experimental swarm",
        )
        if self.policy.carbon_schedule:  # fail fast: a bad schedule names its line now, not at first check
            from p2pfm.daemon.readings import load_schedule

            load_schedule(self.policy.carbon_schedule)
        if self.policy.readings:
            require(
                Path(self.policy.readings).parent.is_dir(),
                "policy.readings",
                f"{self.policy.readings}: its folder does not exist",
            )
        # A preset's geometry becomes self.model, so every reader of the config (checkpoints too) sees it.
        object.__setattr__(self, "model", check_model_source(self.model_source, self.model))
        if self.model_source.startswith(HF_PREFIX):
            hf_dir = Path(self.model_source[len(HF_PREFIX) :])
            require(
                hf_dir.is_dir(),
                "model_source",
                f"{hf_dir} is not a directory; hf:DIR names a local Hugging Face model folder "
                "(config.json, model.safetensors, tokenizer files)",
            )
        if self.data is not None:
            require(
                self.data.exists(),
                "data",
                f"{self.data} does not exist; give a folder of text files or one text file",
            )


def _set_nested(values: dict[str, Any], dotted: str, value: Any) -> None:
    node = values
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def load_peer_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> PeerConfig:
    """Read the TOML file (if any), apply ``overrides`` (dotted keys -> values), validate."""
    values: dict[str, Any] = load_toml(path) if path else {}
    for dotted, value in overrides.items():
        if value is not None:
            _set_nested(values, dotted, value)
    source, table = values.get("model_source"), values.get("model")
    if isinstance(source, str) and isinstance(table, dict):
        check_model_source(source, GPTConfig(), table)  # keys written out, even those equal to a default
    return build_config(PeerConfig, values)
