"""The Triton kernels of the fused Lion step: the `@triton.jit` functions and the named constants they read.

Two kernels share every element function (`_direction`, `_momentum`, `_update`, the loads, the param's store with
its rounding, the Philox noise, the hyperparameters): `lion_kernel` steps tensors with a float momentum, one
program per BLOCK elements; `lion_int8_kernel` steps tensors with int8 momentum, one program per ROWS momentum blocks
(a [ROWS, BLOCK] tile, BLOCK the block padded to a power of two), requantizing each block after the math. The math
and rounding are `spec.lion_reference`'s: `x * a + y * b` is `tl.fma(y, b, x * a)`, `sign(c) + 0 * c` keeps a NaN
visible, maximize is folded into the signs of `1 - b1` and `1 - b2` (exactly the negated gradient), scalars are
rounded once from float64 to the math dtype, `1 - lr * wd` is computed in float64.

MODE selects what a launch does (the launcher's `step`, `direction`, `apply`): STEP, the fused step; DIRECTION, the
first half of a split step (Distributed Lion): the momentum advances exactly as in STEP and the sign of `c` is
written as int8 to `out` (a NaN `c` writes 0: one vote cannot hold a NaN); APPLY, the second half: the param takes
the agreed fp32 direction `u` from the per-step table, `p <- p * (1 - lr * wd) - lr * u`, rounded as in STEP.

What a launch reads (every runtime argument is a tensor; the launcher never passes a scalar):
- `pointers`: POINTERS int64 addresses per tensor (param, momentum or int8 codes, int8 scales, Kahan compensation;
  0 where a tensor has none), and `layout`: LAYOUT (float) or INT8_LAYOUT (int8) int64 per tensor, named slots below;
- `stream`: this step's address per tensor of the operand that changes every step: the gradient (STEP, DIRECTION)
  or the agreed direction (APPLY); `out`: the int8 direction per tensor (DIRECTION; any table otherwise);
- `programs`: per program, `tensor << PROGRAM_SHIFT | k`, k its block (float) or tile (int8) in that tensor, so a
  launch may cover any subset of a bucket's tensors (the launcher splits a bucket by alignment this way);
- `hp`: the hyperparameter table, HP_SLOTS int64 on the device (floats as float64 bit patterns); a Philox key is
  its slot, or `(hp[key slot] + hp[its step slot]) mod 2**62`, so a step count kept on the device (capturable) needs no
  host read. `hp[HP_FLAGS]`: PARAM_SR (bf16 params round stochastically), QUANT_SR (int8 momenta requantize
  stochastically), SR_KEY_STEP and QUANT_KEY_STEP (the key counts a device step);
- `skip`: a 1-element int32 flag; non-zero: every program returns without writing.

Constexprs: MODE, DTYPES (FP32: all fp32, one code path; MIXED: any mix of fp32/bf16/fp16 with fp32 math, a branch
per dtype code, uniform over a program; FP64: all fp64, fp64 math), BLOCK (and ROWS), STATE_ALIGNED (param,
momentum, compensation and direction outputs 16-byte aligned: 128-bit accesses), STREAM_ALIGNED (the per-step
operand too), STOCHASTIC (the Philox code is compiled; the hp flags decide at run time), COMPENSATED (Kahan: the
param reads `p + compensation` and keeps its rounding error in the compensation buffer, of the param's dtype).

Triton reads TRITON_INTERPRET when `triton` is first imported (its own library functions, e.g. `tl.philox`, are
jit-decorated then) and again when each kernel is decorated, i.e. when this module is imported. With
`TRITON_INTERPRET=1` set for the whole process, the kernels run in Triton's interpreter on CPU tensors (how the
tests drive them without a GPU); otherwise they are compiled and need CUDA tensors. A mix of the two cannot work, so
importing this module raises if the variable changed in between (`interpreted()` and that check are the only
Python here besides the constants).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# ---------------------------------------------------------------------------------------------- named constants

# dtype codes, 2 bits per operand in a tensor's layout code: param | grad << GRAD_SHIFT | momentum << MOMENTUM_SHIFT
CODE_FP32 = tl.constexpr(0)
CODE_BF16 = tl.constexpr(1)
CODE_FP16 = tl.constexpr(2)
CODE_FP64 = tl.constexpr(3)
CODE_MASK = tl.constexpr(3)
GRAD_SHIFT = tl.constexpr(2)
MOMENTUM_SHIFT = tl.constexpr(4)

# DTYPES: the dtype family of a bucket
FP32 = tl.constexpr(0)
MIXED = tl.constexpr(1)
FP64 = tl.constexpr(2)

# MODE: what a launch does
STEP = tl.constexpr(0)
DIRECTION = tl.constexpr(1)
APPLY = tl.constexpr(2)

# the hyperparameter table: slots of `hp`
HP_LR = tl.constexpr(0)  # float64
HP_BETA1 = tl.constexpr(1)  # float64
HP_ONE_MINUS_BETA1 = tl.constexpr(2)  # float64, negated with maximize
HP_BETA2 = tl.constexpr(3)  # float64
HP_ONE_MINUS_BETA2 = tl.constexpr(4)  # float64, negated with maximize
HP_WEIGHT_DECAY = tl.constexpr(5)  # float64
HP_SR_KEY = tl.constexpr(6)  # int64: the params' Philox key (a DeviceKey's base)
HP_QUANT_KEY = tl.constexpr(7)  # int64: the int8 momenta's requantization key (a DeviceKey's base)
HP_SR_STEP = tl.constexpr(8)  # int64: added to HP_SR_KEY (a DeviceKey's step count, copied on the device; else 0)
HP_QUANT_STEP = tl.constexpr(9)  # int64: added to HP_QUANT_KEY
HP_FLAGS = tl.constexpr(10)  # int64: PARAM_SR | QUANT_SR | SR_KEY_STEP | QUANT_KEY_STEP
HP_SLOTS = tl.constexpr(11)

# bits of hp[HP_FLAGS]
PARAM_SR = tl.constexpr(1)  # bf16 params round stochastically (an sr_key was given)
QUANT_SR = tl.constexpr(2)  # int8 momenta requantize stochastically (a quant_key was given)
SR_KEY_STEP = tl.constexpr(4)  # the params' key is a DeviceKey: (HP_SR_KEY + HP_SR_STEP) mod 2**62
QUANT_KEY_STEP = tl.constexpr(8)  # the momenta's key is a DeviceKey: (HP_QUANT_KEY + HP_QUANT_STEP) mod 2**62

KEY_MASK = tl.constexpr((1 << 62) - 1)  # Philox keys are mod 2**62 (`spec.KEY_BITS`)
PROGRAM_SHIFT = tl.constexpr(32)  # programs[i] = tensor << PROGRAM_SHIFT | block (or tile) in that tensor
PROGRAM_MASK = tl.constexpr((1 << 32) - 1)

# the pointer table: POINTERS addresses per tensor
POINTERS = tl.constexpr(4)
P_PARAM = tl.constexpr(0)
P_MOMENTUM = tl.constexpr(1)  # a float momentum, or int8 codes
P_SCALES = tl.constexpr(2)  # int8 scales (fp32, one per block); 0 for a float momentum
P_COMPENSATION = tl.constexpr(3)  # the Kahan buffer (the param's dtype); 0 without

# the float kernel's layout: LAYOUT int64 per tensor
LAYOUT = tl.constexpr(5)
L_NUMEL = tl.constexpr(0)
L_PARAM_ID = tl.constexpr(1)
L_BASE = tl.constexpr(2)  # the global index of the tensor's first element in the whole param
L_SHARD = tl.constexpr(3)
L_CODE = tl.constexpr(4)

# the int8 kernel's layout: INT8_LAYOUT int64 per tensor
INT8_LAYOUT = tl.constexpr(10)
I_ROW = tl.constexpr(0)  # row length (the last dim)
I_BLOCK = tl.constexpr(1)  # elements per scale
I_PER_ROW = tl.constexpr(2)  # blocks per row
I_BLOCKS = tl.constexpr(3)  # blocks in the tensor
I_PARAM_ID = tl.constexpr(4)
I_BASE = tl.constexpr(5)
I_SHARD = tl.constexpr(6)
I_QUANT_SHARD = tl.constexpr(7)  # the momentum's noise stream: shard | spec.MOMENTUM_STREAM
I_CODE = tl.constexpr(8)  # param | grad << GRAD_SHIFT
I_EIGHTS = tl.constexpr(9)  # 1 when every block's first element index is a multiple of 8

INT8_MAX_CODE = tl.constexpr(127.0)  # `spec.INT8_MAX_CODE`
RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds |x| < 2**22 to an integer
EXPONENT_BITS = tl.constexpr(0x7F800000)  # of an fp32: all ones for Inf and NaN
BF16_KEEP = tl.constexpr(-65536)  # the 16 high bits of an fp32, which a bf16 keeps
NOISE_MASK = tl.constexpr(0xFFFF)  # 16 bits of noise per element
NOISE_PER_CALL = tl.constexpr(8)  # elements per Philox call (`spec.NOISE_PER_CALL`)
NOISE_CALL_SHIFT = tl.constexpr(3)  # log2(NOISE_PER_CALL)
VECTOR_BYTES = tl.constexpr(16)  # a 128-bit access: what STATE_ALIGNED and STREAM_ALIGNED promise of an address
VECTOR_GRAIN = tl.constexpr(16)  # elements: masks that change only every 16 elements keep accesses vectorized


# ---------------------------------------------------------------------------------------------- element functions


@triton.jit
def _f64(hp, slot):
    """A float64 slot of the hyperparameter table."""
    return tl.load(hp + slot).to(tl.float64, bitcast=True)


@triton.jit
def _hyperparameters(hp, COMPUTE: tl.constexpr):
    """(lr, beta1, 1 - beta1, beta2, 1 - beta2, decay) in the math dtype: each float64 rounded once, the decay
    `1 - lr * wd` in float64 first, as lion-pytorch computes it."""
    lr = _f64(hp, HP_LR)
    decay = 1.0 - lr * _f64(hp, HP_WEIGHT_DECAY)
    return (
        lr.to(COMPUTE),
        _f64(hp, HP_BETA1).to(COMPUTE),
        _f64(hp, HP_ONE_MINUS_BETA1).to(COMPUTE),
        _f64(hp, HP_BETA2).to(COMPUTE),
        _f64(hp, HP_ONE_MINUS_BETA2).to(COMPUTE),
        decay.to(COMPUTE),
    )


@triton.jit
def _key(hp, KEY: tl.constexpr, STEP_SLOT: tl.constexpr, FROM_STEP: tl.constexpr):
    """A Philox key: its slot as given (all 64 bits, as `spec.sr_noise` reads a number key), or with the flag
    FROM_STEP (a `spec.DeviceKey`) plus the step count in STEP_SLOT, mod 2**62."""
    key = tl.load(hp + KEY)
    if (tl.load(hp + HP_FLAGS) & FROM_STEP) != 0:
        key = (key + tl.load(hp + STEP_SLOT)) & KEY_MASK
    return key


@triton.jit
def _direction(g, m, beta1, one_minus_beta1):
    """`sign(c) + 0 * c` for `c = b1 * m + (1 - b1) * g`: -1, 0 or 1, NaN where c is not finite."""
    c = tl.fma(g, one_minus_beta1, m * beta1)
    return tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)).to(c.dtype) + c * 0.0


@triton.jit
def _momentum(g, m, beta2, one_minus_beta2):
    """`b2 * m + (1 - b2) * g`."""
    return tl.fma(g, one_minus_beta2, m * beta2)


@triton.jit
def _update(p, u, lr, decay):
    """`p * (1 - lr * wd) - lr * u` (decay 1 without weight decay: `p * 1` is p exactly)."""
    return tl.fma(u, -lr, p * decay)


@triton.jit
def _sign_int8(u):
    """The direction as an int8 vote: 1, -1, or 0 (for 0 and NaN)."""
    return tl.where(u > 0, 1, tl.where(u < 0, -1, 0)).to(tl.int8)


@triton.jit
def _round_to_bf16(x, noise):
    """fp32 -> bf16 in integer arithmetic: add `noise` to the 16 bits that go, then truncate.

    noise = 0x7FFF + (the lowest kept bit) rounds to nearest even (Triton's interpreter would truncate a plain
    cast), uniform random 16 bits round stochastically, without bias. Inf and NaN keep their value.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & BF16_KEEP).to(tl.float32, bitcast=True)
    return tl.where((bits & EXPONENT_BITS) != EXPONENT_BITS, rounded, x).to(tl.bfloat16)


