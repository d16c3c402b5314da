"""Running one variant of ``p2pfm bench compare`` and reading back its curve.

``p2pfm`` and ``p2pfm-uncompressed`` are real peers of a :class:`p2pfm.swarm.LocalSwarm`;
``hivemind``, ``hivemind-local``, ``ddp`` and ``single`` are worker processes
(:mod:`p2pfm.bench.compare_hivemind`, :mod:`p2pfm.bench.compare_ddp`). Either way every
process runs in its own process group (:mod:`p2pfm.procs`) under a
:class:`~p2pfm.bench.sampler.ProcessSampler`, and the variant becomes a :class:`VariantRun`:
its points (the k-th evaluation of all its processes) and its totals. With a lab
(:mod:`p2pfm.netlab.netns`) each process runs inside one of its hosts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from p2pfm.bench.compare_config import CompareConfig
from p2pfm.bench.sampler import ProcessSampler
from p2pfm.daemon.metrics import read_metrics
from p2pfm.model.gpt import GPTConfig
from p2pfm.procs import Launcher, child_env, kill_groups, launch, tail, wait_all, wait_for_file
from p2pfm.swarm import SwarmOptions, plan_swarm

TIME_CAP = "stopped at the time cap"
ERROR_TAIL_LINES = 15  # of each process's log, appended to a variant's error


@dataclass
class Point:
    """One point of a variant's curve: the k-th evaluation of all its processes."""

    t: float  # seconds since the variant's first process was started
    eval_loss: float
    samples_per_peer: int
    payload_bytes: float  # the algorithm's own bytes, all processes, up to here
    bytes_sent: float = 0.0  # bytes on the wire (measured where possible), all processes


@dataclass
class VariantRun:
    variant: str
    points: list[Point]
    wall_s: float
    cpu_s: float
    bytes_sent: float
    payload_bytes: float
    comm_rounds: float | None  # communication rounds per peer (None: no communication)
    params: int
    processes: int
    error: str | None = None
    completed: bool = True  # False: stopped at the time cap before its samples were done
    extra: dict[str, Any] = field(default_factory=dict)


class Deadline(NamedTuple):
    at: float  # unix time
    is_cap: bool  # the time cap (report what was reached), not the failure timeout


def deadline(config: CompareConfig, t0: float) -> Deadline:
    """When to stop a variant started at ``t0``, and whether that is the time cap."""
    if config.time_cap_s is not None and config.time_cap_s < config.timeout_s:
        return Deadline(t0 + config.time_cap_s, True)
    return Deadline(t0 + config.timeout_s, False)


def supervise(processes: Sequence[subprocess.Popen], stop: Deadline, sampler: ProcessSampler) -> str | None:
    """Wait for every process; then (or at the first failure, or at ``stop``) sample them one last
    time and kill every group. Returns the error, :data:`TIME_CAP`, or None."""
    outcome = wait_all(processes, stop.at)
    sampler.sample()
    kill_groups(processes)
    if outcome.overran:
        return TIME_CAP if stop.is_cap else "timed out"
    if outcome.failed is not None:
        return f"process {outcome.failed.args[:4]} exited with {outcome.failed.returncode}"
    return None


def _curve(per_process: list[list[dict[str, Any]]], t0: float) -> list[tuple[float, float, int, list[dict]]]:
    """Group the k-th records of every process: (t of the last, mean loss, samples, records)."""
    count = min((len(r) for r in per_process), default=0)
    points = []
    for k in range(count):
        rows = [records[k] for records in per_process]
        losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        points.append(
            (
                max(r["time"] for r in rows) - t0,
                float(np.mean(losses)) if losses else float("nan"),
                int(rows[0].get("samples", 0)),
                rows,
            )
        )
    return points


def _model_flags(model: GPTConfig) -> list[str]:
    """The same flag names for a ``p2pfm peer`` and for a worker (:mod:`p2pfm.bench.compare_common`)."""
    return [
        "--n-layer",
        str(model.n_layer),
        "--n-embd",
        str(model.n_embd),
        "--n-head",
        str(model.n_head),
        "--block-size",
        str(model.block_size),
    ]


def _watched(launcher: Launcher, sampler: ProcessSampler) -> Launcher:
    """``launcher``, with the sampler watching each process's group from its start (the first
    peer's too, before it is ready: its start-up CPU and p2pd bytes count)."""

    def start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        process = launcher(argv, log, env)
        sampler.watch(process.pid)
        return process

    return start


def _in_host(lab: Any, index: int) -> Launcher:
    """A launcher that runs the command inside host ``index`` of ``lab``."""
    return lambda argv, log, env: lab.popen(index, argv, log=log, env=env)


def _payload(record: dict[str, Any]) -> int:
    """Bytes a p2pfm peer sent so far: its ``bytes_sent`` counts updates, syncs and state served."""
    return int(record.get("bytes_sent", 0))


