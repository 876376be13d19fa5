"""The Triton backend's split step, Kahan compensation, alignment buckets and CUDA-graph capture, in the interpreter.

Bit for bit against the reference backend (compensation) and the foreach backend's `direction` / `apply` (the
split step), through the backend and through `Lion`. The capture cases pretend a capture is on
(`torch.cuda.is_current_stream_capturing`) and check what the launcher does then: no host upload, the device-side
copies that a replay would re-execute, and a clear error where a replay would differ. The harness is
`tests/triton_cases.py`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from lion_dist import Lion, spec
from lion_dist.backends import StepArgs, foreach
from lion_dist.exchange import DirectionExchange
from lion_dist.spec import DeviceKey, LionHyperparams
from tests.conftest import assert_same, entry
from tests.triton_cases import Cases, report

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
WD = LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
MAXIMIZE = LionHyperparams(lr=2e-3, beta1=0.95, beta2=0.98, weight_decay=0.3, maximize=True)
TINY = LionHyperparams(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.01)  # updates bf16 would round away
CASES = Cases(__name__, prefix="paths_")
case = CASES.case


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def float_entries(specs, seed=0, compensated=False, base=8):
    """(entries, reference copies): specs of (shape, param dtype, grad dtype, momentum dtype), entry i at element
    `base * i` of param id i; with `compensated`, a small random Kahan buffer for bf16/fp16 params."""
    entries, copies = [], []
    for i, (shape, p_dtype, g_dtype, m_dtype) in enumerate(specs):
        p, m = randn(shape, p_dtype, seed + 2 * i), randn(shape, m_dtype, seed + 2 * i + 1) * 0.1
        c = None
        if compensated and p_dtype in (BF16, F16):
            c = (randn(shape, F32, seed + 100 + i) * 1e-3).to(p_dtype)
        for into in (entries, copies):
            c_copy = None if c is None else c.clone()
            into.append(entry(p.clone(), m.clone(), g_dtype, i, base * i, 0, compensation=c_copy))
    return entries, copies


def int8_entries(specs, seed=0, compensated=False, rounding="stochastic", block=32):
    """(entries, reference copies) with int8 momentum: specs of (shape, param dtype, grad dtype)."""
    entries, copies = [], []
    for i, (shape, p_dtype, g_dtype) in enumerate(specs):
        p = randn(shape, p_dtype, seed + 2 * i)
        codes, scales = spec.quantize_momentum(randn(shape, F32, seed + 2 * i + 1) * 0.05, block)
        c = (randn(shape, F32, seed + 50 + i) * 1e-3).to(p_dtype) if compensated and p_dtype != F32 else None
        for into in (entries, copies):
            into.append(
                entry(
                    p.clone(), codes.clone(), g_dtype, i, 3 * i, 0, scales=scales.clone(), block=block,
                    rounding=rounding, compensation=None if c is None else c.clone(),
                )
            )  # fmt: skip
    return entries, copies


def grads_for(entries, seed):
    return [randn(e.param.shape, e.grad_dtype, seed + i) for i, e in enumerate(entries)]


def tensors(entries):
    """Every tensor an entry holds, in a fixed order (None for a missing compensation)."""
    return [t for e in entries for t in (e.param, *e.state, e.compensation)]


def reference_step(entries, grads, hp, sr_key=None, quant_key=None):
    for e, g in zip(entries, grads, strict=True):
        noise = e.noise(sr_key)
        if e.format.kind == "int8":
            spec.lion_reference_int8(
                e.param, g, *e.state, hp, e.format.block, noise=noise, momentum_noise=e.momentum_noise(quant_key),
                compensation=e.compensation,
            )  # fmt: skip
        else:
            spec.lion_reference(e.param, g, e.exp_avg, hp, noise=noise, compensation=e.compensation)


# ---------------------------------------------------------------------------------------------- compensation


@case
def compensation_is_fused_bit_for_bit() -> None:
    """bf16 and fp16 params with a Kahan buffer, float momenta of every dtype and int8 momenta (nearest and
    stochastic requantization), full blocks and tails, weight decay and maximize: equal to the reference's
    `compensation=` path over several steps; small updates accumulate in the buffer instead of rounding away."""
    from lion_dist.backends.triton import BACKEND

    specs = [
        ((5, 300), BF16, F32, F32),
        ((1030,), BF16, BF16, BF16),
        ((17,), F16, F32, F32),
        ((2100,), F16, F16, F16),
        ((64,), F32, F32, F32),  # no buffer for fp32: the same launch family, compensated or not
    ]
    entries, copies = float_entries(specs, seed=1, compensated=True)
    int8, int8_copies = int8_entries([((4, 96), BF16, F32), ((3, 40), F16, BF16), ((64,), F32, F32)], 7, True)
    entries, copies = entries + int8, copies + int8_copies
    prepared = BACKEND.prepare(entries)
    assert {(b.kernel, b.compensated) for b in prepared.buckets} == {
        ("lion", True), ("lion", False), ("int8", True), ("int8", False),
    }  # fmt: skip
    before = [e.param.clone() for e in entries]
    for step, hp in enumerate((TINY, WD, MAXIMIZE, TINY)):
        grads = grads_for(entries, 10 * step)
        key = spec.sr_key(5, 0, step)
        BACKEND.step(prepared, grads, StepArgs(hp, quant_key=key))
        reference_step(copies, grads, hp, quant_key=key)
        assert_same(tensors(entries), tensors(copies))
    assert all(not torch.equal(e.param, b) for e, b in zip(entries, before, strict=True))
    assert all(e.compensation.abs().sum() > 0 for e in entries if e.compensation is not None)


@case
def the_optimizer_with_compensation_equals_the_reference_backend() -> None:
    """`Lion(compensation=True, backend="triton")` with float and int8 momenta equals backend="reference": the
    Triton route now takes compensated params (before, auto sent them to foreach)."""

    def train(backend: str, momentum_dtype) -> tuple[list[torch.Tensor], Lion]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in ((64, 80), (300,))]
        params.append(torch.randn(70, generator=gen).half().requires_grad_())
        opt = Lion(
            params, lr=1e-4, weight_decay=0.1, compensation=True, momentum_dtype=momentum_dtype, backend=backend,
            batch_size_policy="ignore",
        )  # fmt: skip
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim()]
        return [p.detach() for p in params] + state, opt

    for momentum_dtype in (None, "int8"):
        got, opt = train("auto", momentum_dtype)
        plans = opt._plans._plans[0]
        assert [r.backend.name for r in list(plans.values())[-1].routes] == ["triton"]
        assert_same(got, train("reference", momentum_dtype)[0])


# ---------------------------------------------------------------------------------------------- the split step


def split_against_foreach(entries, copies, hp, sr_key=None, quant_key=None, steps=2) -> None:
    """`direction` then `apply` on the Triton backend and on foreach, bit for bit: the signs (int8: 0 where foreach
    has 0 or NaN), every momentum, then the params (and buffers) from the same agreed directions."""
    from lion_dist.backends.triton import BACKEND

    prepared, reference = BACKEND.prepare(entries), foreach.BACKEND.prepare(copies)
    for step in range(steps):
        grads = grads_for(entries, 20 * step + 3)
        grads[0].view(-1)[:3] = torch.tensor([float("nan"), 0.0, float("inf")]).to(grads[0].dtype)
        args = StepArgs(hp, sr_key=sr_key, quant_key=quant_key)
        signs = [d.clone() for d in BACKEND.direction(prepared, grads, args)]
        expected = foreach.BACKEND.direction(reference, grads, args)
        for got, u in zip(signs, expected, strict=True):
            assert got.dtype == torch.int8 and got.shape == u.shape
            assert torch.equal(got > 0, u > 0) and torch.equal(got < 0, u < 0)
        assert bool(expected[0].view(-1)[0].isnan()) and int(signs[0].view(-1)[0]) == 0
        assert_same(tensors(entries), tensors(copies))
        # agreed directions as the vote makes them, fp32 (-1, 0, 1, or a mean such as 1/3) cast to each direction's
        # dtype: the Triton backend reads them as fp32, foreach computes in their dtype
        agreed = [u.nan_to_num(0.0).sign().float() / (3 if i % 2 else 1) for i, u in enumerate(expected)]
        BACKEND.apply(prepared, agreed, args)
        foreach.BACKEND.apply(reference, [a.to(u.dtype) for a, u in zip(agreed, expected, strict=True)], args)
        assert_same(tensors(entries), tensors(copies))
    assert {r.constexprs["MODE"] for r in prepared.launched} == {2}  # the last launches were `apply`'s


@case
def split_step_float_momenta() -> None:
    """fp32, bf16 and fp16 params with momenta of every dtype, weight decay and maximize, and fp64."""
    specs = [((5, 300), F32, F32, F32), ((1030,), BF16, F32, BF16), ((17,), F16, BF16, F32), ((600,), BF16, BF16, F32)]
    for hp in (WD, MAXIMIZE):
        split_against_foreach(*float_entries(specs, seed=2), hp)
    split_against_foreach(*float_entries([((700,), F64, F64, F64), ((3,), F64, F64, F64)], seed=3), WD)


@case
def split_step_rounds_like_the_fused_step() -> None:
    """`apply` rounds bf16 params stochastically with the step's key, or Kahan-compensates them."""
    specs = [((1030,), BF16, F32, F32), ((40,), BF16, BF16, BF16), ((33,), F32, F32, F32)]
    split_against_foreach(*float_entries(specs, seed=4), WD, sr_key=spec.sr_key(9, 1, 3))
    split_against_foreach(*float_entries([*specs, ((70,), F16, F32, F32)], seed=5, compensated=True), TINY)


