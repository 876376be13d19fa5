"""Lion with FSDP2 (`fully_shard`): each rank keeps and updates only its shard of every param and momentum.

    launch/torchrun_single_node.sh examples/fsdp2.py --steps 100
    launch/torchrun_single_node.sh examples/fsdp2.py --steps 100 --cpu-offload   # params + Lion step on CPU
    NPROC_PER_NODE=4 launch/torchrun_single_node.sh examples/fsdp2.py --replicate 2  # HSDP: 2 x 2 mesh
    NPROC_PER_NODE=4 launch/torchrun_single_node.sh examples/fsdp2.py --replicate 2 --distributed-lion

NCCL on GPUs, gloo on CPU. The global batch (default 64) is split over the data-parallel ranks; Lion is told
the per-rank micro batch and infers the data-parallel size from the params' mesh (HSDP: replicate x shard).
`--distributed-lion` is two-level Distributed Lion on the same mesh: FSDP2 shards each replica on `mesh["shard"]`
and the replicas vote 1 bit per element of each rank's shard over `mesh["replicate"]` (the link between nodes, when
the replicas are nodes), starting each unit's votes as soon as backward has reduced its gradients.
"""

from __future__ import annotations

import argparse

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from toy import eval_loss, init_distributed, make_batch, make_model, micro_batch_size

from lion_dist import Lion, distributed_lion
from lion_dist.train.loop import close_process_groups


def main() -> DeviceMesh:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=64, help="micro batch x grad accum x data-parallel ranks")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2, help="toy-sized; Lion wants 3-10x less than AdamW")
    parser.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy: the step runs on CPU")
    parser.add_argument("--replicate", type=int, default=1, help="HSDP replicas (1: plain FSDP)")
    parser.add_argument("--distributed-lion", action="store_true", help="replicas vote 1-bit signs instead of HSDP")
    args = parser.parse_args()

    rank, world, device = init_distributed()
    micro = micro_batch_size(args.global_batch, world, args.grad_accum)
    mesh = init_device_mesh(
        device.type, (args.replicate, world // args.replicate), mesh_dim_names=("replicate", "shard")
    )

    model = make_model().to(device)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if args.cpu_offload else OffloadPolicy()
    shard_mesh = mesh["shard"] if args.distributed_lion else mesh  # two-level: FSDP2 inside each replica only
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=shard_mesh, offload_policy=offload)
    fully_shard(model, mesh=shard_mesh, offload_policy=offload)
    hyperparams = dict(lr=args.lr, weight_decay=0.1, micro_batch_size=micro, grad_accum_steps=args.grad_accum)
    if args.distributed_lion:
        replicas = mesh.get_group("replicate")  # votes start as backward finishes each unit (no clipping here)
        optimizer = distributed_lion.setup(
            model, process_group=replicas, overlap_bucket_elements=distributed_lion.OVERLAP_BUCKET, **hyperparams
        )
    else:
        optimizer = Lion(model.parameters(), **hyperparams)

    first = eval_loss(model, device)
    for step in range(args.steps):
        x, y = make_batch(step, args.global_batch)
        for k in range(args.grad_accum):
            lo = (k * world + rank) * micro  # this rank's slice of this micro step
            model.set_requires_gradient_sync(k == args.grad_accum - 1)
            loss = nn.functional.mse_loss(model(x[lo : lo + micro].to(device)), y[lo : lo + micro].to(device))
            (loss / args.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    last = eval_loss(model, device)
    if rank == 0:
        print(f"eval loss {first:.5f} -> {last:.5f} after {args.steps} steps on {world} ranks")
    return mesh


if __name__ == "__main__":
    close_process_groups(main())  # after main's model is gone: no gloo thread outlives the interpreter
