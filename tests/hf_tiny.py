"""A tiny Hugging Face causal LM made on the spot: no download, ever.

A byte-level BPE tokenizer trained on the test's own text (``tokenizers``), wrapped as a
``PreTrainedTokenizerFast``, and a randomly initialised 2-block GPT-2 sized to it, both saved
(safetensors) to a folder that ``--model hf:DIR`` and ``p2pfm.model.hf.load_hf`` read. Callers
import transformers through ``pytest.importorskip`` first, so a machine without it skips.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def make_tiny_hf(
    directory: Path, text: str, *, vocab_size: int = 320, n_positions: int = 64, seed: int = 0
) -> Path:
    """Save a tiny random GPT-2 (2 blocks, width 32) and a BPE tokenizer trained on ``text`` to ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    eos = fast.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(fast), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    return directory
