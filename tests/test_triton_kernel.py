"""The fused Triton kernel against `lion_reference`: on CPU through Triton's interpreter, on CUDA compiled.

The CPU cases run in a subprocess per Triton mode (`tests/triton_cases.py`): the interpreter cases with
TRITON_INTERPRET=1, the checks of the compiled kernel that need no GPU without it; each
`test_interpreter_case[name]` / `test_compiled_case[name]` reports one case's outcome. The `cuda` tests run the
compiled kernel here, on a GPU: `pytest -m cuda tests/test_triton_kernel.py` (with TRITON_INTERPRET unset). The split
step, Kahan compensation, alignment buckets and CUDA-graph capture are in `tests/test_triton_paths.py`, int8 momentum
in `tests/test_int8_triton_kernel.py`.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os

import pytest
import torch

from lion_dist import Lion
from lion_dist.backends import StepArgs
from lion_dist.functional import lion
from lion_dist.spec import LionHyperparams, lion_reference
from tests.conftest import entry
from tests.scripts import benchmark_script
from tests.triton_cases import Cases, report

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMBOS = list(itertools.product(DTYPES, DTYPES, (torch.float32, torch.bfloat16)))  # (param, grad, momentum)
HP = LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
HPS = {
    "plain": LionHyperparams(lr=1e-2, beta1=0.9, beta2=0.99),
    "weight_decay": HP,
    "maximize": LionHyperparams(lr=2e-3, beta1=0.95, beta2=0.98, weight_decay=0.3, maximize=True),
}
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = Cases(__name__)
case, compiled_case = CASES.case, CASES.compiled


def make(sizes, dtypes, device="cpu", seed=0):
    """Random (params, grads, momenta) lists of the given sizes and (param, grad, momentum) dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple([torch.randn(n, generator=gen).to(device, dt) for n in sizes] for dt in dtypes)


def clone(tensors):
    return [t.clone() for t in tensors]


def reference(params, grads, exp_avgs, hp):
    """The reference step applied to copies: (params, momenta)."""
    ps, ms = clone(params), clone(exp_avgs)
    for p, g, m in zip(ps, grads, ms, strict=True):
        lion_reference(p, g, m, hp)
    return ps, ms


def assert_same(got, expected) -> None:
    """Bit for bit (so -0.0 != 0.0), except that any NaN equals any NaN."""
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan())
        bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
        keep = ~a.isnan()
        assert torch.equal(a[keep].view(bits), b[keep].view(bits)), (a, b)


def step_and_compare(params, grads, exp_avgs, hp, **kwargs) -> None:
    """The one-shot `lion(..., backend="triton")` (skip, sr_seed) against the reference, bit for bit."""
    expected_p, expected_m = reference(params, grads, exp_avgs, hp)
    lion(params, grads, exp_avgs, hp, backend="triton", **kwargs)
    assert_same(params, expected_p)
    assert_same(exp_avgs, expected_m)


def entries_of(params, grads, exp_avgs):
    return [entry(p, m, g.dtype, i) for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True))]


class CountLaunches:
    """Stands in for `kernels.lion_kernel` and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# ---------------------------------------------------------------------------- cases run in a subprocess per mode


@case
def interpreter_mode_is_on() -> None:
    import triton

    from lion_dist.backends.triton import kernels

    assert os.environ["TRITON_INTERPRET"] == "1" and kernels.interpreted()
    assert not isinstance(triton.language.zeros_like, triton.runtime.jit.JITFunction)


@case
def mixed_mode_is_refused_at_import() -> None:
    """Triton was imported interpreted; a kernel decorated without the variable could not call its library."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("TRITON_INTERPRET")
        spec = importlib.util.find_spec("lion_dist.backends.triton.kernels")
        with pytest.raises(ImportError, match="TRITON_INTERPRET changed between `import triton`"):
            spec.loader.exec_module(importlib.util.module_from_spec(spec))


def dtype_case(dtypes) -> None:
    """fp32 bit for bit; bf16/fp16 storage equal to the fp32 math rounded once to nearest. Two steps, lr changed."""
    params, grads, exp_avgs = make((1, 127, 1025), dtypes)
    step_and_compare(params, grads, exp_avgs, HP)
    grads = make((1, 127, 1025), dtypes, seed=1)[1]
    step_and_compare(params, grads, exp_avgs, LionHyperparams(lr=7e-4, beta1=0.9, beta2=0.99, weight_decay=0.1))


