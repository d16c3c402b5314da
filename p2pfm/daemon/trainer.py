"""Local training: H inner AdamW steps on this peer's shard, parameters as one flat vector.

Runs in a worker thread of the daemon (torch releases the GIL), so the event loop keeps
answering gossip and state requests while we compute. Between rounds the gossip core hands
back a new anchor, which :meth:`LocalTrainer.load_flat` copies into the model; the inner
optimizer's moments stay local, as in DiLoCo.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from p2pfm.model.config import InnerTrainConfig
from p2pfm.model.data import ByteDataset, evaluate
from p2pfm.model.device import check_precision, grad_scaler
from p2pfm.model.train import build_inner_optimizer, train_step


def flatten_parameters(model: torch.nn.Module, out: np.ndarray | None = None) -> np.ndarray:
    """All parameters as one float32 host vector, in ``model.parameters()`` order.

    Copied one parameter at a time straight into ``out`` (allocated if None): no full-size
    device-side concatenation and no second host copy (``parameters_to_vector`` + ``.to("cpu")``
    held the model twice more), so a 124M-parameter model on a GPU costs one host vector, filled
    in blocks of one tensor. Converted by torch, not numpy: numpy has no bfloat16.
    """
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if out is None:
        out = np.empty(total, dtype=np.float32)
    elif out.shape != (total,) or out.dtype != np.float32:
        raise ValueError(f"output vector is {out.dtype}{out.shape}, the model needs float32 ({total},)")
    target = torch.from_numpy(out)
    offset = 0
    with torch.no_grad():
        for param in params:
            count = param.numel()
            target[offset : offset + count].copy_(param.detach().reshape(-1))
            offset += count
    return out


def load_flat_parameters(model: torch.nn.Module, flat: np.ndarray) -> None:
    """Copy a flat vector into the parameters in place, keeping each parameter's dtype and device."""
    with warnings.catch_warnings():
        # The gossip learner hands out its anchor read-only (no copy); torch warns about any such
        # array, but ``source`` is only ever read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for param in model.parameters():  # one tensor at a time: host -> device, float32 -> its dtype
            count = param.numel()
            param.copy_(source[offset : offset + count].view_as(param))
            offset += count
    if offset != source.numel():
        raise ValueError(f"flat vector has {source.numel()} entries, the model {offset}")


@dataclass
class StepStats:
    steps: int
    samples: int
    mean_loss: float
    compute_seconds: float


