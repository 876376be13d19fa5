"""A param's optimizer state, and the one place it is created and converted.

A Lion state is the momentum `exp_avg`: a float tensor shaped like the param (its dtype, or the group's
`momentum_dtype`), or with `momentum_dtype=torch.int8` int8 codes shaped like the param plus `exp_avg_scale`,
fp32 scales of one per `int8_block_size` elements of each row (`spec.quantize_momentum`). A group with
`compensation=True` also keeps each bf16/fp16 param's rounding error in `compensation` (the param's dtype).

Blocks run along the last dim and never cross a row, so FSDP2's row shards (`Shard(0)`, uneven and empty
shards included) hold whole blocks: codes and scales are DTensors with the param's placements, the sharded
step equals the unsharded one bit for bit and checkpoints reshard exactly. A param keeps fp32 momentum when
int8 would not pay or not be exact (`int8_refusal`): below `spec.INT8_MIN_NUMEL` elements (the scales would
cost more than they save, as in bitsandbytes), and DTensors whose last dim is sharded (1-D ones included),
whose shards would split blocks. Flat partitions (FSDP1, DeepSpeed ZeRO) are plain 1-D tensors: their blocks
run over the rank's partition, so their state depends on the world size (reshard through
`Lion.dequantized_state_dict()`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from lion_dist import shards, spec

INT8 = torch.int8
COMPENSATED_DTYPES = (torch.bfloat16, torch.float16)
STATE_KEYS = ("exp_avg", "exp_avg_scale", "compensation")


def int8_refusal(p: Tensor) -> str | None:
    """Why param `p` keeps fp32 momentum in an int8 group (None: it is quantized)."""
    if p.is_complex():
        return "complex params keep complex64 momentum"
    if p.numel() < spec.INT8_MIN_NUMEL:
        return f"it has {p.numel()} < {spec.INT8_MIN_NUMEL} elements, too few for the scales to pay off"
    if isinstance(p, DTensor):
        last = p.dim() - 1
        if p.dim() < 2 or any(pl.is_shard(last) or pl.is_shard(-1) for pl in p.placements):
            return f"its last dim is sharded ({p.placements}), so its shards would split quantization blocks"
    return None


def is_int8(p: Tensor, group: dict[str, Any]) -> bool:
    return group["momentum_dtype"] == INT8 and int8_refusal(p) is None


def float_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of a float momentum: the group's `momentum_dtype` (fp32 for a param an int8 group does not
    quantize), else the param's; complex params keep a complex momentum."""
    dtype = group["momentum_dtype"]
    if dtype == INT8:
        dtype = torch.float32
    if dtype is None:
        return p.dtype
    return dtype.to_complex() if p.is_complex() else dtype


def _like(p: Tensor, local: Tensor, global_shape: tuple[int, ...]) -> Tensor:
    """`local` as this rank's part of a tensor of `global_shape` laid out like param `p` (a DTensor with its
    placements; `local` itself for a plain param)."""
    if not isinstance(p, DTensor):
        return local
    stride = torch.empty(global_shape, device="meta").stride()
    meta = TensorMeta(torch.Size(global_shape), stride, local.dtype)
    return DTensor(local, DTensorSpec(p.device_mesh, p.placements, tensor_meta=meta), requires_grad=False)


def quantized(p: Tensor, momentum: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(codes, scales) of a float momentum of `p`, rounded to nearest, laid out like `p`."""
    codes, scales = spec.quantize_momentum(shards.local(momentum).to(torch.float32), block)
    return _like(p, codes, tuple(p.shape)), _like(p, scales, spec.int8_scale_shape(p.shape, block))


def dequantized(p: Tensor, codes: Tensor, scales: Tensor, block: int) -> Tensor:
    """The fp32 momentum of int8 `codes` and `scales`, laid out like `p`."""
    return _like(p, spec.dequantize_momentum(shards.local(codes), shards.local(scales), block), tuple(p.shape))


def conform(p: Tensor, state: dict[str, Any], group: dict[str, Any], *, create: bool) -> None:
    """Make `state` what `group` asks for `p`, in place: quantize a float momentum for an int8 group (from
    lion-pytorch, `momentum_dtype=None`, or a `dequantized_state_dict`), dequantize an int8 one for a float
    group, cast a float one to the group's `momentum_dtype`, add or drop the compensation. `create` (a plan is
    built for a step): a param without momentum gets a zero one, and with `momentum_dtype=None` a float momentum
    put in the state keeps its dtype; else (a loaded state dict) a param stays without momentum, and a float
    momentum takes the param's dtype, as torch's `load_state_dict` casts it."""
    block = group["int8_block_size"]
    momentum = state.get("exp_avg")
    if momentum is None:
        if not create:
            return
        momentum = state["exp_avg"] = shards.new_momentum(p, float_dtype(p, group))
        if is_int8(p, group):
            state["exp_avg"], state["exp_avg_scale"] = quantized(p, momentum, block)
    elif is_int8(p, group):
        scales = state.get("exp_avg_scale")
        if scales is None:
            state["exp_avg"], state["exp_avg_scale"] = quantized(p, momentum, block)
        elif tuple(scales.shape) != spec.int8_scale_shape(p.shape, block):
            raise ValueError(
                f"the int8 momentum's scales have shape {tuple(scales.shape)}, but int8_block_size={block} needs "
                f"{spec.int8_scale_shape(p.shape, block)}; keep the block size a state was saved with, or load its "
                "Lion.dequantized_state_dict()"
            )
        elif momentum.dtype != INT8:  # codes cast to a float dtype by torch's load_state_dict
            state["exp_avg"] = momentum.to(INT8)
    elif "exp_avg_scale" in state:
        state["exp_avg"] = dequantized(p, momentum, state.pop("exp_avg_scale"), block).to(float_dtype(p, group))
    elif group["momentum_dtype"] is not None or not create:
        state["exp_avg"] = momentum.to(float_dtype(p, group))
    wants_compensation = group["compensation"] and p.dtype in COMPENSATED_DTYPES
    if wants_compensation and "compensation" not in state:
        state["compensation"] = shards.new_momentum(p, p.dtype)
    elif not wants_compensation:
        state.pop("compensation", None)


def dequantized_state(p: Tensor, state: dict[str, Any], block: int) -> dict[str, Any]:
    """`state` with an int8 momentum as fp32 `exp_avg` (a copy; other states as they are)."""
    if "exp_avg_scale" not in state:
        return state
    rest = {k: v for k, v in state.items() if k not in ("exp_avg", "exp_avg_scale")}
    return {"exp_avg": dequantized(p, state["exp_avg"], state["exp_avg_scale"], block), **rest}


def state_bytes(state: dict[str, Any]) -> int:
    """This rank's bytes of one param's state: momentum (codes), scales and compensation."""
    return sum(shards.local(t).numel() * t.element_size() for k in STATE_KEYS if isinstance(t := state.get(k), Tensor))
