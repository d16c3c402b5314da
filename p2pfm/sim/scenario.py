"""Scenario files: frozen dataclasses built strictly from TOML (unknown keys are errors).

A scenario names everything a run depends on besides the seed: the swarm size and length,
the workload, the gossip knobs (the daemon's own :class:`~p2pfm.core.gossip.GossipConfig`),
churn, devices and the energy model. :func:`load_scenario` reads a TOML file through
:func:`p2pfm.config.build_config`, so every error names its field (``churn.fraction: must
be in [0, 1)``). Relative paths (``churn.trace``) are resolved against the scenario file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from p2pfm.config import ConfigError, build_config, load_toml, require
from p2pfm.core.attacks import DEFAULT_SCALE, UPDATE_ATTACKS
from p2pfm.core.gossip import GossipConfig, future_window
from p2pfm.model.config import GPTConfig, InnerTrainConfig
from p2pfm.sim.policy_model import SimPolicyConfig

DEFAULT_DIURNAL_CURVE: tuple[float, ...] = (
    # Online probability by local hour 0..23. Shape after Berta, Bilicki & Jelasity (P2P 2014),
    # BRIEF s7: ~35% at night (phones charging), ~16% in the afternoon, ~23% on average.
    0.35, 0.36, 0.36, 0.35, 0.34, 0.31,  # 00-05: night, charging
    0.27, 0.22, 0.19, 0.18, 0.17, 0.17,  # 06-11: morning, unplugged
    0.16, 0.16, 0.16, 0.16, 0.17, 0.18,  # 12-17: afternoon minimum
    0.19, 0.20, 0.22, 0.25, 0.29, 0.33,  # 18-23: evening, back on chargers
)  # fmt: skip


# Bounds of churn.trace_time_scale: 1e-9 maps 30 years of trace onto one virtual second, 1e6
# stretches one trace second over 11 days; beyond either, intervals lose their meaning to rounding.
TRACE_TIME_SCALE_MIN = 1e-9
TRACE_TIME_SCALE_MAX = 1e6


@dataclass(frozen=True)
class MLPConfig:
    """The fast workload: a one-hidden-layer MLP on a seeded Gaussian-mixture task (numpy)."""

    features: int = 32  # input dimension; with hidden 64 and 10 classes: 2,762 parameters
    hidden: int = 64
    classes: int = 10
    clusters_per_class: int = 2  # each class is a mixture, so a linear model cannot solve it
    separation: float = 0.5  # distance scale of cluster centres; lower = harder task, higher loss floor
    noise: float = 1.0  # per-feature standard deviation around a centre
    samples_per_peer: int = 200  # local shard size (mean, Dirichlet shards vary)
    eval_samples: int = 500  # shared held-out set every peer is evaluated on
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5  # class skew for partition = "dirichlet" (0.1 = very skewed)
    batch_size: int = 32
    lr: float = 0.1  # local SGD step size

    def __post_init__(self) -> None:
        for name in (
            "features",
            "hidden",
            "classes",
            "clusters_per_class",
            "samples_per_peer",
            "eval_samples",
            "batch_size",
        ):
            require(getattr(self, name) >= 1, f"workload.mlp.{name}", "must be at least 1")
        require(self.classes >= 2, "workload.mlp.classes", "must be at least 2")
        require(self.separation > 0, "workload.mlp.separation", "must be positive")
        require(self.noise > 0, "workload.mlp.noise", "must be positive")
        require(self.dirichlet_alpha > 0, "workload.mlp.dirichlet_alpha", "must be positive")
        require(self.lr > 0, "workload.mlp.lr", "must be positive")


@dataclass(frozen=True)
class GPTWorkloadConfig:
    """The daemon's byte-level GPT (p2pfm.model) on this machine's stdlib, for small swarms.

    ``model`` and ``train`` are the peer's own ``[model]`` and ``[train]`` tables (the inner
    loop's part), defaults included, so a simulated peer builds and steps exactly as a live
    one; a scenario says where it shrinks them (``sim/scenarios/gpt8-*.toml`` run ~35k
    parameters). A table sets the fields it names and the others keep the daemon's defaults:
    ``[workload.gpt.model]`` with only ``n_layer = 2`` still has ``n_embd = 128``.
    """

    model: GPTConfig = field(default_factory=GPTConfig)
    train: InnerTrainConfig = field(default_factory=InnerTrainConfig)
    data: str = ""  # folder of text files; empty = the Python stdlib (BRIEF s1)

    def __post_init__(self) -> None:
        # A live peer may skip evaluation; the simulator's loss figures are this held-out set.
        require(
            self.train.eval_batches >= 1,
            "workload.gpt.train.eval_batches",
            "must be at least 1 in the simulator",
        )


@dataclass(frozen=True)
class WorkloadConfig:
    kind: Literal["mlp", "gpt"] = "mlp"
    mlp: MLPConfig = field(default_factory=MLPConfig)
    gpt: GPTWorkloadConfig = field(default_factory=GPTWorkloadConfig)


ChurnModel = Literal["none", "exponential", "diurnal", "trace", "fraction"]


@dataclass(frozen=True)
class ChurnConfig:
    """Who is online when. Each model uses only its own fields; the others are ignored."""

    model: ChurnModel = "none"
    # exponential: alternating sessions, Exp(mean_online_s) online then Exp(mean_offline_s) offline.
    mean_online_s: float = 600.0
    mean_offline_s: float = 300.0
    # fraction: every `every_rounds` rounds, `fraction` of the peers leave at random times within
    # the window and come back `offline_rounds` rounds later with stale state (the target).
    fraction: float = 0.3
    every_rounds: int = 10
    offline_rounds: int = 0  # 0 = every_rounds
    # diurnal: online probability by local hour; peers spread over `timezone_spread_h` hours.
    diurnal_curve: tuple[float, ...] = DEFAULT_DIURNAL_CURVE
    mean_session_s: float = 7200.0  # BRIEF s7: mean session ~2 h (median ~30 min)
    day_length_s: float = 86400.0  # shrink to compress a day into a short run
    timezone_spread_h: int = 24
    # trace: CSV of online intervals `device,start_s,end_s`, devices mapped round-robin onto peers.
    trace: str = ""
    # Virtual seconds per trace second, as day_length_s compresses the diurnal day: traces are
    # in real seconds and runs last tens of virtual seconds, so a week-long trace at 1.0 would
    # replay only its first minutes. Run length / trace span (e.g. 100 / 604800) replays all of it.
    trace_time_scale: float = 1.0

    def __post_init__(self) -> None:
        require(self.mean_online_s > 0, "churn.mean_online_s", "must be positive")
        require(self.mean_offline_s > 0, "churn.mean_offline_s", "must be positive")
        require(0.0 <= self.fraction < 1.0, "churn.fraction", "must be in [0, 1)")
        require(self.every_rounds >= 1, "churn.every_rounds", "must be at least 1")
        require(self.offline_rounds >= 0, "churn.offline_rounds", "must be non-negative")
        require(
            len(self.diurnal_curve) == 24,
            "churn.diurnal_curve",
            f"needs 24 hourly values, got {len(self.diurnal_curve)}",
        )
        require(
            all(0.0 < p < 1.0 for p in self.diurnal_curve), "churn.diurnal_curve", "values must be in (0, 1)"
        )
        require(self.mean_session_s > 0, "churn.mean_session_s", "must be positive")
        require(self.day_length_s > 0, "churn.day_length_s", "must be positive")
        require(0 <= self.timezone_spread_h <= 24, "churn.timezone_spread_h", "must be in [0, 24]")
        require(
            self.model != "trace" or bool(self.trace), "churn.trace", 'is required when churn.model = "trace"'
        )
        require(
            math.isfinite(self.trace_time_scale)
            and TRACE_TIME_SCALE_MIN <= self.trace_time_scale <= TRACE_TIME_SCALE_MAX,
            "churn.trace_time_scale",
            f"must be a finite number in [{TRACE_TIME_SCALE_MIN:g}, {TRACE_TIME_SCALE_MAX:g}] "
            f"(virtual seconds per trace second), got {self.trace_time_scale!r}",
        )


@dataclass(frozen=True)
class DeviceOverride:
    """Any field of a device profile, replaced for this scenario."""

    gflops: float | None = None
    step_overhead_s: float | None = None
    up_mbps: float | None = None
    down_mbps: float | None = None
    latency_ms: float | None = None
    active_w: float | None = None
    idle_w: float | None = None
    wall_factor: float | None = None


@dataclass(frozen=True)
class DevicesConfig:
    # Share of peers per device class (normalised); names from p2pfm/sim/data/devices.toml.
    mix: dict[str, float] = field(
        default_factory=lambda: {
            "raspberry_pi_4": 0.25,
            "raspberry_pi_5": 0.15,
            "jetson_orin_nano": 0.1,
            "phone": 0.3,
            "laptop": 0.2,
        }
    )
    overrides: dict[str, DeviceOverride] = field(default_factory=dict)
    profiles: str = ""  # another devices TOML file; empty = the shipped one

    def __post_init__(self) -> None:
        require(len(self.mix) > 0, "devices.mix", "needs at least one device class")
        require(all(w >= 0 for w in self.mix.values()), "devices.mix", "weights must be non-negative")
        require(sum(self.mix.values()) > 0, "devices.mix", "weights must not all be zero")


@dataclass(frozen=True)
class EnergyConfig:
    """Energy and carbon model; every default is documented in p2pfm/sim/energy.py."""

    country: str = "WORLD"  # key into grid_g_per_kwh
    grid_g_per_kwh: dict[str, float] = field(default_factory=dict)  # extra/overriding country values
    network_nj_per_byte: float = 20.0  # per byte sent and per byte received (see energy.py)
    # The datacentre baseline (p2pfm/energy/datacenter.py, every default sourced there): an A100
    # whose utilisation falls with model size, times PUE, plus embodied carbon per GPU-hour.
    datacenter_pue: float = 1.2
    datacenter_country: str = "WORLD"
    datacenter_peak_tflops: float = 312.0
    datacenter_tdp_w: float = 400.0
    datacenter_idle_w: float = 60.0
    datacenter_plateau_mfu: float = 0.45
    datacenter_ops_per_step: int = 200
    datacenter_op_overhead_s: float = 10e-6
    datacenter_embodied_g_per_gpu_hour: float = 10.0

    def __post_init__(self) -> None:
        require(self.network_nj_per_byte >= 0, "energy.network_nj_per_byte", "must be non-negative")
        require(self.datacenter_pue >= 1.0, "energy.datacenter_pue", "must be at least 1")
        require(self.datacenter_peak_tflops > 0, "energy.datacenter_peak_tflops", "must be positive")
        require(
            0 <= self.datacenter_idle_w <= self.datacenter_tdp_w,
            "energy.datacenter_idle_w",
            "must be in [0, tdp_w]",
        )
        require(0 < self.datacenter_plateau_mfu <= 1, "energy.datacenter_plateau_mfu", "must be in (0, 1]")
        require(self.datacenter_ops_per_step >= 0, "energy.datacenter_ops_per_step", "must be non-negative")
        require(self.datacenter_op_overhead_s >= 0, "energy.datacenter_op_overhead_s", "must be non-negative")
        require(
            self.datacenter_embodied_g_per_gpu_hour >= 0,
            "energy.datacenter_embodied_g_per_gpu_hour",
            "must be non-negative",
        )
        require(
            all(v >= 0 for v in self.grid_g_per_kwh.values()),
            "energy.grid_g_per_kwh",
            "values must be non-negative",
        )


PROTOCOL_ATTACKS: dict[str, str] = {
    "stale_replay": "resends its own first update, sealed anew with the current round",
    "many_rounds": "sends `rounds_per_round` updates claiming different rounds in each round of its own",
}
"""Attacks on the protocol rather than the vector (the simulator's engine plays them), name -> what."""

SIM_ATTACKS: tuple[str, ...] = (*UPDATE_ATTACKS, *PROTOCOL_ATTACKS)
"""Every ``byzantine.attack`` the simulator plays: the update attacks of p2pfm.core.attacks first."""

MAX_ROUNDS_PER_ROUND = 64  # many_rounds: more claims than this only cost the simulator time


@dataclass(frozen=True)
class ByzantineConfig:
    """Byzantine peers: which share of the swarm, and what they send instead of honest updates.

    Which peers are Byzantine follows from the scenario's seed alone (a prefix of one seeded
    permutation, so the attackers at 10 % are among those at 20 %). They run the same
    :class:`~p2pfm.core.protocol.PeerProtocol` as everyone (their own model trains honestly and
    they serve honest state and syncs); only the tensor of the updates they send is forged,
    encoded with the scenario's codec. Results report honest peers only.
    """

    fraction: float = 0.0  # share of the peers that are Byzantine; below one half, or no rule can help
    attack: str = "sign_flip"  # a name in p2pfm.core.attacks.UPDATE_ATTACKS or PROTOCOL_ATTACKS
    scale: float | None = None  # the attack's strength; None = DEFAULT_SCALE (many_rounds: of `forge`)
    forge: str = "sign_flip"  # many_rounds only: the update attack whose vector every claim carries
    rounds_per_round: int = 8  # many_rounds only: round claims per round (8 = max_round_lag, the default)

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.fraction) and 0.0 <= self.fraction < 0.5,
            "byzantine.fraction",
            f"must be in [0, 0.5), got {self.fraction!r}",
        )
        require(
            self.attack != "drain",
            "byzantine.attack",
            "'drain' needs the end-of-run drain, which the simulator does not model "
            "(every peer stops at the last round's deadline)",
        )
        require(
            self.attack in SIM_ATTACKS,
            "byzantine.attack",
            f"must be one of {', '.join(SIM_ATTACKS)}, got {self.attack!r}",
        )
        require(
            self.scale is None or (math.isfinite(self.scale) and self.scale > 0),
            "byzantine.scale",
            f"must be a finite positive number, got {self.scale!r}",
        )
        require(
            self.forge in UPDATE_ATTACKS,
            "byzantine.forge",
            f"must be one of {', '.join(UPDATE_ATTACKS)}, got {self.forge!r}",
        )
        require(
            1 <= self.rounds_per_round <= MAX_ROUNDS_PER_ROUND,
            "byzantine.rounds_per_round",
            f"must be in [1, {MAX_ROUNDS_PER_ROUND}], got {self.rounds_per_round!r}",
        )

    @property
    def resolved_scale(self) -> float:
        """``scale``, or the default strength of the attack (stale_replay: 1, the update as it was)."""
        if self.scale is not None:
            return self.scale
        if self.attack == "stale_replay":
            return 1.0
        return DEFAULT_SCALE[self.forge if self.attack == "many_rounds" else self.attack]

    def count(self, peers: int) -> int:
        """How many of ``peers`` are Byzantine: the nearest whole number (always leaves one honest)."""
        return math.floor(self.fraction * peers + 0.5)


