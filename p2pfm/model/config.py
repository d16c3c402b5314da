"""What a peer trains and how its inner loop runs: the configs shared by the daemon and the simulator.

Torch-free on purpose: the simulator's scenario files embed these tables
(``[workload.gpt.model]``, ``[workload.gpt.train]``) and an MLP scenario must not pay the
second it takes to import torch. The daemon reads the same tables as ``[model]`` and
``[train]``, so a field and its check are written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfm.config import require


@dataclass(frozen=True)
class GPTConfig:
    """Model size. Defaults give ~1.0M parameters: trains visibly in minutes on a shared CPU."""

    vocab_size: int = 256  # bytes
    block_size: int = 128  # context length in bytes; enough for a line or two of code
    n_layer: int = 5
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # local SGD on small shards; dropout only slows convergence here

    def __post_init__(self) -> None:
        require(self.vocab_size > 0, "model.vocab_size", "must be positive")
        require(self.block_size > 0, "model.block_size", "must be positive")
        require(self.n_layer > 0, "model.n_layer", "must be positive")
        require(self.n_head > 0, "model.n_head", "must be positive")
        require(self.n_embd % self.n_head == 0, "model.n_embd", "must be divisible by model.n_head")
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class InnerTrainConfig:
    """The inner loop on one shard: batches, the AdamW step, the held-out set, the shard's size.

    The daemon's ``TrainConfig`` adds when to evaluate and how many threads to use; the
    simulator embeds this part as is, so a simulated peer steps exactly as a live one.
    """

    batch_size: int = 16  # sequences per inner step; 16 x 128 bytes fits a phone's RAM easily
    lr: float = 3e-3  # inner AdamW; small models tolerate a high rate
    weight_decay: float = 0.0
    eval_batches: int = 4  # fixed held-out batches evaluated after each round
    eval_batch_size: int = 16
    max_shard_bytes: int = 4 << 20  # cap on the bytes of text a peer keeps in memory

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "train.batch_size", "must be at least 1")
        require(self.lr > 0, "train.lr", "must be positive")
        require(self.weight_decay >= 0, "train.weight_decay", "must be non-negative")
        require(self.eval_batches >= 0, "train.eval_batches", "must be non-negative")
        require(self.eval_batch_size >= 1, "train.eval_batch_size", "must be at least 1")
        require(self.max_shard_bytes >= 4096, "train.max_shard_bytes", "must be at least 4096")


PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")  # see p2pfm.model.device


def check_device_spec(spec: str) -> str | None:
    """Why ``spec`` is not a device name we accept (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), or None.

    Syntax only, torch-free, so configs are checked without importing torch or touching a GPU;
    :func:`p2pfm.model.device.resolve_device` checks the machine has it.
    """
    if spec in ("auto", "cpu", "cuda", "mps"):
        return None
    if spec.startswith("cuda:") and spec[5:].isdigit() and len(spec) <= 9:
        return None
    return f"{spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
