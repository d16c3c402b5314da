"""A fair datacentre baseline: the same training on a datacentre GPU, by model size.

The old baseline charged every model 20 % model-FLOPs utilisation (MFU) on an A100. A GPU
reaches that only on big matrices: a 2.7k-parameter MLP's step is a few hundred tiny kernels,
each costing the same launch and framework overhead whatever its size, so it runs at a
millionth of peak and the old figure flattered the datacentre by orders of magnitude.

**Step time model** (a roofline with an overhead floor)::

    flops_step = 6 * params * tokens_per_step                 # Kaplan et al. 2020, training
    step_s     = ops_per_step * op_overhead_s + flops_step / (peak_flops * plateau_mfu)
    mfu        = flops_step / (peak_flops * step_s)

- ``op_overhead_s`` = 10 us per op: eager PyTorch is overhead-bound for small tensors, about
  10 us of framework and launch cost per operator (H. He, "Making Deep Learning Go Brrrr From
  First Principles", 2022; kernel launch alone is ~5 us, NVIDIA "Getting Started with CUDA
  Graphs", 2019). ``ops_per_step`` = 200: forward, backward and optimizer of a small model.
- ``plateau_mfu`` = 0.45: what large, well-tuned training reaches (rows of
  :data:`PUBLISHED_MFU`: Megatron-LM 44-52 % on A100 from 1.7B to 1T parameters, PaLM 46 %).

:func:`mfu_table` prints the model's MFU by parameter count beside the published rows.

**Power**: the GPU draws ``idle_w + (tdp_w - idle_w) * mfu / plateau_mfu`` (linear in
utilisation, full TDP at the plateau; A100 SXM: 400 W TDP and 312 TFLOPS dense bf16, NVIDIA
A100 datasheet; idle 60 W, an assumption of ~15 % of TDP, configurable), times the facility's
PUE (1.2: hyperscalers ~1.1, industry average ~1.5, Uptime Institute 2023). Host CPUs, network
and cooling beyond PUE are not counted: the baseline still errs in the datacentre's favour.

**Embodied carbon**: ~10 gCO2e per GPU-hour, from BLOOM's estimate of 11.2 t embodied for
~1.08 M A100-hours (Luccioni, Viguier, Ligozat, "Estimating the Carbon Footprint of BLOOM",
2022; 6-year lifetime, 85 % use). Configurable. Edge devices that already exist carry zero
*additional* embodied carbon: their manufacture is spent whether or not they train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2pfm.energy.tracker import JOULES_PER_WH

GRID_G_PER_KWH: dict[str, float] = {  # codecarbon's table, BRIEF s7
    "NOR": 30.0,
    "FRA": 56.0,
    "GBR": 238.0,
    "USA": 369.0,
    "WORLD": 475.0,
    "IND": 713.0,
}

PUBLISHED_MFU: tuple[tuple[float, float, str], ...] = (
    # (parameters, MFU or hardware-FLOPs utilisation, source)
    (1.7e9, 0.44, "Narayanan et al., Megatron-LM, SC21, Table 1: 1.7B, 137 of 312 TFLOPS/A100"),
    (1.456e11, 0.47, "Narayanan et al., SC21, Table 1: 145.6B, 148 TFLOPS/A100"),
    (1.75e11, 0.213, "Chowdhery et al., PaLM, 2022, Table 3: GPT-3 175B (V100), 21.3 % MFU"),
    (5.4e11, 0.462, "Chowdhery et al., PaLM, 2022, Table 3: PaLM 540B (TPU v4), 46.2 % MFU"),
    (1.008e12, 0.52, "Narayanan et al., SC21, Table 1: 1T, 163 TFLOPS/A100"),
)
"""Published large-model utilisation: the plateau the step-time model tends to."""


@dataclass(frozen=True)
class DatacenterModel:
    """A datacentre GPU training a model; every default is sourced in the module docstring."""

    gpu: str = "A100-SXM"
    peak_tflops: float = 312.0  # dense bf16
    tdp_w: float = 400.0
    idle_w: float = 60.0
    plateau_mfu: float = 0.45
    ops_per_step: int = 200
    op_overhead_s: float = 10e-6
    pue: float = 1.2
    embodied_g_per_gpu_hour: float = 10.0

    def __post_init__(self) -> None:
        if not (0 < self.plateau_mfu <= 1 and self.peak_tflops > 0 and 0 <= self.idle_w <= self.tdp_w):
            raise ValueError("datacentre model: need 0 < plateau_mfu <= 1, peak > 0, 0 <= idle_w <= tdp_w")
        if (
            self.pue < 1
            or self.op_overhead_s < 0
            or self.ops_per_step < 0
            or self.embodied_g_per_gpu_hour < 0
        ):
            raise ValueError("datacentre model: need pue >= 1 and non-negative overheads")

    def step_seconds(self, flops_step: float) -> float:
        return self.ops_per_step * self.op_overhead_s + flops_step / (
            self.peak_tflops * 1e12 * self.plateau_mfu
        )

    def mfu(self, flops_step: float) -> float:
        return flops_step / (self.peak_tflops * 1e12 * self.step_seconds(flops_step))

    def gpu_watts(self, flops_step: float) -> float:
        share = min(self.mfu(flops_step) / self.plateau_mfu, 1.0)
        return self.idle_w + (self.tdp_w - self.idle_w) * share

    def train(self, steps: float, flops_step: float, grid_g_per_kwh: float) -> DatacenterRun:
        """Energy (at the facility, PUE included) and carbon (operational + embodied) of ``steps`` steps."""
        seconds = steps * self.step_seconds(flops_step)
        wh = seconds * self.gpu_watts(flops_step) * self.pue / JOULES_PER_WH
        embodied = seconds / 3600.0 * self.embodied_g_per_gpu_hour
        return DatacenterRun(
            energy_wh=wh, operational_g=wh / 1000.0 * grid_g_per_kwh, embodied_g=embodied,
            gpu_hours=seconds / 3600.0, mfu=self.mfu(flops_step),
        )  # fmt: skip


@dataclass(frozen=True)
class DatacenterRun:
    energy_wh: float
    operational_g: float
    embodied_g: float
    gpu_hours: float
    mfu: float

    @property
    def carbon_g(self) -> float:
        return self.operational_g + self.embodied_g


def flops_per_step(params: float, tokens_per_step: float) -> float:
    """Training FLOPs of one step: 6 per parameter per token (Kaplan et al. 2020)."""
    return 6.0 * params * tokens_per_step


@dataclass(frozen=True)
class EdgeDevice:
    """An edge device for the comparison: a profile's power and speed (p2pfm/sim/data/devices.toml)."""

    name: str = "laptop"
    gflops: float = 40.0
    step_overhead_s: float = 0.001
    active_w: float = 14.0
    idle_w: float = 4.0
    wall_factor: float = 1.15

    def step_seconds(self, flops_step: float) -> float:
        return self.step_overhead_s + flops_step / (self.gflops * 1e9)

    def marginal_j_per_step(self, flops_step: float) -> float:
        """Energy at the wall above idle: the device is on anyway (zero additional embodied carbon)."""
        return (self.active_w - self.idle_w) * self.step_seconds(flops_step) * self.wall_factor

    def attributable_j_per_step(self, flops_step: float) -> float:
        return self.active_w * self.step_seconds(flops_step) * self.wall_factor


