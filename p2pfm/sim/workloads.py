"""What simulated peers train: real tensor math on flat float32 parameter vectors.

- :class:`MLPWorkload` -- the fast one, for 1,000-peer runs. A one-hidden-layer ReLU MLP
  (2,762 parameters by default) on a seeded Gaussian-mixture classification task, IID or
  Dirichlet non-IID shards. Local SGD for *all computing peers at once*: parameters are a
  (peers, numel) matrix and every step is a handful of batched ``np.matmul`` calls, so the
  cost per peer-step is a few microseconds of BLAS rather than Python.
- :class:`GPTWorkload` -- the daemon's byte-level GPT (``p2pfm.model``) on this machine's
  stdlib, one torch model per peer with its own inner AdamW (``p2pfm.model.train``, the daemon's
  optimizer and step): the real thing, for 4-8 peers.

Both expose ``numel``, ``flops_per_step`` (for device timing and the datacentre baseline),
``initial_params()``, ``local_steps(peers, params, steps)`` and ``evaluate(params)``.
"""

from __future__ import annotations

import numpy as np

from p2pfm.sim.scenario import GPTWorkloadConfig, MLPConfig


class MLPWorkload:
    """Softmax classifier with one hidden ReLU layer; parameters laid out [W1, b1, W2, b2]."""

    def __init__(self, config: MLPConfig, peers: int, rng: np.random.Generator) -> None:
        self.config = config
        d, h, c = config.features, config.hidden, config.classes
        self.shapes = ((d, h), (h,), (h, c), (c,))
        self.offsets = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes])
        self.numel = int(self.offsets[-1])
        # Forward 2 and backward 4 FLOPs per parameter per sample.
        self.flops_per_step = 6.0 * self.numel * config.batch_size
        self.samples_per_step = config.batch_size
        self.rng = rng
        # The task: each class is a mixture of `clusters_per_class` Gaussians.
        self.centres = rng.standard_normal((c, config.clusters_per_class, d)) * config.separation
        n = config.samples_per_peer
        if config.partition == "iid":
            labels = rng.integers(0, c, size=(peers, n))
        else:
            mixes = rng.dirichlet(np.full(c, config.dirichlet_alpha), size=peers)  # (peers, c)
            cumulative = np.cumsum(mixes, axis=1)
            cumulative[:, -1] = 1.0
            u = rng.random((peers, n))
            labels = (u[:, :, None] > cumulative[:, None, :]).sum(axis=2)  # inverse CDF per peer
        self.train_x, self.train_y = self._sample(labels.reshape(-1))  # peer i owns rows [i*n, (i+1)*n)
        self.eval_x, self.eval_y = self._sample(rng.integers(0, c, size=config.eval_samples))
        self._init_seed = int(rng.integers(2**63))

    def _sample(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        clusters = self.rng.integers(0, cfg.clusters_per_class, size=labels.size)
        noise = self.rng.standard_normal((labels.size, cfg.features)) * cfg.noise
        x = (self.centres[labels, clusters] + noise).astype(np.float32)
        return x, labels.astype(np.int64)

    def initial_params(self) -> np.ndarray:
        """He-initialised weights, zero biases; every peer starts from these (same run seed)."""
        rng = np.random.default_rng(self._init_seed)
        d, h, c = self.config.features, self.config.hidden, self.config.classes
        w1 = rng.standard_normal((d, h)) * np.sqrt(2.0 / d)
        w2 = rng.standard_normal((h, c)) * np.sqrt(1.0 / h)
        return np.concatenate([w1.ravel(), np.zeros(h), w2.ravel(), np.zeros(c)]).astype(np.float32)

    def _unpack(self, params: np.ndarray) -> list[np.ndarray]:
        k = params.shape[0]
        o = self.offsets
        return [params[:, o[i] : o[i + 1]].reshape(k, *shape) for i, shape in enumerate(self.shapes)]

    def _forward(self, params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w1, b1, w2, b2 = params
        z1 = np.matmul(x, w1)  # (k, B, h)
        z1 += b1[:, None, :]
        a1 = np.maximum(z1, 0.0)
        logits = np.matmul(a1, w2)  # (k, B, c)
        logits += b2[:, None, :]
        logits -= logits.max(axis=2, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=2, keepdims=True)  # now probabilities
        return z1, a1, logits

    @staticmethod
    def _nll(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
        picked = np.take_along_axis(probs, y[..., None], axis=2)[..., 0]  # (k, B)
        return -np.log(np.maximum(picked, 1e-12)).mean(axis=1)

    def local_steps(self, peers: np.ndarray, params: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` SGD steps for each listed peer on its own shard; returns (params, mean train loss)."""
        cfg = self.config
        k, batch, n = len(peers), cfg.batch_size, cfg.samples_per_peer
        p = params.astype(np.float32, copy=True)  # (k, numel)
        grad = np.empty_like(p)
        g_w1, g_b1, g_w2, g_b2 = self._unpack(grad)  # views into grad: gradients land in place
        total = np.zeros(k)
        rows = np.arange(k)[:, None]
        cols = np.arange(batch)[None, :]
        base = (np.asarray(peers, dtype=np.int64) * n)[:, None]
        lr = np.float32(cfg.lr)
        for _ in range(steps):
            idx = base + self.rng.integers(0, n, size=(k, batch))
            x = np.take(self.train_x, idx, axis=0)  # (k, B, d)
            y = self.train_y[idx]  # (k, B)
            w1, b1, w2, b2 = self._unpack(p)
            z1, a1, probs = self._forward([w1, b1, w2, b2], x)
            total += self._nll(probs, y)
            probs[rows, cols, y] -= 1.0
            probs *= np.float32(1.0 / batch)  # dL/dlogits, (k, B, c)
            np.matmul(a1.transpose(0, 2, 1), probs, out=g_w2)  # (k, h, c)
            probs.sum(axis=1, out=g_b2)
            da1 = np.matmul(probs, w2.transpose(0, 2, 1))  # (k, B, h)
            da1 *= z1 > 0
            np.matmul(x.transpose(0, 2, 1), da1, out=g_w1)  # (k, d, h)
            da1.sum(axis=1, out=g_b1)
            grad *= lr
            p -= grad
        return p, total / steps

    def evaluate(self, params: np.ndarray, chunk: int = 128) -> np.ndarray:
        """Held-out cross-entropy (nats) of each parameter row; the same eval set for everybody."""
        cfg = self.config
        d, h = cfg.features, cfg.hidden
        out = np.empty(params.shape[0])
        for start in range(0, params.shape[0], chunk):
            part = params[start : start + chunk]
            k = len(part)
            w1, b1, w2, b2 = self._unpack(part)
            # One GEMM for the first layer of all k models: (E, d) @ (d, k*h).
            z1 = self.eval_x @ np.ascontiguousarray(w1.transpose(1, 0, 2)).reshape(d, k * h)
            z1 = z1.reshape(-1, k, h).transpose(1, 0, 2) + b1[:, None, :]  # (k, E, h)
            np.maximum(z1, 0.0, out=z1)
            logits = np.matmul(z1, w2) + b2[:, None, :]  # (k, E, c)
            logits -= logits.max(axis=2, keepdims=True)
            log_norm = np.log(np.exp(logits).sum(axis=2))  # (k, E)
            picked = np.take_along_axis(
                logits, np.broadcast_to(self.eval_y[None, :, None], (k, len(self.eval_y), 1)), axis=2
            )[..., 0]
            out[start : start + k] = (log_norm - picked).mean(axis=1)
        return out


class GPTWorkload:
    """The daemon's GPT: one torch model + inner AdamW per peer, shards of this machine's corpus."""

    def __init__(
        self, config: GPTWorkloadConfig, peers: int, rng: np.random.Generator, base_dir: str = ""
    ) -> None:
        import torch

        from p2pfm.model.data import ByteDataset, Corpus, ShardSpec
        from p2pfm.model.gpt import build_model
        from p2pfm.model.train import build_inner_optimizer, train_step

        self.torch = torch
        self.train_step = train_step  # imported here: MLP runs never load torch
        self.config = config
        train = config.train
        seed = int(rng.integers(2**31))
        root = None
        if config.data:
            from pathlib import Path

            root = (
                Path(config.data) if Path(config.data).is_absolute() else Path(base_dir or ".") / config.data
            )
        corpus = Corpus.scan(root)  # once: listing checks every file, which N peers need not repeat
        self.datasets = [
            ByteDataset(
                root,
                ShardSpec(i, peers),
                block_size=config.model.block_size,
                max_shard_bytes=train.max_shard_bytes,
                seed=seed,
                corpus=corpus,
            )
            for i in range(peers)
        ]
        self.models = [build_model(config.model, seed) for _ in range(peers)]
        self.optimizers = [build_inner_optimizer(m.parameters(), train) for m in self.models]
        self.generators = [torch.Generator().manual_seed(int(rng.integers(2**31))) for _ in range(peers)]
        self.eval_batches = self.datasets[0].eval_batches(
            train.eval_batches, train.eval_batch_size, seed=seed
        )
        vector = torch.nn.utils.parameters_to_vector(self.models[0].parameters())
        self.numel = int(vector.numel())
        tokens = train.batch_size * config.model.block_size
        self.flops_per_step = 6.0 * self.numel * tokens  # Kaplan et al. 2020: 6 N FLOPs per token
        self.samples_per_step = train.batch_size
        self._initial = vector.detach().numpy().astype(np.float32).copy()

    def initial_params(self) -> np.ndarray:
        return self._initial.copy()

    def _load(self, peer: int, vector: np.ndarray) -> None:
        self.torch.nn.utils.vector_to_parameters(
            self.torch.from_numpy(vector.astype(np.float32)), self.models[peer].parameters()
        )

    def local_steps(self, peers: np.ndarray, params: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` inner steps (:func:`p2pfm.model.train.train_step`, the daemon's) per listed peer."""
        torch = self.torch
        out = np.empty_like(params)
        losses = np.zeros(len(peers))
        for row, peer in enumerate(np.asarray(peers).tolist()):
            model, optimizer = self.models[peer], self.optimizers[peer]
            self._load(peer, params[row])
            model.train()
            for _ in range(steps):
                x, y = self.datasets[peer].batch(self.generators[peer], self.config.train.batch_size)
                losses[row] += self.train_step(model, optimizer, x, y) / steps
            with torch.no_grad():
                out[row] = torch.nn.utils.parameters_to_vector(model.parameters()).numpy()
        return out, losses

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        from p2pfm.model.data import evaluate

        out = np.empty(params.shape[0])
        model = self.models[0]
        saved = self.torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        for row in range(params.shape[0]):
            self._load(0, params[row])
            out[row] = evaluate(model, self.eval_batches)
        self.torch.nn.utils.vector_to_parameters(saved, model.parameters())
        return out