for _dtypes in COMBOS:
    case(lambda d=_dtypes: dtype_case(d), "dtypes-" + "-".join(str(t).removeprefix("torch.") for t in _dtypes))
for _name, _hp in HPS.items():
    case(lambda hp=_hp: step_and_compare(*make((1, 300, 5000), (torch.float32,) * 3), hp), f"hyperparams-{_name}")


@case
def many_tensors_and_dtypes_in_one_launch() -> None:
    """Full blocks, tails of a multiple of 16 and odd tails, several blocks per tensor, empty tensors skipped;
    tensors of any mix of fp32, bf16 and fp16 share one launch (each tensor's dtypes are a code in the layout),
    all-fp32 tensors another (their kernel has no half-precision branches)."""
    from lion_dist.backends.triton import kernels

    sizes = [1, 0, 127, 1025, 4096, 0, 8192, 4096 + 16, 3 * 4096 + 5, *range(2, 300, 7)]
    triples = [
        (torch.float32,) * 3,
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16, torch.float32),
    ]
    made = [make(sizes, triple, seed=2 + k) for k, triple in enumerate(triples)]
    params, grads, exp_avgs = ([t for m in made for t in m[k]] for k in range(3))
    with pytest.MonkeyPatch.context() as patch:
        counter = CountLaunches(kernels.lion_kernel)
        patch.setattr(kernels, "lion_kernel", counter)
        step_and_compare(params, grads, exp_avgs, HP)
    assert len(counter.grids) == 2


@case
def non_contiguous_inputs_are_updated_in_place() -> None:
    """Transposed and strided tensors go through contiguous copies; the caller's tensors hold the result."""
    base = make((6 * 40,), (torch.float32, torch.float32, torch.bfloat16), seed=3)
    params, exp_avgs = [base[0][0].view(6, 40).t()], [base[2][0].view(6, 40).t()]
    grads = [base[1][0].view(40, 6)[::2].repeat(2, 1).t().contiguous().t()]
    assert not any(t[0].is_contiguous() for t in (params, grads, exp_avgs))
    for _ in range(2):
        step_and_compare(params, grads, exp_avgs, HP)
    assert params[0].data_ptr() == base[0][0].data_ptr() and exp_avgs[0].data_ptr() == base[2][0].data_ptr()


@case
def skip_flag_writes_nothing() -> None:
    """Read on the device by the kernel: through the backend and through the `lion(backend="triton")` dispatch."""
    from lion_dist.backends.triton import BACKEND

    params, grads, exp_avgs = make((5, 4097), (torch.bfloat16, torch.float32, torch.float32), seed=4)
    before = clone(params), clone(exp_avgs)
    prepared = BACKEND.prepare(entries_of(params, grads, exp_avgs))
    BACKEND.step(prepared, grads, StepArgs(HP, skip=torch.ones(1, dtype=torch.int32), sr_key=3))
    lion(params, grads, exp_avgs, HP, backend="triton", skip=torch.full((1,), 7, dtype=torch.int32))
    assert_same(params, before[0])
    assert_same(exp_avgs, before[1])
    step_and_compare(params, grads, exp_avgs, HP, skip=torch.zeros(1, dtype=torch.int32))


