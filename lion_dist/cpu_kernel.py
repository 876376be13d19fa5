"""The fused CPU Lion step: a small C kernel, compiled on first use and cached, called through ctypes.

Why C and not torch.compile: one pass over p, g, m is all the step needs, and a C loop over a table of
(pointer, size) entries does any number of tensors in one call. It compiles in about a second with the
system's C compiler (`$CC`, else `cc`, `gcc` or `clang`), whereas compiling a multi-tensor step with inductor
takes minutes for thousands of tensors (issue 8). The library is built with `-march=native` for this CPU and
cached under `$LION_DIST_CACHE` (default `$XDG_CACHE_HOME/lion_dist`, i.e. `~/.cache/lion_dist`), keyed by
the source, the compiler, the CPU and the OpenMP runtime; a build writes a temporary file and renames it into
place, so processes building at the same time never load a half-written library.

Results equal `functional.lion_reference` bit for bit (fp32 math, same roundings); bf16 params get stochastic
rounding when a seed is given, from a counter-based RNG (reproducible for any thread count, unbiased, but not
the same draws as the reference's torch.Generator). Params, grads and momentum may each be fp32 or bf16;
tensors with any other dtype (fp16, fp64) go to `functional.lion_foreach`. Non-contiguous tensors are copied
to contiguous ones and back. Threads: `torch.get_num_threads()` of torch's own OpenMP pool (the library links
to the OpenMP runtime torch loaded, see `openmp_runtime()`), else as many pthreads.

`LION_DIST_CPU_KERNEL=0` turns the kernel off (backend="auto" then uses foreach on CPU).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from lion_dist.functional import LionHyperparams, lion_foreach, stochastic_rounding_generator

SOURCE = Path(__file__).with_name("_cpu_kernel.c")
ABI_VERSION = 4
# -ffp-contract=off: no fma the reference does not have; -funroll-loops: more loads in flight, a faster step.
_FLAGS = ("-O3", "-funroll-loops", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
_NATIVE = ("-march=native",)
_BF16_BIT = {torch.float32: 0, torch.bfloat16: 1}
# dtype code of a (param, grad, momentum) triple: bit 0 param bf16, bit 1 grad bf16, bit 2 momentum bf16.
_CODES = {
    (p, g, m): _BF16_BIT[p] | _BF16_BIT[g] << 1 | _BF16_BIT[m] << 2
    for p in _BF16_BIT
    for g in _BF16_BIT
    for m in _BF16_BIT
}


class CpuKernelUnavailableError(RuntimeError):
    """The fused CPU kernel could not be built or loaded (the message says why and what to do)."""


def cache_dir() -> Path:
    """Where built kernels are kept: `$LION_DIST_CACHE`, else `$XDG_CACHE_HOME/lion_dist` (`~/.cache/lion_dist`)."""
    if os.environ.get("LION_DIST_CACHE"):
        return Path(os.environ["LION_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_dist"


def compiler() -> str | None:
    """The C compiler to build with: `$CC`, else the first of cc, gcc, clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in lines:
                    lines.append(line)
                if not line.strip() and lines:
                    break  # the first processor's entry is enough
    except OSError:
        pass
    return platform.machine() + "".join(lines)


_OPENMP_LIBRARY = re.compile(r"^lib(gomp|iomp5|omp)\b.*\.so")


def openmp_runtime() -> Path | None:
    """The OpenMP runtime this process has loaded (torch's, on Linux), or None.

    The kernel links to exactly this file, so its threads are torch's threads: a second runtime would leave
    torch's idle workers spinning on the cores the kernel needs (measured: up to 1.25x slower steps).
    """
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and _OPENMP_LIBRARY.match(os.path.basename(fields[5].strip())):
                    return Path(fields[5].strip())
    except OSError:
        pass
    return None


def _library_path(cc: str, flags: Sequence[str], runtime: Path | None, directory: Path) -> Path:
    key = hashlib.sha256()
    parts = [SOURCE.read_bytes(), os.path.realpath(cc), os.stat(cc).st_mtime_ns, flags, _cpu_signature(), str(runtime)]
    if runtime is not None:
        parts.append(os.stat(runtime).st_mtime_ns)
    for part in parts:
        key.update(repr(part).encode())
    kind = "openmp" if runtime is not None else "pthreads"
    return directory / f"lion_cpu_kernel_v{ABI_VERSION}_{kind}_{key.hexdigest()[:20]}.so"


