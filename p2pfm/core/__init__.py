"""The pure protocol core: bytes, time and randomness in; decisions and bytes out.

Nothing in this package imports asyncio, socket, time, threading or hivemind (a test
enforces it), so the live daemon and the simulator drive exactly the same code.

Map:
- ``protocol.py``  PeerProtocol: one peer's lifecycle, round sequence and policy (what drivers execute).
- ``errors.py``    typed refusals: :class:`Reject` (lowers the sender's score) and :class:`Ignore` (does not).
- ``scoring.py``   per-sender rejection counts and bans, in bounded memory.
- ``transfer.py``  state download and parameter-sync checks, both sides.
- ``announce.py``  DHT announcements: the reader's check and the peer book.
- ``identity.py``  Ed25519 keys, peer ids, PEM key files (mode 0600).
- ``envelope.py``  the signed msgpack envelope: seal, verify, replay window, size limits.
- ``schema.py``    strict payload schemas per message kind.
- ``codecs.py``    update codecs: the Codec interface, its registry, none, fp16, int8, topk.
- ``feedback.py``  error feedback: the residual of what a lossy codec did not send.
- ``gossip.py``    the gossip rules: partner choice, merge, robust aggregation, outer step.
- ``aggregation.py`` aggregation rules (mean, clipped_mean, trimmed_mean, median) and their registry.
- ``quorum.py``    the start-up quorum: train only once the partners we expect can hear us.
"""