def run_p2pfm(config: CompareConfig, variant: str, work: Path, lab: Any = None) -> VariantRun:
    """p2pfm peers planned as ``p2pfm swarm`` plans them (rounds, seed, quorum of all peers before
    training); with ``lab``, peer i runs in host i, listening on its address."""
    training = [
        "--inner-steps",
        str(config.inner_steps),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(config.lr),
        *_model_flags(config.model),
    ]
    if variant == "p2pfm-uncompressed":
        training += ["--codec", "none"]
    swarm = plan_swarm(
        SwarmOptions(
            peers=config.peers,
            rounds=config.rounds,
            out_dir=work,
            seed=config.seed,
            run_id=f"compare-{variant}-{os.getpid()}",
            peer_args=tuple(training),
            threads_per_peer=config.torch_threads,
            progress=False,
        )
    )
    error = None
    with ProcessSampler() as sampler, swarm:
        for peer in swarm.peers:
            if lab is not None:
                peer.args += ["--listen", f"/ip4/{lab.addrs[peer.index]}/tcp/0"]
                peer.launcher = _in_host(lab, peer.index)
            peer.launcher = _watched(peer.launcher, sampler)
        t0 = time.time()
        try:
            for peer in swarm.peers:
                swarm.start_peer(peer, wait=peer.index == 0)  # the others join through the first
            error = supervise([p.process for p in swarm.peers], deadline(config, t0), sampler)
        except (RuntimeError, TimeoutError) as exc:
            error = str(exc)
        t_end = time.time()
    completed = error != TIME_CAP
    error = None if error == TIME_CAP else error
    if error:
        error += "\n" + "\n".join(tail(p.log_path, ERROR_TAIL_LINES) for p in swarm.peers)
    per_peer = []
    params = 0
    for peer in swarm.peers:
        records = peer.metrics()
        start = next((r for r in records if r.get("event") == "start"), {})
        params = start.get("params", params)
        rounds = [r for r in records if r.get("event") == "round"]
        initial = {
            "time": start.get("time", t0),
            "eval_loss": start.get("initial_eval_loss"),
            "samples": 0,
            "bytes_sent": 0,
            "state_bytes_downloaded": 0,
            "round": 0,
        }
        per_peer.append([initial, *rounds])
    points = [
        Point(
            t=t,
            eval_loss=loss,
            samples_per_peer=samples,
            payload_bytes=float(sum(_payload(r) for r in rows)),
            bytes_sent=sampler.wire_bytes_at(t + t0),
        )
        for t, loss, samples, rows in _curve(per_peer, t0)
    ]
    last = [records[-1] for records in per_peer if records]
    return VariantRun(
        variant=variant,
        points=points,
        wall_s=t_end - t0,
        cpu_s=sampler.cpu_seconds,
        bytes_sent=sampler.wire_bytes,
        payload_bytes=float(sum(_payload(r) for r in last)),
        comm_rounds=float(np.mean([r.get("round", 0) for r in last])) if last else None,
        params=params,
        processes=config.peers,
        error=error,
        completed=completed,
        extra={
            "update_bytes": int(sum(r.get("update_bytes_sent", 0) for r in last)),
            "sync_bytes": int(sum(r.get("sync_bytes_sent", 0) for r in last)),
            "state_bytes_downloaded": int(sum(r.get("state_bytes_downloaded", 0) for r in last)),
        },
    )


def _worker_flags(config: CompareConfig, rank: int, world: int, steps: int, log: Path) -> list[str]:
    return [
        "--rank",
        str(rank),
        "--world",
        str(world),
        "--steps",
        str(steps),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(config.lr),
        "--eval-every",
        str(config.inner_steps),
        "--seed",
        str(config.seed),
        "--threads",
        str(config.torch_threads),
        "--log",
        str(log),
        *_model_flags(config.model),
    ]


