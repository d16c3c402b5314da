"""The peer daemon's config: every refusal names its field; flags beat the TOML file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pfm.config import ConfigError, build_config, config_to_dict
from p2pfm.core.gossip import GossipConfig
from p2pfm.daemon.config import NetConfig, PeerConfig, TrainConfig, load_peer_config
from p2pfm.model.gpt import GPTConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "peers" / "peer.example.toml"
PEER_ADDR = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWExamplePeerIdxxxxxxxxxxxxxxxxxxxxxxxxxxxx"


def test_defaults_are_valid():
    """A peer with no config at all gets a valid default config."""
    config = load_peer_config(None, {})
    assert config == PeerConfig()
    assert config.net.listen == ("/ip4/127.0.0.1/tcp/0",)


def test_example_toml_loads_without_error():
    """peers/peer.example.toml is a valid config (it is what users copy)."""
    config = load_peer_config(EXAMPLE, {})
    assert config.device_class == "laptop"
    assert config.gossip.codec.name == "topk"
    assert config.net.listen == ("/ip4/127.0.0.1/tcp/31337",)


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"net.initial_peers": ["/ip4/127.0.0.1/tcp/31337"]}, "net.initial_peers"),  # no /p2p/<id>
        ({"net.initial_peers": ["127.0.0.1:31337"]}, "net.initial_peers"),  # not a multiaddr
        ({"net.listen": []}, "net.listen"),
        ({"net.listen": ["0.0.0.0:1"]}, "net.listen"),
        ({"net.announce": ["example.org"]}, "net.announce"),
        ({"net.heartbeat_s": 15.0}, "net.heartbeat_s"),  # == default announce_ttl_s
        ({"net.heartbeat_s": 20.0, "net.announce_ttl_s": 15.0}, "net.heartbeat_s"),
        ({"net.heartbeat_s": 0.0}, "net.heartbeat_s"),
        ({"net.announce_ttl_s": 1.0, "net.heartbeat_s": 0.5}, "net.announce_ttl_s"),
        ({"net.request_timeout_s": 0}, "net.request_timeout_s"),
        ({"net.max_message_bytes": 100}, "net.max_message_bytes"),
        ({"net.state_chunk_bytes": 10}, "net.state_chunk_bytes"),
        ({"shard": 8}, "shard"),  # default num_shards is 8
        ({"shard": -2}, "shard"),
        ({"shard": 3, "num_shards": 3}, "shard"),
        ({"num_shards": 0}, "num_shards"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": "x" * 65}, "run_id"),
        ({"rounds": -1}, "rounds"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"min_peers": 0}, "min_peers"),
        ({"power_w": -1.0}, "power_w"),
        ({"model.n_embd": 30}, "model.n_embd"),  # not divisible by the default 4 heads
        ({"model.n_embd": 64, "model.n_head": 3}, "model.n_embd"),
        ({"model.dropout": 1.0}, "model.dropout"),
        ({"gossip.fanout": -1}, "gossip.fanout"),
        ({"gossip.inner_steps": 0}, "gossip.inner_steps"),
        ({"gossip.outer_momentum": 1.0}, "gossip.outer_momentum"),
        ({"gossip.sync_weight": 0.0}, "gossip.sync_weight"),
        ({"gossip.aggregation": "mode"}, "gossip.aggregation"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.lr": 0.0}, "train.lr"),
        ({"train.max_shard_bytes": 100}, "train.max_shard_bytes"),
        ({"train.lr": "fast"}, "train.lr"),  # wrong type, nested
        ({"net.listen": "/ip4/127.0.0.1/tcp/0"}, "net.listen"),  # str where a list belongs
    ],
)
def test_invalid_value_raises_config_error_naming_the_field(overrides, field_name):
    """Each range or format violation is a ConfigError whose message starts with the field."""
    with pytest.raises(ConfigError) as info:
        load_peer_config(None, overrides)
    assert str(info.value).startswith(f"{field_name}:"), str(info.value)


def test_data_that_does_not_exist_is_refused(tmp_path):
    """`data` must exist; the message says so rather than blaming the kind of path."""
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"^data: .*nowhere does not exist"):
        load_peer_config(None, {"data": str(missing)})


def test_data_may_be_a_single_file(tmp_path):
    """One text file is a corpus too (the split is by byte range, not by file)."""
    a_file = tmp_path / "book.txt"
    a_file.write_text("hello")
    assert load_peer_config(None, {"data": str(a_file)}).data == a_file


def test_data_directory_is_accepted_as_path(tmp_path):
    """An existing directory is accepted and becomes a Path."""
    assert load_peer_config(None, {"data": str(tmp_path)}).data == tmp_path


def test_unknown_codec_name_is_refused_naming_the_field_and_value():
    """gossip.codec.name outside the registry is refused, naming the field and the bad value."""
    with pytest.raises(
        ConfigError, match=r"^gossip\.codec\.name: must be one of none, fp16, int8, topk, got 'zip'"
    ):
        load_peer_config(None, {"gossip.codec.name": "zip"})


def test_sync_codec_errors_name_the_sync_codec_table():
    """The same CodecSpec serves gossip.codec and gossip.sync_codec; errors say which one was wrong."""
    with pytest.raises(
        ConfigError, match=r"^gossip\.sync_codec\.topk_fraction: must be a number in \(0, 1\]"
    ):
        load_peer_config(None, {"gossip.sync_codec.topk_fraction": 2.0})


def test_sync_every_accepts_auto_or_a_count_and_names_bad_values():
    """gossip.sync_every is "auto" (default) or a non-negative integer."""
    assert load_peer_config(None, {}).gossip.sync_every == "auto"
    assert load_peer_config(None, {"gossip.sync_every": 7}).gossip.sync_every == 7
    with pytest.raises(ConfigError, match=r"gossip\.sync_every"):
        load_peer_config(None, {"gossip.sync_every": "sometimes"})


def test_unknown_key_in_nested_table_is_named_with_its_path(tmp_path):
    """An unknown key in a TOML table is named with its dotted path."""
    path = tmp_path / "peer.toml"
    path.write_text("[gossip]\nfanot = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key gossip\.fanot"):
        load_peer_config(path, {})


def test_overrides_beat_toml_values(tmp_path):
    """Dotted overrides (the CLI flags) win over the file; untouched file values stay."""
    path = tmp_path / "peer.toml"
    path.write_text(
        'run_id = "from-file"\nseed = 3\n[gossip]\nfanout = 5\ninner_steps = 7\n'
        '[gossip.codec]\nname = "int8"\n[train]\nlr = 0.01\n'
    )
    config = load_peer_config(
        path,
        {
            "run_id": "from-flag",
            "gossip.fanout": 1,
            "gossip.codec.name": "fp16",
            "net.listen": ["/ip4/0.0.0.0/tcp/1"],
            "admission.open": True,
        },
    )
    assert config.run_id == "from-flag"
    assert config.gossip.fanout == 1
    assert config.gossip.codec.name == "fp16"
    assert config.net.listen == ("/ip4/0.0.0.0/tcp/1",)
    # values the flags did not touch come from the file
    assert config.seed == 3
    assert config.gossip.inner_steps == 7
    assert config.train.lr == 0.01


def test_none_overrides_do_not_clear_toml_values(tmp_path):
    """An override of None (a flag not given) leaves the file's value."""
    path = tmp_path / "peer.toml"
    path.write_text("seed = 11\n")
    assert load_peer_config(path, {"seed": None, "gossip.fanout": None}).seed == 11


