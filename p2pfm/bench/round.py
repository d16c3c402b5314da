"""``p2pfm bench round``: seconds of a gossip round's arithmetic, in process, at any model size.

Issue 13 sets "codec + sign + verify + merge <= 5 % of a round's compute at 124M parameters"; most
of that time is the learner's passes over model-sized vectors. This bench times them without
torch, peers or sockets: two :class:`~p2pfm.core.gossip.GossipLearner` (the default
:class:`GossipConfig` unless told otherwise) start from the same random anchor; each round each
writes ``anchor + small noise`` into its round buffer (the daemon's way) and makes its update,
receives the other's, and finishes the round. Reported per part, for the first learner: the best
of the measured rounds (the first round also pays the buffers' first-touch page faults and is
reported apart).

``digest`` is a SHA-256 of every wire, norm and final array of both learners: two checkouts of
the code that give the same digest for the same flags computed the same bits, so a faster
version can be checked against the old one at the size that matters (e.g. ``--numel 124072000``;
then hold ``flock /tmp/p2pfm-big.lock``: a learner pair at 124M needs ~3 GB).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfm.config import require
from p2pfm.core.codecs import CODECS, MAX_NUMEL, CodecSpec
from p2pfm.core.gossip import GossipConfig, GossipLearner

PARTS = ("make_update", "receive", "finish_round")
_FILL_CHUNK = 1 << 22  # the noise is drawn a chunk at a time: no model-sized temporary of its own


@dataclass(frozen=True)
class RoundBenchConfig:
    """One run of the round benchmark."""

    numel: int = 10_000_000
    """Parameters of the (flat) model."""
    rounds: int = 3
    """Measured rounds after the first (which pays first-touch page faults)."""
    codec: str = "topk"
    outer_momentum: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require(1 <= self.numel <= MAX_NUMEL, "numel", f"must be in [1, {MAX_NUMEL}]")
        require(1 <= self.rounds <= 100, "rounds", "must be in [1, 100]")
        require(self.codec in CODECS, "codec", f"must be one of {', '.join(CODECS)}")
        require(0.0 <= self.outer_momentum < 1.0, "outer_momentum", "must be in [0, 1)")


def _fill_local(learner: GossipLearner, rng: np.random.Generator) -> np.ndarray:
    """``anchor + N(0, 1e-3)`` written into the learner's round buffer, a chunk at a time."""
    buffer = learner.local_buffer()
    for start in range(0, learner.numel, _FILL_CHUNK):
        end = min(learner.numel, start + _FILL_CHUNK)
        noise = rng.standard_normal(end - start, dtype=np.float32)
        np.multiply(noise, np.float32(1e-3), out=noise)
        np.add(learner.params[start:end], noise, out=buffer[start:end])
    return buffer


def run_round_bench(config: RoundBenchConfig) -> dict[str, Any]:
    """Seconds per part (first round, best of the others) and the digest of everything computed."""
    gossip = GossipConfig(codec=CodecSpec(config.codec), outer_momentum=config.outer_momentum)
    rng = np.random.default_rng(config.seed)
    init = rng.standard_normal(config.numel, dtype=np.float32)
    np.multiply(init, np.float32(0.02), out=init)
    ours, theirs = GossipLearner(init, gossip), GossipLearner(init, gossip)
    del init
    digest = hashlib.sha256()
    seconds: dict[str, list[float]] = {part: [] for part in PARTS}
    for _ in range(config.rounds + 1):
        local = _fill_local(ours, rng)  # not timed: the driver's local steps write it
        started = time.perf_counter()
        wire = ours.make_update(local)
        seconds["make_update"].append(time.perf_counter() - started)
        del local
        their_wire = theirs.make_update(_fill_local(theirs, rng))
        started = time.perf_counter()
        ours.receive("theirs", theirs.round, their_wire)
        seconds["receive"].append(time.perf_counter() - started)
        theirs.receive("ours", ours.round, wire)
        started = time.perf_counter()
        _, report = ours.finish_round(1)
        seconds["finish_round"].append(time.perf_counter() - started)
        _, their_report = theirs.finish_round(1)
        for message in (wire, their_wire):
            for key in sorted(message):
                digest.update(repr((key, message[key])).encode())
        for r in (report, their_report):
            digest.update(repr((r.own_norm, r.applied_norm, r.rolled_back)).encode())
    for learner in (ours, theirs):
        for array in (learner.params, learner.momentum, learner.feedback.residual):
            digest.update(array.tobytes())
    return {
        "numel": config.numel,
        "codec": config.codec,
        "outer_momentum": config.outer_momentum,
        "rounds": config.rounds,
        "first": {part: seconds[part][0] for part in PARTS},
        "best": {part: min(seconds[part][1:]) for part in PARTS},
        "digest": digest.hexdigest(),
    }


def format_report(result: dict[str, Any]) -> str:
    """A small table: one line for the first round, one for the best of the others."""
    lines = [
        f"p2pfm bench round: {result['numel']:,} parameters, codec {result['codec']}, outer momentum "
        f"{result['outer_momentum']:g}, a learner pair, one received update a round, one thread",
        f"{'':>18}" + "".join(f"{part:>14}" for part in PARTS) + f"{'total':>10}",
    ]
    for label, key in (("first round", "first"), (f"best of {result['rounds']}", "best")):
        row = result[key]
        lines.append(
            f"{label:>18}" + "".join(f"{row[p]:>13.3f}s" for p in PARTS) + f"{sum(row.values()):>9.3f}s"
        )
    lines.append(f"digest {result['digest']}")
    return "\n".join(lines)
