"""Hugging Face causal LMs as p2pfm workloads: ``--model hf:DIR``.

Any local causal-LM folder (``config.json``, ``model.safetensors``, tokenizer files) trains
through the same gossip as the built-in GPT. ``transformers`` is an optional extra
(``pip install -e '.[hf]'``), imported only here and only when such a model is asked for.

What is read, and how, is chosen for a peer that must not run anyone's code:

* ``local_files_only=True``: no download at run time, ever (and no surprise network traffic);
* ``use_safetensors=True``: weights only from safetensors; pickled ``pytorch_model.bin`` files
  can run code when loaded, so they are refused with the command that converts them;
* ``trust_remote_code=False``: a folder that needs its own Python modelling code is refused.

Every peer of a run loads the same files, so all start from identical weights: the checkpoint's
(the run seed plays no part in them). The model is wrapped to fit :func:`p2pfm.model.train.train_step`:
``model(inputs, targets) -> (logits, loss)``, with our targets already shifted by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from p2pfm.config import ConfigError

INSTALL_HINT = "pip install -e '.[hf]'"


def _transformers() -> Any:
    """The ``transformers`` module, or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"model_source: hf:DIR needs the optional Hugging Face packages; install them with {INSTALL_HINT}"
        ) from None
    return transformers


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM seen as p2pfm's models are: ``forward(inputs, targets) -> (logits, loss)``.

    ``targets`` are ``inputs`` shifted by one already (``ByteDataset.batch`` cuts both from one
    window), so the loss is plain cross-entropy of the logits against them; passing them as HF
    ``labels`` would shift a second time. Equals HF's own loss for ``labels = window`` (a unit test
    checks it). The HF model is ``.module``: checkpoint tensor names drop that prefix, so a saved
    ``model.<name>`` loads into the HF model under ``<name>`` (``p2pfm.daemon.checkpoint``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.module(input_ids=inputs, use_cache=False).logits
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


@dataclass
class HFModel:
    """A loaded checkpoint: the wrapped model, its tokenizer and what a workload needs to know."""

    model: HFCausalLM
    tokenizer: Any  # a transformers tokenizer (PreTrainedTokenizerFast or the like)
    name: str  # the config's model type and the folder, e.g. "gpt2 (/models/tiny)"
    vocab_size: int  # rows of the input embedding: token ids must stay below this
    max_positions: int | None  # the model's context limit, if its config states one

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (the corpus is one stream, not documents)."""
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def check_hf_dir(directory: Path) -> None:
    """Refuse, with a ConfigError saying what to do, a folder we would not load safely or at all."""
    if not directory.is_dir():
        raise ConfigError(f"model_source: {directory} is not a directory (hf:DIR names a local model folder)")
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"model_source: {directory} has no config.json; it is not a Hugging Face model folder"
        )
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.safetensors.index.json")):
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt")
        )
        found = f" (found {', '.join(pickled)}: pickle, which can run code when loaded)" if pickled else ""
        raise ConfigError(
            f"model_source: {directory} has no safetensors weights{found}. p2pfm loads weights only from "
            "safetensors; convert once where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )


def load_hf(directory: str | Path) -> HFModel:
    """Load a local causal LM and its tokenizer: no download, no pickle, no remote code."""
    directory = Path(directory)
    check_hf_dir(directory)
    transformers = _transformers()
    options = {"local_files_only": True, "trust_remote_code": False}
    try:
        module = transformers.AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, **options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **options)
    except (OSError, ValueError, KeyError) as exc:  # transformers' errors for unusable folders
        raise ConfigError(f"model_source: cannot load hf:{directory}: {exc}") from None
    config = module.config
    max_positions = getattr(config, "max_position_embeddings", None)
    vocab_size = int(module.get_input_embeddings().num_embeddings)
    name = f"{getattr(config, 'model_type', type(module).__name__)} ({directory})"
    return HFModel(
        model=HFCausalLM(module),
        tokenizer=tokenizer,
        name=name,
        vocab_size=vocab_size,
        max_positions=int(max_positions) if isinstance(max_positions, int) else None,
    )
