"""``p2pfm bench compare``: p2pfm beside hivemind, DDP and one process, on the same task.

Every variant trains the same model (default byte-level GPT, or a tiny one for all alike in
``--quick``) from the same seed, on the same shards ``ShardSpec(i, peers)``, with the same
number of processes on loopback, the same batch per step and the same samples per peer,
and scores the same fixed held-out batches every ``inner_steps`` local steps:

- ``p2pfm``              real ``p2pfm peer`` processes (:class:`p2pfm.swarm.LocalSwarm`), defaults
                         (top-k + int8 gossip with error feedback, fanout 2, sync every 10 rounds);
                         ``rounds = samples_per_peer / (inner_steps * batch_size)``;
- ``p2pfm-uncompressed`` the same with ``--codec none`` (fp32 updates);
- ``hivemind``           ``hivemind.Optimizer`` peers (:mod:`p2pfm.bench.compare_hivemind`);
- ``hivemind-local``     (opt-in) the same with ``use_local_updates=True`` (hivemind's quickstart);
- ``ddp``                DistributedDataParallel over gloo, all-reduce every step (:mod:`p2pfm.bench.compare_ddp`);
- ``single``             one process, total batch ``peers * batch_size``, same total samples.

Every process gets ``max(1, cores // peers)`` torch threads, ``single`` included. Processes
of a distributed variant wait for each other before training (p2pfm: ``--min-peers``;
hivemind: a file barrier after ``load_state_from_peers``; DDP: ``init_process_group``), and
variants run back to back, never concurrently. ``--time-cap`` stops a variant that runs
longer and reports what it reached (``completed: false``).

``--shaped`` (root; :mod:`p2pfm.netlab.netns`) runs p2pfm and ddp with every process in its
own network namespace behind a veth link shaped to 50 Mbit/s and 30 ms at each end (netem). On
a kernel without the netem qdisc it applies the rate alone (tbf) and says so in ``link``.

What is measured, per variant (one row each):

- ``final_eval_loss``      mean over processes of their last held-out loss (nats/byte);
- ``time_to_target_s``     launcher wall time from starting the first process until the curve
                           (mean over processes of their k-th evaluation, at the time the last of
                           them reported it) is <= the target; null if never. The default target
                           is 5% above ``single``'s final loss (``single`` is the cheapest way to
                           reach a loss at this scale, so every reasonable variant should get
                           within 5% of it); ``--target-loss`` overrides;
- ``bytes_sent``           bytes on the wire: for p2pfm and hivemind *measured* as half of what
                           every ``p2pd`` child wrote (``/proc/PID/io`` ``wchar``: each byte sent
                           over TCP on loopback is written once by the sender's p2pd to its
                           socket and once by the receiver's p2pd to its client; libp2p framing,
                           DHT traffic and state downloads included); for ddp the ring all-reduce
                           volume ``2 (n-1)/n * 4 * params`` per rank per step; 0 for single;
- ``payload_bytes``        what the algorithm itself sends: p2pfm's daemon counters (updates plus
                           state downloads: joins and the periodic sync), hivemind's estimate
                           (``2 (n-1)/n * params * 16 bit`` per averaging per peer; gradients and
                           parameters in grad mode), ddp as above;
- ``bits_per_param_per_round``  ``payload_bytes * 8 / params / peers / rounds`` with rounds = gossip
                           rounds (p2pfm), epochs (hivemind), steps (ddp);
- ``cpu_utilisation``      CPU seconds of every process of the variant (children included, sampled
                           from ``/proc``) / wall / cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.config import ConfigError, require
from p2pfm.daemon.metrics import read_metrics
from p2pfm.model.gpt import GPTConfig

ALL_VARIANTS = ("p2pfm", "p2pfm-uncompressed", "hivemind", "ddp", "single")
OPTIONAL_VARIANTS = ("hivemind-local",)
SHAPED_VARIANTS = ("p2pfm", "p2pfm-uncompressed", "ddp")
EDGE_LINK = (50.0, 30.0)  # Mbit/s and ms of delay on each host's link: a good home/edge uplink
QUICK_MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)  # ~0.1M params: seconds per round


@dataclass(frozen=True)
class CompareConfig:
    """One side-by-side run. Defaults: the full comparison (4 peers, default GPT)."""

    peers: int = 4
    samples_per_peer: int = 2400  # 150 steps of 16 (15 rounds): ~10-15 min for all five variants on 2 shared cores
    batch_size: int = 16  # the daemon's train.batch_size default
    inner_steps: int = 10  # p2pfm's H (its default); also every variant's evaluation period in steps
    lr: float = 3e-3  # the daemon's inner AdamW lr, used by every variant
    seed: int = 0
    target_loss: float | None = None  # None: 5% above single's final loss
    model: GPTConfig = field(default_factory=GPTConfig)
    variants: tuple[str, ...] = ALL_VARIANTS
    out_dir: Path = Path("runs/compare")
    threads: int = 0  # 0: max(1, cores // peers)
    timeout_s: float = 1800.0  # per variant; a variant that overruns is killed and reported as failed
    time_cap_s: float | None = None  # per variant: stop here and report what it reached (completed: false)
    quick: bool = False
    shaped: tuple[float, float] | None = None  # (Mbit/s, ms one way per link end): each process in its own netns
    command: str = ""

    def __post_init__(self) -> None:
        require(self.peers >= 1, "peers", f"must be at least 1, got {self.peers}")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.inner_steps >= 1, "inner_steps", "must be at least 1")
        per_round = self.inner_steps * self.batch_size
        require(self.samples_per_peer >= per_round and self.samples_per_peer % per_round == 0, "samples_per_peer",
                f"must be a positive multiple of inner_steps * batch_size = {per_round}, got {self.samples_per_peer}")
        require(self.lr > 0, "lr", "must be positive")
        require(self.target_loss is None or self.target_loss > 0, "target_loss", "must be positive")
        unknown = set(self.variants) - set(ALL_VARIANTS) - set(OPTIONAL_VARIANTS)
        require(not unknown and len(self.variants) > 0, "variants",
                f"unknown {sorted(unknown)}; choose from {', '.join(ALL_VARIANTS + OPTIONAL_VARIANTS)}")
        require(self.threads >= 0, "threads", "must be non-negative")
        require(self.time_cap_s is None or self.time_cap_s > 0, "time_cap_s", "must be positive")
        require(self.shaped is None or set(self.variants) <= set(SHAPED_VARIANTS), "variants",
                f"with --shaped only {', '.join(SHAPED_VARIANTS)} run (one network namespace per process)")

    @property
    def steps(self) -> int:
        return self.samples_per_peer // self.batch_size

    @property
    def rounds(self) -> int:
        return self.steps // self.inner_steps

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.peers)


def quick_config(**overrides: Any) -> CompareConfig:
    """Small settings for ``--quick``: 2 peers, a ~0.1M-parameter GPT, 6 rounds of 10 steps of 8."""
    values: dict[str, Any] = {"peers": 2, "samples_per_peer": 480, "batch_size": 8, "model": QUICK_MODEL,
                              "quick": True, "timeout_s": 300.0}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CompareConfig(**values)


# --- measuring processes ------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, process group, CPU seconds) of a live process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return comm, int(rest[2]), (int(rest[11]) + int(rest[12])) / _CLOCK_TICKS


def _read_wchar(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class ProcessSampler:
    """Polls ``/proc`` for every process in the watched process groups (workers, their forks, p2pd).

    Keeps each pid's latest CPU time and, for ``p2pd`` processes, bytes written, and a time
    series of the p2pd total. A process's last ``interval`` before exit is missed: CPU and
    bytes are lower bounds by at most that much.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.groups: set[int] = set()
        self.cpu: dict[int, float] = {}
        self.p2pd_written: dict[int, int] = {}
        self.series: list[tuple[float, int]] = []  # (unix time, total p2pd wchar)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def watch(self, pgid: int) -> None:
        with self._lock:
            self.groups.add(pgid)

    def sample(self) -> None:
        with self._lock:
            groups = set(self.groups)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            stat = _read_stat(pid)
            if stat is None or stat[1] not in groups:
                continue
            comm, _, cpu = stat
            self.cpu[pid] = max(cpu, self.cpu.get(pid, 0.0))
            if comm == "p2pd":
                written = _read_wchar(pid)
                if written is not None:
                    self.p2pd_written[pid] = max(written, self.p2pd_written.get(pid, 0))
        self.series.append((time.time(), sum(self.p2pd_written.values())))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_seconds(self) -> float:
        return float(sum(self.cpu.values()))

    def wire_bytes_at(self, unix_time: float) -> float:
        """Measured bytes on the wire (half of all p2pd writes) up to ``unix_time``."""
        if not self.series:
            return 0.0
        times, totals = zip(*self.series, strict=True)
        return float(np.interp(unix_time, times, totals)) / 2.0

    @property
    def wire_bytes(self) -> float:
        return sum(self.p2pd_written.values()) / 2.0


