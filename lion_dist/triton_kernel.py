"""The fused Lion update in Triton: one launch per (param, grad, momentum) dtype triple, over many tensors.

Each launch reads a small table of raw pointers (three per tensor, rebuilt every step because grads get
reallocated) and a per-size layout (each tensor's numel and first block, and which tensor each block belongs
to: cached, since sizes do not change between steps). Every element of p, g and m is read once and p and m are
written once, with fp32 math and the rounding of `functional.lion_reference`: `x * a + y * b` is
`tl.fma(y, b, x * a)`, scalars enter as fp32, and `sign(c) + 0 * c` keeps a NaN visible.

Runtime values are kernel arguments, never constexprs: an lr schedule, a new stochastic-rounding seed or the
skip flag cause no recompilation and no host-device sync. Block sizes follow a rule (no `triton.autotune`,
which would rerun this in-place kernel). Cautious Lion needs a per-tensor mean before the update, so
`functional.resolve_backend` sends it to the foreach path and it never reaches this module.

Triton reads TRITON_INTERPRET when `triton` is first imported (its own library functions, e.g. `tl.philox`,
are jit-decorated then) and again when each kernel is decorated, i.e. when this module is imported. With
`TRITON_INTERPRET=1` set for the whole process, the kernel runs in Triton's interpreter on CPU tensors (how the
tests drive it without a GPU); otherwise it is compiled and needs CUDA tensors. A mix of the two cannot work,
so importing this module raises if the variable changed in between.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from lion_dist.functional import LionHyperparams

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MOMENTUM_DTYPES = (torch.float32, torch.bfloat16)
_ALLOWED = (PARAM_DTYPES, GRAD_DTYPES, MOMENTUM_DTYPES)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_MAX_BLOCK = 4096  # elements per program: 16 fp32 per thread at 8 warps, four 128-bit accesses per tensor
_ALIGN = 16  # bytes: the width of a vector access
_SEED_BITS = 31  # the seed travels as two int32 halves, so its type never changes and nothing recompiles


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
def _lion_block(
    p_ptrs,
    g_ptrs,
    m_ptrs,
    mask,
    offs,
    tensor,
    hp,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Lion on one block of one tensor; `mask` is None for a full block, so its accesses stay vectorized."""
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, seed = hp
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    c = tl.fma(g, one_minus_beta1, m * beta1)
    u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)) + c * 0.0
    p = tl.fma(u, -lr, p * decay)
    m = tl.fma(g, one_minus_beta2, m * beta2)
    if p_ptrs.dtype.element_ty == tl.bfloat16:
        if STOCHASTIC:  # Philox counters (element offset, tensor index): a distinct draw per element of the launch
            zero = tl.zeros_like(offs).to(tl.uint32)
            counter_hi = (offs >> 32).to(tl.uint32)
            noise, _, _, _ = tl.philox(seed, offs.to(tl.uint32), counter_hi, zero + tensor.to(tl.uint32), zero)
            p = _round_to_bf16(p, (noise & 0xFFFF).to(tl.int32))
        else:
            p = _round_to_bf16(p, 0x7FFF + ((p.to(tl.int32, bitcast=True) >> 16) & 1))
    if m_ptrs.dtype.element_ty == tl.bfloat16:
        m = _round_to_bf16(m, 0x7FFF + ((m.to(tl.int32, bitcast=True) >> 16) & 1))
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)
    tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _lion_kernel(
    ptrs,
    layout,
    block_tensor,
    skip,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    decay,
    seed_lo,
    seed_hi,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """One program per block: find its tensor in the layout, then update BLOCK elements of it.

    `ptrs` holds (p, g, m) addresses per tensor, `layout` (numel, first block) per tensor, `block_tensor` the
    tensor of each block. With HAS_SKIP, a non-zero `skip[0]` makes every program return without writing.
    """
    flag = tl.load(skip) if HAS_SKIP else 0
    if flag == 0:
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        numel = tl.load(layout + 2 * t)
        start = (pid - tl.load(layout + 2 * t + 1)).to(tl.int64) * BLOCK
        p_base = tl.load(ptrs + 3 * t).to(tl.pointer_type(P_DTYPE))
        g_base = tl.load(ptrs + 3 * t + 1).to(tl.pointer_type(G_DTYPE))
        m_base = tl.load(ptrs + 3 * t + 2).to(tl.pointer_type(M_DTYPE))
        if ALIGNED:  # every base address is 16-byte aligned (checked on the host): allow 128-bit accesses
            p_base = tl.multiple_of(p_base, 16)
            g_base = tl.multiple_of(g_base, 16)
            m_base = tl.multiple_of(m_base, 16)
        offs = start + tl.arange(0, BLOCK)
        seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
        hp = (lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, seed)
        p_ptrs, g_ptrs, m_ptrs = p_base + offs, g_base + offs, m_base + offs
        if start + BLOCK <= numel:
            _lion_block(p_ptrs, g_ptrs, m_ptrs, None, offs, t, hp, MAXIMIZE, STOCHASTIC)
        elif numel % 16 == 0:  # the same mask, but the compiler sees it change only every 16 elements: vectorized
            _lion_block(p_ptrs, g_ptrs, m_ptrs, offs < (numel // 16) * 16, offs, t, hp, MAXIMIZE, STOCHASTIC)
        else:
            _lion_block(p_ptrs, g_ptrs, m_ptrs, offs < numel, offs, t, hp, MAXIMIZE, STOCHASTIC)


def interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 when it was imported)."""
    return not isinstance(_lion_kernel, JITFunction)


if interpreted() == isinstance(tl.zeros_like, JITFunction):
    raise ImportError(
        f"TRITON_INTERPRET changed between `import triton` and `import lion_dist.triton_kernel` (the kernel would "
        f"be {'interpreted' if interpreted() else 'compiled'}, Triton's library functions not), and Triton reads "
        "it at both: set it, or unset it, in the environment before the process imports triton"
    )


def _block_rule(max_numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 4096 elements on 8 warps, smaller for a bucket of only small tensors."""
    block = min(_MAX_BLOCK, max(128, triton.next_power_of_2(max_numel)))
    return block, max(1, min(8, block // 512))


def _upload(table: Tensor, device: torch.device) -> Tensor:
    """A host table on `device`: through pinned memory and non_blocking on CUDA, so the host never waits."""
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _layout(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Per tensor (numel, first block) as int64, and each block's tensor as int32: fixed while sizes are."""
    blocks = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    first = torch.cumsum(blocks, 0) - blocks
    layout = torch.stack([torch.tensor(numels, dtype=torch.int64), first], dim=1).reshape(-1)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    return _upload(layout, device), _upload(block_tensor, device), int(blocks.sum())


def _check_device(device: torch.device, skip: Tensor | None) -> None:
    """Raise unless this module's mode can run tensors on `device` and `skip` is a flag there."""
    if interpreted() and device.type != "cpu":
        raise RuntimeError(
            f"lion_triton runs in Triton's interpreter (TRITON_INTERPRET=1), which reads raw host addresses: "
            f"it takes CPU tensors, got {device} ones. Unset TRITON_INTERPRET to run the compiled kernel on CUDA."
        )
    if not interpreted() and device.type != "cuda":
        raise RuntimeError(
            f"the Triton Lion kernel needs CUDA tensors, got {device} ones. Use backend='foreach' or "
            "backend='cpu_fused' on CPU (or backend='auto'), or set TRITON_INTERPRET=1 in the environment before "
            "the process imports triton to run the kernel in Triton's (slow) interpreter for testing."
        )
    if skip is not None and (skip.numel() != 1 or skip.dtype != torch.int32 or skip.device != device):
        raise ValueError(
            f"skip must be a 1-element int32 tensor on {device}, got {skip.numel()} {skip.dtype} element(s) on "
            f"{skip.device}; pass e.g. torch.zeros(1, dtype=torch.int32, device={str(device)!r})"
        )


class _Bucket:
    """The tensors of one dtype triple: their table entries, and contiguous copies to write back."""

    def __init__(self, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]) -> None:
        for name, dtype, allowed in zip(("param", "grad", "momentum"), dtypes, _ALLOWED, strict=True):
            if dtype not in allowed:
                raise TypeError(f"lion_triton: a {name} has dtype {dtype}; supported: {allowed}")
        self.dtypes = dtypes
        self.addresses: list[int] = []
        self.numels: list[int] = []
        self.write_back: list[tuple[Tensor, Tensor]] = []
        self.keep_alive: list[Tensor] = []

    def add_non_contiguous(self, p: Tensor, g: Tensor, m: Tensor, numel: int) -> None:
        contiguous = [t.contiguous() for t in (p, g, m)]
        self.write_back += [(t, c) for t, c in ((p, contiguous[0]), (m, contiguous[2])) if c is not t]
        self.keep_alive.append(contiguous[1])
        self.addresses += (t.data_ptr() for t in contiguous)
        self.numels.append(numel)


def _buckets(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor]) -> list[_Bucket]:
    """Group non-empty tensors by dtype triple, checking what could make the kernel touch wrong memory.

    This runs for every tensor at every step, so it makes as few calls into torch as it can.
    """
    device = params[0].get_device()
    buckets: dict[tuple[torch.dtype, ...], _Bucket] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        numel = p.numel()
        if g.numel() != numel or m.numel() != numel:
            raise ValueError(f"lion_triton: param {i} has {numel} elements, its grad {g.numel()}, momentum {m.numel()}")
        if p.get_device() != device or g.get_device() != device or m.get_device() != device:
            raise ValueError(
                f"lion_triton: param {i}, its grad and momentum are on {p.device}, {g.device} and {m.device}; "
                f"param 0 is on {params[0].device}: one device per call"
            )
        if not numel:
            continue
        key = (p.dtype, g.dtype, m.dtype)
        bucket = buckets.get(key) or buckets.setdefault(key, _Bucket(key))
        if p.is_contiguous() and g.is_contiguous() and m.is_contiguous():
            bucket.addresses += (p.data_ptr(), g.data_ptr(), m.data_ptr())
            bucket.numels.append(numel)
        else:
            bucket.add_non_contiguous(p, g, m, numel)
    for bucket in buckets.values():
        if 0 in bucket.addresses:
            raise TypeError(
                "lion_triton takes local plain tensors with storage, got one whose data_ptr() is 0 (a DTensor?): "
                "pass its local shard, e.g. lion_dist.shards.local(t)"
            )
    return list(buckets.values())


def lion_triton(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hp: LionHyperparams,
    *,
    skip: Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """One Lion step, in place, on local tensors of one device: one kernel launch per dtype triple.

    Equal to `functional.lion_reference` (fp32 bit for bit; bf16/fp16 the fp32 result rounded once to
    nearest). `skip`: a 1-element int32 device tensor; non-zero means write nothing (read on the device).
    `sr_seed`: round bf16 params stochastically with Philox noise, reproducible from the seed.
    Non-contiguous tensors are updated through contiguous copies; empty tensors are skipped.
    """
    if hp.cautious_factor is not None or hp.cautious_wd:
        raise ValueError(
            "lion_triton is single-pass and has no cautious variant (it needs a per-tensor mean first); "
            "cautious Lion runs on backend='foreach' (functional.resolve_backend picks it)"
        )
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(
            f"lion_triton needs one grad and one momentum per param, got {len(params)} params, "
            f"{len(grads)} grads and {len(exp_avgs)} momenta"
        )
    if not params:
        return
    device = params[0].device
    _check_device(device, skip)
    seed = 0 if sr_seed is None else sr_seed % (1 << 2 * _SEED_BITS)
    scalars = (
        hp.lr,
        hp.beta1,
        1 - hp.beta1,
        hp.beta2,
        1 - hp.beta2,
        hp.decay,
        seed & ((1 << _SEED_BITS) - 1),
        seed >> _SEED_BITS,
    )
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for bucket in _buckets(params, grads, exp_avgs):
            p_dtype, g_dtype, m_dtype = bucket.dtypes
            block, num_warps = _block_rule(max(bucket.numels))
            layout, block_tensor, n_blocks = _layout(tuple(bucket.numels), block, device)
            table = _upload(torch.tensor(bucket.addresses, dtype=torch.int64), device)
            _lion_kernel[(n_blocks,)](
                table,
                layout,
                block_tensor,
                table if skip is None else skip,
                *scalars,
                P_DTYPE=_TL_DTYPES[p_dtype],
                G_DTYPE=_TL_DTYPES[g_dtype],
                M_DTYPE=_TL_DTYPES[m_dtype],
                BLOCK=block,
                ALIGNED=functools.reduce(operator.or_, bucket.addresses) % _ALIGN == 0,
                HAS_SKIP=skip is not None,
                MAXIMIZE=hp.maximize,
                STOCHASTIC=sr_seed is not None and p_dtype == torch.bfloat16,
                num_warps=num_warps,
                enable_fp_fusion=False,  # every fma is explicit: the compiler contracts nothing else
            )
            for original, copy in bucket.write_back:
                original.copy_(copy)
