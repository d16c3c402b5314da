"""The one inner optimizer and the one training step, shared by the daemon, the simulator and the benches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pfm.daemon.config import TrainConfig
from p2pfm.daemon.trainer import LocalTrainer
from p2pfm.model.config import GPTConfig, InnerTrainConfig
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.gpt import build_model
from p2pfm.model.train import INNER_BETAS, build_inner_optimizer, train_step
from p2pfm.sim.scenario import scenario_from_dict
from p2pfm.sim.workloads import GPTWorkload

TINY_MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)


def hyper_parameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every setting of every parameter group, without the parameters themselves."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small text folder, so no test depends on this machine's stdlib."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        words = rng.choice(["def", "return", "self", "import", "class", "for", "in", "if"], size=400)
        (folder / f"f{i}.py").write_text(" ".join(words))
    return folder


def test_inner_optimizer_is_adamw_with_the_daemon_betas_and_the_config_lr_and_decay():
    """lr and weight decay come from the [train] table; betas are (0.9, 0.95), not torch's (0.9, 0.999)."""
    model = build_model(TINY_MODEL, 0)
    optimizer = build_inner_optimizer(model.parameters(), InnerTrainConfig(lr=1e-3, weight_decay=0.1))
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-3, 0.1, (0.9, 0.95))
    assert INNER_BETAS == (0.9, 0.95)
    assert len(group["params"]) == len(list(model.parameters()))


def test_train_step_returns_the_batch_loss_and_steps_the_model():
    """The returned float is the forward's loss on the batch, and the parameters move."""
    model = build_model(TINY_MODEL, 0)
    optimizer = build_inner_optimizer(model.parameters(), InnerTrainConfig())
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (4, 16), generator=generator)
    targets = torch.randint(0, 256, (4, 16), generator=generator)
    with torch.no_grad():
        _, expected = model(inputs, targets)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    loss = train_step(model, optimizer, inputs, targets)
    assert isinstance(loss, float) and loss == float(expected)
    assert not torch.equal(before, torch.nn.utils.parameters_to_vector(model.parameters()))


def test_daemon_trainer_and_simulator_build_the_same_inner_optimizer(corpus):
    """Same [train] values -> identical AdamW settings in a live peer and in a simulated one."""
    train = TrainConfig(lr=1e-3, weight_decay=0.05, batch_size=4, eval_batches=1, eval_batch_size=4)
    dataset = ByteDataset(corpus, ShardSpec(0, 2), block_size=TINY_MODEL.block_size)
    daemon = LocalTrainer(
        build_model(TINY_MODEL, 0),
        dataset,
        lr=train.lr,
        weight_decay=train.weight_decay,
        batch_size=train.batch_size,
        seed=0,
        eval_batches=train.eval_batches,
        eval_batch_size=train.eval_batch_size,
    )
    scenario = scenario_from_dict({
        "name": "same-optimizer", "peers": 2, "rounds": 1,
        "workload": {"kind": "gpt", "gpt": {
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
            "train": {"lr": train.lr, "weight_decay": train.weight_decay, "batch_size": 4,
                      "eval_batches": 1, "eval_batch_size": 4},
            "data": str(corpus),
        }},
    })  # fmt: skip
    simulated = GPTWorkload(scenario.workload.gpt, scenario.peers, np.random.default_rng(0))
    for optimizer in simulated.optimizers:
        assert type(optimizer) is type(daemon.optimizer)
        assert hyper_parameters(optimizer) == hyper_parameters(daemon.optimizer)
    assert hyper_parameters(daemon.optimizer)[0]["betas"] == INNER_BETAS


def test_bench_baselines_build_the_daemon_inner_optimizer():
    """DDP, single-process and hivemind workers step with the peers' AdamW (their weight decay too)."""
    from argparse import Namespace

    from p2pfm.bench.compare_common import inner_optimizer

    train = TrainConfig(lr=2e-3)
    peer = build_inner_optimizer(build_model(TINY_MODEL, 0).parameters(), train)
    worker = inner_optimizer(Namespace(lr=train.lr, batch_size=8), build_model(TINY_MODEL, 0).parameters())
    assert type(worker) is type(peer) and hyper_parameters(worker) == hyper_parameters(peer)
    assert (
        hyper_parameters(worker)[0]["weight_decay"] == train.weight_decay == 0.0
    )  # torch's AdamW default is 0.01
