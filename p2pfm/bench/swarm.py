"""``p2pfm bench swarm``: what a local swarm spends its wall time on, and how well it shares a machine.

Runs a real local swarm (``p2pfm.swarm``) and, in the same invocation, a single process
training the same model with all cores. Reports, from the peers' own per-round metrics:

- bits per parameter per round on the wire (updates, syncs, total);
- the share of each peer's round time spent in compute (inner steps), in gossip
  (compress + sign + push scheduling + verify/decode/merge + sync), in evaluation, and the rest;
- swarm efficiency: samples/s trained by all peers together over samples/s of one process
  alone on the same machine (BRIEF target: >= 90 %, hivemind: about a third).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SwarmBenchConfig:
    peers: int = 3
    rounds: int = 15
    inner_steps: int = 10
    batch_size: int = 16
    single_seconds: float = 30.0  # how long the one-process baseline trains
    seed: int = 0
    out_dir: Path | None = None


def single_process_rate(config: SwarmBenchConfig) -> float:
    """Samples/s of the default model trained by one process with every core, on shard 0."""
    import torch

    from p2pfm.daemon.trainer import LocalTrainer
    from p2pfm.model.data import ByteDataset, ShardSpec
    from p2pfm.model.gpt import GPTConfig, build_model

    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        model_config = GPTConfig()
        dataset = ByteDataset(None, ShardSpec(0, config.peers), block_size=model_config.block_size)
        trainer = LocalTrainer(
            build_model(model_config, config.seed),
            dataset,
            lr=3e-3,
            weight_decay=0.0,
            batch_size=config.batch_size,
            seed=config.seed,
            eval_batches=0,
            eval_batch_size=1,
        )
        trainer.train_steps(2)  # warm-up: allocator and kernels
        start, samples = time.perf_counter(), 0
        while time.perf_counter() - start < config.single_seconds:
            samples += trainer.train_steps(config.inner_steps).samples
        return samples / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def swarm_breakdown(out_dir: Path) -> dict[str, Any]:
    """Time shares and throughput from the peers' metrics files."""
    from p2pfm.daemon.metrics import read_metrics

    compute = gossip = evaluation = total = 0.0
    samples, first_start, last_end = 0, float("inf"), 0.0
    for metrics_path in sorted(out_dir.glob("peer-*/metrics.jsonl")):
        rounds = [r for r in read_metrics(metrics_path) if r.get("event") == "round"]
        if not rounds:
            continue
        compute += sum(r["round_seconds"] - r["gossip_seconds"] - r["eval_seconds"] for r in rounds)
        gossip += sum(r["gossip_seconds"] for r in rounds)
        evaluation += sum(r["eval_seconds"] for r in rounds)
        total += sum(r["round_seconds"] for r in rounds)
        samples += rounds[-1]["samples"]
        first_start = min(first_start, rounds[0]["time"] - rounds[0]["round_seconds"])
        last_end = max(last_end, rounds[-1]["time"])
    training_wall = max(last_end - first_start, 1e-9)
    return {
        "compute_share": compute / total if total else None,
        "gossip_share": gossip / total if total else None,
        "eval_share": evaluation / total if total else None,
        "swarm_samples": samples,
        "swarm_training_wall_s": training_wall,
        "swarm_samples_per_s": samples / training_wall,
    }


def run_swarm_bench(config: SwarmBenchConfig, progress: bool = True) -> dict[str, Any]:
    from p2pfm.swarm import SwarmOptions, run_swarm

    out_dir = config.out_dir or Path(tempfile.mkdtemp(prefix="p2pfm-bench-swarm-"))
    before = single_process_rate(config)
    summary = run_swarm(
        SwarmOptions(
            peers=config.peers,
            rounds=config.rounds,
            out_dir=out_dir / "swarm",
            seed=config.seed,
            run_id="bench-swarm",
            progress=progress,
            peer_args=("--inner-steps", str(config.inner_steps), "--batch-size", str(config.batch_size)),
        )
    )
    breakdown = swarm_breakdown(out_dir / "swarm")
    # Measured right after the swarm, on the same machine; run before it too and average, so
    # that load from anything else running drifts into both sides alike.
    single_rate = (before + single_process_rate(config)) / 2
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "cores": os.cpu_count(),
        "params": summary["params"],
        "bits_per_param_per_round": summary["bits_per_param_per_round"],
        "update_bits_per_param_per_round": summary["update_bits_per_param_per_round"],
        "sync_bits_per_param_per_round": summary["sync_bits_per_param_per_round"],
        "final_eval_loss": summary["final_eval_loss"],
        "consensus_distance": summary["consensus_distance"],
        **breakdown,
        "single_samples_per_s": single_rate,
        "swarm_efficiency": breakdown["swarm_samples_per_s"] / single_rate if single_rate else None,
    }
    (out_dir / "bench_swarm.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def format_report(result: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f} %"

    return "\n".join(
        [
            f"p2pfm bench swarm: {result['config']['peers']} peers x {result['config']['rounds']} rounds, "
            f"{result['params']:,} params, {result['cores']} cores",
            f"  bits/param/round      {result['bits_per_param_per_round']:.3f} "
            f"(updates {result['update_bits_per_param_per_round']:.3f}, syncs {result['sync_bits_per_param_per_round']:.3f})",
            f"  round time: compute   {pct(result['compute_share'])}",
            f"              gossip    {pct(result['gossip_share'])}  (compress, sign, push, verify, merge, sync)",
            f"              eval      {pct(result['eval_share'])}",
            f"  samples/s: swarm {result['swarm_samples_per_s']:.1f}, one process {result['single_samples_per_s']:.1f}"
            f"  -> swarm efficiency {pct(result['swarm_efficiency'])}",
            f"  final eval loss {result['final_eval_loss']:.3f}, consensus distance {result['consensus_distance']:.2e}",
        ]
    )
