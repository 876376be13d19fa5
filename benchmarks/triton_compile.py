"""Compile the Triton Lion kernels for GPU targets without a GPU, exactly as the launcher would on one.

    python benchmarks/triton_compile.py                 # sm_80 and sm_90, every specialization, markdown tables
    python benchmarks/triton_compile.py --targets 90    # one target
    python benchmarks/triton_compile.py --kernel int8   # only the int8-momentum kernel (`int8_specializations()`)

It drives the real launcher (`launcher.prepare`, `.step`, `.direction`, `.apply`, on CPU tensors) over workloads
that reach every specialization it can produce (`launcher.specializations()` for `lion_kernel`,
`int8_specializations()` for `lion_int8_kernel`), with the launches recorded instead of run; binds each recorded
call the way Triton's JIT binds a launch on a GPU of that target (its binder: the runtime signature, the
alignment attributes and the constexprs a GPU would get); and compiles it to a cubin with the ptxas inside the
triton wheel. For each kernel it reports registers, spills, shared memory, occupancy (CTAs and warps per SM from
the register file: 64K registers, 64 warps, 32 CTAs per SM on sm_80 and sm_90) and the widest global load and
store in its PTX (the int8 kernel also whether its divisions are all the correctly rounded div.rn.f32, without
ftz). Needs no GPU and no driver; run with TRITON_INTERPRET unset.
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

from lion_dist.backends import Entry, NoisePlace, StepArgs
from lion_dist.formats.floats import FloatMomentum
from lion_dist.formats.int8 import Int8Momentum
from lion_dist.spec import LionHyperparams, int8_scale_shape

HP = LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
_CUOBJDUMP = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_NAMES = {"lion": "lion_kernel", "int8": "lion_int8_kernel"}


class _Record:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call and runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _at(n: int, dtype: torch.dtype, aligned: bool, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A zero tensor of n elements, 16-byte aligned or a view at +1 element."""
    offset = 0 if aligned else 1
    t = torch.zeros(n + offset, dtype=dtype)[offset:]
    return t if shape is None else t.view(shape)


def _run(kernel: str, workloads) -> list[tuple[tuple, dict]]:
    """Drive the launcher over `workloads` ((entries, operands, mode, keys) each) with `kernel` recorded; one call
    per distinct set of constexprs."""
    from lion_dist.backends.triton import kernels, launcher

    record = _Record()
    saved = getattr(kernels, _NAMES[kernel])
    setattr(kernels, _NAMES[kernel], record)
    try:
        for entries, operands, mode, keys in workloads:
            prepared = launcher.prepare(entries)
            getattr(launcher, mode)(prepared, operands, StepArgs(HP, **keys))
    finally:
        setattr(kernels, _NAMES[kernel], saved)
    unique = {}
    for args, kwargs in record.calls:
        unique.setdefault(tuple(sorted((k, str(v)) for k, v in kwargs.items())), (args, kwargs))
    return list(unique.values())


TRIPLES = [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32), (torch.float64,) * 3]
_ALIGNMENTS = ((True, True), (True, False), (False, False))  # (params and momenta, gradients or directions)


def _float_workloads():
    for triple, big, (state, stream), mode, rounding in itertools.product(
        TRIPLES, (False, True), _ALIGNMENTS, ("step", "direction", "apply"), ("nearest", "stochastic", "compensated")
    ):
        if rounding != "nearest" and triple[0] != torch.bfloat16:
            continue
        n = 5000 if big else 100
        p_dtype, g_dtype, m_dtype = triple
        p = _at(n, p_dtype, state)
        c = _at(n, p_dtype, state) if rounding == "compensated" else None
        e = Entry(p, (_at(n, m_dtype, state),), FloatMomentum(None), g_dtype, NoisePlace(), c)
        operand = _at(n, torch.float32 if mode == "apply" else g_dtype, stream)
        yield [e], [operand], mode, dict(sr_key=12345 if rounding == "stochastic" else None)


def recorded_launches() -> list[tuple[tuple, dict]]:
    """The launcher's `lion_kernel` calls for every `specializations()`, one each."""
    return _run("lion", _float_workloads())


INT8_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]  # (param, grad): FP32, MIXED


def _int8_workloads():
    from lion_dist.backends.triton import launcher

    for pair, block, (state, stream), mode, stochastic, compensated in itertools.product(
        INT8_PAIRS, launcher._INT8_BLOCKS, _ALIGNMENTS, ("step", "direction"), (False, True), (False, True)
    ):
        if compensated and pair[0] == torch.float32:
            continue
        # rows of 4 * block elements (a multiple of 16 when aligned), or a view at +1 whose rows are odd
        shape = (3, 4 * block) if state else (3, 4 * block + 1)
        n = shape[0] * shape[1]
        p = _at(n, pair[0], state, shape)
        c = _at(n, pair[0], state, shape) if compensated else None
        codes, scales = _at(n, torch.int8, state, shape), torch.zeros(int8_scale_shape(shape, block))
        e = Entry(p, (codes, scales), Int8Momentum(block), pair[1], NoisePlace(), c)
        keys = dict(sr_key=12345, quant_key=678) if stochastic else {}
        yield [e], [_at(n, pair[1], stream, shape)], mode, keys


def int8_recorded_launches() -> list[tuple[tuple, dict]]:
    """The launcher's `lion_int8_kernel` calls for every `int8_specializations()`, one each."""
    return _run("int8", _int8_workloads())


