"""``p2pfm bench scale``: what a peer costs at 1M, 10M and ~124M parameters, against plain baselines.

For each model size, in one invocation on one machine:

- **memory**: each peer's peak RSS (read from ``/proc`` while it runs) and its breakdown by
  buffer (the peer's ``status.json`` ``memory``), beside the peak RSS of a plain single-process
  AdamW loop of the same model (:mod:`p2pfm.bench.scale_plain`), measured in the same run;
- **round time**, split from the peers' own per-round metrics: compute (the local steps), codec
  + sign (``encode_seconds``), verify + decode on arrival (``receive_seconds``), merge (decode
  the inbox, aggregate, outer step, load), snapshot (pack the state we serve), and the rest
  (network waits, syncs, evaluation);
- **bytes per round** on the wire;
- **state download**: a joiner's download of the full state (parameters and AdamW moments),
  its time, and its ratio to a plain TCP copy of the same number of bytes over the same
  loopback, measured in the same run.

The swarm is real (:class:`p2pfm.swarm.LocalSwarm`: admitted peer processes over libp2p).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.bench.scale_config import DEFAULT_SIZES, ScaleBenchConfig
from p2pfm.bench.transfer import tcp_copy
from p2pfm.core.gossip import GossipConfig
from p2pfm.daemon.memory import proc_rss

__all__ = ["DEFAULT_SIZES", "ScaleBenchConfig", "run_scale_bench", "format_report"]


# --- the raw TCP baseline -------------------------------------------------------------------
def tcp_copy_seconds(total_bytes: int, chunk: int = 1 << 20) -> float:
    """A plain TCP copy of ``total_bytes`` over 127.0.0.1 (asyncio streams, 1 MiB writes of one buffer)."""
    payload = os.urandom(chunk)
    return asyncio.run(tcp_copy(total_bytes, lambda _offset, length: payload[:length], chunk))


# --- one model size -------------------------------------------------------------------------
def plain_loop_in_subprocess(preset: str, config: ScaleBenchConfig, threads: int) -> dict[str, Any]:
    options = {
        "preset": preset, "steps": config.plain_steps, "batch_size": config.batch_size,
        "threads": threads, "seed": config.seed, "block_size": config.block_size,
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "p2pfm.bench.scale_plain", json.dumps(options)],
        capture_output=True, text=True, timeout=config.timeout_s, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"plain loop of {preset} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_of(pid: int) -> int:
    """VmHWM of a live process (bytes); 0 if it is gone or this is not Linux."""
    return (proc_rss(pid) or {}).get("peak_rss", 0)


def rss_of(pid: int) -> int:
    """VmRSS of a live process (bytes); 0 if it is gone or this is not Linux."""
    return (proc_rss(pid) or {}).get("rss", 0)


class PhasePeaks:
    """Each peer's peak RSS per phase of the run ("training", then "joining": while the joiner
    downloads), sampled from ``/proc`` every ``period_s`` in a thread: VmHWM alone cannot say
    whether a peak came from a peer's own rounds or from serving a joiner."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.phase = "training"
        self.pids: list[int] = []
        self.peaks: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            phase = self.phase
            for pid in list(self.pids):
                peaks = self.peaks.setdefault(pid, {})
                peaks[phase] = max(peaks.get(phase, 0), rss_of(pid))


def round_split(records: list[dict[str, Any]], last: int | None = None) -> dict[str, float]:
    """Mean seconds per round by part, over the rounds after the first (warm-up), up to the
    ``last``-th round record (None: all)."""
    rounds = [r for r in records if r.get("event") == "round"][:last]
    if len(rounds) < 2:
        return {}
    measured = rounds[1:]
    previous = rounds[:-1]
    parts: dict[str, list[float]] = {
        k: [] for k in ("round", "compute", "encode", "receive", "merge", "snapshot", "eval", "other")
    }
    for before, r in zip(previous, measured, strict=True):
        compute = r["compute_seconds"] - before["compute_seconds"]
        receive = r.get("receive_seconds", 0.0) - before.get("receive_seconds", 0.0)
        named = {
            "compute": compute, "encode": r.get("encode_seconds", 0.0), "merge": r.get("merge_seconds", 0.0),
            "snapshot": r.get("snapshot_seconds", 0.0), "eval": r["eval_seconds"],
        }  # fmt: skip
        parts["round"].append(r["round_seconds"])
        parts["receive"].append(receive)
        for name, value in named.items():
            parts[name].append(value)
        # What is left of the round on its critical path: network waits, syncs, catch-up, pushes.
        parts["other"].append(max(0.0, r["round_seconds"] - sum(named.values())))
    split = {name: float(np.mean(values)) for name, values in parts.items()}
    split["update_bytes_per_round"] = float(
        (measured[-1]["update_bytes_sent"] - rounds[0]["update_bytes_sent"]) / len(measured)
    )
    split["bytes_received_per_round"] = float(
        (measured[-1]["bytes_received"] - rounds[0]["bytes_received"]) / len(measured)
    )
    return split


