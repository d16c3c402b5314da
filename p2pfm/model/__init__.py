"""The workload: the default byte-level GPT, its presets, and Hugging Face checkpoints.

- ``config.py``  GPTConfig (model size), GPT_PRESETS (``--model tiny|1m|10m|gpt2-small``) and InnerTrainConfig (the inner loop), torch-free: the daemon
                and the simulator's scenarios read the same tables.
- ``gpt.py``     a small byte-level GPT (nanoGPT-style), built identically by every peer from the run seed.
- ``train.py``   the one inner optimizer (AdamW, betas (0.9, 0.95)) and the one training step, used by
                the daemon, the simulator and the bench baselines.
- ``device.py``  where a peer computes (``--device auto|cpu|cuda[:N]|mps``) and its autocast precision;
                everything that leaves the device is a float32 host vector (device-independent state).
- ``data.py``    the corpus (this machine's stdlib by default, or ``--data`` a folder or one file of any
                size), split into byte-range blocks: a fixed held-out set and seeded per-peer shards,
                read in bounded memory; TokenDataset, the same split tokenized for an HF model; and evaluation.
- ``source.py``  ``--model SPEC`` -> the model, this peer's dataset and a description (load_model, load_workload).
- ``hf.py``      ``--model hf:DIR``: a local Hugging Face causal LM (safetensors, no remote code; the hf extra).
"""
