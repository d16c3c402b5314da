"""Where a peer's memory goes: its full-size buffers by name, and the process's resident set.

At 100M+ parameters every model-sized vector costs ~0.5 GB, so "RSS is 6 GB" is useless
without the breakdown: status.json carries it (``memory``) and ``p2pfm bench scale`` reports it
beside a plain training loop's peak. Buffers are counted from what the objects hold, not
estimated; memory-mapped arrays (cold copies spilled to disk) are reported apart, since the
kernel pages them in and out as needed.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch

from p2pfm.daemon.snapshots import mapping_of


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _array_bytes(array: object) -> tuple[int, int]:
    """(bytes in anonymous memory, bytes memory-mapped) of one numpy array (views count their base)."""
    if not isinstance(array, np.ndarray):
        return 0, 0
    # A file mapping at the bottom of the view chain (np.memmap's too; a memmap made by copy() or
    # zeros_like() has none) is page cache the kernel may drop, not heap.
    return (0, array.nbytes) if mapping_of(array) is not None else (array.nbytes, 0)


def proc_rss(pid: int | str = "self") -> dict[str, int] | None:
    """A process's resident set now and at its peak (``VmRSS``/``VmHWM``, bytes) from Linux's
    ``/proc``; None where there is no such file (the process is gone, or this is not Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return {"rss": fields.get("VmRSS", 0), "peak_rss": fields.get("VmHWM", 0)}


def process_rss() -> dict[str, int]:
    """Resident set now and at its peak, in bytes (``VmRSS``/``VmHWM`` on Linux; ru_maxrss elsewhere)."""
    found = proc_rss()
    if found is not None:
        return found
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss": 0, "peak_rss": peak if sys.platform == "darwin" else peak * 1024}


def buffer_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, named: dict) -> dict:
    """Bytes held by the model, its gradients, the optimizer and the named host arrays.

    ``named``: name -> numpy array (or None), e.g. the gossip anchor, outer momentum, residual,
    initial parameters, served snapshot. Device memory (CUDA/MPS) is reported under ``device``.
    """
    params = list(model.parameters())
    on_host = all(p.device.type == "cpu" for p in params)
    model_bytes = _tensor_bytes(params)
    grad_bytes = _tensor_bytes(p.grad for p in params)
    optimizer_bytes = 0
    if optimizer is not None:
        optimizer_bytes = sum(_tensor_bytes(state.values()) for state in optimizer.state.values())
    buffers: dict[str, int] = {}
    mapped: dict[str, int] = {}
    for name, array in named.items():
        anonymous, on_disk = _array_bytes(array)
        if anonymous:
            buffers[name] = anonymous
        if on_disk:
            mapped[name] = on_disk
    where = "host" if on_host else "device"
    report = {
        where: {"model": model_bytes, "gradients": grad_bytes, "optimizer": optimizer_bytes},
        "host_buffers": buffers,
        "memory_mapped": mapped,
    }
    if not on_host and torch.cuda.is_available():
        report["device"]["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
    return report
