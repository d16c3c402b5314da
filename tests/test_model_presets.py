"""Model presets and --model: parameter counts, the one-size rule, and --help listing them."""

from __future__ import annotations

import argparse

import pytest
import torch

from p2pfm.cli.peer import add_peer_flags
from p2pfm.config import ConfigError
from p2pfm.daemon.config import load_peer_config
from p2pfm.model.config import GPT_PRESETS, GPTConfig, describe_presets, gpt_param_count
from p2pfm.model.gpt import GPT
from p2pfm.model.source import load_model

EXPECTED = {
    "tiny": 120_576,
    "1m": 1_040_768,
    "10m": 10_844_160,
    "gpt2-small": 86_039_040,
    "124m": 124_072_000,
}


@pytest.mark.parametrize("name", sorted(GPT_PRESETS))
def test_preset_parameter_count_matches_the_built_model(name):
    """The torch-free count (used by --help) equals the model's own count, built on the meta device."""
    with torch.device("meta"):  # no memory, no init time: the 86M model costs nothing here
        model = GPT(GPT_PRESETS[name])
    assert gpt_param_count(GPT_PRESETS[name]) == sum(p.numel() for p in model.parameters()) == EXPECTED[name]


def test_gpt2_small_is_gpt2_small_geometry():
    """12 blocks, 12 heads, width 768, 1024 positions: GPT-2 small's transformer with a byte vocabulary."""
    config = GPT_PRESETS["gpt2-small"]
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (
        12,
        12,
        768,
        1024,
        256,
    )
    blocks = config.n_layer * (12 * 768 * 768 + 13 * 768)
    assert blocks == 85_054_464  # GPT-2 small's blocks exactly; its 124M adds a 50,257 x 768 embedding


def test_1m_preset_is_the_default_model():
    assert GPT_PRESETS["1m"] == GPTConfig()


def test_preset_sets_the_model_table():
    config = load_peer_config(None, {"model_source": "10m"})
    assert config.model == GPT_PRESETS["10m"] and config.model_source == "10m"


def test_preset_with_a_different_model_key_names_both():
    with pytest.raises(ConfigError, match=r"preset '10m' and \[model\] model\.n_layer"):
        load_peer_config(None, {"model_source": "10m", "model.n_layer": 5})  # 5 is the default, not 10m's 6


def test_preset_with_the_same_value_is_accepted():
    assert load_peer_config(None, {"model_source": "10m", "model.n_layer": 6}).model == GPT_PRESETS["10m"]


def test_preset_and_a_built_model_table_conflict_in_the_dataclass_too(tmp_path):
    """PeerConfig built directly (library users) refuses a [model] that is neither default nor the preset."""
    from p2pfm.daemon.config import PeerConfig

    with pytest.raises(ConfigError, match="model.n_embd"):
        PeerConfig(model_source="tiny", model=GPTConfig(n_embd=256))


def test_unknown_model_lists_the_presets():
    with pytest.raises(ConfigError, match=r"unknown model 'huge'.*tiny \(120,576 params\)"):
        load_peer_config(None, {"model_source": "huge"})


def test_hf_source_takes_only_block_size_from_the_model_table(tmp_path):
    assert (
        load_peer_config(None, {"model_source": f"hf:{tmp_path}", "model.block_size": 32}).model.block_size
        == 32
    )
    with pytest.raises(ConfigError, match=r"hf:.*model\.n_head"):
        load_peer_config(None, {"model_source": f"hf:{tmp_path}", "model.n_head": 4})
    with pytest.raises(ConfigError, match="is not a directory"):
        load_peer_config(None, {"model_source": f"hf:{tmp_path / 'missing'}"})


def test_help_lists_presets_with_parameter_counts():
    parser = argparse.ArgumentParser()
    add_peer_flags(parser)
    text = parser.format_help()
    assert "[model_source]" in text
    for name, count in EXPECTED.items():
        assert f"{name} ({count:,} params)" in describe_presets()
    assert "gpt2-small (86,039,040" in " ".join(text.split())


def test_load_model_builds_presets_from_the_seed():
    """Same seed, same weights (every peer); another seed, other weights."""
    a, b, c = load_model("tiny", seed=3), load_model("tiny", seed=3), load_model("tiny", seed=4)
    assert a.params == EXPECTED["tiny"] and a.block_size == 64 and a.unit == "byte"
    pairs = list(zip(a.model.parameters(), b.model.parameters(), c.model.parameters(), strict=True))
    assert all(torch.equal(x, y) for x, y, _ in pairs)
    assert not all(torch.equal(x, z) for x, _, z in pairs)


def test_seq_len_trains_a_preset_on_shorter_windows(tmp_path):
    """--seq-len keeps the preset's positions (its parameters) and shortens the training windows."""
    from p2pfm.config import ConfigError
    from p2pfm.model.config import GPTConfig
    from p2pfm.model.data import ShardSpec
    from p2pfm.model.source import load_workload

    corpus = tmp_path / "text.txt"
    corpus.write_text("hello world\n" * 2000)
    workload = load_workload(
        "tiny", GPTConfig(), corpus, ShardSpec(0, 1), seed=0, max_shard_bytes=1 << 20, seq_len=16
    )
    assert workload.loaded.params == EXPECTED["tiny"]
    inputs, targets = workload.dataset.batch(torch.Generator().manual_seed(0), 2)
    assert inputs.shape == (2, 16) and targets.shape == (2, 16)
    with pytest.raises(ConfigError, match="train.seq_len"):
        load_workload(
            "tiny", GPTConfig(), corpus, ShardSpec(0, 1), seed=0, max_shard_bytes=1 << 20, seq_len=65
        )
