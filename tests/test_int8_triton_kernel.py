"""The fused Triton kernel with int8 momentum against `spec.lion_reference_int8`, bit for bit.

As in `tests/test_triton_kernel.py`, the cases run in a subprocess per Triton mode (`tests/triton_cases.py`): the
interpreter cases with TRITON_INTERPRET=1 (the kernel on CPU tensors), the checks of the compiled kernel that need
no GPU (it compiles for sm_90 with the ptxas of the triton wheel) without it. This pytest process never sees
interpreter mode. Each `test_int8_interpreter_case[name]` / `test_int8_compiled_case[name]` reports one case.
Tensors stay small: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os

import pytest
import torch

from lion_dist import backends, spec
from lion_dist.backends import Need, StepArgs
from lion_dist.formats.int8 import Int8Momentum
from lion_dist.spec import DeviceKey, LionHyperparams
from tests.conftest import entry
from tests.scripts import benchmark_script
from tests.triton_cases import Cases, report

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PAIRS = [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F32), (F32, BF16), (F16, BF16)]  # (param, grad)
BLOCKS = (32, 64, 128, 256)
WD = LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
PLAIN = LionHyperparams(lr=1e-2, beta1=0.9, beta2=0.99)
MAXIMIZE = LionHyperparams(lr=2e-3, beta1=0.95, beta2=0.98, weight_decay=0.3, maximize=True)
SEED = 1234
# (shape, param id, base, shard): rows that are no multiple of any block, 1-D tensors, a 0-d one; element indices
# from a base that is a multiple of 8 (one Philox call per 8 elements) and from one that is not (one per element)
PLACES = [
    ((3, 100), 0, 0, 0),
    ((130,), 1, 3, 0),
    ((2, 64), 2, 8 * 37, 5),
    ((1,), 3, 0, 0),
    ((5, 33), 4, 7, 2),
    ((), 5, 11, 0),
]


def make(places, pair, block, seed=0, zero_momentum=()):
    """(entries, reference entries): clones of random params and int8 momenta (a quantized random momentum, or
    zero for the indices in `zero_momentum`), with the given places."""
    gen = torch.Generator().manual_seed(seed)
    p_dtype, g_dtype = pair
    entries, expected = [], []
    for k, (shape, pid, base, shard) in enumerate(places):
        p = torch.randn(shape, generator=gen).to(p_dtype)
        m = torch.zeros(shape) if k in zero_momentum else torch.randn(shape, generator=gen) * 0.05
        codes, scales = spec.quantize_momentum(m, block)
        for into in (entries, expected):
            into.append(entry(p.clone(), codes.clone(), g_dtype, pid, base, shard, scales=scales.clone(), block=block))
    return entries, expected


def scales_of(e):
    return e.state[1] if len(e.state) > 1 else None


def grads_for(entries, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(e.param.shape, generator=gen).to(e.grad_dtype) for e in entries]


def reference_step(expected, grads, hp, sr_key=None, quant_key=None) -> None:
    for e, g in zip(expected, grads, strict=True):
        spec.lion_reference_int8(
            e.param,
            g,
            e.exp_avg,
            scales_of(e),
            hp,
            e.format.block,
            noise=e.noise(sr_key),
            momentum_noise=e.momentum_noise(quant_key),
        )


def assert_same(got, expected) -> None:
    """Bit for bit (so -0.0 != 0.0), except that any NaN equals any NaN."""
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
        if a.is_floating_point():
            assert torch.equal(a.isnan(), b.isnan()), (a, b)
            bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
            keep = ~a.isnan()
            a, b = a[keep].view(bits), b[keep].view(bits)
        assert torch.equal(a, b), (a, b, (a != b).nonzero()[:10])


def assert_entries_same(got, expected) -> None:
    for what in (lambda e: e.param, lambda e: e.exp_avg, scales_of):
        assert_same([what(e) for e in got], [what(e) for e in expected])


def step_both(backend, prepared, entries, expected, grads, hp, sr_key=None, quant_key=None, **kwargs) -> None:
    backend.step(prepared, grads, StepArgs(hp, sr_key=sr_key, quant_key=quant_key, **kwargs))
    reference_step(expected, grads, hp, spec.key_value(sr_key), spec.key_value(quant_key))
    assert_entries_same(entries, expected)


# (hp, param stochastic rounding, stochastic requantization) per step: weight decay on and off, maximize,
# nearest and stochastic requantization, bf16 param rounding to nearest and stochastic
SCHEDULE = [(WD, False, False), (WD, True, True), (MAXIMIZE, True, False), (PLAIN, False, True)]


def run_schedule(pair, block, places=PLACES, zero_momentum=(1,)) -> None:
    """Several steps of one int8 bucket against the reference, keys per step `spec.sr_key(seed, 0, step)`."""
    from lion_dist.backends.triton import BACKEND as backend
    from lion_dist.backends.triton import launcher

    entries, expected = make(places, pair, block, seed=block, zero_momentum=zero_momentum)
    prepared = backend.prepare(entries)
    assert [b.kernel for b in prepared.buckets] == ["int8"]  # one int8 bucket, with this block's padded BLOCK
    assert {b.block for b in prepared.buckets} == {launcher.int8_padded_block(block)}
    for step, (hp, sr, quant) in enumerate(SCHEDULE):
        key = spec.sr_key(SEED, 0, step)
        grads = grads_for(entries, seed=100 * block + step)
        step_both(backend, prepared, entries, expected, grads, hp, key if sr else None, key if quant else None)


# ---------------------------------------------------------------------------- cases run in a subprocess per mode

CASES = Cases(__name__, prefix="int8_")
case, compiled_case = CASES.case, CASES.compiled


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


for _pair, _block in itertools.product(PAIRS, BLOCKS):
    case(
        lambda p=_pair, b=_block: run_schedule(p, b),
        name=f"schedule-{_dtype_name(_pair[0])}-{_dtype_name(_pair[1])}-block{_block}",
    )
for _block in (1, 3, 48, 100, 1000, 1024):  # any block up to 1024: padded to a power of two, masked
    case(lambda b=_block: run_schedule((BF16, F32), b), name=f"schedule-bfloat16-float32-block{_block}")


@case
def interpreter_mode_is_on() -> None:
    from lion_dist.backends.triton import kernels

    assert os.environ["TRITON_INTERPRET"] == "1" and kernels.interpreted()


@case
def long_rows_and_many_programs() -> None:
    """Rows of several blocks, a tensor spanning many programs (ROWS blocks each), the last one partly empty."""
    from lion_dist.backends.triton import BACKEND

    places = [((40, 96), 0, 0, 0), ((3000,), 1, 16, 0), ((7, 5), 2, 1, 0)]  # 3840 elements in blocks of 32: 2 x 64
    run_schedule((F32, F32), 32, places, zero_momentum=())
    run_schedule((BF16, F16), 32, places, zero_momentum=())
    prepared = BACKEND.prepare(make(places, (F32, F32), 32)[0])
    assert sum(b.n_programs for b in prepared.buckets) == 2 + 2 + 1  # one bucket


@case
def stochastic_requantization_and_rounding_draw_their_own_noise() -> None:
    """Stochastic requantization differs from nearest and from a different key; bf16 params' stochastic rounding
    differs from nearest; the momentum's stream (shard | MOMENTUM_STREAM) is not the param's, bit for bit."""
    from lion_dist.backends.triton import BACKEND as backend

    results = {}
    for sr, quant in ((None, None), (11, None), (None, 11), (None, 12), (11, 11)):
        entries, expected = make(PLACES[:3], (BF16, F32), 64, seed=1)
        grads = grads_for(entries, seed=2)
        step_both(backend, backend.prepare(entries), entries, expected, grads, WD, sr, quant)
        results[sr, quant] = entries
    nearest = results[None, None]
    for keys, other in results.items():
        if keys[1] is not None:
            assert not torch.equal(nearest[0].exp_avg, other[0].exp_avg), keys
        if keys[0] is not None:
            assert not torch.equal(nearest[0].param, other[0].param), keys
    assert not torch.equal(results[None, 11][0].exp_avg, results[None, 12][0].exp_avg)
    assert torch.equal(results[None, 11][0].exp_avg, results[11, 11][0].exp_avg)  # the param's noise is elsewhere


@case
def nonfinite_values_stay_visible() -> None:
    """NaN and Inf gradients, an Inf param, an all-zero block (scale 0, 0 / 0 codes 0), a NaN scale carried in:
    the reference's codes, NaN scales and params, over two steps with both roundings."""
    from lion_dist.backends.triton import BACKEND as backend

    for pair in ((F32, F32), (BF16, F16)):
        places = [((4, 70), 0, 0, 0), ((200,), 1, 5, 0)]
        entries, expected = make(places, pair, 32, seed=3)
        for e in (entries[0], expected[0]):
            e.exp_avg[2].zero_()  # row 2: zero momentum, and zero gradient below: an all-zero block
            scales_of(e)[3, 1] = float("nan")  # a NaN momentum block from an earlier step
            e.param[1, 3] = float("inf")
        prepared = backend.prepare(entries)
        for step in range(2):
            grads = grads_for(entries, seed=4 + step)
            grads[0][2] = 0
            grads[0][0, [1, 40]] = torch.tensor([float("nan"), float("inf")], dtype=grads[0].dtype)
            grads[1][[0, 150]] = torch.tensor([-float("inf"), float("nan")], dtype=grads[1].dtype)
            step_both(backend, prepared, entries, expected, grads, WD, None if step else 9, 7 if step else None)
        scales = scales_of(entries[0])
        assert scales[0, 0].isnan() and scales[0, 1].isnan() and scales[3, 1].isnan() and (scales[2] == 0).all()
        assert (entries[0].exp_avg[2] == 0).all() and entries[0].param[0, [1, 40]].isnan().all()


