"""One inner step and the one inner optimizer, for every trainer of the default model.

The daemon (:class:`p2pfm.daemon.trainer.LocalTrainer`), the simulator's GPT workload and the
``bench compare`` baselines all step through here, so a comparison between them compares
the protocol, never a drift in AdamW's settings (the simulator once ran torch's default
betas while the daemon ran (0.9, 0.95)). The library API takes the user's own optimizer.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import ParamsT

from p2pfm.model.config import InnerTrainConfig
from p2pfm.model.device import autocast

# nanoGPT's (and GPT-3's) beta2 = 0.95 instead of torch's 0.999: with small batches and a high
# lr the second moment must follow the gradient's scale within ~20 steps, not ~1000, or a burst
# after a quiet stretch takes an oversized step. A constant, not a [train] key: no run has needed
# another value, and every peer of a run should step alike.
INNER_BETAS: tuple[float, float] = (0.9, 0.95)


def build_inner_optimizer(params: ParamsT, config: InnerTrainConfig) -> torch.optim.Optimizer:
    """The inner AdamW: ``config.lr`` and ``config.weight_decay`` (on every parameter), betas INNER_BETAS."""
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=INNER_BETAS)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One step on one batch: forward, backward, optimizer step; returns the batch's mean loss.

    ``model(inputs, targets)`` returns ``(logits, loss)`` as :class:`p2pfm.model.gpt.GPT` does
    (a DistributedDataParallel wrapper of it too). Gradients are dropped (set to None) rather
    than zeroed, so no step ever adds a stale gradient and the memory is freed between steps.
    ``precision`` autocasts the forward pass on the inputs' device (the parameters and moments
    stay float32: :mod:`p2pfm.model.device`); ``scaler`` scales fp16 losses so that small
    gradients do not underflow (bf16 needs none).
    """
    with autocast(inputs.device, precision):
        _, loss = model(inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped (and the scale lowered) if a gradient overflowed
        scaler.update()
    # Dropped again after the step, not only before the next backward: between rounds (encode, merge,
    # serving a joiner) a 124M model's gradients were 0.5 GB held for nothing.
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
