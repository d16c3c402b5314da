"""``p2pfm bench codecs``: what each codec costs on the wire and in time, inside a real envelope.

For a random fp32 vector (standard normal, seeded) of ``size`` elements, and for each registered
codec (none, fp16, int8, topk+int8 and topk+fp16 built in), it measures:

- ``bits_per_param``  bytes of the sealed ``update`` envelope (codec dict, header and
                      Ed25519 signature) times 8 / size;
- ``encode_mb_s``     MB of fp32 input per second for ``codecs.encode`` + ``envelope.seal``;
- ``decode_mb_s``     MB of fp32 input per second for ``envelope.open_envelope`` (signature
                      verified) + ``codecs.decode``;
- ``rel_error``       ||x - decode(encode(x))|| / ||x|| for one round, without error feedback.

Times are the best of ``repeat`` runs on the calling thread; numpy runs these kernels
single-threaded, and torch is not involved, so the numbers are per core.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfm.config import require
from p2pfm.core.codecs import CODECS, CodecSpec, decode, encode
from p2pfm.core.envelope import EnvelopeLimits, open_envelope, seal
from p2pfm.core.identity import Identity

RUN_ID = "bench-codecs"


@dataclass(frozen=True)
class CodecBenchConfig:
    """One run of the codec benchmark."""

    size: int = 10_000_000
    """Elements of the fp32 vector: 10 M, a small model's update, is where the 200 MB/s target is set."""
    repeat: int = 3
    """Timed runs per codec; the best is reported (the others absorb page faults and cache misses)."""
    topk_fraction: float = 0.01
    """Share of entries the topk rows keep: 1 %, the default CodecSpec."""
    block_size: int = 256
    """int8 block (int8 codec and topk int8 values)."""
    seed: int = 0
    """Seed of the input vector."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.size, int) and 1 <= self.size <= 1 << 30,
            "size",
            f"must be in [1, 2**30], got {self.size!r}",
        )
        require(
            isinstance(self.repeat, int) and self.repeat >= 1, "repeat", f"must be >= 1, got {self.repeat!r}"
        )
        require(
            0.0 < self.topk_fraction <= 1.0, "topk_fraction", f"must be in (0, 1], got {self.topk_fraction!r}"
        )
        CodecSpec(block_size=self.block_size)  # same range rules as the codec itself


def bench_specs(config: CodecBenchConfig) -> list[tuple[str, CodecSpec]]:
    """The rows of the table: (label, spec), one per registered codec, topk once per value format."""
    common = {"topk_fraction": config.topk_fraction, "block_size": config.block_size}
    rows: list[tuple[str, CodecSpec]] = []
    for name in CODECS:
        if name == "topk":
            rows.append(("topk-int8", CodecSpec("topk", value_bits=8, **common)))
            rows.append(("topk-fp16", CodecSpec("topk", value_bits=16, **common)))
        else:
            rows.append((name, CodecSpec(name, **common)))
    return rows


def run_codec_bench(config: CodecBenchConfig) -> list[dict[str, Any]]:
    """Measure every codec on one seeded vector; one dict per codec (see the module docstring)."""
    x = np.random.default_rng(config.seed).standard_normal(config.size, dtype=np.float32)
    x_norm = float(np.linalg.norm(x.astype(np.float64)))
    mb = x.nbytes / 1e6
    identity = Identity.generate()
    # A full fp32 update of a large --size may exceed the daemon's default 64 MiB limit.
    limits = EnvelopeLimits(max_bytes=max(EnvelopeLimits().max_bytes, 8 * config.size + (1 << 20)))
    model_hash = bytes(32)
    rows = []
    for label, spec in bench_specs(config):
        encode_s = decode_s = math.inf
        for attempt in range(config.repeat):
            start = time.perf_counter()
            wire = encode(x, spec)
            sealed = seal(
                identity,
                kind="update",
                run_id=RUN_ID,
                round=1,
                seq=attempt,
                timestamp=1000.0,
                payload={
                    "tensor": wire,
                    "weight": 1.0,
                    "inner_steps": 1,
                    "train_loss": 0.0,
                    "model_hash": model_hash,
                },
            )
            middle = time.perf_counter()
            envelope = open_envelope(sealed, run_id=RUN_ID, now=1000.0, limits=limits)
            y = decode(envelope.payload["tensor"], expected_numel=x.size)
            end = time.perf_counter()
            encode_s = min(encode_s, middle - start)
            decode_s = min(decode_s, end - middle)
        error = float(np.linalg.norm(x.astype(np.float64) - y)) / x_norm if x_norm else 0.0
        rows.append(
            {
                "codec": label,
                "bits_per_param": 8 * len(sealed) / x.size,
                "encode_mb_s": mb / encode_s,
                "decode_mb_s": mb / decode_s,
                "rel_error": error,
                "numel": x.size,
                "wire_bytes": len(sealed),
                "topk_fraction": spec.topk_fraction if spec.name == "topk" else None,
                "block_size": spec.block_size
                if spec.name == "int8" or (spec.name == "topk" and spec.value_bits == 8)
                else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`run_codec_bench` rows."""
    header = f"{'codec':<10} {'bits/param':>10} {'wire bytes':>12} {'enc+sign MB/s':>14} {'verify+dec MB/s':>16} {'rel error':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['codec']:<10} {row['bits_per_param']:>10.3f} {row['wire_bytes']:>12,d} "
            f"{row['encode_mb_s']:>14.0f} {row['decode_mb_s']:>16.0f} {row['rel_error']:>10.2e}"
        )
    return "\n".join(lines)
