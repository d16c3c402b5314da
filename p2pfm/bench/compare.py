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

Modules: :mod:`~p2pfm.bench.compare_config` (the run's settings), :mod:`~p2pfm.bench.compare_variants`
(running one variant), :mod:`~p2pfm.bench.sampler` (CPU and p2pd bytes from ``/proc``),
:mod:`~p2pfm.bench.compare_report` (rows, table, plot); this one runs them back to back and
writes ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from p2pfm.bench.compare_config import CompareConfig
from p2pfm.bench.compare_report import plot, summarize_runs
from p2pfm.bench.compare_variants import VariantRun, run_p2pfm, run_workers
from p2pfm.config import ConfigError


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


def load_netlab() -> Any:
    """The network-namespace lab (:mod:`p2pfm.netlab.netns`), once this machine is known to run it."""
    from p2pfm.netlab import netns

    reason = netns.available()
    if reason:
        raise ConfigError(f"--shaped: {reason}")
    return netns


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
    tbf = [
        "tbf",
        "rate",
        f"{rate_mbit:g}mbit",
        "burst",
        f"{max(2, int(rate_mbit * 1000 / 8 / 1000))}kb",
        "latency",
        "200ms",
    ]
    for i in range(lab.k):
        lab.exec(i, "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf)
        lab.sw("tc", "qdisc", "replace", "dev", f"p{i}", "root", *tbf)
    return f"{rate_mbit:g} Mbit/s on each link end (tbf), no added delay: this kernel has no netem qdisc"


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
            print(
                f"[compare] {variant}: {config.peers if variant != 'single' else 1} process(es), "
                f"{config.samples_per_peer} samples per peer ...",
                file=sys.stderr,
                flush=True,
            )
        run = run_variant(config, variant, raw / variant)
        runs.append(run)
        if progress:
            status = (
                f"FAILED: {run.error.splitlines()[0]}"
                if run.error
                else (f"final loss {run.points[-1].eval_loss:.4f}" if run.points else "no points")
            )
            print(f"[compare] {variant}: {run.wall_s:.1f} s, {status}", file=sys.stderr, flush=True)
    rows, target = summarize_runs(config, runs)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    title = (
        f"p2pfm bench compare: {config.peers} peers, {runs[0].params if runs else 0:,} params, "
        f"{config.samples_per_peer} samples/peer, {os.cpu_count()} cores"
        + (f", links {config.shaped[0]:g} Mbit/s {config.shaped[1]:g} ms" if config.shaped else "")
        + f" ({date})"
    )
    plot(runs, target, out / "compare.png", title)
    result = {
        "date": date,
        "command": config.command,
        "git": _git_state(),
        "cores": os.cpu_count(),
        "total_seconds": time.time() - started,
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("out_dir", "model")},
            "model": asdict(config.model),
            "torch_threads": config.torch_threads,
            "rounds": config.rounds,
            "steps": config.steps,
        },
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
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")
