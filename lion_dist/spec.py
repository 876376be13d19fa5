"""The Lion update, written plainly from the paper: the spec every backend is tested against.

Chen et al. 2023 (arXiv 2302.06675, Program 1), per element:

    p <- p * (1 - lr * wd)            (cautious_wd: only where u * p > 0)
    c <- b1 * m + (1 - b1) * g
    u <- sign(c)                      (sign(0) = 0: zero padding and frozen rows never move;
                                       NaN where c is NaN or Inf, see below)
    u <- u * s / max(mean(s), 1e-5)   (cautious only: s = 1 where u * g > 0, else the cautious factor)
    p <- p - lr * u
    m <- b2 * m + (1 - b2) * g

The math runs in fp32 whatever the storage dtype, except for fp64 params, whose math is fp64 (`math_dtype`).
Rounding is pinned down so that every backend can agree bit for bit: `x * a + y * b` is `fma(y, b, x * a)`
(torch's `add(y, alpha=b)`, C's `fmaf`, Triton's `tl.fma`), scalars enter the math rounded once to the math
dtype, `1 - lr * wd` is computed in double as lion-pytorch does, and `mean(s)` comes from the count of aligned
elements, which makes it exact and independent of how a tensor is sharded. `torch.sign(NaN)` is 0, which would
silently freeze a coordinate whose gradient was NaN; the spec computes `sign(c) + 0 * c` instead, so a
non-finite value becomes a visible NaN in the param.

Stochastic rounding of bf16 params adds 16 bits of noise below the kept bits and truncates. The noise is a
function of (key, param id, element index) through Philox-4x32-10 (`sr_noise`), so every backend draws the
same bits for the same element: the fused kernels match this reference bit for bit with stochastic rounding
too, and a sharded param whose shards know their offset in the whole tensor draws what the unsharded one does.

This module imports nothing else of lion_dist: the backends, the dispatcher and the optimizer build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LionHyperparams:
    """One param group's hyperparameters, resolved for this step.

    `lr` is a Python float, or a 1-element tensor (as torch optimizers accept; the fused GPU kernel reads it on
    the device). `weight_decay` is the coefficient that multiplies `lr`; with decoupled weight decay the
    optimizer has already divided it by the group's initial lr, exactly as lion-pytorch does.
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    weight_decay: float = 0.0
    maximize: bool = False
    cautious_factor: float | None = None
    cautious_wd: bool = False

    @property
    def lr_value(self) -> float:
        """lr as a Python float (reads a tensor lr, which syncs with its device)."""
        return float(self.lr.item()) if isinstance(self.lr, Tensor) else float(self.lr)

    @property
    def decay(self) -> float:
        """The multiplier of decoupled weight decay, `1 - lr * wd`, computed in double as lion-pytorch does."""
        return 1.0 - self.lr_value * self.weight_decay

    @property
    def cautious(self) -> bool:
        """Whether the update needs a per-tensor pass first (the cautious mean or the cautious decay mask)."""
        return self.cautious_factor is not None or self.cautious_wd


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in: fp64 for fp64 params, fp32 for every other storage dtype."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


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


# ---------------------------------------------------------------------------------------------- stochastic rounding

