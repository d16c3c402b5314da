"""Train your own model with your own optimizer and data through p2pfm (library API).

    python examples/train_own_model.py              # starts a 2-peer swarm on this machine
    python examples/train_own_model.py --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/ID   # join one

Each peer fits the same small MLP to its own shard of a synthetic regression task (the
shards differ: non-IID), with plain torch code; ``GossipOptimizer`` adds the gossip. The
first peer starts a second one as a subprocess so the example is self-contained.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from p2pfm.api import GossipOptimizer


def make_data(shard: int, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """y = sin(w . x) with a shared w; each shard sees inputs from its own region (non-IID)."""
    generator = torch.Generator().manual_seed(1000 + shard)
    w = torch.linspace(-1.0, 1.0, 8)
    x = torch.randn(n, 8, generator=generator) + (shard - 0.5)
    return x, torch.sin(x @ w).unsqueeze(1)


CHILDREN: list[subprocess.Popen] = []


def start_second_peer(maddr: str, steps: int, work_dir: Path) -> None:
    """Called once the first peer is online: start a second peer that joins through it.

    It stays in our process group, so whoever stops us (Ctrl-C, a test's kill of the group)
    stops it too; and we stop it ourselves on every exit path (see ``main``)."""
    CHILDREN.append(
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--initial-peers",
                maddr,
                "--shard",
                "1",
                "--steps",
                str(steps),
                "--work-dir",
                str(work_dir),
            ]
        )
    )


def stop_children() -> None:
    for child in CHILDREN:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    try:
        sys.exit(train(args))
    finally:
        stop_children()  # a failure of ours must not leave the second peer running


def train(args: argparse.Namespace) -> int:
    """One peer's whole run; returns the exit code (the second peer's, for the first peer)."""
    torch.set_num_threads(1)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="p2pfm-example-"))

    torch.manual_seed(0)  # every peer must start from the same weights
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x, y = make_data(args.shard)
    x_eval, y_eval = make_data(1 - args.shard, 256)  # the *other* shard: only gossip teaches this

    def evaluate() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x_eval), y_eval))

    optimizer = GossipOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        run_id="example-regression",
        initial_peers=args.initial_peers,
        inner_steps=10,
        key=work_dir / f"peer{args.shard}.key",
        work_dir=work_dir / f"peer{args.shard}",
        samples_per_step=64,
        evaluate_fn=evaluate,
        # Both peers wait for each other: neither trains before the other can hear it, so
        # gossip crosses both ways whatever the machines' speeds.
        min_peers=2,
        on_ready=None if args.initial_peers else lambda maddr: start_second_peer(maddr, args.steps, work_dir),
    )
    print(f"peer {args.shard}: eval MSE on the other shard before: {evaluate():.4f}", flush=True)
    generator = torch.Generator().manual_seed(args.shard)
    for _ in range(args.steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.item())
    print(
        f"peer {args.shard}: eval MSE on the other shard after {optimizer.round} rounds: {evaluate():.4f}",
        flush=True,
    )
    optimizer.shutdown()
    return CHILDREN[0].wait() if CHILDREN else 0


if __name__ == "__main__":
    main()
