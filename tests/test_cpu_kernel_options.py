"""The CPU kernel's memory-saving options and split step, bit for bit against the reference and foreach backends:
Kahan compensation of bf16/fp16 params (float and int8 momenta, fused), Distributed Lion's `direction` and
`apply` (one process, then `DistributedLion` on 2 gloo workers), and stochastic rounding at odd bases and lengths
that cross the kernel's noise tiles."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lion_dist import Lion, backends, spec
from lion_dist.backends import Entry, StepArgs
from lion_dist.backends.cpu import library as cpu_library
from lion_dist.distributed_lion import DistributedLion
from lion_dist.spec import LionHyperparams
from tests.conftest import assert_same, entry
from tests.distributed import spawn

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
HPS = [
    LionHyperparams(lr=3e-4, beta1=0.9, beta2=0.99),  # small steps: compensation keeps what bf16 rounds away
    LionHyperparams(lr=1e-2, beta1=0.95, beta2=0.98, weight_decay=0.3, maximize=True),
]
# odd sizes: 1 element, one crossing the 1024-element noise tile, one that two threads split (> 2 x 32768)
SIZES = [1, 3, 1025, 3001, 70_001]
# (param, grad, momentum): compensated bf16 and fp16 params with grads of their dtype or fp32, every float momentum
KAHAN_TRIPLES = [(p, g, m) for p in (BF16, FP16) for g in (p, FP32) for m in (FP32, BF16, FP16)]


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    assert cpu_library.is_available(), cpu_library.unavailable_reason()


def _name(dtypes) -> str:
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    return "-".join(str(d).removeprefix("torch.") for d in dtypes)


def _entries(pd, md, gd, *, compensation: bool, int8: bool = False, seed: int = 0) -> list[Entry]:
    """Params near 1 with odd noise bases, their momenta (float or int8), and compensation buffers holding
    earlier rounding errors; the awkward values: exact zeros, a param past fp16's range."""
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for k, n in enumerate(SIZES):
        p32 = 1 + torch.randn(n, generator=gen) * 0.1
        p = p32.to(pd)
        c = None
        if compensation:
            c = (p32 - p.float()).to(pd)  # the error of that rounding, as a real run leaves it
        if k == 2:
            p[:3] = torch.tensor([0.0, -0.0, 65504.0 if pd == FP16 else 3e38]).to(pd)
        m = torch.randn(n, generator=gen) * 0.01
        base = 7 * k + 3 * (k % 2)  # odd and even, never tile-aligned
        if int8:
            codes, scales = spec.quantize_momentum(m.view(1, -1), 128)
            entries.append(entry(p, codes.view(-1), gd, k, base, 0, scales=scales.view(-1), block=128, compensation=c))
        else:
            entries.append(entry(p, m.to(md), gd, k, base, 0, compensation=c))
    return entries


