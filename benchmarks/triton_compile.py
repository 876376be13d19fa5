"""Compile the Triton Lion kernel for GPU targets without a GPU, exactly as the launcher would on one.

    python benchmarks/triton_compile.py                 # sm_80 and sm_90, every specialization, a markdown table
    python benchmarks/triton_compile.py --targets 90    # one target
    python benchmarks/triton_compile.py --kernel int8   # only the int8-momentum kernel (`int8_specializations()`)

It drives the real launcher (`TritonBackend.prepare` and `.step`, on CPU tensors) over workloads that reach
every specialization it can produce (`triton_kernel.specializations()`, and `int8_specializations()` for the
int8-momentum kernel), with the launch recorded instead of run; binds each recorded call the way Triton's JIT
binds a launch on a GPU of that target (its binder: the runtime signature, the alignment attributes and the
constexprs a GPU would get); and compiles it to a cubin with the ptxas inside the triton wheel. For each kernel
it reports registers, spills, shared memory, occupancy (CTAs and warps per SM from the register file: 64K
registers, 64 warps, 32 CTAs per SM on sm_80 and sm_90) and the widest global load and store in its PTX (the
int8 kernel also whether its divisions are all the correctly rounded div.rn.f32, without ftz). Needs no GPU
and no driver; run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lion_dist.backends import Entry
from lion_dist.spec import LionHyperparams, int8_scale_shape

HP = LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
_CUOBJDUMP = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _Record:
    """Stands in for `_lion_kernel`: `kernel[grid](*args, **kwargs)` records the call and runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _workload(triple: tuple, big: bool, aligned: bool) -> tuple[list[Entry], list[torch.Tensor]]:
    """One bucket's tensors: a (param, grad, momentum) dtype triple, large or small, 16-byte aligned or a view at +1."""
    p_dtype, g_dtype, m_dtype = triple
    n = 5000 if big else 100
    offset = 0 if aligned else 1
    p = torch.zeros(n + offset, dtype=p_dtype)[offset:]
    m = torch.zeros(n + offset, dtype=m_dtype)[offset:]
    return [Entry(p, m, g_dtype, 0)], [torch.zeros(n, dtype=g_dtype)]


TRIPLES = [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32), (torch.float64,) * 3]


def recorded_launches() -> list[tuple[tuple, dict]]:
    """The launcher's calls for every specialization, one each (deduplicated by constexprs)."""
    from lion_dist.backends import triton_kernel

    record = _Record()
    saved = triton_kernel._lion_kernel, triton_kernel.check_device
    triton_kernel._lion_kernel, triton_kernel.check_device = record, lambda device: None
    try:
        for triple, big, aligned, stochastic in itertools.product(TRIPLES, *[(False, True)] * 3):
            entries, grads = _workload(triple, big, aligned)
            backend = triton_kernel.BACKEND
            backend.step(backend.prepare(entries), grads, HP, sr_key=12345 if stochastic else None)
    finally:
        triton_kernel._lion_kernel, triton_kernel.check_device = saved
    unique = {}
    for args, kwargs in record.calls:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        unique.setdefault(key, (args, kwargs))
    return list(unique.values())


INT8_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]  # (param, grad): FP32, MIXED


def _int8_workload(pair: tuple, block: int, aligned: bool) -> tuple[list[Entry], list[torch.Tensor]]:
    """One int8 bucket's tensor: rows of 4 * block elements (a multiple of 16 when aligned), or a view at +1
    whose rows are odd."""
    p_dtype, g_dtype = pair
    shape = (3, 4 * block) if aligned else (3, 4 * block + 1)
    offset = 0 if aligned else 1
    n = shape[0] * shape[1]
    p = torch.zeros(n + offset, dtype=p_dtype)[offset:].view(shape)
    codes = torch.zeros(n + offset, dtype=torch.int8)[offset:].view(shape)
    scales = torch.zeros(int8_scale_shape(shape, block))
    return [Entry(p, codes, g_dtype, 0, scales=scales, block=block)], [torch.zeros(shape, dtype=g_dtype)]