@dataclass(frozen=True)
class Scenario:
    """One simulated experiment. ``p2pfm sim FILE.toml`` runs it; the seed may be overridden."""

    name: str
    peers: int
    rounds: int
    description: str = ""
    seed: int = 0
    round_seconds: float = 0.0  # round deadline; 0 = auto: the slowest device's compute + send, x1.25
    eval_every: int = 10  # rounds between full evaluations (loss of every live peer)
    target_loss: float | None = None  # for time_to_target_s
    catchup_tolerance: float = 0.02  # a rejoined peer is caught up within 2% of the live mean loss
    catchup_sample: int = 32  # live peers evaluated per round as the reference for catch-up
    view_size: int = 32  # live peers a peer learns from the DHT per round (0 = all of them)
    verify_signatures: bool = True  # sign with Ed25519 and verify; false = unsigned bytes of equal size
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    churn: ChurnConfig = field(default_factory=ChurnConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    byzantine: ByzantineConfig | None = None  # [byzantine]; none = every peer is honest
    policy: SimPolicyConfig | None = None  # [policy]: energy policies (p2pfm.sim.policy_model); none = always
    base_dir: str = ""  # directory relative paths are resolved against (set by load_scenario)

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(self.peers >= 2, "peers", "must be at least 2")
        require(self.rounds >= 1, "rounds", "must be at least 1")
        require(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        require(
            math.isfinite(self.round_seconds) and self.round_seconds >= 0,
            "round_seconds",
            "must be >= 0 (0 = auto)",
        )
        require(self.eval_every >= 1, "eval_every", "must be at least 1")
        require(self.target_loss is None or self.target_loss > 0, "target_loss", "must be positive")
        require(self.catchup_tolerance > 0, "catchup_tolerance", "must be positive")
        require(self.catchup_sample >= 1, "catchup_sample", "must be at least 1")
        require(self.view_size >= 0, "view_size", "must be non-negative")
        if self.byzantine is not None and self.byzantine.attack == "many_rounds":
            # Claims beyond the receivers' future window are ignored unread: not the attack meant.
            window = future_window(self.gossip)
            require(
                self.byzantine.rounds_per_round <= window + 1,
                "byzantine.rounds_per_round",
                f"must be at most {window + 1}: receivers ignore rounds more than {window} ahead",
            )

    def resolve(self, path: str) -> Path:
        """A path from the scenario, relative to the scenario file's directory."""
        candidate = Path(path)
        return candidate if candidate.is_absolute() else Path(self.base_dir or ".") / candidate

    def with_changes(self, **changes: Any) -> Scenario:
        return dataclasses.replace(self, **changes)


def scenario_from_dict(values: dict[str, Any], *, base_dir: str | Path = "") -> Scenario:
    """Build and validate a scenario from a parsed TOML table."""
    if "base_dir" in values:
        raise ConfigError("base_dir: is set from the scenario file's location, not in the file")
    scenario = build_config(Scenario, values)
    return dataclasses.replace(scenario, base_dir=str(base_dir))


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file; errors name the file and the field."""
    path = Path(path)
    values = load_toml(path)
    try:
        return scenario_from_dict(values, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
