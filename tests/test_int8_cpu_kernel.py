"""The CPU kernel's int8-momentum loop (`lion_step_int8`) against `spec.lion_reference_int8` (the reference
backend), bit for bit: every param/grad dtype, nearest and stochastic requantization, stochastic rounding of bf16
params, rows whose last block is short, blocks of 1 to the kernel's largest, NaN blocks, any thread count, and
float and int8 momenta in one plan."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lion_dist import backends, spec
from lion_dist.backends import Entry, StepArgs
from lion_dist.backends.cpu import library as cpu_library
from lion_dist.formats.int8 import Int8Momentum
from lion_dist.spec import LionHyperparams
from tests.conftest import assert_same, entry

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
HPS = [
    LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99),
    LionHyperparams(lr=1e-2, beta1=0.95, beta2=0.98, weight_decay=0.3, maximize=True),
]
# (shape, block): a short last block in each row, 1-D, a block wider than its row, the largest block, block 1,
# rows of odd length (even blocks starting at odd elements, and a 1-element block), and 110k elements in all so
# that two threads split the work
LAYOUTS = [((6, 300), 128), ((5000,), 128), ((3, 5), 128), ((2, 4096), cpu_library.INT8_MAX_BLOCK), ((777,), 1)]
LAYOUTS += [((3, 257), 128), ((100, 1000), 256)]


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    assert cpu_library.is_available(), cpu_library.unavailable_reason()


def _entries(param_dtype: torch.dtype, grad_dtype: torch.dtype, seed: int = 0) -> list[Entry]:
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for i, (shape, block) in enumerate(LAYOUTS):
        m = torch.randn(shape, generator=gen) * torch.logspace(-4, 0, shape[-1])  # blocks of very unequal ranges
        if i == 0:
            m[1, :128] = 0.0  # an all-zero block: scale 0
        codes, scales = spec.quantize_momentum(m, block)
        p = torch.randn(shape, generator=gen).to(param_dtype)
        entries.append(entry(p, codes, grad_dtype, i, 1000 * i, 0, scales=scales, block=block))
    return entries


def _grads(entries: list[Entry], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(e.param.shape, generator=gen).to(e.grad_dtype) for e in entries]
    grads[0][2, 7] = float("nan")  # its block's momentum is NaN: scale NaN, codes 0
    grads[1][:3] = torch.tensor([0.0, -0.0, float("inf")])
    return grads


def _assert_same(got: list[Entry], want: list[Entry]) -> None:
    for a, b in zip(got, want, strict=True):
        assert_same([a.param, *a.state], [b.param, *b.state])


def _run(entries: list[Entry], steps: int, hp: LionHyperparams, *, param_sr: bool, quant_sr: bool) -> list[Entry]:
    """`steps` steps of the CPU kernel on `entries`, checked against the reference after every step."""
    want = copy.deepcopy(entries)
    fused, reference = backends.get("cpu_fused"), backends.get("reference")
    prepared = fused.prepare(entries)
    for step in range(steps):
        grads = _grads(entries, step)
        sr_key = spec.sr_key(7, 0, step) if param_sr else None
        quant_key = spec.sr_key(7, 0, step) if quant_sr else None
        fused.step(prepared, grads, StepArgs(hp, sr_key=sr_key, quant_key=quant_key))
        reference.step(want, grads, StepArgs(hp, sr_key=sr_key, quant_key=quant_key))
        _assert_same(entries, want)
    return entries


PAIRS = [(FP32, FP32), (BF16, BF16), (BF16, FP32), (FP32, BF16), (FP16, FP16)]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda d: "-".join(str(x).removeprefix("torch.") for x in d))
@pytest.mark.parametrize("quant_sr", [False, True], ids=["nearest", "stochastic"])
def test_equals_the_int8_reference_bit_for_bit(pair, quant_sr) -> None:
    for hp in HPS:
        entries = _entries(*pair)
        before = [e.exp_avg.clone() for e in entries]
        _run(entries, 3, hp, param_sr=pair[0] == BF16, quant_sr=quant_sr)
        assert not all(torch.equal(a, e.exp_avg) for a, e in zip(before, entries, strict=True))  # it moved


def test_any_thread_count_gives_the_same_bits() -> None:
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(_entries(BF16, BF16), 2, HPS[1], param_sr=True, quant_sr=True))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        _assert_same(other, results[0])


def test_float_and_int8_momenta_in_one_plan() -> None:
    gen = torch.Generator().manual_seed(3)
    int8 = _entries(FP32, FP32)
    floats = [
        entry(torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1, FP32, 9 + k)
        for k, n in enumerate((3, 40_000))
    ]
    empty_codes, empty_scales = spec.quantize_momentum(torch.zeros(0, 64), 64)
    empty = [entry(torch.zeros(0, 64), empty_codes, FP32, 20, scales=empty_scales, block=64)]
    mixed = list(itertools.chain.from_iterable(zip(int8, floats + [None] * len(int8), strict=False)))
    mixed = [e for e in mixed if e is not None] + empty
    _run(mixed, 2, HPS[0], param_sr=False, quant_sr=True)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e._replace(format=Int8Momentum(cpu_library.INT8_MAX_BLOCK * 2)), "int8 blocks of 1 to"),
        (lambda e: e._replace(state=(e.state[0], e.state[1][..., :1].contiguous())), "needs codes of"),
        (lambda e: e._replace(state=(e.state[0], e.state[1].double())), "the scales fp32"),
        (lambda e: e._replace(state=(e.state[0].t(), e.state[1])), "contiguous"),
    ],
)
def test_bad_entries_get_a_clear_error(change, match) -> None:
    first = _entries(FP32, FP32)[0]
    with pytest.raises(ValueError, match=match):
        backends.get("cpu_fused").prepare([change(first)])


@pytest.mark.parametrize(
    "stream, numel",
    [
        (spec.NoiseStream(key=0, param_id=0, base=0, shard=0), 1),
        (spec.NoiseStream(key=(1 << 62) - 3, param_id=7, base=3, shard=spec.MOMENTUM_STREAM | 2), 2 * 1024 + 13),
        (spec.NoiseStream(key=spec.sr_key(5, 1, 9), param_id=2**32 - 1, base=(1 << 33) + 5, shard=1), 999),
    ],
)
def test_c_noise_equals_the_spec_noise(stream, numel) -> None:
    """The foreach backend's requantization noise on CPU (`cpu_library.sr_noise`) is `spec.sr_noise`, exactly:
    unaligned bases, a base past 2**32, the momentum's stream bit, lengths across the C helper's chunks."""
    got = cpu_library.sr_noise(stream, numel)
    assert got.dtype == torch.int32 and torch.equal(got, spec.sr_noise(stream, numel))
