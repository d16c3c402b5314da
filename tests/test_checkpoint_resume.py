"""A peer's checkpoint across restarts: safetensors written and restored, legacy files migrated, models told apart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from p2pfm.config import ConfigError
from p2pfm.core.envelope import EnvelopeLimits
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import PeerProtocol, PeerSetup
from p2pfm.core.tensorfile import pack_arrays
from p2pfm.daemon.checkpoint import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME
from p2pfm.daemon.config import PeerConfig
from p2pfm.daemon.metrics import MetricsLog
from p2pfm.daemon.net import PeerNetwork
from p2pfm.daemon.runtime import PeerRuntime
from p2pfm.daemon.trainer import ModelAdapter

RUN = "resume-test"


def make_runtime(config: PeerConfig, seed: int) -> PeerRuntime:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    trainer = ModelAdapter(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    identity = Identity.generate()
    setup = PeerSetup(
        identity=identity,
        run_id=RUN,
        gossip=config.gossip,
        limits=EnvelopeLimits(max_bytes=config.net.max_message_bytes),
    )
    return PeerRuntime(
        config=config, protocol=PeerProtocol(setup, trainer.flat()), trainer=trainer,
        net=PeerNetwork(config.net, identity, RUN), metrics=MetricsLog(config.work_dir), shard_index=0,
        rng=np.random.default_rng(0),
    )  # fmt: skip


@pytest.fixture
def config(tmp_path: Path) -> PeerConfig:
    return PeerConfig(run_id=RUN, work_dir=tmp_path / "peer", key=tmp_path / "peer" / "peer.key")


def test_restart_restores_the_safetensors_checkpoint_exactly(config):
    """Written by one runtime, restored by a fresh one (other initial weights): same parameters, round."""
    first = make_runtime(config, seed=0)
    first.protocol.learner.round = 5
    first.write_checkpoint()
    tensors = load_file(config.work_dir / CHECKPOINT_NAME)
    assert tensors["model.0.weight"].shape == (3, 4) and tensors["model.1.bias"].shape == (2,)
    second = make_runtime(config, seed=1)
    assert not np.array_equal(second.protocol.params, first.protocol.params)
    assert second.restore_checkpoint()
    assert second.protocol.round == 5
    assert np.array_equal(second.protocol.params, first.protocol.params)
    assert np.array_equal(second.trainer.flat(), first.protocol.params)


def test_legacy_checkpoint_of_an_older_version_resumes_and_is_migrated(config):
    """A checkpoint.p2pfm written before model_source existed resumes; the next write is safetensors."""
    old = make_runtime(config, seed=0)
    old.protocol.learner.round = 3
    meta = old._state_meta()
    meta["config"].pop("model_source")  # as an earlier version wrote it
    arrays = {**old.protocol.learner.state_arrays(), **old.trainer.optimizer_arrays()}
    config.work_dir.mkdir(parents=True, exist_ok=True)
    (config.work_dir / LEGACY_CHECKPOINT_NAME).write_bytes(pack_arrays(arrays, meta))
    fresh = make_runtime(config, seed=1)
    assert fresh.restore_checkpoint() and fresh.protocol.round == 3
    assert np.array_equal(fresh.protocol.params, old.protocol.params)
    fresh.write_checkpoint()
    assert sorted(p.name for p in config.work_dir.iterdir() if "checkpoint" in p.name) == [CHECKPOINT_NAME]


def test_checkpoint_of_another_model_source_is_refused(config, tmp_path):
    """A work dir trained with one --model is not silently resumed with another."""
    make_runtime(config, seed=0).write_checkpoint()
    other = replace(config, model_source=f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="another run or model"):
        make_runtime(other, seed=0).restore_checkpoint()
