"""The fused Lion update in Triton: one launch per bucket of tensors, over tables of pointers.

A bucket is the tensors of one dtype family (all fp32; any mix of fp32, bf16 and fp16, whose dtypes are a code per
tensor in the layout, a branch uniform over a program; all fp64) whose addresses are all 16-byte aligned, or all the
others: one view at an odd offset no longer costs the whole bucket its 128-bit accesses. Each launch reads a static
table of (param, momentum) addresses and a per-tensor layout (numel, first block, noise stream, dtype code), both built
once per plan, and this step's gradient addresses, which the launcher writes into a persistent pinned buffer and copies
into a persistent device table (no allocation per step). Every element of p, g and m is read once and p and m are
written once, with the math and the rounding of `spec.lion_reference`: `x * a + y * b` is `tl.fma(y, b, x * a)`,
`sign(c) + 0 * c` keeps a NaN visible, maximize is folded into the signs of `1 - b1` and `1 - b2` (exactly the negated
gradient), and stochastic rounding of bf16 params draws the spec's Philox noise, all four outputs of each call.

Runtime values are kernel arguments, never constexprs: every scalar travels as the two 32-bit halves of its
64-bit pattern (fp64 for floats), the skip flag and a tensor lr are read on the device, so an lr schedule, a new
seed, an int where a float was expected, a tensor lr or a skip flag compile nothing new and sync nothing. What is
compiled is `specializations()`: dtype family (all fp32, a mix of fp32/bf16/fp16, all fp64) x alignment x
block size x stochastic rounding, 16 kernels in all.
Block sizes follow a rule (no `triton.autotune`, which would rerun this in-place kernel). Cautious Lion needs a
per-tensor mean before the update; the backend declaration routes it elsewhere.

Triton reads TRITON_INTERPRET when `triton` is first imported (its own library functions, e.g. `tl.philox`,
are jit-decorated then) and again when each kernel is decorated, i.e. when this module is imported. With
`TRITON_INTERPRET=1` set for the whole process, the kernel runs in Triton's interpreter on CPU tensors (how the
tests drive it without a GPU); otherwise it is compiled and needs CUDA tensors. A mix of the two cannot work,
so importing this module raises if the variable changed in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from lion_dist.backends import FUSED_TRIPLES, Entry, StepArgs, refuse_overlaps
from lion_dist.spec import INT8_MAX_CODE, MOMENTUM_STREAM, DeviceKey, int8_scale_shape

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}  # 2 bits per operand
_BLOCKS = {512: 2, 2048: 8}  # BLOCK: num_warps, 8 elements per thread (two 128-bit fp32 accesses, one bf16)
FP32, MIXED, FP64 = 0, 1, 2  # DTYPES: all fp32 / any mix of fp32, bf16, fp16 (fp32 math) / all fp64 (fp64 math)
_ALIGN = 16  # bytes: the width of a vector access
_LAYOUT = tl.constexpr(6)  # int64 per tensor in the layout: numel, first block, param id, base, shard, dtype code
SCALARS = (
    "lr",
    "lr_address",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "weight_decay",
    "key",
    "step_address",
)
RUNTIME_ARGS = (*(f"{name}_{half}" for name in SCALARS for half in ("lo", "hi")), "flags")
LR_VALUE, LR_FP32_TENSOR, LR_FP64_TENSOR = 0, 1, 2  # flags & 3: where lr comes from
KEY_FROM_STEP = 4  # flags & 4: the key is (key + the int64 at step_address) mod 2**62 (spec.DeviceKey)

# The int8-momentum kernel: the same scalars, then the requantization key and its device step count.
INT8_SCALARS = (*SCALARS, "quant_key", "quant_step_address")
INT8_RUNTIME_ARGS = (*(f"{name}_{half}" for name in INT8_SCALARS for half in ("lo", "hi")), "flags")
QUANT_KEY_FROM_STEP = 8  # flags & 8: the quant key is (quant_key + the int64 at quant_step_address) mod 2**62
PARAM_SR = 16  # flags & 16: bf16 params round stochastically (an sr_key was given)
QUANT_SR = 32  # flags & 32: the momentum is requantized stochastically (a quant_key was given)
INT8_MAX_BLOCK = 1024  # elements per scale that the int8 kernel takes (any block up to this, padded to a power of 2)
_INT8_TILE = 2048  # elements per program: ROWS momentum blocks of BLOCK (padded) elements, on 8 warps
_INT8_WARPS = 8
_INT8_BLOCKS = tuple(1 << k for k in range(4, 11))  # BLOCK (padded block): 16 .. 1024
# int64 per tensor in the int8 layout: row length, block, blocks per row, blocks, first program, param id, base,
# shard, the momentum noise's shard (shard | MOMENTUM_STREAM), dtype code (param | grad << 2), noise by eights
_INT8_LAYOUT = tl.constexpr(11)
_MAX_CODE = tl.constexpr(float(INT8_MAX_CODE))


@triton.jit
def _int64(lo, hi):
    """A runtime int64 from the two int32 halves of its bit pattern."""
    return (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _float64(lo, hi):
    """A runtime float64 from the two int32 halves of its bit pattern."""
    return _int64(lo, hi).to(tl.float64, bitcast=True)


@triton.jit
def _round_to_bf16(x, noise):
    """fp32 -> bf16 in integer arithmetic: add `noise` to the 16 bits that go, then truncate.

    noise = 0x7FFF + (the lowest kept bit) rounds to nearest even (Triton's interpreter would truncate a plain
    cast), uniform random 16 bits round stochastically, without bias. Inf and NaN keep their value.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) != 0x7F800000, rounded, x).to(tl.bfloat16)


