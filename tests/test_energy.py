"""Energy: the fallback model's figures, Zeus meters on fake sysfs/NVML, trackers, reports, the baseline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from p2pfm.config import ConfigError
from p2pfm.core.announce import Announcement
from p2pfm.daemon.config import EnergyConfig, PeerConfig
from p2pfm.daemon.energy import open_tracker
from p2pfm.energy import datacenter
from p2pfm.energy.meters import (
    POWERCAP_ENV,
    MeterUnavailable,
    ModelledMeter,
    PowerModel,
    ZeusRaplMeter,
    open_meter,
)
from p2pfm.energy.profiles import power_model
from p2pfm.energy.report import report_from_announcements
from p2pfm.energy.tracker import EnergyTracker

README = Path(__file__).resolve().parents[1] / "README.md"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# --- the fallback model --------------------------------------------------------------------------
def test_modelled_meter_figures_are_fixed_for_a_fixed_workload():
    """A Pi 4 (6.4 W active, 2.7 W idle, 4 cores): 10 s wall, 25 CPU-s -> 2.7*10 + 3.7*6.25 = 50.125 J, every time."""
    cpu, wall = Clock(), Clock()
    model = power_model("raspberry_pi_4", cores=4)
    assert (model.active_w, model.idle_w) == (6.4, 2.7)  # the simulator's profile (devices.toml)
    for _ in range(3):
        meter = ModelledMeter(model, cpu_clock=cpu, wall_clock=wall)
        start_cpu, start_wall = cpu.t, wall.t
        cpu.t, wall.t = start_cpu + 25.0, start_wall + 10.0
        assert meter.read_joules() == pytest.approx(50.125, abs=1e-12)
        assert meter.source == "modelled:profile"
    # CPU time beyond all cores busy cannot draw more than active power
    assert PowerModel(active_w=10.0, idle_w=2.0, cores=2).joules(wall_s=1.0, cpu_s=100.0) == 10.0


def test_device_classes_take_their_profile_and_explicit_figures_win():
    assert power_model("raspberry-pi-4").active_w == 6.4  # '-' and '_' are the same
    unknown = power_model("cpu-host", cores=8)
    assert (unknown.active_w, unknown.idle_w, unknown.cores) == (15.0, 4.0, 8)
    assert power_model("laptop", power_w=30.0, idle_w=5.0).active_w == 30.0


def test_tracker_attributable_marginal_tokens_and_carbon_over_windows():
    """Only windows count; marginal = attributable - idle baseline x window time; paused time is outside."""
    cpu, wall = Clock(), Clock()
    meter = ModelledMeter(PowerModel(active_w=14.0, idle_w=4.0, cores=2), cpu_clock=cpu, wall_clock=wall)
    tracker = EnergyTracker(meter, grid_g_per_kwh=475.0, idle_w=4.0, wall_clock=wall)
    assert tracker.measure_idle(3.0, sleep=lambda s: None) == 4.0  # a model is not measured
    with tracker.window():  # 100 s, one core of two busy: 4*100 + 10*50 = 900 J
        cpu.t, wall.t = 100.0, 100.0
    tracker.add_tokens(9000)
    wall.t += 1000.0  # paused: no window, nothing counted
    tracker.start()
    cpu.t, wall.t = cpu.t + 20.0, wall.t + 10.0  # 4*10 + 10*10 = 140 J, still open
    totals = tracker.totals()
    assert totals.energy_wh == pytest.approx(1040.0 / 3600)
    assert totals.marginal_wh == pytest.approx((1040.0 - 4.0 * 110.0) / 3600)
    assert totals.carbon_g == pytest.approx(1040.0 / 3600 / 1000 * 475.0)
    assert totals.tokens == 9000 and totals.j_per_token == pytest.approx(1040.0 / 9000)
    assert totals.training_s == pytest.approx(110.0)
    assert totals.energy_source == "modelled:profile" and totals.idle_source == "profile"


# --- Zeus on a fake powercap tree ----------------------------------------------------------------
def fake_rapl(root: Path, packages: int = 1, dram: bool = True) -> dict[str, Path]:
    """A powercap tree as Linux lays it out, counters in microjoules; returns the energy_uj files."""
    counters = {}
    for i in range(packages):
        pkg = root / "intel-rapl" / f"intel-rapl:{i}"
        pkg.mkdir(parents=True)
        (pkg / "name").write_text(f"package-{i}\n")
        (pkg / "max_energy_range_uj").write_text("262143328850\n")
        (pkg / "energy_uj").write_text("1000000\n")
        counters[f"package-{i}"] = pkg / "energy_uj"
        if dram:
            sub = pkg / f"intel-rapl:{i}:0"
            sub.mkdir()
            (sub / "name").write_text("dram\n")
            (sub / "max_energy_range_uj").write_text("65712999613\n")
            (sub / "energy_uj").write_text("500000\n")
            counters[f"dram-{i}"] = sub / "energy_uj"
    return counters


def bump(path: Path, microjoules: int) -> None:
    path.write_text(f"{int(path.read_text()) + microjoules}\n")


def test_rapl_through_zeus_reads_package_and_dram_counters(tmp_path):
    pytest.importorskip("zeus", reason="the optional extra p2pfm[energy] (make setup installs it)")
    counters = fake_rapl(tmp_path, packages=2)
    meter, reasons = open_meter("auto", power_model("laptop"), root=tmp_path)
    try:
        assert meter.source == "measured:rapl" and reasons == []
        assert meter.read_joules() == 0.0
        bump(counters["package-0"], 3_000_000)  # 3 J
        bump(counters["package-1"], 1_500_000)
        bump(counters["dram-0"], 250_000)
        assert meter.read_joules() == pytest.approx(4.75)
    finally:
        meter.close()


def test_rapl_root_from_the_environment_and_measured_idle_baseline(tmp_path, monkeypatch):
    """$P2PFM_POWERCAP_ROOT points the meter at a tree; the idle window measures the baseline."""
    pytest.importorskip("zeus", reason="the optional extra p2pfm[energy] (make setup installs it)")
    counters = fake_rapl(tmp_path, dram=False)
    monkeypatch.setenv(POWERCAP_ENV, str(tmp_path))
    wall = Clock()
    meter = ZeusRaplMeter()
    tracker = EnergyTracker(meter, grid_g_per_kwh=100.0, idle_w=99.0, wall_clock=wall)
    try:

        def idle_sleep(seconds: float) -> None:  # 2 s at 5 W while we "sleep"
            wall.t += seconds
            bump(counters["package-0"], int(5.0 * seconds * 1e6))

        assert tracker.measure_idle(2.0, sleep=idle_sleep) == pytest.approx(5.0)
        assert tracker.idle_source == "measured"
        with tracker.window():  # 10 s at 20 W
            wall.t += 10.0
            bump(counters["package-0"], 200_000_000)
        totals = tracker.totals()
        assert totals.energy_source == "measured:rapl"
        assert totals.energy_wh == pytest.approx(200.0 / 3600)
        assert totals.marginal_wh == pytest.approx((200.0 - 5.0 * 10.0) / 3600)
    finally:
        tracker.close()


def test_no_readable_counter_falls_back_to_the_model_and_says_why(tmp_path):
    meter, reasons = open_meter("auto", power_model("laptop"), root=tmp_path / "absent")
    assert meter.source == "modelled:profile"
    assert reasons and reasons[0].startswith("rapl: no RAPL package under")
    with pytest.raises(MeterUnavailable):
        open_meter("rapl", power_model("laptop"), root=tmp_path / "absent")
    # a peer that asked for a counter refuses to start without one, naming the field
    config = PeerConfig(
        work_dir=tmp_path, energy=EnergyConfig(meter="rapl", powercap_root=tmp_path / "absent")
    )
    with pytest.raises(ConfigError, match="energy.meter: rapl cannot be read here"):
        open_tracker(config, [])
    with pytest.raises(ConfigError, match="energy.meter"):
        EnergyConfig(meter="guess")
    with pytest.raises(ConfigError, match="energy.idle_measure_s"):
        EnergyConfig(idle_measure_s=60.0)


# --- Zeus on a fake NVML -------------------------------------------------------------------------
@pytest.fixture
def fake_nvml(monkeypatch):
    """pynvml's functions replaced: one Ampere GPU whose energy counter (mJ) the test sets."""
    pynvml = pytest.importorskip("pynvml")
    nvidia = pytest.importorskip("zeus.device.gpu.nvidia", reason="the optional extra p2pfm[energy]")

    counter = {"mj": 10_000}

    def not_supported(*_):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: f"gpu{index}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetC2cModeInfoV", not_supported)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetArchitecture", lambda handle: pynvml.NVML_DEVICE_ARCH_AMPERE)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lambda handle: counter["mj"])
    nvidia.nvml_is_available.cache_clear()
    yield counter
    nvidia.nvml_is_available.cache_clear()


