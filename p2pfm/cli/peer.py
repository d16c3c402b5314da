"""``p2pfm peer``: run the peer daemon on this device.

Flags override the TOML config; every flag maps to one config field (dotted name shown in
``--help``), so the two ways of configuring a peer cannot drift apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def sync_every_value(text: str) -> int | str:
    """``--sync-every``: the word auto or a number of rounds."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "auto" or an integer, got {text!r}') from None


class PolicyRules(tuple):
    """``--policy``'s rules; printed back as the flag's text (``p2pfm swarm`` passes it on to peers)."""

    def __str__(self) -> str:
        return ",".join(self)


def policy_rules(text: str) -> PolicyRules:
    """``--policy``: comma-separated rule names (checked by the config)."""
    return PolicyRules(rule.strip() for rule in text.split(",") if rule.strip())


# flag -> (config field, type, help)
PEER_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--key": ("key", Path, "Ed25519 key file (created with mode 0600 if missing; default WORK_DIR/peer.key)"),
    "--work-dir": ("work_dir", Path, "checkpoint, metrics.jsonl and status.json go here"),
    "--run-id": ("run_id", str, "swarm name; all peers of a run must agree"),
    "--seed": ("seed", int, "run seed (identical initial weights on every peer)"),
    "--rounds": ("rounds", int, "stop after this round (0 = until stopped)"),
    "--data": (
        "data",
        Path,
        "folder of text files, or one text file (default: this machine's Python stdlib)",
    ),
    "--model": (
        "model_source",
        str,
        "what to train: a preset of the byte-level GPT ({presets}); hf:DIR, a local Hugging Face causal LM "
        "(safetensors; needs pip install -e '.[hf]'); default: the [model] table",
    ),
    "--shard": ("shard", int, "shard index to train on (-1 = derived from the peer id)"),
    "--num-shards": ("num_shards", int, "number of shards the corpus is split into"),
    "--min-peers": ("min_peers", int, "train once this many peers (us included) can hear each other"),
    "--min-peers-timeout": (
        "min_peers_timeout_s",
        float,
        "give up waiting for --min-peers after this many seconds",
    ),
    "--device-class": ("device_class", str, "device class (energy profile name), announced to others"),
    "--power-w": ("power_w", float, "active power in W for the energy model (default: the device profile's)"),
    "--energy-meter": (
        "energy.meter",
        str,
        "auto (Zeus RAPL/NVML where readable, else the model), rapl, nvml, model",
    ),
    "--idle-measure-s": (
        "energy.idle_measure_s",
        float,
        "idle baseline window at start-up, measured meters (0-30 s)",
    ),
    "--inner-steps": ("gossip.inner_steps", int, "local AdamW steps per round (H)"),
    "--fanout": ("gossip.fanout", int, "peers each update is pushed to"),
    "--codec": ("gossip.codec.name", str, "update codec: {codecs}"),
    "--topk-fraction": ("gossip.codec.topk_fraction", float, "fraction of entries topk keeps"),
    "--aggregation": ("gossip.aggregation", str, "how own and received updates are merged: {aggregations}"),
    "--trim-fraction": ("gossip.trim_fraction", float, "share trimmed_mean drops at each end, at least one"),
    "--sync-every": (
        "gossip.sync_every",
        sync_every_value,
        'rounds between parameter syncs with a random peer: "auto" (by swarm size) or N (0 = never)',
    ),
    "--batch-size": ("train.batch_size", int, "sequences per inner step"),
    "--lr": ("train.lr", float, "inner AdamW learning rate"),
    "--threads": ("train.threads", int, "torch threads (0 = all cores)"),
    "--device": (
        "train.device",
        str,
        "where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps",
    ),
    "--seq-len": ("train.seq_len", int, "training window in bytes/tokens (0 = the model's whole context)"),
    "--precision": (
        "train.precision",
        str,
        "fp32, or bf16/fp16 autocast (weights and optimizer state stay fp32, so any peer adopts them)",
    ),
    "--eval-batches": ("train.eval_batches", int, "held-out batches per evaluation"),
    "--eval-every": ("train.eval_every", int, "rounds between evaluations (0 = never)"),
    "--n-layer": ("model.n_layer", int, "transformer blocks"),
    "--n-embd": ("model.n_embd", int, "embedding width"),
    "--n-head": ("model.n_head", int, "attention heads"),
    "--block-size": ("model.block_size", int, "context length in bytes"),
    "--announce-ttl": ("net.announce_ttl_s", float, "seconds a DHT announcement lives without refresh"),
    "--policy": (
        "policy.rules",
        policy_rules,
        "energy policy: always, or rules that must all allow: plugged-in, idle-only, carbon-aware (comma-separated)",
    ),
    "--idle-threshold": (
        "policy.idle_threshold",
        float,
        "idle-only: pause while other processes use more CPU share",
    ),
    "--carbon-threshold": (
        "policy.carbon_threshold",
        float,
        "carbon-aware: train while the grid is at most this g/kWh",
    ),
    "--carbon-schedule": (
        "policy.carbon_schedule",
        str,
        "carbon-aware: file of 24 lines HOUR,G_PER_KWH (local time)",
    ),
    "--region": (
        "policy.region",
        str,
        "carbon-aware without a schedule: the region's annual mean (e.g. DEU, FRA)",
    ),
    "--policy-readings": (
        "policy.readings",
        str,
        "test/debug: a JSON file of reading overrides, re-read at every policy check",
    ),
    "--state-chunk-bytes": ("net.state_chunk_bytes", int, "chunk size of the state we serve to joiners"),
    "--state-stall": (
        "net.state_stall_s",
        float,
        "seconds without a state chunk before another donor is tried",
    ),
    "--state-lane-port": (
        "net.state_lane_port",
        int,
        "TCP port of the direct, sealed lane for state downloads (0 = any free port, -1 = no lane)",
    ),
    "--state-serve-rate": (
        "net.state_serve_rate_bps",
        float,
        "cap on each state upload we serve, bytes/s (0 = none)",
    ),
    "--authority": (
        "admission.authority",
        str,
        "the swarm authority's peer id: only peers it certified count",
    ),
    "--cert": ("admission.cert", Path, "this peer's certificate from the authority (p2pfm admit)"),
    "--revocations": (
        "admission.revocations",
        Path,
        "a revocation list (p2pfm revoke) to publish in the DHT",
    ),
}
BOOL_FLAGS: dict[str, tuple[str, str]] = {
    "--open": (
        "admission.open",
        "run an OPEN swarm beyond loopback: anyone may join and send updates (experiments only)",
    ),
}
LIST_FLAGS: dict[str, tuple[str, str]] = {
    "--listen": ("net.listen", "multiaddr(s) to listen on (default /ip4/127.0.0.1/tcp/0)"),
    "--announce": ("net.announce", "multiaddr(s) to advertise instead of the listen ones"),
    "--initial-peers": ("net.initial_peers", "multiaddr(s) of any live peer(s) to join through"),
}


