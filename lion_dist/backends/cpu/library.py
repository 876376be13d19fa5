"""The fused CPU kernel as a loaded library: its ABI (dtype codes, entry points) and thin calls.

Loaded once per process (`library()`), building it first if needed (`build.py`); when that fails the reason is
kept and warned once, and `backend="auto"` routes CPU tensors to foreach. `LION_DIST_CPU_KERNEL=0` turns it off.
Threads: `torch.get_num_threads()` of torch's own OpenMP pool, else as many pthreads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
import warnings
from array import array
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from lion_dist.backends import FUSED_TRIPLES
from lion_dist.backends.cpu.build import ABI_VERSION, CpuKernelUnavailableError, build
from lion_dist.spec import NoiseStream

_BF16_BIT = {torch.float32: 0, torch.bfloat16: 1}  # the non-finite check's dtype codes
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
# dtype code of a (param, grad, momentum) triple, two bits each: param | grad << 2 | momentum << 4
CODES = {
    triple: _DTYPE_CODE[triple[0]] | _DTYPE_CODE[triple[1]] << 2 | _DTYPE_CODE[triple[2]] << 4
    for triple in FUSED_TRIPLES
}
MASK32 = 0xFFFFFFFF
INT8_MAX_BLOCK = 4096  # the C loop's per-block stack buffers (MAX_INT8_BLOCK)
# dtype code of an int8-momentum entry: param | grad << 2
INT8_CODES = {(p, g): _DTYPE_CODE[p] | _DTYPE_CODE[g] << 2 for (p, g, _) in FUSED_TRIPLES if p != torch.float64}
KAHAN_DTYPES = (torch.bfloat16, torch.float16)  # params the kernel Kahan-compensates (a buffer of their dtype)
# dtype code of the split step's second half: param | direction << 2 (fp32 directions; fp64 ones for fp64 params)
APPLY_CODES = {
    (p, u): _DTYPE_CODE[p] | _DTYPE_CODE[u] << 2
    for p, u in [*((p, torch.float32) for p in _DTYPE_CODE), (torch.float64, torch.float64)]
}
# lion_has_loop's kinds: which loops the library must have, for which codes
_LOOP_KINDS = {
    "step": (0, CODES),
    "step with compensation": (1, {t: c for t, c in CODES.items() if t[0] in KAHAN_DTYPES}),
    "int8 step": (2, INT8_CODES),
    "int8 step with compensation": (3, {t: c for t, c in INT8_CODES.items() if t[0] in KAHAN_DTYPES}),
    "direction": (4, CODES),
    "apply": (5, APPLY_CODES),
    "apply with compensation": (6, {t: c for t, c in APPLY_CODES.items() if t[0] in KAHAN_DTYPES}),
}


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.lion_abi_version() != ABI_VERSION:
        raise CpuKernelUnavailableError(f"{path} has ABI {lib.lion_abi_version()}, expected {ABI_VERSION}")
    vp, i64, i32, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    signatures = {
        "lion_step": [i64, vp, vp, vp, vp, vp, vp, vp, vp, u32, u32, i32],
        "lion_step_int8": [i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32, u32, u32, i32, u32, u32, i32],
        "lion_direction": [i64, vp, vp, vp, vp, vp, vp, i32],
        "lion_apply": [i64, vp, vp, vp, vp, vp, vp, vp, u32, u32, i32],
        "lion_nonfinite": [i64, vp, vp, vp, vp, i32, vp],
        "lion_sr_noise": [i64, vp, u32, u32, u32, i64, u32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.lion_has_loop.argtypes = [i32, i32]
    lib.lion_philox_impl.restype = ctypes.c_char_p
    missing = [
        f"{kind} {tuple(str(d).removeprefix('torch.') for d in key)}"
        for kind, (number, codes) in _LOOP_KINDS.items()
        for key, code in codes.items()
        if not lib.lion_has_loop(number, code)
    ]
    if missing:
        raise CpuKernelUnavailableError(f"{path} has no loop for: {', '.join(missing)}")
    if lib.lion_int8_max_block() != INT8_MAX_BLOCK:
        raise CpuKernelUnavailableError(f"{path} takes int8 blocks up to {lib.lion_int8_max_block()}")
    return lib


class _Loaded(NamedTuple):
    lib: ctypes.CDLL | None
    reason: str | None  # why it is unavailable
    seconds: float  # spent building and loading it
    path: Path | None


@functools.cache
def library() -> _Loaded:
    """The kernel, built or loaded once per process."""
    if os.environ.get("LION_DIST_CPU_KERNEL", "1") == "0":
        return _Loaded(None, "LION_DIST_CPU_KERNEL=0 is set", 0.0, None)
    start = time.perf_counter()
    try:
        path = build()
        lib = load(path)
    except Exception as e:  # a missing compiler, a read-only cache, a failed build: fall back, say why once
        reason = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"lion_dist: the fused CPU kernel is unavailable, so CPU steps and non-finite checks use slower torch "
            f"ops ({reason})",
            RuntimeWarning,
            stacklevel=3,
        )
        return _Loaded(None, reason, time.perf_counter() - start, None)
    return _Loaded(lib, None, time.perf_counter() - start, path)


def is_available() -> bool:
    """Whether the fused CPU kernel can run here. The first call builds it if needed (~1 s); never raises."""
    return library().lib is not None


def unavailable_reason() -> str | None:
    """Why the kernel is unavailable (None when it is available)."""
    return library().reason


def load_seconds() -> float:
    """Seconds this process spent building (first use on this machine) or loading the kernel."""
    return library().seconds


def library_path() -> Path | None:
    """The kernel library in use; its name says whether it runs on torch's OpenMP threads or on pthreads."""
    return library().path