@triton.jit
def _philox_words(q, key, param_id, shard):
    """The four Philox outputs for counters (q low and high 32 bits, param id, shard)."""
    zero = tl.zeros_like(q).to(tl.uint32)
    return tl.philox(key, q.to(tl.uint32), (q >> 32).to(tl.uint32), zero + param_id, zero + shard)


@triton.jit
def _noise_by_eights(first, key, param_id, shard, BLOCK: tl.constexpr):
    """For `first` a multiple of 8: one Philox call per 8 elements, all four outputs and both halves used."""
    r0, r1, r2, r3 = _philox_words(first // 8 + tl.arange(0, BLOCK // 8).to(tl.int64), key, param_id, shard)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [j, k, l] = word 2k + l of counter j
    halves = tl.join(words & 0xFFFF, words >> 16)  # [j, k, l, h]: element 8j + 2 (2k + l) + h
    return tl.reshape(halves, (BLOCK,)).to(tl.int32)


@triton.jit
def _noise_each(first, key, param_id, shard, BLOCK: tl.constexpr):
    """Any `first`: each element computes its own Philox call and keeps its 16 bits (8x the arithmetic)."""
    e = first + tl.arange(0, BLOCK).to(tl.int64)
    r0, r1, r2, r3 = _philox_words(e >> 3, key, param_id, shard)
    w = (e & 7) >> 1
    word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return ((word >> ((e & 1) * 16).to(tl.uint32)) & 0xFFFF).to(tl.int32)


@triton.jit
def _sr_noise(first, key, param_id, shard, BLOCK: tl.constexpr):
    """`spec.sr_noise` for elements first .. first + BLOCK - 1 of a tensor: 16 bits each, as int32.

    Element e takes 16 bits of Philox(e // 8, param id, shard): word (e % 8) // 2, its low or high half; both
    ways of computing it give the same bits.
    """
    if first % 8 == 0:
        noise = _noise_by_eights(first, key, param_id, shard, BLOCK)
    else:
        noise = _noise_each(first, key, param_id, shard, BLOCK)
    return noise


@triton.jit
def _address(address, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """An int64 address as a typed pointer; ALIGNED tells the compiler it is 16-byte aligned (128-bit accesses)."""
    pointer = address.to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load(address, code, offs, mask, ALIGNED: tl.constexpr, DTYPES: tl.constexpr):
    """BLOCK elements of a tensor of dtype code `code` (uniform over the program), in the math dtype.

    A bucket of only fp32 (or only fp64) tensors compiles one path; a mixed one a branch per dtype, whose
    differently sized vector accesses cost a layout conversion through shared memory.
    """
    if DTYPES == 2:
        x = tl.load(_address(address, tl.float64, ALIGNED) + offs, mask=mask)
    elif DTYPES == 0:  # noqa: SIM114 (a constexpr test: an fp32 bucket compiles this path alone)
        x = tl.load(_address(address, tl.float32, ALIGNED) + offs, mask=mask)
    elif code == 0:
        x = tl.load(_address(address, tl.float32, ALIGNED) + offs, mask=mask)
    elif code == 1:
        x = tl.load(_address(address, tl.bfloat16, ALIGNED) + offs, mask=mask).to(tl.float32)
    else:
        x = tl.load(_address(address, tl.float16, ALIGNED) + offs, mask=mask).to(tl.float32)
    return x


@triton.jit
def _store(address, code, offs, mask, x, noise, ALIGNED: tl.constexpr, DTYPES: tl.constexpr):
    """Store math-dtype `x` in dtype code `code`: bf16 with `noise` added below the kept bits (see
    `_round_to_bf16`), fp16 rounded to nearest even."""
    if DTYPES == 2:
        tl.store(_address(address, tl.float64, ALIGNED) + offs, x, mask=mask)
    elif DTYPES == 0:  # noqa: SIM114 (a constexpr test: an fp32 bucket compiles this path alone)
        tl.store(_address(address, tl.float32, ALIGNED) + offs, x, mask=mask)
    elif code == 0:
        tl.store(_address(address, tl.float32, ALIGNED) + offs, x, mask=mask)
    elif code == 1:
        tl.store(_address(address, tl.bfloat16, ALIGNED) + offs, _round_to_bf16(x, noise), mask=mask)
    else:
        tl.store(_address(address, tl.float16, ALIGNED) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _nearest(x):
    """The noise that makes `_round_to_bf16` round to nearest even: 0x7FFF + the lowest kept bit."""
    return 0x7FFF + ((x.to(tl.int32, bitcast=True) >> 16) & 1)


@triton.jit
def _lion_block(
    addresses, codes, offs, mask, first, hp, ALIGNED: tl.constexpr, DTYPES: tl.constexpr, STOCHASTIC: tl.constexpr
):
    """Lion on one block of one tensor; `mask` is None for a full block, so its accesses stay vectorized."""
    p_address, g_address, m_address = addresses
    p_code, g_code, m_code = codes
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, key, param_id, shard = hp
    p = _load(p_address, p_code, offs, mask, ALIGNED, DTYPES)
    g = _load(g_address, g_code, offs, mask, ALIGNED, DTYPES)
    m = _load(m_address, m_code, offs, mask, ALIGNED, DTYPES)
    c = tl.fma(g, one_minus_beta1, m * beta1)  # maximize: the host negated 1 - b1 and 1 - b2
    u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)).to(lr.dtype) + c * 0.0
    p = tl.fma(u, -lr, p * decay)
    m = tl.fma(g, one_minus_beta2, m * beta2)
    if DTYPES == 1:
        p_noise = _nearest(p)
        if STOCHASTIC:  # noqa: SIM102 (a constexpr test: only the stochastic kernel has Philox code)
            if p_code == 1:
                p_noise = _sr_noise(first, key, param_id, shard, p.shape[0])
        _store(p_address, p_code, offs, mask, p, p_noise, ALIGNED, DTYPES)
        _store(m_address, m_code, offs, mask, m, _nearest(m), ALIGNED, DTYPES)
    else:  # fp32 or fp64 storage: no rounding to a narrower type
        _store(p_address, p_code, offs, mask, p, 0, ALIGNED, DTYPES)
        _store(m_address, m_code, offs, mask, m, 0, ALIGNED, DTYPES)


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def _lion_kernel(
    pm_ptrs,
    g_ptrs,
    layout,
    block_tensor,
    skip,
    lr_lo,
    lr_hi,
    lr_address_lo,
    lr_address_hi,
    beta1_lo,
    beta1_hi,
    one_minus_beta1_lo,
    one_minus_beta1_hi,
    beta2_lo,
    beta2_hi,
    one_minus_beta2_lo,
    one_minus_beta2_hi,
    weight_decay_lo,
    weight_decay_hi,
    key_lo,
    key_hi,
    step_address_lo,
    step_address_hi,
    flags,
    DTYPES: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """One program per block: find its tensor in the layout, then update BLOCK elements of it.

    `pm_ptrs` holds (p, m) addresses per tensor, `g_ptrs` this step's gradient addresses, `layout` (numel,
    first block, param id, base, shard, dtype code) per tensor, `block_tensor` the tensor of each block. A
    non-zero `skip[0]` makes every program return without writing. lr is the scalar (flags & 3 == 0) or the fp32
    or fp64 value at `lr_address` (1, 2); with flags & 4 the key counts the step at `step_address`.
    """
    if tl.load(skip) == 0:
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        row = layout + _LAYOUT * t
        numel = tl.load(row)
        start = (pid - tl.load(row + 1)).to(tl.int64) * BLOCK
        code = tl.load(row + 5)
        addresses = (tl.load(pm_ptrs + 2 * t), tl.load(g_ptrs + t), tl.load(pm_ptrs + 2 * t + 1))
        codes = (code & 3, (code >> 2) & 3, (code >> 4) & 3)

        lr_kind = flags & 3
        if lr_kind == 0:
            lr64 = _float64(lr_lo, lr_hi)
        elif lr_kind == 1:
            lr64 = tl.load(_int64(lr_address_lo, lr_address_hi).to(tl.pointer_type(tl.float32))).to(tl.float64)
        else:
            lr64 = tl.load(_int64(lr_address_lo, lr_address_hi).to(tl.pointer_type(tl.float64)))
        COMPUTE: tl.constexpr = tl.float64 if DTYPES == 2 else tl.float32
        decay64 = 1.0 - lr64 * _float64(weight_decay_lo, weight_decay_hi)  # in double, as lion-pytorch
        key = _int64(key_lo, key_hi)
        if flags & 4:
            key = (key + tl.load(_int64(step_address_lo, step_address_hi).to(tl.pointer_type(tl.int64)))) & (
                (1 << 62) - 1
            )
        hp = (
            lr64.to(COMPUTE),
            _float64(beta1_lo, beta1_hi).to(COMPUTE),
            _float64(one_minus_beta1_lo, one_minus_beta1_hi).to(COMPUTE),
            _float64(beta2_lo, beta2_hi).to(COMPUTE),
            _float64(one_minus_beta2_lo, one_minus_beta2_hi).to(COMPUTE),
            decay64.to(COMPUTE),
            key,
            tl.load(row + 2).to(tl.uint32),
            tl.load(row + 4).to(tl.uint32),
        )
        offs = start + tl.arange(0, BLOCK)
        first = tl.load(row + 3) + start
        if start + BLOCK <= numel:
            _lion_block(addresses, codes, offs, None, first, hp, ALIGNED, DTYPES, STOCHASTIC)
        elif numel % 16 == 0:  # the same mask, but the compiler sees it change only every 16 elements: vectorized
            _lion_block(addresses, codes, offs, offs < (numel // 16) * 16, first, hp, ALIGNED, DTYPES, STOCHASTIC)
        else:
            _lion_block(addresses, codes, offs, offs < numel, first, hp, ALIGNED, DTYPES, STOCHASTIC)


@triton.jit
def _noise_rows(first, eights, key, param_id, shard, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """`_sr_noise` for ROWS runs of BLOCK elements at once, run i starting at element index first[i]: one Philox
    call per 8 elements when every first[i] is a multiple of 8 (`eights`), else one per element; the same bits."""
    if eights:
        q = first[:, None] // 8 + tl.arange(0, BLOCK // 8)[None, :].to(tl.int64)
        r0, r1, r2, r3 = _philox_words(q, key, param_id, shard)
        words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [i, j, k, l] = word 2k + l of counter j of run i
        halves = tl.join(words & 0xFFFF, words >> 16)  # [i, j, k, l, h]: element 8j + 2 (2k + l) + h of run i
        noise = tl.reshape(halves, (ROWS, BLOCK)).to(tl.int32)
    else:
        e = first[:, None] + tl.arange(0, BLOCK)[None, :].to(tl.int64)
        s0, s1, s2, s3 = _philox_words(e >> 3, key, param_id, shard)  # names of their own: other shapes
        w = (e & 7) >> 1
        word = tl.where(w == 0, s0, tl.where(w == 1, s1, tl.where(w == 2, s2, s3)))
        noise = ((word >> ((e & 1) * 16).to(tl.uint32)) & 0xFFFF).to(tl.int32)
    return noise


@triton.jit
def _rint(x):
    """fp32 x rounded to the nearest integer, ties to even, exactly for |x| < 2**22 (|x| <= 255 here); NaN and
    Inf stay themselves. Plain adds, on every target (no libdevice, whose rounding functions flush denormals)."""
    return (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: the sum's ulp is 1, its last bit x's parity


@triton.jit
def _floor(x):
    """fp32 floor, exactly for |x| < 2**22, denormals included (libdevice's floorf flushes -1e-40 to -0, not -1)."""
    r = _rint(x)
    return tl.where(r > x, r - 1.0, r)


@triton.jit
def _key(key_lo, key_hi, step_address_lo, step_address_hi, from_step):
    """A Philox key from its halves; `from_step`: plus the int64 step count at step_address, mod 2**62."""
    key = _int64(key_lo, key_hi)
    if from_step:
        key = (key + tl.load(_int64(step_address_lo, step_address_hi).to(tl.pointer_type(tl.int64)))) & ((1 << 62) - 1)
    return key


@triton.jit(do_not_specialize=INT8_RUNTIME_ARGS)
def _lion_int8_kernel(
    pcs_ptrs,
    g_ptrs,
    layout,
    program_tensor,
    skip,
    lr_lo,
    lr_hi,
    lr_address_lo,
    lr_address_hi,
    beta1_lo,
    beta1_hi,
    one_minus_beta1_lo,
    one_minus_beta1_hi,
    beta2_lo,
    beta2_hi,
    one_minus_beta2_lo,
    one_minus_beta2_hi,
    weight_decay_lo,
    weight_decay_hi,
    key_lo,
    key_hi,
    step_address_lo,
    step_address_hi,
    quant_key_lo,
    quant_key_hi,
    quant_step_address_lo,
    quant_step_address_hi,
    flags,
    DTYPES: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Lion with int8 momentum: one program per ROWS consecutive momentum blocks of one tensor, a tile
    [ROWS, BLOCK] (BLOCK: the block padded to a power of two, masked), `spec.lion_reference_int8` per block.

    `pcs_ptrs` holds (param, codes, scales) addresses per tensor, `g_ptrs` this step's gradient addresses,
    `layout` `_INT8_LAYOUT` int64 per tensor, `program_tensor` the tensor of each program. Dequantize
    (`code * scale`), the Lion math of `_lion_block` in fp32, then per block `scale = absmax / 127` (NaN if the
    block holds a NaN), `x = m / scale` (both correctly rounded), `q = rint(x)` (flags & QUANT_SR: `floor(x +
    noise / 2**16)`, the momentum stream's Philox noise), 0 where not finite, else clamped to [-127, 127].
    `skip`, lr and the keys as in `_lion_kernel` (flags & 8: the quant key counts the step at
    quant_step_address); flags & PARAM_SR: bf16 params round stochastically.
    """
    if tl.load(skip) == 0:
        pid = tl.program_id(0)
        t = tl.load(program_tensor + pid)
        row = layout + _INT8_LAYOUT * t
        n = tl.load(row)  # row length
        block = tl.load(row + 1)
        per_row = tl.load(row + 2)
        n_blocks = tl.load(row + 3)
        b = (pid - tl.load(row + 4)).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # the tile's blocks
        valid = b < n_blocks
        r = b // per_row
        j = b - r * per_row
        start = r * n + j * block  # of each block, in the tensor
        limit = tl.where(valid, tl.minimum(block, n - j * block), 0)  # its length (short at a row's end)
        if ALIGNED:  # every row length and the block are multiples of 16: vector accesses, masks by 16s
            start = tl.multiple_of(start, 16)
            limit = tl.multiple_of(limit, 16)
        k = tl.arange(0, BLOCK)
        offs = start[:, None] + k[None, :]
        mask = k[None, :] < limit[:, None]
        code = tl.load(row + 9)
        p_code = code & 3
        g_code = (code >> 2) & 3
        p_address = tl.load(pcs_ptrs + 3 * t)
        c_address = tl.load(pcs_ptrs + 3 * t + 1)
        scales = tl.load(pcs_ptrs + 3 * t + 2).to(tl.pointer_type(tl.float32))
        g_address = tl.load(g_ptrs + t)

        lr_kind = flags & 3
        if lr_kind == 0:
            lr64 = _float64(lr_lo, lr_hi)
        elif lr_kind == 1:
            lr64 = tl.load(_int64(lr_address_lo, lr_address_hi).to(tl.pointer_type(tl.float32))).to(tl.float64)
        else:
            lr64 = tl.load(_int64(lr_address_lo, lr_address_hi).to(tl.pointer_type(tl.float64)))
        decay = (1.0 - lr64 * _float64(weight_decay_lo, weight_decay_hi)).to(tl.float32)  # in double, as lion-pytorch
        lr = lr64.to(tl.float32)
        beta1 = _float64(beta1_lo, beta1_hi).to(tl.float32)
        one_minus_beta1 = _float64(one_minus_beta1_lo, one_minus_beta1_hi).to(tl.float32)
        beta2 = _float64(beta2_lo, beta2_hi).to(tl.float32)
        one_minus_beta2 = _float64(one_minus_beta2_lo, one_minus_beta2_hi).to(tl.float32)

        p = _load(p_address, p_code, offs, mask, ALIGNED, DTYPES)
        g = _load(g_address, g_code, offs, mask, ALIGNED, DTYPES)
        scale = tl.load(scales + b, mask=valid, other=0.0)
        m = tl.load(_address(c_address, tl.int8, ALIGNED) + offs, mask=mask, other=0).to(tl.float32) * scale[:, None]
        c = tl.fma(g, one_minus_beta1, m * beta1)  # maximize: the host negated 1 - b1 and 1 - b2
        u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)).to(tl.float32) + c * 0.0
        p = tl.fma(u, -lr, p * decay)
        m = tl.fma(g, one_minus_beta2, m * beta2)

        first = tl.load(row + 6) + start  # the element index of each block's first element in the whole param
        eights = tl.load(row + 10)
        param_id = tl.load(row + 5).to(tl.uint32)
        if DTYPES == 1:
            p_noise = _nearest(p)
            if STOCHASTIC:  # noqa: SIM102 (a constexpr test: only the stochastic kernel has Philox code)
                if flags & 16:  # noqa: SIM102 (PARAM_SR; Triton: one runtime condition per if)
                    if p_code == 1:
                        key = _key(key_lo, key_hi, step_address_lo, step_address_hi, flags & 4)
                        p_noise = _noise_rows(first, eights, key, param_id, tl.load(row + 7).to(tl.uint32), ROWS, BLOCK)
            _store(p_address, p_code, offs, mask, p, p_noise, ALIGNED, DTYPES)
        else:
            _store(p_address, p_code, offs, mask, p, 0, ALIGNED, DTYPES)

        absmax = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
        has_nan = tl.max(tl.where(mask & (m != m), 1, 0), axis=1)
        absmax = tl.where(has_nan != 0, float("nan"), absmax)
        scale = tl.div_rn(absmax, _MAX_CODE)
        x = tl.div_rn(m, scale[:, None])
        if STOCHASTIC:
            if flags & 32:  # QUANT_SR
                quant_key = _key(quant_key_lo, quant_key_hi, quant_step_address_lo, quant_step_address_hi, flags & 8)
                noise = _noise_rows(first, eights, quant_key, param_id, tl.load(row + 8).to(tl.uint32), ROWS, BLOCK)
                q = _floor(x + noise.to(tl.float32) * (1.0 / 65536))
            else:
                q = _rint(x)
        else:
            q = _rint(x)
        finite = (q.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
        q = tl.where(finite, tl.minimum(tl.maximum(q, -_MAX_CODE), _MAX_CODE), 0.0)
        tl.store(_address(c_address, tl.int8, ALIGNED) + offs, q.to(tl.int8), mask=mask)
        tl.store(scales + b, scale, mask=valid)


def interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 when it was imported)."""
    return not isinstance(_lion_kernel, JITFunction)


if interpreted() == isinstance(tl.zeros_like, JITFunction):
    raise ImportError(
        f"TRITON_INTERPRET changed between `import triton` and `import lion_dist.backends.triton_kernel` (the kernel "
        f"would be {'interpreted' if interpreted() else 'compiled'}, Triton's library functions not), and Triton "
        "reads it at both: set it, or unset it, in the environment before the process imports triton"
    )


def halves(value: float | int) -> tuple[int, int]:
    """A scalar as the (low, high) int32 halves of its 64-bit pattern: fp64 for a float, int64 for an int."""
    packed = struct.pack("<d", value) if isinstance(value, float) else struct.pack("<q", value)
    return struct.unpack("<ii", packed)


def _block_rule(max_numel: int) -> int:
    """BLOCK: 2048 elements on 8 warps, or 512 on 2 for a bucket of only small tensors."""
    return 512 if max_numel <= 512 else 2048


def _family(triple: tuple[torch.dtype, torch.dtype, torch.dtype]) -> int:
    if triple == (torch.float32,) * 3:
        return FP32
    return FP64 if triple[0] == torch.float64 else MIXED


def specializations() -> list[dict[str, object]]:
    """The constexprs of every kernel the launcher can compile (num_warps follows BLOCK): 16 in all."""
    result = []
    for dtypes, block, aligned, stochastic in itertools.product(
        (FP32, MIXED, FP64), _BLOCKS, (True, False), (False, True)
    ):
        if stochastic and dtypes != MIXED:
            continue  # stochastic rounding is for bf16 params, which only a mixed bucket holds
        result.append(dict(DTYPES=dtypes, BLOCK=block, ALIGNED=aligned, STOCHASTIC=stochastic))
    return result


def int8_specializations() -> list[dict[str, object]]:
    """The constexprs of every int8-momentum kernel the launcher can compile (num_warps 8; ROWS follows BLOCK):
    dtypes (all fp32, or a mix of fp32/bf16/fp16 params and grads) x padded block (16 .. 1024) x alignment x
    stochastic (param rounding and requantization, each then a runtime flag), 56 in all."""
    return [
        dict(DTYPES=dtypes, BLOCK=block, ROWS=_INT8_TILE // block, ALIGNED=aligned, STOCHASTIC=stochastic)
        for dtypes, block, aligned, stochastic in itertools.product(
            (FP32, MIXED), _INT8_BLOCKS, (True, False), (False, True)
        )
    ]


def int8_padded_block(block: int) -> int:
    """The int8 kernel's BLOCK for a momentum block of `block` elements: the next power of two, at least 16."""
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= INT8_MAX_BLOCK:
        raise ValueError(
            f"lion_triton: int8 momentum block {block!r} is not supported: the Triton kernel takes blocks of 1 to "
            f"{INT8_MAX_BLOCK} elements"
        )
    return max(16, 1 << (block - 1).bit_length())


def _on(device: torch.device, values: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A table on `device`, uploaded once (a plan's static part)."""
    return torch.tensor(values, dtype=dtype).to(device)


def check_device(device: torch.device) -> None:
    """Raise unless this module's mode can run tensors on `device` (the declaration words why)."""
    from lion_dist.backends.triton import BACKEND

    if (why := BACKEND.device_refusal(device.type)) is not None:
        raise RuntimeError(why)


def _check_skip(skip: Tensor | None, device: torch.device) -> None:
    if skip is not None and (skip.numel() != 1 or skip.dtype != torch.int32 or skip.device != device):
        raise ValueError(
            f"skip must be a 1-element int32 tensor on {device}, got {skip.numel()} {skip.dtype} element(s) on "
            f"{skip.device}; pass e.g. torch.zeros(1, dtype=torch.int32, device={str(device)!r})"
        )


@dataclass
class _GradTable:
    """This step's gradient addresses: host staging (pinned on CUDA) and a persistent device copy.

    On CUDA two staging buffers alternate, each with an event recorded after its copy, so the host never
    overwrites addresses that an earlier, still queued copy has yet to read.
    """

    device: torch.device
    n: int
    host: list[Tensor] = field(default_factory=list)
    events: list = field(default_factory=list)
    table: Tensor | None = None
    turn: int = 0
    last: array | None = None  # the addresses the device table holds

    def __post_init__(self) -> None:
        cuda = self.device.type == "cuda"
        self.host = [torch.empty(self.n, dtype=torch.int64, pin_memory=cuda) for _ in range(2 if cuda else 1)]
        self.events = [None] * len(self.host)
        self.table = torch.empty(self.n, dtype=torch.int64, device=self.device) if cuda else self.host[0]

    def upload(self, addresses: array) -> Tensor:
        """The device table holding `addresses`; nothing is copied when they are the last upload's (persistent
        gradients, and every replay of a captured step)."""
        if addresses == self.last:
            return self.table
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "lion_dist: the gradients' addresses changed while a CUDA graph was being captured; a graph replays "
                "fixed addresses, so keep the gradients alive between steps (zero_grad(set_to_none=False)) and take "
                "one step before capturing"
            )
        host = self.host[self.turn]
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()  # its previous copy has run (normally long ago)
        ctypes.memmove(host.data_ptr(), addresses.buffer_info()[0], 8 * self.n)
        if self.device.type == "cuda":
            self.table.copy_(host, non_blocking=True)
            event = self.events[self.turn] = self.events[self.turn] or torch.cuda.Event()
            event.record()
            self.turn = (self.turn + 1) % len(self.host)
        self.last = array("q", addresses)
        return self.table


@dataclass
class _Bucket:
    """One launch: the static tables of its tensors, and which of the plan's entries they are."""

    index: list[int] | None  # entries of the plan (None: all of them, in order)
    dtypes: int  # FP32, MIXED or FP64
    aligned: bool  # params and momenta all 16-byte aligned (gradients are checked every step)
    stochastic: bool  # holds a bf16 param (stochastic rounding applies to it)
    pm_ptrs: Tensor
    layout: Tensor
    block_tensor: Tensor
    n_blocks: int
    block: int
    grads: _GradTable


def _prepare_bucket(entries: Sequence[Entry], index: list[int], aligned: bool) -> _Bucket:
    device = entries[index[0]].param.device
    numels = [entries[i].param.numel() for i in index]
    block = _block_rule(max(numels))
    blocks = [triton.cdiv(n, block) for n in numels]
    first = list(itertools.accumulate(blocks, initial=0))[:-1]
    layout, pm = [], []
    for i, n, f in zip(index, numels, first, strict=True):
        e = entries[i]
        code = _CODE[e.param.dtype] | _CODE[e.grad_dtype] << 2 | _CODE[e.exp_avg.dtype] << 4
        layout += (n, f, *e.place, code)
        pm += (e.param.data_ptr(), e.exp_avg.data_ptr())
    block_tensor = [k for k, b in enumerate(blocks) for _ in range(b)]
    return _Bucket(
        index=None if index == list(range(len(entries))) else index,
        dtypes=_family((entries[index[0]].param.dtype, entries[index[0]].grad_dtype, entries[index[0]].exp_avg.dtype)),
        aligned=aligned,
        stochastic=any(entries[i].param.dtype == torch.bfloat16 for i in index),
        pm_ptrs=_on(device, pm, torch.int64),
        layout=_on(device, layout, torch.int64),
        block_tensor=_on(device, block_tensor, torch.int32),
        n_blocks=len(block_tensor),
        block=block,
        grads=_GradTable(device, len(index)),
    )


@dataclass
class _Int8Bucket:
    """One launch of the int8-momentum kernel: its static tables, and which of the plan's entries it holds."""

    index: list[int]  # entries of the plan
    dtypes: int  # FP32 (fp32 params and grads) or MIXED
    block: int  # BLOCK: the padded momentum block
    aligned: bool  # params and codes 16-byte aligned, rows and blocks multiples of 16 elements
    stochastic: bool  # holds a bf16 param
    pcs_ptrs: Tensor
    layout: Tensor
    program_tensor: Tensor
    n_programs: int
    grads: _GradTable


def _int8_aligned(e: Entry) -> bool:
    n = e.exp_avg.shape[-1] if e.exp_avg.dim() else 1
    return (e.param.data_ptr() | e.exp_avg.data_ptr()) % _ALIGN == 0 and n % 16 == 0 and e.format.block % 16 == 0


def _prepare_int8_bucket(entries: Sequence[Entry], index: list[int], block: int, aligned: bool) -> _Int8Bucket:
    device = entries[index[0]].param.device
    rows = _INT8_TILE // block
    layout, pcs, program_tensor = [], [], []
    for k, i in enumerate(index):
        e = entries[i]
        n = e.exp_avg.shape[-1] if e.exp_avg.dim() else 1
        param_id, base, shard = e.place
        per_row = -(-n // e.format.block)
        n_blocks = e.exp_avg.numel() // n * per_row
        programs = -(-n_blocks // rows)
        # every block's first element index is base + r * n + j * block: all multiples of 8 when their gcd is
        steps = math.gcd(base, n if n_blocks > per_row else 0, e.format.block if per_row > 1 else 0)
        code = _CODE[e.param.dtype] | _CODE[e.grad_dtype] << 2
        shard, quant_shard = shard & 0xFFFFFFFF, (shard | MOMENTUM_STREAM) & 0xFFFFFFFF
        layout += (n, e.format.block, per_row, n_blocks, len(program_tensor), param_id, base, shard, quant_shard, code)
        layout.append(int(steps % 8 == 0))
        pcs += (e.param.data_ptr(), e.exp_avg.data_ptr(), e.state[1].data_ptr())
        program_tensor += [k] * programs
    first = entries[index[0]]
    return _Int8Bucket(
        index=index,
        dtypes=FP32 if (first.param.dtype, first.grad_dtype) == (torch.float32,) * 2 else MIXED,
        block=block,
        aligned=aligned,
        stochastic=any(entries[i].param.dtype == torch.bfloat16 for i in index),
        pcs_ptrs=_on(device, pcs, torch.int64),
        layout=_on(device, layout, torch.int64),
        program_tensor=_on(device, program_tensor, torch.int32),
        n_programs=len(program_tensor),
        grads=_GradTable(device, len(index)),
    )


def _check_int8(i: int, e: Entry, device: torch.device) -> None:
    """Refuse what the int8 kernel cannot update: a clear error per entry."""
    (p, (codes, scales)), block = (e.param, e.state), e.format.block
    if (p.dtype, e.grad_dtype) not in itertools.product(PARAM_DTYPES[:3], repeat=2) or codes.dtype != torch.int8:
        raise TypeError(
            f"lion_triton: tensor {i} has int8 momentum with (param, grad, momentum) dtypes "
            f"{(p.dtype, e.grad_dtype, codes.dtype)}; supported: fp32/bf16/fp16 params and grads, int8 codes"
        )
    if e.compensation is not None:
        raise ValueError(f"lion_triton: tensor {i} has a Kahan compensation buffer; the Triton kernel has none")
    int8_padded_block(block)
    if scales.dtype != torch.float32 or scales.device != device or not scales.is_contiguous():
        raise ValueError(
            f"lion_triton: tensor {i}'s int8 scales must be contiguous fp32 on {device}, got {scales.dtype} on "
            f"{scales.device}{'' if scales.is_contiguous() else ', not contiguous'}"
        )
    if codes.shape != p.shape or tuple(scales.shape) != int8_scale_shape(codes.shape, block):
        raise ValueError(
            f"lion_triton: tensor {i} has param shape {tuple(p.shape)}, codes {tuple(codes.shape)} and scales "
            f"{tuple(scales.shape)}; int8 momentum needs codes shaped as the param and scales of shape "
            f"{int8_scale_shape(p.shape, block)} (block {block})"
        )
    if scales.data_ptr() == 0:
        raise TypeError(f"lion_triton: tensor {i}'s int8 scales have no storage (a DTensor?): pass the local shard")


@dataclass
class _Prepared:
    device: torch.device
    buckets: list[_Bucket]
    no_skip: Tensor  # a zero flag, read when the step has none
    int8_buckets: list[_Int8Bucket] = field(default_factory=list)


def _lr_arguments(lr: float | Tensor, device: torch.device) -> tuple[float, int, int]:
    """(value, address, lr_kind) of an lr: a number, or a 1-element fp32/fp64 tensor on `device`."""
    if not isinstance(lr, Tensor):
        return float(lr), 0, LR_VALUE
    if lr.numel() != 1 or lr.device != device or lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"a tensor lr for the Triton kernel must be one fp32 or fp64 element on {device}, got {lr.numel()} "
            f"{lr.dtype} element(s) on {lr.device}"
        )
    return 0.0, lr.data_ptr(), LR_FP32_TENSOR if lr.dtype == torch.float32 else LR_FP64_TENSOR


def _step_address(step: Tensor, device: torch.device) -> int:
    if step.numel() != 1 or step.dtype != torch.int64 or step.device != device:
        raise ValueError(f"a device step count must be one int64 element on {device}, got {step!r:.80}")
    return step.data_ptr()


def prepare(entries: Sequence[Entry]) -> _Prepared:
    """Bucket non-empty contiguous tensors of one device by math dtype and alignment; upload the tables."""
    if not entries:
        return _Prepared(torch.device("cpu"), [], torch.zeros(1, dtype=torch.int32))
    device = entries[0].param.device
    check_device(device)
    pairs = [(e.param, e.exp_avg) for e in entries]
    names = [f"tensor {i}" for i in range(len(entries))]
    no_storage = torch.empty(0)  # data_ptr() 0: not checked
    pairs += [(e.state[1], no_storage) for e in entries if e.format.kind == "int8"]
    names += [f"tensor {i}'s int8 scales" for i, e in enumerate(entries) if e.format.kind == "int8"]
    refuse_overlaps(pairs, names)  # programs would race on shared memory
    buckets: dict[tuple, list[int]] = {}
    int8_buckets: dict[tuple, list[int]] = {}
    for i, e in enumerate(entries):
        p, m = e.param, e.exp_avg
        triple = (p.dtype, e.grad_dtype, m.dtype)
        if e.format.kind == "int8":
            _check_int8(i, e, device)
        elif triple not in FUSED_TRIPLES:
            raise TypeError(
                f"lion_triton: tensor {i} has (param, grad, momentum) dtypes {triple}, supported: any of "
                "fp32/bf16/fp16 each, or all fp64"
            )
        if p.device != device or m.device != device:
            raise ValueError(
                f"lion_triton: tensor {i}'s param and momentum are on {p.device} and {m.device}; tensor 0 is on "
                f"{device}: one device per plan"
            )
        if not (p.is_contiguous() and m.is_contiguous()) or m.numel() != p.numel() or not p.numel():
            raise ValueError(f"lion_triton: tensor {i} must be non-empty and contiguous, with a momentum like it")
        if 0 in (p.data_ptr(), m.data_ptr()):
            raise TypeError(
                "lion_triton takes local plain tensors with storage, got one whose data_ptr() is 0 (a DTensor?): "
                "pass its local shard, e.g. lion_dist.shards.local(t)"
            )
        if e.format.kind == "int8":
            family = FP32 if triple[:2] == (torch.float32,) * 2 else MIXED
            int8_buckets.setdefault((family, int8_padded_block(e.format.block), _int8_aligned(e)), []).append(i)
            continue
        aligned = (p.data_ptr() | m.data_ptr()) % _ALIGN == 0
        buckets.setdefault((_family(triple), aligned), []).append(i)
    with _on_device(device):
        return _Prepared(
            device,
            [_prepare_bucket(entries, index, aligned) for (_, aligned), index in buckets.items()],
            torch.zeros(1, dtype=torch.int32, device=device),
            [
                _prepare_int8_bucket(entries, index, block, aligned)
                for (_, block, aligned), index in int8_buckets.items()
            ],
        )


def step(prepared: _Prepared, grads: Sequence[Tensor], args: StepArgs) -> None:
    """One launch per bucket. `grads`: contiguous, on the plan's device, of the prepared dtypes and sizes.

    `args.quant_key`: the int8 momenta's stochastic requantization (None: to nearest); float momenta ignore it.
    """
    if not (prepared.buckets or prepared.int8_buckets):
        return
    hp, skip, sr_key, quant_key = args.hp, args.skip, args.sr_key, args.quant_key
    device = prepared.device
    _check_skip(skip, device)
    lr, lr_address, flags = _lr_arguments(hp.lr, device)
    key, step_address = sr_key or 0, 0
    if isinstance(sr_key, DeviceKey):
        key, step_address, flags = sr_key.base, _step_address(sr_key.step, device), flags | KEY_FROM_STEP
    sign = -1.0 if hp.maximize else 1.0  # fma(-g, b, x) == fma(g, -b, x) exactly
    values = (lr, lr_address, float(hp.beta1), sign * (1.0 - hp.beta1), float(hp.beta2), sign * (1.0 - hp.beta2))
    values += (float(hp.weight_decay), key, step_address)
    scalars = [h for value in values for h in halves(value)] + [flags]
    addresses = array("q", map(Tensor.data_ptr, grads))
    with _on_device(device):
        for bucket in prepared.buckets:
            g_addresses = (
                addresses if bucket.index is None else array("q", map(addresses.__getitem__, bucket.index))
            )
            g_table = bucket.grads.upload(g_addresses)
            aligned = bucket.aligned and not (np.bitwise_or.reduce(np.frombuffer(g_addresses, np.int64)) % _ALIGN)
            _lion_kernel[(bucket.n_blocks,)](
                bucket.pm_ptrs,
                g_table,
                bucket.layout,
                bucket.block_tensor,
                prepared.no_skip if skip is None else skip,
                *scalars,
                DTYPES=bucket.dtypes,
                BLOCK=bucket.block,
                ALIGNED=bool(aligned),
                STOCHASTIC=sr_key is not None and bucket.stochastic,
                num_warps=_BLOCKS[bucket.block],
                enable_fp_fusion=False,  # every fma is explicit: the compiler contracts nothing else
            )
        if prepared.int8_buckets:
            _step_int8(prepared, addresses, scalars, sr_key, quant_key, skip)


def _step_int8(
    prepared: _Prepared,
    addresses: array,
    args: list[int],
    sr_key: int | DeviceKey | None,
    quant_key: int | DeviceKey | None,
    skip: Tensor | None,
) -> None:
    """One launch of `_lion_int8_kernel` per int8 bucket: `args` are the float kernel's runtime arguments."""
    qkey, q_step_address, flags = quant_key or 0, 0, args[-1]
    if isinstance(quant_key, DeviceKey):
        qkey, q_step_address = quant_key.base, _step_address(quant_key.step, prepared.device)
        flags |= QUANT_KEY_FROM_STEP
    flags |= (PARAM_SR if sr_key is not None else 0) | (QUANT_SR if quant_key is not None else 0)
    int8_args = [*args[:-1], *halves(qkey), *halves(q_step_address), flags]
    for bucket in prepared.int8_buckets:
        g_addresses = array("q", map(addresses.__getitem__, bucket.index))
        g_table = bucket.grads.upload(g_addresses)
        aligned = bucket.aligned and not (np.bitwise_or.reduce(np.frombuffer(g_addresses, np.int64)) % _ALIGN)
        _lion_int8_kernel[(bucket.n_programs,)](
            bucket.pcs_ptrs,
            g_table,
            bucket.layout,
            bucket.program_tensor,
            prepared.no_skip if skip is None else skip,
            *int8_args,
            DTYPES=bucket.dtypes,
            BLOCK=bucket.block,
            ROWS=_INT8_TILE // bucket.block,
            ALIGNED=bool(aligned),
            STOCHASTIC=quant_key is not None or (sr_key is not None and bucket.stochastic),
            num_warps=_INT8_WARPS,
            enable_fp_fusion=False,
        )


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
