"""The fused CPU Lion step: a small C kernel, compiled on first use and cached, called through ctypes.

Why C and not torch.compile: one pass over p, g, m is all the step needs, and a C loop over a table of
(pointer, size) entries does any number of tensors in one call. It compiles in about a second with the
system's C compiler (`$CC`, else `cc`, `gcc` or `clang`), whereas compiling a multi-tensor step with inductor
takes minutes for thousands of tensors (issue 8). The library is built with `-march=native` for this CPU and
cached under `$LION_DIST_CACHE` (default `$XDG_CACHE_HOME/lion_dist`, i.e. `~/.cache/lion_dist`), keyed by
the source, the compiler, the CPU and the OpenMP runtime; a build writes a temporary file and renames it into
place, so processes building at the same time never load a half-written library.

Results equal `spec.lion_reference` bit for bit (same math dtype, same roundings), stochastic rounding of bf16
params included (the spec's Philox noise, reproducible for any thread count). Params, grads and momentum may
each be fp32, bf16 or fp16 (fp32 math), or all three fp64 (fp64 math); the backend declaration in
`lion_dist.backends` sends every other combination, and non-contiguous params or momenta, to another backend.
int8 momentum (an `Entry` with `scales`: codes and per-block fp32 scales) runs in a second loop of the same
library, `lion_step_int8`, equal to `spec.lion_reference_int8` bit for bit, stochastic requantization included;
a plan may mix both kinds (one C call each).
Threads: `torch.get_num_threads()` of torch's own OpenMP pool (the library links to the OpenMP runtime torch
loaded, see `openmp_runtime()`), else as many pthreads.

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

from lion_dist.backends import FUSED_TRIPLES, Backend, Entry, refuse_overlaps
from lion_dist.spec import MOMENTUM_STREAM, DeviceKey, LionHyperparams, NoiseStream, int8_scale_shape, key_value

SOURCE = Path(__file__).with_name("_cpu_kernel.c")
ABI_VERSION = 7
# -ffp-contract=off: no fma the reference does not have; -funroll-loops: more loads in flight, a faster step.
_FLAGS = ("-O3", "-funroll-loops", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
_NATIVE = ("-march=native",)
_BF16_BIT = {torch.float32: 0, torch.bfloat16: 1}  # the non-finite check's dtype codes
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
# dtype code of a (param, grad, momentum) triple, two bits each: param | grad << 2 | momentum << 4
_CODES = {
    triple: _DTYPE_CODE[triple[0]] | _DTYPE_CODE[triple[1]] << 2 | _DTYPE_CODE[triple[2]] << 4
    for triple in FUSED_TRIPLES
}
_MASK32 = 0xFFFFFFFF
INT8_MAX_BLOCK = 4096  # the C loop's per-block stack buffers (MAX_INT8_BLOCK)
# dtype code of an int8-momentum entry: param | grad << 2
_INT8_CODES = {(p, g): _DTYPE_CODE[p] | _DTYPE_CODE[g] << 2 for (p, g, _) in FUSED_TRIPLES if p != torch.float64}


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
    vp, i64, i32, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    lib.lion_step.argtypes = [i64, vp, vp, vp, vp, vp, vp, vp, u32, u32, i32]
    lib.lion_step.restype = None
    lib.lion_supports.argtypes = [i32]
    lib.lion_nonfinite.argtypes = [i64, vp, vp, vp, vp, i32, vp]
    lib.lion_nonfinite.restype = None
    lib.lion_step_int8.argtypes = [i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32, u32, u32, i32, u32, u32, i32]
    lib.lion_step_int8.restype = None
    lib.lion_int8_supports.argtypes = [i32]
    lib.lion_sr_noise.argtypes = [i64, vp, u32, u32, u32, i64, u32]
    lib.lion_sr_noise.restype = None
    missing = [triple for triple, code in _CODES.items() if not lib.lion_supports(code)]
    missing += [(*pair, torch.int8) for pair, code in _INT8_CODES.items() if not lib.lion_int8_supports(code)]
    if missing:
        raise CpuKernelUnavailableError(f"{path} has no loop for dtype triples {missing}")
    if lib.lion_int8_max_block() != INT8_MAX_BLOCK:
        raise CpuKernelUnavailableError(f"{path} takes int8 blocks up to {lib.lion_int8_max_block()}")
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
_data_ptr = Tensor.data_ptr


@dataclass
class _Prepared:
    """The static table of one plan: what the kernel reads besides the gradients' addresses.

    The float-momentum entries; `int8` holds those with int8 momentum (None when there are none). `float_index`
    lists the entries (positions in `grads`) this table holds, None when it holds all of them.
    """

    p_ptrs: array
    m_ptrs: array
    offsets: array  # n + 1 prefix sums of the element counts
    codes: array
    streams: array  # per tensor: param id, base, shard (stochastic rounding)
    int8: _Int8Table | None = None
    float_index: list[int] | None = None


@dataclass
class _Int8Table:
    """The int8-momentum entries of a plan, for `lion_step_int8`: one element of these tables per tensor."""

    p_ptrs: array
    q_ptrs: array  # the codes (int8, the param's shape)
    s_ptrs: array  # the scales (fp32, `spec.int8_scale_shape`)
    offsets: array  # n + 1 prefix sums of the element counts
    codes: array  # param | grad << 2
    blocks: array  # per tensor: row length (the last dim), elements per scale
    streams: array  # per tensor: param id, base, shard, shard | MOMENTUM_STREAM
    index: list[int]  # positions in the entry list (and in `grads`)


def _int8_entry_error(i: int, e: Entry) -> str | None:
    """Why int8-momentum entry `i` cannot run in the kernel (None: it can)."""
    p, q, s = e.param, e.exp_avg, e.scales
    if (p.dtype, e.grad_dtype) not in _INT8_CODES or q.dtype != torch.int8 or s.dtype != torch.float32:
        return (
            f"with int8 momentum the param and grad must be fp32, bf16 or fp16 and the codes int8, the scales fp32; "
            f"got param {p.dtype}, grad {e.grad_dtype}, codes {q.dtype}, scales {s.dtype}"
        )
    if not all(t.is_cpu and t.is_contiguous() for t in (p, q, s)):
        return (
            f"param, codes and scales must be contiguous CPU tensors, got param on {p.device} (contiguous: "
            f"{p.is_contiguous()}), codes on {q.device} ({q.is_contiguous()}), scales on {s.device} "
            f"({s.is_contiguous()})"
        )
    if not 1 <= e.block <= INT8_MAX_BLOCK:
        return f"int8 blocks of 1 to {INT8_MAX_BLOCK} elements only (a stack buffer per block), got block={e.block}"
    if q.numel() != p.numel() or tuple(s.shape) != int8_scale_shape(p.shape, e.block):
        return (
            f"param {tuple(p.shape)} needs codes of {p.numel()} elements and scales of shape "
            f"{int8_scale_shape(p.shape, e.block)} (block {e.block}), got {q.numel()} and {tuple(s.shape)}"
        )
    return None


class CpuFusedBackend(Backend):
    name = "cpu_fused"

    def prepare(self, entries: Sequence[Entry]) -> _Prepared:
        """Check and tabulate contiguous CPU tensors with a dtype triple the kernel has (the declaration's);
        entries with int8 momentum (`Entry.scales`) go to a second table."""
        _require()
        pairs = [(e.param, e.exp_avg) for e in entries]
        scales = [(e.scales, _NO_TENSOR) for e in entries if e.scales is not None]
        names = [f"tensor {i}" for i in range(len(entries))]
        names += [f"tensor {i} (its scales)" for i, e in enumerate(entries) if e.scales is not None]
        refuse_overlaps(pairs + scales, names)  # threads would race on shared memory
        table = _Prepared(array("q"), array("q"), array("q", [0]), array("B"), array("q"))
        float_index: list[int] = []
        int8 = _Int8Table(array("q"), array("q"), array("q"), array("q", [0]), array("B"), array("q"), array("q"), [])
        for i, e in enumerate(entries):
            p, m = e.param, e.exp_avg
            if e.scales is not None:
                if (why := _int8_entry_error(i, e)) is not None:
                    raise ValueError(f"lion_cpu_fused: tensor {i} ({tuple(p.shape)}): {why}")
                if p.numel():
                    int8.p_ptrs.append(p.data_ptr())
                    int8.q_ptrs.append(m.data_ptr())
                    int8.s_ptrs.append(e.scales.data_ptr())
                    int8.offsets.append(int8.offsets[-1] + p.numel())
                    int8.codes.append(_INT8_CODES[p.dtype, e.grad_dtype])
                    int8.blocks.extend((p.shape[-1] if p.dim() else 1, e.block))
                    int8.streams.extend((e.param_id, e.base, e.shard, e.shard | MOMENTUM_STREAM))
                    int8.index.append(i)
                continue
            float_index.append(i)
            code = _CODES.get((p.dtype, e.grad_dtype, m.dtype))
            if code is None or not (p.is_cpu and m.is_cpu and p.is_contiguous() and m.is_contiguous()):
                raise ValueError(
                    f"lion_cpu_fused takes contiguous CPU tensors with a (param, grad, momentum) dtype triple of "
                    f"fp32/bf16/fp16 or all fp64, got tensor {i}: param {tuple(p.shape)} {p.dtype} on {p.device} "
                    f"(contiguous: {p.is_contiguous()}), grad {e.grad_dtype}, momentum {tuple(m.shape)} {m.dtype} "
                    f"on {m.device} (contiguous: {m.is_contiguous()})"
                )
            if m.numel() != p.numel():
                raise ValueError(f"lion_cpu_fused: tensor {i} has {p.numel()} elements, its momentum {m.numel()}")
            table.p_ptrs.append(p.data_ptr())
            table.m_ptrs.append(m.data_ptr())
            table.offsets.append(table.offsets[-1] + p.numel())
            table.codes.append(code)
            table.streams.extend((e.param_id, e.base, e.shard))
        if int8.index:
            table.int8 = int8
        if len(float_index) != len(entries):
            table.float_index = float_index
        return table

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
        """One call for all tensors (two when float and int8 momenta mix); `grads` must be contiguous CPU tensors
        of the prepared dtypes and sizes."""
        if skip is not None and bool(skip):
            return
        n = len(prepared.codes)
        int8 = prepared.int8
        if not n and int8 is None:
            return
        if prepared.float_index is None:
            g_ptrs = array("q", map(_data_ptr, grads))
        else:  # float and int8 momenta (or empty int8 ones) in one plan: each table takes its own grads
            all_ptrs = list(map(_data_ptr, grads))
            g_ptrs = array("q", [all_ptrs[i] for i in prepared.float_index])
        sign = -1.0 if hp.maximize else 1.0  # maximize: fma(-g, b, x) == fma(g, -b, x) exactly
        decay = hp.decay if hp.weight_decay != 0 else 1.0
        values = array("d", [hp.beta1, sign * (1 - hp.beta1), hp.beta2, sign * (1 - hp.beta2), -hp.lr_value, decay])
        key = key_value(sr_key) or 0
        if int8 is not None:
            qkey = key_value(quant_key) or 0
            int8_g_ptrs = array("q", [all_ptrs[i] for i in int8.index])
            _require().lion_step_int8(
                len(int8.index),
                _address(int8.p_ptrs),
                _address(int8_g_ptrs),
                _address(int8.q_ptrs),
                _address(int8.s_ptrs),
                _address(int8.offsets),
                _address(int8.codes),
                _address(int8.blocks),
                _address(values),
                _address(int8.streams),
                sr_key is not None,
                key & _MASK32,
                (key >> 32) & _MASK32,
                quant_key is not None,
                qkey & _MASK32,
                (qkey >> 32) & _MASK32,
                torch.get_num_threads(),
            )
            if not n:
                return
        _require().lion_step(
            n,
            _address(prepared.p_ptrs),
            _address(g_ptrs),
            _address(prepared.m_ptrs),
            _address(prepared.offsets),
            _address(prepared.codes),
            _address(values),
            None if sr_key is None else _address(prepared.streams),
            key & _MASK32,
            (key >> 32) & _MASK32,
            torch.get_num_threads(),
        )


BACKEND = CpuFusedBackend()
_NO_TENSOR = torch.empty(0)  # refuse_overlaps skips it: pairs each scales tensor with nothing


def lion_cpu_fused(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hp: LionHyperparams,
    *,
    sr_seed: int | None = None,
) -> None:
    """One Lion step, in place, on local CPU tensors of any layout: one pass over each element, one call.

    The one-shot form of `BACKEND` (no plan): non-contiguous tensors go through contiguous copies.
    `sr_seed`: stochastic rounding of bf16 params, with tensor i as param id i.
    """
    if hp.cautious:
        raise ValueError("the fused CPU kernel does plain Lion only; cautious Lion runs on backend='foreach'")
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(f"got {len(params)} params, {len(grads)} grads and {len(exp_avgs)} momenta")
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        if not (p.is_cpu and g.is_cpu and m.is_cpu) or g.numel() != p.numel() or m.numel() != p.numel():
            raise ValueError(
                f"lion_cpu_fused needs CPU tensors with equal numbers of elements, got tensor {i}: param "
                f"{tuple(p.shape)} {p.dtype} on {p.device}, grad {tuple(g.shape)} {g.dtype} on {g.device}, "
                f"momentum {tuple(m.shape)} {m.dtype} on {m.device}"
            )
    contiguous = [[t.contiguous() for t in ts] for ts in (params, grads, exp_avgs)]
    entries = [Entry(p, m, g.dtype, i) for i, (p, g, m) in enumerate(zip(*contiguous, strict=True)) if p.numel()]
    BACKEND.step(BACKEND.prepare(entries), [g for g in contiguous[1] if g.numel()], hp, sr_key=sr_seed)
    for originals, copies in ((params, contiguous[0]), (exp_avgs, contiguous[2])):
        for original, copy in zip(originals, copies, strict=True):
            if copy is not original:
                original.copy_(copy)


def sr_noise(stream: NoiseStream, numel: int) -> Tensor:
    """`spec.sr_noise(stream, numel)` computed by the C kernel: the same values, without the torch Philox's
    microsecond per element (the foreach backend requantizes int8 momenta with it on CPU)."""
    out = torch.empty(numel, dtype=torch.int32)
    key = stream.key
    _require().lion_sr_noise(
        numel,
        out.data_ptr(),
        key & _MASK32,
        key >> 32 & _MASK32,
        stream.param_id & _MASK32,
        stream.base,
        stream.shard & _MASK32,
    )
    return out


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