@case
def nonfinite_values_propagate_like_the_reference() -> None:
    params, grads, exp_avgs = make((64,), (torch.float32, torch.float32, torch.bfloat16), seed=5)
    grads[0][[3, 9, 20]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    params[0][[30, 31]] = torch.tensor([float("inf"), -0.0])
    grads[0][31], exp_avgs[0][31] = 0.0, 0.0  # c == 0, u == +0: p == -0.0 keeps its sign, as in the reference
    step_and_compare(params, grads, exp_avgs, HP)
    assert params[0][[3, 9, 20]].isnan().all()


@case
def fused_multiply_add_decides_the_sign_when_terms_cancel() -> None:
    """Where fl(m * b1) == -fl(g * (1 - b1)), only an fma's single rounding leaves c != 0, so p moves."""
    hp = HPS["plain"]
    g = torch.randn(4096, generator=torch.Generator().manual_seed(9))
    b1, one_minus_b1 = torch.tensor(hp.beta1), torch.tensor(1 - hp.beta1)
    target = -(g * one_minus_b1)
    m = target / b1
    for _ in range(4):  # nudge m by one ulp towards m * b1 == target
        m = torch.where(m * b1 < target, m.nextafter(m + 1), torch.where(m * b1 > target, m.nextafter(m - 1), m))
    keep = m * b1 == target
    params, grads, exp_avgs = [torch.randn(int(keep.sum()))], [g[keep]], [m[keep]]
    before = params[0].clone()
    step_and_compare(params, grads, exp_avgs, hp)
    assert params[0].numel() > 3000 and (params[0] != before).float().mean() > 0.99


@case
def stochastic_rounding_is_unbiased_and_reproducible() -> None:
    """Each output is the fp32 result cut to bf16 or one ulp above, the mean is the fp32 result, a seed
    reproduces its draw; fp16 and fp32 params and bf16 momentum still round to nearest."""
    n, ulp = 4096, 2.0**-7  # bf16 spacing in [1, 2)
    hp = LionHyperparams(lr=0.3 * ulp, beta1=0.9, beta2=0.99)
    exact = 1.0 + torch.tensor(0.3 * ulp, dtype=torch.float32)  # the fp32 result, 30% of the way up
    draws = []
    for seed in range(4):  # two equal tensors per launch: their draws must differ too
        p = [torch.ones(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)]
        lion(
            p,
            [-torch.ones(n)] * 2,
            [torch.zeros(n, dtype=torch.bfloat16) for _ in p],
            hp,
            backend="triton",
            sr_seed=seed,
        )
        draws += [p[0].float(), p[1].float()]
    draws = torch.stack(draws)
    assert set(draws.unique().tolist()) == {1.0, 1.0 + ulp}
    assert abs(draws.mean().item() - exact.item()) < 0.02 * ulp  # 8 sigma; round to nearest is 0.3 ulp off
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])

    params, grads, exp_avgs = make((3, 1030), (torch.bfloat16, torch.float32, torch.bfloat16), seed=6)
    nearest, _ = reference(params, grads, exp_avgs, hp)
    exact_p, _ = reference([p.float() for p in params], grads, [m.float() for m in exp_avgs], hp)
    runs = []
    for _ in range(2):
        ps, ms = clone(params), clone(exp_avgs)
        lion(ps, grads, ms, hp, backend="triton", sr_seed=12345678901234)
        runs.append(ps)
    assert_same(runs[0], runs[1])
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], nearest, strict=True))
    for got, x in zip(runs[0], exact_p, strict=True):
        cut = x.view(torch.int32) & -65536
        assert torch.isin(got.float().view(torch.int32) - cut, torch.tensor([0, 65536], dtype=torch.int32)).all()

    step_and_compare(*make((129,), (torch.float16, torch.float32, torch.bfloat16), seed=7), hp, sr_seed=5)
    step_and_compare(*make((129,), (torch.float32, torch.bfloat16, torch.float32), seed=8), hp, sr_seed=5)