@case
def float_and_int8_momenta_in_one_plan() -> None:
    """A route's entries may mix float and int8 momenta: the float ones keep their launch (and their bits), the
    int8 ones get their own launches, one per (dtypes, padded block) and alignment class."""
    from lion_dist.backends.triton import BACKEND as backend
    from lion_dist.backends.triton import kernels

    gen = torch.Generator().manual_seed(5)
    int8_a, ref_a = make(PLACES[:2], (F32, F32), 128, seed=6)
    int8_b, ref_b = make(PLACES[2:4], (BF16, F32), 32, seed=7)
    floats, ref_floats = [], []
    for pid, (n, triple) in enumerate([(300, (F32, F32, F32)), (1030, (BF16, F32, BF16)), (17, (F16, F16, F32))]):
        p, m = torch.randn(n, generator=gen).to(triple[0]), torch.randn(n, generator=gen).to(triple[2])
        floats.append(entry(p.clone(), m.clone(), triple[1], 10 + pid))
        ref_floats.append(entry(p.clone(), m.clone(), triple[1], 10 + pid))
    entries = [floats[0], int8_a[0], floats[1], int8_b[0], int8_a[1], floats[2], int8_b[1]]
    expected = [ref_floats[0], ref_a[0], ref_floats[1], ref_b[0], ref_a[1], ref_floats[2], ref_b[1]]
    prepared = backend.prepare(entries)
    int8_buckets = [b for b in prepared.buckets if b.kernel == "int8"]
    int8_index = sorted(i for b in int8_buckets for i in b.index)
    assert int8_index == [1, 3, 4, 6] and sum(len(b.index) for b in prepared.buckets) == 7  # each entry once
    assert {tuple(sorted({entries[i].format.block for i in b.index})) for b in int8_buckets} == {(128,), (32,)}
    launches = []

    class Count:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel)
            return self.kernel[grid]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "lion_kernel", Count(kernels.lion_kernel))
        patch.setattr(kernels, "lion_int8_kernel", Count(kernels.lion_int8_kernel))
        for step in range(2):
            key = spec.sr_key(SEED, 0, step)
            grads = grads_for(entries, seed=8 + step)
            backend.step(prepared, grads, StepArgs(WD, sr_key=key, quant_key=key))
            assert sorted(i for r in prepared.launched for i in r.entries) == list(range(7))  # each entry once
            for e, g in zip(expected, grads, strict=True):
                if scales_of(e) is None:
                    spec.lion_reference(e.param, g, e.exp_avg, WD, noise=e.noise(key))
                else:
                    reference_step([e], [g], WD, key, key)
            for what in ("param", "exp_avg"):
                assert_same([getattr(e, what) for e in entries], [getattr(e, what) for e in expected])
            assert_same(
                [scales_of(e) for e in entries if scales_of(e) is not None],
                [scales_of(e) for e in expected if scales_of(e) is not None],
            )
    classes = {(r.kernel, r.constexprs["BLOCK"], r.constexprs["STATE_ALIGNED"]) for r in prepared.launched}
    assert len(launches) == 2 * len(prepared.launched) == 2 * len(classes)  # one launch per bucket and class


