"""Local views of sharded params: each rank updates only the elements it owns.

What the engines hand the optimizer:
- FSDP2 (`fully_shard`): `nn.Parameter(DTensor)` with `Shard(0)` (HSDP: `(Replicate, Shard(0))`; with tensor
  parallelism more `Shard` dims). The local shard is `to_local()`; it may have zero rows. A DTensor's
  `data_ptr()` is 0, so only local tensors may reach a kernel.
- FSDP1 and DeepSpeed ZeRO 1/2/3: plain tensors that already are this rank's flat partition (FSDP1 with
  `use_orig_params=True`: 1-D views of it, possibly empty with `grad=None`). Nothing to unwrap.
- DeepSpeed ZeRO 3 calls `step()` once per sub-group with that sub-group's flat partition swapped into the
  group's `params`; the state is keyed by that tensor, so each sub-group finds its own momentum.

Lion is element-wise, so updating local tensors is the whole sharded step. The one exception is the cautious
mean, which is over the whole tensor: `sum_over_shards` adds up per-tensor counts over the ranks that hold
a shard of it. Flat partitions (FSDP1, ZeRO) hide the tensor boundaries: there the mean is over the local
tensor the optimizer holds (the mask is the same; only the 1/mean rescaling differs from unsharded).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local(tensor: Tensor) -> Tensor:
    """This rank's part of `tensor`: the local shard of a DTensor (an alias, writes go through), else itself."""
    if isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor


def local_grad(param: Tensor, name: str) -> Tensor:
    """This rank's part of `param.grad`, checked to line up element for element with `local(param)`.

    A DTensor param needs a DTensor gradient on the same mesh with the same placements (what FSDP2 and
    tensor parallelism produce); anything else would pair the wrong elements, so it is refused here.
    """
    grad = param.grad
    if isinstance(param, DTensor):
        if not isinstance(grad, DTensor):
            raise ValueError(
                f"{name} is a DTensor with placements {param.placements}, but its grad is a plain tensor of shape "
                f"{tuple(grad.shape)}; set a DTensor grad laid out like the param, e.g. "
                "distribute_tensor(grad, param.device_mesh, param.placements)"
            )
        if grad.device_mesh != param.device_mesh or grad.placements != param.placements:
            raise ValueError(
                f"{name} has placements {param.placements} on {param.device_mesh}, but its grad has "
                f"{grad.placements} on {grad.device_mesh}; redistribute the grad first: "
                "grad.redistribute(param.device_mesh, param.placements)"
            )
    local_g = local(grad)
    if local_g.shape != local(param).shape:
        raise ValueError(
            f"{name}: the local gradient has shape {tuple(local_g.shape)}, the local param "
            f"{tuple(local(param).shape)}; a gradient must match its param element for element"
        )
    return local_g


def new_momentum(param: Tensor, dtype: torch.dtype) -> Tensor:
    """Zero momentum for `param`'s local shard, shaped like the param and on the local shard's device.

    A DTensor param gets a DTensor momentum on the same mesh and placements, so that
    `get_optimizer_state_dict(..., full_state_dict=True)` gathers the true full momentum and sharded
    checkpoints reshard it. It is built around the local zeros directly (as FSDP2 builds its sharded params):
    `DTensor.from_local` would move a CPU shard (FSDP2's CPUOffloadPolicy) to the mesh's GPU.
    """
    zeros = torch.zeros_like(local(param), dtype=dtype, memory_format=torch.contiguous_format)
    if isinstance(param, DTensor):
        meta = TensorMeta(param.shape, param.stride(), dtype)
        return DTensor(zeros, DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta), requires_grad=False)
    return zeros


def noise_place(param: Tensor) -> tuple[int, int]:
    """Where `param`'s local elements sit in the whole param, for stochastic rounding: (base, shard).

    A local shard that is one contiguous range of the whole param (FSDP2's `Shard(0)`, HSDP, plain tensors) is
    (index of its first element, 0), so its noise is the unsharded param's. Any other layout (e.g. tensor
    parallel `Shard(1)`) gets base 0 and a shard id from its offset, so that its ranks draw different noise.
    """
    if not isinstance(param, DTensor) or not param.numel():
        return 0, 0
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(local_shape[1:]) == tuple(param.shape[1:]):
        return offset[0] * math.prod(param.shape[1:]), 0
    strides = torch.empty(param.shape, device="meta").stride()
    return 0, 1 + sum(o * s for o, s in zip(offset, strides, strict=True)) % 0x7FFFFFFF


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
        # CPU-offloaded shards (FSDP2 CPUOffloadPolicy) on a GPU mesh: an NCCL group reduces only GPU tensors.
        reduced = stacked.to(mesh.device_type) if stacked.device.type != mesh.device_type else stacked
        for dim in dims:
            dist.all_reduce(reduced, group=mesh.get_group(dim))
        stacked = reduced.to(stacked.device)
        for row, i in enumerate(index):
            result[i] = stacked[row]
    return result
