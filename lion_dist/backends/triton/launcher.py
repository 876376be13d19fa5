"""The Triton launcher: `prepare` builds a route's buckets and their tables once; `step`, `direction` and `apply`
launch the kernels (`kernels.py`) over them, one launch per bucket and alignment class.

Buckets. `prepare` groups a route's entries by what compiles differently: the kernel (float or int8 momentum), the
dtype family (DTYPES: all fp32; any mix of fp32, bf16 and fp16, whose dtypes are a code per tensor in the layout;
all fp64), Kahan compensation (COMPENSATED, always a MIXED bucket), and for int8 the padded block. BLOCK follows a
fixed rule (no `triton.autotune`, which would rerun this in-place kernel). A bucket's static tables (pointers,
layouts, program map) go to the device in one pinned, non-blocking copy per `prepare` (`tables.upload`).

Alignment. 128-bit accesses need 16-byte aligned addresses (for int8 momentum also rows and blocks of multiples of
16 elements). The params', momenta's and compensation buffers' alignment is known at `prepare`; the gradients' only
at a step. FSDP2's gradients are views into the reduce-scatter output, at offsets that depend on the sizes of the
params before them: one param whose local shard has an odd length misaligns every later gradient, the same way
every step. So a bucket is never launched as a whole with the alignment of its worst tensor: each call splits it
by each entry's class, both aligned (STATE_ALIGNED, STREAM_ALIGNED), only the state (STATE_ALIGNED: param, momentum
and compensation keep their 128-bit accesses, the gradient is read by scalars) or neither, into one launch per
class present, each over the program map of its entries. The split is recomputed only when the gradients'
addresses change, and cached by the mask of their alignment (a sub-bucket's program map is uploaded once per mask),
so a step whose gradients sit where they sat before reads one cached list of launches. `Prepared.launched` says what
the last call launched: kernel, constexprs, programs and entries.

Split step (Distributed Lion). `direction` advances each momentum exactly as `step` and returns each entry's sign
of `c` as int8 (1, -1; 0 for 0 and NaN: a vote cannot hold a NaN), views into one buffer of the route that the next
`direction` overwrites; `apply` takes the agreed fp32 directions (others are converted: the votes' values are exact
in fp32) and applies `p <- p * (1 - lr * wd) - lr * u` with the step's rounding (stochastic, or Kahan-compensated).

The hyperparameters reach the kernels as one device tensor (`tables.HyperTable`); see `tables.py` for what a CUDA
graph's replay re-executes. This module checks only what the backend's declaration cannot say: one device per
route, contiguity, storage (a DTensor's `data_ptr()` is 0), sizes that the kernel reads raw, overlaps.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lion_dist.backends import Entry, StepArgs, refuse_overlaps
from lion_dist.backends.triton import kernels
from lion_dist.backends.triton import tables as tables_
from lion_dist.spec import MOMENTUM_STREAM, int8_scale_shape

k = kernels  # the named constants (the kernels themselves are looked up as `kernels.lion_kernel` at each launch)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CODE = {d: c.value for d, c in zip(_DTYPES, (k.CODE_FP32, k.CODE_BF16, k.CODE_FP16, k.CODE_FP64), strict=True)}
FP32, MIXED, FP64 = k.FP32.value, k.MIXED.value, k.FP64.value
STEP, DIRECTION, APPLY = k.STEP.value, k.DIRECTION.value, k.APPLY.value
_ALIGN = k.VECTOR_BYTES.value  # bytes: the width of a vector access
_GRAIN = k.VECTOR_GRAIN.value  # elements: int8 rows and blocks of whole vectors
_BLOCKS = {512: 2, 2048: 8}  # BLOCK: num_warps, 8 elements per thread (two 128-bit fp32 accesses, one bf16)
INT8_MAX_BLOCK = 1024  # elements per scale that the int8 kernel takes (any block up to this, padded to a power of 2)
_INT8_TILE = 2048  # elements per program: ROWS momentum blocks of BLOCK (padded) elements, on 8 warps
_INT8_WARPS = 8
_INT8_BLOCKS = tuple(1 << n for n in range(4, 11))  # BLOCK (padded block): 16 .. 1024
_ALIGNMENTS = ((True, True), (True, False), (False, False))  # (STATE_ALIGNED, STREAM_ALIGNED) classes
_MASKS_KEPT = 16  # alignment masks cached per bucket


@dataclass(frozen=True)
class Launch:
    """One launch of a bucket: its alignment class, its program map and the route entries it covers."""

    state_aligned: bool
    stream_aligned: bool
    programs: Tensor
    n_programs: int
    entries: tuple[int, ...]


@dataclass(frozen=True)
class Launched:
    """A record of one launch (`Prepared.launched`)."""

    kernel: str  # "lion" or "int8"
    constexprs: dict
    n_programs: int
    entries: tuple[int, ...]  # positions in the route


@dataclass
class _Stream:
    """A bucket's per-step operand (gradients; directions in `apply`): its address table and the launches that
    its alignment implies."""

    table: tables_.DeviceTable
    launches: list[Launch] = field(default_factory=list)


@dataclass
class Bucket:
    """Entries that one kernel specialization family updates, with their static tables."""

    kernel: str  # "lion" or "int8"
    index: list[int]  # positions in the route
    dtypes: int
    block: int  # BLOCK (int8: the padded momentum block)
    compensated: bool
    stochastic: bool  # holds a bf16 param (stochastic rounding applies to it)
    state_aligned: np.ndarray  # per entry
    counts: np.ndarray  # programs per entry
    pointers: Tensor | None = None
    layout: Tensor | None = None
    programs: Tensor | None = None
    out: Tensor | None = None  # the direction outputs' addresses (after the first `direction`)
    streams: dict[str, _Stream] = field(default_factory=dict)
    by_mask: dict[bytes | None, list[Launch]] = field(default_factory=dict)  # by the stream's alignment mask
    whole: bool = False  # holds every entry of the route, in order (a step's addresses are its own)
    host_tables: tuple[np.ndarray, np.ndarray] | None = None  # (pointers, layout) until uploaded

    @property
    def n_programs(self) -> int:
        return int(self.counts.sum())

    def program_map(self, members: np.ndarray | None = None) -> np.ndarray:
        """The programs of `members` (positions in the bucket; None: all), on the host."""
        members = np.arange(len(self.counts)) if members is None else members
        return _program_map(self.counts[members], members)

    @property
    def constexprs(self) -> dict[str, int]:
        if self.kernel == "int8":
            return dict(DTYPES=self.dtypes, BLOCK=self.block, ROWS=_INT8_TILE // self.block)
        return dict(DTYPES=self.dtypes, BLOCK=self.block)


@dataclass
class Prepared:
    """What `prepare` made of a route's entries: its buckets and hp table, and what the calls added."""

    device: torch.device
    entries: list[Entry]
    buckets: list[Bucket]  # step and direction
    hp: tables_.HyperTable
    apply_buckets: list[Bucket] | None = None  # the float buckets, and the int8 entries' params (built at first use)
    directions: list[Tensor] | None = None  # int8 outputs of `direction` (allocated at first use)
    launched: list[Launched] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- rules


