"""A stranger's DHT records cannot erase a peer from discovery (issue 12, section 5).

Real peers and a real stranger process on loopback: the stranger joins the DHT with plain
hivemind (no validator) and stores junk under a live peer's subkey with an hour's expiration,
the overwrite that used to erase the peer from every other peer's view within one TTL. Honest
nodes now refuse it at storage and on the way back from lookups (``AnnouncementValidator``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import round_of, wait_for

pytestmark = pytest.mark.integration

STRANGER = r"""
import json, sys, time
import hivemind
from hivemind.utils import get_dht_time
maddr, key, subkey = sys.argv[1:4]
dht = hivemind.DHT(initial_peers=[maddr], start=True)
now = get_dht_time()
ok = dht.store(key, b"junk", expiration_time=now + 3600, subkey=subkey)
plain = dht.store(key + "-other", b"x", expiration_time=now + 3600)
print(json.dumps({"stored": bool(ok), "control": bool(plain), "at": time.time()}), flush=True)
time.sleep(600)
"""


def test_junk_under_a_peers_subkey_does_not_erase_it(make_swarm):
    """After the junk is stored, the other peer still sees the victim live two TTLs later."""
    ttl = 6.0
    swarm = make_swarm(
        ["--rounds", "0", "--inner-steps", "4", "--announce-ttl", str(int(ttl)), "--min-peers", "2"],
        run_id="dht-junk",
    )
    victim = swarm.add_peer(shard=0, num_shards=2)
    swarm.start_peer(victim, wait=True)
    watcher = swarm.add_peer(shard=1, num_shards=2)
    swarm.start_peer(watcher)
    wait_for(
        lambda: round_of(watcher) >= 1 and round_of(victim) >= 1, 180, "both peers training", swarm.peers
    )
    victim_id = victim.status()["peer_id"]
    stranger = subprocess.Popen(
        [sys.executable, "-c", STRANGER, victim.status()["maddrs"][0], "p2pfm/dht-junk/peers", victim_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = stranger.stdout.readline()
        assert line, stranger.stderr.read()[-2000:]
        report = json.loads(line)
        assert report["control"], (
            "the stranger's DHT could not store anything at all: the test proves nothing"
        )
        # The attack shows once every record the victim signed before the junk has expired: wait
        # past two TTLs (a clock condition, since that is what the attack exploits), then for two
        # more rounds of the watcher, each preceded by its regular lookups.
        past_ttl = report["at"] + 2 * ttl + 4.0
        wait_for(lambda: time.time() > past_ttl, 120, "two announcement TTLs after the junk", swarm.peers)
        before = round_of(watcher)
        wait_for(lambda: round_of(watcher) >= before + 2, 120, "two more rounds of the watcher", swarm.peers)
        assert victim_id in watcher.status()["live_peers"], watcher.status()
    finally:
        # The stranger's whole session: its DHT child and p2pd too (the fixture stops the peers).
        try:
            os.killpg(stranger.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stranger.wait()
