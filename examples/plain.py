"""Lion in your own training loop, one process: the smallest complete example.

    python examples/plain.py --steps 100

The global batch is 64, the minimum Lion is recommended for (Chen et al. 2023), so the batch guard stays quiet.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lion_dist import Lion


def make_batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic regression batch, the same for a given step on every run: y = sin(x @ w)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(batch_size, 32, generator=gen)
    w = torch.randn(32, 1, generator=torch.Generator().manual_seed(-1))
    return x, torch.sin(x @ w / 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="toy-sized; Lion wants 3-10x less than AdamW")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    optimizer = Lion(model.parameters(), lr=args.lr, weight_decay=0.1, global_batch_size=args.batch_size)
    x_eval, y_eval = (t.to(device) for t in make_batch(-2, 256))

    def eval_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_eval), y_eval).item()

    first = eval_loss()
    for step in range(args.steps):
        x, y = (t.to(device) for t in make_batch(step, args.batch_size))
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"eval loss {first:.5f} -> {eval_loss():.5f} after {args.steps} steps")


if __name__ == "__main__":
    main()
