"""The Lion update as plain functions over local tensors: the reference, the foreach path, and the dispatcher.

The spec (Chen et al. 2023, arXiv 2302.06675, Program 1), per element, all math in fp32:

    p <- p * (1 - lr * wd)            (cautious_wd: only where u * p > 0)
    c <- b1 * m + (1 - b1) * g
    u <- sign(c)                      (sign(0) = 0: zero padding and frozen rows never move;
                                       NaN where c is NaN or Inf, see below)
    u <- u * s / max(mean(s), 1e-5)   (cautious only: s = 1 where u * g > 0, else the cautious factor)
    p <- p - lr * u
    m <- b2 * m + (1 - b2) * g

`lion_reference` writes that down one tensor at a time and is what every other path is tested against.
Rounding is pinned down so that paths can agree bit for bit: `x * a + y * b` is `fma(y, b, x * a)`
(torch's `add(y, alpha=b)` and Triton's `tl.fma`), scalars enter the math as fp32, and `mean(s)` is computed
from the count of aligned elements, which makes it exact and independent of how a tensor is sharded.
`torch.sign(NaN)` is 0, which would silently freeze a coordinate whose gradient was NaN; every path here
computes `sign(c) + 0 * c` instead, so a non-finite value becomes a visible NaN in the param (the optimizer's
`nonfinite` policy normally catches it before the update).

No function here knows about torch.distributed: they take local tensors (see `shards.py`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BACKENDS = ("auto", "reference", "foreach", "triton", "cpu_fused")


@dataclass(frozen=True)
class LionHyperparams:
    """One param group's hyperparameters, resolved for this step.

    `weight_decay` is the coefficient that multiplies `lr`; with decoupled weight decay the optimizer has
    already divided it by the group's initial lr, exactly as lion-pytorch does.
    """

    lr: float
    beta1: float
    beta2: float
    weight_decay: float = 0.0
    maximize: bool = False
    cautious_factor: float | None = None
    cautious_wd: bool = False

    @property
    def decay(self) -> float:
        """The multiplier of decoupled weight decay, `1 - lr * wd`, computed in double as lion-pytorch does."""
        return 1.0 - self.lr * self.weight_decay


def cautious_mean(aligned_count: Tensor, numel: int, factor: float) -> Tensor:
    """`max(mean(s), 1e-5)` for `s = where(aligned, 1, factor)`, from the number of aligned elements.

    Computed in fp64 from the count and rounded once to fp32, so a sharded tensor (counts summed over
    ranks) gets exactly the value of the unsharded one. It equals `torch.mean(s)` whenever torch's fp32
    sum of `s` is exact (e.g. factor 0 or 0.5 and fewer than 2**23 elements); otherwise ours is the
    correctly rounded mean.
    """
    count = aligned_count.to(torch.float64)
    mean = (count + factor * (numel - count)) / numel
    return mean.clamp(min=1e-5).to(torch.float32)


def round_to_bf16_stochastic(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 -> bf16 with stochastic rounding: add 16 random low bits, then truncate. Unbiased in expectation."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    # Inf and NaN keep their value (adding noise could turn an Inf into a NaN or flip a NaN's payload).
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def stochastic_rounding_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _write_back(dst: Tensor, src32: Tensor, sr_generator: torch.Generator | None) -> None:
    if sr_generator is not None and dst.dtype == torch.bfloat16:
        dst.copy_(round_to_bf16_stochastic(src32, sr_generator))
    else:
        dst.copy_(src32)


def lion_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hp: LionHyperparams,
    *,
    mean: Tensor | None = None,
    sr_generator: torch.Generator | None = None,
) -> None:
    """One Lion step on one tensor, in place, written plainly from the paper.

    `mean` overrides the cautious mean(s) (a sharded param passes the mean over its whole tensor).
    `sr_generator` turns on stochastic rounding for bf16 params.
    """
    p = param.float()
    g = grad.float()
    m = exp_avg.float()
    if hp.maximize:
        g = -g

    c = m.mul(hp.beta1).add_(g, alpha=1 - hp.beta1)
    u = c.sign().add_(c * 0)
    if hp.cautious_factor is not None:
        aligned = (u * g) > 0
        if mean is None:
            mean = cautious_mean(aligned.sum(), aligned.numel(), hp.cautious_factor)
        s = torch.where(aligned, 1.0, hp.cautious_factor).to(torch.float32)
        u = u * (s / mean)

    if hp.weight_decay != 0:
        decayed = p * hp.decay
        p = torch.where(u * p > 0, decayed, p) if hp.cautious_wd else decayed
    p = p.add(u, alpha=-hp.lr)
    m = m.mul(hp.beta2).add_(g, alpha=1 - hp.beta2)

    _write_back(param, p, sr_generator)
    exp_avg.copy_(m)


def cautious_aligned_counts(grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], hp: LionHyperparams) -> list[Tensor]:
    """Per tensor, the number of elements where the Lion direction agrees with the gradient (u * g > 0).

    The first pass of cautious Lion: a sharded tensor sums these over its shards before `cautious_mean`.
    """
    counts = []
    for g, m in zip(grads, exp_avgs, strict=True):
        g32 = g.float().neg() if hp.maximize else g.float()
        u = m.float().mul(hp.beta1).add_(g32, alpha=1 - hp.beta1).sign_()
        counts.append(((u * g32) > 0).sum())
    return counts


def apply_direction(
    params: Sequence[Tensor], directions: Sequence[Tensor], hp: LionHyperparams, sr_generator: torch.Generator | None
) -> None:
    """`p <- p * (1 - lr * wd) - lr * u` for given fp32 directions `u`, with foreach ops, in place on `params`.

    The param half of a Lion step, shared by the foreach path and Distributed Lion (whose `u` is a vote).
    """
    p32 = [p.float() for p in params]  # fp32 params alias themselves and are updated in place
    if hp.weight_decay != 0:
        if hp.cautious_wd:
            for p, u in zip(p32, directions, strict=True):
                p.copy_(torch.where(u * p > 0, p * hp.decay, p))
        else:
            torch._foreach_mul_(p32, hp.decay)
    torch._foreach_add_(p32, directions, alpha=-hp.lr)
    for p, p_new in zip(params, p32, strict=True):
        if p_new is not p:
            _write_back(p, p_new, sr_generator)


def _lion_foreach_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hp: LionHyperparams,
    means: list[Tensor] | None,
    sr_generator: torch.Generator | None,
) -> None:
    """Lion over tensors of one device and one (param, grad, momentum) dtype triple, with torch._foreach ops."""
    fp32 = torch.float32
    m32 = exp_avgs if exp_avgs[0].dtype == fp32 else [m.float() for m in exp_avgs]
    g32 = grads if grads[0].dtype == fp32 else [g.float() for g in grads]
    if hp.maximize:
        g32 = torch._foreach_neg(g32)

    c = torch._foreach_mul(m32, hp.beta1)
    torch._foreach_add_(c, g32, alpha=1 - hp.beta1)
    u = list(torch._foreach_sign(c))
    torch._foreach_add_(u, torch._foreach_mul(c, 0.0))
    if hp.cautious_factor is not None:
        if means is None:
            means = [
                cautious_mean(c, g.numel(), hp.cautious_factor)
                for c, g in zip(cautious_aligned_counts(g32, m32, hp), g32, strict=True)
            ]
        for i, (ui, gi, mean) in enumerate(zip(u, g32, means, strict=True)):
            s = torch.where((ui * gi) > 0, 1.0, hp.cautious_factor).to(fp32)
            u[i] = ui * (s / mean)

    apply_direction(params, u, hp, sr_generator)
    torch._foreach_mul_(m32, hp.beta2)
    torch._foreach_add_(m32, g32, alpha=1 - hp.beta2)
    if m32 is not exp_avgs:
        torch._foreach_copy_(exp_avgs, m32)


def lion_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hp: LionHyperparams,
    *,
    means: Sequence[Tensor] | None = None,
    sr_generator: torch.Generator | None = None,
) -> None:
    """Lion over many tensors, bucketed by device and dtypes, with torch's multi-tensor (foreach) ops.

    Equal to `lion_reference` bit for bit (fp32 math, same rounding); it reads and writes each tensor
    several times, which the fused backends avoid.
    """
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        buckets[(p.device, p.dtype, g.dtype, m.dtype)].append(i)
    for index in buckets.values():
        _lion_foreach_bucket(
            [params[i] for i in index],
            [grads[i] for i in index],
            [exp_avgs[i] for i in index],
            hp,
            None if means is None else [means[i] for i in index],
            sr_generator,
        )


def _lion_reference_loop(params, grads, exp_avgs, hp, *, means=None, sr_generator=None) -> None:
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        lion_reference(p, g, m, hp, mean=None if means is None else means[i], sr_generator=sr_generator)


def _cpu_fused_available() -> bool:
    try:
        from lion_dist import cpu_kernel
    except ImportError:
        return False
    return cpu_kernel.is_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, hp: LionHyperparams) -> str:
    """The path that updates tensors on `device`: `auto` picks the fastest correct one.

    Cautious Lion needs a per-tensor mean before the update, so it runs on the foreach path whatever the
    backend (the fused kernels are single-pass).
    """
    if backend == "reference":
        return backend
    if hp.cautious_factor is not None or hp.cautious_wd:
        return "foreach"
    if backend != "auto":
        return backend
    if device.type == "cuda" and _triton_available():
        return "triton"
    if device.type == "cpu" and _cpu_fused_available():
        return "cpu_fused"
    return "foreach"


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
    """Apply one Lion step to local tensors, dispatching each device's tensors to a backend.

    `means`: per-tensor cautious means (sharded params). `skip`: a device flag; when non-zero, nothing is
    written (the fused kernels read it on the device; other paths read it on the host). `sr_seed`:
    stochastic rounding of bf16 params, reproducible from the seed.
    """
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_device[p.device].append(i)
    for device, index in by_device.items():
        path = resolve_backend(backend, device, hp)
        sub = ([params[i] for i in index], [grads[i] for i in index], [exp_avgs[i] for i in index])
        sub_means = None if means is None else [means[i] for i in index]
        if path == "triton":
            from lion_dist import triton_kernel

            triton_kernel.lion_triton(*sub, hp, skip=skip, sr_seed=sr_seed)
            continue
        if skip is not None and bool(skip):
            continue
        if path == "cpu_fused":
            from lion_dist import cpu_kernel

            cpu_kernel.lion_cpu_fused(*sub, hp, sr_seed=sr_seed)
            continue
        generator = None if sr_seed is None else stochastic_rounding_generator(sr_seed, device)
        update = _lion_reference_loop if path == "reference" else lion_foreach
        update(*sub, hp, means=sub_means, sr_generator=generator)
