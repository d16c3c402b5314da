"""Real ``p2pfm peer`` processes, one per host of a :class:`netns.NetLab`.

Peer i listens on its host's own address (10.77.0.<i+1>:7000) and the others join peer 0.
Beyond loopback a peer needs a swarm authority: the lab makes one (``ROOT/authority.key``) and
certifies each peer, as an operator would with ``p2pfm admit``.
What a test or benchmark reads comes from each peer's work dir: ``status.json``,
``metrics.jsonl`` and the checkpoint (for the consensus distance between peers' models).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from netns import NetLab, stop_process_group

from p2pfm.core.admission import issue_certificate
from p2pfm.core.identity import Identity

PORT = 7000
# The integration tests' tiny GPT: rounds of about a second on a shared CPU.
TINY_MODEL = [
    "--n-layer",
    "2",
    "--n-embd",
    "64",
    "--n-head",
    "4",
    "--block-size",
    "64",
    "--batch-size",
    "16",
    "--eval-batches",
    "2",
]


class LabSwarm:
    """Peers on the lab's hosts. ``stop_all()`` (also done by the lab's close) ends them."""

    def __init__(self, lab: NetLab, root: Path, peer_args: Sequence[str], run_id: str = "lab") -> None:
        self.lab = lab
        self.root = root
        self.peer_args = list(peer_args)
        self.run_id = run_id
        self.procs: dict[int, object] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.authority = Identity.generate()
        self.authority.save(root / "authority.key")

    def admission_args(self, work: Path) -> list[str]:
        """This peer's key (made once) and a certificate for it: the flags that present them."""
        key = work / "peer.key"
        if not key.exists():
            Identity.generate().save(key)
        cert = issue_certificate(self.authority, self.run_id, Identity.load(key).peer_id, issued=time.time())
        (work / "peer.cert").write_bytes(cert)
        return ["--authority", self.authority.peer_id, "--cert", str(work / "peer.cert")]

    def work_dir(self, i: int) -> Path:
        return self.root / f"peer-{i}"

    def maddr(self, i: int) -> str:
        libp2p_id = self.status(i).get("libp2p_id")
        if not libp2p_id:
            raise RuntimeError(f"peer {i} has not written its libp2p id yet")
        return f"/ip4/{self.lab.addrs[i]}/tcp/{PORT}/p2p/{libp2p_id}"

    def start(self, i: int, join: Sequence[int] = ()) -> None:
        work = self.work_dir(i)
        work.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "p2pfm",
            "peer",
            "--key",
            str(work / "peer.key"),
            "--work-dir",
            str(work),
            "--run-id",
            self.run_id,
            "--listen",
            f"/ip4/{self.lab.addrs[i]}/tcp/{PORT}",
            "--threads",
            "1",
            *self.admission_args(work),
            *self.peer_args,
        ]
        if join:
            cmd += ["--initial-peers", *(self.maddr(j) for j in join)]
        self.procs[i] = self.lab.popen(i, cmd, log=work / "peer.log")

    def start_all(self, k: int | None = None, timeout: float = 300) -> None:
        """Peer 0 first; the others join it once it has written its address."""
        k = self.lab.k if k is None else k
        self.start(0)
        self.wait(lambda: bool(self.status(0).get("libp2p_id")), timeout, "peer 0 to start")
        for i in range(1, k):
            self.start(i, join=[0])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop_process_group(proc, grace_s=15)

    # --- reading ----------------------------------------------------------------------
    def status(self, i: int) -> dict:
        try:
            return json.loads((self.work_dir(i) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def round(self, i: int) -> int:
        return int(self.status(i).get("round", -1))

    def live(self, i: int) -> set[str]:
        return set(self.status(i).get("live_peers", []))

    def peer_id(self, i: int) -> str:
        return self.status(i).get("peer_id", "")

    def metrics(self, i: int) -> list[dict]:
        records = []
        path = self.work_dir(i) / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def params(self, i: int) -> np.ndarray:
        """Peer i's parameters from its latest (atomically written) checkpoint."""
        from p2pfm.daemon.checkpoint import load_checkpoint

        found = load_checkpoint(self.work_dir(i))
        if found is None:
            raise RuntimeError(f"peer {i} has no checkpoint yet")
        return np.asarray(found[0]["params"], dtype=np.float64)

    def consensus_distance(self, peers: Sequence[int]) -> float:
        """sqrt(mean_i ||x_i - mean x||^2) / ||mean x||: how far the models are apart,
        relative to their size (0 = all peers hold the same model)."""
        stacked = np.stack([self.params(i) for i in peers])
        mean = stacked.mean(axis=0)
        spread = np.sqrt(((stacked - mean) ** 2).sum(axis=1).mean())
        return float(spread / np.linalg.norm(mean))

    def wait(
        self, condition: Callable[[], bool], timeout: float, what: str, *, exits_ok: bool = False
    ) -> None:
        """Poll ``condition``; fail on timeout, or as soon as a peer exits (unless ``exits_ok``:
        peers given --rounds leave by themselves, with exit code 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            dead = [i for i, p in self.procs.items() if p.poll() not in (None, *((0,) if exits_ok else ()))]
            if dead:
                raise RuntimeError(f"peer(s) {dead} exited while waiting for {what}:\n{self.tails(dead)}")
            time.sleep(0.5)
        raise TimeoutError(
            f"timed out after {timeout:.0f} s waiting for {what}\n"
            f"rounds {[self.round(i) for i in self.procs]}\n{self.tails(list(self.procs))}"
        )

    def tails(self, peers: Sequence[int], lines: int = 12) -> str:
        out = []
        for i in peers:
            log = self.work_dir(i) / "peer.log"
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            out.append(f"--- peer {i} ---\n" + "\n".join(text))
        return "\n".join(out)
