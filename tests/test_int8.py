"""8-bit momentum and Kahan compensation on one process: the spec's quantizer, the backends against
`spec.lion_reference_int8`, which params the optimizer quantizes, its state dicts and its errors.

The fused kernels' int8 paths are tested bit for bit in `test_int8_cpu_kernel.py` and
`test_int8_triton_kernel.py`; sharded runs and resharded checkpoints in `test_int8_sharded.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lion_dist import Lion, backends, spec
from lion_dist.backends import Entry, StepArgs
from lion_dist.spec import LionHyperparams, NoiseStream
from tests.conftest import entry
from tests.scripts import benchmark_script

QUIET = {"batch_size_policy": "ignore"}
HP = LionHyperparams(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


def _noise(numel: int, key: int) -> torch.Tensor:
    return spec.sr_noise(NoiseStream(key, 0, 0, spec.MOMENTUM_STREAM), numel)


# ------------------------------------------------------------------------------------------------ the quantizer


@pytest.mark.parametrize("shape, block", [((4, 300), 128), ((1000,), 64), ((3, 5), 128), ((2, 256), 256)])
def test_nearest_quantization_is_within_half_a_code_and_blocks_stay_in_rows(shape, block) -> None:
    m = torch.randn(shape) * torch.logspace(-6, 0, shape[-1])
    codes, scales = spec.quantize_momentum(m, block)
    assert codes.dtype == torch.int8 and codes.shape == m.shape
    assert scales.dtype == torch.float32 and tuple(scales.shape) == spec.int8_scale_shape(shape, block)
    error = (spec.dequantize_momentum(codes, scales, block) - m).abs()
    half_code = scales.repeat_interleave(block, dim=-1)[..., : shape[-1]].reshape(shape) / 2
    assert (error <= half_code * (1 + 1e-6)).all()
    assert codes.abs().max() == spec.INT8_MAX_CODE  # each block's absmax maps to the largest code


def test_zero_blocks_and_non_finite_values() -> None:
    m = torch.zeros(3, 256)
    m[1, 5], m[2, 200] = float("nan"), float("inf")
    codes, scales = spec.quantize_momentum(m, 128)
    back = spec.dequantize_momentum(codes, scales, 128)
    assert torch.equal(back[0], torch.zeros(256)) and scales[0].eq(0).all()  # zeros stay exactly zero
    assert back[1, :128].isnan().all() and torch.equal(back[1, 128:], torch.zeros(128))  # NaN: its block only
    assert back[2, 128:].isnan().any() and torch.equal(back[2, :128], torch.zeros(128))


def test_stochastic_requantization_is_unbiased_and_keeps_a_small_momentum_moving() -> None:
    """The issue's failure: one large element sets the block's scale, and a 1% step of a small element is below
    half a code. Nearest freezes the small elements; stochastic rounding follows the fp32 momentum on average."""
    block, steps, trials = 128, 40, 64
    m0 = torch.full((trials, block), 0.0)
    m0[:, 0] = 1.0  # absmax 1: one code is 1 / 127
    g = torch.full((trials, block), 0.3)
    g[:, 0] = 1.0
    exact = m0.clone()
    near_codes, near_scales = spec.quantize_momentum(m0, block)
    sr_codes, sr_scales = near_codes.clone(), near_scales.clone()
    for step in range(steps):
        exact = exact * 0.99 + g * 0.01
        m = spec.dequantize_momentum(near_codes, near_scales, block) * 0.99 + g * 0.01
        near_codes, near_scales = spec.quantize_momentum(m, block)
        m = spec.dequantize_momentum(sr_codes, sr_scales, block) * 0.99 + g * 0.01
        sr_codes, sr_scales = spec.quantize_momentum(m, block, _noise(m.numel(), step))
    near = spec.dequantize_momentum(near_codes, near_scales, block)[:, 1:]
    stochastic = spec.dequantize_momentum(sr_codes, sr_scales, block)[:, 1:]
    target = exact[0, 1].item()  # 0.3 * (1 - 0.99**40) = 0.099
    assert near.abs().max().item() == 0.0  # frozen at its start
    assert abs(stochastic.mean().item() - target) < 0.05 * target


# ------------------------------------------------------------------------------------------------ backends


def _entries(values: dict[str, torch.Tensor], block: int, compensation: bool, dtype: torch.dtype) -> list[Entry]:
    entries = []
    for i, (shape_name, m) in enumerate(values.items()):
        del shape_name
        codes, scales = spec.quantize_momentum(m, block)
        p = torch.randn(m.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        comp = torch.zeros_like(p) if compensation else None
        entries.append(entry(p, codes, dtype, i, scales=scales, block=block, compensation=comp))
    return entries


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(
    "dtype, compensation", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)  # compensation keeps a buffer for bf16/fp16 params only
def test_foreach_equals_the_int8_reference_bit_for_bit(dtype, rounding, compensation) -> None:
    gen = torch.Generator().manual_seed(1)
    momenta = {"rows": torch.randn(6, 300, generator=gen) * 0.1, "flat": torch.randn(5000, generator=gen)}
    got = _entries(momenta, 128, compensation, dtype)
    want = copy.deepcopy(got)
    foreach = backends.get("foreach")
    prepared = foreach.prepare(got)
    for step in range(4):
        grads = [torch.randn(e.param.shape, generator=gen).to(dtype) for e in got]
        key = spec.sr_key(0, 0, step) if rounding == "stochastic" else None
        foreach.step(prepared, grads, StepArgs(HP, quant_key=key))
        backends.get("reference").step(want, grads, StepArgs(HP, quant_key=key))
    for a, b in zip(got, want, strict=True):
        for x, y in (
            (a.param, b.param),
            (a.exp_avg, b.exp_avg),
            (a.state[1], b.state[1]),
            (a.compensation, b.compensation),
        ):
            assert (x is None and y is None) or torch.equal(x, y)


def test_compensation_keeps_tiny_bf16_updates_that_rounding_to_nearest_drops() -> None:
    """lr 1e-4 on params in [1, 2): each update is below half a bf16 ulp (2**-8), so plain bf16 never moves; with
    a bf16 compensation buffer p + compensation follows the fp32 run to within the buffer's own rounding: |comp| is
    below half an ulp of p (2**-8), so storing it in bf16 errs by at most 2**-17 a step."""
    start = (1 + torch.rand(4096, generator=torch.Generator().manual_seed(0))).bfloat16().float()  # exact in bf16
    runs = {}
    for name, dtype, kwargs in (
        ("fp32", torch.float32, {}),
        ("bf16", torch.bfloat16, {}),
        ("compensated", torch.bfloat16, {"compensation": True}),
    ):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = Lion([p], lr=1e-4, **QUIET, **kwargs)
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        runs[name] = p.detach().float() + (opt.state[p]["compensation"].float() if kwargs else 0)
    assert torch.equal(runs["bf16"], start)  # frozen
    assert (runs["fp32"] - start).abs().min() > 4e-3  # fp32 moved 50 x 1e-4
    assert (runs["compensated"] - runs["fp32"]).abs().max() <= 50 * 2**-17  # p + compensation tracks fp32


# ------------------------------------------------------------------------------------------------ the optimizer


def _model_params() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"matrix": (64, 200), "flat": (5000,), "small": (8, 8), "bias": (64,), "complex": (70, 70)}
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in shapes.items()}
    params["complex"] = torch.nn.Parameter(torch.randn(70, 70, dtype=torch.complex64, generator=gen))
    return params


def _train(opt: Lion, params: dict[str, torch.Tensor], steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params.values():
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        opt.step()


def test_which_params_are_quantized_and_state_bytes() -> None:
    params = _model_params()
    opt = Lion(params.values(), lr=1e-3, momentum_dtype="int8", **QUIET)
    _train(opt, params, 1)
    kinds = {n: opt.state[p]["exp_avg"].dtype for n, p in params.items()}
    assert kinds == {
        "matrix": torch.int8,
        "flat": torch.int8,  # a plain 1-D tensor (a flat partition) is whole: its blocks are exact
        "small": torch.float32,  # < 4096 elements
        "bias": torch.float32,
        "complex": torch.complex64,
    }
    quantized = [params["matrix"], params["flat"]]
    quantized_bytes = sum(
        opt.state[p]["exp_avg"].numel() + opt.state[p]["exp_avg_scale"].numel() * 4 for p in quantized
    )
    assert quantized_bytes / sum(p.numel() for p in quantized) <= 1.1  # the goal: <= 1.1 B/param
    fp32_bytes = sum(p.numel() * 4 for n, p in params.items() if n in ("small", "bias")) + 70 * 70 * 8
    assert opt.state_bytes() == quantized_bytes + fp32_bytes


def test_int8_training_tracks_fp32_momentum() -> None:
    runs = {}
    for dtype in (None, "int8"):
        params = _model_params()
        del params["complex"]
        opt = Lion(params.values(), lr=1e-3, weight_decay=0.1, momentum_dtype=dtype, **QUIET)
        _train(opt, params, 30)
        runs[dtype] = torch.cat([p.detach().flatten() for p in params.values()])
    moved = (runs[None] - _cat_start()).abs().mean()
    assert (runs["int8"] - runs[None]).abs().mean() < 0.2 * moved


def _cat_start() -> torch.Tensor:
    params = _model_params()
    del params["complex"]
    return torch.cat([p.detach().flatten() for p in params.values()])


@pytest.mark.parametrize("backend", ["foreach", "auto"])
def test_state_dict_round_trip_continues_bit_for_bit(backend) -> None:
    kwargs = dict(lr=1e-3, momentum_dtype="int8", int8_block_size=64, backend=backend, **QUIET)
    params = _model_params()
    opt = Lion(params.values(), **kwargs)
    _train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    fresh = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    fresh_opt = Lion(fresh.values(), **{**kwargs, "int8_block_size": 128})  # the saved block size wins
    fresh_opt.load_state_dict(saved)
    assert fresh_opt.param_groups[0]["int8_block_size"] == 64
    for p, q in zip(params.values(), fresh.values(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value) and fresh_opt.state[q][key].dtype == value.dtype
    _train(opt, params, 3, start=3)
    _train(fresh_opt, fresh, 3, start=3)
    for p, q in zip(params.values(), fresh.values(), strict=True):
        assert torch.equal(p, q)


def test_bf16_params_keep_fp32_scales_through_a_state_dict() -> None:
    """torch's load_state_dict casts every float state to the param's dtype; the scales must not become bf16."""
    p = torch.nn.Parameter(torch.randn(64, 128).to(torch.bfloat16))
    opt = Lion([p], lr=1e-3, momentum_dtype="int8", **QUIET)
    _train(opt, {"p": p}, 2)
    q = torch.nn.Parameter(p.detach().clone())
    other = Lion([q], lr=1e-3, momentum_dtype="int8", **QUIET)
    other.load_state_dict(opt.state_dict())
    assert other.state[q]["exp_avg_scale"].dtype == torch.float32
    assert torch.equal(other.state[q]["exp_avg_scale"], opt.state[p]["exp_avg_scale"])
    assert torch.equal(other.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_lion_pytorch_state_loads_quantized_and_dequantized_export_loads_back() -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params = _model_params()
    del params["complex"]
    theirs = lion_pytorch.Lion(params.values(), lr=1e-3)
    _train(theirs, params, 3)
    ours = Lion(params.values(), lr=1e-3, momentum_dtype="int8", **QUIET)
    ours.load_state_dict(theirs.state_dict())
    matrix = params["matrix"]
    state = ours.state[matrix]
    expected_codes, expected_scales = spec.quantize_momentum(theirs.state[matrix]["exp_avg"], spec.INT8_BLOCK)
    assert torch.equal(state["exp_avg"], expected_codes) and torch.equal(state["exp_avg_scale"], expected_scales)
    assert ours.state[params["bias"]]["exp_avg"].dtype == torch.float32

    exported = ours.dequantized_state_dict()
    assert all(set(s) == {"exp_avg"} and s["exp_avg"].dtype == torch.float32 for s in exported["state"].values())
    assert torch.equal(exported["state"][0]["exp_avg"], spec.dequantize_momentum(expected_codes, expected_scales, 128))
    assert "exp_avg_scale" in ours.state_dict()["state"][0]  # the export is a copy; the optimizer stays int8
    back = lion_pytorch.Lion(params.values(), lr=1e-3)
    back.load_state_dict(exported)
    assert torch.equal(back.state[matrix]["exp_avg"], exported["state"][0]["exp_avg"])


def test_switching_momentum_dtype_converts_the_state() -> None:
    params = _model_params()
    del params["complex"]
    opt = Lion(params.values(), lr=1e-3, **QUIET)
    _train(opt, params, 2)
    fp32 = opt.state[params["matrix"]]["exp_avg"].clone()
    opt.param_groups[0]["momentum_dtype"] = torch.int8
    _train(opt, params, 1, start=2)
    assert opt.state[params["matrix"]]["exp_avg"].dtype == torch.int8
    opt.param_groups[0]["momentum_dtype"] = None
    _train(opt, params, 1, start=3)
    assert opt.state[params["matrix"]]["exp_avg"].dtype == torch.float32
    assert "exp_avg_scale" not in opt.state[params["matrix"]]
    assert not torch.equal(opt.state[params["matrix"]]["exp_avg"], fp32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum_dtype": "int4"}, "momentum_dtype must be None"),
        ({"int8_block_size": 0}, "int8_block_size must be an int in"),
        ({"int8_block_size": 4096}, "int8_block_size must be an int in"),
        ({"int8_rounding": "floor"}, "int8_rounding must be one of"),
        ({"compensation": True, "stochastic_rounding": True}, "pick one"),
        ({"compensation": 1}, "compensation must be a bool"),
    ],
)
def test_bad_int8_arguments_are_refused_by_name(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_int8_state_dicts_are_refused_and_change_nothing() -> None:
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = Lion([p], lr=1e-3, momentum_dtype="int8", **QUIET)
    _train(opt, {"p": p}, 1)
    before = copy.deepcopy(opt.state_dict())
    for bad, match in (
        ({"exp_avg": before["state"][0]["exp_avg"], "exp_avg_scale": torch.zeros(64, 2)}, "exp_avg_scale must be"),
        ({"exp_avg": before["state"][0]["exp_avg"].float(), "exp_avg_scale": torch.zeros(64, 1)}, "int8 codes"),
        ({"exp_avg_scale": torch.zeros(64, 1)}, "a Lion state holds 'exp_avg'"),
    ):
        state_dict = copy.deepcopy(before)
        state_dict["state"][0] = bad
        with pytest.raises((ValueError, TypeError), match=match):
            opt.load_state_dict(state_dict)
        assert torch.equal(opt.state[p]["exp_avg"], before["state"][0]["exp_avg"])


def test_distributed_lion_refuses_int8_momentum() -> None:
    from lion_dist.distributed_lion import DistributedLion

    with pytest.raises(ValueError, match=r"cannot use momentum_dtype=torch\.int8 yet"):
        DistributedLion([torch.nn.Parameter(torch.randn(64, 128))], lr=1e-3, momentum_dtype="int8", **QUIET)


def test_fp32_momentum_of_a_bf16_param_survives_a_state_dict_unrounded() -> None:
    """torch's load_state_dict casts float states to the param's dtype: an fp32 momentum must stay fp32 exactly."""
    p = torch.nn.Parameter(torch.randn(64, 128).to(torch.bfloat16))
    opt = Lion([p], lr=1e-3, momentum_dtype=torch.float32, **QUIET)
    _train(opt, {"p": p}, 2)
    q = torch.nn.Parameter(p.detach().clone())
    other = Lion([q], lr=1e-3, momentum_dtype=torch.float32, **QUIET)
    other.load_state_dict(opt.state_dict())
    assert other.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(other.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_quantization_study_script_runs_and_its_dynamic_map_is_bitsandbytes_shape(capsys) -> None:
    """`benchmarks/int8_quantization.py --smoke` end to end: every format reported, bytes counted from its state."""
    study = benchmark_script("int8_quantization")
    table = study.dynamic_map()
    assert table.shape == (256,) and bool((table.diff() >= 0).all())
    assert table.max() == 1 and -1 < table.min() < -0.99 and 0 in table.tolist() and table.unique().numel() == 256
    results = study.main(["--smoke"])
    printed = capsys.readouterr().out
    assert set(results) == {f.name for f in study.formats()} and all(name in printed for name in results)
    assert results["bf16 (momentum_dtype=torch.bfloat16)"]["bytes_per_element"] == 2
    assert results["linear absmax, block 32, nearest"]["bytes_per_element"] == pytest.approx(1 + 4 / 32)
    for r in results.values():
        assert 0 <= r["signs_differing_percent"] < 50 and 0 <= r["momentum_rel_error"] < 1