def _wait(condition, timeout: float, what: str, swarm) -> None:
    from p2pfm.swarm import first_failure

    deadline = time.monotonic() + timeout
    while not condition():
        failure = first_failure(swarm.peers, 0)
        if failure is not None:
            raise failure
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench scale: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _rounds(peer) -> int:
    return len([r for r in peer.metrics() if r.get("event") == "round"])


def measure_size(preset: str, config: ScaleBenchConfig, out_dir: Path, log=print) -> dict[str, Any]:
    """One model size: plain loop, a real swarm with a late joiner, the TCP baseline."""
    from p2pfm.swarm import LocalSwarm

    cores = os.cpu_count() or 1
    threads = config.threads_per_peer or max(1, cores // config.peers)
    from p2pfm.model.config import GPT_PRESETS

    window = min(config.block_size, GPT_PRESETS[preset].block_size)
    log(f"[{preset}] plain AdamW loop ({config.plain_steps} steps) ...")
    plain = plain_loop_in_subprocess(preset, config, threads)
    peer_args = [
        "--model", preset, "--rounds", "0", "--inner-steps", str(config.inner_steps),
        "--batch-size", str(config.batch_size), "--seq-len", str(window),
        "--min-peers", str(config.peers), "--eval-batches", "1", "--sync-every", "0",
        "--seed", str(config.seed),
    ]  # fmt: skip
    swarm = LocalSwarm(out_dir / preset, peer_args, threads_per_peer=threads, run_id=f"bench-scale-{preset}")
    result: dict[str, Any] = {"preset": preset, "plain": plain}
    sampler = PhasePeaks()
    try:
        sampler.start()
        for index in range(config.peers):
            swarm.start_peer(swarm.add_peer(shard=index, num_shards=config.peers + 1), wait=index == 0)
            sampler.pids.append(swarm.peers[-1].process.pid)
        log(f"[{preset}] {config.peers} peers training {config.rounds + 1} rounds ...")
        _wait(
            lambda: min(_rounds(p) for p in swarm.peers) >= config.rounds + 1,
            config.timeout_s, f"{config.rounds + 1} rounds", swarm,
        )  # fmt: skip
        trainers = list(swarm.peers)
        # The split is of training rounds: those that ended before the joiner came (a round that
        # overlaps the joiner's download and confirmation shares the cores with both; the memory
        # peaks below cover that phase).
        rounds_before_join = [_rounds(p) for p in trainers]
        log(f"[{preset}] a joiner downloads the state ...")
        joiner = swarm.add_peer(shard=config.peers, num_shards=config.peers + 1, extra=["--rounds", "0"])
        sampler.phase = "joining"
        swarm.start_peer(joiner)
        _wait(
            lambda: any(r.get("event") == "state_download" for r in joiner.metrics()),
            config.timeout_s, "the joiner's state download", swarm,
        )  # fmt: skip
        peaks = [peak_rss_of(p.process.pid) for p in swarm.peers]
        statuses = [p.status() for p in swarm.peers]
        # The download ran while both trainers kept training on the same cores; the same TCP copy
        # under that load is its like-for-like baseline (the idle copy below is the link's best).
        download = next(r for r in joiner.metrics() if r.get("event") == "state_download")
        state_bytes = int(download.get("bytes") or 0)
        tcp_loaded_seconds = tcp_copy_seconds(state_bytes) if state_bytes else float("nan")
    finally:
        sampler.stop()
        swarm.stop_all()
    phase_peaks = [sampler.peaks.get(p.process.pid, {}) for p in swarm.peers]
    download_seconds = float(download.get("seconds") or 0.0)
    tcp_seconds = tcp_copy_seconds(state_bytes) if state_bytes else float("nan")
    splits = [round_split(p.metrics(), last=n) for p, n in zip(trainers, rounds_before_join, strict=True)]
    result.update(
        {
            "params": plain["params"],
            "peers": [
                {
                    "peak_rss": peak,
                    "peak_rss_by_phase": phases,
                    "memory": status.get("memory", {}),
                    "split": split,
                }
                for peak, phases, status, split in zip(
                    peaks, phase_peaks, statuses, [*splits, {}], strict=True
                )
            ],
            "peak_rss_ratio": max(peaks[: config.peers]) / plain["peak_rss"] if plain["peak_rss"] else None,
            "joiner_peak_rss": peaks[-1],
            "split": {k: float(np.mean([s[k] for s in splits if k in s])) for k in splits[0]}
            if splits[0]
            else {},
            "download": {
                "bytes": state_bytes,
                "seconds": download_seconds,
                "mb_per_s": state_bytes / download_seconds / 1e6 if download_seconds else None,
                "tcp_seconds": tcp_seconds,
                "tcp_mb_per_s": state_bytes / tcp_seconds / 1e6 if state_bytes else None,
                "ratio_to_tcp": tcp_seconds / download_seconds if download_seconds else None,
                "tcp_loaded_seconds": tcp_loaded_seconds,
                "ratio_to_tcp_loaded": tcp_loaded_seconds / download_seconds if download_seconds else None,
                "via": download.get("via", "stream"),  # the chunks' way: the direct lane or the libp2p stream
            },  # fmt: skip
        }
    )
    if result["split"]:
        result.update(protocol_shares(result["split"], config.inner_steps))
    return result


def protocol_shares(split: dict[str, float], inner_steps: int) -> dict[str, Any]:
    """Codec + receive + merge seconds per round as a share of the round's compute.

    The protocol's cost is per round, the compute per step: besides the share at the measured
    H, the same per-round cost over the default H (``GossipConfig.inner_steps``) steps of this
    run's measured seconds per step, labelled as such in the table.
    """
    overhead = split["encode"] + split["receive"] + split["merge"]
    default_h = GossipConfig().inner_steps
    per_step = split["compute"] / inner_steps
    return {
        "protocol_share_of_compute": overhead / split["compute"] if split["compute"] else None,
        "default_inner_steps": default_h,
        "protocol_share_at_default_h": overhead / (per_step * default_h) if per_step else None,
    }


def run_scale_bench(config: ScaleBenchConfig, log=print) -> dict[str, Any]:
    out_dir = config.out_dir or Path(tempfile.mkdtemp(prefix="p2pfm-bench-scale-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [measure_size(preset, config, out_dir, log) for preset in config.sizes]
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sizes": results,
    }
    (out_dir / "bench_scale.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value / 1e6:,.0f} MB"

    def pct(value: float | None) -> str:
        return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f} %"

    c = report["config"]
    default_h = GossipConfig().inner_steps
    lines = [
        f"p2pfm bench scale: {c['peers']} peers + 1 joiner, {c['rounds']} measured rounds of "
        f"{c['inner_steps']} steps, batch {c['batch_size']} x windows of <= {c['block_size']} bytes, {report['cores']} cores",
        f"{'model':>8} {'params':>12} {'plain RSS':>10} {'peer RSS':>10} {'ratio':>6} {'compute':>8} "
        f"{'codec':>7} {'receive':>7} {'merge':>7} {'snap':>6} {'other':>7} {'proto/comp':>10} {'at H=' + str(default_h):>8} "
        f"{'B/round':>9} {'state':>9} {'dl MB/s':>8} {'TCP MB/s':>8} {'dl/TCP':>6}",
    ]
    for r in report["sizes"]:
        s, d = r["split"], r["download"]
        peer_rss = max(p["peak_rss"] for p in r["peers"][: c["peers"]])
        lines.append(
            f"{r['preset']:>8} {r['params']:>12,} {mb(r['plain']['peak_rss']):>10} {mb(peer_rss):>10} "
            f"{r['peak_rss_ratio'] or float('nan'):>5.2f}x {s.get('compute', float('nan')):>7.2f}s "
            f"{s.get('encode', float('nan')):>6.2f}s {s.get('receive', float('nan')):>6.2f}s "
            f"{s.get('merge', float('nan')):>6.2f}s {s.get('snapshot', float('nan')):>5.2f}s "
            f"{s.get('other', float('nan')):>6.2f}s {pct(r.get('protocol_share_of_compute')):>10} "
            f"{pct(r.get('protocol_share_at_default_h')):>8} "
            f"{s.get('update_bytes_per_round', 0) / 1e3:>7,.0f}kB {mb(d['bytes']):>9} "
            f"{d['mb_per_s'] or float('nan'):>8.1f} {d['tcp_mb_per_s'] or float('nan'):>8.1f} "
            f"{pct(d['ratio_to_tcp']):>6}"
        )
        by_phase = [p.get("peak_rss_by_phase") or {} for p in r["peers"][: c["peers"]]]
        if any(by_phase) and r["plain"]["peak_rss"]:
            plain_rss = r["plain"]["peak_rss"]
            parts = [
                f"peer {i}: {mb(ph.get('training'))} ({ph.get('training', 0) / plain_rss:.2f}x) training, "
                f"{mb(ph.get('joining'))} ({ph.get('joining', 0) / plain_rss:.2f}x) while the joiner downloads"
                for i, ph in enumerate(by_phase)
            ]
            joiner = r.get("joiner_peak_rss") or 0
            parts.append(f"joiner: {mb(joiner)} ({joiner / plain_rss:.2f}x, VmHWM)")
            lines.append(f"{'':>8} sampled VmRSS peaks: " + "; ".join(parts))
        loaded = d.get("tcp_loaded_seconds")
        if loaded and d["bytes"] and np.isfinite(loaded):
            lines.append(
                f"{'':>8} TCP copy while the peers still train (the download's conditions): "
                f"{d['bytes'] / loaded / 1e6:,.1f} MB/s; download / that copy: {pct(d.get('ratio_to_tcp_loaded'))}; "
                f"chunks via {d.get('via', 'stream')}"
            )
    lines.append(
        "codec = top-k + int8 with error feedback + sign; receive = verify + decode on arrival; merge = "
        "aggregate + outer step + load; snap = pack + hash the served state; other = waits, pushes, eval; "
        f"proto/comp = (codec + receive + merge) / compute; at H={default_h} = the same per-round cost over "
        f"{default_h} steps of this run's measured seconds per step (the default inner_steps)"
    )
    return "\n".join(lines)