@case
def split_step_int8_momenta() -> None:
    """int8 momenta advance in `direction` exactly as in the fused step (stochastic requantization included);
    `apply` updates their params through the float kernel (a bucket of params alone, built at the first apply)."""
    specs = [((4, 96), BF16, F32), ((3, 40), F32, F32), ((100,), F16, BF16)]
    key = spec.sr_key(1, 0, 2)
    split_against_foreach(*int8_entries(specs, seed=6), WD, quant_key=key)
    split_against_foreach(*int8_entries(specs, seed=7, rounding="nearest", compensated=True), TINY)


class LocalVote(DirectionExchange):
    """A stand-in exchange: every group applies the sign of its own direction (0 for 0 and NaN), as a vote of one
    replica would, so that `Lion` takes its split path (direction, exchange, apply) on one process."""

    def active(self) -> bool:
        return True

    def exchange(self, bound, args, groups) -> list[list[torch.Tensor] | None]:
        directions = [b.direction(a) for b, a in zip(bound, args, strict=True)]
        return [[(d > 0).float() - (d < 0).float() for d in ds] for ds in directions]


@case
def the_optimizer_split_step_equals_foreach() -> None:
    """`Lion` with an exchange: the Triton route's direction and apply equal foreach's, groups of fp32 params,
    bf16 params with stochastic rounding, bf16 params with compensation and int8 momentum; `split` is declared."""
    from lion_dist.backends.triton import CAPABILITIES

    assert CAPABILITIES.split and CAPABILITIES.compensation

    def train(backend: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(64, 80, generator=gen), torch.randn(129, generator=gen)]  # int8 needs 4096 elements
        params += [torch.randn(s, generator=gen).bfloat16() for s in ((64, 80), (300,))]
        params = [p.requires_grad_() for p in params]
        groups: list[dict[str, Any]] = [
            {"params": params[:1], "momentum_dtype": "int8", "int8_block_size": 32},
            {"params": params[1:2]},
            {"params": params[2:3], "stochastic_rounding": True, "seed": 4},
            {"params": params[3:], "compensation": True, "maximize": True},
        ]
        opt = Lion(groups, lr=1e-3, weight_decay=0.1, backend=backend, exchange=LocalVote(), batch_size_policy="ignore")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return [p.detach() for p in params] + [t for p in params for t in opt.state[p].values() if t.dim()]

    assert_same(train("triton"), train("foreach"))