def _compile_commands(cc: str, flags: Sequence[str], runtime: Path | None, out: str) -> list[list[str]]:
    if runtime is None:
        return [[cc, *flags, "-o", out, str(SOURCE), "-lm"]]
    obj = out + ".o"  # compile with -fopenmp, then link to torch's runtime file (not the compiler's libgomp)
    return [
        [cc, *flags, "-fopenmp", "-c", "-o", obj, str(SOURCE)],
        [cc, *flags, "-o", out, obj, str(runtime), f"-Wl,-rpath,{runtime.parent}", "-lm"],
    ]


def build(directory: Path | None = None, *, openmp: bool = True) -> Path:
    """Compile the kernel into `directory` unless it is there already; return its path.

    The default directory is `cache_dir()`, or a per-user one in the temporary directory when that is not
    writable. Tries, in order: OpenMP on torch's runtime (`openmp_runtime()`; not with `openmp=False`), then
    pthreads; each with `-march=native`, then portable flags. Raises `CpuKernelUnavailableError` with the
    compiler's output when nothing works.
    """
    if directory is None:
        try:
            return build(cache_dir(), openmp=openmp)
        except OSError:  # e.g. a read-only home directory: build in the temporary directory instead
            uid = os.getuid() if hasattr(os, "getuid") else 0
            return build(Path(tempfile.gettempdir()) / f"lion_dist-{uid}", openmp=openmp)
    cc = compiler()
    if cc is None:
        raise CpuKernelUnavailableError(
            "no C compiler found (tried $CC, cc, gcc, clang); install one (e.g. apt-get install gcc) "
            "or set CC, or use backend='foreach'"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    runtimes = dict.fromkeys([openmp_runtime() if openmp else None, None])  # OpenMP first when there is one
    for runtime, flags in itertools.product(runtimes, (_FLAGS + _NATIVE, _FLAGS)):
        target = _library_path(cc, flags, runtime, directory)
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=directory)
        os.close(fd)
        try:
            for command in _compile_commands(cc, flags, runtime, tmp):
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    errors.append(f"{' '.join(command)}:\n{proc.stderr.strip()[-2000:]}")
                    break
            else:
                os.replace(tmp, target)  # atomic: a concurrent build or load sees a whole file or none
                return target
        finally:
            for leftover in (tmp, tmp + ".o"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    raise CpuKernelUnavailableError(
        "could not compile lion_dist's CPU kernel:\n" + "\n".join(errors) + "\nUse backend='foreach' meanwhile."
    )


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.lion_abi_version() != ABI_VERSION:
        raise CpuKernelUnavailableError(f"{path} has ABI {lib.lion_abi_version()}, expected {ABI_VERSION}")
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lion_step.argtypes = [i64, vp, vp, vp, vp, vp, vp, i32, ctypes.c_uint64, i32, vp]
    lib.lion_step.restype = None
    lib.lion_nonfinite.argtypes = [i64, vp, vp, vp, vp, i32, vp]
    lib.lion_nonfinite.restype = None
    return lib


class _Loaded(NamedTuple):
    lib: ctypes.CDLL | None
    reason: str | None  # why it is unavailable
    seconds: float  # spent building and loading it
    path: Path | None


@functools.cache
def _library() -> _Loaded:
    """The kernel, built or loaded once per process."""
    if os.environ.get("LION_DIST_CPU_KERNEL", "1") == "0":
        return _Loaded(None, "LION_DIST_CPU_KERNEL=0 is set", 0.0, None)
    start = time.perf_counter()
    try:
        path = build()
        lib = _load(path)
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
    return _library().lib is not None


def unavailable_reason() -> str | None:
    """Why the kernel is unavailable (None when it is available)."""
    return _library().reason


def load_seconds() -> float:
    """Seconds this process spent building (first use on this machine) or loading the kernel."""
    return _library().seconds


def library_path() -> Path | None:
    """The kernel library in use; its name says whether it runs on torch's OpenMP threads or on pthreads."""
    return _library().path


def _require() -> ctypes.CDLL:
    loaded = _library()
    if loaded.lib is None:
        raise CpuKernelUnavailableError(f"backend='cpu_fused' is unavailable: {loaded.reason}")
    return loaded.lib


def _address(a: array) -> int:
    return a.buffer_info()[0]


_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")


@dataclass
class _Table:
    """What the kernel reads: per tensor three pointers, the element count and the dtype code."""

    p_ptrs: array
    g_ptrs: array
    m_ptrs: array
    numels: array
    codes: array
    write_back: list[tuple[Tensor, Tensor]]  # (original, contiguous copy the kernel updated)
    keep_alive: list[Tensor]  # contiguous copies of non-contiguous grads
    others: list[int]  # tensors with dtypes the kernel does not take


def _uniform_table(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor]) -> _Table | None:
    """The table of the common case, built with C-level loops (map): one dtype triple, contiguous CPU tensors."""
    lists = (params, grads, exp_avgs)
    if not (len(params) == len(grads) == len(exp_avgs)):
        return None
    dtypes = [set(map(_dtype, ts)) for ts in lists]
    if any(len(d) != 1 for d in dtypes):
        return None
    code = _CODES.get(tuple(d.pop() for d in dtypes))
    if code is None or not all(all(map(_is_cpu, ts)) and all(map(Tensor.is_contiguous, ts)) for ts in lists):
        return None
    numels = array("q", map(Tensor.numel, params))
    if array("q", map(Tensor.numel, grads)) != numels or array("q", map(Tensor.numel, exp_avgs)) != numels:
        return None
    p_ptrs, g_ptrs, m_ptrs = (array("q", map(Tensor.data_ptr, ts)) for ts in lists)
    return _Table(p_ptrs, g_ptrs, m_ptrs, numels, array("B", [code]) * len(params), [], [], [])


