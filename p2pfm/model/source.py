"""Model sources: one seam between "what to train" (``--model SPEC``) and the trainer.

A SPEC is "" (the built-in byte-level GPT sized by the ``[model]`` table), a preset name
(:data:`p2pfm.model.config.GPT_PRESETS`), or ``hf:DIR`` (a local Hugging Face causal LM,
:mod:`p2pfm.model.hf`). The daemon (:func:`load_workload`) and the library API
(:func:`load_model`) both come through here, so a SPEC means the same model in both and the
rest of p2pfm sees only a torch module with ``forward(inputs, targets) -> (logits, loss)`` and
a dataset with ``batch`` / ``eval_batches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from p2pfm.config import ConfigError
from p2pfm.model.config import HF_PREFIX, GPTConfig, check_model_source
from p2pfm.model.data import ByteDataset, ShardSpec, TokenDataset


@dataclass
class LoadedModel:
    """A model ready to train: identical on every peer that loads the same SPEC (and seed)."""

    model: torch.nn.Module  # forward(inputs, targets) -> (logits, mean cross-entropy)
    name: str  # e.g. "p2pfm-gpt 10m" or "gpt2 (/models/tiny)"
    params: int  # trainable parameters (tied weights counted once)
    block_size: int  # context length a training window uses (tokens; bytes for the built-in GPT)
    tokenizer: Any = None  # the HF tokenizer; None for the byte-level GPT (a byte is a token)
    hf: Any = None  # the p2pfm.model.hf.HFModel, for hf:DIR

    @property
    def unit(self) -> str:
        """What the loss is per: bytes for the built-in GPT, tokens for a tokenizer's model."""
        return "byte" if self.tokenizer is None else "token"


def load_model(spec: str = "", *, seed: int = 0, model_config: GPTConfig | None = None) -> LoadedModel:
    """The model a SPEC names. ``seed`` initialises the built-in GPT (every peer of a run passes the
    run seed); ``model_config`` is its ``[model]`` table when SPEC is "" (a preset ignores it, and
    ``hf:DIR`` reads only its ``block_size``, as a cap on the context). Raises ConfigError."""
    config = model_config or GPTConfig()
    if spec.startswith(HF_PREFIX):
        from p2pfm.model.hf import load_hf  # transformers only for hf:DIR

        hf = load_hf(spec[len(HF_PREFIX) :])
        block = min(config.block_size, hf.max_positions or config.block_size)
        params = sum(p.numel() for p in hf.model.parameters())
        return LoadedModel(
            model=hf.model, name=hf.name, params=params, block_size=block, tokenizer=hf.tokenizer, hf=hf
        )
    from p2pfm.model.gpt import build_model

    geometry = check_model_source(spec, config)
    model = build_model(geometry, seed)
    params = sum(p.numel() for p in model.parameters())
    return LoadedModel(
        model=model, name=f"p2pfm-gpt {spec or 'custom'}", params=params, block_size=geometry.block_size
    )


@dataclass
class Workload:
    """What a peer trains: the model and this peer's dataset (bytes, or token ids for hf:DIR)."""

    loaded: LoadedModel
    dataset: ByteDataset

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


def load_workload(
    spec: str,
    model_config: GPTConfig,
    data: Path | None,
    shard: ShardSpec,
    *,
    seed: int,
    max_shard_bytes: int,
    seq_len: int = 0,
) -> Workload:
    """The model for ``spec`` and this peer's shard of ``data`` in the model's own units.

    The built-in GPT reads bytes; an HF model reads the same byte split tokenized with its own
    tokenizer, in windows of ``min(model's max positions, model_config.block_size)`` tokens.
    ``seq_len`` (0 = the model's context) trains on shorter windows of the same model: a 124M
    preset's 1024 positions stay, a CPU peer steps on 128-byte windows (a step's cost is linear in it).
    """
    loaded = load_model(spec, seed=seed, model_config=model_config)
    if seq_len > loaded.block_size:
        raise ConfigError(
            f"train.seq_len: {seq_len} is longer than the model's context ({loaded.block_size}); use at most that"
        )
    common = {"block_size": seq_len or loaded.block_size, "max_shard_bytes": max_shard_bytes, "seed": seed}
    if loaded.hf is not None:
        dataset: ByteDataset = TokenDataset(
            data, shard, encode=loaded.hf.encode, vocab_size=loaded.hf.vocab_size, **common
        )
    else:
        dataset = ByteDataset(data, shard, **common)
    return Workload(loaded=loaded, dataset=dataset)
