"""The default workload.

- ``gpt.py``   a small byte-level GPT (nanoGPT-style), built identically by every peer from the run seed.
- ``data.py``  the corpus (this machine's stdlib by default, or ``--data DIR``), deterministic
               per-peer shards, a fixed held-out split, and evaluation.
"""
