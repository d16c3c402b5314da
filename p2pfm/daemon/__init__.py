"""The live peer: drives the pure core over hivemind's DHT and libp2p.

Map:
- ``config.py``      PeerConfig / TrainConfig / NetConfig: frozen, strictly validated.
- ``net.py``         DHT announcements (signed), PeerBook, length-prefixed libp2p streams, re-dialing.
- ``peer.py``        PeerDaemon: rounds, gossip/state/params handlers, join/catch-up, drain, leave.
- ``trainer.py``     ModelAdapter (any model + optimizer as flat vectors) and LocalTrainer (default GPT).
- ``checkpoint.py``  atomic checkpoints in the tensor file format (no code runs on load).
- ``metrics.py``     metrics.jsonl and status.json (strict JSON).
- ``probe.py``       sends crafted messages to a live peer (tests, operators).
"""
