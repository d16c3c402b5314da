"""hf:DIR models: the wrapper's loss is HF's own, loading is safe and local, token data keeps the byte split."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from p2pfm.config import ConfigError  # noqa: E402
from p2pfm.model import data as data_module  # noqa: E402
from p2pfm.model.config import GPTConfig  # noqa: E402
from p2pfm.model.data import ByteDataset, ShardSpec, TokenDataset, tokenize_bytes  # noqa: E402
from p2pfm.model.hf import HFCausalLM, load_hf  # noqa: E402
from p2pfm.model.source import load_model, load_workload  # noqa: E402
from tests.hf_tiny import make_tiny_hf  # noqa: E402
from tests.test_data import english_like  # noqa: E402

TEXT = english_like(60_000, seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", TEXT)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(TEXT)
    return path


def test_wrapper_loss_equals_hf_loss_with_labels(hf_dir):
    """Our (inputs, targets) loss equals HF's loss for labels = the whole window (HF shifts, we already did)."""
    loaded = load_hf(hf_dir)
    window = torch.tensor(loaded.encode(TEXT[:4000])[: 3 * 33]).view(3, 33)
    loaded.model.eval()
    with torch.no_grad():  # sharper than the random init's near-uniform predictions, so a shift shows
        loaded.model.module.get_input_embeddings().weight.mul_(30)
        logits, ours = loaded.model(window[:, :-1], window[:, 1:])
        theirs = loaded.model.module(input_ids=window, labels=window).loss
    assert logits.shape == (3, 32, loaded.vocab_size)
    assert ours is not None and abs(float(ours) - float(theirs)) < 1e-5
    # And not the doubly shifted loss (labels = our targets), which a naive wrapper would compute.
    with torch.no_grad():
        doubly = loaded.model.module(input_ids=window[:, :-1], labels=window[:, 1:]).loss
    assert abs(float(doubly) - float(ours)) > 0.1


def test_every_load_gives_identical_weights(hf_dir):
    """Peers start from the checkpoint's weights: two loads agree exactly, whatever the seed."""
    first, second = load_model(f"hf:{hf_dir}", seed=1), load_model(f"hf:{hf_dir}", seed=2)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(first.model, HFCausalLM) and first.params == sum(
        p.numel() for p in first.model.parameters()
    )
    assert first.unit == "token"


def test_block_size_is_capped_by_the_models_positions(hf_dir):
    """block = min(model's max positions (64), [model] block_size)."""
    assert load_model(f"hf:{hf_dir}", model_config=GPTConfig(block_size=128)).block_size == 64
    assert load_model(f"hf:{hf_dir}", model_config=GPTConfig(block_size=16)).block_size == 16


def test_pickle_only_folder_is_refused_with_the_conversion(tmp_path, hf_dir):
    """A folder with pytorch_model.bin and no safetensors is refused, naming the fix."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*pickle.*safe_serialization=True"):
        load_hf(folder)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf(tmp_path)


def test_missing_transformers_says_how_to_install(hf_dir, monkeypatch):
    """Without transformers the error is the install command, not an ImportError traceback."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[hf\]'"):
        load_hf(hf_dir)


def test_token_dataset_tokenizes_exactly_the_byte_split(hf_dir, corpus_file):
    """Shard and held-out tokens are the byte split's bytes tokenized; shards differ, held-out is shared."""
    loaded = load_hf(hf_dir)
    shards = [
        TokenDataset(
            corpus_file, ShardSpec(i, 2), encode=loaded.encode, vocab_size=loaded.vocab_size, block_size=32
        )
        for i in range(2)
    ]
    for index, tokens in enumerate(shards):
        raw = ByteDataset(corpus_file, ShardSpec(index, 2), block_size=32)
        assert tokens.sizes()["shard_bytes"] == len(raw.train)
        assert tokens.train.dtype == np.int32
        assert np.array_equal(tokens.train, tokenize_bytes(raw.train, loaded.encode, loaded.vocab_size))
        assert np.array_equal(tokens.holdout, tokenize_bytes(raw.holdout, loaded.encode, loaded.vocab_size))
        # BPE compresses: fewer tokens than bytes, and they decode back to the shard's text.
        assert len(tokens.train) < len(raw.train)
        assert loaded.tokenizer.decode(tokens.train.tolist()) == raw.train.tobytes().decode()
    assert not np.array_equal(shards[0].train[:200], shards[1].train[:200])
    assert np.array_equal(shards[0].holdout, shards[1].holdout)
    eval_a, eval_b = shards[0].eval_batches(2, 4), shards[1].eval_batches(2, 4)
    for (xa, ya), (xb, yb) in zip(eval_a, eval_b, strict=True):
        assert xa.shape == (4, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one


def test_tokenizing_in_chunks_keeps_the_text(hf_dir, monkeypatch):
    """Chunks cut after newlines: the ids still decode to the original text, and every chunk was used."""
    loaded = load_hf(hf_dir)
    monkeypatch.setattr(data_module, "TOKENIZE_CHUNK_BYTES", 1000)
    data = np.frombuffer(TEXT[:20_000].encode(), dtype=np.uint8)
    calls = []

    def encode(text: str) -> list[int]:
        calls.append(text)
        return loaded.encode(text)

    ids = tokenize_bytes(data, encode, loaded.vocab_size)
    assert len(calls) >= 20 and all(c.endswith("\n") for c in calls[:-1])
    assert loaded.tokenizer.decode(ids.tolist()) == TEXT[:20_000]


def test_ids_outside_the_vocabulary_are_refused():
    """A tokenizer that is not the model's (ids >= vocab) is a ConfigError, not an index error mid-run."""
    data = np.frombuffer(b"some text\n", dtype=np.uint8)
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 5"):
        tokenize_bytes(data, lambda text: [1, 2, 7], 5)


def test_workload_for_hf_is_tokens_in_model_windows(hf_dir, corpus_file):
    """load_workload(hf:DIR) gives the HF model and token batches it can train on."""
    workload = load_workload(
        f"hf:{hf_dir}",
        GPTConfig(block_size=48),
        corpus_file,
        ShardSpec(0, 2),
        seed=0,
        max_shard_bytes=1 << 20,
    )
    assert isinstance(workload.dataset, TokenDataset)
    inputs, targets = workload.dataset.batch(torch.Generator().manual_seed(0), 4)
    assert inputs.shape == (4, 48) and int(inputs.max()) < workload.loaded.hf.vocab_size
    _, loss = workload.model(inputs, targets)
    assert (
        loss is not None and abs(float(loss.detach()) - np.log(workload.loaded.hf.vocab_size)) < 0.5
    )  # random init