@triton.jit
def _nearest(x):
    """The noise that makes `_round_to_bf16` round to nearest even: 0x7FFF + the lowest kept bit."""
    return 0x7FFF + ((x.to(tl.int32, bitcast=True) >> 16) & 1)


@triton.jit
def _nearest_value(x, code):
    """fp32 `x` rounded to nearest in the dtype of `code`, as fp32 again (the value a store keeps)."""
    if code == CODE_BF16:
        r = _round_to_bf16(x, _nearest(x)).to(tl.float32)
    elif code == CODE_FP16:
        r = x.to(tl.float16).to(tl.float32)
    else:
        r = x
    return r


@triton.jit
def _philox(q, key, param_id, shard):
    """The four Philox-4x32-10 outputs for counters (q low and high 32 bits, param id, shard)."""
    zero = tl.zeros_like(q).to(tl.uint32)
    return tl.philox(key, q.to(tl.uint32), (q >> 32).to(tl.uint32), zero + param_id, zero + shard)


@triton.jit
def _sr_noise(first, eights, key, param_id, shard, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """`spec.sr_noise` for ROWS runs of BLOCK elements, run i starting at element index first[i]: [ROWS, BLOCK]
    int32 of 16 bits each.

    Element e takes 16 bits of Philox(e // 8, param id, shard): word (e % 8) // 2, its low half for even e and its
    high half for odd e. When every first[i] is a multiple of 8 (`eights`) one call serves 8 elements, all four
    outputs and both halves used; otherwise each element makes its own call (8x the arithmetic): the same bits.
    """
    if eights:
        q = (first[:, None] >> NOISE_CALL_SHIFT) + tl.arange(0, BLOCK // NOISE_PER_CALL)[None, :].to(tl.int64)
        r0, r1, r2, r3 = _philox(q, key, param_id, shard)
        words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [i, j, k, l] = word 2k + l of counter j of run i
        halves = tl.join(words & NOISE_MASK, words >> 16)  # [i, j, k, l, h]: element 8j + 2 (2k + l) + h of run i
        noise = tl.reshape(halves, (ROWS, BLOCK)).to(tl.int32)
    else:
        e = first[:, None] + tl.arange(0, BLOCK)[None, :].to(tl.int64)
        s0, s1, s2, s3 = _philox(e >> NOISE_CALL_SHIFT, key, param_id, shard)
        w = (e & (NOISE_PER_CALL - 1)) >> 1
        word = tl.where(w == 0, s0, tl.where(w == 1, s1, tl.where(w == 2, s2, s3)))
        noise = ((word >> ((e & 1) * 16).to(tl.uint32)) & NOISE_MASK).to(tl.int32)
    return noise


@triton.jit
def _pointer(address, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """An int64 address as a typed pointer; ALIGNED tells the compiler it is 16-byte aligned (128-bit accesses)."""
    pointer = address.to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, VECTOR_BYTES)
    return pointer


@triton.jit
def _load(address, code, offs, mask, DTYPES: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements `offs` of a tensor of dtype code `code` (uniform over the program), in the math dtype.

    An FP32 (or FP64) bucket compiles one path; a MIXED one a branch per dtype, whose differently sized vector
    accesses cost a layout conversion through shared memory.
    """
    if DTYPES == FP64:
        x = tl.load(_pointer(address, tl.float64, ALIGNED) + offs, mask=mask)
    elif DTYPES == FP32:  # noqa: SIM114 (a constexpr test: an fp32 bucket compiles this path alone)
        x = tl.load(_pointer(address, tl.float32, ALIGNED) + offs, mask=mask)
    elif code == CODE_FP32:
        x = tl.load(_pointer(address, tl.float32, ALIGNED) + offs, mask=mask)
    elif code == CODE_BF16:
        x = tl.load(_pointer(address, tl.bfloat16, ALIGNED) + offs, mask=mask).to(tl.float32)
    else:
        x = tl.load(_pointer(address, tl.float16, ALIGNED) + offs, mask=mask).to(tl.float32)
    return x


@triton.jit
def _store(address, code, offs, mask, x, noise, DTYPES: tl.constexpr, ALIGNED: tl.constexpr):
    """Store math-dtype `x` in dtype code `code`: bf16 with `noise` added below the kept bits (see
    `_round_to_bf16`), fp16 rounded to nearest even."""
    if DTYPES == FP64:
        tl.store(_pointer(address, tl.float64, ALIGNED) + offs, x, mask=mask)
    elif DTYPES == FP32:  # noqa: SIM114 (a constexpr test: an fp32 bucket compiles this path alone)
        tl.store(_pointer(address, tl.float32, ALIGNED) + offs, x, mask=mask)
    elif code == CODE_FP32:
        tl.store(_pointer(address, tl.float32, ALIGNED) + offs, x, mask=mask)
    elif code == CODE_BF16:
        tl.store(_pointer(address, tl.bfloat16, ALIGNED) + offs, _round_to_bf16(x, noise), mask=mask)
    else:
        tl.store(_pointer(address, tl.float16, ALIGNED) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _store_nearest(address, code, offs, mask, x, DTYPES: tl.constexpr, ALIGNED: tl.constexpr):
    """`_store` rounding to nearest (even)."""
    if DTYPES == MIXED:
        _store(address, code, offs, mask, x, _nearest(x), DTYPES, ALIGNED)
    else:
        _store(address, code, offs, mask, x, 0, DTYPES, ALIGNED)


@triton.jit
def _load_param(addresses, code, offs, mask, DTYPES: tl.constexpr, ALIGNED: tl.constexpr, COMPENSATED: tl.constexpr):
    """The param in the math dtype; COMPENSATED: plus its Kahan compensation (`spec.compensated`)."""
    p_address, c_address = addresses
    p = _load(p_address, code, offs, mask, DTYPES, ALIGNED)
    if COMPENSATED:
        p = p + _load(c_address, code, offs, mask, DTYPES, ALIGNED)
    return p


@triton.jit
def _store_param(
    addresses,
    code,
    offs,
    mask,
    p,
    noise_at,
    hp,
    DTYPES: tl.constexpr,
    ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    COMPENSATED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write the updated param back (`spec.write_back`): to nearest; stochastically for a bf16 param when
    hp[HP_FLAGS] has PARAM_SR (the spec's Philox noise at `noise_at` = (first element index of each of the ROWS
    runs, whether they are all multiples of 8, param id, shard)); or, COMPENSATED, rounded to nearest with the
    rounding error `p - rounded` kept in the compensation buffer (itself rounded to nearest, in the param's dtype)."""
    p_address, c_address = addresses
    if DTYPES == MIXED:
        if COMPENSATED:
            rounded = _nearest_value(p, code)
            _store_nearest(p_address, code, offs, mask, rounded, DTYPES, ALIGNED)
            _store_nearest(c_address, code, offs, mask, p - rounded, DTYPES, ALIGNED)
        else:
            noise = _nearest(p)
            if STOCHASTIC:  # noqa: SIM102 (a constexpr test: only the stochastic kernel has Philox code)
                if (tl.load(hp + HP_FLAGS) & PARAM_SR) != 0:  # noqa: SIM102 (Triton: one runtime condition per if)
                    if code == CODE_BF16:
                        first, eights, param_id, shard = noise_at
                        key = _key(hp, HP_SR_KEY, HP_SR_STEP, SR_KEY_STEP)
                        noise = tl.reshape(_sr_noise(first, eights, key, param_id, shard, ROWS, BLOCK), p.shape)
            _store(p_address, code, offs, mask, p, noise, DTYPES, ALIGNED)
    else:  # fp32 or fp64 storage: no rounding to a narrower type
        _store(p_address, code, offs, mask, p, 0, DTYPES, ALIGNED)


# ---------------------------------------------------------------------------------------------- the float kernel


@triton.jit
def _float_block(
    addresses,
    code,
    offs,
    mask,
    noise_at,
    hp,
    MODE: tl.constexpr,
    DTYPES: tl.constexpr,
    BLOCK: tl.constexpr,
    STATE_ALIGNED: tl.constexpr,
    STREAM_ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    COMPENSATED: tl.constexpr,
):
    """One block of one tensor; `mask` is None for a full block, so its accesses stay vectorized. Every input is
    loaded before anything is stored."""
    COMPUTE: tl.constexpr = tl.float64 if DTYPES == FP64 else tl.float32
    p_address, m_address, c_address, stream_address, out_address = addresses
    p_code = code & CODE_MASK
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay = _hyperparameters(hp, COMPUTE)
    if MODE != APPLY:
        m_code = (code >> MOMENTUM_SHIFT) & CODE_MASK
        g = _load(stream_address, (code >> GRAD_SHIFT) & CODE_MASK, offs, mask, DTYPES, STREAM_ALIGNED)
        m = _load(m_address, m_code, offs, mask, DTYPES, STATE_ALIGNED)
    if MODE != DIRECTION:
        p = _load_param((p_address, c_address), p_code, offs, mask, DTYPES, STATE_ALIGNED, COMPENSATED)
    if MODE == APPLY:
        u = tl.load(_pointer(stream_address, tl.float32, STREAM_ALIGNED) + offs, mask=mask).to(COMPUTE)
    else:
        u = _direction(g, m, beta1, one_minus_beta1)
        m = _momentum(g, m, beta2, one_minus_beta2)
    if MODE != DIRECTION:
        p = _update(p, u, lr, decay)
        # fmt: off
        _store_param(
            (p_address, c_address), p_code, offs, mask, p, noise_at, hp, DTYPES, STATE_ALIGNED, STOCHASTIC,
            COMPENSATED, 1, BLOCK,
        )
        # fmt: on
    if MODE != APPLY:
        _store_nearest(m_address, m_code, offs, mask, m, DTYPES, STATE_ALIGNED)
    if MODE == DIRECTION:
        tl.store(_pointer(out_address, tl.int8, STATE_ALIGNED) + offs, _sign_int8(u), mask=mask)


RUNTIME_ARGS = ("pointers", "stream", "out", "layout", "programs", "hp", "skip")


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def lion_kernel(
    pointers,
    stream,
    out,
    layout,
    programs,
    hp,
    skip,
    MODE: tl.constexpr,
    DTYPES: tl.constexpr,
    BLOCK: tl.constexpr,
    STATE_ALIGNED: tl.constexpr,
    STREAM_ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    COMPENSATED: tl.constexpr,
):
    """Lion with a float momentum: program i updates BLOCK elements of the tensor and block `programs[i]` names.

    The tables are the module docstring's. Runtime arguments are never specialized (`do_not_specialize`): an
    address's alignment, which Triton would otherwise specialize on, is the launcher's STATE_ALIGNED and
    STREAM_ALIGNED, so what compiles is exactly the launcher's `specializations()`.
    """
    if tl.load(skip) == 0:
        program = tl.load(programs + tl.program_id(0))
        t = program >> PROGRAM_SHIFT
        start = (program & PROGRAM_MASK) * BLOCK
        row = layout + LAYOUT * t
        numel = tl.load(row + L_NUMEL)
        code = tl.load(row + L_CODE)
        table = pointers + POINTERS * t
        addresses = (
            tl.load(table + P_PARAM),
            tl.load(table + P_MOMENTUM),
            tl.load(table + P_COMPENSATION),
            tl.load(stream + t),
            tl.load(out + t),
        )
        first = tl.load(row + L_BASE) + start
        noise_at = (
            tl.zeros((1,), dtype=tl.int64) + first,
            first % NOISE_PER_CALL == 0,
            tl.load(row + L_PARAM_ID).to(tl.uint32),
            tl.load(row + L_SHARD).to(tl.uint32),
        )
        offs = start + tl.arange(0, BLOCK)
        # three inlined copies: a full block without a mask keeps its accesses vectorized, and a tail of a multiple
        # of 16 elements masks by 16s (the compiler sees the mask change only every 16 elements: vectorized too)
        if start + BLOCK <= numel:
            # fmt: off
            _float_block(
                addresses, code, offs, None, noise_at, hp, MODE, DTYPES, BLOCK, STATE_ALIGNED, STREAM_ALIGNED,
                STOCHASTIC, COMPENSATED,
            )
            # fmt: on
        elif numel % VECTOR_GRAIN == 0:
            # fmt: off
            _float_block(
                addresses, code, offs, offs < (numel // VECTOR_GRAIN) * VECTOR_GRAIN, noise_at, hp, MODE, DTYPES,
                BLOCK, STATE_ALIGNED,
                STREAM_ALIGNED, STOCHASTIC, COMPENSATED,
            )
            # fmt: on
        else:
            # fmt: off
            _float_block(
                addresses, code, offs, offs < numel, noise_at, hp, MODE, DTYPES, BLOCK, STATE_ALIGNED,
                STREAM_ALIGNED, STOCHASTIC, COMPENSATED,
            )
            # fmt: on


# ---------------------------------------------------------------------------------------------- the int8 kernel


@triton.jit
def _rint(x):
    """fp32 x rounded to the nearest integer, ties to even, exactly for |x| < 2**22 (|x| <= 255 here); NaN and
    Inf stay themselves. Plain adds, on every target (no libdevice, whose rounding functions flush denormals)."""
    return (x + RINT_MAGIC) - RINT_MAGIC  # the sum's ulp is 1, its last bit x's parity


@triton.jit
def _floor(x):
    """fp32 floor, exactly for |x| < 2**22, denormals included (libdevice's floorf flushes -1e-40 to -0, not -1)."""
    r = _rint(x)
    return tl.where(r > x, r - 1.0, r)


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def lion_int8_kernel(
    pointers,
    stream,
    out,
    layout,
    programs,
    hp,
    skip,
    MODE: tl.constexpr,
    DTYPES: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    STATE_ALIGNED: tl.constexpr,
    STREAM_ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    COMPENSATED: tl.constexpr,
):
    """Lion with int8 momentum (MODE STEP or DIRECTION): program i takes ROWS consecutive momentum blocks of one
    tensor, a tile [ROWS, BLOCK] (BLOCK: the block padded to a power of two, masked), `spec.lion_reference_int8`
    per block.

    Dequantize (`code * scale`), the element functions of `lion_kernel` in fp32, then per block `scale = absmax /
    127` (NaN if the block holds a NaN), `x = m / scale` (both correctly rounded), `q = rint(x)` (with QUANT_SR:
    `floor(x + noise / 2**16)`, the momentum stream's Philox noise), 0 where not finite, else clamped to [-127, 127].
    STATE_ALIGNED also says every row length and the block are multiples of 16 elements.
    """
    if tl.load(skip) == 0:
        program = tl.load(programs + tl.program_id(0))
        t = program >> PROGRAM_SHIFT
        row = layout + INT8_LAYOUT * t
        n = tl.load(row + I_ROW)
        block = tl.load(row + I_BLOCK)
        per_row = tl.load(row + I_PER_ROW)
        b = (program & PROGRAM_MASK) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # the tile's blocks
        valid = b < tl.load(row + I_BLOCKS)
        r = b // per_row
        j = b - r * per_row
        start = r * n + j * block  # of each block, in the tensor
        limit = tl.where(valid, tl.minimum(block, n - j * block), 0)  # its length (short at a row's end)
        if STATE_ALIGNED:  # rows and blocks of multiples of 16: vector accesses, masks by 16s
            start = tl.multiple_of(start, VECTOR_GRAIN)
            limit = tl.multiple_of(limit, VECTOR_GRAIN)
        k = tl.arange(0, BLOCK)
        offs = start[:, None] + k[None, :]
        mask = k[None, :] < limit[:, None]
        code = tl.load(row + I_CODE)
        p_code = code & CODE_MASK
        table = pointers + POINTERS * t
        p_addresses = (tl.load(table + P_PARAM), tl.load(table + P_COMPENSATION))
        codes = _pointer(tl.load(table + P_MOMENTUM), tl.int8, STATE_ALIGNED)
        scales = tl.load(table + P_SCALES).to(tl.pointer_type(tl.float32))
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay = _hyperparameters(hp, tl.float32)

        g = _load(tl.load(stream + t), (code >> GRAD_SHIFT) & CODE_MASK, offs, mask, DTYPES, STREAM_ALIGNED)
        scale = tl.load(scales + b, mask=valid, other=0.0)
        m = tl.load(codes + offs, mask=mask, other=0).to(tl.float32) * scale[:, None]
        if MODE == STEP:
            p = _load_param(p_addresses, p_code, offs, mask, DTYPES, STATE_ALIGNED, COMPENSATED)
        u = _direction(g, m, beta1, one_minus_beta1)
        m = _momentum(g, m, beta2, one_minus_beta2)

        first = tl.load(row + I_BASE) + start  # the element index of each block's first element in the whole param
        eights = tl.load(row + I_EIGHTS) != 0
        param_id = tl.load(row + I_PARAM_ID).to(tl.uint32)
        if MODE == STEP:
            p = _update(p, u, lr, decay)
            noise_at = (first, eights, param_id, tl.load(row + I_SHARD).to(tl.uint32))
            # fmt: off
            _store_param(
                p_addresses, p_code, offs, mask, p, noise_at, hp, DTYPES, STATE_ALIGNED, STOCHASTIC, COMPENSATED,
                ROWS, BLOCK,
            )
            # fmt: on
        else:
            tl.store(_pointer(tl.load(out + t), tl.int8, STATE_ALIGNED) + offs, _sign_int8(u), mask=mask)

        absmax = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
        has_nan = tl.max(tl.where(mask & (m != m), 1, 0), axis=1)
        absmax = tl.where(has_nan != 0, float("nan"), absmax)
        scale = tl.div_rn(absmax, INT8_MAX_CODE)
        x = tl.div_rn(m, scale[:, None])
        q = _rint(x)
        if STOCHASTIC:  # noqa: SIM102 (a constexpr test: only the stochastic kernel has Philox code)
            if (tl.load(hp + HP_FLAGS) & QUANT_SR) != 0:
                key = _key(hp, HP_QUANT_KEY, HP_QUANT_STEP, QUANT_KEY_STEP)
                shard = tl.load(row + I_QUANT_SHARD).to(tl.uint32)
                noise = _sr_noise(first, eights, key, param_id, shard, ROWS, BLOCK)
                q = _floor(x + noise.to(tl.float32) * (1.0 / 65536))
        finite = (q.to(tl.int32, bitcast=True) & EXPONENT_BITS) != EXPONENT_BITS
        q = tl.where(finite, tl.minimum(tl.maximum(q, -INT8_MAX_CODE), INT8_MAX_CODE), 0.0)
        tl.store(codes + offs, q.to(tl.int8), mask=mask)
        tl.store(scales + b, scale, mask=valid)


# ---------------------------------------------------------------------------------------------- the mode check


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return not isinstance(lion_kernel, JITFunction)


if interpreted() == isinstance(tl.zeros_like, JITFunction):
    raise ImportError(
        f"TRITON_INTERPRET changed between `import triton` and `import lion_dist.backends.triton.kernels` (the kernels "
        f"would be {'interpreted' if interpreted() else 'compiled'}, Triton's library functions not), and Triton "
        "reads it at both: set it, or unset it, in the environment before the process imports triton"
    )
