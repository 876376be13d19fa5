"""8-bit momentum: int8 codes shaped like the param (`exp_avg`) and fp32 scales (`exp_avg_scale`), one per
`int8_block_size` elements along the last dim (`spec.quantize_momentum`): 1 + 4 / block bytes per element.

Blocks never cross a row, so FSDP2's row shards (`Shard(0)`, uneven and empty shards included) hold whole blocks:
codes and scales are DTensors with the param's placements, the sharded step equals the unsharded one bit for bit
and checkpoints reshard exactly. A param keeps fp32 momentum where int8 would not pay or not be exact
(`refusal`): below `spec.INT8_MIN_NUMEL` elements (the scales would cost more than they save, as in bitsandbytes),
complex params, and DTensors whose last dim is sharded (1-D ones included), whose shards would split blocks. Flat
partitions (FSDP1, DeepSpeed ZeRO) are plain 1-D tensors: their blocks run over the rank's partition, so their
state depends on the world size (reshard through `Lion.dequantized_state_dict()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lion_dist import formats, spec
from lion_dist.formats.floats import FloatMomentum
from lion_dist.layouts import Layout

CODES, SCALES = "exp_avg", "exp_avg_scale"
MAX_BLOCK = 1024
ROUNDINGS = spec.INT8_ROUNDINGS


def refusal(param: Tensor) -> str | None:
    """Why `param` keeps fp32 momentum in an int8 group (None: it is quantized)."""
    if param.is_complex():
        return "complex params keep complex64 momentum"
    if param.numel() < spec.INT8_MIN_NUMEL:
        return f"it has {param.numel()} < {spec.INT8_MIN_NUMEL} elements, too few for the scales to pay off"
    if isinstance(param, DTensor):
        last = param.dim() - 1
        if param.dim() < 2 or any(pl.is_shard(last) or pl.is_shard(-1) for pl in param.placements):
            return f"its last dim is sharded ({param.placements}), so its shards would split quantization blocks"
    return None


class Int8Momentum(formats.MomentumFormat):
    """Block-linear int8: `m = code * scale`, `scale = absmax / 127` per block; requantized each step, to nearest
    or stochastically (`rounding`; the noise stream is the param's with `spec.MOMENTUM_STREAM`)."""

    name = "int8"
    kind = "int8"
    keys = (CODES, SCALES)

    def __init__(self, block: int = spec.INT8_BLOCK, rounding: str = "stochastic") -> None:
        self.block, self.rounding = block, rounding
        self.stochastic = rounding == "stochastic"

    def for_param(self, param: Tensor) -> formats.MomentumFormat:
        return self if refusal(param) is None else FLOAT32

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return spec.int8_scale_shape(tuple(shape), self.block)

    def zeros(self, param: Tensor, layout: Layout) -> dict[str, Tensor]:
        local_p = layout.local(param)
        codes = torch.zeros_like(local_p, dtype=torch.int8, memory_format=torch.contiguous_format)
        scales = torch.zeros(self.scale_shape(local_p.shape), dtype=torch.float32, device=local_p.device)
        return {
            CODES: layout.around(codes, tuple(param.shape)),
            SCALES: layout.around(scales, self.scale_shape(param.shape)),
        }

    def decode(self, state: Sequence[Tensor]) -> Tensor:
        codes, scales = state
        return spec.dequantize_momentum(codes, scales, self.block)

    def encode(self, state: Sequence[Tensor], momentum: Tensor, noise: Tensor | None) -> None:
        codes, scales = state
        new_codes, new_scales = spec.quantize_momentum(momentum, self.block, noise)
        codes.copy_(new_codes)
        scales.copy_(new_scales)

    def holds(self, param: Tensor, state: Mapping[str, Any]) -> bool:
        codes, scales = state.get(CODES), state.get(SCALES)
        return (
            isinstance(codes, Tensor)
            and isinstance(scales, Tensor)
            and tuple(codes.shape) == tuple(param.shape)
            and tuple(scales.shape) == self.scale_shape(param.shape)
        )

    def check(self, param: Tensor, state: Mapping[str, Any], where: str) -> None:
        codes, scales = state.get(CODES), state.get(SCALES)
        if not isinstance(codes, Tensor) or codes.dtype != torch.int8 or codes.shape != param.shape:
            raise TypeError(f"state for {where}: an int8 momentum's exp_avg must be int8 codes shaped as the param")
        expected = self.scale_shape(param.shape)
        if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != expected:
            raise ValueError(
                f"state for {where}: exp_avg_scale must be fp32 of shape {expected} (int8_block_size={self.block}), "
                f"got {scales!r:.80}; keep the block size a state was saved with, or load its "
                "Lion.dequantized_state_dict()"
            )

    def normalize(self, param: Tensor, state: dict[str, Any], *, loaded: bool) -> None:
        if state[CODES].dtype != torch.int8:  # codes cast to a float dtype by torch's load_state_dict
            state[CODES] = state[CODES].to(torch.int8)


FLOAT32 = FloatMomentum(torch.float32)

formats.register("int8", lambda group: Int8Momentum(group["int8_block_size"], group["int8_rounding"]))
