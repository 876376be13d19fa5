"""The foreach backend: the spec's math with torch's multi-tensor `torch._foreach_*` ops, on any device.

Equal to `spec.lion_reference` bit for bit (same math dtype, same roundings), for every float dtype, strided
tensors, cautious Lion, stochastic rounding, Kahan compensation and int8 momentum (dequantized into fp32
temporaries, stepped, requantized: `spec.lion_reference_int8`); it reads and writes each tensor several times,
which the fused backends avoid. Tensors are bucketed once per plan by device and (param, grad, momentum) dtypes,
since each foreach call takes one dtype.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lion_dist import spec
from lion_dist.backends import Backend, Entry, sr_noise
from lion_dist.spec import DeviceKey, LionHyperparams


@dataclass
class _Prepared:
    entries: list[Entry]
    buckets: list[list[int]]  # entry indices of one device and dtype triple


def _to(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The tensors in `dtype`: the same tensors when they already are (then updates write through)."""
    return list(tensors) if tensors[0].dtype == dtype else [t.to(dtype) for t in tensors]


def _directions(entries: Sequence[Entry], grads: Sequence[Tensor], hp: LionHyperparams) -> tuple[list, list]:
    """For one bucket: `u = sign(b1 * m + (1 - b1) * g) + 0 * c` (a NaN or Inf in c stays visible as NaN) and
    the math-dtype gradients; each momentum advances in place, `m <- b2 * m + (1 - b2) * g`."""
    compute = spec.math_dtype(entries[0].param.dtype)
    g = _to(grads, compute)
    if hp.maximize:
        g = torch._foreach_neg(g)
    exp_avgs = [e.exp_avg for e in entries]
    m = _to(exp_avgs, compute)
    c = torch._foreach_mul(m, hp.beta1)
    torch._foreach_add_(c, g, alpha=1 - hp.beta1)
    u = list(torch._foreach_sign(c))
    torch._foreach_add_(u, torch._foreach_mul(c, 0.0))
    torch._foreach_mul_(m, hp.beta2)
    torch._foreach_add_(m, g, alpha=1 - hp.beta2)
    if m[0] is not exp_avgs[0]:
        torch._foreach_copy_(exp_avgs, m)
    return u, g


def _apply(
    entries: Sequence[Entry], directions: Sequence[Tensor], hp: LionHyperparams, sr_key: int | DeviceKey | None
) -> None:
    """`p <- p * (1 - lr * wd) - lr * u` for the directions `u` (in the math dtype), written back in place."""
    params = [e.param for e in entries]
    p = _to(params, directions[0].dtype)  # params already in the math dtype are updated in place
    if entries[0].compensation is not None:  # a bucket is all compensated or none (bf16/fp16: p is a copy)
        torch._foreach_add_(p, _to([e.compensation for e in entries], directions[0].dtype))
    if hp.weight_decay != 0:
        if hp.cautious_wd:
            for pi, u in zip(p, directions, strict=True):
                pi.copy_(torch.where(u * pi > 0, pi * hp.decay, pi))
        else:
            torch._foreach_mul_(p, hp.decay)
    torch._foreach_add_(p, list(directions), alpha=-hp.lr_value)
    if p[0] is not params[0]:
        for entry, value in zip(entries, p, strict=True):
            spec.write_back(entry.param, value, entry.noise(sr_key), entry.compensation)


class ForeachBackend(Backend):
    name = "foreach"

    def prepare(self, entries: Sequence[Entry]) -> _Prepared:
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, e in enumerate(entries):
            kind = (e.param.device, e.param.dtype, e.grad_dtype, e.exp_avg.dtype, e.compensation is not None)
            buckets[kind].append(i)
        return _Prepared(list(entries), list(buckets.values()))

    def step(
        self,
        prepared: _Prepared,
        grads: Sequence[Tensor],
        hp: LionHyperparams,
        *,
        skip: Tensor | None = None,
        sr_key: int | DeviceKey | None = None,
        means: Sequence[Tensor] | None = None,
        quant_key: int | DeviceKey | None = None,
    ) -> None:
        if skip is not None and bool(skip):
            return
        for index in prepared.buckets:
            quantized = [prepared.entries[i] for i in index]
            entries = _dequantized(quantized)
            u, g = _directions(entries, [grads[i] for i in index], hp)
            if hp.cautious_factor is not None:
                u = _cautious(u, g, hp, None if means is None else [means[i] for i in index])
            _apply(entries, u, hp, sr_key)
            if entries is not quantized:
                _requantize(quantized, entries, quant_key)

    def direction(self, prepared: _Prepared, grads: Sequence[Tensor], hp: LionHyperparams) -> list[Tensor]:
        result: list[Tensor] = list(grads)  # replaced entry by entry
        for index in prepared.buckets:
            u, _ = _directions([prepared.entries[i] for i in index], [grads[i] for i in index], hp)
            for i, ui in zip(index, u, strict=True):
                result[i] = ui
        return result

    def apply(
        self, prepared: _Prepared, directions: Sequence[Tensor], hp: LionHyperparams, sr_key: int | DeviceKey | None
    ) -> None:
        for index in prepared.buckets:
            _apply([prepared.entries[i] for i in index], [directions[i] for i in index], hp, sr_key)


def _dequantized(entries: list[Entry]) -> list[Entry]:
    """A bucket of int8-momentum entries with fp32 momenta in place of the codes (the entries themselves when
    their momenta are float): the step then runs as for fp32 momenta, and `_requantize` stores the result."""
    if entries[0].scales is None:
        return entries
    return [e._replace(exp_avg=spec.dequantize_momentum(e.exp_avg, e.scales, e.block)) for e in entries]


def _requantize(quantized: list[Entry], stepped: list[Entry], quant_key: int | DeviceKey | None) -> None:
    for e, done in zip(quantized, stepped, strict=True):
        stream = e.momentum_noise(quant_key)
        noise = None if stream is None else sr_noise(stream, e.exp_avg.numel(), e.exp_avg.device)
        codes, scales = spec.quantize_momentum(done.exp_avg, e.block, noise)
        e.exp_avg.copy_(codes)
        e.scales.copy_(scales)


def _cautious(u: list[Tensor], g: list[Tensor], hp: LionHyperparams, means: Sequence[Tensor] | None) -> list[Tensor]:
    """`u * s / max(mean(s), 1e-5)`, s = 1 where u * g > 0, else the cautious factor; `means` from the caller
    (a sharded param's mean over the whole tensor), else each local tensor's own."""
    factor = hp.cautious_factor
    result = []
    for i, (ui, gi) in enumerate(zip(u, g, strict=True)):
        aligned = (ui * gi) > 0
        mean = spec.cautious_mean(aligned.sum(), aligned.numel(), factor) if means is None else means[i]
        s = torch.where(aligned, 1.0, factor).to(torch.float32)
        result.append(ui * (s / mean).to(ui.dtype))
    return result


BACKEND = ForeachBackend()