@case
def device_keys_tensor_lr_and_the_skip_flag() -> None:
    """Capturable steps: DeviceKey sr and quant keys (step counts on the device) and a tensor lr give the
    number-key step's bits; a set skip flag writes nothing."""
    from lion_dist.backends.triton import BACKEND as backend

    entries, expected = make(PLACES, (BF16, F32), 64, seed=9)
    prepared = backend.prepare(entries)
    step_tensor = torch.zeros((), dtype=torch.int64)
    base = spec.sr_key_base(SEED, 0)
    for step in range(3):
        step_tensor.fill_(step)
        lr = torch.tensor(3e-3) if step != 1 else torch.tensor(3e-3, dtype=torch.float64)
        hp = LionHyperparams(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.1)
        grads = grads_for(entries, seed=10 + step)
        # different bases for the two keys: each is computed from its own DeviceKey
        sr_key, quant_key = DeviceKey(base, step_tensor), DeviceKey(base + 99, step_tensor)
        backend.step(prepared, grads, StepArgs(hp, sr_key=sr_key, quant_key=quant_key))
        reference_step(expected, grads, hp, spec.sr_key(SEED, 0, step), spec.sr_key(SEED, 0, step) + 99)
        assert_entries_same(entries, expected)
    before = [(e.param.clone(), e.exp_avg.clone(), scales_of(e).clone()) for e in entries]
    grads = grads_for(entries, seed=20)
    backend.step(prepared, grads, StepArgs(WD, skip=torch.ones(1, dtype=torch.int32), quant_key=5))
    for e, (p, c, s) in zip(entries, before, strict=True):
        assert_same([e.param, e.exp_avg, scales_of(e)], [p, c, s])
    step_both(backend, prepared, entries, expected, grads, WD, None, 5, skip=torch.zeros(1, dtype=torch.int32))


