"""Library API: train your own ``torch.nn.Module`` with your own optimizer through p2pfm.

In the spirit of ``hivemind.Optimizer``, but with p2pfm's protocol underneath (signed,
compressed, sum-preserving gossip; no all-reduce; nobody waits for a dead peer)::

    model = MyModel()
    opt = GossipOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                          run_id="my-run", initial_peers=["/ip4/.../p2p/..."], inner_steps=20)
    for inputs, targets in my_data:              # this peer's own shard
        loss = loss_fn(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()                               # every inner_steps-th call also gossips
    opt.shutdown()                               # graceful leave + checkpoint

The wrapped optimizer is the *inner* optimizer (local steps). Every ``inner_steps`` calls,
``step()`` hands the parameters to the gossip core (compress with error feedback, push to
random live peers in the background, merge what arrived) and loads the merged parameters
back into the model; the network itself runs on a background thread with its own event
loop, so a slow or dead partner never blocks your loop. All peers of a run must build the
same initial model (seed your init identically), as parameter syncs are encoded against it.

Models by name: :func:`load_model` gives what ``p2pfm peer --model SPEC`` trains, for your own
loop. ``load_model("hf:DIR")`` loads a local Hugging Face causal LM (safetensors weights, its
tokenizer; ``pip install -e '.[hf]'``) identically on every peer; ``load_model("10m", seed=0)``
builds a preset of the byte-level GPT from the seed. Either way ``loaded.model(inputs, targets)``
returns ``(logits, loss)`` with ``targets`` = ``inputs`` shifted by one, and for HF models
``loaded.tokenizer`` encodes your text and ``loaded.model.module`` is the transformers model::

    loaded = load_model("hf:/models/my-gpt2")
    opt = GossipOptimizer(loaded.model, torch.optim.AdamW(loaded.model.parameters(), lr=1e-4), run_id="ft")

Checkpoints (``work_dir/checkpoint.safetensors``) hold the parameters under ``model.<name>``:
``safetensors.torch.load_file`` opens them, and the ``model.*`` tensors load into your model.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from p2pfm.core.codecs import CodecSpec
from p2pfm.core.gossip import GossipConfig
from p2pfm.daemon.config import NetConfig, PeerConfig
from p2pfm.daemon.peer import PeerDaemon
from p2pfm.daemon.trainer import ModelAdapter, StepStats
from p2pfm.model.source import LoadedModel, load_model

__all__ = ["GossipOptimizer", "LoadedModel", "load_model"]


class _UserModel(ModelAdapter):
    """The user's model and optimizer; evaluation is theirs to provide (or NaN)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        evaluate_fn: Callable[[], float] | None,
    ) -> None:
        super().__init__(model, optimizer)
        self.evaluate_fn = evaluate_fn

    def evaluate(self) -> float:
        return float(self.evaluate_fn()) if self.evaluate_fn is not None else float("nan")


class GossipOptimizer:
    """Wrap an inner optimizer; ``step()`` trains locally and gossips every ``inner_steps`` steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        run_id: str,
        initial_peers: Sequence[str] = (),
        inner_steps: int = 10,
        fanout: int = 2,
        codec: CodecSpec | None = None,
        key: str | Path | None = None,
        work_dir: str | Path = "p2pfm-peer",
        listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce: Sequence[str] = (),
        samples_per_step: int = 1,
        min_peers: int = 1,
        on_ready: Callable[[str], None] | None = None,
        evaluate_fn: Callable[[], float] | None = None,
        config: PeerConfig | None = None,
    ) -> None:
        """``min_peers``: block in the constructor until that many peers (us included) are live.
        ``on_ready(maddr)`` is called as soon as this peer is reachable (before that wait).
        ``key``: the peer's key file (default ``work_dir/peer.key``, created if missing).
        ``config`` overrides everything else when given (full control over every knob)."""
        if config is None:
            config = PeerConfig(
                key=Path(key) if key is not None else Path(work_dir) / "peer.key",
                work_dir=Path(work_dir),
                run_id=run_id,
                min_peers=min_peers,
                gossip=GossipConfig(inner_steps=inner_steps, fanout=fanout, codec=codec or CodecSpec()),
                net=NetConfig(
                    listen=tuple(listen), announce=tuple(announce), initial_peers=tuple(initial_peers)
                ),
            )
            config = replace(config, train=replace(config.train, eval_every=1 if evaluate_fn else 0))
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.samples_per_step = samples_per_step
        self._adapter = _UserModel(model, optimizer, evaluate_fn)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="p2pfm-network", daemon=True)
        self._thread.start()
        self._daemon = self._call(self._make_daemon())
        if on_ready is not None:
            self._daemon.on_online = lambda maddrs: on_ready(maddrs[0])
        try:
            self._call(self._daemon.start())
        except BaseException:
            self._call(self._abort())
            self._stop_loop()
            raise
        # A script that ends (or raises) without shutdown() still leaves the swarm cleanly and
        # stops the DHT child and p2pd; a SIGKILLed one is covered by the DHT child's watchdog.
        atexit.register(self.shutdown)
        self._steps_in_round = 0
        self._round_started = time.perf_counter()
        self._losses: list[float] = []
        self._closed = False

    async def _abort(self) -> None:
        await self._daemon.net.shutdown()
        self._daemon.metrics.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    async def _make_daemon(self) -> PeerDaemon:
        return PeerDaemon(self.config, adapter=self._adapter)  # its asyncio objects belong to our loop

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def round(self) -> int:
        return self._daemon.round

    @property
    def peer_id(self) -> str:
        return self._daemon.peer_id

    @property
    def maddrs(self) -> list[str]:
        """Addresses other peers can join through (``initial_peers``)."""
        return list(self._daemon.net.maddrs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, loss: float | None = None) -> bool:
        """One inner step; returns True when it also completed a gossip round."""
        self.optimizer.step()
        self._steps_in_round += 1
        self._adapter.steps_done += 1
        self._adapter.samples_seen += self.samples_per_step
        if loss is not None:
            self._losses.append(float(loss))
        if self._steps_in_round < self.config.gossip.inner_steps:
            return False
        stats = StepStats(
            steps=self._steps_in_round,
            samples=self._steps_in_round * self.samples_per_step,
            mean_loss=sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            compute_seconds=time.perf_counter() - self._round_started,
        )
        self._call(self._daemon.driver.gossip_round(stats, self._round_started))
        self._steps_in_round, self._losses, self._round_started = 0, [], time.perf_counter()
        return True

    def shutdown(self) -> None:
        """Leave the swarm gracefully (checkpoint, withdraw the announcement) and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            self._call(self._daemon.stop())
        finally:
            self._stop_loop()

    def __enter__(self) -> GossipOptimizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