_MASK32 = 0xFFFFFFFF
# Philox-4x32-10 (Salmon et al. 2011), the constants of Triton's `tl.philox` and of cuRAND.
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
NOISE_PER_CALL = 8  # one Philox call gives 4 x 32 bits: 16 bits of noise for each of 8 consecutive elements


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 32 bits of `a * b` for a 32-bit constant `a` and uint32 values in an int64 tensor.

    Split in 16-bit halves so that no product leaves int64: `a * b = (a * b_hi) << 16 + a * b_lo`.
    """
    low_part = a * (b & 0xFFFF)
    high_part = a * (b >> 16)
    hi = (high_part + (low_part >> 16)) >> 16
    lo = ((high_part << 16) + low_part) & _MASK32
    return hi, lo


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 on uint32 counters held in int64 tensors, with a 64-bit key; four uint32 outputs."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_ROUND_A, c0)
        hi2, lo2 = _mulhilo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_KEY_A) & _MASK32, (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


KEY_BITS = 62
_KEY_MIX = 1_000_003


def sr_key(seed: int, group_index: int, step: int) -> int:
    """The Philox key of a group's step: a function of the group's seed, its index and its step count only, so a
    resumed run and every replica draw the same noise."""
    return (sr_key_base(seed, group_index) + step) % (1 << KEY_BITS)


def sr_key_base(seed: int, group_index: int) -> int:
    """`sr_key(seed, group_index, 0)`; the key of step s is `(base + s) mod 2**62`."""
    return (seed * _KEY_MIX + group_index) * _KEY_MIX % (1 << KEY_BITS)


class DeviceKey(NamedTuple):
    """A stochastic-rounding key whose step count lives in a device tensor (capturable steps, CUDA graphs): the
    key is `(base + step) mod 2**62`, which a fused kernel computes on the device."""

    base: int
    step: Tensor


def key_value(key: int | DeviceKey | None) -> int | None:
    """The key as a number (a DeviceKey's step is read, which syncs with its device)."""
    if isinstance(key, DeviceKey):
        return (key.base + int(key.step)) % (1 << KEY_BITS)
    return key


@dataclass(frozen=True)
class NoiseStream:
    """Where one tensor's stochastic-rounding noise comes from.

    `key`: this step's 64-bit Philox key (from the group's seed, index and step). `param_id`: the param's index
    in its group, so no two params share noise. `base`: the global index of the tensor's first element in the
    whole param (a shard's offset), so a sharded param draws exactly what the unsharded one draws; `shard`
    tells apart shards that are not a contiguous range of the whole param (0 for those that are).
    """

    key: int
    param_id: int = 0
    base: int = 0
    shard: int = 0


def sr_noise(stream: NoiseStream, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """16 bits of noise per element (int32 in [0, 65536)) for elements `base .. base + numel - 1`.

    Element e takes 16 bits of Philox(counter = (e // 8 low and high 32 bits, param_id, shard), key): word
    (e % 8) // 2 of the four outputs, its low half for even e and its high half for odd e.
    """
    e = torch.arange(stream.base, stream.base + numel, dtype=torch.int64, device=device)
    q = e >> 3
    c2 = torch.full_like(q, stream.param_id & _MASK32)
    c3 = torch.full_like(q, stream.shard & _MASK32)
    words = torch.stack(philox4x32((q & _MASK32, q >> 32, c2, c3), stream.key))
    word = words.gather(0, ((e & 7) >> 1).unsqueeze(0)).squeeze(0)
    return ((word >> ((e & 1) * 16)) & 0xFFFF).to(torch.int32)


def round_to_bf16_stochastic(x: Tensor, noise: Tensor) -> Tensor:
    """fp32 -> bf16 with stochastic rounding: add the 16-bit `noise`, then truncate. Unbiased over the noise.

    Inf and NaN round to nearest (adding noise could turn an Inf into a NaN or flip a NaN's payload).
    """
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + noise.view(bits.shape)) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def write_back(dst: Tensor, value: Tensor, noise: NoiseStream | None, compensation: Tensor | None = None) -> None:
    """Store the math-dtype `value` into `dst`: rounded to nearest, or stochastically for bf16 with `noise`.

    With a Kahan `compensation` buffer (the caller added it to `value`), the rounding error `value - dst` is
    kept in it for the next step, so small updates of a bf16 param add up instead of rounding away.
    """
    if compensation is not None:
        rounded = value.to(dst.dtype)
        compensation.copy_(value - rounded.to(value.dtype))
        dst.copy_(rounded)
    elif noise is not None and dst.dtype == torch.bfloat16:
        dst.copy_(round_to_bf16_stochastic(value, sr_noise(noise, value.numel(), value.device)).view(dst.shape))
    else:
        dst.copy_(value)


# ---------------------------------------------------------------------------------------------- the update


def lion_direction(grad: Tensor, exp_avg: Tensor, hp: LionHyperparams, compute: torch.dtype) -> Tensor:
    """The first half of a step: returns `u = sign(b1 * m + (1 - b1) * g)` (NaN-visible) and advances the
    momentum in place, `m <- b2 * m + (1 - b2) * g`. Distributed Lion exchanges `u` before applying it."""
    g = grad.to(compute)
    m = exp_avg.to(compute)
    if hp.maximize:
        g = -g
    c = m.mul(hp.beta1).add_(g, alpha=1 - hp.beta1)
    u = c.sign().add_(c * 0)
    exp_avg.copy_(m.mul(hp.beta2).add_(g, alpha=1 - hp.beta2))
    return u


def compensated(param: Tensor, compensation: Tensor | None, compute: torch.dtype) -> Tensor:
    """The param in the math dtype, plus its Kahan compensation (the error its last rounding dropped)."""
    p = param.to(compute)
    return p if compensation is None else p + compensation.to(compute)


def apply_direction(
    param: Tensor,
    u: Tensor,
    hp: LionHyperparams,
    noise: NoiseStream | None = None,
    compensation: Tensor | None = None,
) -> None:
    """The second half: `p <- p * (1 - lr * wd) - lr * u` (decay only where `u * p > 0` with cautious_wd)."""
    p = compensated(param, compensation, u.dtype)
    if hp.weight_decay != 0:
        decayed = p * hp.decay
        p = torch.where(u * p > 0, decayed, p) if hp.cautious_wd else decayed
    write_back(param, p.add(u, alpha=-hp.lr_value), noise, compensation)


def lion_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hp: LionHyperparams,
    *,
    mean: Tensor | None = None,
    noise: NoiseStream | None = None,
    compensation: Tensor | None = None,
) -> None:
    """One Lion step on one tensor, in place, written plainly from the paper.

    `mean` overrides the cautious mean(s) (a sharded param passes the mean over its whole tensor).
    `noise` turns on stochastic rounding for a bf16 param; `compensation` Kahan-compensates it instead.
    """
    compute = math_dtype(param.dtype)
    p = compensated(param, compensation, compute)
    g = grad.to(compute)
    m = exp_avg.to(compute)
    if hp.maximize:
        g = -g

    c = m.mul(hp.beta1).add_(g, alpha=1 - hp.beta1)
    u = c.sign().add_(c * 0)
    if hp.cautious_factor is not None:
        aligned = (u * g) > 0
        if mean is None:
            mean = cautious_mean(aligned.sum(), aligned.numel(), hp.cautious_factor)
        s = torch.where(aligned, 1.0, hp.cautious_factor).to(torch.float32)
        u = u * (s / mean).to(compute)

    if hp.weight_decay != 0:
        decayed = p * hp.decay
        p = torch.where(u * p > 0, decayed, p) if hp.cautious_wd else decayed
    p = p.add(u, alpha=-hp.lr_value)
    m = m.mul(hp.beta2).add_(g, alpha=1 - hp.beta2)

    write_back(param, p, noise, compensation)
    exp_avg.copy_(m)