@case
def alignment_and_buckets() -> None:
    """Rows and blocks of multiples of 16 with 16-byte aligned tensors get the aligned kernel; an odd row or a view
    at an odd offset the unaligned one; an unaligned gradient a launch of its own whose codes and param keep their
    vector accesses: one bucket, split per call by alignment class, all equal to the reference."""
    from lion_dist.backends.triton import BACKEND as backend
    from lion_dist.backends.triton import kernels

    entries, expected = make([((4, 64), 0, 0, 0), ((3, 48), 1, 0, 0), ((2, 40), 2, 0, 0)], (F32, F32), 32, seed=11)
    flat_p, flat_c = torch.randn(97), torch.zeros(97, dtype=torch.int8)
    view = entry(flat_p[1:].view(3, 32), flat_c[1:].view(3, 32), F32, 3, scales=torch.zeros(3, 1), block=32)
    entries.append(view)
    expected.append(view._replace(param=view.param.clone(), state=tuple(t.clone() for t in view.state)))
    prepared = backend.prepare(entries)
    assert len(prepared.buckets) == 1 and prepared.buckets[0].state_aligned.tolist() == [True, True, False, False]
    recorded = []
    real = kernels.lion_int8_kernel

    class Record:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                recorded.append((kwargs["STATE_ALIGNED"], kwargs["STREAM_ALIGNED"]))
                real[grid](*args, **kwargs)

            return launch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "lion_int8_kernel", Record())
        step_both(backend, prepared, entries, expected, grads_for(entries, 12), WD, None, 3)
        assert sorted(r.entries for r in prepared.launched) == [(0, 1), (2, 3)]
        grads = grads_for(entries, 13)
        grads[0] = torch.randn(257)[1:].view(4, 64)  # unaligned this step: a launch of its own
        step_both(backend, prepared, entries, expected, grads, WD, None, None)
        assert sorted(r.entries for r in prepared.launched) == [(0,), (1,), (2, 3)]
    assert sorted(recorded) == [(False, False), (False, False), (True, False), (True, True), (True, True)]


