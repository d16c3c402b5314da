"""Two real peers fine-tune a tiny local Hugging Face model (`--model hf:DIR`) over libp2p on loopback.

The model and its tokenizer are made on the spot (tests/hf_tiny.py): a BPE tokenizer trained on
this test's text and a random 2-block GPT-2, saved as safetensors. No download. The peers are
real, admitted ``p2pfm peer`` processes; the test waits on their metrics and exit, never on sleeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from p2pfm.daemon.checkpoint import CHECKPOINT_NAME  # noqa: E402
from p2pfm.swarm import LocalSwarm, final_params, summarize  # noqa: E402
from tests.hf_tiny import make_tiny_hf  # noqa: E402
from tests.integration.conftest import round_records, wait_all_exit  # noqa: E402
from tests.test_data import english_like  # noqa: E402

pytestmark = pytest.mark.integration

ROUNDS = 8


def held_out_loss(model: torch.nn.Module, tokenizer, text: str) -> float:
    """HF's own loss on ``text`` in windows of 64 tokens (the model's context)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)[:16]
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def test_two_peers_fine_tune_a_local_hf_model(tmp_path):
    """Updates flow both ways, eval loss falls, and each peer's checkpoint loads into the HF model."""
    text = english_like(400_000, seed=11)
    data = tmp_path / "book.txt"
    data.write_text(text)
    hf_dir = make_tiny_hf(tmp_path / "tiny-gpt2", text[:40_000])
    peer_args = [
        "--model", f"hf:{hf_dir}", "--data", str(data), "--rounds", str(ROUNDS), "--min-peers", "2",
        "--inner-steps", "8", "--batch-size", "8", "--eval-batches", "2", "--block-size", "64",
    ]  # fmt: skip
    with LocalSwarm(tmp_path / "swarm", peer_args, threads_per_peer=1, run_id="hf-itest") as swarm:
        for index in range(2):
            swarm.start_peer(swarm.add_peer(shard=index, num_shards=2), wait=index == 0)
        wait_all_exit(swarm.peers, timeout=300)
    summary = summarize(swarm.peers, wall_seconds=0.0)
    print(summary)
    vocab = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True).vocab_size
    # Random init: about ln(vocab) nats per token; a few rounds of training cut it well below.
    assert abs(summary["initial_eval_loss"] - np.log(vocab)) < 0.5, summary
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.6, summary
    # No bound on consensus_distance: the final drain waits at most 2 s for the last pushes after the
    # partner's final announcement, and on a loaded machine the first peer to finish may leave a round
    # apart (seen: 0.076 once in 6 runs; p2pfm/daemon/rounds.py final_drain, outside this test's subject).
    for peer in swarm.peers:
        rounds = round_records(peer)
        assert len(rounds) == ROUNDS
        assert sum(r["received_updates"] for r in rounds) > 0, f"peer {peer.index} heard no update"
        assert rounds[-1]["update_bytes_sent"] > 0
        start = next(r for r in peer.metrics() if r.get("event") == "start")
        assert 0 < start["shard_tokens"] < start["shard_bytes"]  # tokenized by the checkpoint's tokenizer
        assert (peer.work_dir / CHECKPOINT_NAME).exists()

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    options = {"local_files_only": True, "use_safetensors": True}
    untrained = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, **options)
    sample = english_like(20_000, seed=99)  # text neither peer trained on
    before = held_out_loss(untrained, tokenizer, sample)
    for peer in swarm.peers:
        tensors = load_file(peer.work_dir / CHECKPOINT_NAME)
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, **options)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to the token embedding
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
        assert np.array_equal(flat, final_params(peer.work_dir))
        after = held_out_loss(model, tokenizer, sample)
        print(f"peer {peer.index}: held-out loss {before:.3f} -> {after:.3f} nats/token")
        assert after < before - 0.6