class ModelAdapter:
    """A torch model and its (inner) optimizer, seen as flat vectors by the gossip core.

    Used as is by the library API (:class:`p2pfm.api.GossipOptimizer`) for a user's own model
    and optimizer; :class:`LocalTrainer` adds the default data and inner loop.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.samples_seen = 0
        self.steps_done = 0

    def flat(self, out: np.ndarray | None = None) -> np.ndarray:
        """The parameters as one float32 vector, written into ``out`` if given (no fresh 0.5 GB at 124M)."""
        return flatten_parameters(self.model, out)

    def load_flat(self, flat: np.ndarray) -> None:
        load_flat_parameters(self.model, flat)

    def evaluate(self) -> float:
        return float("nan")

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the parameters in ``model.parameters()`` order: the flat vector's layout.

        Checkpoints save each parameter under its name. A wrapper's ``module.`` prefix (ours for
        Hugging Face models, DistributedDataParallel's) is dropped when every name has it, so the
        names are the wrapped model's own and the saved tensors load into it as a state dict.
        """
        named = [(name, tuple(param.shape)) for name, param in self.model.named_parameters()]
        if named and all(name.startswith("module.") for name, _ in named):
            named = [(name[len("module.") :], shape) for name, shape in named]
        return named

    def optimizer_arrays(self, *, views: bool = False) -> dict[str, np.ndarray]:
        """Optimizer state (e.g. AdamW moments, step counts) as plain float32 arrays, no pickle.

        ``views``: host float32 state is returned as views of the live tensors, not copies (1 GB of
        AdamW moments at 124M parameters, every round). Only for a caller that is done with them
        before the optimizer steps again: the daemon writes its snapshot and checkpoint between
        rounds, while no training runs. Other dtypes and devices are converted (copies) either way.
        """
        arrays: dict[str, np.ndarray] = {}
        for index, param in enumerate(self.model.parameters()):
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    if (
                        views
                        and value.device.type == "cpu"
                        and value.dtype == torch.float32
                        and value.is_contiguous()
                    ):
                        arrays[f"opt.{index}.{key}"] = value.detach().numpy().reshape(-1)
                        continue
                    # A copy, converted by torch (numpy has no bfloat16), never a view of live state.
                    own = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
                    arrays[f"opt.{index}.{key}"] = own.numpy().ravel()
                elif isinstance(value, (int, float)):
                    arrays[f"opt.{index}.{key}"] = np.array([value], dtype=np.float32)
        return arrays

    def load_optimizer_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_arrays` saved; sizes are checked against our parameters.

        Placement follows torch's own ``Optimizer.load_state_dict``: per-parameter state
        (moments, momentum buffers) on the parameter's device and in its dtype, or the next
        step fails (CUDA params, CPU moments) or silently computes in the wrong precision;
        ``step`` a float32 scalar, on the CPU unless the group is ``capturable`` or ``fused``,
        which keep it on the parameter's device. ``step`` is told by its name, not its size:
        a one-entry parameter (a bias of size 1) has one-entry moments too.
        """
        for index, param in enumerate(self.model.parameters()):
            prefix = f"opt.{index}."
            entries = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            if not entries:
                continue
            group = next((g for g in self.optimizer.param_groups if any(p is param for p in g["params"])), {})
            step_device = (
                param.device if group.get("capturable") or group.get("fused") else torch.device("cpu")
            )
            state: dict[str, torch.Tensor] = {}
            for key, value in entries.items():
                if key == "step" and value.size == 1:
                    state[key] = torch.tensor(float(value[0]), dtype=torch.float32, device=step_device)
                    continue
                if value.size == param.numel():
                    shape = param.shape
                elif value.size == 1:  # another scalar (ASGD's eta, mu)
                    shape = torch.Size()
                else:
                    raise ValueError(
                        f"optimizer state {prefix}{key} has {value.size} entries, parameter has {param.numel()}"
                    )
                own = torch.from_numpy(
                    np.array(value, dtype=np.float32).reshape(shape)
                )  # a copy: not the caller's array
                state[key] = own.to(device=param.device, dtype=param.dtype)
            self.optimizer.state[param] = state


class LocalTrainer(ModelAdapter):
    """Owns the model, the inner optimizer and the data sampler of one peer.

    The optimizer and the step are :mod:`p2pfm.model.train`'s, which the simulator uses too.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: ByteDataset,
        *,
        lr: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        eval_batches: int,
        eval_batch_size: int,
        device: torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        self.device = device if device is not None else torch.device("cpu")
        check_precision(self.device, precision)
        self.precision = precision
        # Built on the CPU from the run seed (identical on every peer), then moved; the optimizer
        # is created after the move, so its moments are born on the parameters' device.
        model = model.to(self.device)
        optimizer = build_inner_optimizer(
            model.parameters(), InnerTrainConfig(lr=lr, weight_decay=weight_decay)
        )
        super().__init__(model, optimizer)
        self.scaler = grad_scaler(self.device, precision)
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: same batches on any device
        self.eval_set = [
            (x.to(self.device), y.to(self.device))
            for x, y in (dataset.eval_batches(eval_batches, eval_batch_size) if eval_batches > 0 else [])
        ]

    def train_steps(self, steps: int, stop: threading.Event | None = None) -> StepStats:
        """Run up to ``steps`` AdamW steps (fewer if ``stop`` is set); returns loss and timing."""
        start = time.perf_counter()
        losses = []
        self.model.train()
        for _ in range(steps):
            if stop is not None and stop.is_set():
                break
            inputs, targets = self.dataset.batch(self.generator, self.batch_size)
            inputs, targets = (
                inputs.to(self.device, non_blocking=True),
                targets.to(self.device, non_blocking=True),
            )
            losses.append(
                train_step(
                    self.model, self.optimizer, inputs, targets, precision=self.precision, scaler=self.scaler
                )
            )
        self.samples_seen += len(losses) * self.batch_size
        self.steps_done += len(losses)
        return StepStats(
            steps=len(losses),
            samples=len(losses) * self.batch_size,
            mean_loss=float(np.mean(losses)) if losses else float("nan"),
            compute_seconds=time.perf_counter() - start,
        )

    def evaluate(self) -> float:
        return (
            evaluate(self.model, self.eval_set, precision=self.precision) if self.eval_set else float("nan")
        )
