"""Lion with Hugging Face Accelerate and FSDP2: `accelerator.prepare(model, lion_dist.Lion(...), dataloader)`.

    accelerate launch --num_processes 2 examples/accelerate_fsdp2.py --steps 20   # one process per GPU
    torchrun --nproc-per-node 2 examples/accelerate_fsdp2.py --steps 20          # the same, under torchrun
    python examples/accelerate_fsdp2.py --steps 20                               # one process, unsharded

`FullyShardedDataParallelPlugin(fsdp_version=2)` makes `prepare` call `fully_shard` on every decoder layer and on
the model, and point Lion at the sharded params: each rank keeps momentum for its shard only. The global batch
(default 64) is split over the ranks; Lion is told the per-rank micro batch and reads the data-parallel size
from the params' mesh. Accelerate 1.x applies the FSDP plugin on GPUs (and other accelerators) only: on CPU it
trains with DDP and says nothing, which this script points out (README: limits).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from hf_toy import eval_loss, make_lm, sequences
from torch.distributed.fsdp import FSDPModule

from lion_dist import Lion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64, help="split over the ranks")
    parser.add_argument("--lr", type=float, default=3e-3, help="toy-sized; Lion wants 3-10x less than AdamW")
    args = parser.parse_args()

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
    )
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    micro = args.global_batch // world
    if micro * world != args.global_batch:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} ranks")

    model = make_lm()
    optimizer = Lion(model.parameters(), lr=args.lr, weight_decay=0.1, micro_batch_size=micro)
    # rank r takes batches r, r + world, ...: together the ranks see the single-process run's batches of 64
    loader = torch.utils.data.DataLoader(sequences(args.steps * args.global_batch), batch_size=micro)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sharded = isinstance(model, FSDPModule)
    if world > 1 and not sharded:
        accelerator.print(f"note: Accelerate did not shard the model (it wrapped it in {type(model).__name__}); on CPU")
        accelerator.print("      Accelerate 1.x ignores fsdp_plugin and trains with DDP")

    first = eval_loss(model, accelerator.device)
    for x in loader:
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    last = eval_loss(model, accelerator.device)
    state = accelerator.reduce(torch.tensor(optimizer.optimizer.state_bytes(), device=accelerator.device), "sum")
    accelerator.print(
        f"eval loss {first:.5f} -> {last:.5f} after {args.steps} steps on {world} ranks "
        f"({'FSDP2' if sharded else 'not sharded'}); Lion state {optimizer.optimizer.state_bytes()} bytes on "
        f"rank 0, {int(state)} on all ranks"
    )


if __name__ == "__main__":
    main()
