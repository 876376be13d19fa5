"""`lion(...)`: one Lion step on given local tensors, dispatched by capability, with no optimizer and no cache.

The functional form of `lion_dist.Lion` (as `torch.optim.adamw.adamw` is of AdamW): every tensor goes to the
backend that `lion_dist.backends.select` picks for it (or the one named), exactly as in the optimizer's plan, which
caches this routing and the backends' tables across steps instead of building them every call. The arguments
are checked here, once for every backend: a fused kernel reads raw addresses, so a gradient on another device,
of another size or without storage of its own (a DTensor) must never reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lion_dist import backends
from lion_dist.backends import Entry, Need, NoisePlace, StepArgs
from lion_dist.formats.floats import FloatMomentum
from lion_dist.plan import staged_copy
from lion_dist.spec import FLOAT_DTYPES, LionHyperparams

_FLOAT = FloatMomentum(None)


def _check(i: int, p: Tensor, g: Tensor, m: Tensor) -> None:
    """Refuse a triple of tensors that cannot be stepped together, naming what is wrong and the fix."""
    for what, t in (("param", p), ("grad", g), ("momentum", m)):
        if isinstance(t, DTensor):
            raise TypeError(
                f"lion: the {what} of tensor {i} is a DTensor, whose data_ptr() is 0; pass local tensors "
                "(lion_dist.layouts.local(t)), or use lion_dist.Lion, which does"
            )
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"lion: the {what} of tensor {i} is {t.layout}; Lion needs dense (strided) tensors")
        if not (t.is_floating_point() or t.is_complex()) or t.dtype.to_real() not in FLOAT_DTYPES:
            raise TypeError(f"lion: the {what} of tensor {i} has dtype {t.dtype}; Lion takes fp32/bf16/fp16/fp64")
    if g.shape != p.shape or m.shape != p.shape:
        raise ValueError(
            f"lion: tensor {i} has param shape {tuple(p.shape)}, grad {tuple(g.shape)} and momentum "
            f"{tuple(m.shape)}; they must match element for element"
        )
    if not g.device == m.device == p.device:
        raise ValueError(
            f"lion: tensor {i}'s param, grad and momentum are on {p.device}, {g.device} and {m.device}; put them on "
            "one device"
        )


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def lion(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hp: LionHyperparams,
    *,
    backend: str = "auto",
    means: Sequence[Tensor] | None = None,
    skip: Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """Apply one Lion step, in place, to local tensors of any layout (param i is param id i for stochastic
    rounding; non-contiguous tensors reach a fused kernel through contiguous copies; empty ones are skipped).

    `means`: per-tensor cautious means (sharded params). `skip`: a 1-element int32 flag; when non-zero,
    nothing is written (the fused GPU kernel reads it on the device). `sr_seed`: stochastic rounding of bf16
    params, reproducible from the seed. `backend`: "auto" or a backend that must take every tensor.
    """
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(f"got {len(params)} params, {len(grads)} grads and {len(exp_avgs)} momenta")
    routes: dict[tuple[str, torch.device], list[int]] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        _check(i, p, g, m)
        if not p.numel():
            continue
        need = Need(
            p.device.type,
            (_real(p).dtype, _real(g).dtype, _real(m).dtype),
            cautious=hp.cautious,
            stochastic_rounding=sr_seed is not None and p.dtype == torch.bfloat16,
        )
        routes.setdefault((backends.select(backend, need), p.device), []).append(i)
    staged: list[tuple[Tensor, Tensor]] = []
    for (name, _), index in routes.items():
        implementation = backends.get(name)
        strided = implementation.capabilities().strided
        stage = (lambda t: t) if strided else (lambda t: staged_copy(t, staged))
        entries = [
            Entry(stage(_real(params[i])), (stage(_real(exp_avgs[i])),), _FLOAT, _real(grads[i]).dtype, NoisePlace(i))
            for i in index
        ]
        args = StepArgs(hp, skip=skip, sr_key=sr_seed, means=None if means is None else [means[i] for i in index])
        implementation.step(implementation.prepare(entries), [_real(grads[i]).contiguous() for i in index], args)
    for original, copy in staged:
        original.copy_(copy)
