"""A local swarm: N real peer processes on loopback, watched, summarized and plotted.

Each peer is a separate ``p2pfm peer`` process in its own process group (hivemind forks a
DHT process and a ``p2pd`` daemon: killing the group leaves no orphans; :mod:`p2pfm.procs`).
The first peer starts the swarm; the others join through its address, after which no peer
is special. Peers share the machine's cores: each gets ``cores // N`` torch threads so that
they do not fight over them.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.core.admission import issue_certificate
from p2pfm.core.gossip import consensus_distance
from p2pfm.core.identity import Identity
from p2pfm.daemon.checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint
from p2pfm.daemon.metrics import read_metrics
from p2pfm.procs import Launcher, child_env, kill_group, launch, signal_group


@dataclass
class PeerProcess:
    """One peer process of a local swarm, with its own work dir and key."""

    index: int
    work_dir: Path
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    terminating: bool = False
    launcher: Launcher = launch  # bench compare --shaped: one that starts the peer inside a network namespace
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.work_dir / "peer.log"

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "p2pfm", "peer", *self.args]

    def start(self) -> None:
        self.terminating = False
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.process = self.launcher(self.argv, self.log_path, self.env)

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
        if self.process is not None:
            signal_group(self.process, sig)

    def kill(self) -> None:
        """Crash: SIGKILL the whole process group (peer, DHT child, p2pd)."""
        if self.process is not None:
            kill_group(self.process)

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
                raise PeerFailed.of(self, rounds=None)
            time.sleep(0.2)
        raise TimeoutError(f"peer {self.index} not ready after {timeout:.0f} s; see {self.log_path}")


def error_excerpt(log_text: str, lines: int = 12, max_traceback_lines: int = 40) -> str:
    """The part of a peer's log that says why it died: its last lines, widened to the whole last
    traceback when one ends there, so that the user sees the error without opening peer.log."""
    all_lines = log_text.rstrip().splitlines()
    start = max(0, len(all_lines) - lines)
    tracebacks = [
        i for i, line in enumerate(all_lines) if line.startswith("Traceback (most recent call last)")
    ]
    if tracebacks and len(all_lines) - max_traceback_lines <= tracebacks[-1] < start:
        start = tracebacks[-1]
    return "\n".join(all_lines[start:])


class PeerFailed(RuntimeError):
    """A peer process of a local swarm exited before the run was done.

    Carries the peer's own error (the end of its peer.log): a swarm is only as good as its
    peers, and the log is the one place that says what went wrong.
    """

    def __init__(self, index: int, reason: str, log_path: Path, excerpt: str) -> None:
        self.index, self.reason, self.log_path, self.excerpt = index, reason, log_path, excerpt
        body = "\n".join("  " + line for line in excerpt.splitlines()) or "  (the log is empty)"
        super().__init__(f"peer {index} {reason}; last lines of {log_path}:\n{body}")

    @classmethod
    def of(cls, peer: PeerProcess, *, rounds: int | None) -> PeerFailed:
        """Describe an exited peer; ``rounds`` is the run's length (None: still starting)."""
        code = peer.process.returncode if peer.process is not None else None
        status = peer.status()
        if status.get("pid") != getattr(peer.process, "pid", None):  # left by an earlier run of this peer
            status = {}
        at = (
            f"during round {int(status.get('round', 0)) + 1}"
            if status.get("state") not in (None, "joining")
            else "at start-up"
        )
        if code is None:
            reason = f"is not running ({at})"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            reason = f"was killed by {name} {at}"
        elif code == 0 and rounds is not None:
            reason = f"exited with status 0 {at}, before its {rounds} rounds were done"
        else:
            reason = f"exited with status {code} {at}"
        try:
            text = peer.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return cls(peer.index, reason, peer.log_path, error_excerpt(text))


def peer_failure(peer: PeerProcess, rounds: int) -> PeerFailed | None:
    """None while ``peer`` runs or after it finished its ``rounds``; otherwise why it failed.

    Exit status 0 counts as a failure unless the peer's status shows all rounds done: a
    peer that left early (someone sent it SIGTERM) means the run cannot finish as asked.
    """
    if peer.process is None or peer.process.poll() is None:
        return None
    if peer.process.returncode == 0 and int(peer.status().get("round", 0)) >= rounds:
        return None
    return PeerFailed.of(peer, rounds=rounds)