def block_rule(max_numel: int) -> int:
    """BLOCK: 2048 elements on 8 warps, or 512 on 2 for a bucket of only small tensors."""
    return 512 if max_numel <= 512 else 2048


def family(triple: tuple[torch.dtype, ...]) -> int:
    """DTYPES of a (param, grad[, momentum]) dtype tuple."""
    if all(d == torch.float32 for d in triple):
        return FP32
    return FP64 if triple[0] == torch.float64 else MIXED


def int8_padded_block(block: int) -> int:
    """The int8 kernel's BLOCK for a momentum block of `block` elements: the next power of two, at least 16."""
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= INT8_MAX_BLOCK:
        raise ValueError(
            f"lion_triton: int8 momentum block {block!r} is not supported: the Triton kernel takes blocks of 1 to "
            f"{INT8_MAX_BLOCK} elements"
        )
    return max(16, 1 << (block - 1).bit_length())


def _roundings(mode: int, dtypes: int) -> tuple[tuple[bool, bool], ...]:
    """(STOCHASTIC, COMPENSATED) pairs the float kernel compiles: bf16 params (MIXED) round stochastically or are
    compensated (never both: `groups.validate`); a direction writes no param."""
    if mode == DIRECTION or dtypes != MIXED:
        return ((False, False),)
    return (False, False), (True, False), (False, True)


