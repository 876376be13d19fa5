"""The fused CPU backend: a small C kernel (`lion.c` and its headers), compiled on first use (`build.py`), called
through ctypes (`library.py`), over a table of (pointer, size) entries per plan: any number of tensors in one call.

Results equal `spec.lion_reference` bit for bit (same math dtype, same roundings), stochastic rounding of bf16
params included (the spec's Philox noise, sixteen counters at a time, reproducible for any thread count). Params,
grads and float momenta may each be fp32, bf16 or fp16 (fp32 math), or all three fp64 (fp64 math). int8 momentum
(format kind "int8": codes and per-block fp32 scales) runs in a second loop of the same library,
`lion_step_int8`, equal to `spec.lion_reference_int8` bit for bit, stochastic requantization included; a plan
may mix both (one call each). bf16/fp16 params with a Kahan compensation buffer (`Entry.compensation`) are
fused too, with either momentum. Distributed Lion's split step is `direction` (int8 signs, each float momentum
advanced) and `apply` (the agreed fp32 direction). What the kernel does not take (other dtypes, strided tensors,
cautious Lion; int8 momentum in a split step) the declaration below sends elsewhere or `prepare` refuses. This
module's top level loads nothing: the kernel is built and loaded when a plan is first prepared or
`unavailable_reason()` is first asked.
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
    devices=("cpu",),
    triples=FUSED_TRIPLES,
    formats=frozenset({"float", "int8"}),
    stochastic_rounding=True,
    split=True,  # float momenta; int8 momentum has none (Distributed Lion refuses int8)
    compensation=True,
)


@dataclass
class _Int8Table:
    """The int8-momentum entries of a plan, for `lion_step_int8`: one element of these tables per tensor."""

    p_ptrs: array
    q_ptrs: array  # the codes (int8, the param's shape)
    s_ptrs: array  # the scales (fp32, `spec.int8_scale_shape`)
    c_ptrs: array  # the compensation buffers (0: none)
    offsets: array  # n + 1 prefix sums of the element counts
    codes: array  # param | grad << 2
    blocks: array  # per tensor: row length (the last dim), elements per scale
    streams: array  # per tensor: param id, base, shard, shard | MOMENTUM_STREAM
    index: list[int]  # positions in the entry list (and in `grads`)
    compensated: bool = False  # some entry has a compensation buffer (else the kernel gets a NULL table)


@dataclass
class _Prepared:
    """The static table of one plan: what the kernel reads besides the gradients' addresses.

    The float-momentum entries; `int8` holds those with int8 momentum (None when there are none). `float_index`
    lists the entries (positions in `grads`) this table holds, None when it holds all of them.
    """

    p_ptrs: array
    m_ptrs: array
    c_ptrs: array  # the compensation buffers (0: none)
    offsets: array  # n + 1 prefix sums of the element counts
    codes: array
    streams: array  # per tensor: param id, base, shard (stochastic rounding)
    entries: list[Entry]  # the float-momentum entries (the split step's shapes and dtypes)
    int8: _Int8Table | None = None
    float_index: list[int] | None = None
    compensated: bool = False  # some float entry has a compensation buffer

    def c_table(self) -> array | None:
        """The compensation pointers for the kernel: None (a NULL table) when no tensor has a buffer."""
        return self.c_ptrs if self.compensated else None


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


def _compensation_error(e: Entry) -> str | None:
    """Why an entry's Kahan compensation buffer cannot run in the kernel (None: it can, or there is none)."""
    from lion_dist.backends.cpu.library import KAHAN_DTYPES

    p, c = e.param, e.compensation
    if c is None:
        return None
    if p.dtype not in KAHAN_DTYPES or c.dtype != p.dtype:
        return (
            f"compensation takes bf16 or fp16 params with a buffer of their dtype, got param {p.dtype}, buffer "
            f"{c.dtype}"
        )
    if not (c.is_cpu and c.is_contiguous() and c.numel() == p.numel()):
        return (
            f"the compensation buffer must be a contiguous CPU tensor of the param's {p.numel()} elements, got "
            f"{tuple(c.shape)} on {c.device} (contiguous: {c.is_contiguous()})"
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
        names = [f"tensor {i}" for i in range(len(entries))]
        for i, e in enumerate(entries):  # scales and compensation buffers: threads would race on shared memory too
            scales = e.state[1] if e.format.kind == "int8" else None
            for what, t in (("its scales", scales), ("its compensation", e.compensation)):
                if t is not None:
                    pairs.append((t, _NO_TENSOR))
                    names.append(f"tensor {i} ({what})")
        refuse_overlaps(pairs, names)
        table = _Prepared(array("q"), array("q"), array("q"), array("q", [0]), array("B"), array("q"), [])
        float_index: list[int] = []
        int8 = _Int8Table(*(array("q") for _ in range(4)), array("q", [0]), array("B"), array("q"), array("q"), [])
        for i, e in enumerate(entries):
            p, m, c = e.param, e.exp_avg, e.compensation
            param_id, base, shard = e.place
            if (why := _compensation_error(e)) is not None:
                raise ValueError(f"lion_cpu_fused: tensor {i} ({tuple(p.shape)}): {why}")
            if e.format.kind == "int8":
                if (why := _int8_entry_error(e)) is not None:
                    raise ValueError(f"lion_cpu_fused: tensor {i} ({tuple(p.shape)}): {why}")
                if p.numel():
                    int8.p_ptrs.append(p.data_ptr())
                    int8.q_ptrs.append(m.data_ptr())
                    int8.s_ptrs.append(e.state[1].data_ptr())
                    int8.c_ptrs.append(0 if c is None else c.data_ptr())
                    int8.compensated |= c is not None
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
            table.c_ptrs.append(0 if c is None else c.data_ptr())
            table.compensated |= c is not None
            table.offsets.append(table.offsets[-1] + p.numel())
            table.codes.append(code)
            table.streams.extend((param_id, base, shard))
            table.entries.append(e)
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
        values = _hp_values(args)
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
                address(int8.c_ptrs) if int8.compensated else None,
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
        g_ptrs = _float_grads(prepared, all_ptrs)  # every array named: alive until the call returns
        lib.lion_step(
            n,
            address(prepared.p_ptrs),
            address(g_ptrs),
            address(prepared.m_ptrs),
            _maybe_address(prepared.c_table()),
            address(prepared.offsets),
            address(prepared.codes),
            address(values),
            None if args.sr_key is None else address(prepared.streams),
            key & MASK32,
            (key >> 32) & MASK32,
            torch.get_num_threads(),
        )

    def direction(self, prepared: _Prepared, grads: Sequence[Tensor], args: StepArgs) -> list[Tensor]:
        """Per entry the sign of `b1 * m + (1 - b1) * g` as int8 (+1, -1, and 0 where c is 0 or NaN), shaped like
        the param (fp64 params: fp64, `sign(c) + 0 * c`, so that the agreed direction keeps fp64 math), each
        momentum advanced in place exactly as `step` advances it. One call for all entries."""
        from lion_dist.backends.cpu.library import address, require

        _refuse_int8_split(prepared)
        entries = prepared.entries
        directions = [
            torch.empty(e.param.shape, dtype=torch.float64 if e.param.dtype == torch.float64 else torch.int8)
            for e in entries
        ]
        if entries:
            g_ptrs = _float_grads(prepared, array("q", map(Tensor.data_ptr, grads)))  # named: alive during the call
            d_ptrs, values = array("q", map(Tensor.data_ptr, directions)), _hp_values(args)
            require().lion_direction(
                len(entries),
                address(g_ptrs),
                address(prepared.m_ptrs),
                address(d_ptrs),
                address(prepared.offsets),
                address(prepared.codes),
                address(values),
                torch.get_num_threads(),
            )
        if prepared.float_index is None:
            return directions
        result: list[Tensor] = list(grads)
        for i, d in zip(prepared.float_index, directions, strict=True):
            result[i] = d
        return result

    def apply(self, prepared: _Prepared, directions: Sequence[Tensor], args: StepArgs) -> None:
        """`p <- p * (1 - lr * wd) - lr * u` per entry for fp32 directions `u` (fp64 ones for fp64 params: fp64
        math), the param written back as `step` writes it (stochastic rounding, compensation). One call."""
        from lion_dist.backends.cpu.library import APPLY_CODES, MASK32, address, require

        _refuse_int8_split(prepared)
        entries = prepared.entries
        if not entries:
            return
        if prepared.float_index is not None:
            directions = [directions[i] for i in prepared.float_index]
        codes, kept = array("B"), []
        for i, (e, u) in enumerate(zip(entries, directions, strict=True)):
            code = APPLY_CODES.get((e.param.dtype, u.dtype))
            if code is None or not u.is_cpu or u.numel() != e.param.numel():
                raise ValueError(
                    f"lion_cpu_fused.apply: tensor {i} ({e.param.dtype}, {tuple(e.param.shape)}) takes an fp32 "
                    f"direction of its size on the CPU (fp64 params: fp32 or fp64), got {u.dtype} "
                    f"{tuple(u.shape)} on {u.device}"
                )
            codes.append(code)
            kept.append(u.contiguous())  # alive until the call returns
        key = key_value(args.sr_key) or 0
        u_ptrs, values = array("q", map(Tensor.data_ptr, kept)), _hp_values(args)  # named: alive during the call
        require().lion_apply(
            len(entries),
            address(prepared.p_ptrs),
            address(u_ptrs),
            _maybe_address(prepared.c_table()),
            address(prepared.offsets),
            address(codes),
            address(values),
            None if args.sr_key is None else address(prepared.streams),
            key & MASK32,
            (key >> 32) & MASK32,
            torch.get_num_threads(),
        )


def _hp_values(args: StepArgs) -> array:
    """beta1, 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr * wd, as the kernel takes them (doubles)."""
    hp = args.hp
    sign = -1.0 if hp.maximize else 1.0  # maximize: fma(-g, b, x) == fma(g, -b, x) exactly
    decay = hp.decay if hp.weight_decay != 0 else 1.0
    return array("d", [hp.beta1, sign * (1 - hp.beta1), hp.beta2, sign * (1 - hp.beta2), -hp.lr_value, decay])


def _float_grads(prepared: _Prepared, all_ptrs: array) -> array:
    """The gradient pointers of the float-momentum table (all of them unless int8 momenta are mixed in)."""
    if prepared.float_index is None:
        return all_ptrs
    return array("q", map(all_ptrs.__getitem__, prepared.float_index))


def _maybe_address(a: array | None) -> int | None:
    from lion_dist.backends.cpu.library import address

    return None if a is None else address(a)


def _refuse_int8_split(prepared: _Prepared) -> None:
    if prepared.int8 is not None:
        raise ValueError(
            "lion_cpu_fused has no split step (direction, then apply) for int8 momentum: its requantization is part "
            "of the fused step. Distributed Lion refuses int8 momentum; use bf16 momentum there"
        )


BACKEND = CpuFusedBackend()
_NO_TENSOR = torch.empty(0)  # refuse_overlaps skips it: pairs each scales tensor with nothing
