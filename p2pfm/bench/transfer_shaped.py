"""State download against a TCP copy over the same shaped link between two hosts (root).

:func:`measure_shaped_download` builds a two-host lab (:class:`p2pfm.netlab.netns.NetLab`: two
network namespaces on one switch), shapes both hosts' links to ``rate_mbit`` (and ``delay_ms``
each way of each link), and runs :mod:`p2pfm.bench.transfer_node` as the donor in host 0 and the
joiner in host 1: separate processes with separate ``p2pd`` daemons, every byte crossing the
shaped veth links. The joiner alternates a plain TCP copy of the donor's snapshot file, the
daemon's download with the chunks on the libp2p stream, and the same over the direct lane
(:mod:`p2pfm.core.lane`), and reports medians and ratios to the TCP copy.

On loopback (:func:`p2pfm.bench.transfer.measure_download`) the download is CPU-bound; a shaped
link is what users have (LAN, Wi-Fi), where the question is what share of the link the download
gets. Both processes still share this machine's cores: a rate the CPU cannot fill measures the
CPU again (compare ``tcp_copy_MBps`` with the link's rate: ``link_MBps``).

Kernels without ``sch_netem`` get the lab's fallback (``tbf`` rate, an NFQUEUE reader in Python
for the delay): with a delay, that reader is on every packet's path and on the same cores.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pfm.config import ConfigError
from p2pfm.procs import child_env, tail, wait_for_file


def _source_env() -> dict[str, str]:
    """A child's environment that imports this very ``p2pfm`` (an editable install may point elsewhere)."""
    env = child_env(1)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def measure_shaped_download(
    total_bytes: int,
    rate_mbit: float,
    delay_ms: float = 0.0,
    repeats: int = 2,
    work_dir: Path | None = None,
    *,
    chunk_bytes: int = 4 << 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Download a ``total_bytes`` state between two namespaces over links shaped to ``rate_mbit``
    (plus ``delay_ms`` on each direction of each link), beside a TCP copy of the same bytes; the figures.

    Needs root and iproute2 (raises :class:`ConfigError` saying so), about ``2 * total_bytes`` of disk
    in ``work_dir`` (a temporary folder by default) and ~``total_bytes / 3`` of memory while the donor
    writes its snapshot. Every process and namespace is gone when it returns or raises.
    """
    from p2pfm.netlab import netns

    reason = netns.available()
    if reason:
        raise ConfigError(f"--shaped: {reason} (run as root, with iproute2 installed)")
    if rate_mbit <= 0 or delay_ms < 0:
        raise ConfigError(
            f"--shaped: rate must be positive and delay non-negative, got {rate_mbit}, {delay_ms}"
        )
    repeats = max(1, repeats)
    own = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="p2pfm-bench-shaped-")) if work_dir is None else work_dir
    work.mkdir(parents=True, exist_ok=True)
    ready, out = work / "ready.json", work / "result.json"
    for stale in (ready, out):
        stale.unlink(missing_ok=True)
    node = [sys.executable, "-m", "p2pfm.bench.transfer_node"]
    common = ["--ready", str(ready), "--chunk-bytes", str(chunk_bytes)]
    env = _source_env()
    link_Bps = rate_mbit * 1e6 / 8
    started = time.time()
    try:
        with netns.NetLab(2) as lab:
            lab.shape_all(rate_mbit=rate_mbit, delay_ms=delay_ms or None)
            donor_log, joiner_log = work / "donor.log", work / "joiner.log"
            donor = lab.popen(
                0, [*node, "donor", "--address", lab.addrs[0], "--work", str(work / "donor"), *common,
                    "--bytes", str(total_bytes), "--seed", str(seed)],
                log=donor_log, env=env,
            )  # fmt: skip
            try:
                # writing the snapshot: random floats and hashes, tens of MB/s on a slow machine
                wait_for_file(ready, donor, time.time() + 120 + total_bytes / 5e6)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"the donor did not get ready: {exc}\n{tail(donor_log)}") from exc
            joiner = lab.popen(
                1, [*node, "joiner", "--address", lab.addrs[1], "--work", str(work / "joiner"), *common,
                    "--repeats", str(repeats), "--out", str(out)],
                log=joiner_log, env=env,
            )  # fmt: skip
            # three copies per repeat, each allowed a fifth of the link's rate, and start-up
            deadline = time.time() + 180 + repeats * 3 * total_bytes / (0.2 * min(link_Bps, 100e6))
            _wait_joiner(joiner, donor, deadline, joiner_log, donor_log)
            if not out.exists():
                raise RuntimeError(f"the joiner exited without writing {out}\n{tail(joiner_log)}")
            result = json.loads(out.read_text())
            shaper = lab.shaper
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
        else:  # the big files, not the logs and JSON
            for end in ("donor", "joiner"):
                shutil.rmtree(work / end, ignore_errors=True)
    return {
        "link": {
            "rate_mbit": rate_mbit, "delay_ms_each_way_each_link": delay_ms,
            "rtt_added_ms": 4 * delay_ms, "shaper": shaper, "link_MBps": round(link_Bps / 1e6, 1),
        },
        "cores": os.cpu_count(),
        "wall_s": round(time.time() - started, 1),
        **result,
    }  # fmt: skip


def _wait_joiner(joiner, donor, deadline: float, joiner_log: Path, donor_log: Path) -> None:
    """Wait until the joiner exits; raise (with the log that has the error) if it fails, if the
    donor dies first, or at ``deadline``."""
    while joiner.poll() is None:
        if donor.poll() is not None:
            raise RuntimeError(f"the donor exited with {donor.returncode} mid-run\n{tail(donor_log)}")
        if time.time() > deadline:
            raise TimeoutError(f"the joiner did not finish in time\n{tail(joiner_log)}")
        time.sleep(0.2)
    if joiner.returncode != 0:
        raise RuntimeError(f"the joiner exited with {joiner.returncode}\n{tail(joiner_log)}")
