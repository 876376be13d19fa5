"""Every private torch attribute lion_dist uses, in one place, each where no public API does the job.

Checked against torch 2.11 and 2.13 (the versions CI runs). A torch upgrade that moves one of these breaks this
module's tests (`tests/test_layouts.py`), not a silent wrong step elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement
from torch.optim import Optimizer


def local_tensor(t: DTensor) -> Tensor:
    """A DTensor's local shard itself. Public `to_local()` returns a new view object on every call (torch 2.11,
    2.13), which costs a step of thousands of params a few ms and breaks the plan's identity check (FSDP2 swaps
    the local tensor when it reshards)."""
    return t._local_tensor


def spec(t: Tensor) -> Any:
    """A DTensor's spec object (None for a plain tensor). FSDP2 hands the optimizer gradients that share their
    param's spec object, so `is` checks a step's layout in one pointer compare; the public `device_mesh` and
    `placements` are the fallback the plan compares when the objects differ."""
    return getattr(t, "_spec", None)


def dtensor_around(
    local: Tensor, mesh: DeviceMesh, placements: tuple[Placement, ...], shape: tuple[int, ...]
) -> DTensor:
    """A DTensor with global `shape` (contiguous strides) whose local shard is `local` itself, on `local`'s own
    device. `DTensor.from_local(..., shape=, stride=)` would move a CPU shard (FSDP2's CPUOffloadPolicy) to the
    mesh's device type (torch 2.11, 2.13), so the spec is built as FSDP2 builds its sharded params."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    stride = torch.empty(shape, device="meta").stride()
    meta = TensorMeta(torch.Size(shape), stride, local.dtype)
    return DTensor(local, DTensorSpec(mesh, tuple(placements), tensor_meta=meta), requires_grad=False)


def local_shape_and_offset(
    shape: tuple[int, ...], mesh: DeviceMesh, placements: tuple[Placement, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's local shape and the global index of its first element along each dim (no public API)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(local_shape), tuple(offset)


def root_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh `mesh` was sliced from (itself if none): torchtitan's flattened `dp_shard_cp` only says its cp
    part there."""
    return mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh


def load_state_dict_pre_hooks(optimizer: Optimizer) -> dict[int, Any]:
    """The optimizer's load-state-dict pre-hooks: `Lion.load_state_dict` runs them before it checks what they
    return, then calls torch's `load_state_dict` with them set aside (torch offers no way to run them alone)."""
    return optimizer._optimizer_load_state_dict_pre_hooks


def set_load_state_dict_pre_hooks(optimizer: Optimizer, hooks: dict[int, Any]) -> None:
    optimizer._optimizer_load_state_dict_pre_hooks = hooks


def fsdp1_flat_offset(t: Tensor) -> int | None:
    """For FSDP1's `FlatParameter` (`use_orig_params=False`), the index of its local shard's first element in the
    whole padded flat parameter; None for any other tensor. Every rank's shard has the same padded size, so the
    offset is the rank's position times that size, read from the shard's own metadata: the first original param
    in the shard starts `offset_in_shard` into it, at its element `intra_param_start_idx`."""
    from torch.distributed.fsdp._flat_param import FlatParameter

    if not isinstance(t, FlatParameter) or not hasattr(t, "_shard_param_infos"):
        return None
    starts, total = [], 0
    for numel, is_padding in zip(t._numels_with_padding, t._is_padding_mask, strict=True):
        if not is_padding:
            starts.append(total)
        total += numel
    for start, info in zip(starts, t._shard_param_infos, strict=True):
        if info.in_shard:
            return start + info.intra_param_start_idx - info.offset_in_shard
    return None


def fsdp1_views(model: Any) -> list[tuple[Tensor, int]]:
    """For every original param of an FSDP1 model with `use_orig_params=True` that holds elements on this rank,
    (the param, the index in the whole original param of its local view's first element): its handles' flat
    params list the original params and where each shard starts in them (no public API says)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    views = []
    for module in model.modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FullyShardedDataParallel) else None
        flat = getattr(handle, "flat_param", None)
        if flat is None or getattr(flat, "_params", None) is None:
            continue
        for param, info in zip(flat._params, flat._shard_param_infos, strict=True):
            if info.in_shard:
                views.append((param, info.intra_param_start_idx))
    return views