@case
def bad_entries_raise_clear_errors() -> None:
    """What the declaration cannot say (the block range, the scales' storage, overlaps) the backend refuses; what it
    says (dtypes) the registry refuses before the backend sees it."""
    from lion_dist.backends.triton import BACKEND as backend

    (e,), _ = make([((2, 40), 0, 0, 0)], (F32, F32), 32)
    codes, scales = e.state
    for block in (0, -3, 1025, 2048):
        with pytest.raises(ValueError, match=rf"int8 momentum block {block} is not supported"):
            backend.prepare([e._replace(format=Int8Momentum(block))])
    with pytest.raises(ValueError, match=r"scales of shape \(2, 2\)"):
        backend.prepare([e._replace(state=(codes, torch.zeros(2, 3)))])
    with pytest.raises(ValueError, match="contiguous fp32"):
        backend.prepare([e._replace(state=(codes, torch.zeros(2, 2, dtype=torch.float64)))])
    with pytest.raises(ValueError, match="scales is not contiguous"):
        backend.prepare([e._replace(state=(codes, torch.zeros(2, 4)[:, ::2]))])
    fp64 = Need("cpu", (torch.float64, torch.float64, torch.float32), format="int8")
    assert backends.refusal("triton", fp64) == "it has no (param, grad, momentum) = (float64/float64/float32) variant"
    with pytest.raises(ValueError, match="the compensation its dtype"):
        backend.prepare([e._replace(compensation=torch.zeros_like(e.param, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="the param of tensor 1 and the param of tensor 0's int8 scales share"):
        backend.prepare([e, entry(scales.view(4), torch.zeros(4), F32)])


@case
def the_optimizer_with_int8_momentum_equals_the_reference_backend() -> None:
    """`Lion(momentum_dtype=torch.int8, backend="triton")` over 4 steps: a mixed route (a small param keeps fp32
    momentum), stochastic requantization and bf16 rounding, equal to backend="reference"."""
    from lion_dist import Lion

    def train(backend: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(64, 80, generator=gen).requires_grad_(), torch.randn(100, generator=gen)]
        params[1] = params[1].requires_grad_()
        params.append(torch.randn(4100, generator=gen).bfloat16().requires_grad_())
        opt = Lion(
            params,
            lr=3e-3,
            weight_decay=0.1,
            momentum_dtype=torch.int8,
            int8_block_size=64,
            stochastic_rounding=True,
            backend=backend,
            batch_size_policy="ignore",
        )
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim()]
        return [p.detach() for p in params] + state

    got, expected = train("triton"), train("reference")
    assert sum(t.dtype == torch.int8 for t in got) == 2
    assert_same(got, expected)


@compiled_case
def int8_runtime_values_are_not_constexprs() -> None:
    from lion_dist.backends.triton import kernels

    params = {p.name: p for p in kernels.lion_int8_kernel.params}
    assert not any(params[name].is_constexpr for name in kernels.RUNTIME_ARGS)
    assert all(params[name].do_not_specialize for name in kernels.RUNTIME_ARGS)
    names = list(inspect.signature(kernels.lion_int8_kernel.fn).parameters)
    assert [n for n in names if params[n].is_constexpr] == [
        "MODE", "DTYPES", "BLOCK", "ROWS", "STATE_ALIGNED", "STREAM_ALIGNED", "STOCHASTIC", "COMPENSATED",
    ]  # fmt: skip


@compiled_case
def the_launcher_reaches_every_int8_specialization_and_they_compile() -> None:
    """Without a GPU: the launcher's int8 calls reach every `int8_specializations()`; a few (the default block,
    both dtype families, step and direction, every alignment class, stochastic and compensated or not) compile for
    sm_90 without spills, with the spec's fma.rn and only correctly rounded divisions (div.rn.f32, no ftz), the
    aligned ones with 128-bit loads (and stores of the fp32 param; a direction stores int8 only, 8 per thread)."""
    from lion_dist.backends.triton import launcher

    module = benchmark_script("triton_compile")
    launches = module.int8_recorded_launches()
    seen = {
        tuple(sorted((k, v) for k, v in kw.items() if k != "num_warps" and k != "enable_fp_fusion"))
        for _, kw in launches
    }
    assert seen == {tuple(sorted(s.items())) for s in launcher.int8_specializations()}
    picked = [
        (args, kw)
        for args, kw in launches
        if kw["BLOCK"] == 128
        and (kw["DTYPES"] == launcher.MIXED or not kw["STOCHASTIC"])
        and (kw["STREAM_ALIGNED"] or (kw["MODE"] == launcher.STEP and kw["STOCHASTIC"] and kw["COMPENSATED"]))
    ]
    assert len(picked) == 10
    for args, kw in picked:
        compiled = module.compile_launch(args, kw, 90, "int8")
        ptx = compiled.asm["ptx"]
        registers, spills = module._resources(compiled.asm["cubin"])
        divisions = set(__import__("re").findall(r"\bdiv\.[\w.]*f32\b", ptx))
        assert spills == 0 and registers <= 255 and divisions == {"div.rn.f32"} and ".ftz" not in ptx, kw
        assert "fma.rn.f32" in ptx
        if kw["STATE_ALIGNED"]:
            assert module._widest(ptx, "ld") == "v4.b32", kw
            assert module._widest(ptx, "st") == ("v4.b32" if kw["MODE"] == launcher.STEP else "v2.b32"), kw


case_results = CASES.fixture()


@pytest.mark.parametrize("name", CASES.params("interpreter"))
def test_int8_interpreter_case(case_results: dict[str, dict[str, str | None]], name: str) -> None:
    report(case_results, "interpreter", name)


@pytest.mark.parametrize("name", CASES.names("compiled"))
def test_int8_compiled_case(case_results: dict[str, dict[str, str | None]], name: str) -> None:
    """The compiled int8 kernel's checks that need no GPU."""
    report(case_results, "compiled", name)