def first_failure(peers: Sequence[PeerProcess], rounds: int) -> PeerFailed | None:
    """The first failed peer of ``peers`` (see :func:`peer_failure`), or None."""
    for peer in peers:
        failure = peer_failure(peer, rounds)
        if failure is not None:
            return failure
    return None


FINISHED_STATES = ("catching_up", "training", "paused", "draining", "left")  # past joining


def swarm_phase(statuses: Sequence[Mapping[str, Any]], peers: int) -> str:
    """What the swarm is doing, for the progress bar: "waiting for peers H/N" or "training".

    A peer in state "joining" reports ``quorum`` = {have, need, waited_s, deadline_s}: the
    swarm waits for its slowest joiner, so the bar shows the smallest ``have``. Daemons
    without that report fall back to counting the peers that are up.
    """
    online = [s for s in statuses if s.get("state")]
    joining = [s for s in online if s.get("state") not in FINISHED_STATES]
    if len(online) >= peers and not joining:
        return "training" if any(s.get("state") == "training" for s in online) else "finishing"
    quorums = [
        q
        for s in joining
        if isinstance(q := s.get("quorum"), Mapping)
        and isinstance(q.get("have"), int)
        and isinstance(q.get("need"), int)
    ]
    if not quorums:
        return f"waiting for peers {len(online)}/{peers}"
    have, need = min(q["have"] for q in quorums), max(q["need"] for q in quorums)
    text = f"waiting for peers {have}/{need}"
    waited = [q["waited_s"] for q in quorums if isinstance(q.get("waited_s"), (int, float))]
    deadline = [q["deadline_s"] for q in quorums if isinstance(q.get("deadline_s"), (int, float))]
    if waited and deadline:
        text += f" ({max(waited):.0f} s of {max(deadline):.0f} s)"
    return text


