"""Float momentum: one tensor `exp_avg` in the param's dtype (`momentum_dtype=None`), fp32 or bf16.

The math reads and writes it directly (`float_dtype`), on every backend. A complex param's momentum is complex
(its dtype, or complex64 for fp32) as torch's optimizers keep it, or with bf16 its real view: a bf16 tensor of
shape `(*param.shape, 2)`, which is what the update sees anyway (Lion is element-wise; real and imaginary parts
are elements of their own). A float momentum of a complex param, converted, is that real view in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lion_dist import formats
from lion_dist.layouts import Layout

KEY = "exp_avg"


class FloatMomentum(formats.MomentumFormat):
    """`exp_avg` in `dtype` (None: the param's own dtype)."""

    kind = "float"
    keys = (KEY,)

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.name = "param" if dtype is None else formats.name_of(dtype)

    def float_dtype(self, param: Tensor) -> torch.dtype:
        """The stored dtype (complex params: complex, or bf16 for their real view)."""
        if self.dtype is None:
            return param.dtype
        if param.is_complex() and self.dtype == torch.float32:
            return torch.complex64
        return self.dtype

    def shape(self, param: Tensor) -> tuple[int, ...]:
        real_view = param.is_complex() and not self.float_dtype(param).is_complex
        return (*param.shape, 2) if real_view else tuple(param.shape)

    def zeros(self, param: Tensor, layout: Layout) -> dict[str, Tensor]:
        local_p = layout.local(param)
        dtype = self.float_dtype(param)
        if param.is_complex() and not dtype.is_complex:
            local = torch.zeros((*local_p.shape, 2), dtype=dtype, device=local_p.device)
        else:
            local = torch.zeros_like(local_p, dtype=dtype, memory_format=torch.contiguous_format)
        return {KEY: layout.around(local, self.shape(param))}

    def decode(self, state: Sequence[Tensor]) -> Tensor:
        (momentum,) = state
        return torch.view_as_real(momentum) if momentum.is_complex() else momentum

    def encode(self, state: Sequence[Tensor], momentum: Tensor, noise: Tensor | None) -> None:
        self.decode(state).copy_(momentum)

    def holds(self, param: Tensor, state: Mapping[str, Any]) -> bool:
        """Any float `exp_avg` of the param's shape (or a complex param's real view) and no int8 scales: a
        float dtype other than this format's is cast by `normalize`."""
        m = state.get(KEY)
        if not isinstance(m, Tensor) or not (m.is_floating_point() or m.is_complex()) or len(state.keys() & _INT8):
            return False
        if param.is_complex():
            return tuple(m.shape) == tuple(param.shape) if m.is_complex() else tuple(m.shape) == (*param.shape, 2)
        return not m.is_complex() and tuple(m.shape) == tuple(param.shape)

    def check(self, param: Tensor, state: Mapping[str, Any], where: str) -> None:
        m = state.get(KEY)
        if not isinstance(m, Tensor) or not (m.is_floating_point() or m.is_complex()):
            raise TypeError(
                f"state for {where}: exp_avg must be a floating-point tensor (or int8 codes with their "
                f"exp_avg_scale), got {m!r:.80}"
            )
        if m.is_complex() and not param.is_complex():
            raise TypeError(f"state for {where}: exp_avg is {m.dtype}, the param {param.dtype}")
        if not self.holds(param, state):
            raise ValueError(
                f"state for {where}: exp_avg has shape {tuple(m.shape)}, the param has {tuple(param.shape)} (was the "
                "state saved for another model?)"
            )

    def normalize(self, param: Tensor, state: dict[str, Any], *, loaded: bool) -> None:
        """Cast to this format's dtype. With `momentum_dtype=None` a momentum put in the state by hand keeps its
        float dtype when a step plans it, while a loaded one takes the param's dtype, as torch casts it."""
        m = state[KEY]
        if self.dtype is None and not loaded and m.is_complex() == param.is_complex():
            return
        dtype = self.float_dtype(param)
        if m.dtype == dtype and m.is_complex() == dtype.is_complex:
            return
        real = torch.view_as_real(m) if m.is_complex() else m
        if dtype.is_complex:
            state[KEY] = torch.view_as_complex(real.to(dtype.to_real()).contiguous())
        else:
            state[KEY] = real.to(dtype)


_INT8 = {"exp_avg_scale"}

formats.register("param", lambda group: FloatMomentum(None))
formats.register("float32", lambda group: FloatMomentum(torch.float32))
formats.register("bfloat16", lambda group: FloatMomentum(torch.bfloat16))
