"""Several "hosts" on one machine: Linux network namespaces joined by a bridge, with links
that can be shaped (netem rate/delay/loss), cut and healed. Needs root and iproute2.

Layout for ``NetLab(k)`` with a unique prefix P (pid + random tag)::

    ns P-h0  eth0 10.77.0.1/24 ──veth── p0 ┐
    ns P-h1  eth0 10.77.0.2/24 ──veth── p1 ├─ br0   (all in ns P-sw, the "switch")
    ...                                    ┘

The test subnet exists only inside these namespaces: no route leaves them, so nothing the
tests send can reach the machine's real network. A link is shaped on both ends: egress of
the host's ``eth0`` (its upload) and egress of the switch port (its download), so a ping
between two shaped hosts i and j sees RTT = 2 * (delay_i + delay_j). Kernels built without
sch_netem (this CI's) get the same rate and round trip from tbf plus :mod:`p2pfm.netlab.linkemu`.

Partitions move switch ports onto other bridges (br1, br2, ...) in the same switch: each
group keeps talking inside itself, packets between groups are dropped (TCP connections
stall rather than reset, as in a real outage). ``cut(i)`` takes one host's switch port
down; ``heal()`` puts everything back on br0 and up.

Cleanup is guaranteed three ways: the context manager, an atexit hook, and a sweep at
start that deletes namespaces left by a process that no longer exists (names carry the
owner's pid). Deleting a namespace first SIGKILLs every process still inside it, so a
daemon's forked helpers (hivemind's p2pd) cannot outlive the lab.

Used by the deploy tests (``tests/deploy``) and by ``p2pfm bench compare --shaped``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pfm.procs import signal_group

NAME_ROOT = "p2pfmlab"  # every namespace this module creates starts with this


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def available() -> str | None:
    """None if this machine can run a lab, else the reason it cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} (iproute2) is not installed"
    return None