# --- shaped links: p2pfm.netlab ----------------------------------------------------------------
def load_netlab() -> Any:
    """The network-namespace lab (:mod:`p2pfm.netlab.netns`), once this machine is known to run it."""
    from p2pfm.netlab import netns

    reason = netns.available()
    if reason:
        raise ConfigError(f"--shaped: {reason}")
    return netns


# --- running variants ---------------------------------------------------------------------------
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


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)  # one BLAS/OpenMP pool per process, sized like torch's
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _model_flags(model: GPTConfig) -> list[str]:
    return ["--n-layer", str(model.n_layer), "--n-embd", str(model.n_embd), "--n-head", str(model.n_head),
            "--block-size", str(model.block_size)]


def _worker_flags(config: CompareConfig, rank: int, world: int, steps: int, log: Path) -> list[str]:
    return ["--rank", str(rank), "--world", str(world), "--steps", str(steps), "--batch-size", str(config.batch_size),
            "--lr", str(config.lr), "--eval-every", str(config.inner_steps), "--seed", str(config.seed),
            "--threads", str(config.torch_threads), "--log", str(log), *_model_flags(config.model)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


TIME_CAP = "stopped at the time cap"


def _deadline(config: CompareConfig, t0: float) -> tuple[float, bool]:
    """(when to stop the variant, whether that is the time cap rather than the failure timeout)."""
    if config.time_cap_s is not None and config.time_cap_s < config.timeout_s:
        return t0 + config.time_cap_s, True
    return t0 + config.timeout_s, False


def _wait_all(processes: list[subprocess.Popen], deadline: tuple[float, bool], sampler: ProcessSampler) -> str | None:
    """Wait for every process; on overrun or a failure kill all groups. Returns an error or None."""
    error = None
    while any(p.poll() is None for p in processes):
        if time.time() > deadline[0]:
            return _stop_all(processes, sampler, TIME_CAP if deadline[1] else "timed out")
        failed = [p for p in processes if p.poll() not in (None, 0)]
        if failed:
            error = f"process {failed[0].args[:4]} exited with {failed[0].returncode}"
            break
        time.sleep(0.2)
    error = _stop_all(processes, sampler, error)
    if error is None:
        bad = [p for p in processes if p.returncode != 0]
        if bad:
            error = f"process {bad[0].args[:4]} exited with {bad[0].returncode}"
    return error


def _stop_all(processes: list[subprocess.Popen], sampler: ProcessSampler, error: str | None) -> str | None:
    sampler.sample()
    for p in processes:
        if p.poll() is None:
            _kill_group(p)
        else:
            # p2pd or a DHT child may outlive a clean exit for a moment: nothing of ours lingers.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return error


def _curve(per_process: list[list[dict[str, Any]]], t0: float) -> list[tuple[float, float, int, list[dict]]]:
    """Group the k-th records of every process: (t of the last, mean loss, samples, records)."""
    count = min((len(r) for r in per_process), default=0)
    points = []
    for k in range(count):
        rows = [records[k] for records in per_process]
        losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        points.append((max(r["time"] for r in rows) - t0, float(np.mean(losses)) if losses else float("nan"),
                       int(rows[0].get("samples", 0)), rows))
    return points


def _error_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _payload(record: dict[str, Any]) -> int:
    """Bytes a p2pfm peer sent so far: its ``bytes_sent`` counts updates, syncs and state served."""
    return int(record.get("bytes_sent", 0))


def run_p2pfm(config: CompareConfig, variant: str, work: Path, lab: Any = None) -> VariantRun:
    from p2pfm.cli.peer import PEER_FLAGS
    from p2pfm.swarm import LocalSwarm

    peer_args = ["--rounds", str(config.rounds), "--seed", str(config.seed), "--inner-steps", str(config.inner_steps),
                 "--batch-size", str(config.batch_size), "--lr", str(config.lr), *_model_flags(config.model)]
    if variant == "p2pfm-uncompressed":
        peer_args += ["--codec", "none"]
    if "--min-peers" in PEER_FLAGS:  # quorum before training: no peer trains alone while others start
        peer_args += ["--min-peers", str(config.peers)]
    run_id = f"compare-{variant}-{os.getpid()}"
    error = None
    with ProcessSampler() as sampler, LocalSwarm(work, peer_args, threads_per_peer=config.torch_threads,
                                                 run_id=run_id) as swarm:
        t0 = time.time()
        try:
            for index in range(config.peers):
                if lab is None:
                    peer = swarm.add_peer(shard=index, num_shards=config.peers)
                    peer.start()
                else:  # the same peer, run inside host ``index`` of the lab, listening on its address
                    listen = ["--listen", f"/ip4/{lab.addrs[index]}/tcp/0"]
                    peer = swarm.add_peer(shard=index, num_shards=config.peers, extra=listen)
                    peer.work_dir.mkdir(parents=True, exist_ok=True)
                    peer.process = lab.popen(index, [sys.executable, "-m", "p2pfm", "peer", *peer.args],
                                             log=peer.log_path, env=swarm.env)
                sampler.watch(peer.process.pid)
                if index == 0:
                    swarm.bootstrap = peer.wait_ready()["maddrs"][0]
            error = _wait_all([p.process for p in swarm.peers], _deadline(config, t0), sampler)
        except (RuntimeError, TimeoutError) as exc:
            error = str(exc)
        t_end = time.time()
    completed = error != TIME_CAP
    error = None if error == TIME_CAP else error
    if error:
        error += "\n" + "\n".join(_error_tail(p.log_path) for p in swarm.peers)
    per_peer = []
    params = 0
    for peer in swarm.peers:
        records = peer.metrics()
        start = next((r for r in records if r.get("event") == "start"), {})
        params = start.get("params", params)
        rounds = [r for r in records if r.get("event") == "round"]
        initial = {"time": start.get("time", t0), "eval_loss": start.get("initial_eval_loss"), "samples": 0,
                   "bytes_sent": 0, "state_bytes_downloaded": 0, "round": 0}
        per_peer.append([initial, *rounds])
    points = [
        Point(t=t, eval_loss=loss, samples_per_peer=samples, payload_bytes=float(sum(_payload(r) for r in rows)),
              bytes_sent=sampler.wire_bytes_at(t + t0))
        for t, loss, samples, rows in _curve(per_peer, t0)
    ]
    last = [records[-1] for records in per_peer if records]
    return VariantRun(
        variant=variant, points=points, wall_s=t_end - t0, cpu_s=sampler.cpu_seconds, bytes_sent=sampler.wire_bytes,
        payload_bytes=float(sum(_payload(r) for r in last)),
        comm_rounds=float(np.mean([r.get("round", 0) for r in last])) if last else None, params=params,
        processes=config.peers, error=error, completed=completed,
        extra={"update_bytes": int(sum(r.get("update_bytes_sent", 0) for r in last)),
               "sync_bytes": int(sum(r.get("sync_bytes_sent", 0) for r in last)),
               "state_bytes_downloaded": int(sum(r.get("state_bytes_downloaded", 0) for r in last))},
    )


def _launch(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def run_workers(config: CompareConfig, variant: str, work: Path, lab: Any = None) -> VariantRun:
    """hivemind, ddp and single: our own worker modules, one process per rank."""
    work.mkdir(parents=True, exist_ok=True)
    env = _env(config.torch_threads)
    world = 1 if variant == "single" else config.peers
    logs = [work / f"rank-{rank}.jsonl" for rank in range(world)]
    processes: list[subprocess.Popen] = []
    error = None
    with ProcessSampler() as sampler:
        t0 = time.time()
        try:
            if variant == "single":
                flags = _worker_flags(config, 0, config.peers, config.steps, logs[0])
                processes.append(_launch(["p2pfm.bench.compare_ddp", "single", *flags], work / "rank-0.log", env))
            elif variant == "ddp" and lab is not None:
                env["GLOO_SOCKET_IFNAME"] = "eth0"  # the lab host's link, not its loopback
                for rank in range(world):
                    flags = _worker_flags(config, rank, world, config.steps, logs[rank])
                    cmd = [sys.executable, "-m", "p2pfm.bench.compare_ddp", "ddp", "--host", lab.addrs[0],
                           "--port", "29500", *flags]
                    processes.append(lab.popen(rank, cmd, log=work / f"rank-{rank}.log", env=env))
            elif variant == "ddp":
                port = _free_port()
                for rank in range(world):
                    flags = _worker_flags(config, rank, world, config.steps, logs[rank])
                    processes.append(_launch(["p2pfm.bench.compare_ddp", "ddp", "--port", str(port), *flags],
                                             work / f"rank-{rank}.log", env))
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
                    processes.append(_launch(["p2pfm.bench.compare_hivemind", *flags, *extra],
                                             work / f"rank-{rank}.log", env))
                    sampler.watch(processes[-1].pid)
                    if rank == 0:
                        _wait_for_file(maddr_file, processes[0], t0 + 120)
            for p in processes:
                sampler.watch(p.pid)
            error = _wait_all(processes, _deadline(config, t0), sampler)
        except (RuntimeError, TimeoutError) as exc:
            error = str(exc)
            for p in processes:
                _kill_group(p)
        t_end = time.time()
    completed = error != TIME_CAP
    error = None if error == TIME_CAP else error
    if error:
        error += "\n" + "\n".join(_error_tail(work / f"rank-{r}.log") for r in range(world))
    records = [read_metrics(log) for log in logs]
    starts = [next((r for r in recs if r["event"] == "start"), None) for recs in records]
    params = next((s["params"] for s in starts if s), 0)
    ends = [next((r for r in recs if r["event"] == "end"), {}) for recs in records]
    evaluating = [i for i, s in enumerate(starts) if s and s.get("initial_eval_loss") is not None]
    per_process = [
        [{"time": starts[i]["time"], "eval_loss": starts[i]["initial_eval_loss"], "samples": 0, "epoch": 0},
         *[r for r in records[i] if r["event"] == "eval"]]
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
        points.append(Point(t=t, eval_loss=loss, samples_per_peer=samples // (config.peers if variant == "single" else 1),
                            payload_bytes=payload, bytes_sent=wire))
    comm_rounds: float | None
    if variant == "single":
        comm_rounds, payload_total, wire_total = None, 0.0, 0.0
    elif variant == "ddp":
        comm_rounds = float(config.steps)
        payload_total = wire_total = config.steps * ring * world
    else:
        # A rank stopped at the time cap wrote no "end": its last evaluation has its epoch.
        epochs = [end["epochs"] if "epochs" in end else max((r.get("epoch", 0) for r in recs if r["event"] == "eval"),
                                                            default=0)
                  for end, recs in zip(ends, records, strict=True)]
        comm_rounds = float(np.mean(epochs)) if epochs else None
        payload_total = sum(epochs) * per_epoch
        wire_total = sampler.wire_bytes
    return VariantRun(
        variant=variant, points=points, wall_s=t_end - t0, cpu_s=sampler.cpu_seconds, bytes_sent=wire_total,
        payload_bytes=payload_total, comm_rounds=comm_rounds, params=params, processes=world, error=error,
        completed=completed,
    )


def _wait_for_file(path: Path, process: subprocess.Popen, deadline: float) -> None:
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode} before writing {path}")
        if time.time() > deadline:
            raise TimeoutError(f"{path} not written in time")
        time.sleep(0.1)


def run_variant(config: CompareConfig, variant: str, work: Path) -> VariantRun:
    """One variant; with ``config.shaped`` in a fresh lab of one namespace per process, links shaped."""
    runner = run_p2pfm if variant.startswith("p2pfm") else run_workers
    if config.shaped is None:
        return runner(config, variant, work)
    netns = load_netlab()
    rate_mbit, delay_ms = config.shaped
    with netns.NetLab(config.peers) as lab:
        link = shape_links(lab, rate_mbit, delay_ms)
        run = runner(config, variant, work, lab)
    run.extra["link"] = link
    return run


def shape_links(lab: Any, rate_mbit: float, delay_ms: float) -> str:
    """Shape every host's link both ways with netem; where the kernel lacks netem, rate only (tbf).

    Returns what was applied, for the report.
    """
    try:
        lab.shape_all(rate_mbit=rate_mbit, delay_ms=delay_ms)
        return f"{rate_mbit:g} Mbit/s and {delay_ms:g} ms on each link end (netem, both directions)"
    except subprocess.CalledProcessError:
        pass
    # tbf: rate with a burst of ~1 ms of traffic and a queue bounded to 200 ms; adds no delay.
    tbf = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", f"{max(2, int(rate_mbit * 1000 / 8 / 1000))}kb",
           "latency", "200ms"]
    for i in range(lab.k):
        lab.exec(i, "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf)
        lab.sw("tc", "qdisc", "replace", "dev", f"p{i}", "root", *tbf)
    return f"{rate_mbit:g} Mbit/s on each link end (tbf), no added delay: this kernel has no netem qdisc"


# --- the report ---------------------------------------------------------------------------------
def default_target(runs: list[VariantRun]) -> float | None:
    """5% above single's final loss; without single, the worst final loss (every variant reaches it)."""
    finals = {r.variant: r.points[-1].eval_loss for r in runs if r.points and not r.error}
    if "single" in finals:
        return round(finals["single"] * 1.05, 4)
    return max(finals.values()) if finals else None


def summarize_runs(config: CompareConfig, runs: list[VariantRun]) -> tuple[list[dict[str, Any]], float | None]:
    target = config.target_loss if config.target_loss is not None else default_target(runs)
    cores = os.cpu_count() or 1
    rows = []
    for run in runs:
        reached = next((p.t for p in run.points if target is not None and p.eval_loss <= target), None)
        rounds = run.comm_rounds
        bits = (8.0 * run.payload_bytes / run.params / run.processes / rounds
                if rounds and run.params and run.processes else None)
        wire_bits = (8.0 * run.bytes_sent / run.params / run.processes / rounds
                     if rounds and run.params and run.processes else None)
        rows.append({
            "variant": run.variant,
            "final_eval_loss": run.points[-1].eval_loss if run.points else None,
            "time_to_target_s": reached,
            "bytes_sent": run.bytes_sent,
            "bits_per_param_per_round": bits,
            "wire_bits_per_param_per_round": wire_bits,
            "payload_bytes": run.payload_bytes,
            "bytes_to_target": next((p.bytes_sent for p in run.points if target is not None and p.eval_loss <= target),
                                    None),
            "wall_s": run.wall_s,
            "cpu_seconds": run.cpu_s,
            "cpu_utilisation": run.cpu_s / max(run.wall_s, 1e-9) / cores,
            "comm_rounds_per_peer": rounds,
            "processes": run.processes,
            "samples_per_peer": run.points[-1].samples_per_peer if run.points else 0,
            "params": run.params,
            "target_loss": target,
            "error": run.error,
            "completed": run.completed,
            **run.extra,
        })
    base = next((r for r in rows if r["variant"] == "p2pfm"), None)
    for row in rows:
        ok = base is not None and base["time_to_target_s"] and row["time_to_target_s"] is not None
        row["time_to_target_vs_p2pfm"] = row["time_to_target_s"] / base["time_to_target_s"] if ok else None
    return rows, target


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_table(rows: list[dict[str, Any]], target: float | None) -> str:
    header = (f"{'variant':<19} {'final loss':>10} {'t->target s':>11} {'x p2pfm':>8} {'wall s':>7} "
              f"{'bytes sent':>10} {'payload':>10} {'bits/param/rnd':>14} {'CPU %':>6}")
    lines = [f"target eval loss {target:.4f} nats/byte" if target is not None else "no target", header,
             "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['variant']:<19} {_fmt(row['final_eval_loss'], '.4f'):>10} {_fmt(row['time_to_target_s'], '.1f'):>11} "
            f"{_fmt(row['time_to_target_vs_p2pfm'], '.2f'):>8} {row['wall_s']:>7.1f} {_fmt_bytes(row['bytes_sent']):>10} "
            f"{_fmt_bytes(row['payload_bytes']):>10} {_fmt(row['bits_per_param_per_round'], '.3f'):>14} "
            f"{100 * row['cpu_utilisation']:>6.0f}" + ("  FAILED" if row["error"] else "")
            + ("" if row["completed"] else f"  (time cap: {row['samples_per_peer']} samples/peer)")
        )
    return "\n".join(lines)


def plot(runs: list[VariantRun], target: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if not run.points:
            continue
        xs = [p.t for p in run.points]
        ys = [p.eval_loss for p in run.points]
        (line,) = left.plot(xs, ys, marker=".", label=run.variant)
        with_bytes = [(p.bytes_sent, p.eval_loss) for p in run.points if p.bytes_sent > 0]
        if with_bytes:
            bx, by = zip(*with_bytes, strict=True)
            right.plot(bx, by, marker=".", color=line.get_color(), label=run.variant)
        elif run.variant == "single":
            right.axhline(ys[-1], color=line.get_color(), linestyle=":", label="single (no bytes): final")
    for ax in (left, right):
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(alpha=0.3)
    left.set_xlabel("wall time since the first process started (s)")
    right.set_xlabel("bytes sent, all processes (log)")
    right.set_xscale("log")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_compare(config: CompareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every variant back to back; write ``compare.json`` and ``compare.png`` under ``out_dir``."""
    out = config.out_dir
    raw = out / "raw"
    if raw.exists():
        shutil.rmtree(raw)  # per-process logs of an earlier run: only the summary files are kept
    raw.mkdir(parents=True, exist_ok=True)
    runs = []
    started = time.time()
    for variant in config.variants:
        if progress:
            print(f"[compare] {variant}: {config.peers if variant != 'single' else 1} process(es), "
                  f"{config.samples_per_peer} samples per peer ...", file=sys.stderr, flush=True)
        run = run_variant(config, variant, raw / variant)
        runs.append(run)
        if progress:
            status = f"FAILED: {run.error.splitlines()[0]}" if run.error else (
                f"final loss {run.points[-1].eval_loss:.4f}" if run.points else "no points")
            print(f"[compare] {variant}: {run.wall_s:.1f} s, {status}", file=sys.stderr, flush=True)
    rows, target = summarize_runs(config, runs)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    title = (f"p2pfm bench compare: {config.peers} peers, {runs[0].params if runs else 0:,} params, "
             f"{config.samples_per_peer} samples/peer, {os.cpu_count()} cores"
             + (f", links {config.shaped[0]:g} Mbit/s {config.shaped[1]:g} ms" if config.shaped else "") + f" ({date})")
    plot(runs, target, out / "compare.png", title)
    result = {
        "date": date,
        "command": config.command,
        "git": _git_state(),
        "cores": os.cpu_count(),
        "total_seconds": time.time() - started,
        "config": {**{k: v for k, v in asdict(config).items() if k not in ("out_dir", "model")},
                   "model": asdict(config.model), "torch_threads": config.torch_threads,
                   "rounds": config.rounds, "steps": config.steps},
        "target_loss": target,
        "rows": rows,
        "curves": {run.variant: [asdict(p) for p in run.points] for run in runs},
    }
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _git_state() -> str:
    """The commit the peers ran (plus "+dirty": the shared tree may hold others' uncommitted work)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def config_from_args(args: Any) -> CompareConfig:
    """Build the config from ``p2pfm bench compare`` flags (``--quick`` picks the small defaults)."""
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else None
    if getattr(args, "shaped", False) and variants is None:
        variants = ("p2pfm", "ddp")
    shaped = getattr(args, "shaped", False)
    common = {"peers": args.peers, "time_cap_s": args.time_cap, "shaped": EDGE_LINK if shaped else None, "samples_per_peer": args.samples_per_peer, "target_loss": args.target_loss,
              "seed": args.seed, "variants": variants, "out_dir": args.out, "command": "p2pfm " + " ".join(sys.argv[1:])}
    if args.quick:
        return quick_config(**common)
    try:
        return CompareConfig(**{k: v for k, v in common.items() if v is not None})
    except TypeError as exc:  # pragma: no cover - flags map 1:1 to fields
        raise ConfigError(str(exc)) from None


__all__ = ["CompareConfig", "quick_config", "run_compare", "format_table", "config_from_args", "replace"]