@case
def bad_inputs_raise_clear_errors() -> None:
    """The one-shot form refuses what the backend's declaration refuses (through the registry) and what no kernel
    may read (through `functional._check`); the backend itself refuses what its declaration cannot say."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    from lion_dist.backends.triton import BACKEND

    params, grads, exp_avgs = make((8,), (torch.float32,) * 3)
    with pytest.raises(ValueError, match=r"no \(param, grad, momentum\) = \(float32/float64/float32\) variant"):
        lion(params, [grads[0].double()], exp_avgs, HP, backend="triton")
    cautious = LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, cautious_factor=0.0)
    with pytest.raises(ValueError, match=r"cautious Lion needs a per-tensor pass.*Use backend='auto'"):
        lion(params, grads, exp_avgs, cautious, backend="triton")
    with pytest.raises(ValueError, match=r"tensor 0 has param shape \(8,\), grad \(7,\)"):
        lion(params, [torch.zeros(7)], exp_avgs, HP, backend="triton")
    with pytest.raises(ValueError, match="1-element int32"):
        lion(params, grads, exp_avgs, HP, backend="triton", skip=torch.zeros(1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"interpreter.*takes CPU tensors, got meta"):
        lion(*([torch.empty(8, device="meta")] for _ in range(3)), HP, backend="triton")
    with pytest.raises(ValueError, match=r"tensor 1: its param is on meta, tensor 0's param on cpu: one device"):
        BACKEND.prepare(entries_of([params[0], torch.empty(8, device="meta")], grads * 2, [exp_avgs[0]] * 2))
    with pytest.raises(ValueError, match="tensor 0: its momentum is not contiguous"):
        BACKEND.prepare([entry(params[0], torch.zeros(16)[::2], torch.float32)])
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        dtensor = distribute_tensor(params[0], DeviceMesh("cpu", [0]), [Shard(0)])
        with pytest.raises(TypeError, match=r"the param of tensor 0 is a DTensor, whose data_ptr\(\) is 0"):
            lion([dtensor], grads, exp_avgs, HP, backend="triton")
        with pytest.raises(ValueError, match=r"data_ptr\(\) is 0: a DTensor\?\): pass its local shard"):
            BACKEND.prepare([entry(dtensor, exp_avgs[0], torch.float32)])
    finally:
        dist.destroy_process_group()


@case
def optimizer_end_to_end_matches_reference() -> None:
    """`Lion(backend="triton")` equals `Lion(backend="reference")` over 10 steps: groups, dtypes, lr schedule."""

    def train(backend: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(s, generator=gen) for s in ((33, 7), (129,), (1,), (4, 5, 6), (40, 30))]
        params = [w.clone().requires_grad_() for w in weights[:3]]
        params += [weights[3].bfloat16().requires_grad_(), weights[4].t().requires_grad_()]
        opt = Lion(
            [
                {"params": params[:2], "weight_decay": 0.5},
                {"params": params[2:3], "maximize": True, "betas": (0.95, 0.98)},
                {"params": params[3:], "momentum_dtype": torch.bfloat16, "decoupled_weight_decay": True},
            ],
            lr=3e-3,
            weight_decay=1e-3,
            backend=backend,
            batch_size_policy="ignore",
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
            schedule.step()
        return params + [opt.state[p]["exp_avg"] for p in params]

    assert_same(train("triton"), train("reference"))


@case
def contract_holds_for_the_triton_backend() -> None:
    """tests/test_contract.py's generic checks with backend="triton", in the interpreter."""
    from tests import test_contract as contract

    contract.check_errors("triton")
    for desc, optim_input in contract.INPUTS.items():
        kwargs = optim_input.kwargs
        if not contract.takes("triton", kwargs):
            continue
        contract.check_goes_right_direction(kwargs, "triton", with_scheduler=desc == "default")
        contract.check_state_dict_round_trip(kwargs, "triton", deepcopied=True)
        results = []
        for backend in ("triton", "reference"):
            params, x = contract.problem(dtype=torch.bfloat16)
            contract.run(contract.make(contract.fresh(kwargs), backend, params), params, x, steps=3)
            results.append(params)
        assert contract.same(*results), desc
    default = contract.INPUTS["default"].kwargs
    contract.check_param_groups(default, "triton")
    contract.check_zero_and_missing_grads(contract.INPUTS["weight decay"].kwargs, "triton")
    contract.check_closure(default, "triton")
    contract.check_complex(contract.INPUTS["maximize"].kwargs, "triton", (3, 4))