# ---------------------------------------------------------------------------------------------- alignment buckets


@case
def gradients_misaligned_by_an_odd_shard_keep_the_state_vectorized() -> None:
    """FSDP2-like gradients: views into one flat buffer after a shard of odd length, so every later one sits at
    an offset that is no multiple of 16 bytes. The bucket splits by alignment once per mask: the aligned tensor
    runs with 128-bit accesses everywhere, the others keep them for param and momentum; a step whose gradients sit
    where they sat reuses the cached launches and uploads nothing; results equal the reference bit for bit."""
    from lion_dist.backends.triton import BACKEND, tables

    specs = [((5,), F32, F32, F32), ((64,), F32, F32, F32), ((100,), F32, F32, F32), ((33,), F32, F32, F32)]
    specs += [((1000,), F32, F32, F32)]
    entries, copies = float_entries(specs, seed=8)
    prepared = BACKEND.prepare(entries)
    (bucket,) = prepared.buckets
    assert bucket.state_aligned.all()
    flat = torch.empty(sum(e.param.numel() for e in entries))
    offsets = [0, 5, 69, 169, 202]  # bytes 0, 20, 276, 676, 808: only the first is 16-byte aligned
    uploads = []
    real_upload = tables.upload

    def count(values, device):
        uploads.append(len(values))
        return real_upload(values, device)

    def step(grads, hp) -> list[tuple]:
        BACKEND.step(prepared, grads, StepArgs(hp))
        reference_step(copies, grads, hp)
        assert_same(tensors(entries), tensors(copies))
        return sorted(
            (r.constexprs["STATE_ALIGNED"], r.constexprs["STREAM_ALIGNED"], r.entries) for r in prepared.launched
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tables, "upload", count)
        views = [flat[o : o + e.param.numel()] for o, e in zip(offsets, entries, strict=True)]
        for s, v in enumerate(views):
            v.copy_(randn(v.shape, F32, s))
        split = step(views, WD)
        assert split == [(True, False, (1, 2, 3, 4)), (True, True, (0,))]
        assert len(uploads) == 2  # each sub-bucket's program map, once
        launches = bucket.streams["grads"].launches
        for v in views:
            v.mul_(-0.5)
        assert step(views, MAXIMIZE) == split and bucket.streams["grads"].launches is launches
        fresh = grads_for(entries, 30)  # separate allocations: all aligned, the whole bucket's program map
        assert step(fresh, WD) == [(True, True, (0, 1, 2, 3, 4))]
        assert step(views, WD) == split and len(uploads) == 2  # back to the cached split: nothing uploaded
    assert bucket.streams["grads"].launches is launches