class RegistryHelpFormatter(argparse.HelpFormatter):
    """Fills ``{codecs}``, ``{aggregations}`` and ``{presets}`` in flag help with the registered names, when help is shown.

    The registries live in the numpy-based core: reading them while building the parser would make
    every ``p2pfm`` command, ``--help`` included, pay numpy's import (~0.1 s), so only help does.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and "{presets}" in text:
            from p2pfm.model.config import describe_presets

            text = text.replace("{presets}", describe_presets())
        if text and ("{codecs}" in text or "{aggregations}" in text):
            from p2pfm.core.aggregation import AGGREGATIONS
            from p2pfm.core.codecs import CODECS

            text = text.replace("{codecs}", ", ".join(CODECS))
            text = text.replace("{aggregations}", ", ".join(AGGREGATIONS))
        return text


def add_peer_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Declare the training/network flags; the swarm reuses them to pass through to peers."""
    parser.formatter_class = RegistryHelpFormatter  # the codec and aggregation help list the registries
    for flag, (field, kind, text) in PEER_FLAGS.items():
        if flag not in skip:
            parser.add_argument(flag, type=kind, default=None, help=f"{text} [{field}]")
    for flag, (field, text) in LIST_FLAGS.items():
        if flag not in skip:
            parser.add_argument(flag, nargs="+", default=None, metavar="MULTIADDR", help=f"{text} [{field}]")
    for flag, (field, text) in BOOL_FLAGS.items():
        if flag not in skip:
            parser.add_argument(flag, action="store_true", default=None, help=f"{text} [{field}]")


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Dotted config keys for every flag the user gave."""
    overrides: dict[str, object] = {}
    for flag, (field, *_rest) in {**PEER_FLAGS, **LIST_FLAGS, **BOOL_FLAGS}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides[field] = str(value) if isinstance(value, Path) else value
    return overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "peer",
        help="run a peer daemon (train, gossip, checkpoint)",
        description="Run one p2pfm peer: joins the swarm through --initial-peers (or starts one), "
        "trains on its shard, gossips signed compressed updates, checkpoints atomically. "
        "Ctrl-C leaves gracefully; a restart resumes from the checkpoint.",
    )
    parser.add_argument("--config", type=Path, help="TOML config (see peers/peer.example.toml)")
    add_peer_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from p2pfm.daemon.config import load_peer_config

    config = load_peer_config(args.config, overrides_from_args(args))  # fail fast, before heavy imports
    from p2pfm.daemon.peer import run_peer

    return run_peer(config)