class RecordLaunches:
    """Stands in for a kernel: records each launch's grid, arguments and keywords, and runs nothing."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


SR_KEY = 0x2545F4914F6CDD1D >> 2  # any 62-bit key


@case
def stochastic_rounding_equals_the_reference_bit_for_bit() -> None:
    """The kernel draws the spec's Philox noise: per (param id, element index, shard), whatever else is in the
    launch; one Philox call per 8 elements where a tensor's first element index is a multiple of 8 (base 0 and
    296 here), one per element otherwise (base 3), the same bits either way."""
    from lion_dist.backends.triton import BACKEND
    from lion_dist.spec import DeviceKey, NoiseStream

    hp = LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    places = [(0, 0, 0), (1, 8 * 37, 0), (2, 3, 5), (3, 0, 0)]  # (param id, base, shard)
    params, grads, exp_avgs = make((5000, 130, 4096 + 3, 17), (torch.bfloat16, torch.float32, torch.bfloat16), seed=10)
    grads[3] = grads[3].bfloat16()  # same-valued params with an fp32 and a bf16 gradient still draw their own noise
    for key in (SR_KEY, DeviceKey(SR_KEY - 7, torch.tensor(7))):  # a step count on the device: the same key
        ps, ms = clone(params), clone(exp_avgs)
        expected_p, expected_m = clone(params), clone(exp_avgs)
        for p, g, m, (pid, base, shard) in zip(expected_p, grads, expected_m, places, strict=True):
            lion_reference(p, g, m, hp, noise=NoiseStream(SR_KEY, pid, base, shard))
        entries = [entry(p, m, g.dtype, *place) for p, g, m, place in zip(ps, grads, ms, places, strict=True)]
        BACKEND.step(BACKEND.prepare(entries), grads, StepArgs(hp, sr_key=key))
        assert_same(ps, expected_p)
        assert_same(ms, expected_m)
        nearest = reference(params, grads, exp_avgs, hp)[0]
        assert not all(torch.equal(a, b) for a, b in zip(ps, nearest, strict=True))


@case
def the_optimizer_with_stochastic_rounding_equals_the_reference_backend() -> None:
    """Through `Lion` (backend "auto" takes the Triton kernel in the interpreter): a param's rounding does not
    depend on which other params have gradients, or on how the launch is bucketed."""

    def train(backend: str, with_b: bool) -> tuple[list[torch.Tensor], Lion]:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(300, generator=gen).bfloat16().requires_grad_()
        b = a.detach().clone().requires_grad_()  # the same values as a
        opt = Lion([a, b], lr=1e-3, stochastic_rounding=True, seed=3, backend=backend, batch_size_policy="ignore")
        for _ in range(3):
            g = torch.randn(300, generator=gen)
            a.grad_dtype = b.grad_dtype = None
            a.grad, b.grad = g, (g.bfloat16() if with_b else None)
            opt.step()
        return [a.detach(), b.detach()], opt

    (a, b), opt = train("auto", True)
    assert route_names_of(opt) == ["triton"]
    assert_same([a, b], train("reference", True)[0])
    assert_same([a], train("auto", False)[0][:1])  # a's noise is a's, with or without b in the step
    assert not torch.equal(a, b)  # equal values, different params: different noise


def route_names_of(opt: Lion) -> list[str]:
    plans = opt._plans._plans.get(0)
    return [] if not plans else sorted(r.backend.name for r in list(plans.values())[-1].routes)


@case
def alignment_is_decided_per_tensor() -> None:
    """A view at an odd offset gets a launch of its own without 128-bit accesses; the aligned tensors keep theirs.
    An unaligned gradient moves only its own tensor to a launch whose param and momentum keep theirs."""
    from lion_dist.backends.triton import BACKEND, kernels

    params, grads, exp_avgs = make((64, 4096, 1000), (torch.float32,) * 3, seed=11)
    flat = torch.randn(1001)
    params[2], exp_avgs[2] = flat[1:], torch.zeros(1001)[1:]  # 4-byte, not 16-byte, aligned
    expected = reference(params, grads, exp_avgs, HP)
    prepared = BACKEND.prepare(entries_of(params, grads, exp_avgs))
    assert len(prepared.buckets) == 1 and prepared.buckets[0].state_aligned.tolist() == [True, True, False]
    with pytest.MonkeyPatch.context() as patch:
        counter = CountLaunches(kernels.lion_kernel)
        patch.setattr(kernels, "lion_kernel", counter)
        BACKEND.step(prepared, grads, StepArgs(HP))
    assert len(counter.grids) == 2
    assert sorted(
        (r.constexprs["STATE_ALIGNED"], r.constexprs["STREAM_ALIGNED"], r.entries) for r in prepared.launched
    ) == [
        (False, False, (2,)),
        (True, True, (0, 1)),
    ]
    assert_same(params + exp_avgs, expected[0] + expected[1])
    grads[1] = torch.randn(4097)[1:]  # an unaligned gradient this step: its tensor runs with scalar gradient reads
    recorder = RecordLaunches()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "lion_kernel", recorder)
        BACKEND.step(prepared, grads, StepArgs(HP))
    aligned = sorted((kwargs["STATE_ALIGNED"], kwargs["STREAM_ALIGNED"]) for _, _, kwargs in recorder.launches)
    assert aligned == [(False, False), (True, False), (True, True)]
    assert sorted(r.entries for r in prepared.launched) == [(0,), (1,), (2,)]


@case
def shared_memory_is_refused() -> None:
    flat = torch.zeros(100)
    with pytest.raises(ValueError, match="the param of tensor 0 and the param of tensor 1 share memory"):
        lion(
            [flat[:60], flat[50:]],
            [torch.ones(60), torch.ones(50)],
            [torch.zeros(60), torch.zeros(50)],
            HP,
            backend="triton",
        )
    with pytest.raises(ValueError, match="share memory"):
        lion([flat, torch.zeros(100)], [torch.ones(100)] * 2, [torch.zeros(100), flat], HP, backend="triton")


@case
def every_runtime_argument_is_a_tensor_whatever_the_python_types() -> None:
    """An int beta, an int lr, a tensor lr, maximize or a seed change no argument and no constexpr: every launch
    passes tensors (the tables, the hp table, the skip flag) and constexprs, so the launcher can only ever compile
    `specializations()`, and the hp table holds each value as the kernel reads it."""
    import struct

    from lion_dist.backends.triton import BACKEND, kernels, launcher
    from lion_dist.spec import DeviceKey

    params, grads, exp_avgs = make((300,), (torch.bfloat16, torch.float32, torch.float32), seed=12)
    prepared = BACKEND.prepare(entries_of(params, grads, exp_avgs))
    recorder = RecordLaunches()
    hps = [
        LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99),
        LionHyperparams(lr=1, beta1=0, beta2=0.99, weight_decay=1),  # Python ints
        LionHyperparams(lr=torch.tensor(1e-3), beta1=0.5, beta2=0.5, maximize=True),
        LionHyperparams(lr=torch.tensor(1e-3, dtype=torch.float64), beta1=0.9, beta2=0.99),
    ]
    tables = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "lion_kernel", recorder)
        for hp in hps:
            for key in (None, 5, DeviceKey(5, torch.tensor(1))):
                BACKEND.step(prepared, grads, StepArgs(hp, sr_key=key))
                tables.append(prepared.hp.values.tensor.clone())
    names = list(inspect.signature(kernels.lion_kernel.fn).parameters)
    for _, args, _ in recorder.launches:
        assert len(args) == len(kernels.RUNTIME_ARGS) == names.index("MODE")
        assert all(isinstance(a, torch.Tensor) for a in args)
    constexprs = {tuple(sorted(kw.items())) for _, _, kw in recorder.launches}
    assert len(constexprs) == 2  # rounding to nearest, and stochastic
    every = {
        tuple(sorted({**s, "num_warps": 2, "enable_fp_fusion": False}.items())) for s in launcher.specializations()
    }
    assert constexprs <= every

    def f64(table, slot):
        return struct.unpack("<d", struct.pack("<q", int(table[slot.value])))[0]

    int_hp = tables[3]  # lr 1, betas (0, 0.99), weight decay 1, no key
    assert (f64(int_hp, kernels.HP_LR), f64(int_hp, kernels.HP_BETA1), f64(int_hp, kernels.HP_WEIGHT_DECAY)) == (
        1,
        0,
        1,
    )
    assert f64(tables[6], kernels.HP_ONE_MINUS_BETA1) == -0.5  # maximize: the sign of 1 - b1 and 1 - b2
    assert f64(tables[6], kernels.HP_LR) == float(torch.tensor(1e-3))  # the fp32 tensor's value, copied on the device
    assert (
        int(tables[4][kernels.HP_SR_KEY.value]) == 5
        and int(tables[4][kernels.HP_FLAGS.value]) == kernels.PARAM_SR.value
    )
    device_key = tables[5]
    assert int(device_key[kernels.HP_SR_STEP.value]) == 1
    assert int(device_key[kernels.HP_FLAGS.value]) == kernels.PARAM_SR.value | kernels.SR_KEY_STEP.value


@case
def a_tensor_lr_is_read_on_the_device() -> None:
    from lion_dist.backends.triton import BACKEND

    results = []
    for lr in (3e-3, torch.tensor(3e-3), torch.tensor(3e-3, dtype=torch.float64)):
        params, grads, exp_avgs = make((1000, 33), (torch.float32,) * 3, seed=13)
        hp = LionHyperparams(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.1)
        BACKEND.step(BACKEND.prepare(entries_of(params, grads, exp_avgs)), grads, StepArgs(hp))
        results.append(params)
    expected = reference(
        *make((1000, 33), (torch.float32,) * 3, seed=13),
        LionHyperparams(lr=float(torch.tensor(3e-3)), beta1=0.9, beta2=0.99, weight_decay=0.1),
    )[0]
    assert_same(results[1], expected)  # the fp32 tensor's value, exactly
    assert_same(
        results[0],
        reference(
            *make((1000, 33), (torch.float32,) * 3, seed=13),
            LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1),
        )[0],
    )
    assert_same(results[2], results[0])


@case
def capturable_steps_count_on_the_device_and_upload_nothing_twice() -> None:
    """capturable=True: the step count is a device tensor, the key is computed from it in the kernel, the result
    equals the ordinary step bit for bit, and persistent gradients are uploaded once (a replayed graph relies on
    the device table): the host writes the gradient table and the hp table at the first step only."""
    import ctypes

    def train(capturable: bool) -> tuple[list[torch.Tensor], Lion]:
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in (300, 4096)]
        grads = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # persistent gradients, refilled in place (zero_grad(set_to_none=False))
        opt = Lion(
            params, lr=torch.tensor(1e-3), stochastic_rounding=True, capturable=capturable, batch_size_policy="ignore"
        )
        for _ in range(4):
            for g in grads:
                g.copy_(torch.randn(g.shape, generator=gen))
            opt.step()
        return params, opt

    copies = []
    with pytest.MonkeyPatch.context() as patch:
        memmove = ctypes.memmove
        patch.setattr(ctypes, "memmove", lambda *a: copies.append(a) or memmove(*a))
        captured, opt = train(True)
    assert isinstance(opt.param_groups[0]["step"], torch.Tensor) and int(opt.param_groups[0]["step"]) == 4
    assert len(copies) == 2  # one bucket's gradient table and the hp table (a constant lr), at the first step only
    ordinary, plain_opt = train(False)
    assert plain_opt.param_groups[0]["step"] == 4
    assert_same(captured, ordinary)
    with pytest.raises(ValueError, match="capturable=True needs a step without host reads"):
        cautious = Lion([torch.zeros(3, requires_grad=True)], capturable=True, cautious_factor=0.5)
        cautious.param_groups[0]["params"][0].grad = torch.ones(3)
        cautious.step()


@compiled_case
def cpu_tensors_without_the_interpreter_get_a_clear_error() -> None:
    from lion_dist.backends.triton import kernels

    assert "TRITON_INTERPRET" not in os.environ and not kernels.interpreted()
    params, grads, exp_avgs = make((8,), (torch.float32,) * 3)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*backend='foreach'.*TRITON_INTERPRET=1"):
        lion(params, grads, exp_avgs, HP, backend="triton")


@compiled_case
def runtime_values_are_not_constexprs() -> None:
    """An lr schedule or a new seed each step must not recompile: the kernels take only tensors at run time (the
    hyperparameters in the hp table), none specialized on its address's alignment."""
    from lion_dist.backends.triton import kernels

    for kernel in (kernels.lion_kernel, kernels.lion_int8_kernel):
        params = {p.name: p for p in kernel.params}
        runtime = [p.name for p in kernel.params if not p.is_constexpr]
        assert runtime == list(kernels.RUNTIME_ARGS) and "skip" in runtime and "hp" in runtime
        assert all(params[name].do_not_specialize for name in runtime)