class LocalSwarm:
    """Start, watch and stop peer processes sharing this machine.

    ``admitted`` (the default): the swarm makes its own authority (``OUT/authority.key``, mode
    0600) and a certificate per peer (``peer-N/peer.cert``), and runs every peer with
    ``--authority ID --cert CERT``, as a swarm across machines would. ``admitted=False`` runs an
    open swarm (every peer warns so at start).
    """

    def __init__(
        self,
        out_dir: Path,
        peer_args: list[str],
        *,
        threads_per_peer: int,
        run_id: str,
        admitted: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.peer_args = peer_args
        self.threads_per_peer = threads_per_peer
        self.run_id = run_id
        self.peers: list[PeerProcess] = []
        self.bootstrap: str | None = None
        self.env = child_env(threads_per_peer)
        self.authority: Identity | None = None
        if admitted:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.authority = Identity.generate()
            self.authority.save(out_dir / "authority.key")

    def certify(self, work_dir: Path) -> list[str]:
        """Make the peer's key and its certificate; the flags that present them."""
        if self.authority is None:
            return []
        work_dir.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = work_dir / "peer.key", work_dir / "peer.cert"
        identity = Identity.load(key_path) if key_path.exists() else Identity.generate()
        if not key_path.exists():
            identity.save(key_path)
        cert = issue_certificate(self.authority, self.run_id, identity.peer_id, issued=time.time())
        cert_path.write_bytes(cert)
        return ["--authority", self.authority.peer_id, "--cert", str(cert_path)]

    def add_peer(self, *, shard: int, num_shards: int, extra: list[str] | None = None) -> PeerProcess:
        index = len(self.peers)
        work_dir = self.out_dir / f"peer-{index}"
        args = [
            "--work-dir",
            str(work_dir),
            "--key",
            str(work_dir / "peer.key"),
            "--run-id",
            self.run_id,
            "--threads",
            str(self.threads_per_peer),
            "--shard",
            str(shard),
            "--num-shards",
            str(num_shards),
            *self.certify(work_dir),
            *self.peer_args,
            *(extra or []),
        ]
        if self.bootstrap:
            args += ["--initial-peers", self.bootstrap]
        peer = PeerProcess(index=index, work_dir=work_dir, args=args, env=self.env)
        self.peers.append(peer)
        return peer

    def start_peer(self, peer: PeerProcess, *, wait: bool = True) -> None:
        """Start ``peer``; on its first start it joins through the first peer's address, even if it was
        added before that was known (restarts choose a live peer themselves, see restart_peer)."""
        if self.bootstrap and peer.process is None and "--initial-peers" not in peer.args:
            peer.args += ["--initial-peers", self.bootstrap]
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

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every peer at once, give them ``timeout`` seconds together to leave, then
        SIGKILL each process group. Interrupted (a second Ctrl-C, SIGTERM), it kills at once:
        whatever happens, no peer outlives the swarm."""
        try:
            for peer in self.peers:
                peer.terminate()
            deadline = time.monotonic() + timeout
            for peer in self.peers:
                peer.stop(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:
            for peer in self.peers:
                peer.kill()
            raise

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def final_params(work_dir: Path) -> np.ndarray | None:
    try:
        arrays, _ = read_checkpoint(work_dir / CHECKPOINT_NAME)
    except (OSError, CheckpointError):
        return None
    return arrays.get("params")


def summarize(
    peers: list[PeerProcess], *, wall_seconds: float, alive_at_end: list[int] | None = None
) -> dict[str, Any]:
    """The swarm's ``summary.json`` from the peers' metrics files and final checkpoints."""
    per_peer, initial, params, bytes_sent, update_bytes, rounds = {}, [], [], 0, 0, 0
    rejected: dict[str, int] = {}  # lowered a sender's score
    ignored: dict[str, int] = {}  # authentic but unused (stale rounds, banned senders): no penalty
    numel, sync_bytes, peer_rounds = 0, 0, 0
    energy_rows: dict[str, dict[str, Any]] = {}  # per peer, summed over its runs (p2pfm.energy.report)
    steps_total = 0
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
        if runs:
            energy_rows[str(peer.index)] = energy_row(runs)
            steps_total += sum(r.get("step", 0) for r in runs)
        update_bytes += sum(r.get("update_bytes_sent", 0) for r in runs)
        sync_bytes += sum(r.get("sync_bytes_sent", 0) for r in runs)
        for r in runs:
            for key, totals in (("messages_rejected", rejected), ("messages_ignored", ignored)):
                for reason, count in r.get(key, {}).items():
                    totals[reason] = totals.get(reason, 0) + count
        if round_records:
            rounds = max(rounds, round_records[-1]["round"])
            if alive_at_end is None or peer.index in alive_at_end:
                evaluated = [r for r in records if r.get("event") in ("round", "drain") and "eval_loss" in r]
                loss = evaluated[-1]["eval_loss"]
                per_peer[str(peer.index)] = (
                    loss if loss is not None and np.isfinite(loss) else None
                )  # JSON has no NaN
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
        "messages_ignored": ignored,
        "data_split": data_split,
        "wall_seconds": wall_seconds,
        **swarm_energy(energy_rows, numel, steps_total),
    }


def energy_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One peer's energy figures: the last round record of each of its runs (process lives), summed."""
    sources = sorted({r.get("energy_source") or "unknown" for r in runs})
    tokens = sum(r.get("tokens", 0) for r in runs)
    energy = sum(r.get("energy_wh", 0.0) for r in runs)
    marginal = sum(r.get("marginal_wh", 0.0) for r in runs)
    return {
        "energy_wh": energy, "marginal_wh": marginal,
        "carbon_g": sum(r.get("carbon_g", 0.0) for r in runs),
        "marginal_carbon_g": sum(r.get("marginal_carbon_g", 0.0) for r in runs),
        "tokens": tokens, "j_per_token": energy * 3600.0 / tokens if tokens else None,
        "marginal_j_per_token": marginal * 3600.0 / tokens if tokens else None,
        "energy_source": sources[0] if len(sources) == 1 else "mixed:" + ",".join(sources),
    }  # fmt: skip


def swarm_energy(rows: dict[str, dict[str, Any]], numel: int, steps: int) -> dict[str, Any]:
    """summary.json's energy section: totals and per peer (from the peers' metrics), and the
    datacentre baseline for the same steps and tokens (p2pfm.energy.datacenter, world-average grid)."""
    from p2pfm.energy.datacenter import GRID_G_PER_KWH, DatacenterModel, flops_per_step
    from p2pfm.energy.report import energy_report

    report = energy_report(rows)
    out = {k: v for k, v in report.items() if k != "per_peer"}
    out["energy_per_peer"] = report["per_peer"]
    tokens = report["tokens"]
    out.update(datacenter_energy_wh=None, datacenter_carbon_g=None, datacenter_embodied_g=None,
               datacenter_mfu=None, edge_to_datacenter_carbon=None)  # fmt: skip
    if steps and tokens and numel:
        # The peers' concurrent steps batched into one datacentre step (p2pfm.sim.energy.datacenter_steps).
        peers = max(len(rows), 1)
        flops = flops_per_step(numel, tokens / steps) * peers
        dc = DatacenterModel().train(steps / peers, flops, GRID_G_PER_KWH["WORLD"])
        out.update(
            datacenter_energy_wh=dc.energy_wh, datacenter_carbon_g=dc.carbon_g,
            datacenter_embodied_g=dc.embodied_g, datacenter_mfu=dc.mfu,
            edge_to_datacenter_carbon=report["carbon_g"] / dc.carbon_g if dc.carbon_g > 0 else None,
        )  # fmt: skip
    return out


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
    admitted: bool = True  # make an authority and certify every peer (False: an open swarm)


FAILURE_GRACE_S = 5.0  # after a peer failed, the others get this long together to leave gracefully (a joining peer needs about 2 s)


def plan_swarm(options: SwarmOptions) -> LocalSwarm:
    """Check ``options``, create the output directory and a swarm of ``peers`` peers, none started.

    Separate from :func:`drive_swarm` so that a caller can prepare peers' work dirs (keys,
    data) before anything runs; :func:`run_swarm` does both.
    """
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
    peer_args = [
        "--rounds",
        str(options.rounds),
        "--seed",
        str(options.seed),
        "--min-peers",
        str(options.peers),
        *options.peer_args,
    ]
    swarm = LocalSwarm(
        out, peer_args, threads_per_peer=threads, run_id=options.run_id, admitted=options.admitted
    )
    for index in range(options.peers):
        swarm.add_peer(shard=index, num_shards=options.peers)
    return swarm


def drive_swarm(swarm: LocalSwarm, options: SwarmOptions) -> dict[str, Any]:
    """Start the planned peers, show progress, stop them, write summary.json and loss.png.

    Raises :class:`PeerFailed` within about a second of any peer exiting before its rounds
    are done: the others would otherwise wait minutes for a quorum that cannot come. Every
    way out (done, failure, exception, Ctrl-C, SIGTERM) goes through ``stop_all``.
    """
    from tqdm import tqdm

    # SIGTERM (e.g. `kill`, a CI timeout) must stop our peers too, not orphan them.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.time()
    try:
        with swarm:
            for peer in swarm.peers:
                swarm.start_peer(peer, wait=peer is swarm.peers[0])
            name = f"swarm of {len(swarm.peers)}"
            bar = tqdm(
                total=options.rounds, desc=f"{name}: starting", unit="round", disable=not options.progress
            )
            with bar:
                done, phase = 0, ""
                while any(p.alive for p in swarm.peers):
                    failure = first_failure(swarm.peers, options.rounds)
                    if failure is not None:
                        bar.write(
                            f"peer {failure.index} {failure.reason}; stopping the other peers",
                            file=sys.stderr,
                        )
                        swarm.stop_all(timeout=FAILURE_GRACE_S)
                        raise failure
                    statuses = [p.status() for p in swarm.peers]
                    if (now := swarm_phase(statuses, len(swarm.peers))) != phase:
                        phase = now
                        bar.set_description_str(f"{name}: {phase}")
                    current = min(int(s.get("round", 0)) for s in statuses)
                    if current > done:
                        bar.update(current - done)
                        done = current
                    losses = [s.get("eval_loss") for s in statuses]
                    finite = [v for v in losses if isinstance(v, float) and np.isfinite(v)]
                    if finite:
                        bar.set_postfix(eval_loss=f"{np.mean(finite):.3f}")
                    time.sleep(0.5)
                failure = first_failure(swarm.peers, options.rounds)
                if failure is not None:
                    raise failure
                bar.update(options.rounds - done)
            summary = summarize(swarm.peers, wall_seconds=time.time() - start)
    finally:
        signal.signal(signal.SIGTERM, previous)
    (swarm.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    plot_losses(swarm.peers, swarm.out_dir / "loss.png")
    return summary


def run_swarm(options: SwarmOptions) -> dict[str, Any]:
    """Start ``peers`` processes, wait for ``rounds``, stop them, write summary.json and loss.png."""
    return drive_swarm(plan_swarm(options), options)