def int8_recorded_launches() -> list[tuple[tuple, dict]]:
    """The launcher's calls of the int8-momentum kernel for every `int8_specializations()`, one each."""
    from lion_dist.backends import triton_kernel

    record = _Record()
    saved = triton_kernel._lion_int8_kernel, triton_kernel.check_device
    triton_kernel._lion_int8_kernel, triton_kernel.check_device = record, lambda device: None
    try:
        for pair, block, aligned, stochastic in itertools.product(
            INT8_PAIRS, triton_kernel._INT8_BLOCKS, (False, True), (False, True)
        ):
            entries, grads = _int8_workload(pair, block, aligned)
            backend = triton_kernel.BACKEND
            keys = dict(sr_key=12345, quant_key=678) if stochastic else {}
            backend.step(backend.prepare(entries), grads, HP, **keys)
    finally:
        triton_kernel._lion_int8_kernel, triton_kernel.check_device = saved
    unique = {}
    for args, kwargs in record.calls:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        unique.setdefault(key, (args, kwargs))
    return list(unique.values())


def compile_launch(args: tuple, kwargs: dict, capability: int, kernel_name: str = "_lion_kernel"):
    """Bind a recorded launch for `capability` as Triton's JIT would on that GPU, and compile it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from lion_dist.backends import triton_kernel

    kernel = getattr(triton_kernel, kernel_name)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


@dataclass
class Compiled:
    capability: int
    constexprs: dict
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    widest_load: str
    widest_store: str
    explicit_fma: bool  # the PTX has the fma.rn of the spec's rounding (no contraction of its own: fp fusion is off)
    cubin_bytes: int
    kernel: str = "lion"  # "lion" (`_lion_kernel`) or "int8" (`_lion_int8_kernel`)
    exact_division: bool = True  # int8: the PTX divides with div.rn.f32 only (no approximate division, no ftz)

    @property
    def ctas_per_sm(self) -> int:
        """CTAs one SM holds at once: limited by the 64 warps, 32 CTAs and 64K registers of sm_80 and sm_90."""
        regs_per_warp = math.ceil(self.registers * 32 / 256) * 256  # allocated per warp in units of 256
        return min(32, 64 // self.num_warps, 65536 // (regs_per_warp * self.num_warps))


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) of the cubin's kernel, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, local


def _widest(ptx: str, op: str) -> str:
    widths = {"v4.b32": 128, "v2.b64": 128, "v2.b32": 64, "b64": 64, "b32": 32, "b16": 16}
    found = [w for w in widths if re.search(rf"{op}\.global[.\w]*\.{re.escape(w)}\b", ptx)]
    return max(found, key=widths.get) if found else "-"


def compile_all(capabilities: tuple[int, ...] = (80, 90)) -> list[Compiled]:
    results = []
    for args, kwargs in recorded_launches():
        for capability in capabilities:
            compiled = compile_launch(args, kwargs, capability)
            ptx = compiled.asm["ptx"]
            regs, spills = _resources(compiled.asm["cubin"])
            results.append(
                Compiled(
                    capability=capability,
                    constexprs={k: kwargs[k] for k in ("DTYPES", "BLOCK", "ALIGNED", "STOCHASTIC")},
                    num_warps=kwargs["num_warps"],
                    registers=regs,
                    spill_bytes=spills,
                    shared_bytes=compiled.metadata.shared,
                    widest_load=_widest(ptx, "ld"),
                    widest_store=_widest(ptx, "st"),
                    explicit_fma=bool(re.search(r"fma\.rn\.f(32|64)", ptx)),
                    cubin_bytes=len(compiled.asm["cubin"]),
                )
            )
    return results


def compile_all_int8(capabilities: tuple[int, ...] = (90,)) -> list[Compiled]:
    """Every int8-momentum specialization, compiled for each of `capabilities`."""
    results = []
    for args, kwargs in int8_recorded_launches():
        for capability in capabilities:
            compiled = compile_launch(args, kwargs, capability, "_lion_int8_kernel")
            ptx = compiled.asm["ptx"]
            regs, spills = _resources(compiled.asm["cubin"])
            divisions = re.findall(r"\bdiv\.[\w.]*f32\b", ptx)
            results.append(
                Compiled(
                    capability=capability,
                    constexprs={k: kwargs[k] for k in ("DTYPES", "BLOCK", "ROWS", "ALIGNED", "STOCHASTIC")},
                    num_warps=kwargs["num_warps"],
                    registers=regs,
                    spill_bytes=spills,
                    shared_bytes=compiled.metadata.shared,
                    widest_load=_widest(ptx, "ld"),
                    widest_store=_widest(ptx, "st"),
                    explicit_fma=bool(re.search(r"fma\.rn\.f32", ptx)),
                    cubin_bytes=len(compiled.asm["cubin"]),
                    kernel="int8",
                    exact_division=bool(divisions) and all(d == "div.rn.f32" for d in divisions) and ".ftz" not in ptx,
                )
            )
    return results


def markdown_int8(results: list[Compiled]) -> str:
    lines = [
        "| sm | dtypes | BLOCK | ROWS | warps | aligned | stochastic | registers | spills | shared B | CTAs/SM "
        "| warps/SM | widest load | widest store | div.rn only |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    names = {0: "fp32", 1: "fp32/bf16/fp16"}
    for r in sorted(
        results,
        key=lambda r: (
            r.capability,
            r.constexprs["DTYPES"],
            r.constexprs["BLOCK"],
            not r.constexprs["ALIGNED"],
            r.constexprs["STOCHASTIC"],
        ),
    ):
        c = r.constexprs
        lines.append(
            f"| {r.capability} | {names[c['DTYPES']]} | {c['BLOCK']} | {c['ROWS']} | {r.num_warps} | "
            f"{c['ALIGNED']} | {c['STOCHASTIC']} | {r.registers} | {r.spill_bytes} | {r.shared_bytes} | "
            f"{r.ctas_per_sm} | {r.ctas_per_sm * r.num_warps} | {r.widest_load} | {r.widest_store} | "
            f"{r.exact_division} |"
        )
    return "\n".join(lines)


def markdown(results: list[Compiled]) -> str:
    lines = [
        "| sm | dtypes | BLOCK | warps | aligned | stochastic | registers | spills | shared B | CTAs/SM | warps/SM "
        "| widest load | widest store |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    names = {0: "fp32", 1: "fp32/bf16/fp16", 2: "fp64"}
    for r in sorted(
        results,
        key=lambda r: (
            r.capability,
            r.constexprs["DTYPES"],
            r.constexprs["BLOCK"],
            not r.constexprs["ALIGNED"],
            r.constexprs["STOCHASTIC"],
        ),
    ):
        c = r.constexprs
        lines.append(
            f"| {r.capability} | {names[c['DTYPES']]} | {c['BLOCK']} | {r.num_warps} | "
            f"{c['ALIGNED']} | {c['STOCHASTIC']} | {r.registers} | {r.spill_bytes} | {r.shared_bytes} | "
            f"{r.ctas_per_sm} | {r.ctas_per_sm * r.num_warps} | {r.widest_load} | {r.widest_store} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Compiled]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument(
        "--kernel", choices=("all", "lion", "int8"), default="all", help="the float-momentum kernel, the int8 one"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles the kernel, it does not interpret it")
    targets = tuple(int(t) for t in args.targets.split(","))
    results = []
    if args.kernel in ("all", "lion"):
        results += compile_all(targets)
        print(markdown(results), flush=True)
    if args.kernel in ("all", "int8"):
        int8 = compile_all_int8(targets)
        print(("\n" if results else "") + markdown_int8(int8), flush=True)
        results += int8
    return results


if __name__ == "__main__":
    main()