@compiled_case
def every_specialization_compiles_for_sm80_and_sm90() -> None:
    """Without a GPU: the real launcher's calls (step, direction, apply), bound as Triton's JIT binds them on a GPU,
    compile to cubins for sm_80 and sm_90; every kernel the launcher can produce is among them, none spills, the
    aligned ones use 128-bit global loads and stores (those of the state even where the gradient is not aligned),
    and the math is the explicit fma.rn of the spec."""
    from lion_dist.backends.triton import launcher

    results = benchmark_script("triton_compile").compile_all((80, 90))
    seen = {(r.capability, tuple(sorted(r.constexprs.items()))) for r in results}
    every = {(cc, tuple(sorted(s.items()))) for cc in (80, 90) for s in launcher.specializations()}
    assert seen == every and len(results) == 2 * 78
    for r in results:
        assert r.cubin_bytes > 0 and r.spill_bytes == 0 and r.explicit_fma and r.exact_division, r
        if r.constexprs["STATE_ALIGNED"]:
            assert r.widest_load in ("v4.b32", "v2.b64") and r.widest_store in ("v4.b32", "v2.b64"), r


case_results = CASES.fixture()


@pytest.mark.parametrize("name", CASES.params("interpreter"))
def test_interpreter_case(case_results: dict[str, dict[str, str | None]], name: str) -> None:
    report(case_results, "interpreter", name)


