"""The network-namespace harness itself, checked with ping and a socket before it is trusted
with peers: links work, netem delay and rate show, cuts and partitions drop traffic, heal
restores it, and nothing outlives the lab."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostenv import apt_install
from netns import NetLab, available, stop_process_group

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def lab(root_required):
    reason = available()
    if reason:
        pytest.skip(reason)
    apt_install(["iputils-ping", "iptables"], commands={"iputils-ping": "ping"})
    with NetLab(4) as lab:
        yield lab


def test_hosts_reach_each_other_over_the_switch(lab):
    """Every host pings every other host on the private test subnet."""
    for src in range(lab.k):
        for dst in range(lab.k):
            if src != dst:
                assert wait_reachable(lab, src, dst), f"h{src} cannot reach h{dst}"


def test_hosts_have_no_route_out_of_the_lab(lab):
    """Only the test subnet is routable inside a host: nothing can leave the lab."""
    routes = lab.exec(0, "ip", "-4", "route").stdout
    assert "default" not in routes
    assert lab.exec(0, "ping", "-c", "1", "-W", "1", "192.0.2.1", check=False).returncode != 0  # TEST-NET-1


def test_shaping_uses_netem_or_the_fallback(lab):
    """Which shaper this kernel gets is reported (netem, or tbf plus the NFQUEUE delayer)."""
    assert lab.shaper in ("netem", "tbf+nfqueue")
    print(f"shaping with {lab.shaper}")


def test_netem_delay_shows_in_ping_rtt(lab):
    """50 ms on h1's link (both directions) adds about 100 ms to an h0 <-> h1 round trip.

    The delay is a floor (no load makes a packet faster), so the lower bound is exact; the
    best of 5 pings against a base measured just before keeps a busy machine's scheduling
    noise out of the upper bound, which only has to tell 100 ms from a doubled delay."""
    base = min(lab.ping(0, 1, count=5))
    lab.shape(1, delay_ms=50)
    try:
        shaped = min(lab.ping(0, 1, count=5))
    finally:
        lab.unshape(1)
    assert 95 <= shaped - base < 200, (base, shaped)
    assert min(lab.ping(0, 1, count=5)) < 95, "unshape left the delay in place"


def test_loss_drops_about_that_share_of_packets(lab):
    """20% loss on h1's link each way: a ping round trip crosses it twice, so ~36% are lost."""
    lab.shape(1, loss_pct=20)
    try:
        res = lab.exec(0, "ping", "-n", "-q", "-c", "200", "-i", "0.01", "-W", "1", lab.addrs[1], check=False)
    finally:
        lab.unshape(1)
    lost = float(res.stdout.split("% packet loss")[0].split()[-1])
    assert 20 <= lost <= 52, res.stdout


def test_netem_rate_limits_throughput(lab, tmp_path: Path):
    """1 MB through an 8 Mbit/s link takes at least about a second, not milliseconds.

    Shaping sets a floor on the time (load can only add to it): the lower bound is the
    check. The upper bound is loose on purpose: it only catches a wrong unit (kbit/s)."""
    server = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{lab.addrs[2]}', 9000)); s.listen(1); print('listening', flush=True)\n"
        "c, _ = s.accept(); n = 0\n"
        "while (b := c.recv(65536)): n += len(b)\n"
        "c.sendall(str(n).encode()); c.close()\n"
    )
    client = (
        "import socket, time\n"
        f"s = socket.create_connection(('{lab.addrs[2]}', 9000), timeout=30); t = time.monotonic()\n"
        "s.sendall(b'x' * 1_000_000); s.shutdown(socket.SHUT_WR); n = int(s.recv(64))\n"
        "print(n, time.monotonic() - t)\n"
    )
    lab.shape(2, rate_mbit=8)
    server_log = tmp_path / "server.log"
    proc = lab.popen(2, [sys.executable, "-c", server], log=server_log)
    try:
        deadline = time.monotonic() + 60
        while "listening" not in server_log.read_text():  # the client connects only then
            assert proc.poll() is None, f"server exited: {server_log.read_text()}"
            assert time.monotonic() < deadline, "server not listening after 60 s"
            time.sleep(0.05)
        out = lab.exec(3, sys.executable, "-c", client, timeout=120).stdout.split()
    finally:
        stop_process_group(proc, grace_s=2)
        lab.unshape(2)
    received, seconds = int(out[0]), float(out[1])
    assert received == 1_000_000
    assert seconds >= 0.8, seconds  # 8 Mbit/s -> at least 1.0 s, less the token bucket's burst
    assert seconds < 60, seconds  # a kbit/s mistake would take ~1000 s


def test_cut_isolates_a_host_and_heal_restores_it(lab):
    """A cut link drops all of that host's traffic; heal brings it back."""
    lab.cut(3)
    try:
        assert lab.ping(0, 3) is None
        assert lab.ping(3, 1) is None
        assert wait_reachable(lab, 0, 1)  # the rest of the lab is untouched
    finally:
        lab.heal()
    assert wait_reachable(lab, 0, 3)


def test_partition_splits_the_lab_into_groups_and_heal_joins_them(lab):
    """Inside a group hosts still talk; across groups nothing passes until heal."""
    lab.partition([0, 1], [2, 3])
    try:
        assert wait_reachable(lab, 0, 1) and wait_reachable(lab, 2, 3)
        assert lab.ping(0, 2) is None and lab.ping(1, 3) is None
    finally:
        lab.heal()
    assert wait_reachable(lab, 0, 2) and wait_reachable(lab, 1, 3)


def test_closing_the_lab_kills_its_processes_and_deletes_its_namespaces(root_required, tmp_path: Path):
    """No namespace and no process (even one that left its process group) survives close()."""
    reason = available()
    if reason:
        pytest.skip(reason)
    with NetLab(2) as lab:
        names = [lab.switch, *lab.hosts]
        leader = lab.popen(0, ["sleep", "600"])
        # A child in a session of its own escapes killpg; the namespace sweep must catch it.
        lab.popen(1, ["setsid", "sleep", "600"])
        deadline = time.monotonic() + 60
        while True:  # wait until the escaped `sleep` runs inside h1
            inside = netns_pids(lab.hosts[1])
            if any(comm(pid) == "sleep" for pid in inside):
                break
            assert time.monotonic() < deadline, f"no sleep process in {lab.hosts[1]} after 60 s: {inside}"
            time.sleep(0.05)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    assert leader.poll() is not None
    for pid in inside:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )


def netns_pids(ns: str) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()


def comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def wait_reachable(lab: NetLab, src: int, dst: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.ping(src, dst):
            return True
        time.sleep(0.2)
    return False