def _general_table(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor]) -> _Table:
    """The table for anything else: mixed dtypes, non-contiguous tensors (copied), unsupported dtypes (set aside)."""
    table = _Table(array("q"), array("q"), array("q"), array("q"), array("B"), [], [], [])
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        n = p.numel()
        if not (p.is_cpu and g.is_cpu and m.is_cpu) or g.numel() != n or m.numel() != n:
            raise ValueError(
                f"lion_cpu_fused needs CPU tensors with equal numbers of elements, got tensor {i}: param "
                f"{tuple(p.shape)} {p.dtype} on {p.device}, grad {tuple(g.shape)} {g.dtype} on {g.device}, "
                f"momentum {tuple(m.shape)} {m.dtype} on {m.device}"
            )
        code = _CODES.get((p.dtype, g.dtype, m.dtype))
        if code is None:
            table.others.append(i)
            continue
        if not p.is_contiguous():
            table.write_back.append((p, p := p.contiguous()))
        if not m.is_contiguous():
            table.write_back.append((m, m := m.contiguous()))
        if not g.is_contiguous():
            table.keep_alive.append(g := g.contiguous())
        table.p_ptrs.append(p.data_ptr())
        table.g_ptrs.append(g.data_ptr())
        table.m_ptrs.append(m.data_ptr())
        table.numels.append(n)
        table.codes.append(code)
    return table


def lion_cpu_fused(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hp: LionHyperparams,
    *,
    sr_seed: int | None = None,
) -> None:
    """One Lion step, in place, on local CPU tensors: one pass over each element, one call for all tensors.

    `sr_seed`: stochastic rounding of bf16 params, a function of (seed, position in the list, element).
    Triples with a dtype other than fp32/bf16 are updated by `functional.lion_foreach`.
    """
    if hp.cautious_factor is not None or hp.cautious_wd:
        raise ValueError("the fused CPU kernel does plain Lion only; cautious Lion runs on backend='foreach'")
    lib = _require()
    table = _uniform_table(params, grads, exp_avgs) or _general_table(params, grads, exp_avgs)
    if table.numels:
        offsets = array("q", bytes(8 * (len(table.numels) + 1)))  # scratch; named, so alive during the call
        sign = -1.0 if hp.maximize else 1.0  # maximize: fma(-g, b, x) == fma(g, -b, x) exactly
        decay = hp.decay if hp.weight_decay != 0 else 1.0
        hp_values = array("f", [hp.beta1, sign * (1 - hp.beta1), hp.beta2, sign * (1 - hp.beta2), -hp.lr, decay])
        lib.lion_step(
            len(table.numels),
            _address(table.p_ptrs),
            _address(table.g_ptrs),
            _address(table.m_ptrs),
            _address(table.numels),
            _address(table.codes),
            _address(hp_values),
            int(sr_seed is not None),
            (sr_seed or 0) % (1 << 64),
            torch.get_num_threads(),
            _address(offsets),
        )
        for dst, src in table.write_back:
            dst.copy_(src)
    if table.others:
        lion_foreach(
            [params[i] for i in table.others],
            [grads[i] for i in table.others],
            [exp_avgs[i] for i in table.others],
            hp,
            sr_generator=None if sr_seed is None else stochastic_rounding_generator(sr_seed, torch.device("cpu")),
        )


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor | None:
    """Per tensor, 1 if it holds a NaN or an Inf, else 0 (a uint8 tensor), reading each once with all threads.

    None when the kernel is unavailable or a tensor is not an fp32/bf16 CPU tensor (the caller then checks
    another way).
    """
    lib = _library().lib
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
        _address(ptr_table),
        _address(numel_table),
        _address(codes),
        flags.data_ptr(),
        torch.get_num_threads(),
        _address(offsets),
    )
    return flags