def specializations() -> list[dict[str, object]]:
    """The constexprs of every `lion_kernel` launch the launcher can make (num_warps follows BLOCK): mode x dtype
    family x BLOCK x alignment class x rounding, 78 in all."""
    return [
        dict(
            MODE=mode,
            DTYPES=dtypes,
            BLOCK=block,
            STATE_ALIGNED=state,
            STREAM_ALIGNED=stream,
            STOCHASTIC=sr,
            COMPENSATED=comp,
        )
        for mode, dtypes, block, (state, stream) in itertools.product(
            (STEP, DIRECTION, APPLY), (FP32, MIXED, FP64), _BLOCKS, _ALIGNMENTS
        )
        for sr, comp in _roundings(mode, dtypes)
    ]


def int8_specializations() -> list[dict[str, object]]:
    """The constexprs of every `lion_int8_kernel` launch (num_warps 8; ROWS follows BLOCK): mode (STEP, DIRECTION)
    x dtypes (fp32 params and grads, or a mix of fp32/bf16/fp16) x padded block (16 .. 1024) x alignment class x
    STOCHASTIC (param rounding and requantization, each then a runtime flag) x COMPENSATED (STEP of a mix), 210."""
    return [
        dict(
            MODE=mode,
            DTYPES=dtypes,
            BLOCK=block,
            ROWS=_INT8_TILE // block,
            STATE_ALIGNED=state,
            STREAM_ALIGNED=stream,
            STOCHASTIC=sr,
            COMPENSATED=comp,
        )
        for mode, dtypes, block, (state, stream), sr in itertools.product(
            (STEP, DIRECTION), (FP32, MIXED), _INT8_BLOCKS, _ALIGNMENTS, (False, True)
        )
        for comp in ((False, True) if mode == STEP and dtypes == MIXED else (False,))
    ]


# ---------------------------------------------------------------------------------------------- prepare


def _storage_error(i: int, e: Entry, device: torch.device) -> str | None:
    """What the kernel cannot read of entry i (raw addresses: device, contiguity, storage, sizes), or None."""
    p, state, c = e.param, e.state, e.compensation
    tensors = [("param", p), ("momentum", state[0]), *(("scales", t) for t in state[1:])]
    if c is not None:
        tensors.append(("compensation", c))
    for what, t in tensors:
        if t.device != device:
            return f"its {what} is on {t.device}, tensor 0's param on {device}: one device per plan"
        if not t.is_contiguous():
            return f"its {what} is not contiguous (the plan stages strided tensors through contiguous copies)"
        if t.numel() and t.data_ptr() == 0:
            return (
                f"its {what} has no storage (data_ptr() is 0: a DTensor?): pass its local shard, e.g. "
                "lion_dist.layouts.local(t)"
            )
    if state[0].numel() != p.numel() or (c is not None and (c.numel() != p.numel() or c.dtype != p.dtype)):
        return (
            f"param {tuple(p.shape)} {p.dtype}, momentum {tuple(state[0].shape)}, compensation "
            f"{None if c is None else (tuple(c.shape), c.dtype)}: they must have the param's elements (and the "
            "compensation its dtype)"
        )
    if c is not None and p.dtype == torch.float64:
        return "Kahan compensation of fp64 params is not implemented by the Triton kernel (their math is fp64)"
    if e.format.kind == "int8":
        codes, scales = state
        int8_padded_block(e.format.block)
        if codes.dtype != torch.int8 or scales.dtype != torch.float32:
            return f"int8 momentum needs int8 codes and contiguous fp32 scales, got {codes.dtype} and {scales.dtype}"
        if tuple(scales.shape) != int8_scale_shape(codes.shape, e.format.block):
            return (
                f"param shape {tuple(p.shape)}, codes {tuple(codes.shape)} and scales {tuple(scales.shape)}; int8 "
                f"momentum needs scales of shape {int8_scale_shape(codes.shape, e.format.block)} (block "
                f"{e.format.block})"
            )
    return None


