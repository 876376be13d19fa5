"""The fused CPU backend: a small C kernel (`lion.c`), compiled on first use (`build.py`), called through ctypes
(`library.py`), over a table of (pointer, size) entries per plan: any number of tensors in one call.

Results equal `spec.lion_reference` bit for bit (same math dtype, same roundings), stochastic rounding of bf16
params included (the spec's Philox noise, reproducible for any thread count). Params, grads and float momenta may
each be fp32, bf16 or fp16 (fp32 math), or all three fp64 (fp64 math). int8 momentum (format kind "int8": codes and
per-block fp32 scales) runs in a second loop of the same library, `lion_step_int8`, equal to
`spec.lion_reference_int8` bit for bit, stochastic requantization included; a plan may mix both (one call each).
What the kernel does not take (other dtypes or formats, strided tensors, cautious Lion, compensation) the
declaration below sends elsewhere. This module's top level loads nothing: the kernel is built and loaded when a
plan is first prepared or `unavailable_reason()` is first asked.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lion_dist.backends import FUSED_TRIPLES, Backend, Capabilities, Entry, StepArgs, refuse_overlaps
from lion_dist.spec import MOMENTUM_STREAM, NoiseStream, int8_scale_shape, key_value

CAPABILITIES = Capabilities(
    devices=("cpu",), triples=FUSED_TRIPLES, formats=frozenset({"float", "int8"}), stochastic_rounding=True
)


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


def _int8_entry_error(e: Entry) -> str | None:
    """Why an int8-momentum entry cannot run in the kernel (None: it can)."""
    from lion_dist.backends.cpu.library import INT8_CODES, INT8_MAX_BLOCK

    (p, (q, s)), block = (e.param, e.state), e.format.block
    if (p.dtype, e.grad_dtype) not in INT8_CODES or q.dtype != torch.int8 or s.dtype != torch.float32:
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
    if not 1 <= block <= INT8_MAX_BLOCK:
        return f"int8 blocks of 1 to {INT8_MAX_BLOCK} elements only (a stack buffer per block), got block={block}"
    if q.numel() != p.numel() or tuple(s.shape) != int8_scale_shape(p.shape, block):
        return (
            f"param {tuple(p.shape)} needs codes of {p.numel()} elements and scales of shape "
            f"{int8_scale_shape(p.shape, block)} (block {block}), got {q.numel()} and {tuple(s.shape)}"
        )
    return None


class CpuFusedBackend(Backend):
    name = "cpu_fused"

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def unavailable_reason(self) -> str | None:
        from lion_dist.backends.cpu import library

        return library.unavailable_reason()

    def sr_noise(self, stream: NoiseStream, numel: int) -> Tensor:
        """`spec.sr_noise(stream, numel)` on CPU, from the kernel's Philox."""
        from lion_dist.backends.cpu import library

        return library.sr_noise(stream, numel)

    def prepare(self, entries: Sequence[Entry]) -> _Prepared:
        """Check and tabulate contiguous CPU tensors with a dtype triple the kernel has (the declaration's);
        entries with int8 momentum go to a second table."""
        from lion_dist.backends.cpu.library import CODES, INT8_CODES, require

        require()
        pairs = [(e.param, e.exp_avg) for e in entries]
        int8_entries = [(i, e) for i, e in enumerate(entries) if e.format.kind == "int8"]
        names = [f"tensor {i}" for i in range(len(entries))] + [f"tensor {i} (its scales)" for i, _ in int8_entries]
        refuse_overlaps(pairs + [(e.state[1], _NO_TENSOR) for _, e in int8_entries], names)  # threads would race
        table = _Prepared(array("q"), array("q"), array("q", [0]), array("B"), array("q"))
        float_index: list[int] = []
        int8 = _Int8Table(array("q"), array("q"), array("q"), array("q", [0]), array("B"), array("q"), array("q"), [])
        for i, e in enumerate(entries):
            p, m = e.param, e.exp_avg
            param_id, base, shard = e.place
            if e.format.kind == "int8":
                if (why := _int8_entry_error(e)) is not None:
                    raise ValueError(f"lion_cpu_fused: tensor {i} ({tuple(p.shape)}): {why}")
                if p.numel():
                    int8.p_ptrs.append(p.data_ptr())
                    int8.q_ptrs.append(m.data_ptr())
                    int8.s_ptrs.append(e.state[1].data_ptr())
                    int8.offsets.append(int8.offsets[-1] + p.numel())
                    int8.codes.append(INT8_CODES[p.dtype, e.grad_dtype])
                    int8.blocks.extend((p.shape[-1] if p.dim() else 1, e.format.block))
                    int8.streams.extend((param_id, base, shard, shard | MOMENTUM_STREAM))
                    int8.index.append(i)
                continue
            float_index.append(i)
            code = CODES.get((p.dtype, e.grad_dtype, m.dtype))
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
            table.streams.extend((param_id, base, shard))
        if int8.index:
            table.int8 = int8
        if len(float_index) != len(entries):
            table.float_index = float_index
        return table

    def step(self, prepared: _Prepared, grads: Sequence[Tensor], args: StepArgs) -> None:
        """One call for all tensors (two when float and int8 momenta mix); `grads` must be contiguous CPU tensors
        of the prepared dtypes and sizes."""
        from lion_dist.backends.cpu.library import MASK32, address, require

        if args.skipped:
            return
        n = len(prepared.codes)
        int8 = prepared.int8
        if not n and int8 is None:
            return
        all_ptrs = array("q", map(Tensor.data_ptr, grads))
        g_ptrs = all_ptrs
        if prepared.float_index is not None:  # float and int8 momenta (or empty int8 ones): each table its own
            g_ptrs = array("q", map(all_ptrs.__getitem__, prepared.float_index))
        hp = args.hp
        sign = -1.0 if hp.maximize else 1.0  # maximize: fma(-g, b, x) == fma(g, -b, x) exactly
        decay = hp.decay if hp.weight_decay != 0 else 1.0
        values = array("d", [hp.beta1, sign * (1 - hp.beta1), hp.beta2, sign * (1 - hp.beta2), -hp.lr_value, decay])
        key = key_value(args.sr_key) or 0
        lib = require()
        if int8 is not None:
            qkey = key_value(args.quant_key) or 0
            int8_g_ptrs = array("q", map(all_ptrs.__getitem__, int8.index))
            lib.lion_step_int8(
                len(int8.index),
                address(int8.p_ptrs),
                address(int8_g_ptrs),
                address(int8.q_ptrs),
                address(int8.s_ptrs),
                address(int8.offsets),
                address(int8.codes),
                address(int8.blocks),
                address(values),
                address(int8.streams),
                args.sr_key is not None,
                key & MASK32,
                (key >> 32) & MASK32,
                args.quant_key is not None,
                qkey & MASK32,
                (qkey >> 32) & MASK32,
                torch.get_num_threads(),
            )
            if not n:
                return
        lib.lion_step(
            n,
            address(prepared.p_ptrs),
            address(g_ptrs),
            address(prepared.m_ptrs),
            address(prepared.offsets),
            address(prepared.codes),
            address(values),
            None if args.sr_key is None else address(prepared.streams),
            key & MASK32,
            (key >> 32) & MASK32,
            torch.get_num_threads(),
        )


BACKEND = CpuFusedBackend()
_NO_TENSOR = torch.empty(0)  # refuse_overlaps skips it: pairs each scales tensor with nothing
