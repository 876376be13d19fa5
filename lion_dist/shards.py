"""Local views of sharded params: each rank updates only the elements it owns.

What the engines hand the optimizer:
- FSDP2 (`fully_shard`): `nn.Parameter(DTensor)` with `Shard(0)` (HSDP: `(Replicate, Shard(0))`; with tensor
  parallelism more `Shard` dims). The local shard is `to_local()`; it may have zero rows. A DTensor's
  `data_ptr()` is 0, so only local tensors may reach a kernel.
- FSDP1 and DeepSpeed ZeRO 1/2/3: plain tensors that already are this rank's flat partition (FSDP1 with
  `use_orig_params=True`: 1-D views of it, possibly empty with `grad=None`). Nothing to unwrap.

Lion is element-wise, so updating local tensors is the whole sharded step. The one exception is the cautious
mean, which is over the whole tensor: `sum_over_shards` adds up per-tensor counts over the ranks that hold
a shard of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def local(tensor: Tensor) -> Tensor:
    """This rank's part of `tensor`: the local shard of a DTensor (an alias, writes go through), else itself."""
    if isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor


def new_momentum(param: Tensor, dtype: torch.dtype) -> Tensor:
    """Zero momentum for `param`'s local shard, shaped like the param.

    A DTensor param gets a DTensor momentum on the same mesh and placements, so that
    `get_optimizer_state_dict(..., full_state_dict=True)` gathers the true full momentum and sharded
    checkpoints reshard it.
    """
    zeros = torch.zeros_like(local(param), dtype=dtype, memory_format=torch.contiguous_format)
    if isinstance(param, DTensor):
        return DTensor.from_local(
            zeros, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return zeros


def _sharded_dims(param: DTensor) -> tuple[int, ...]:
    return tuple(dim for dim, placement in enumerate(param.placements) if placement.is_shard())


def sum_over_shards(params: Sequence[Tensor], values: Sequence[Tensor]) -> list[Tensor]:
    """For each param, its local `values[i]` summed over every rank that holds a shard of that param.

    Replicated mesh dims (HSDP's replicate dim) hold copies and are not summed. One all-reduce per distinct
    (mesh, sharded dims), all tensors batched into it; plain tensors keep their local value.
    """
    result = list(values)
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if isinstance(p, DTensor) and _sharded_dims(p):
            batches[(p.device_mesh, _sharded_dims(p))].append(i)
    for (mesh, dims), index in batches.items():
        stacked = torch.stack([values[i] for i in index])
        for dim in dims:
            dist.all_reduce(stacked, group=mesh.get_group(dim))
        for row, i in enumerate(index):
            result[i] = stacked[row]
    return result