def test_valid_initial_peer_is_accepted():
    """A full multiaddr with /p2p/<id> is accepted."""
    config = load_peer_config(None, {"net.initial_peers": [PEER_ADDR]})
    assert config.net.initial_peers == (PEER_ADDR,)


def test_component_configs_validate_on_their_own():
    """NetConfig, TrainConfig, GossipConfig and GPTConfig check their fields when built directly."""
    with pytest.raises(ConfigError, match=r"^net\.heartbeat_s:"):
        NetConfig(heartbeat_s=30.0)
    with pytest.raises(ConfigError, match=r"^train\.eval_every:"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ConfigError, match=r"^gossip\.max_round_lag:"):
        GossipConfig(max_round_lag=-1)
    with pytest.raises(ConfigError, match=r"^model\.n_embd:"):
        GPTConfig(n_embd=10, n_head=4)


def test_resolved_config_round_trips_through_dict(tmp_path):
    """The resolved config saved in checkpoints (config_to_dict) rebuilds the same PeerConfig."""
    config = load_peer_config(EXAMPLE, {"data": str(tmp_path), "net.initial_peers": [PEER_ADDR]})
    assert build_config(PeerConfig, config_to_dict(config)) == config


def test_cli_peer_with_unknown_key_exits_2_naming_it_before_any_network(tmp_path):
    """`python -m p2pfm peer --config bad.toml` with an unknown key exits 2, names it, starts nothing."""
    work_dir = tmp_path / "work"
    key = tmp_path / "peer.key"
    bad = tmp_path / "bad.toml"
    bad.write_text(f'work_dir = "{work_dir}"\nkey = "{key}"\n[net]\nlisten_on = ["/ip4/127.0.0.1/tcp/0"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "p2pfm", "peer", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "net.listen_on" in result.stderr
    assert "Traceback" not in result.stderr
    # It failed while reading the config: no key, no work dir, no DHT.
    assert not key.exists()
    assert not work_dir.exists()
    assert "DHT" not in result.stderr


def test_key_defaults_into_the_work_dir_not_the_current_directory(tmp_path):
    """`p2pfm peer --work-dir X` without --key keeps its identity at X/peer.key, next to its checkpoint."""
    from p2pfm.cli import build_parser
    from p2pfm.cli.peer import overrides_from_args

    work_dir = tmp_path / "work"
    args = build_parser().parse_args(["peer", "--work-dir", str(work_dir)])
    assert load_peer_config(args.config, overrides_from_args(args)).key == work_dir / "peer.key"
    assert PeerConfig().key == PeerConfig().work_dir / "peer.key"


def test_explicit_key_wins_over_the_work_dir_default(tmp_path):
    """--key, or `key` in a config file (relative paths kept as written), is used as given."""
    work_dir = tmp_path / "work"
    assert (
        load_peer_config(None, {"work_dir": str(work_dir), "key": str(tmp_path / "k.pem")}).key
        == tmp_path / "k.pem"
    )
    toml = tmp_path / "peer.toml"
    toml.write_text(f'work_dir = "{work_dir}"\nkey = "ids/peer.key"\n')
    assert load_peer_config(toml, {}).key == Path("ids/peer.key")
    assert load_peer_config(toml, {"key": str(tmp_path / "flag.key")}).key == tmp_path / "flag.key"
