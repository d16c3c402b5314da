"""Devices and precisions: a peer's state is device- and precision-independent.

State written by a peer training under bf16 autocast is adopted by a float32 peer (and the
reverse, and into a model whose parameters are bfloat16), through the same bytes a state
download carries; optimizer state lands on the parameters' device. CUDA cases run only
where a GPU is present (never in CI).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pfm.config import ConfigError
from p2pfm.core.tensorfile import unpack_arrays
from p2pfm.core.transfer import pack_state
from p2pfm.daemon.config import load_peer_config
from p2pfm.daemon.trainer import LocalTrainer, flatten_parameters, load_flat_parameters
from p2pfm.model.config import GPTConfig
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.device import DeviceUnavailable, autocast, check_precision, resolve_device
from p2pfm.model.gpt import build_model

TINY = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> object:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)))
    return path


def make_trainer(corpus, *, precision: str = "fp32", device: str = "cpu", seed: int = 1) -> LocalTrainer:
    dataset = ByteDataset(
        corpus, ShardSpec(0, 1), block_size=TINY.block_size, max_shard_bytes=1 << 20, seed=0
    )
    return LocalTrainer(
        build_model(TINY, seed=0), dataset, lr=3e-3, weight_decay=0.0, batch_size=4, seed=seed,
        eval_batches=2, eval_batch_size=4, device=resolve_device(device), precision=precision,
    )  # fmt: skip


def through_the_wire(trainer: LocalTrainer, round_: int = 7) -> dict[str, np.ndarray]:
    """The arrays a joiner unpacks from this trainer's served state (the real container format)."""
    blob = pack_state(trainer.flat(), round_, trainer.optimizer_arrays())
    arrays, _ = unpack_arrays(blob)
    return arrays


def adopt(trainer: LocalTrainer, arrays: dict[str, np.ndarray]) -> None:
    trainer.load_flat(arrays["params"])
    trainer.load_optimizer_arrays({k: v for k, v in arrays.items() if k.startswith("opt.")})


# --- choosing a device -------------------------------------------------------------------
def test_cpu_and_auto_resolve_to_what_the_machine_has():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = (
        "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_config_error_that_says_what_to_do():
    with pytest.raises(DeviceUnavailable, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_is_refused():
    with pytest.raises(DeviceUnavailable, match="MPS"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "tpu", "cuda:123456"])
def test_bad_device_names_are_refused_in_the_config(spec):
    with pytest.raises(ConfigError, match="train.device"):
        load_peer_config(None, {"train.device": spec})


def test_bad_precision_is_refused_in_the_config():
    with pytest.raises(ConfigError, match="train.precision"):
        load_peer_config(None, {"train.precision": "int4"})
    with pytest.raises(ConfigError):
        check_precision(torch.device("cpu"), "fp8")


def test_old_device_key_is_now_device_class():
    config = load_peer_config(None, {"device_class": "jetson", "train.device": "cpu"})
    assert config.device_class == "jetson" and config.train.device == "cpu"


# --- precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_with_fp32_master_weights(corpus, precision):
    trainer = make_trainer(corpus, precision=precision)
    before = trainer.evaluate()
    stats = trainer.train_steps(30)
    assert np.isfinite(stats.mean_loss)
    assert trainer.evaluate() < before - 0.3  # it learns
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    moments = [v for s in trainer.optimizer.state.values() for v in s.values() if v.numel() > 1]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    if precision == "fp16":
        assert trainer.scaler is not None and trainer.scaler.get_scale() > 0


def test_autocast_really_lowers_the_forward_precision():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(x).dtype == torch.float32


@pytest.mark.parametrize(("writer", "reader"), [("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "fp32")])
def test_state_of_one_precision_is_adopted_by_a_peer_configured_otherwise(corpus, writer, reader):
    donor = make_trainer(corpus, precision=writer, seed=1)
    donor.train_steps(12)
    joiner = make_trainer(corpus, precision=reader, seed=2)
    arrays = through_the_wire(donor)
    adopt(joiner, arrays)
    np.testing.assert_array_equal(joiner.flat(), donor.flat())
    for param in joiner.model.parameters():  # moments on the parameter's device, in its dtype
        state = joiner.optimizer.state[param]
        assert state["exp_avg"].device == param.device and state["exp_avg"].dtype == param.dtype
        assert state["step"].item() == 12
    np.testing.assert_allclose(joiner.evaluate(), make_trainer_eval(donor, reader), rtol=0.05)
    joiner.train_steps(3)  # and it trains on from there
    assert np.isfinite(joiner.flat()).all()


def make_trainer_eval(donor: LocalTrainer, precision: str) -> float:
    """The donor's weights evaluated under the reader's precision (what the joiner should see)."""
    old = donor.precision
    donor.precision = precision
    try:
        return donor.evaluate()
    finally:
        donor.precision = old


def test_state_is_adopted_by_a_model_kept_in_bfloat16():
    """A library user's bf16 model: the float32 wire vector is cast in, moments follow the dtype."""
    source = build_model(TINY, seed=0)
    flat = flatten_parameters(source)
    target = build_model(TINY, seed=5).to(torch.bfloat16)
    load_flat_parameters(target, flat)
    back = flatten_parameters(target)
    assert back.dtype == np.float32 and back.shape == flat.shape
    np.testing.assert_allclose(back, flat, rtol=1e-2, atol=1e-2)  # bf16 keeps 8 bits of mantissa


def test_flatten_fills_a_given_buffer_without_a_second_copy():
    model = build_model(TINY, seed=0)
    expected = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    out = np.empty(expected.size, dtype=np.float32)
    assert flatten_parameters(model, out) is out
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="float32"):
        flatten_parameters(model, np.empty(expected.size, dtype=np.float64))


@CUDA
def test_cuda_state_is_adopted_by_a_cpu_peer_and_back(corpus):
    gpu = make_trainer(corpus, precision="bf16", device="cuda")
    gpu.train_steps(5)
    cpu = make_trainer(corpus, precision="fp32", device="cpu")
    adopt(cpu, through_the_wire(gpu))
    np.testing.assert_array_equal(cpu.flat(), gpu.flat())
    again = make_trainer(corpus, device="cuda")
    adopt(again, through_the_wire(cpu))
    for param in again.model.parameters():
        assert again.optimizer.state[param]["exp_avg"].device == param.device
    assert again.optimizer.state[next(again.model.parameters())]["step"].device.type == "cpu"
    again.train_steps(2)
