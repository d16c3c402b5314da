"""A local swarm: N real peer processes on loopback, watched, summarized and plotted.

Each peer is a separate ``p2pfm peer`` process in its own process group (hivemind forks a
DHT process and a ``p2pd`` daemon: killing the group leaves no orphans). The first peer
starts the swarm; the others join through its address, after which no peer is special.
Peers share the machine's cores: each gets ``cores // N`` torch threads so that they do not
fight over them.

Used by ``p2pfm swarm``, by the integration tests (start, SIGKILL, restart, late joiners)
and by the benchmarks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.core.errors import Reject
from p2pfm.core.gossip import consensus_distance
from p2pfm.core.tensorfile import unpack_arrays
from p2pfm.daemon.checkpoint import CHECKPOINT_NAME
from p2pfm.daemon.metrics import read_metrics


@dataclass
class PeerProcess:
    """One peer process of a local swarm, with its own work dir and key."""

    index: int
    work_dir: Path
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    terminating: bool = False
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.work_dir / "peer.log"

    def start(self) -> None:
        self.terminating = False
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "p2pfm", "peer", *self.args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.work_dir / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.work_dir / "metrics.jsonl")

    def signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Crash: SIGKILL the whole process group (peer, DHT child, p2pd)."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def terminate(self) -> None:
        """Ask for a graceful leave (SIGTERM), once: a second signal during shutdown would kill it."""
        if self.alive and not self.terminating:
            self.terminating = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful leave: SIGTERM, wait, then SIGKILL whatever is left of the group."""
        if self.process is None:
            return None
        if self.alive:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # p2pd/DHT children, if anything lingers
        return self.process.wait()

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the peer has written its addresses (it is on the network)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status()
            if status.get("maddrs") and status.get("pid") == self.process.pid:
                return status
            if not self.alive:
                raise RuntimeError(f"peer {self.index} exited early; see {self.log_path}:\n{tail(self.log_path)}")
            time.sleep(0.2)
        raise TimeoutError(f"peer {self.index} not ready after {timeout:.0f} s; see {self.log_path}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalSwarm:
    """Start, watch and stop peer processes sharing this machine."""

    def __init__(self, out_dir: Path, peer_args: list[str], *, threads_per_peer: int, run_id: str) -> None:
        self.out_dir = out_dir
        self.peer_args = peer_args
        self.threads_per_peer = threads_per_peer
        self.run_id = run_id
        self.peers: list[PeerProcess] = []
        self.bootstrap: str | None = None
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # One BLAS/OpenMP pool per peer, sized like torch's: no oversubscription.
        env["OMP_NUM_THREADS"] = str(threads_per_peer)
        self.env = env

    def add_peer(self, *, shard: int, num_shards: int, extra: list[str] | None = None) -> PeerProcess:
        index = len(self.peers)
        work_dir = self.out_dir / f"peer-{index}"
        args = [
            "--work-dir", str(work_dir), "--key", str(work_dir / "peer.key"), "--run-id", self.run_id,
            "--threads", str(self.threads_per_peer), "--shard", str(shard), "--num-shards", str(num_shards),
            *self.peer_args, *(extra or []),
        ]
        if self.bootstrap:
            args += ["--initial-peers", self.bootstrap]
        peer = PeerProcess(index=index, work_dir=work_dir, args=args, env=self.env)
        self.peers.append(peer)
        return peer

    def start_peer(self, peer: PeerProcess, *, wait: bool = True) -> None:
        peer.start()
        if wait or self.bootstrap is None:
            status = peer.wait_ready()
            if self.bootstrap is None:
                self.bootstrap = status["maddrs"][0]

    def restart_peer(self, peer: PeerProcess) -> None:
        """Start a stopped/killed peer again with the same key and work dir (resumes)."""
        if peer.alive:
            raise RuntimeError(f"peer {peer.index} is still running")
        live = [p for p in self.peers if p.alive]
        if live and not any("--initial-peers" in a for a in peer.args):
            peer.args += ["--initial-peers", live[0].status()["maddrs"][0]]
        elif live:
            i = peer.args.index("--initial-peers")
            peer.args[i + 1] = live[0].status()["maddrs"][0]
        self.start_peer(peer)

    def stop_all(self) -> None:
        for peer in self.peers:
            peer.terminate()
        for peer in self.peers:
            peer.stop()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def final_params(work_dir: Path) -> np.ndarray | None:
    try:
        arrays, _ = unpack_arrays((work_dir / CHECKPOINT_NAME).read_bytes())
    except (OSError, Reject):
        return None
    return arrays.get("params")


def summarize(peers: list[PeerProcess], *, wall_seconds: float, alive_at_end: list[int] | None = None) -> dict[str, Any]:
    """The swarm's ``summary.json`` from the peers' metrics files and final checkpoints."""
    per_peer, initial, params, bytes_sent, update_bytes, rejected, rounds = {}, [], [], 0, 0, {}, 0
    numel, sync_bytes, peer_rounds = 0, 0, 0
    # The byte split each peer reported at its (latest) start; corpus and held-out are shared.
    data_split: dict[str, Any] = {"corpus_bytes": None, "holdout_bytes": None, "shard_bytes": {}}
    for peer in peers:
        records = peer.metrics()
        starts = [r for r in records if r.get("event") == "start"]
        if starts and "shard_bytes" in starts[-1]:
            data_split["shard_bytes"][str(peer.index)] = starts[-1]["shard_bytes"]
            data_split["corpus_bytes"] = starts[-1].get("corpus_bytes")
            data_split["holdout_bytes"] = starts[-1].get("holdout_bytes")
        round_records = [r for r in records if r.get("event") == "round"]
        peer_rounds += len(round_records)
        if starts and starts[0].get("initial_eval_loss") is not None:
            initial.append(starts[0]["initial_eval_loss"])
        if starts:
            numel = starts[0].get("params", numel)
        # Counters restart with the process: sum the last record of each run of the peer.
        runs, last = [], None
        for r in records:
            if r.get("event") == "start" and last is not None:
                runs.append(last)
                last = None
            elif r.get("event") == "round":
                last = r
        if last is not None:
            runs.append(last)
        bytes_sent += sum(r.get("bytes_sent", 0) for r in runs)
        update_bytes += sum(r.get("update_bytes_sent", 0) for r in runs)
        sync_bytes += sum(r.get("sync_bytes_sent", 0) for r in runs)
        for r in runs:
            for reason, count in r.get("messages_rejected", {}).items():
                rejected[reason] = rejected.get(reason, 0) + count
        if round_records:
            rounds = max(rounds, round_records[-1]["round"])
            if alive_at_end is None or peer.index in alive_at_end:
                evaluated = [r for r in records if r.get("event") in ("round", "drain") and "eval_loss" in r]
                loss = evaluated[-1]["eval_loss"]
                per_peer[str(peer.index)] = loss if loss is not None and np.isfinite(loss) else None  # JSON has no NaN
        vector = final_params(peer.work_dir)
        if vector is not None and (alive_at_end is None or peer.index in alive_at_end):
            params.append(vector)
    finals = [v for v in per_peer.values() if v is not None and np.isfinite(v)]
    peer_rounds = max(1, peer_rounds)
    return {
        "peers": len(peers),
        "rounds": rounds,
        "params": numel,
        "initial_eval_loss": float(np.mean(initial)) if initial else None,
        "final_eval_loss": float(np.mean(finals)) if finals else None,
        "final_eval_loss_per_peer": per_peer,
        "bytes_sent_total": bytes_sent,
        # Everything a peer sends per round to keep training: updates plus consensus syncs
        # (state served to joiners is one-off and counted in bytes_sent_total only).
        "bits_per_param_per_round": 8.0 * (update_bytes + sync_bytes) / max(1, numel) / peer_rounds,
        "update_bits_per_param_per_round": 8.0 * update_bytes / max(1, numel) / peer_rounds,
        "sync_bits_per_param_per_round": 8.0 * sync_bytes / max(1, numel) / peer_rounds,
        "consensus_distance": consensus_distance(params),
        "messages_rejected": rejected,
        "data_split": data_split,
        "wall_seconds": wall_seconds,
    }


def plot_losses(peers: list[PeerProcess], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    all_records = [peer.metrics() for peer in peers]
    times = [r["time"] for records in all_records for r in records if "time" in r]
    origin = min(times) if times else 0.0
    for peer, records in zip(peers, all_records, strict=True):
        points = []
        for r in records:
            if r.get("event") == "start" and r.get("initial_eval_loss") is not None:
                points.append((r["time"] - origin, r["initial_eval_loss"]))
            elif r.get("event") in ("round", "drain") and r.get("eval_loss") is not None:
                points.append((r["time"] - origin, r["eval_loss"]))
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", label=f"peer {peer.index}")
    ax.set_xlabel("wall time since the first peer started (s)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("p2pfm local swarm: eval loss per peer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class SwarmOptions:
    peers: int = 3
    rounds: int = 30
    out_dir: Path = Path("runs/swarm")
    seed: int = 0
    run_id: str = "p2pfm-swarm"
    peer_args: tuple[str, ...] = ()  # passed through to every peer (training flags)
    threads_per_peer: int = 0  # 0 = cores // peers (at least 1)
    progress: bool = True


def run_swarm(options: SwarmOptions) -> dict[str, Any]:
    """Start ``peers`` processes, wait for ``rounds``, stop them, write summary.json and loss.png."""
    from tqdm import tqdm

    from p2pfm.config import ConfigError

    if options.peers < 1:
        raise ConfigError(f"--peers: must be at least 1, got {options.peers}")
    if options.rounds < 1:
        raise ConfigError(f"--rounds: must be at least 1, got {options.rounds}")
    out = options.out_dir
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty; choose a new directory (runs are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    threads = options.threads_per_peer or max(1, (os.cpu_count() or 1) // options.peers)
    # SIGTERM (e.g. `kill`, a CI timeout) must stop our peers too, not orphan them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    peer_args = ["--rounds", str(options.rounds), "--seed", str(options.seed), "--min-peers", str(options.peers),
                 *options.peer_args]
    start = time.time()
    with LocalSwarm(out, peer_args, threads_per_peer=threads, run_id=options.run_id) as swarm:
        for index in range(options.peers):
            swarm.start_peer(swarm.add_peer(shard=index, num_shards=options.peers), wait=index == 0)
        bar = tqdm(total=options.rounds, desc=f"swarm of {options.peers}", unit="round", disable=not options.progress)
        done = 0
        while any(p.alive for p in swarm.peers):
            rounds = [p.status().get("round", 0) for p in swarm.peers]
            losses = [p.status().get("eval_loss") for p in swarm.peers]
            current = min(rounds)
            if current > done:
                bar.update(current - done)
                done = current
            finite = [v for v in losses if isinstance(v, float) and np.isfinite(v)]
            if finite:
                bar.set_postfix(eval_loss=f"{np.mean(finite):.3f}")
            time.sleep(0.5)
        bar.update(options.rounds - done)
        bar.close()
        failed = [p.index for p in swarm.peers if p.process.returncode != 0]
        if failed:
            raise RuntimeError(f"peers {failed} failed; logs: " + ", ".join(str(swarm.peers[i].log_path) for i in failed))
        summary = summarize(swarm.peers, wall_seconds=time.time() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    plot_losses(swarm.peers, out / "loss.png")
    return summary