def test_nvml_through_zeus_reads_the_gpu_energy_counter(fake_nvml, tmp_path):
    meter, _ = open_meter("auto", power_model("laptop"), gpu_indices=[0], root=tmp_path / "absent")
    assert meter.source == "measured:nvml"
    fake_nvml["mj"] += 42_500
    assert meter.read_joules() == pytest.approx(42.5)


def test_rapl_and_nvml_together_are_summed(fake_nvml, tmp_path):
    counters = fake_rapl(tmp_path, dram=False)
    meter, _ = open_meter("auto", power_model("laptop"), gpu_indices=[0], root=tmp_path)
    try:
        assert meter.source == "measured:rapl+nvml"
        fake_nvml["mj"] += 1000
        bump(counters["package-0"], 2_000_000)
        assert meter.read_joules() == pytest.approx(3.0)
    finally:
        meter.close()


def test_pre_volta_gpu_has_no_counter_and_falls_back(fake_nvml, monkeypatch, tmp_path):
    import pynvml

    monkeypatch.setattr(pynvml, "nvmlDeviceGetArchitecture", lambda handle: pynvml.NVML_DEVICE_ARCH_PASCAL)
    meter, reasons = open_meter("auto", power_model("laptop"), gpu_indices=[0], root=tmp_path)
    assert meter.source == "modelled:profile"
    assert any(r.startswith("nvml: GPUs [0] have no energy counter") for r in reasons)


