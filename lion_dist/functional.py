"""`lion(...)`: one Lion step on given local tensors, dispatched by capability, with no optimizer and no cache.

The functional form of `lion_dist.Lion` (as `torch.optim.adamw.adamw` is of AdamW): every tensor goes to the
backend that `lion_dist.backends.select` picks for it, exactly as in the optimizer's plan, which caches this
routing and the backends' tables across steps instead of building them every call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lion_dist import backends
from lion_dist.backends import Entry, Need
from lion_dist.plan import staged_copy
from lion_dist.spec import LionHyperparams


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
    """Apply one Lion step, in place, to local tensors (param i is param id i for stochastic rounding).

    `means`: per-tensor cautious means (sharded params). `skip`: a 1-element int32 flag; when non-zero,
    nothing is written (the fused GPU kernel reads it on the device). `sr_seed`: stochastic rounding of bf16
    params, reproducible from the seed. `backend`: "auto" or a backend that must take every tensor.
    """
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(f"got {len(params)} params, {len(grads)} grads and {len(exp_avgs)} momenta")
    routes: dict[tuple[str, torch.device], list[int]] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        if not p.numel():
            continue
        need = Need(
            p.device.type,
            (p.dtype, g.dtype, m.dtype),
            cautious=hp.cautious,
            stochastic_rounding=sr_seed is not None and p.dtype == torch.bfloat16,
        )
        routes.setdefault((backends.select(backend, need), p.device), []).append(i)
    staged: list[tuple[Tensor, Tensor]] = []
    for (name, _), index in routes.items():
        implementation = backends.get(name)
        stage = (lambda t: t) if backends.capabilities(name).strided else (lambda t: staged_copy(t, staged))
        entries = [Entry(stage(params[i]), stage(exp_avgs[i]), grads[i].dtype, i) for i in index]
        implementation.step(
            implementation.prepare(entries),
            [grads[i].contiguous() for i in index],
            hp,
            skip=skip,
            sr_key=sr_seed,
            means=None if means is None else [means[i] for i in index],
        )
    for original, copy in staged:
        original.copy_(copy)