@pytest.mark.parametrize("name", CASES.names("compiled"))
def test_compiled_case(case_results: dict[str, dict[str, str | None]], name: str) -> None:
    """The compiled kernel's checks that need no GPU."""
    report(case_results, "compiled", name)


# ---------------------------------------------------------------------------- compiled kernel on CUDA


@cuda
@needs_cuda
@pytest.mark.parametrize("name", list(HPS))
def test_cuda_every_dtype_combination_matches_reference(name: str) -> None:
    sizes = (1, 127, 1025, 4096, 4096 + 16, 3 * 4096 + 5, 1 << 20)
    for dtypes in COMBOS:
        step_and_compare(*make(sizes, dtypes, device="cuda"), HPS[name])


@cuda
@needs_cuda
def test_cuda_unaligned_and_strided_views() -> None:
    """Views at odd offsets take the unaligned (scalar access) variant; strided ones go through copies."""
    params, grads, exp_avgs = make((10_001,), (torch.float32, torch.bfloat16, torch.float32), device="cuda")
    for view in (slice(1, None), slice(3, 3000, 2)):
        step_and_compare([params[0][view]], [grads[0][view]], [exp_avgs[0][view]], HP)


@cuda
@needs_cuda
def test_cuda_no_recompilation_no_sync_and_skip() -> None:
    """A new lr, weight decay and seed every step compile nothing new and never sync (the hp table's upload is
    a pinned non-blocking copy); the flag skips on device."""
    from lion_dist.backends.triton import BACKEND, kernels

    params, grads, exp_avgs = make((1000, 5000), (torch.bfloat16, torch.float32, torch.float32), device="cuda")
    prepared = BACKEND.prepare(entries_of(params, grads, exp_avgs))
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    BACKEND.step(prepared, grads, StepArgs(HP, skip=flag, sr_key=0))
    cache = kernels.lion_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(cache)
    for step in range(1, 6):
        hp = LionHyperparams(lr=1e-3 / step, beta1=0.9, beta2=0.99, weight_decay=0.1 * step)
        torch.cuda.set_sync_debug_mode("error")
        try:
            BACKEND.step(prepared, grads, StepArgs(hp, skip=flag, sr_key=step * 1_000_003 + (1 << 40)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(cache) == compiled
    before = clone(params), clone(exp_avgs)
    flag.fill_(1)
    lion(params, grads, exp_avgs, HP, backend="triton", skip=flag, sr_seed=9)
    assert_same(params, before[0])
    assert_same(exp_avgs, before[1])


@cuda
@needs_cuda
def test_cuda_stochastic_rounding_unbiased_and_reproducible() -> None:
    n, ulp = 1 << 20, 2.0**-7
    hp = LionHyperparams(lr=0.3 * ulp, beta1=0.9, beta2=0.99)
    draws = []
    for seed in (11, 11, 12):
        p, g = [torch.ones(n, dtype=torch.bfloat16, device="cuda")], [-torch.ones(n, device="cuda")]
        lion(p, g, [torch.zeros(n, device="cuda")], hp, backend="triton", sr_seed=seed)
        draws.append(p[0].float())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    exact = 1.0 + torch.tensor(0.3 * ulp, dtype=torch.float32)
    assert abs(draws[0].mean().item() - exact.item()) < 0.01 * ulp


@cuda
@needs_cuda
def test_cuda_optimizer_auto_uses_triton_and_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from lion_dist.backends.triton import kernels

    counter = CountLaunches(kernels.lion_kernel)
    monkeypatch.setattr(kernels, "lion_kernel", counter)

    def train(backend: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in ((300, 70), (129,), (1,))]
        opt = Lion(params, lr=3e-3, weight_decay=0.1, backend=backend, batch_size_policy="ignore")
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        return params + [opt.state[p]["exp_avg"] for p in params]

    assert_same(train("auto"), train("reference"))
    assert len(counter.grids) == 10
