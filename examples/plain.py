"""Lion in your own training loop, one process: the smallest complete example.

    python examples/plain.py --steps 100

The global batch is 64, the minimum Lion is recommended for (Chen et al. 2023), so the batch guard stays quiet.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from toy import eval_loss, make_batch, make_model

from lion_dist import Lion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="toy-sized; Lion wants 3-10x less than AdamW")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = make_model().to(device)
    optimizer = Lion(model.parameters(), lr=args.lr, weight_decay=0.1, global_batch_size=args.batch_size)
    first = eval_loss(model, device)
    for step in range(args.steps):
        x, y = (t.to(device) for t in make_batch(step, args.batch_size))
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"eval loss {first:.5f} -> {eval_loss(model, device):.5f} after {args.steps} steps")


if __name__ == "__main__":
    main()