def compile_launch(args: tuple, kwargs: dict, capability: int, kernel: str = "lion"):
    """Bind a recorded launch of `kernel` ("lion" or "int8") for `capability` as Triton's JIT would on that GPU,
    and compile it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from lion_dist.backends.triton import kernels

    function = getattr(kernels, _NAMES[kernel])
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(function.signature, function.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = function._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(function, signature, constexprs, attrs), target=target, options=options.__dict__)


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
    kernel: str = "lion"  # "lion" (`lion_kernel`) or "int8" (`lion_int8_kernel`)
    exact_division: bool = (
        True  # every division in the PTX is the correctly rounded div.rn.f32 (no approximation, no ftz)
    )

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


_CONSTEXPRS = {
    "lion": ("MODE", "DTYPES", "BLOCK", "STATE_ALIGNED", "STREAM_ALIGNED", "STOCHASTIC", "COMPENSATED"),
    "int8": ("MODE", "DTYPES", "BLOCK", "ROWS", "STATE_ALIGNED", "STREAM_ALIGNED", "STOCHASTIC", "COMPENSATED"),
}


def compile_launches(kernel: str, launches, capabilities: tuple[int, ...]) -> list[Compiled]:
    """Each recorded launch of `kernel` compiled for each of `capabilities`, with its resources."""
    results = []
    for args, kwargs in launches:
        for capability in capabilities:
            compiled = compile_launch(args, kwargs, capability, kernel)
            ptx = compiled.asm["ptx"]
            regs, spills = _resources(compiled.asm["cubin"])
            divisions = re.findall(r"\bdiv\.[\w.]*f32\b", ptx)
            results.append(
                Compiled(
                    capability=capability,
                    constexprs={k: kwargs[k] for k in _CONSTEXPRS[kernel]},
                    num_warps=kwargs["num_warps"],
                    registers=regs,
                    spill_bytes=spills,
                    shared_bytes=compiled.metadata.shared,
                    widest_load=_widest(ptx, "ld"),
                    widest_store=_widest(ptx, "st"),
                    explicit_fma=bool(re.search(r"fma\.rn\.f(32|64)", ptx)),
                    cubin_bytes=len(compiled.asm["cubin"]),
                    kernel=kernel,
                    exact_division=all(d == "div.rn.f32" for d in divisions) and ".ftz" not in ptx,
                )
            )
    return results


def compile_all(capabilities: tuple[int, ...] = (80, 90)) -> list[Compiled]:
    """Every `lion_kernel` specialization, compiled for each of `capabilities`."""
    return compile_launches("lion", recorded_launches(), capabilities)


def compile_all_int8(capabilities: tuple[int, ...] = (90,)) -> list[Compiled]:
    """Every int8-momentum specialization, compiled for each of `capabilities`."""
    return compile_launches("int8", int8_recorded_launches(), capabilities)


_MODES = {0: "step", 1: "direction", 2: "apply"}
_DTYPES = {0: "fp32", 1: "fp32/bf16/fp16", 2: "fp64"}


def markdown(results: list[Compiled]) -> str:
    """One row per compiled kernel: its constexprs, resources, occupancy and widest accesses."""
    lines = [
        "| kernel | sm | mode | dtypes | BLOCK | warps | aligned (state, stream) | stochastic | compensated "
        "| registers | spills | shared B | CTAs/SM | warps/SM | widest load | widest store | div.rn only |",
        "|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]

    def order(r: Compiled) -> tuple:
        c = r.constexprs
        aligned = (not c["STATE_ALIGNED"], not c["STREAM_ALIGNED"])
        return (r.kernel, r.capability, c["MODE"], c["DTYPES"], c["BLOCK"], aligned, c["STOCHASTIC"], c["COMPENSATED"])

    for r in sorted(results, key=order):
        c = r.constexprs
        lines.append(
            f"| {r.kernel} | {r.capability} | {_MODES[c['MODE']]} | {_DTYPES[c['DTYPES']]} | {c['BLOCK']} | "
            f"{r.num_warps} | {c['STATE_ALIGNED']}, {c['STREAM_ALIGNED']} | {c['STOCHASTIC']} | {c['COMPENSATED']} | "
            f"{r.registers} | {r.spill_bytes} | {r.shared_bytes} | {r.ctas_per_sm} | {r.ctas_per_sm * r.num_warps} | "
            f"{r.widest_load} | {r.widest_store} | {r.exact_division} |"
        )
    return "\n".join(lines)


def summary(results: list[Compiled]) -> str:
    """Registers and spills per kernel, target and mode: the range over the specializations."""
    lines = ["| kernel | sm | mode | kernels | registers (min-max) | spills (max) |", "|---|---|---|---:|---|---:|"]
    groups: dict[tuple, list[Compiled]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.capability, r.constexprs["MODE"]), []).append(r)
    for (kernel, cc, mode), rs in sorted(groups.items()):
        regs, spills = [r.registers for r in rs], max(r.spill_bytes for r in rs)
        lines.append(f"| {kernel} | {cc} | {_MODES[mode]} | {len(rs)} | {min(regs)}-{max(regs)} | {spills} |")
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
    if args.kernel in ("all", "int8"):
        results += compile_all_int8(targets)
    print(summary(results) + "\n\n" + markdown(results), flush=True)
    return results


if __name__ == "__main__":
    main()
