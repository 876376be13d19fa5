"""Lion with FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`): each rank updates its flat shard.

    launch/torchrun_single_node.sh examples/fsdp1.py --steps 100

NCCL on GPUs, gloo on CPU. The global batch (default 64) is split over the ranks; Lion is told the per-rank
micro batch and takes the data-parallel size from the default process group.
"""

from __future__ import annotations

import argparse
import contextlib

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from toy import eval_loss, init_distributed, make_batch, make_model, micro_batch_size

from lion_dist import Lion
from lion_dist.train.loop import close_process_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=64, help="micro batch x grad accum x data-parallel ranks")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2, help="toy-sized; Lion wants 3-10x less than AdamW")
    args = parser.parse_args()

    rank, world, device = init_distributed()
    micro = micro_batch_size(args.global_batch, world, args.grad_accum)
    model = FSDP(make_model(), device_id=device, use_orig_params=True)
    optimizer = Lion(
        model.parameters(), lr=args.lr, weight_decay=0.1, micro_batch_size=micro, grad_accum_steps=args.grad_accum
    )

    first = eval_loss(model, device)
    for step in range(args.steps):
        x, y = make_batch(step, args.global_batch)
        for k in range(args.grad_accum):
            lo = (k * world + rank) * micro  # this rank's slice of this micro step
            with model.no_sync() if k < args.grad_accum - 1 else contextlib.nullcontext():
                loss = nn.functional.mse_loss(model(x[lo : lo + micro].to(device)), y[lo : lo + micro].to(device))
                (loss / args.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    last = eval_loss(model, device)
    if rank == 0:
        print(f"eval loss {first:.5f} -> {last:.5f} after {args.steps} steps on {world} ranks")


if __name__ == "__main__":
    main()
    close_process_groups()  # after main's model is gone: no gloo thread outlives the interpreter