def _aligned(*tensors: Tensor | None) -> bool:
    return not any(t.data_ptr() % _ALIGN for t in tensors if t is not None)


def _program_map(counts: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """`owners[i] << PROGRAM_SHIFT | j` for j < counts[i]: the programs of those entries of a bucket, in order."""
    ranges = np.concatenate(([0], np.cumsum(counts)))
    owner = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(ranges[-1], dtype=np.int64) - ranges[owner]
    return (owners[owner].astype(np.int64) << k.PROGRAM_SHIFT.value) | within


def _float_bucket(
    entries: Sequence[Entry], index: list[int], dtypes: int, compensated: bool, param_only: bool = False
) -> Bucket:
    """A `lion_kernel` bucket; `param_only`: for `apply` only (int8 entries' params: no momentum operand)."""
    numels = [entries[i].param.numel() for i in index]
    block = block_rule(max(numels))
    pointers = np.zeros((len(index), k.POINTERS.value), dtype=np.int64)
    layout = np.zeros((len(index), k.LAYOUT.value), dtype=np.int64)
    for row, i in enumerate(index):
        e = entries[i]
        param_id, base, shard = e.place
        code = _CODE[e.param.dtype]
        if not param_only:
            code |= _CODE[e.grad_dtype] << k.GRAD_SHIFT.value | _CODE[e.exp_avg.dtype] << k.MOMENTUM_SHIFT.value
            pointers[row, k.P_MOMENTUM.value] = e.exp_avg.data_ptr()
        pointers[row, k.P_PARAM.value] = e.param.data_ptr()
        if e.compensation is not None:
            pointers[row, k.P_COMPENSATION.value] = e.compensation.data_ptr()
        layout[row, [k.L_NUMEL.value, k.L_PARAM_ID.value, k.L_BASE.value, k.L_SHARD.value, k.L_CODE.value]] = (
            e.param.numel(),
            param_id,
            base,
            shard & 0xFFFFFFFF,
            code,
        )
    counts = np.array([-(-n // block) for n in numels], dtype=np.int64)
    state_aligned = [
        _aligned(entries[i].param, entries[i].compensation, None if param_only else entries[i].exp_avg) for i in index
    ]
    return Bucket(
        kernel="lion",
        index=list(index),
        dtypes=dtypes,
        block=block,
        compensated=compensated,
        stochastic=any(entries[i].param.dtype == torch.bfloat16 for i in index),
        state_aligned=np.array(state_aligned, dtype=bool),
        counts=counts,
        host_tables=(pointers, layout),
    )


def _int8_bucket(entries: Sequence[Entry], index: list[int], dtypes: int, block: int, compensated: bool) -> Bucket:
    """A `lion_int8_kernel` bucket: ROWS = _INT8_TILE // block momentum blocks per program."""
    rows = _INT8_TILE // block
    pointers = np.zeros((len(index), k.POINTERS.value), dtype=np.int64)
    layout = np.zeros((len(index), k.INT8_LAYOUT.value), dtype=np.int64)
    tiles, state_aligned = [], []
    for row, i in enumerate(index):
        e = entries[i]
        codes, scales = e.state
        n = codes.shape[-1] if codes.dim() else 1
        param_id, base, shard = e.place
        per_row = -(-n // e.format.block)
        n_blocks = codes.numel() // n * per_row
        tiles.append(-(-n_blocks // rows))
        # every block's first element index is base + r * n + j * block: all multiples of 8 when their gcd is
        eights = math.gcd(base, n if n_blocks > per_row else 0, e.format.block if per_row > 1 else 0) % 8 == 0
        code = _CODE[e.param.dtype] | _CODE[e.grad_dtype] << k.GRAD_SHIFT.value
        pointers[row] = (e.param.data_ptr(), codes.data_ptr(), scales.data_ptr(), 0)
        if e.compensation is not None:
            pointers[row, k.P_COMPENSATION.value] = e.compensation.data_ptr()
        slots = [k.I_ROW, k.I_BLOCK, k.I_PER_ROW, k.I_BLOCKS, k.I_PARAM_ID, k.I_BASE, k.I_SHARD, k.I_QUANT_SHARD]
        layout[row, [s.value for s in (*slots, k.I_CODE, k.I_EIGHTS)]] = (
            n,
            e.format.block,
            per_row,
            n_blocks,
            param_id,
            base,
            shard & 0xFFFFFFFF,
            (shard | MOMENTUM_STREAM) & 0xFFFFFFFF,
            code,
            int(eights),
        )
        whole = n % _GRAIN == 0 and e.format.block % _GRAIN == 0  # rows and blocks of whole vectors
        state_aligned.append(whole and _aligned(e.param, codes, e.compensation))
    counts = np.array(tiles, dtype=np.int64)
    return Bucket(
        kernel="int8",
        index=list(index),
        dtypes=dtypes,
        block=block,
        compensated=compensated,
        stochastic=any(entries[i].param.dtype == torch.bfloat16 for i in index),
        state_aligned=np.array(state_aligned, dtype=bool),
        counts=counts,
        host_tables=(pointers, layout),
    )


def _upload_buckets(buckets: Sequence[Bucket], device: torch.device) -> None:
    """Every bucket's static tables in one upload, each table starting 16-byte aligned."""
    pieces, spans = [], []
    offset = 0
    for b in buckets:
        for table in (*b.host_tables, b.program_map()):
            flat = table.reshape(-1)
            pieces += [flat, np.zeros(len(flat) % 2, dtype=np.int64)]
            spans.append((offset, len(flat)))
            offset += len(flat) + len(flat) % 2
    if not pieces:
        return
    uploaded = tables_.upload(np.concatenate(pieces), device)
    views = iter(uploaded[start : start + n] for start, n in spans)
    for b in buckets:
        b.pointers, b.layout, b.programs = next(views), next(views), next(views)
        b.host_tables = None


def prepare(entries: Sequence[Entry]) -> Prepared:
    """Check what the kernels read raw, bucket the non-empty entries, upload the static tables."""
    entries = list(entries)
    device = entries[0].param.device if entries else torch.device("cpu")
    for i, e in enumerate(entries):
        if (why := _storage_error(i, e, device)) is not None:
            raise ValueError(f"lion_triton: tensor {i}: {why}")
    pairs = [(e.param, e.exp_avg) for e in entries]
    names = [f"tensor {i}" for i in range(len(entries))]
    for i, e in enumerate(entries):
        for what, t in (("int8 scales", e.state[1] if len(e.state) > 1 else None), ("compensation", e.compensation)):
            if t is not None:
                pairs.append((t, _NO_TENSOR))
                names.append(f"tensor {i}'s {what}")
    refuse_overlaps(pairs, names)  # programs would race on shared memory
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(entries):
        if not e.param.numel():
            continue
        compensated = e.compensation is not None
        if e.format.kind == "int8":
            dtypes = family((e.param.dtype, e.grad_dtype))
            key = ("int8", MIXED if compensated else dtypes, int8_padded_block(e.format.block), compensated)
        else:
            dtypes = family((e.param.dtype, e.grad_dtype, e.exp_avg.dtype))
            key = ("lion", MIXED if compensated else dtypes, 0, compensated)
        groups.setdefault(key, []).append(i)
    buckets = [
        _int8_bucket(entries, index, dtypes, block, comp)
        if kind == "int8"
        else _float_bucket(entries, index, dtypes, comp)
        for (kind, dtypes, block, comp), index in groups.items()
    ]
    for b in buckets:
        b.whole = b.index == list(range(len(entries)))
    with _on_device(device):
        _upload_buckets(buckets, device)
        return Prepared(device, entries, buckets, tables_.HyperTable(device))


_NO_TENSOR = torch.empty(0)  # refuse_overlaps skips it: pairs a scales or compensation tensor with nothing


# ---------------------------------------------------------------------------------------------- launches


def _launches(bucket: Bucket, role: str, addresses: array) -> tuple[Tensor, list[Launch]]:
    """This call's address table of `role` for the bucket, and its launches (split by alignment class)."""
    stream = bucket.streams.get(role)
    if stream is None:
        changed = f"the {'gradients' if role == 'grads' else 'directions'}' addresses changed"
        table = tables_.DeviceTable(bucket.programs.device, len(bucket.index), changed)
        stream = bucket.streams[role] = _Stream(table)
    mine = addresses if bucket.whole else array("q", map(addresses.__getitem__, bucket.index))
    if stream.table.upload(mine):
        values = np.frombuffer(mine, dtype=np.int64)
        all_aligned = not np.bitwise_or.reduce(values) % _ALIGN  # the common case: one cached mask
        stream.launches = _split(bucket, None if all_aligned else values % _ALIGN == 0)
    return stream.table.tensor, stream.launches


def _split(bucket: Bucket, stream_aligned: np.ndarray | None) -> list[Launch]:
    """The launches of one alignment mask (None: every stream operand aligned): one per class present, cached."""
    key = None if stream_aligned is None else stream_aligned.tobytes()
    launches = bucket.by_mask.get(key)
    if launches is not None:
        return launches
    stream_aligned = np.ones(len(bucket.index), dtype=bool) if stream_aligned is None else stream_aligned
    classes = np.where(bucket.state_aligned, np.where(stream_aligned, 2, 1), 0).astype(np.int8)
    launches = []
    for cls, (state, stream) in zip((2, 1, 0), _ALIGNMENTS, strict=True):
        members = np.flatnonzero(classes == cls)
        if not len(members):
            continue
        if len(members) == len(classes):
            programs = bucket.programs
        else:
            programs = tables_.upload(bucket.program_map(members), bucket.programs.device)
        entries = tuple(bucket.index[m] for m in members)
        launches.append(Launch(state, stream, programs, len(programs), entries))
    if len(bucket.by_mask) >= _MASKS_KEPT:
        bucket.by_mask.pop(next(iter(bucket.by_mask)))
    bucket.by_mask[key] = launches
    return launches


_NO_SKIP: dict[torch.device, Tensor] = {}


def _check_skip(skip: Tensor | None, device: torch.device) -> Tensor:
    if skip is None:
        if device not in _NO_SKIP:
            _NO_SKIP[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return _NO_SKIP[device]
    if skip.numel() != 1 or skip.dtype != torch.int32 or skip.device != device:
        raise ValueError(
            f"skip must be a 1-element int32 tensor on {device}, got {skip.numel()} {skip.dtype} element(s) on "
            f"{skip.device}; pass e.g. torch.zeros(1, dtype=torch.int32, device={str(device)!r})"
        )
    return skip


def _run(prepared: Prepared, mode: int, buckets: Sequence[Bucket], operands: Sequence[Tensor], args: StepArgs) -> None:
    """One launch per bucket and alignment class; `operands`: this call's gradients (or directions), per entry."""
    launched: list[Launched] = []
    prepared.launched = launched
    if not buckets:
        return
    skip = _check_skip(args.skip, prepared.device)
    addresses = array("q", map(Tensor.data_ptr, operands))
    role = "directions" if mode == APPLY else "grads"
    sr, quant = args.sr_key is not None, args.quant_key is not None
    with _on_device(prepared.device):
        hp = prepared.hp.write(args)
        for bucket in buckets:
            table, launches = _launches(bucket, role, addresses)
            if bucket.kernel == "int8":
                kernel, warps = kernels.lion_int8_kernel, _INT8_WARPS
                stochastic = quant or (mode == STEP and sr and bucket.stochastic)
            else:
                kernel, warps = kernels.lion_kernel, _BLOCKS[bucket.block]
                stochastic = mode != DIRECTION and sr and bucket.stochastic and not bucket.compensated
            rounding = dict(STOCHASTIC=bool(stochastic), COMPENSATED=bucket.compensated and mode != DIRECTION)
            out = bucket.out if mode == DIRECTION else table
            for launch in launches:
                constexprs = dict(
                    MODE=mode,
                    **bucket.constexprs,
                    STATE_ALIGNED=launch.state_aligned,
                    STREAM_ALIGNED=launch.stream_aligned,
                    **rounding,
                )
                kernel[(launch.n_programs,)](
                    bucket.pointers,
                    table,
                    out,
                    bucket.layout,
                    launch.programs,
                    hp,
                    skip,
                    **constexprs,
                    num_warps=warps,
                    enable_fp_fusion=False,  # every fma is explicit: the compiler contracts nothing else
                )
                launched.append(Launched(bucket.kernel, constexprs, launch.n_programs, launch.entries))


def step(prepared: Prepared, grads: Sequence[Tensor], args: StepArgs) -> None:
    """One fused step. `grads`: contiguous, on the plan's device, of the prepared dtypes and sizes, one per entry."""
    _run(prepared, STEP, prepared.buckets, grads, args)


def direction(prepared: Prepared, grads: Sequence[Tensor], args: StepArgs) -> list[Tensor]:
    """Per entry the int8 sign of `c` (views into the route's buffer: the next call overwrites them), each momentum
    advanced exactly as `step` advances it."""
    outputs = _direction_outputs(prepared)
    _run(prepared, DIRECTION, prepared.buckets, grads, args)
    return list(outputs)


def apply(prepared: Prepared, directions: Sequence[Tensor], args: StepArgs) -> None:
    """`p <- p * (1 - lr * wd) - lr * u` per entry, `u` the agreed direction (read as fp32)."""
    if [u.numel() for u in directions] != [e.param.numel() for e in prepared.entries]:
        raise ValueError(
            f"lion_triton: apply got directions of {[u.numel() for u in directions]} elements for tensors of "
            f"{[e.param.numel() for e in prepared.entries]}"
        )
    directions = [u if u.dtype == torch.float32 and u.is_contiguous() else u.float().contiguous() for u in directions]
    _run(prepared, APPLY, _apply_buckets(prepared), directions, args)


def _apply_buckets(prepared: Prepared) -> list[Bucket]:
    """The float buckets, and for int8 entries buckets of their params alone (built at the first `apply`)."""
    if prepared.apply_buckets is None:
        groups: dict[tuple, list[int]] = {}
        for b in prepared.buckets:
            if b.kernel == "int8":
                for i in b.index:
                    p = prepared.entries[i].param
                    groups.setdefault((MIXED if b.compensated else family((p.dtype,)), b.compensated), []).append(i)
        extra = [_float_bucket(prepared.entries, index, d, c, param_only=True) for (d, c), index in groups.items()]
        with _on_device(prepared.device):
            _upload_buckets(extra, prepared.device)
        prepared.apply_buckets = [b for b in prepared.buckets if b.kernel == "lion"] + extra
    return prepared.apply_buckets


def _direction_outputs(prepared: Prepared) -> list[Tensor]:
    """The route's int8 direction buffer (each entry's segment 16-byte aligned) and each bucket's table of it."""
    if prepared.directions is None:
        sizes = [e.param.numel() for e in prepared.entries]
        starts = list(itertools.accumulate((-(-n // _ALIGN) * _ALIGN for n in sizes), initial=0))
        with _on_device(prepared.device):
            buffer = torch.empty(starts[-1], dtype=torch.int8, device=prepared.device)
            shapes = [e.param.shape for e in prepared.entries]
            views = [buffer[s : s + n].view(shape) for s, n, shape in zip(starts, sizes, shapes, strict=False)]
            for b in prepared.buckets:
                b.out = tables_.upload(np.array([views[i].data_ptr() for i in b.index], dtype=np.int64), buffer.device)
        prepared.directions = views
    return prepared.directions


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
