"""A live malicious peer: ``p2pfm attack`` joins a swarm like a peer and replays issue 12's attacks.

Built from the peer's own parts, so that it speaks the protocol exactly: a
:class:`~p2pfm.daemon.runtime.PeerRuntime` around a :class:`~p2pfm.core.protocol.PeerProtocol`
whose parameters are the *poisoned* state, the peer's :class:`~p2pfm.daemon.net.PeerNetwork`
(DHT announcements, libp2p streams) and its :class:`~p2pfm.daemon.handlers.StreamHandlers`,
which serve that poisoned state (hash-consistent with our own signed announcement) to anyone
who asks. Update attacks forge their vectors with :func:`p2pfm.core.attacks.forge_update`,
the simulator's Byzantine peers' function. The attacks themselves live in
:mod:`p2pfm.daemon.attack_moves`; this module holds the config, the log and the persona.

Everything it does and every answer it gets goes to a JSON-lines log (``--out``) that tests
assert on: one ``online`` line, one line per notable event, and a ``summary`` line per attack
(every few seconds and at the end) with the answers counted by reason.

A tool for testing defences on swarms you run yourself; it needs nothing but the swarm's address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfm.config import ConfigError, require

log = logging.getLogger("p2pfm.attack")

ATTACKS = (
    "far_ahead",  # announce a round far ahead (--claim-round) or a few ahead (--ahead) of the swarm
    "poisoned_state",  # serve --state (zero, scaled, noise) as our state and params, hash-consistent
    "updates",  # one forged update (--forge, --scale) to every target each --interval, from --keys keys
    "many_rounds",  # --rounds-per-round updates per push, each claiming another round
    "drain",  # wait until targets reach --final-round (their drain), then push forged updates
    "sybil",  # announce --count fresh identities pointing at us
    "dht_junk",  # store --count junk records under the swarm's key, one over a live peer's subkey
    "flood",  # valid updates at --rate per second to every target
    "burst",  # --count valid top-k updates at once, from --keys fresh keys
    "id_churn",  # rejected messages from a new libp2p identity every --every messages (--count in all)
    "big_frames",  # --count parallel junk frames of --frame-mib MiB each
    "state_leech",  # request state and params from every target, --count times; count the bytes
)
STATES = ("zero", "scaled", "noise", "initial")  # what poisoned_state / far_ahead serve


@dataclass(frozen=True)
class AttackConfig:
    """One attacker process: whom it attacks, how, and where it writes what happened."""

    initial_peers: tuple[str, ...]
    run_id: str
    attacks: tuple[str, ...]
    out: Path
    work_dir: Path
    key: Path | None = None  # the persona's key (an admitted insider's); None = a fresh one
    cert: Path | None = None  # the persona's admission certificate (insider mode)
    seed: int = 0  # the run's seed: our initial parameters are the swarm's (syncs are relative to them)
    model: dict[str, int] = field(default_factory=dict)  # model flags, as the swarm's peers got them
    claim_round: int = 1_000_000  # far_ahead: the round we announce
    ahead: int | None = None  # far_ahead: announce the swarm's newest round + this instead
    state: str = "zero"  # what we serve as our state and parameters
    state_scale: float = 100.0  # state "scaled": this x the initial parameters; "noise": this x N(0, 1)
    forge: str = "scaling"  # p2pfm.core.attacks name for update attacks
    scale: float | None = None  # its strength (None: the registry's default)
    keys: int = 1  # fresh signing keys for update attacks (1: the persona's own)
    rounds_per_round: int = 33  # many_rounds
    final_round: int = 0  # drain: the swarm's --rounds
    counts: dict[str, int] = field(
        default_factory=dict
    )  # attack -> how many ("*": every attack); else defaults
    rate: float = 500.0  # flood: updates per second (in all)
    every: int = 45  # id_churn: messages per libp2p identity (bans come at 50)
    frame_mib: int = 60  # big_frames: size of each frame
    interval_s: float = 0.5  # updates, many_rounds, drain: seconds between pushes to a target
    lead: int = 4  # claim a target's announced round + this (announcements lag by a heartbeat)
    duration_s: float = 0.0  # stop after this (0: until SIGTERM/SIGINT)
    announce: bool = True  # the persona announces itself like a peer (False: a silent stranger)
    target: str | None = None  # attack only this peer id (None: every live peer)

    def __post_init__(self) -> None:
        require(len(self.initial_peers) > 0, "initial_peers", "needs a live peer's multiaddr")
        require(len(self.attacks) > 0, "attacks", f"choose one or more of {', '.join(ATTACKS)}")
        for name in self.attacks:
            require(name in ATTACKS, "attacks", f"{name!r} is not one of {', '.join(ATTACKS)}")
        require(self.state in STATES, "state", f"must be one of {', '.join(STATES)}")
        from p2pfm.core.attacks import UPDATE_ATTACKS  # numpy: not at import (the CLI's parser reads ATTACKS)

        require(self.forge in UPDATE_ATTACKS, "forge", f"must be one of {', '.join(UPDATE_ATTACKS)}")
        require(0 <= self.claim_round <= 2**63 - 1, "claim_round", "must fit an int64")
        require(self.ahead is None or self.ahead >= 1, "ahead", "must be at least 1")
        require(self.keys >= 1, "keys", "must be at least 1")
        require(self.rounds_per_round >= 1, "rounds_per_round", "must be at least 1")
        for name, value in self.counts.items():
            require(name == "*" or name in ATTACKS, "counts", f"{name!r} is not an attack")
            require(value >= 1, "counts", f"{name}: must be at least 1")
        require(self.rate > 0, "rate", "must be positive")
        require(self.every >= 1, "every", "must be at least 1")
        require(1 <= self.frame_mib <= 4095, "frame_mib", "must be in [1, 4095]")
        require(self.interval_s > 0, "interval_s", "must be positive")
        require(self.duration_s >= 0, "duration_s", "must be non-negative")
        require(
            "drain" not in self.attacks or self.final_round >= 1,
            "final_round",
            "drain needs the swarm's --rounds (the round after which its peers drain)",
        )
        require(
            "far_ahead" not in self.attacks or self.announce,
            "announce",
            "far_ahead is an announcement: it cannot run with --no-announce",
        )

    @property
    def forge_scale(self) -> float:
        from p2pfm.core.attacks import DEFAULT_SCALE

        return DEFAULT_SCALE[self.forge] if self.scale is None else self.scale

    def count_for(self, attack: str, default: int) -> int:
        """How many times ``attack`` acts: ``--count attack=N``, else ``--count N``, else ``default``."""
        return self.counts.get(attack, self.counts.get("*", default))


class AttackLog:
    """The attacker's JSON-lines log: events as they happen, answers tallied per attack.

    ``answer(attack, reply)`` takes a peer's reply (``{"ok": true}`` or a refusal with its
    reason; ``None`` when the call itself failed) and counts it; :meth:`summaries` writes one
    ``summary`` line per attack with the tallies so far (readers take the last one).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("a", buffering=1)
        self.tallies: dict[str, Counter[str]] = {}

    def event(self, event: str, **fields: Any) -> None:
        record = {"time": time.time(), "event": event, **fields}
        self._handle.write(json.dumps(record, sort_keys=True, default=_jsonable) + "\n")

    def count(self, attack: str, what: str, amount: int = 1) -> None:
        self.tallies.setdefault(attack, Counter())[what] += amount

    def answer(self, attack: str, reply: dict | None) -> None:
        if reply is None:
            self.count(attack, "failed")
        elif reply.get("ok"):
            self.count(attack, "accepted")
        else:
            self.count(attack, f"refused:{reply.get('reason')}")

    def summaries(self, final: bool = False) -> None:
        for attack, tally in self.tallies.items():
            accepted = tally.get("accepted", 0)
            refused = {k.split(":", 1)[1]: v for k, v in tally.items() if k.startswith("refused:")}
            other = {k: v for k, v in tally.items() if k != "accepted" and not k.startswith("refused:")}
            self.event("summary", attack=attack, final=final, accepted=accepted, refused=refused, **other)

    def close(self) -> None:
        self._handle.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def read_attack_log(path: Path) -> list[dict[str, Any]]:
    """Every complete line of an attacker's log (tests read it while it runs)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written
    return records


def last_summary(records: list[dict[str, Any]], attack: str) -> dict[str, Any]:
    """The newest ``summary`` line of ``attack`` (empty until the first one)."""
    found = [r for r in records if r.get("event") == "summary" and r.get("attack") == attack]
    return found[-1] if found else {}


# --- the persona: a peer whose state is poisoned -----------------------------------------------
def poisoned_params(initial, config: AttackConfig, rng):  # numpy arrays; numpy is imported lazily
    """What we serve as our parameters (``--state``)."""
    import numpy as np

    if config.state == "zero":
        return np.zeros_like(initial)
    if config.state == "scaled":
        return (initial * config.state_scale).astype(np.float32)
    if config.state == "noise":
        return (rng.standard_normal(initial.size) * config.state_scale).astype(np.float32)
    return initial.copy()


def build_persona(config: AttackConfig):  # -> PeerRuntime (heavy imports stay lazy)
    """A :class:`PeerRuntime` like a real peer's, holding the poisoned state as its parameters."""
    import numpy as np
    import torch

    from p2pfm.core.envelope import EnvelopeLimits
    from p2pfm.core.identity import Identity
    from p2pfm.core.protocol import PeerProtocol, PeerSetup
    from p2pfm.daemon.config import load_peer_config
    from p2pfm.daemon.metrics import MetricsLog
    from p2pfm.daemon.net import PeerNetwork
    from p2pfm.daemon.runtime import PeerRuntime, load_or_create_identity
    from p2pfm.daemon.trainer import ModelAdapter
    from p2pfm.model.gpt import build_model

    overrides: dict[str, Any] = {
        "run_id": config.run_id,
        "seed": config.seed,
        "work_dir": str(config.work_dir),
        "net.initial_peers": list(config.initial_peers),
        "device_class": "attacker",
        **{f"model.{k}": v for k, v in config.model.items()},
    }
    peer_config = load_peer_config(None, overrides)
    identity = load_or_create_identity(config.key) if config.key else Identity.generate()
    model = build_model(peer_config.model, peer_config.seed)
    adapter = ModelAdapter(model, torch.optim.AdamW(model.parameters()))
    initial = adapter.flat()
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    setup = PeerSetup(
        identity=identity, run_id=config.run_id, gossip=peer_config.gossip,
        limits=EnvelopeLimits(max_bytes=peer_config.net.max_message_bytes),
        max_state_bytes=peer_config.net.max_state_bytes,
    )  # fmt: skip
    protocol = PeerProtocol(setup, initial, seq=time.time_ns() // 1_000_000)
    protocol.learner.params = poisoned_params(initial, config, rng)
    # Our own handlers take anyone's requests (an open policy); what matters is what we send.
    runtime = PeerRuntime(
        config=peer_config, protocol=protocol, trainer=adapter,
        net=PeerNetwork(peer_config.net, identity, config.run_id), metrics=MetricsLog(config.work_dir),
        shard_index=0, rng=rng,
    )  # fmt: skip
    if config.cert is not None:  # an admitted insider presents its certificate like a peer
        runtime.certificate = config.cert.read_bytes()[:4096]
    return runtime


def claim(runtime, round_: int) -> None:
    """Announce ``round_`` from now on, serving our poisoned state stamped with it (hash-consistent)."""
    round_ = min(max(0, round_), 2**63 - 1)
    if round_ == runtime.protocol.learner.round and runtime.snapshot.size:
        return
    runtime.protocol.learner.round = round_
    runtime.refresh_snapshot()  # pack_state(poisoned params, round_, ...) and its hash, as a peer does


async def run_attack_async(config: AttackConfig) -> int:
    from p2pfm.daemon.attack_moves import Attacker

    attacker = Attacker(config, build_persona(config), AttackLog(config.out))
    loop = asyncio.get_running_loop()
    await attacker.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, attacker.stop_event.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await attacker.run()
    finally:
        await attacker.shutdown()
    return 0


def run_attack(config: AttackConfig) -> int:
    """The ``p2pfm attack`` process: run the chosen attacks until ``duration_s`` or a signal."""
    if config.work_dir.exists() and not config.work_dir.is_dir():
        raise ConfigError(f"work_dir: {config.work_dir} is not a directory")
    return asyncio.run(run_attack_async(config))