def require() -> ctypes.CDLL:
    loaded = library()
    if loaded.lib is None:
        raise CpuKernelUnavailableError(f"backend='cpu_fused' is unavailable: {loaded.reason}")
    return loaded.lib


def address(a: array) -> int:
    return a.buffer_info()[0]


_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_data_ptr = Tensor.data_ptr


def sr_noise(stream: NoiseStream, numel: int) -> Tensor:
    """`spec.sr_noise(stream, numel)` computed by the C kernel: the same values, without the torch Philox's
    microsecond per element (the foreach backend requantizes int8 momenta with it on CPU)."""
    out = torch.empty(numel, dtype=torch.int32)
    key = stream.key
    require().lion_sr_noise(
        numel,
        out.data_ptr(),
        key & MASK32,
        key >> 32 & MASK32,
        stream.param_id & MASK32,
        stream.base,
        stream.shard & MASK32,
    )
    return out


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor | None:
    """Per tensor, 1 if it holds a NaN or an Inf, else 0 (a uint8 tensor), reading each once with all threads.

    None when the kernel is unavailable or a tensor is not an fp32/bf16 CPU tensor (the caller then checks
    another way).
    """
    lib = library().lib
    dtypes = set(map(_dtype, tensors))
    if lib is None or not dtypes.issubset(_BF16_BIT) or not all(map(_is_cpu, tensors)):
        return None
    if not all(map(Tensor.is_contiguous, tensors)):
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]  # alive until the call returns
    if len(dtypes) == 1:
        codes = array("B", [_BF16_BIT[dtypes.pop()]]) * len(tensors)
    else:
        codes = array("B", [_BF16_BIT[t.dtype] for t in tensors])
    flags = torch.zeros(len(tensors), dtype=torch.uint8)
    ptr_table = array("q", map(Tensor.data_ptr, tensors))
    numel_table = array("q", map(Tensor.numel, tensors))
    offsets = array("q", bytes(8 * (len(tensors) + 1)))  # scratch; named, so alive during the call
    lib.lion_nonfinite(
        len(tensors),
        address(ptr_table),
        address(numel_table),
        address(codes),
        flags.data_ptr(),
        torch.get_num_threads(),
        address(offsets),
    )
    return flags


def philox_impl() -> str:
    """Which Philox the loaded kernel computes its noise with: "avx512", "avx2" or "portable" (`philox.h`)."""
    return require().lion_philox_impl().decode()
