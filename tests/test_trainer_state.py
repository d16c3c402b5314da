"""ModelAdapter: parameters and optimizer state as plain arrays, restored so training continues identically."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from p2pfm.core.tensorfile import pack_arrays, unpack_arrays
from p2pfm.daemon.trainer import ModelAdapter, flatten_parameters, load_flat_parameters


def tiny_model(seed: int) -> torch.nn.Module:
    """Three layers; the last bias has a single entry (numel 1, like the optimizer's step count)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(123)
    return [
        (torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator))
        for _ in range(count)
    ]


def train(adapter: ModelAdapter, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for inputs, targets in data:
        adapter.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(adapter.model(inputs), targets)
        loss.backward()
        adapter.optimizer.step()


OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)),
    "adamw-amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=5e-2, momentum=0.9),
    "sgd-nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=5e-2, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_restored_optimizer_continues_identically(name):
    """Params + optimizer arrays (through a tensor file) into a fresh model: the next steps are bit-identical."""
    make = OPTIMIZERS[name]
    data = batches(6)
    original = ModelAdapter(model := tiny_model(0), make(model))
    train(original, data[:3])
    saved, _ = unpack_arrays(pack_arrays({"params": original.flat(), **original.optimizer_arrays()}))

    restored = ModelAdapter(model := tiny_model(1), make(model))  # other initial weights, empty state
    restored.load_flat(saved.pop("params"))
    restored.load_optimizer_arrays(saved)
    assert np.array_equal(restored.flat(), original.flat())

    train(original, data[3:])
    train(restored, data[3:])
    assert np.array_equal(restored.flat(), original.flat())


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum"])
def test_without_restoring_optimizer_state_training_diverges(name):
    """The control: the same params with a fresh optimizer take a different next step."""
    make = OPTIMIZERS[name]
    data = batches(4)
    original = ModelAdapter(model := tiny_model(0), make(model))
    train(original, data[:3])
    fresh = ModelAdapter(model := tiny_model(1), make(model))
    fresh.load_flat(original.flat())
    train(original, data[3:])
    train(fresh, data[3:])
    assert not np.allclose(fresh.flat(), original.flat())


def test_optimizer_arrays_are_flat_float32_per_parameter():
    """AdamW state becomes opt.<index>.<key> float32 vectors: moments of the param's size, step of size 1."""
    adapter = ModelAdapter(model := tiny_model(0), OPTIMIZERS["adamw"](model))
    train(adapter, batches(2))
    arrays = adapter.optimizer_arrays()
    params = list(model.parameters())
    assert set(arrays) == {
        f"opt.{i}.{k}" for i in range(len(params)) for k in ("step", "exp_avg", "exp_avg_sq")
    }
    for index, param in enumerate(params):
        assert arrays[f"opt.{index}.exp_avg"].dtype == np.float32
        assert arrays[f"opt.{index}.exp_avg"].shape == (param.numel(),)
        assert arrays[f"opt.{index}.step"].tolist() == [2.0]


def test_optimizer_arrays_empty_before_any_step():
    """A fresh optimizer has no state to save."""
    adapter = ModelAdapter(model := tiny_model(0), OPTIMIZERS["adamw"](model))
    assert adapter.optimizer_arrays() == {}


def test_load_optimizer_arrays_refuses_wrong_sizes():
    """State of another model size is refused naming the entry."""
    adapter = ModelAdapter(model := tiny_model(0), OPTIMIZERS["sgd-momentum"](model))
    with pytest.raises(ValueError, match=r"opt\.0\.momentum_buffer"):
        adapter.load_optimizer_arrays({"opt.0.momentum_buffer": np.zeros(7, np.float32)})


def test_flatten_and_load_flat_round_trip():
    """flat() is every parameter in order as float32; load_flat() puts a vector back exactly."""
    model = tiny_model(0)
    adapter = ModelAdapter(model, OPTIMIZERS["sgd-momentum"](model))
    flat = adapter.flat()
    assert flat.dtype == np.float32
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    assert np.array_equal(flat[:32], model[0].weight.detach().numpy().ravel())
    target = np.arange(flat.size, dtype=np.float32) / 100
    adapter.load_flat(target)
    assert np.array_equal(adapter.flat(), target)
    assert np.array_equal(model[4].bias.detach().numpy(), target[-1:])