TABLE_SIZES: tuple[float, ...] = (2.7e3, 1e5, 1e6, 1e7, 1e8, 1e9)
TOKENS_PER_STEP = 16 * 128  # the peer's default batch x block size


def edge_vs_datacenter(
    params: float, grid_g_per_kwh: float, *, tokens_per_step: float = TOKENS_PER_STEP,
    edge: EdgeDevice | None = None, dc: DatacenterModel | None = None, marginal: bool = True,
) -> float:  # fmt: skip
    """Edge carbon / datacentre carbon per token, both on the same grid (< 1: the edge wins)."""
    edge, dc = edge or EdgeDevice(), dc or DatacenterModel()
    flops = flops_per_step(params, tokens_per_step)
    joules = edge.marginal_j_per_step(flops) if marginal else edge.attributable_j_per_step(flops)
    edge_g = joules / JOULES_PER_WH / 1000.0 * grid_g_per_kwh
    return edge_g / dc.train(1, flops, grid_g_per_kwh).carbon_g


def mfu_table(dc: DatacenterModel | None = None, tokens_per_step: float = TOKENS_PER_STEP) -> str:
    """Markdown: the model's MFU and datacentre energy per token by parameter count."""
    dc = dc or DatacenterModel()
    lines = [
        f"| parameters | modelled MFU on {dc.gpu} | datacentre J/token (PUE {dc.pue}) | embodied g/Mtoken |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for params in TABLE_SIZES:
        flops = flops_per_step(params, tokens_per_step)
        run = dc.train(1, flops, 0.0)
        lines.append(
            f"| {params:.2g} | {run.mfu:.2g} | {run.energy_wh * JOULES_PER_WH / tokens_per_step:.2g} "
            f"| {run.embodied_g / tokens_per_step * 1e6:.2g} |"
        )
    return "\n".join(lines)


def comparison_table(tokens_per_step: float = TOKENS_PER_STEP, marginal: bool = True) -> str:
    """Markdown: edge (laptop profile) / datacentre carbon per token by model size x grid."""
    grids = list(GRID_G_PER_KWH.items())
    head = "| parameters | " + " | ".join(f"{k} ({v:g} g/kWh)" for k, v in grids) + " |"
    lines = [head, "| ---: |" + " ---: |" * len(grids)]
    for params in TABLE_SIZES:
        cells = []
        for _, grid in grids:
            ratio = edge_vs_datacenter(params, grid, tokens_per_step=tokens_per_step, marginal=marginal)
            cells.append(f"{ratio:.2g} ({'edge' if ratio < 1 else 'DC'})")
        lines.append(f"| {params:.2g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossover_params(grid_g_per_kwh: float, marginal: bool = True) -> float:
    """The model size (parameters) above which the datacentre emits less per token (bisection)."""
    lo, hi = 1e2, 1e13
    if edge_vs_datacenter(lo, grid_g_per_kwh, marginal=marginal) >= 1:
        return lo
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if edge_vs_datacenter(mid, grid_g_per_kwh, marginal=marginal) < 1:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def published_table() -> str:
    """Markdown: the published utilisation rows, with their sources."""
    lines = ["| parameters | published MFU | source |", "| ---: | ---: | --- |"]
    lines += [f"| {p:.3g} | {m:.3g} | {src} |" for p, m, src in PUBLISHED_MFU]
    return "\n".join(lines)


def main() -> None:
    print("## MFU and datacentre energy by model size\n")
    print(mfu_table())
    print("\n## Published MFU of large models (the plateau)\n")
    print(published_table())
    print("\n## Edge (laptop, marginal) / datacentre carbon per token, same grid\n")
    print(comparison_table())
    print("\n## Edge (laptop, attributable) / datacentre carbon per token, same grid\n")
    print(comparison_table(marginal=False))


if __name__ == "__main__":
    main()