def _grads(entries: list[Entry], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [(torch.randn(e.param.shape, generator=gen) * 0.1).to(e.grad_dtype) for e in entries]
    for g in grads:
        if g.numel() == SIZES[2]:  # NaN/Inf: a NaN param (and compensation)
            g.view(-1)[3:6] = torch.tensor([float("nan"), float("inf"), 0.0])
        if g.numel() == 1:  # with a zero momentum, c = 0: no move
            g.zero_()
    return grads


def _tensors(entries: list[Entry]) -> list[torch.Tensor | None]:
    return [t for e in entries for t in (e.param, *e.state, e.compensation)]


def _same_steps(entries: list[Entry], steps: int, hp: LionHyperparams, **keys) -> None:
    """`steps` fused steps and reference steps from the same state, compared after every step."""
    want = copy.deepcopy(entries)
    fused, reference = backends.get("cpu_fused"), backends.get("reference")
    prepared = fused.prepare(entries)
    for step in range(steps):
        grads = _grads(entries, step)
        args = StepArgs(hp, **{k: spec.sr_key(11, 0, step) for k, on in keys.items() if on})
        fused.step(prepared, grads, args)
        reference.step(want, grads, args)
        assert_same(_tensors(entries), _tensors(want))


@pytest.mark.parametrize("triple", KAHAN_TRIPLES, ids=_name)
def test_compensation_equals_the_reference(triple) -> None:
    pd, gd, md = triple
    for hp in HPS:
        entries = _entries(pd, md, gd, compensation=True)
        entries[0].exp_avg.zero_()  # c = 0 for the 1-element tensor
        before = [e.compensation.clone() for e in entries]
        _same_steps(entries, 3, hp, sr_key=pd == BF16)  # a key too: compensation wins, as in spec.write_back
        assert not all(torch.equal(b, e.compensation) for b, e in zip(before, entries, strict=True))


@pytest.mark.parametrize("pair", [(BF16, BF16), (BF16, FP32), (FP16, FP16), (FP16, FP32)], ids=_name)
@pytest.mark.parametrize("quant_sr", [False, True], ids=["nearest", "stochastic"])
def test_compensation_with_int8_momentum_equals_the_reference(pair, quant_sr) -> None:
    pd, gd = pair
    for hp in HPS:
        _same_steps(_entries(pd, FP32, gd, compensation=True, int8=True), 3, hp, quant_key=quant_sr)


def test_compensation_and_stochastic_rounding_in_one_call() -> None:
    """Entries with and without a buffer in one table: each written its own way."""
    plain = _entries(BF16, BF16, BF16, compensation=False)
    kahan = _entries(BF16, BF16, BF16, compensation=True, seed=1)
    mixed = [e for pair in zip(plain, kahan, strict=True) for e in pair]
    _same_steps(mixed, 2, HPS[1], sr_key=True)


def test_compensation_refuses_what_it_cannot_take() -> None:
    fused = backends.get("cpu_fused")
    e = _entries(BF16, FP32, BF16, compensation=True)[1]
    for bad, match in [
        (e._replace(compensation=e.compensation.float()), "buffer of their dtype"),
        (e._replace(param=e.param.float(), compensation=e.param.float()), "bf16 or fp16 params"),
        (e._replace(compensation=torch.zeros(2, 3, dtype=BF16).t()), "contiguous CPU tensor"),
        (e._replace(compensation=e.param), "share memory"),
    ]:
        with pytest.raises(ValueError, match=match):
            fused.prepare([bad])


def _train(backend: str, dtype: torch.dtype, **options) -> tuple[list[torch.Tensor], list[str]]:
    gen = torch.Generator().manual_seed(0)
    params = [(1 + torch.randn(s, generator=gen)).to(dtype).requires_grad_() for s in [(33, 130), (129,), (1,)]]
    opt = Lion(params, lr=3e-4, weight_decay=0.1, backend=backend, batch_size_policy="ignore", **options)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim()]
    (plan,) = list(opt._plans._plans[0].values())[-1:]
    return [p.detach() for p in params] + state, sorted({r.backend.name for r in plan.routes})


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=_name)
@pytest.mark.parametrize("momentum", [None, "int8"])
def test_auto_routes_compensation_to_the_kernel_and_matches_the_reference_backend(dtype, momentum) -> None:
    options = {"compensation": True, "momentum_dtype": momentum, "int8_block_size": 32}
    got, routes = _train("auto", dtype, **options)
    want, _ = _train("reference", dtype, **options)
    assert routes == ["cpu_fused"]
    assert len(got) > 3 + 3 and all(t.dtype == dtype for t in got[:3])  # params, momenta and the buffers
    assert_same(got, want)


# ---------------------------------------------------------------------------------------------- the split step


def _split_entries(triple, seed: int = 0, *, compensation: bool = False) -> list[Entry]:
    pd, gd, md = triple
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for k, n in enumerate(SIZES):
        p = (1 + torch.randn(n, generator=gen, dtype=FP64) * 0.1).to(pd)
        m = (torch.randn(n, generator=gen, dtype=FP64) * 0.01 * (k > 0)).to(md)  # the 1-element one: c = 0
        if k == 3:  # a 2-D one
            p, m = p.view(1, n), m.view(1, n)
        c = torch.zeros_like(p) if compensation else None
        entries.append(entry(p, m, gd, k, 5 * k + 1, compensation=c))
    return entries


def _directions_like(entries: list[Entry], step: int) -> list[torch.Tensor]:
    """fp32 directions as the vote and the mean of 3 replicas give them: +-1, 0, +-1/3 (not exact times lr)."""
    gen = torch.Generator().manual_seed(200 + step)
    values = torch.tensor([-1.0, -1 / 3, 0.0, 1 / 3, 1.0])
    return [values[torch.randint(0, 5, e.param.shape, generator=gen)] for e in entries]


ALL_TRIPLES = [*itertools.product((FP32, BF16, FP16), repeat=3), (FP64,) * 3]


@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=_name)
def test_direction_equals_foreach(triple) -> None:
    """Same momenta bit for bit, same signs (int8 here, the math dtype there; 0 where c is 0 or NaN)."""
    hp = HPS[1]
    entries = _split_entries(triple)
    want = copy.deepcopy(entries)
    fused, foreach = backends.get("cpu_fused"), backends.get("foreach")
    prepared, want_prepared = fused.prepare(entries), foreach.prepare(want)
    for step in range(2):
        grads = _grads(entries, step)
        got_u = fused.direction(prepared, grads, StepArgs(hp))
        want_u = foreach.direction(want_prepared, grads, StepArgs(hp))
        assert_same([e.exp_avg for e in entries], [e.exp_avg for e in want])
        for g, w, e in zip(got_u, want_u, entries, strict=True):
            assert g.shape == e.param.shape and g.dtype == (FP64 if triple[0] == FP64 else torch.int8)
            assert torch.equal(g > 0, w > 0) and torch.equal(g < 0, w < 0)
        if triple[0] == FP64:
            assert_same(got_u, want_u)  # fp64: sign(c) + 0 * c itself
        moves = [(u > 0) | (u < 0) for u in got_u]
        assert not moves[0].any() and not moves[2].all() and moves[4].all()  # c = 0 and a NaN c: no vote


