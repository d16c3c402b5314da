"""Test-only instrumentation of a real ``p2pfm peer`` process, loaded through PYTHONPATH.

The arm64 deploy test (``tests/deploy/test_arm64.py``) puts this folder on PYTHONPATH of its
three peers; Python imports ``sitecustomize`` at start-up, before the ``p2pfm`` console
script runs. The peers are otherwise untouched: installed p2pfm, real network, real protocol.

- ``P2PFM_TEST_ACCEPTED=PATH``: every gossip update this peer *accepts* (the protocol's
  ``receive_update`` returned, so the sender got "ok") is appended to PATH as one JSON line
  with the signing key's peer id, both rounds, and this process's machine and torch version.
  ``metrics.jsonl`` counts received updates per round but not whose, and the test must show
  updates accepted in both directions between the arm64 peer and each x86 peer.
- ``P2PFM_TEST_STEP_DELAY_S=S``: every optimizer step first sleeps S seconds (idle, no CPU).
  The x86 peers are paced to the emulated arm64 peer's speed (~100x slower): updates more
  than ``max_round_lag`` rounds old are refused as stale, so without pacing the x86 peers
  would be hundreds of rounds ahead and nothing the arm64 peer sends would count.
"""

from __future__ import annotations

import json
import os
import platform
import time


def _record_accepted(path: str) -> None:
    from p2pfm.core.protocol import PeerProtocol

    original = PeerProtocol.receive_update

    def receive_update(self, remote, data, now):  # type: ignore[no-untyped-def]
        envelope = original(self, remote, data, now)
        import torch

        line = {
            "sender": envelope.sender_id,
            "sender_round": envelope.round,
            "own_round": self.round,
            "machine": platform.machine(),
            "torch": torch.__version__,
            "time": time.time(),
        }
        with open(path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        return envelope

    PeerProtocol.receive_update = receive_update


def _pace_steps(delay_s: float) -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep(delay_s))


if os.environ.get("P2PFM_TEST_ACCEPTED"):
    _record_accepted(os.environ["P2PFM_TEST_ACCEPTED"])
if os.environ.get("P2PFM_TEST_STEP_DELAY_S"):
    _pace_steps(float(os.environ["P2PFM_TEST_STEP_DELAY_S"]))
