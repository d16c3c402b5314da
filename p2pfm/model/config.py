"""What a peer trains and how its inner loop runs: the configs shared by the daemon and the simulator.

Torch-free on purpose: the simulator's scenario files embed these tables
(``[workload.gpt.model]``, ``[workload.gpt.train]``) and an MLP scenario must not pay the
second it takes to import torch. The daemon reads the same tables as ``[model]`` and
``[train]``, so a field and its check are written once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from p2pfm.config import ConfigError, require


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


def gpt_param_count(config: GPTConfig) -> int:
    """Parameters of :class:`p2pfm.model.gpt.GPT` with ``config``, computed without building it.

    Token and position embeddings (the output head is tied to the token embedding, so it adds
    none), per block two LayerNorms (2C each), the attention's qkv (3C^2 + 3C) and projection
    (C^2 + C), the MLP (8C^2 + 5C): 12C^2 + 13C; and the final LayerNorm (2C). A unit test
    checks this against the built model for every preset.
    """
    c = config.n_embd
    return config.vocab_size * c + config.block_size * c + config.n_layer * (12 * c * c + 13 * c) + 2 * c


# Named sizes of the built-in byte-level GPT (``--model NAME``, ``model_source = "NAME"``).
GPT_PRESETS: dict[str, GPTConfig] = {
    # 120,576 parameters: a step takes milliseconds; for tests, emulation and the simulator.
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
    # 1,040,768 parameters: the default ``[model]`` table (GPTConfig()).
    "1m": GPTConfig(),
    # 10,844,160 parameters: a laptop's run (6 blocks of width 384, 256-byte context).
    "10m": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    # 86,039,040 parameters: GPT-2 small's transformer geometry exactly (12 blocks, 12 heads, width
    # 768, 1024 positions, 85,054,464 parameters in the blocks alone). GPT-2 small has 124,439,808
    # because 38,597,376 of them are its 50,257-token BPE embedding; a byte-level model has 256 tokens,
    # so its embedding is 196,608 parameters and the total is 86.0M. For GPT-2 itself (124M, its
    # tokenizer), train the checkpoint: ``--model hf:DIR`` with a local copy in safetensors.
    "gpt2-small": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # 124,072,000 parameters: GPT-2 small's parameter count (124.4M) in a byte-level model: 16 blocks of
    # width 800 (16 heads of 50), 1024 positions. The size the scale targets are measured at.
    "124m": GPTConfig(block_size=1024, n_layer=16, n_head=16, n_embd=800),
}

HF_PREFIX = "hf:"


def describe_presets() -> str:
    """``tiny (120,576 params), 1m (1,040,768 params), ...``: for ``--help`` and error messages."""
    return ", ".join(f"{name} ({gpt_param_count(cfg):,} params)" for name, cfg in GPT_PRESETS.items())


def check_model_source(source: str, model: GPTConfig, table: Mapping[str, Any] | None = None) -> GPTConfig:
    """The built-in GPT's geometry for ``model_source`` and the ``[model]`` table; raises ConfigError.

    ``source`` is "" (the ``[model]`` table as given), a preset name (its geometry; the ``[model]``
    table must not set a different size: two sizes for one model are a mistake, not a merge), or
    ``hf:DIR`` (a Hugging Face checkpoint; of the ``[model]`` table only ``block_size`` applies, as a
    cap on the context length). ``table`` is the ``[model]`` table as written (TOML and flags), when
    known: a key given explicitly is caught even where its value equals the default. Torch-free.
    """
    if source == "":
        return model
    default = GPTConfig()
    given = dict(table or {})
    if source.startswith(HF_PREFIX):
        require(len(source) > len(HF_PREFIX), "model_source", "hf: needs a directory: hf:DIR")
        explicit = sorted(
            {k for k in given if k != "block_size"}
            | {
                f.name
                for f in fields(GPTConfig)
                if f.name != "block_size" and getattr(model, f.name) != getattr(default, f.name)
            }
        )
        if explicit:
            raise ConfigError(
                f"model_source: {source!r} takes its geometry from the checkpoint, but [model] also sets "
                f"{', '.join('model.' + k for k in explicit)}; remove those (only model.block_size applies, "
                "as a cap on the context length)"
            )
        return model
    preset = GPT_PRESETS.get(source)
    if preset is None:
        raise ConfigError(
            f"model_source: unknown model {source!r}; give a preset ({describe_presets()}), hf:DIR "
            "(a local Hugging Face checkpoint), or nothing for the [model] table"
        )
    # A key may repeat the preset's value (a config written out by a run); any other value is a conflict.
    # Of a built table, a value that is neither the default nor the preset's was set to something else.
    conflicts = sorted(
        {k for k, v in given.items() if getattr(preset, k, None) != v}
        | {
            f.name
            for f in fields(GPTConfig)
            if getattr(model, f.name) not in (getattr(default, f.name), getattr(preset, f.name))
        }
    )
    if conflicts:
        raise ConfigError(
            f"model_source: preset {source!r} and [model] {', '.join('model.' + k for k in conflicts)} both "
            "set the model's size; use one of them"
        )
    return preset


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