# ---------------------------------------------------------------------------------------------- CUDA-graph capture


@case
def a_capture_reads_the_device_lr_and_step_and_refuses_host_changes() -> None:
    """With a capture on (mocked): the step uploads nothing from the host, the lr tensor and the device step count
    reach the kernel through device-side copies (what a replay re-executes: here a schedule's in-place lr and an
    advanced step give the reference's bits), and anything a replay could not redo raises a clear error: a float
    lr that changed, gradients at new addresses, the first split step's tables."""
    from lion_dist.backends.triton import BACKEND, tables

    entries, copies = float_entries([((300,), BF16, F32, F32), ((70,), F32, F32, F32)], seed=9)
    grads = grads_for(entries, 40)
    prepared = BACKEND.prepare(entries)
    lr, step = torch.tensor(1e-3), torch.tensor(0, dtype=torch.int64)
    base = spec.sr_key_base(7, 0)

    def args(lr_value: float | torch.Tensor = lr) -> StepArgs:
        hp = LionHyperparams(lr=lr_value, beta1=0.9, beta2=0.99, weight_decay=0.1)
        return StepArgs(hp, sr_key=DeviceKey(base, step))

    def reference(lr_value: float) -> None:
        hp = LionHyperparams(lr=lr_value, beta1=0.9, beta2=0.99, weight_decay=0.1)
        reference_step(copies, grads, hp, sr_key=spec.sr_key(7, 0, int(step)))

    BACKEND.step(prepared, grads, args())  # the warm-up step, outside the capture
    reference(float(lr))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        uploaded = []
        real = tables.DeviceTable.upload
        patch.setattr(tables.DeviceTable, "upload", lambda self, v: uploaded.append(real(self, v)) or uploaded[-1])
        for value, count in ((5e-4, 1), (2e-4, 2)):  # a schedule writes the lr tensor in place; the step advances
            lr.fill_(value)
            step.fill_(count)
            BACKEND.step(prepared, grads, args())
            reference(float(lr))
            assert_same(tensors(entries), tensors(copies))
        assert uploaded and not any(uploaded)  # every table held its values: nothing copied from the host
        with pytest.raises(RuntimeError, match=r"lr, betas, .* changed while a CUDA graph was being captured"):
            BACKEND.step(prepared, grads, args(1e-3))
        with pytest.raises(RuntimeError, match=r"gradients' addresses changed while a CUDA graph.*lr as a 1-element"):
            BACKEND.step(prepared, [g.clone() for g in grads], args())
        with pytest.raises(RuntimeError, match=r"must build launch tables .* the first split step"):
            BACKEND.direction(prepared, grads, args())


@case
def the_one_shot_form_uploads_its_tables_once_per_call() -> None:
    """`functional.lion(backend="triton")` builds its tables each call: every static table in one upload (on CUDA
    one pinned, non-blocking copy), and the gradient and hp tables one host write each."""
    from lion_dist.backends.triton import tables
    from lion_dist.functional import lion

    specs = [((300,), F32, F32, F32), ((40,), BF16, F32, BF16), ((1030,), F64, F64, F64)]
    entries, copies = float_entries(specs, seed=11, base=0)  # param i is param id i, as `lion` numbers them
    grads = grads_for(entries, 50)
    uploads, writes = [], []
    real_upload, real_write = tables.upload, tables.DeviceTable.upload
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            tables, "upload", lambda values, device: uploads.append(len(values)) or real_upload(values, device)
        )
        patch.setattr(tables.DeviceTable, "upload", lambda self, v: writes.append(real_write(self, v)) or writes[-1])
        params, momenta = [e.param for e in entries], [e.exp_avg for e in entries]
        lion(params, grads, momenta, WD, backend="triton", sr_seed=3)
    reference_step(copies, grads, WD, sr_key=3)
    assert_same(tensors(entries), tensors(copies))
    assert len(uploads) == 1 and writes == [True] * 4  # three buckets' gradient tables and the hp table


case_results = CASES.fixture()


@pytest.mark.parametrize("name", CASES.params("interpreter"))
def test_paths_interpreter_case(case_results: dict[str, dict[str, str | None]], name: str) -> None:
    report(case_results, "interpreter", name)