def _python_m(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _free_port() -> int:
    """A free TCP port on loopback, for DDP's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_workers(
    config: CompareConfig,
    variant: str,
    work: Path,
    logs: list[Path],
    env: dict[str, str],
    lab: Any,
    sampler: ProcessSampler,
    t0: float,
) -> list[subprocess.Popen]:
    """Start every rank of a worker variant; hivemind's rank 0 first, the others join through it.

    Started processes go into ``processes`` as they start, so that a failure half-way kills them.
    """
    world = len(logs)
    processes: list[subprocess.Popen] = []
    try:
        if variant == "single":
            flags = _worker_flags(config, 0, config.peers, config.steps, logs[0])
            processes.append(
                launch(_python_m("p2pfm.bench.compare_ddp", "single", *flags), work / "rank-0.log", env)
            )
        elif variant == "ddp" and lab is not None:
            env["GLOO_SOCKET_IFNAME"] = "eth0"  # the lab host's link, not its loopback
            for rank in range(world):
                flags = _worker_flags(config, rank, world, config.steps, logs[rank])
                cmd = _python_m(
                    "p2pfm.bench.compare_ddp", "ddp", "--host", lab.addrs[0], "--port", "29500", *flags
                )
                processes.append(lab.popen(rank, cmd, log=work / f"rank-{rank}.log", env=env))
        elif variant == "ddp":
            port = _free_port()
            for rank in range(world):
                flags = _worker_flags(config, rank, world, config.steps, logs[rank])
                processes.append(
                    launch(
                        _python_m("p2pfm.bench.compare_ddp", "ddp", "--port", str(port), *flags),
                        work / f"rank-{rank}.log",
                        env,
                    )
                )
        else:
            mode = "local" if variant == "hivemind-local" else "grad"
            maddr_file = work / "maddr.txt"
            for rank in range(world):
                flags = _worker_flags(config, rank, world, config.steps, logs[rank])
                extra = ["--mode", mode, "--run-id", f"compare-{variant}-{os.getpid()}"]
                extra += ["--barrier-dir", str(work / "barrier")]
                if rank == 0:
                    extra += ["--maddr-file", str(maddr_file)]
                else:
                    extra += ["--initial-peer", maddr_file.read_text().strip()]
                processes.append(
                    launch(
                        _python_m("p2pfm.bench.compare_hivemind", *flags, *extra),
                        work / f"rank-{rank}.log",
                        env,
                    )
                )
                sampler.watch(processes[-1].pid)
                if rank == 0:
                    wait_for_file(maddr_file, processes[0], t0 + 120)
    except BaseException:
        kill_groups(processes)
        raise
    return processes


def run_workers(config: CompareConfig, variant: str, work: Path, lab: Any = None) -> VariantRun:
    """hivemind, ddp and single: our own worker modules, one process per rank."""
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(config.torch_threads)
    world = 1 if variant == "single" else config.peers
    logs = [work / f"rank-{rank}.jsonl" for rank in range(world)]
    error = None
    with ProcessSampler() as sampler:
        t0 = time.time()
        try:
            processes = _start_workers(config, variant, work, logs, env, lab, sampler, t0)
            for p in processes:
                sampler.watch(p.pid)
            error = supervise(processes, deadline(config, t0), sampler)
        except (RuntimeError, TimeoutError) as exc:
            error = str(exc)
        t_end = time.time()
    completed = error != TIME_CAP
    error = None if error == TIME_CAP else error
    if error:
        error += "\n" + "\n".join(tail(work / f"rank-{r}.log", ERROR_TAIL_LINES) for r in range(world))
    run = _worker_run(config, variant, [read_metrics(log) for log in logs], t0, t_end, sampler)
    run.error, run.completed = error, completed
    return run


def _worker_run(
    config: CompareConfig,
    variant: str,
    records: list[list[dict[str, Any]]],
    t0: float,
    t_end: float,
    sampler: ProcessSampler,
) -> VariantRun:
    """A worker variant's curve and totals from its ranks' logs (``start``, ``eval``, ``end`` records)."""
    world = len(records)
    starts = [next((r for r in recs if r["event"] == "start"), None) for recs in records]
    params = next((s["params"] for s in starts if s), 0)
    ends = [next((r for r in recs if r["event"] == "end"), {}) for recs in records]
    evaluating = [i for i, s in enumerate(starts) if s and s.get("initial_eval_loss") is not None]
    per_process = [
        [
            {
                "time": starts[i]["time"],
                "eval_loss": starts[i]["initial_eval_loss"],
                "samples": 0,
                "epoch": 0,
            },
            *[r for r in records[i] if r["event"] == "eval"],
        ]
        for i in evaluating
    ]
    ring = 2.0 * (world - 1) / world * params * 4  # bytes one rank sends per all-reduce (fp32)
    fp16_avg = 2.0 * (world - 1) / world * params * 2  # bytes one peer sends per fp16 averaging
    per_epoch = fp16_avg * (2 if variant == "hivemind" else 1)  # grad mode: gradients + parameters
    points = []
    for t, loss, samples, rows in _curve(per_process, t0):
        steps = samples // (config.batch_size * (config.peers if variant == "single" else 1))
        if variant == "ddp":
            payload = steps * ring * world
        elif variant.startswith("hivemind"):
            payload = sum(r.get("epoch", 0) for r in rows) * per_epoch
        else:
            payload = 0.0
        wire = payload if variant in ("ddp", "single") else sampler.wire_bytes_at(t + t0)
        points.append(
            Point(
                t=t,
                eval_loss=loss,
                samples_per_peer=samples // (config.peers if variant == "single" else 1),
                payload_bytes=payload,
                bytes_sent=wire,
            )
        )
    comm_rounds: float | None
    if variant == "single":
        comm_rounds, payload_total, wire_total = None, 0.0, 0.0
    elif variant == "ddp":
        comm_rounds = float(config.steps)
        payload_total = wire_total = config.steps * ring * world
    else:
        # A rank stopped at the time cap wrote no "end": its last evaluation has its epoch.
        epochs = [
            end["epochs"]
            if "epochs" in end
            else max((r.get("epoch", 0) for r in recs if r["event"] == "eval"), default=0)
            for end, recs in zip(ends, records, strict=True)
        ]
        comm_rounds = float(np.mean(epochs)) if epochs else None
        payload_total = sum(epochs) * per_epoch
        wire_total = sampler.wire_bytes
    return VariantRun(
        variant=variant,
        points=points,
        wall_s=t_end - t0,
        cpu_s=sampler.cpu_seconds,
        bytes_sent=wire_total,
        payload_bytes=payload_total,
        comm_rounds=comm_rounds,
        params=params,
        processes=world,
    )
