"""The live peer: drives the pure core's ``PeerProtocol`` over hivemind's DHT and libp2p.

Map:
- ``config.py``      PeerConfig / TrainConfig / NetConfig: frozen, strictly validated.
- ``peer.py``        PeerDaemon, the composition root: builds one peer, start, run, leave, signals.
- ``runtime.py``     the state around the protocol: trainer, network, peer book, served snapshot.
- ``handlers.py``    the gossip/state/params stream handlers and our calls to other peers.
- ``rounds.py``      the round driver: quorum, join, rounds, the protocol's plans, drain.
- ``records.py``     typed metrics records (one dataclass per event).
- ``net.py``         DHT announcements (signed), length-prefixed libp2p streams, re-dialing.
- ``trainer.py``     ModelAdapter (any model + optimizer as flat vectors) and LocalTrainer (default GPT).
- ``checkpoint.py``  atomic checkpoints in the tensor file format (no code runs on load).
- ``metrics.py``     metrics.jsonl and status.json (strict JSON).
- ``probe.py``       sends crafted messages to a live peer (tests, operators).
- ``attacker.py``    ``p2pfm attack``: config, JSON-lines log and persona of a live malicious peer.
- ``attack_moves.py`` its attacks (far-ahead rounds, poisoned state, forged updates, floods, sybils, ...).
"""
