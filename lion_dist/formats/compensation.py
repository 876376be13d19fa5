"""The Kahan compensation buffer: a companion of any momentum format, for bf16/fp16 params.

With `compensation=True` each bf16/fp16 param keeps its last rounding error in `state["compensation"]` (its own
dtype, laid out like it) and adds it back at the next step, so small updates that bf16 would round away add up,
as fp32 master weights would make them, for 2 bytes per param instead of 4 + 2 (`spec.write_back`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lion_dist.layouts import Layout

KEY = "compensation"
DTYPES = (torch.bfloat16, torch.float16)


def wanted(param: Tensor, group: Mapping[str, Any]) -> bool:
    return bool(group["compensation"]) and param.dtype in DTYPES


def zeros(param: Tensor, layout: Layout) -> Tensor:
    local = torch.zeros_like(layout.local(param), memory_format=torch.contiguous_format)
    return layout.around(local, tuple(param.shape))


def check(param: Tensor, state: Mapping[str, Any], where: str) -> None:
    buffer = state.get(KEY)
    if buffer is None:
        return
    if not isinstance(buffer, Tensor) or not buffer.is_floating_point() or buffer.shape != param.shape:
        raise ValueError(
            f"state for {where}: compensation must be a float tensor shaped as the param {tuple(param.shape)}, "
            f"got {buffer!r:.80}"
        )


def conform(param: Tensor, state: dict[str, Any], group: Mapping[str, Any], layout: Layout) -> None:
    """Add a zero buffer where the group wants one, drop it where not, keep the param's dtype."""
    if not wanted(param, group):
        state.pop(KEY, None)
    elif KEY not in state:
        state[KEY] = zeros(param, layout)
    elif state[KEY].dtype != param.dtype:  # cast to the param's dtype by torch's load_state_dict: already so
        state[KEY] = state[KEY].to(param.dtype)
