"""Byzantine peers in the simulator: who they are and what they send instead of honest updates.

A Byzantine peer is an ordinary simulated peer (the same
:class:`~p2pfm.core.protocol.PeerProtocol`, trained, synced and served like any other) whose
outgoing updates the engine passes through :meth:`Adversary.updates` before sealing them:

- update attacks (``p2pfm.core.attacks.UPDATE_ATTACKS``): the tensor is
  :func:`~p2pfm.core.attacks.forge_wire` of the honest update it would have sent (decoded
  from its own wire, so error feedback and compression are those of an honest peer);
- ``stale_replay``: the payload of its first update, sealed again with the current round;
- ``many_rounds``: ``rounds_per_round`` copies of a forged update (``forge``), claiming the
  rounds r, r+1, ... (inside the receivers' future window), each with its own sequence number.

The ``drain`` attack (a scaled update during the others' end-of-run drain) is not played:
the simulator stops every peer at the last round's deadline and models no drain.

Which peers are Byzantine is a prefix of a seeded permutation (:func:`byzantine_peers`), so
runs replay bit for bit and the attackers at 10 % are among those at 20 %.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from p2pfm.core.attacks import AttackSpec, forge_wire
from p2pfm.core.codecs import CodecSpec, decode, encode
from p2pfm.sim.scenario import ByzantineConfig


def byzantine_peers(config: ByzantineConfig, peers: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the Byzantine peers: the first ``config.count(peers)`` of a permutation."""
    return np.sort(rng.permutation(peers)[: config.count(peers)])


class Adversary:
    """The Byzantine peers of one run and the updates they send; ``rng`` seeds choice and forging."""

    def __init__(
        self, config: ByzantineConfig, peers: int, codec: CodecSpec, rng: np.random.Generator
    ) -> None:
        self.config = config
        self.codec = codec
        self.members = byzantine_peers(config, peers, rng)
        self.mask = np.zeros(peers, bool)
        self.mask[self.members] = True
        self.rng = rng  # after the choice: forging (noise) draws from here, in event order
        self.scale = config.resolved_scale
        name = config.forge if config.attack == "many_rounds" else config.attack
        self.spec = AttackSpec(name=name, scale=self.scale)
        self._first: dict[int, dict[str, Any]] = {}  # stale_replay: each attacker's first payload

    def updates(self, peer: int, round: int, payload: dict[str, Any], numel: int) -> list[tuple[int, dict]]:
        """(claimed round, payload) pairs Byzantine ``peer`` sends in place of its honest ``payload``."""
        attack = self.config.attack
        if attack == "stale_replay":
            first = self._first.setdefault(peer, payload)
            if self.scale == 1.0:
                return [(round, first)]
            old = decode(first["tensor"], expected_numel=numel)
            return [(round, {**first, "tensor": encode((self.scale * old).astype(np.float32), self.codec)})]
        honest = decode(payload["tensor"], expected_numel=numel)
        forged = {**payload, "tensor": forge_wire(self.spec, honest, self.codec, self.rng)}
        if attack == "many_rounds":
            return [(round + i, forged) for i in range(self.config.rounds_per_round)]
        return [(round, forged)]
