"""The foreach backend: the spec's math with torch's multi-tensor `torch._foreach_*` ops, on any device.

Equal to `spec.lion_reference` bit for bit (same math dtype, same roundings), for every float dtype, strided
tensors, cautious Lion, stochastic rounding, Kahan compensation and every momentum format: a float momentum is
updated in place, any other is decoded into fp32 temporaries, stepped and encoded again (for int8 that is
`spec.lion_reference_int8`). It reads and writes each tensor several times, which the fused backends avoid.
Tensors are bucketed once per plan by device, dtypes and format, since each foreach call takes one dtype.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lion_dist import spec
from lion_dist.backends import TORCH_OPS, Backend, Capabilities, Entry, StepArgs, sr_noise
from lion_dist.spec import DeviceKey, LionHyperparams


@dataclass
class _Prepared:
    entries: list[Entry]
    buckets: list[list[int]]  # entry indices of one device, dtypes, format and compensation


def _to(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The tensors in `dtype`: the same tensors when they already are (then updates write through)."""
    return list(tensors) if tensors[0].dtype == dtype else [t.to(dtype) for t in tensors]


def _momenta(entries: Sequence[Entry]) -> list[Tensor]:
    """A bucket's momenta as the math reads and writes them: float momenta themselves, others decoded to fp32."""
    if entries[0].format.float_dtype(entries[0].param) is not None:
        return [e.exp_avg for e in entries]
    return [e.format.decode(e.state).float() for e in entries]


def _store(entries: Sequence[Entry], momenta: Sequence[Tensor], quant_key: int | DeviceKey | None) -> None:
    """Write decoded momenta back in their format (float momenta were updated in place)."""
    if entries[0].format.float_dtype(entries[0].param) is not None:
        return
    for e, m in zip(entries, momenta, strict=True):
        stream = e.momentum_noise(quant_key)
        e.format.encode(e.state, m, None if stream is None else sr_noise(stream, m.numel(), m.device))


def _directions(
    entries: Sequence[Entry], momenta: list[Tensor], grads: Sequence[Tensor], hp: LionHyperparams
) -> tuple[list, list]:
    """For one bucket: `u = sign(b1 * m + (1 - b1) * g) + 0 * c` (a NaN or Inf in c stays visible as NaN) and
    the math-dtype gradients; each momentum advances in place, `m <- b2 * m + (1 - b2) * g`."""
    compute = spec.math_dtype(entries[0].param.dtype)
    g = _to(grads, compute)
    if hp.maximize:
        g = torch._foreach_neg(g)
    m = _to(momenta, compute)
    c = torch._foreach_mul(m, hp.beta1)
    torch._foreach_add_(c, g, alpha=1 - hp.beta1)
    u = list(torch._foreach_sign(c))
    torch._foreach_add_(u, torch._foreach_mul(c, 0.0))
    torch._foreach_mul_(m, hp.beta2)
    torch._foreach_add_(m, g, alpha=1 - hp.beta2)
    if m[0] is not momenta[0]:
        torch._foreach_copy_(momenta, m)
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


class ForeachBackend(Backend):
    name = "foreach"

    def capabilities(self) -> Capabilities:
        return TORCH_OPS

    def prepare(self, entries: Sequence[Entry]) -> _Prepared:
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, e in enumerate(entries):
            kind = (e.param.device, e.param.dtype, e.grad_dtype, e.format.name, e.format.float_dtype(e.param))
            buckets[(*kind, tuple(t.dtype for t in e.state), e.compensation is not None)].append(i)
        return _Prepared(list(entries), list(buckets.values()))

    def step(self, prepared: _Prepared, grads: Sequence[Tensor], args: StepArgs) -> None:
        if args.skipped:
            return
        for index in prepared.buckets:
            entries = [prepared.entries[i] for i in index]
            momenta = _momenta(entries)
            u, g = _directions(entries, momenta, [grads[i] for i in index], args.hp)
            if args.hp.cautious_factor is not None:
                u = _cautious(u, g, args.hp, None if args.means is None else [args.means[i] for i in index])
            _apply(entries, u, args.hp, args.sr_key)
            _store(entries, momenta, args.quant_key)

    def direction(self, prepared: _Prepared, grads: Sequence[Tensor], args: StepArgs) -> list[Tensor]:
        result: list[Tensor] = list(grads)  # replaced entry by entry
        for index in prepared.buckets:
            entries = [prepared.entries[i] for i in index]
            momenta = _momenta(entries)
            u, _ = _directions(entries, momenta, [grads[i] for i in index], args.hp)
            _store(entries, momenta, args.quant_key)
            for i, ui in zip(index, u, strict=True):
                result[i] = ui
        return result

    def apply(self, prepared: _Prepared, directions: Sequence[Tensor], args: StepArgs) -> None:
        for index in prepared.buckets:
            _apply([prepared.entries[i] for i in index], [directions[i] for i in index], args.hp, args.sr_key)


BACKEND = ForeachBackend()
