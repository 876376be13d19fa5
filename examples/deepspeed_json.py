"""Lion from a DeepSpeed JSON config: `"optimizer": {"type": "LionDist", "params": {...}}`, any ZeRO stage.

    launch/deepspeed.sh launch/ds_zero2.json examples/deepspeed_json.py --steps 100
    launch/deepspeed.sh launch/ds_zero3_offload.json examples/deepspeed_json.py --steps 100   # ZeRO-Offload

`lion_dist.deepspeed.initialize` is `deepspeed.initialize` plus the "LionDist" entry; it checks DeepSpeed's
train_batch_size (micro batch x gradient accumulation x data-parallel ranks) against Lion's minimum of 64.
DeepSpeed picks NCCL on GPUs and gloo on CPU (set DS_ACCELERATOR=cpu there to skip its detection).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lion_dist.deepspeed


def make_batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic regression batch, the same for a given step on every run: y = sin(x @ w)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(batch_size, 32, generator=gen)
    w = torch.randn(32, 1, generator=torch.Generator().manual_seed(-1))
    return x, torch.sin(x @ w / 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deepspeed_config", required=True, help="a DeepSpeed JSON config, e.g. launch/ds_zero2.json")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    engine, _, _, _ = lion_dist.deepspeed.initialize(model=model, config=args.deepspeed_config)
    rank, world = engine.global_rank, engine.dp_world_size
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    x_eval, y_eval = (t.to(engine.device) for t in make_batch(-2, 256))

    def eval_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(engine(x_eval), y_eval).item()

    first = eval_loss()
    for step in range(args.steps):
        x, y = make_batch(step, engine.train_batch_size())
        for k in range(accum):  # engine.step() applies Lion at the end of each accumulation
            lo = (k * world + rank) * micro  # this rank's slice of this micro step
            loss = nn.functional.mse_loss(
                engine(x[lo : lo + micro].to(engine.device)), y[lo : lo + micro].to(engine.device)
            )
            engine.backward(loss)
            engine.step()
    last = eval_loss()
    if rank == 0:
        print(f"eval loss {first:.5f} -> {last:.5f} after {args.steps} steps on {world} ranks")


if __name__ == "__main__":
    main()
