"""The simulator: deterministic replay, churn semantics, scenario validation, outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfm.cli import main as cli_main
from p2pfm.config import ConfigError
from p2pfm.sim.devices import load_profiles
from p2pfm.sim.engine import Simulation
from p2pfm.sim.run import run_scenario
from p2pfm.sim.scenario import load_scenario, scenario_from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "peers": 8,
    "rounds": 16,
    "seed": 5,
    "eval_every": 4,
    "workload": {"mlp": {"samples_per_peer": 64, "eval_samples": 128, "hidden": 16}},
    "gossip": {"inner_steps": 3, "sync_every": 4, "max_round_lag": 4},
}


def tiny(**changes):
    values = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        values[key] = value
    return scenario_from_dict(values)


def test_same_scenario_and_seed_give_identical_summary_json(tmp_path):
    """Two runs of one scenario and seed write byte-identical summary.json and metrics.csv."""
    scenario = tiny(churn={"model": "fraction", "fraction": 0.3, "every_rounds": 4})
    run_scenario(scenario, tmp_path / "a", plots=False)
    run_scenario(scenario, tmp_path / "b", plots=False)
    for name in ("summary.json", "metrics.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "wall_seconds" not in json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "wall_seconds" in json.loads((tmp_path / "a" / "timing.json").read_text())


def test_a_different_seed_gives_a_different_run():
    """The seed reaches the data, the devices and the churn."""
    scenario = tiny(churn={"model": "exponential", "mean_online_s": 2.0, "mean_offline_s": 1.0})
    first = run_scenario(scenario)
    second = run_scenario(scenario.with_changes(seed=6))
    assert first["final_loss"] != second["final_loss"]


def test_without_churn_every_message_is_delivered_and_loss_falls():
    """No churn: nothing lost or rejected, everyone trains, loss drops from the initial value."""
    summary = run_scenario(tiny())
    messages = summary["messages"]
    assert messages["sent"] == messages["delivered"] == 8 * 16 * 2
    assert messages["rejected"] == {}
    assert summary["churn_events"] == {"leaves": 0, "joins": 0}
    assert summary["final_loss"] < summary["initial_loss"]
    assert summary["bytes_sent_total"] > 0 and summary["energy_wh"] > 0
    # A tiny MLP runs at a sliver of a GPU's peak: the baseline says so (p2pfm.energy.datacenter).
    assert 0 < summary["datacenter_embodied_g"] < summary["datacenter_carbon_g"]
    assert 0 < summary["datacenter_mfu"] < 0.01
    assert summary["edge_to_datacenter_carbon"] == pytest.approx(  # 6 significant digits in JSON
        summary["carbon_g"] / summary["datacenter_carbon_g"], rel=1e-5
    )
    assert 0 < summary["marginal_energy_wh"] < summary["energy_wh"]


def test_fraction_churn_loses_work_and_rejoining_peers_download_state():
    """30% leave/rejoin every 6 rounds: leaves, joins, state downloads, catch-up measured."""
    summary = run_scenario(tiny(rounds=24, churn={"model": "fraction", "fraction": 0.3, "every_rounds": 6}))
    assert summary["churn_events"]["leaves"] >= 2 * 3
    assert summary["churn_events"]["joins"] >= 2 * 2
    assert summary["state_downloads"]["total"] >= summary["churn_events"]["joins"]
    assert summary["state_downloads"]["adopted"] >= 1  # offline 6 rounds > max_round_lag (4): adopt
    assert summary["rejoin_catchup_rounds"]["count"] >= 1
    assert summary["mean_online_fraction"] < 1.0


def test_leaving_mid_computation_loses_the_computation_and_messages_in_flight():
    """With frequent departures some computations and in-flight messages are lost."""
    sim = Simulation(
        tiny(peers=12, rounds=30, churn={"model": "exponential", "mean_online_s": 0.3, "mean_offline_s": 0.1})
    ).run()
    assert sim.metrics.computations_lost > 0
    assert sim.metrics.lost_sender_left + sim.metrics.lost_receiver_gone > 0
    assert sim.metrics.messages_delivered < sim.metrics.messages_sent


def test_diurnal_and_trace_models_run(tmp_path):
    """Diurnal churn and trace replay both drive the run; trace paths resolve next to the scenario."""
    (tmp_path / "t.csv").write_text("device,start_s,end_s\na,0,100\nb,0,1\nb,2,100\n")
    (tmp_path / "s.toml").write_text(
        'name = "trace"\npeers = 4\nrounds = 12\n[workload.mlp]\nsamples_per_peer = 32\neval_samples = 64\n'
        '[gossip]\ninner_steps = 2\n[churn]\nmodel = "trace"\ntrace = "t.csv"\n'
    )
    summary = run_scenario(load_scenario(tmp_path / "s.toml"))
    assert summary["churn_events"]["leaves"] >= 2  # peers 1 and 3 replay device b's gap
    diurnal = run_scenario(tiny(churn={"model": "diurnal", "day_length_s": 20.0, "mean_session_s": 600.0}))
    assert diurnal["mean_online_fraction"] < 0.6


def test_unsigned_mode_sends_messages_of_the_same_size():
    """verify_signatures = false keeps message sizes (64 zero bytes instead of a signature)."""
    signed = Simulation(tiny())
    unsigned = Simulation(tiny(verify_signatures=False))
    assert signed.update_bytes == unsigned.update_bytes


def test_scenario_errors_name_the_field():
    """Unknown keys and bad values are ConfigErrors naming the field."""
    with pytest.raises(ConfigError, match="churn.fractoin"):
        tiny(churn={"fractoin": 0.3})
    with pytest.raises(ConfigError, match="churn.fraction"):
        tiny(churn={"model": "fraction", "fraction": 1.5})
    with pytest.raises(ConfigError, match="peers"):
        tiny(peers=1)
    with pytest.raises(ConfigError, match="gossip.inner_steps"):
        tiny(gossip={"inner_steps": 0})
    with pytest.raises(ConfigError, match="churn.trace"):
        tiny(churn={"model": "trace"})
    with pytest.raises(ConfigError, match="devices.mix: unknown device class 'toaster'"):
        Simulation(tiny(devices={"mix": {"toaster": 1.0}}))


def test_gpt_workload_embeds_the_peer_model_and_train_tables():
    """workload.gpt holds the peer's [model] and [train] tables: old flat keys are refused, errors name the path."""
    with pytest.raises(
        ConfigError, match=r"unknown config key workload\.gpt\.n_layer \(known: data, model, train\)"
    ):
        tiny(workload={"kind": "gpt", "gpt": {"n_layer": 2}})
    with pytest.raises(ConfigError, match=r"^workload\.gpt\.model\.n_embd: must be divisible"):
        tiny(workload={"kind": "gpt", "gpt": {"model": {"n_embd": 10, "n_head": 4}}})
    with pytest.raises(ConfigError, match=r"^workload\.gpt\.train\.lr: must be positive"):
        tiny(workload={"kind": "gpt", "gpt": {"train": {"lr": 0.0}}})
    with pytest.raises(ConfigError, match=r"unknown config key workload\.gpt\.train\.threads"):
        tiny(workload={"kind": "gpt", "gpt": {"train": {"threads": 2}}})  # the daemon's, not the inner loop's
    with pytest.raises(ConfigError, match=r"^workload\.gpt\.train\.eval_batches: must be at least 1"):
        tiny(workload={"kind": "gpt", "gpt": {"train": {"eval_batches": 0}}})
    gpt = tiny(workload={"kind": "gpt", "gpt": {"model": {"n_layer": 2}, "train": {"lr": 1e-3}}}).workload.gpt
    assert (gpt.model.n_layer, gpt.model.n_embd, gpt.train.lr, gpt.train.batch_size) == (2, 128, 1e-3, 16)


