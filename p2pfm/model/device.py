"""Where a peer computes (CPU, CUDA, MPS) and in which precision, chosen once at start-up.

Everything that leaves the device is device-independent by construction: the gossip core,
state downloads and checkpoints see float32 vectors on the host (``flatten_parameters``), so a
CUDA peer's state is adopted by a CPU peer and the reverse. Mixed precision is *autocast*:
the parameters and AdamW moments stay float32 (the master copy), only the forward and
backward run in bf16/fp16 where the backend supports it. A peer training in bf16 and one in
fp32 therefore exchange and adopt identical kinds of state; precision is a local choice, like
the number of threads, not a property of the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from p2pfm.config import ConfigError
from p2pfm.model.config import PRECISIONS, check_device_spec

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceUnavailable(ConfigError):
    """The configured device is not on this machine (or this torch build): says what to do.

    A :class:`ConfigError`, so ``p2pfm peer`` reports it as the bad setting it is, not a crash.
    """


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``spec``; ``auto`` picks CUDA, then MPS, then the CPU.

    Raises :class:`DeviceUnavailable` for a device this machine or torch build lacks, rather
    than falling back silently: a user who asked for the GPU wants to know it is not used.
    """
    problem = check_device_spec(spec)
    if problem:
        raise DeviceUnavailable(problem)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--device {spec}: this torch build sees no CUDA GPU (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); install a CUDA build of torch or use --device cpu"
            )
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
        return torch.device("cuda", index)
    if spec == "mps" and not _mps_available():
        raise DeviceUnavailable(
            "--device mps: Metal (MPS) is not available here (it needs macOS 12.3+ on Apple silicon "
            "and an arm64 build of torch); use --device cpu"
        )
    return torch.device(spec)


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse precisions the device cannot autocast to, naming the alternative."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable(f"--precision bf16: {device} does not support bfloat16; use fp16 or fp32")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward pass's precision: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def describe(device: torch.device) -> str:
    """A human name for logs and status.json: ``cuda:0 (NVIDIA H200)``, ``mps``, ``cpu``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type