@pytest.mark.parametrize("triple", ALL_TRIPLES, ids=_name)
def test_apply_equals_foreach_and_the_reference(triple) -> None:
    pd = triple[0]
    for hp, sr in [(HPS[0], False), (HPS[1], pd == BF16)]:
        entries = _split_entries(triple, compensation=False)
        want, ref = copy.deepcopy(entries), copy.deepcopy(entries)
        fused, foreach, reference = (backends.get(n) for n in ("cpu_fused", "foreach", "reference"))
        prepared, want_prepared = fused.prepare(entries), foreach.prepare(want)
        for step in range(2):
            u = _directions_like(entries, step)
            if pd == FP64 and step == 1:
                u = [t.double() for t in u]  # an fp64 direction: fp64 math
            args = StepArgs(hp, sr_key=spec.sr_key(3, 0, step) if sr else None)
            fused.apply(prepared, u, args)
            foreach.apply(want_prepared, u, args)
            reference.apply(ref, u, args)
            assert_same([e.param for e in entries], [e.param for e in want])
            assert_same([e.param for e in entries], [e.param for e in ref])


@pytest.mark.parametrize("pd", [BF16, FP16], ids=_name)
def test_apply_with_compensation_equals_foreach(pd) -> None:
    entries = _split_entries((pd, pd, FP32), compensation=True)
    want = copy.deepcopy(entries)
    fused, foreach = backends.get("cpu_fused"), backends.get("foreach")
    prepared, want_prepared = fused.prepare(entries), foreach.prepare(want)
    for step in range(3):
        u = _directions_like(entries, step)
        fused.apply(prepared, u, StepArgs(HPS[0]))
        foreach.apply(want_prepared, u, StepArgs(HPS[0]))
        assert_same(_tensors(entries), _tensors(want))
    assert any(e.compensation.any() for e in entries)


def test_split_step_refuses_int8_momentum_and_wrong_directions() -> None:
    fused = backends.get("cpu_fused")
    codes, scales = spec.quantize_momentum(torch.randn(4, 256), 128)
    int8 = fused.prepare([entry(torch.randn(4, 256), codes, FP32, scales=scales)])
    with pytest.raises(ValueError, match=r"no split step .* int8"):
        fused.direction(int8, [torch.randn(4, 256)], StepArgs(HPS[0]))
    floats = fused.prepare(_split_entries((BF16, BF16, BF16)))
    u = [torch.zeros(e.param.shape, dtype=BF16) for e in _split_entries((BF16, BF16, BF16))]
    with pytest.raises(ValueError, match="takes an fp32 direction"):
        fused.apply(floats, u, StepArgs(HPS[0]))


def _distributed_run(rank: int, world: int, backend: str, options: dict) -> dict:
    torch.manual_seed(0)  # the same params on every replica
    params = [torch.randn(s).to(options.pop("dtype", FP32)).requires_grad_() for s in [(64, 33), (1000,), (7,)]]
    opt = DistributedLion(params, lr=1e-2, weight_decay=0.1, backend=backend, batch_size_policy="ignore", **options)
    gen = torch.Generator().manual_seed(1 + rank)  # each replica its own gradients
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad.view(-1)[:5] = 0  # c = 0 at the first step: a parity vote
        opt.step()
    (plan,) = list(opt._plans._plans[0].values())[-1:]
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim()]
    return {"tensors": [p.detach() for p in params] + state, "routes": sorted(r.backend.name for r in plan.routes)}


CASES = {
    "fp32": {},
    "bf16-stochastic": {"dtype": BF16, "stochastic_rounding": True, "seed": 5},
    "bf16-compensation": {"dtype": BF16, "compensation": True, "momentum_dtype": torch.bfloat16},
    "fp16-fp32-momentum": {"dtype": FP16, "momentum_dtype": FP32, "aggregate": "mean"},
}


def _distributed_cases(rank: int, world: int) -> dict:
    return {
        (name, backend): _distributed_run(rank, world, backend, dict(options))
        for name, options in CASES.items()
        for backend in ("cpu_fused", "foreach")
    }


def test_distributed_lion_on_the_kernel_equals_foreach() -> None:
    """DistributedLion on 2 gloo workers: the kernel's split step gives the params and momenta of foreach's."""
    results = spawn(_distributed_cases, 2)
    for rank, result in enumerate(results):
        for name in CASES:
            fused, foreach = result[name, "cpu_fused"], result[name, "foreach"]
            assert fused["routes"] == ["cpu_fused"] and foreach["routes"] == ["foreach"], name
            assert_same(fused["tensors"], foreach["tensors"])
            if rank:
                assert_same(fused["tensors"][:3], results[0][name, "cpu_fused"]["tensors"][:3])  # params agree