def test_recorded_gpt_scenarios_load():
    """sim/scenarios/gpt8-*.toml name the tiny model in the embedded tables."""
    for name in ("gpt8-none", "gpt8-fraction30"):
        gpt = load_scenario(REPO / "sim" / "scenarios" / f"{name}.toml").workload.gpt
        assert (gpt.model.n_layer, gpt.model.n_head, gpt.model.n_embd, gpt.model.block_size) == (2, 2, 32, 32)
        assert (gpt.train.batch_size, gpt.train.eval_batch_size, gpt.train.max_shard_bytes) == (8, 8, 262144)


def test_the_simulator_loads_without_torch():
    """Scenarios embed the model's configs, yet an MLP run never imports torch (a second per start)."""
    code = "import sys, p2pfm.sim.run, p2pfm.sim.scenario; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_device_profiles_ship_with_power_figures_and_sources():
    """The packaged profiles cover Pi 4/5, Jetson Orin Nano, phone and laptop, with sources."""
    profiles = load_profiles()
    assert {"raspberry_pi_4", "raspberry_pi_5", "jetson_orin_nano", "phone", "laptop"} <= set(profiles)
    assert profiles["raspberry_pi_4"].active_w == 6.4 and profiles["raspberry_pi_4"].idle_w == 2.7
    assert all(p.source for p in profiles.values())