def cautious_aligned_count(grad: Tensor, exp_avg: Tensor, hp: LionHyperparams, compute: torch.dtype) -> Tensor:
    """The number of elements where the Lion direction agrees with the gradient (u * g > 0).

    The first pass of cautious Lion: a sharded tensor sums these over its shards before `cautious_mean`.
    """
    g = grad.to(compute).neg() if hp.maximize else grad.to(compute)
    u = exp_avg.to(compute).mul(hp.beta1).add_(g, alpha=1 - hp.beta1).sign_()
    return ((u * g) > 0).sum()


# ---------------------------------------------------------------------------------------------- 8-bit momentum

INT8_BLOCK = 128  # elements per scale: along the last dim, never across a row
INT8_MIN_NUMEL = 4096  # smaller params keep fp32 momentum (bitsandbytes' threshold): the scales would not pay off
INT8_MAX_CODE = 127
INT8_ROUNDINGS = ("stochastic", "nearest")
MOMENTUM_STREAM = 1 << 31  # or-ed into a noise stream's shard field: requantization noise is not the params' SR noise


def int8_scale_shape(shape: torch.Size | tuple[int, ...], block: int) -> tuple[int, ...]:
    """The shape of the per-block scales of a momentum of `shape`: one per `block` elements of each row."""
    *rows, n = tuple(shape) or (1,)
    return (*rows, -(-n // block))


def dequantize_momentum(codes: Tensor, scales: Tensor, block: int) -> Tensor:
    """fp32 momentum from int8 codes and per-block fp32 scales: `m = code * scale` (one rounding)."""
    n = codes.shape[-1] if codes.dim() else 1
    expanded = scales.repeat_interleave(block, dim=-1)[..., :n].reshape(codes.shape)
    return codes.to(torch.float32) * expanded


def quantize_momentum(m: Tensor, block: int, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(int8 codes, fp32 scales) of the fp32 momentum `m`, blocks of `block` along the last dim.

    Per block, `scale = absmax / 127` (NaN if the block holds a NaN) and `x = m / scale`. Rounding to nearest
    (ties to even) gives `q = rint(x)`; with `noise` (16 bits per element, `sr_noise`) it is stochastic,
    `q = floor(x + noise / 65536)`, which is unbiased: a step that moves m by less than half a code still moves
    it on average, where rounding to nearest would freeze it (beta2 = 0.99 changes m by 1% of g - m). Codes are
    clamped to [-127, 127]; where x is not finite (an all-zero block: 0 / 0; a NaN or Inf in the block) the code
    is 0, so a non-finite momentum stays visible as a NaN scale (code x NaN or 0 x Inf) and never as a number.
    """
    shape = m.shape
    n = shape[-1] if m.dim() else 1
    nb = -(-n // block)
    rows = m.reshape(-1, n).to(torch.float32)
    padded = torch.nn.functional.pad(rows, (0, nb * block - n)).view(-1, nb, block)
    absmax = padded.abs().amax(dim=-1)
    absmax = torch.where(padded.isnan().any(dim=-1), float("nan"), absmax)
    scales = absmax / INT8_MAX_CODE
    x = padded / scales.unsqueeze(-1)
    if noise is not None:
        u = noise.reshape(-1, n).to(torch.float32) * (1.0 / 65536)
        x = x + torch.nn.functional.pad(u, (0, nb * block - n)).view(-1, nb, block)
        q = x.floor()
    else:
        q = x.round()
    q = torch.where(torch.isfinite(q), q.clamp(-INT8_MAX_CODE, INT8_MAX_CODE), 0.0)
    codes = q.view(-1, nb * block)[:, :n].to(torch.int8).reshape(shape)
    return codes, scales.reshape(int8_scale_shape(shape, block))


def lion_reference_int8(
    param: Tensor,
    grad: Tensor,
    codes: Tensor,
    scales: Tensor,
    hp: LionHyperparams,
    block: int,
    *,
    mean: Tensor | None = None,
    noise: NoiseStream | None = None,
    momentum_noise: NoiseStream | None = None,
    compensation: Tensor | None = None,
) -> None:
    """One Lion step on one tensor with int8 momentum, in place: dequantize, `lion_reference`, requantize.

    `momentum_noise` makes the requantization stochastic (see `quantize_momentum`); its stream should have
    `MOMENTUM_STREAM` in its shard field, so that it draws other bits than the param's stochastic rounding.
    """
    m = dequantize_momentum(codes, scales, block)
    lion_reference(param, grad, m, hp, mean=mean, noise=noise, compensation=compensation)
    bits = None if momentum_noise is None else sr_noise(momentum_noise, m.numel(), m.device)
    new_codes, new_scales = quantize_momentum(m, block, bits)
    codes.copy_(new_codes)
    scales.copy_(new_scales)