# --- swarm reports from announcements ------------------------------------------------------------
def announcement(peer: str, **energy) -> Announcement:
    return Announcement(
        peer_id=peer, public_key=bytes(32), libp2p_id="x", maddrs=("/ip4/127.0.0.1/tcp/1",), round=3,
        model_hash=bytes(32), device_class="laptop", power_w=14.0, state_bytes=1, seq=1, timestamp=0.0,
        **energy,
    )  # fmt: skip


def test_report_from_announcements_sums_claims_and_lists_silent_peers():
    report = report_from_announcements([
        announcement("a", energy_wh=2.0, marginal_wh=1.0, tokens=1000, energy_source="measured:rapl", grid_g_per_kwh=100.0),
        announcement("b", energy_wh=1.0, marginal_wh=5.0, tokens=3000, energy_source="modelled:profile", grid_g_per_kwh=500.0),
        announcement("old"),  # an older peer: no energy fields
    ])  # fmt: skip
    assert report["energy_wh"] == 3.0 and report["tokens"] == 4000
    assert report["marginal_wh"] == 2.0  # b's marginal claim is capped at its attributable energy
    assert report["carbon_g"] == pytest.approx(2.0 / 1000 * 100 + 1.0 / 1000 * 500)
    assert report["j_per_token"] == pytest.approx(3.0 * 3600 / 4000)
    assert report["energy_source"] == "mixed:measured:rapl,modelled:profile"
    assert report["unreported"] == ["old"] and set(report["per_peer"]) == {"a", "b"}


# --- the datacentre baseline ---------------------------------------------------------------------
def test_datacentre_mfu_rises_with_model_size_to_the_published_plateau():
    dc = datacenter.DatacenterModel()
    mfus = [dc.mfu(datacenter.flops_per_step(n, 2048)) for n in (2.7e3, 1e5, 1e6, 1e7, 1e8, 1e9, 1e11)]
    assert mfus == sorted(mfus)
    assert mfus[0] < 1e-4  # a 2.7k-parameter model: launch-bound
    published = [m for _, m, _ in datacenter.PUBLISHED_MFU]
    assert min(published) <= mfus[-1] <= max(published)
    # the old baseline's 20 % MFU for every model is gone: tiny models use the GPU's idle-ish power
    assert dc.gpu_watts(datacenter.flops_per_step(2.7e3, 2048)) < dc.idle_w + 1.0
    run = dc.train(3600.0 / dc.step_seconds(1e12), 1e12, grid_g_per_kwh=0.0)  # one GPU-hour
    assert run.gpu_hours == pytest.approx(1.0) and run.embodied_g == pytest.approx(dc.embodied_g_per_gpu_hour)


def test_edge_wins_tiny_models_and_the_datacentre_wins_large_ones_on_every_grid():
    for grid in datacenter.GRID_G_PER_KWH.values():
        assert datacenter.edge_vs_datacenter(2.7e3, grid) < 1
        assert datacenter.edge_vs_datacenter(1e9, grid) > 1
        assert 1e4 < datacenter.crossover_params(grid) < 1e6
    assert math.isclose(
        datacenter.edge_vs_datacenter(1e6, 475.0, marginal=False) / datacenter.edge_vs_datacenter(1e6, 475.0),
        14.0 / 10.0,
    )


def test_readme_shows_the_tables_the_function_prints():
    """README's datacentre comparison is what `python -m p2pfm.energy.datacenter` prints now."""
    text = README.read_text()
    for table in (datacenter.mfu_table(), datacenter.published_table(), datacenter.comparison_table(),
                  datacenter.comparison_table(marginal=False)):  # fmt: skip
        assert table in text, table.splitlines()[0]