def test_cli_writes_summary_metrics_and_plots(tmp_path):
    """`p2pfm sim FILE --out DIR --seed N` writes summary.json, metrics.csv and three PNGs."""
    (tmp_path / "s.toml").write_text(
        'name = "cli"\npeers = 4\nrounds = 6\neval_every = 2\n[workload.mlp]\nsamples_per_peer = 32\neval_samples = 64\n'
        "[gossip]\ninner_steps = 2\n"
    )
    out = tmp_path / "out"
    assert cli_main(["sim", str(tmp_path / "s.toml"), "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_loss", "time_to_target_s", "consensus_distance", "bytes_sent_total", "energy_wh", "carbon_g",
                "datacenter_carbon_g", "churn_events", "rejoin_catchup_rounds", "scenario", "seed", "peers", "rounds"):  # fmt: skip
        assert key in summary
    assert summary["seed"] == 3
    for name in ("metrics.csv", "loss.png", "online.png", "energy.png", "timing.json"):
        assert (out / name).exists()
    sweep = tmp_path / "sweep"
    assert (
        cli_main(
            [
                "sim",
                "sweep",
                str(tmp_path / "s.toml"),
                "--churn-rates",
                "0,0.5",
                "--out",
                str(sweep),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((sweep / "sweep.json").read_text())
    assert [p["churn_rate"] for p in result["points"]] == [0.0, 0.5]
    assert (sweep / "churn_curve.png").exists() and "| 0.5 |" in (sweep / "sweep.md").read_text()


def test_cli_reports_bad_scenario_by_field(tmp_path, capsys):
    """A scenario with an unknown key exits 2 with the field in the message."""
    (tmp_path / "bad.toml").write_text('name = "x"\npeers = 4\nrounds = 2\nchurn_model = "x"\n')
    assert cli_main(["sim", str(tmp_path / "bad.toml"), "--no-progress"]) == 2
    assert "churn_model" in capsys.readouterr().err


def test_gpt_workload_trains_the_daemon_model(tmp_path):
    """The byte-level GPT from p2pfm.model runs under the simulator on a small text folder."""
    data = tmp_path / "corpus"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        words = rng.choice(["def", "return", "self", "import", "class", "for", "in", "if"], size=400)
        (data / f"f{i}.py").write_text(" ".join(words))
    scenario = scenario_from_dict(
        {
            "name": "gpt",
            "peers": 3,
            "rounds": 3,
            "eval_every": 1,
            "workload": {
                "kind": "gpt",
                "gpt": {
                    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16},
                    "train": {"batch_size": 4, "eval_batches": 1, "eval_batch_size": 4},
                    "data": str(data),
                },
            },  # fmt: skip
            "gossip": {"inner_steps": 2},
        }
    )
    summary = run_scenario(scenario)
    assert summary["workload"] == "gpt" and summary["messages"]["delivered"] == 3 * 3 * 2
    assert summary["final_loss"] < summary["initial_loss"]


def test_signing_changes_cost_not_results():
    """Signed and unsigned runs send the same bytes, so everything but the flag is identical."""
    churn = {"model": "fraction", "fraction": 0.3, "every_rounds": 4}
    signed = run_scenario(tiny(churn=churn))
    unsigned = run_scenario(tiny(churn=churn, verify_signatures=False))
    assert signed.pop("signatures") is True and unsigned.pop("signatures") is False
    assert signed == unsigned