def test_flat_is_a_copy():
    """Changing the returned vector does not change the model."""
    model = tiny_model(0)
    flat = flatten_parameters(model)
    flat[:] = 0.0
    assert np.any(flatten_parameters(model))


def test_load_flat_accepts_non_contiguous_and_float64_vectors():
    """A strided or float64 vector is converted, not misread."""
    model = tiny_model(0)
    numel = flatten_parameters(model).size
    strided = np.arange(2 * numel, dtype=np.float32)[::2]
    load_flat_parameters(model, strided)
    assert np.array_equal(flatten_parameters(model), strided)
    load_flat_parameters(model, np.ones(numel, np.float64))
    assert np.array_equal(flatten_parameters(model), np.ones(numel, np.float32))


def test_model_still_trains_after_load_flat():
    """Loaded parameters stay leaf parameters of the optimizer (gradients and steps still apply)."""
    model = tiny_model(0)
    adapter = ModelAdapter(model, OPTIMIZERS["adamw"](model))
    adapter.load_flat(np.zeros(adapter.flat().size, np.float32))
    train(adapter, batches(1))
    assert np.any(adapter.flat())


def saved_adamw_state(dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Two AdamW steps of tiny_model in ``dtype``, saved as optimizer arrays (params under "params")."""
    adapter = ModelAdapter(model := tiny_model(0).to(dtype), OPTIMIZERS["adamw"](model))
    train(adapter, [(x.to(dtype), y.to(dtype)) for x, y in batches(2)])
    return {"params": adapter.flat(), **adapter.optimizer_arrays()}


def assert_step_is_a_float32_scalar_on(state: dict[str, torch.Tensor], device: torch.device) -> None:
    step = state["step"]
    assert (step.shape, step.dtype, step.device) == (torch.Size(), torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_restored_state_takes_the_parameters_dtype_and_step_stays_float32(dtype):
    """Moments come back in the parameter's dtype; step a float32 CPU scalar, even beside a size-1 bias."""
    saved = saved_adamw_state(dtype)
    restored = ModelAdapter(model := tiny_model(1).to(dtype), OPTIMIZERS["adamw"](model))
    restored.load_flat(saved.pop("params"))
    restored.load_optimizer_arrays(saved)
    for param in model.parameters():
        state = restored.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key].dtype, state[key].device, state[key].shape) == (
                dtype,
                param.device,
                param.shape,
            )
        assert_step_is_a_float32_scalar_on(state, torch.device("cpu"))
    assert model[4].bias.numel() == 1  # the case a size-based rule gets wrong


def test_restored_bfloat16_state_continues_identically():
    """bfloat16 moments survive the float32 arrays exactly, so training resumes bit for bit."""
    data = [(x.to(torch.bfloat16), y.to(torch.bfloat16)) for x, y in batches(5)]
    original = ModelAdapter(model := tiny_model(0).to(torch.bfloat16), OPTIMIZERS["adamw"](model))
    train(original, data[:3])
    saved = {"params": original.flat(), **original.optimizer_arrays()}
    restored = ModelAdapter(model := tiny_model(1).to(torch.bfloat16), OPTIMIZERS["adamw"](model))
    restored.load_flat(saved.pop("params"))
    restored.load_optimizer_arrays(saved)
    train(original, data[3:])
    train(restored, data[3:])
    assert np.array_equal(restored.flat(), original.flat())


@pytest.mark.parametrize("flag", [None, "capturable", "fused"])
def test_restored_state_lands_on_the_parameters_device(flag):
    """On 'meta' parameters the moments are restored on 'meta', not the CPU; step too when capturable or fused.

    'meta' is a real torch device with no storage, so the test tells device placement apart on a
    CPU-only machine (torch's rule for step: CPU unless the group is capturable or fused).
    """
    saved = saved_adamw_state(torch.float32)
    del saved["params"]
    model = tiny_model(1).to("meta")
    options = {flag: True} if flag else {}
    adapter = ModelAdapter(model, torch.optim.AdamW(model.parameters(), lr=1e-2, **options))
    adapter.load_optimizer_arrays(saved)
    for param in model.parameters():
        state = adapter.optimizer.state[param]
        assert param.device.type == "meta"
        assert state["exp_avg"].device == param.device and state["exp_avg_sq"].device == param.device
        assert_step_is_a_float32_scalar_on(state, param.device if flag else torch.device("cpu"))
