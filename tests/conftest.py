"""What many test files share: exact comparison of tensors, and backend entries built as the plan builds them.

Import them by name (`from tests.conftest import assert_same, bits, entry`); pytest also loads this file first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lion_dist.backends import Entry, NoisePlace
from lion_dist.formats.floats import FloatMomentum
from lion_dist.formats.int8 import Int8Momentum


def bits(t: Tensor) -> Tensor:
    """A tensor's bit pattern (complex: its real view), every NaN made the same (NaN payloads are not specified),
    so that `torch.equal(bits(a), bits(b))` is bit-for-bit equality (-0.0 != 0.0) where NaN equals NaN."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.contiguous()
    if not t.is_floating_point():
        return t
    as_int = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return torch.where(t.isnan(), torch.full_like(as_int, -1), as_int)


def assert_same(got: Sequence[Tensor | None], expected: Sequence[Tensor | None]) -> None:
    """Each pair bit for bit (see `bits`), same dtype and shape; None only where None is expected."""
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g is None or e is None:
            assert g is e, f"tensor {i}: {g!r:.60} vs {e!r:.60}"
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, (i, g.dtype, e.dtype, tuple(g.shape), tuple(e.shape))
        same = torch.equal(bits(g), bits(e))
        assert same, f"tensor {i} ({g.dtype}, {tuple(g.shape)}) differs: {(bits(g) != bits(e)).nonzero()[:5].tolist()}"


def entry(
    param: Tensor,
    momentum: Tensor,
    grad_dtype: torch.dtype,
    param_id: int = 0,
    base: int = 0,
    shard: int = 0,
    *,
    scales: Tensor | None = None,
    block: int = 128,
    rounding: str = "stochastic",
    compensation: Tensor | None = None,
) -> Entry:
    """A backend entry as the plan makes it: a float momentum, or int8 codes (`momentum`) with their `scales`."""
    place = NoisePlace(param_id, base, shard)
    if scales is None:
        return Entry(param, (momentum,), FloatMomentum(None), grad_dtype, place, compensation)
    return Entry(param, (momentum, scales), Int8Momentum(block, rounding), grad_dtype, place, compensation)