def _pids_in(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def delete_namespace(ns: str, timeout: float = 60) -> None:
    """Kill whatever still runs inside ``ns``, wait until nothing does (a killed process
    leaves the namespace only once it has exited, which a busy machine can delay), then
    delete it. Never raises."""
    deadline = time.monotonic() + timeout
    while (pids := _pids_in(ns)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _run("ip", "netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces of labs whose owning process is gone (a crashed earlier run)."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NAME_ROOT):
            continue
        try:
            owner = int(name[len(NAME_ROOT) :].split("-")[0])
        except ValueError:
            continue
        if not Path(f"/proc/{owner}").exists():
            delete_namespace(name)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Shape:
    """One direction of a link, as netem sees it. None leaves that property alone."""

    rate_mbit: float | None = None
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss_pct: float | None = None

    def netem_args(self) -> list[str]:
        args: list[str] = []
        if self.delay_ms is not None:
            args += ["delay", f"{self.delay_ms}ms"]
            if self.jitter_ms:
                args += [f"{self.jitter_ms}ms"]
        if self.loss_pct is not None:
            args += ["loss", f"{self.loss_pct}%"]
        if self.rate_mbit is not None:
            args += ["rate", f"{self.rate_mbit}mbit"]
        # netem's default queue (1000 packets) is short for a 50 ms path at tens of Mbit/s.
        return args + ["limit", "10000"]


class NetLab:
    """K hosts on one switch. Use as a context manager; see the module docstring."""

    def __init__(self, k: int, subnet: str = "10.77.0", bridge_mtu: int = 1500) -> None:
        if not 1 <= k <= 250:
            raise ValueError(f"k must be in [1, 250], got {k}")
        self.k = k
        self.subnet = subnet
        self.mtu = bridge_mtu
        self.prefix = f"{NAME_ROOT}{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(k)]
        self.addrs = [f"{subnet}.{i + 1}" for i in range(k)]
        self._procs: list[subprocess.Popen] = []
        self._bridges = {"br0"}
        self._created: list[str] = []
        self._emu: dict[int, subprocess.Popen] = {}  # linkemu per shaped host (no-netem kernels)
        self._shaper: str | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))  # logs of helper processes
        self._closed = False

    # --- life cycle -------------------------------------------------------------------
    def __enter__(self) -> NetLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        sweep_stale()
        atexit.register(self.close)
        try:
            self._add_ns(self.switch)
            self.sw("ip", "link", "add", "br0", "type", "bridge")
            self.sw("ip", "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                self._add_ns(host)
                # Both ends are born inside their namespaces: no name ever exists in the
                # root namespace, so parallel labs cannot collide.
                _run(
                    "ip",
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    host,
                    "mtu",
                    str(self.mtu),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"p{i}",
                    "netns",
                    self.switch,
                    "mtu",
                    str(self.mtu),
                )
                self.sw("ip", "link", "set", f"p{i}", "master", "br0", "up")
                self.exec(i, "ip", "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
                self.exec(i, "ip", "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop every process started here (whole process groups), delete every namespace."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            stop_process_group(proc)
        for name in reversed(self._created):
            delete_namespace(name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    # --- running things ---------------------------------------------------------------
    def sw(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.switch, *cmd, check=check)

    def exec(self, i: int, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``cmd`` in host ``i`` and wait for it."""
        return _run("ip", "netns", "exec", self.hosts[i], *cmd, check=check, timeout=timeout)

    def popen(
        self,
        i: int,
        cmd: Sequence[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` in host ``i`` in a new session (its own process group); the lab
        stops the whole group on close. Output goes to ``log`` (or is discarded)."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (kept by the Popen)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[i], *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        if log:
            out.close()
        self._procs.append(proc)
        return proc

    def ping(self, src: int, dst: int, count: int = 1, timeout_s: float = 1.0) -> list[float] | None:
        """RTTs in ms of ``count`` pings from host ``src`` to host ``dst``; None if none came back."""
        res = self.exec(
            src,
            "ping",
            "-n",
            "-c",
            str(count),
            "-i",
            "0.2",
            "-W",
            str(timeout_s),
            self.addrs[dst],
            check=False,
            timeout=count * (timeout_s + 1) + 5,
        )
        rtts = [float(tok.split("=")[1]) for tok in res.stdout.split() if tok.startswith("time=")]
        return rtts or None

    # --- shaping, cutting, healing ----------------------------------------------------
    @property
    def shaper(self) -> str:
        """``netem`` if this kernel has sch_netem, else ``tbf+nfqueue`` (see :meth:`shape`)."""
        if self._shaper is None:
            probe = self.sw("tc", "qdisc", "add", "dev", "br0", "root", "netem", "delay", "1ms", check=False)
            self._shaper = "netem" if probe.returncode == 0 else "tbf+nfqueue"
            self.sw("tc", "qdisc", "del", "dev", "br0", "root", check=False)
        return self._shaper

    def shape(
        self,
        i: int,
        *,
        rate_mbit: float | None = None,
        delay_ms: float | None = None,
        jitter_ms: float | None = None,
        loss_pct: float | None = None,
    ) -> None:
        """Shape host ``i``'s link in both directions (its upload and its download); replaces
        any earlier shape of that link.

        With netem, each direction of the link gets ``delay_ms`` and ``loss_pct``. Kernels
        without netem get the same round trip another way: ``tbf`` for the rate on both
        ends, and :mod:`linkemu` (an NFQUEUE reader) delaying packets where they enter the
        host by 2 x ``delay_ms`` and dropping them with the two-crossing loss probability.
        (Delaying on the way out instead would stall TCP: packets held below a sending
        socket count against its TCP Small Queues budget.) No jitter there.
        """
        self.unshape(i)
        if self.shaper == "netem":
            args = Shape(rate_mbit, delay_ms, jitter_ms, loss_pct).netem_args()
            self.exec(i, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *args)
            self.sw("tc", "qdisc", "replace", "dev", f"p{i}", "root", "netem", *args)
            return
        if jitter_ms:
            raise NotImplementedError("jitter needs netem, which this kernel lacks")
        if rate_mbit is not None:
            bytes_per_s = rate_mbit * 1e6 / 8
            burst = max(16 * 1024, int(bytes_per_s * 0.005))  # 5 ms of traffic, at least a few MTUs
            tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
            self.exec(i, "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf)
            self.sw("tc", "qdisc", "replace", "dev", f"p{i}", "root", *tbf)
        if delay_ms or loss_pct:
            if not shutil.which("iptables"):
                raise RuntimeError("no netem in this kernel and no iptables for the NFQUEUE fallback")
            both_ways_loss = 100 * (1 - (1 - (loss_pct or 0) / 100) ** 2)
            log = self.tmp / f"linkemu-h{i}.log"
            log.write_text("")
            # By path, not -m: this very file, whichever p2pfm the working directory would import.
            self._emu[i] = self.popen(
                i,
                [
                    sys.executable,
                    str(Path(__file__).with_name("linkemu.py")),
                    "--queue",
                    "0",
                    "--delay-ms",
                    str(2 * (delay_ms or 0)),
                    "--loss-pct",
                    str(both_ways_loss),
                    "--seed",
                    str(i),
                ],
                log=log,
            )
            deadline = time.monotonic() + 60
            while "linkemu:" not in log.read_text():  # bound to its queue: safe to divert packets
                if self._emu[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"linkemu did not start in h{i}: {log.read_text()}")
                time.sleep(0.05)
            self.exec(
                i,
                "iptables",
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            )

    def unshape(self, i: int) -> None:
        self.exec(i, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        self.sw("tc", "qdisc", "del", "dev", f"p{i}", "root", check=False)
        if i in self._emu:
            self.exec(i, "iptables", "-t", "mangle", "-F", "PREROUTING", check=False)
            stop_process_group(self._emu.pop(i), grace_s=2, sig=signal.SIGTERM)

    def shape_all(self, **kwargs: float | None) -> None:
        for i in range(self.k):
            self.shape(i, **kwargs)

    def cut(self, i: int) -> None:
        """Take host ``i``'s link down (its switch port): it reaches nobody, nobody reaches it."""
        self.sw("ip", "link", "set", f"p{i}", "down")

    def partition(self, *groups: Sequence[int]) -> None:
        """Split the hosts into ``groups`` that cannot reach each other; hosts in no group are
        isolated alone. Replaces any earlier partition."""
        seen = [i for group in groups for i in group]
        if len(seen) != len(set(seen)) or not all(0 <= i < self.k for i in seen):
            raise ValueError(f"groups must be disjoint host indices in [0, {self.k}): {groups}")
        alone = [[i] for i in range(self.k) if i not in seen]
        for b, group in enumerate([*groups, *alone]):
            bridge = f"br{b}"
            if bridge not in self._bridges:
                self.sw("ip", "link", "add", bridge, "type", "bridge")
                self.sw("ip", "link", "set", bridge, "up")
                self._bridges.add(bridge)
            for i in group:
                self.sw("ip", "link", "set", f"p{i}", "master", bridge, "up")

    def heal(self) -> None:
        """Undo cuts and partitions: every port back on br0 and up (shaping stays)."""
        for i in range(self.k):
            self.sw("ip", "link", "set", f"p{i}", "master", "br0", "up")

    def describe(self) -> str:
        hosts = " ".join(f"{h}={a}" for h, a in zip(self.hosts, self.addrs, strict=True))
        return f"{hosts} (shaping: {self.shaper})"


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0, sig: int = signal.SIGINT) -> int | None:
    """Send ``sig`` to ``proc`` (SIGINT: our daemon's graceful leave), wait up to ``grace_s``,
    then SIGKILL its whole process group. Returns the exit code (None if it never exited).

    Only the leader gets ``sig``: its helpers (hivemind's p2pd) must outlive it for the
    leave to reach the network. ``ip netns exec`` execs the command, so the leader is it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while helpers (p2pd) linger in its group: kill the group anyway.
    signal_group(proc, signal.SIGKILL)
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def main() -> None:
    """Manual check: ``sudo .venv/bin/python -m p2pfm.netlab.netns`` builds a 3-host lab and pings."""
    with NetLab(3) as lab:
        print(lab.describe())
        print("ping h0->h2:", lab.ping(0, 2, count=3))
        lab.shape(2, delay_ms=20)
        print("with 20 ms on h2's link:", lab.ping(0, 2, count=3))
        lab.cut(2)
        print("cut:", lab.ping(0, 2))
        lab.heal()
        print("healed:", lab.ping(0, 2, count=2))
        print("shell hint:", shlex.join(["ip", "netns", "exec", lab.hosts[0], "bash"]))


if __name__ == "__main__":
    main()
