"""Shard layouts: how a param's elements are spread over ranks, as far as the optimizer needs to know.

Lion is element-wise, so a sharded step is the step of each rank's local elements. What the optimizer needs from
an engine is therefore small, and each layout gives it:

- `local(t)`: this rank's elements of the param or of a state tensor laid out like it (an alias: writes go through);
- `around(local, shape)`: a state tensor built around local elements, laid out like the param, so that
  checkpoints see (and reshard) it as they see the param;
- `noise_place()`: where the local elements sit in the whole param, so stochastic rounding draws the noise of
  the unsharded param, and different ranks never draw the same noise for different elements;
- `sum_key()` / `sum_over_shards`: per-tensor sums over the ranks that hold its shards (the cautious mean);
- `data_parallel_size()`: how many ranks see different data (the batch guard).

The layouts:
- `DTensorLayout`: FSDP2 (`Shard(0)`), HSDP (`Replicate, Shard(0)`), tensor parallel and torchtitan-style meshes.
  Local shards may be empty; a DTensor's `data_ptr()` is 0, so only local tensors reach a kernel.
- `FlatPartition`: a plain 1-D tensor that is this rank's slice, starting at `offset`, of a flat buffer of many
  params (FSDP1's `FlatParameter`, DeepSpeed ZeRO 1-3 partitions). Tensor boundaries are hidden, so per-tensor
  sums are over the partition. FSDP1's flat params are recognised; engines that hand out other partitions
  declare them (`declare_flat_partition`; `lion_dist.deepspeed` does for ZeRO).
- `PLAIN`: a whole tensor on this rank (no sharding, or data-parallel replicas, which must draw the same noise).

Private torch attributes live in `lion_dist._torch`, not here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from lion_dist import _torch
from lion_dist.batch_guard import mesh_data_parallel_size


class Layout:
    """A plain, whole tensor; subclasses override what sharding changes."""

    def local(self, t: Tensor) -> Tensor:
        """This rank's elements of `t` (the param, its gradient or a state tensor laid out like the param)."""
        return t

    def around(self, local: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A state tensor of global `shape` laid out like the param, whose local elements are `local`."""
        return local

    def noise_place(self) -> tuple[int, int]:
        """(base, shard) of the local elements' noise stream (`spec.NoiseStream`)."""
        return 0, 0

    def sum_key(self) -> Hashable | None:
        """Tensors whose sums over shards can share one collective have equal keys; None: nothing to sum."""
        return None

    def all_reduce(self, t: Tensor) -> None:
        """Sum `t` in place over the ranks that hold shards of this param (a whole tensor: nothing to do)."""
        return

    def data_parallel_size(self) -> int | None:
        """How many ranks see different data, if the layout says (None: ask the default process group)."""
        return None

    def local_grad(self, param: Tensor, name: str) -> Tensor:
        """This rank's part of `param.grad`, to be paired element for element with `local(param)` (the plan
        checks the shapes)."""
        return local(param.grad)


class _Plain(Layout):
    """See `Layout`."""


PLAIN = _Plain()


class FlatPartition(Layout):
    """This rank's slice of a flat buffer, whose first element is element `offset` of the whole buffer."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def noise_place(self) -> tuple[int, int]:
        return self.offset, 0


class DTensorLayout(Layout):
    """A DTensor param's layout: its mesh and placements (FSDP2, HSDP, TP, torchtitan meshes)."""

    def __init__(self, param: DTensor) -> None:
        self.mesh, self.placements, self.shape = param.device_mesh, tuple(param.placements), tuple(param.shape)
        self._sharded_dims = tuple(dim for dim, placement in enumerate(self.placements) if placement.is_shard())

    def local(self, t: Tensor) -> Tensor:
        return _torch.local_tensor(t) if isinstance(t, DTensor) else t

    def around(self, local: Tensor, shape: tuple[int, ...]) -> Tensor:
        return _torch.dtensor_around(local, self.mesh, self.placements, shape)

    def noise_place(self) -> tuple[int, int]:
        """A local shard that is one contiguous range of the whole param (`Shard(0)`, HSDP) starts at the index of
        its first element, so it draws the unsharded param's noise; any other (tensor parallel `Shard(1)`) gets
        base 0 and a shard id from its offset, so that its ranks draw different noise."""
        if not math.prod(self.shape):
            return 0, 0
        local_shape, offset = _torch.local_shape_and_offset(self.shape, self.mesh, self.placements)
        if local_shape[1:] == self.shape[1:]:
            return offset[0] * math.prod(self.shape[1:]), 0
        strides = torch.empty(self.shape, device="meta").stride()
        return 0, 1 + sum(o * s for o, s in zip(offset, strides, strict=True)) % 0x7FFFFFFF

    def sum_key(self) -> Hashable | None:
        return (self.mesh, self._sharded_dims) if self._sharded_dims else None

    def all_reduce(self, t: Tensor) -> None:
        """Over each sharded mesh dim (HSDP's replicate dim holds copies: not summed). CPU-offloaded shards
        (FSDP2's CPUOffloadPolicy) on a GPU mesh go through the mesh's device: NCCL reduces only GPU tensors."""
        reduced = t if t.device.type == self.mesh.device_type else t.to(self.mesh.device_type)
        for dim in self._sharded_dims:
            dist.all_reduce(reduced, group=self.mesh.get_group(dim))
        if reduced is not t:
            t.copy_(reduced)

    def data_parallel_size(self) -> int | None:
        return mesh_data_parallel_size(self.mesh)

    def local_grad(self, param: Tensor, name: str) -> Tensor:
        grad = param.grad
        if not isinstance(grad, DTensor):
            raise ValueError(
                f"{name} is a DTensor with placements {self.placements}, but its grad is a plain tensor of shape "
                f"{tuple(grad.shape)}; set a DTensor grad laid out like the param, e.g. "
                "distribute_tensor(grad, param.device_mesh, param.placements)"
            )
        if grad.device_mesh != self.mesh or tuple(grad.placements) != self.placements:
            raise ValueError(
                f"{name} has placements {self.placements} on {self.mesh}, but its grad has {grad.placements} on "
                f"{grad.device_mesh}; redistribute the grad first: grad.redistribute(param.device_mesh, "
                "param.placements)"
            )
        return self.local(grad)


_declared: WeakIdKeyDictionary = WeakIdKeyDictionary()


def declare_flat_partition(tensor: Tensor, offset: int) -> None:
    """Declare `tensor` a flat partition whose first element is element `offset` of the whole flat buffer, for an
    engine whose partitions lion_dist cannot recognise (DeepSpeed ZeRO: `lion_dist.deepspeed` does this)."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"a flat partition's offset must be an int >= 0, got {offset!r}")
    if tensor.dim() != 1:
        raise ValueError(f"a flat partition is a 1-D tensor, got one of shape {tuple(tensor.shape)}")
    _declared[tensor] = FlatPartition(offset)


def declare_fsdp1(model: Any) -> None:
    """Declare where each original param's local view starts, for an FSDP1 model with `use_orig_params=True`
    (FSDP1's own flat params, `use_orig_params=False`, are recognised without this). Its views are plain tensors
    lion_dist cannot place by itself; declared, each draws the unsharded param's stochastic-rounding noise, and
    ranks never draw the same noise for different elements. Call it once after wrapping."""
    for param, start in _torch.fsdp1_views(model):
        _declared[param] = FlatPartition(start)


def of(param: Tensor) -> Layout:
    """The layout of `param`: a DTensor's, a declared or recognised flat partition, or `PLAIN`."""
    if isinstance(param, DTensor):
        return DTensorLayout(param)
    declared = _declared.get(param)
    if declared is not None:
        return declared
    offset = _torch.fsdp1_flat_offset(param)
    return PLAIN if offset is None else FlatPartition(offset)


def local(t: Tensor) -> Tensor:
    """This rank's elements of any tensor: a DTensor's local shard, else the tensor itself."""
    return _torch.local_tensor(t) if isinstance(t, DTensor) else t


def sum_over_shards(layouts: Sequence[Layout], values: Sequence[Tensor]) -> list[Tensor]:
    """Each `values[i]` (a 0-dim local count of param i) summed over the ranks holding shards of that param: one
    all-reduce per distinct `sum_key`, all of its tensors stacked into it; others keep their local value."""
    result = list(values)
    batches: dict[Hashable, list[int]] = defaultdict(list)
    for i, layout in enumerate(layouts):
        key = layout.sum_key()
        if key is not None:
            batches[key].append(i)
    for index in batches.values():
        stacked = torch.stack([values[i] for i in index])
        layouts[index[0]].all_reduce(stacked)
        for row, i in enumerate(index):
            result[i] = stacked[row]
    return result


def data_parallel_size(params: Iterable[Tensor] = ()) -> int:
    """How many ranks see different data: from the first DTensor param's mesh (HSDP: replicate x shard;
    torchtitan: dp_replicate x dp_shard, leaving out cp, tp, pp and the cp part of dp_shard_cp), else the default
    process group's size (1 without torch.distributed)."""
    for p in params:
        if isinstance(p, DTensor):
            return mesh_data_parallel_size(p.device_mesh)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
