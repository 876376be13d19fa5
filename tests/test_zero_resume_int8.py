"""`to_universal` with int8 momentum and with Kahan compensation: saved under ZeRO at 2 ranks, resumed at 1.

int8 (ZeRO 1 and 2): each rank's optimizer param is one flat fp32 partition, whose int8 momentum has one scale
per 128 elements of that partition, so it cannot be cut per param. `to_universal` dequantizes each rank's codes
(`spec.dequantize_momentum`) into an fp32 `exp_avg` per param; the world-1 engine loads exactly that, and at its
first step Lion quantizes it over the one new partition. The expected run is computed here from the saved
ranks' own state with the spec functions: dequantize each rank's partition, lay the params out as the world-1
partition, quantize (`spec.quantize_momentum`, rounding to nearest, as `formats.conform` does), then step a
plain single-process Lion from those codes with the same gradients. Partitions of >= 4096 elements (world 2:
about 5,600 each) are quantized; their block boundaries differ between world 2 and world 1.

Compensation (ZeRO 2 with `bf16_master_weights_and_grads` + `bf16_optimizer_states`, the one DeepSpeed setting
where Lion's partitions are bf16 and keep a Kahan buffer): element-wise, so it reshards exactly, and the resumed
run equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lion_dist import Lion, spec
from lion_dist.deepspeed import to_universal
from tests.distributed import spawn
from tests.sharding import LR, QUIET, GradProbe, exact_grads, initial_values
from tests.test_zero import DS_ENV, _full, ds_config

pytestmark = pytest.mark.slow
SHAPES = ((40, 150), (3000,), (7, 300), (5,), (3, 11))  # 11,138 elements, in GradProbe's 5 slots
INT8 = {"momentum_dtype": "int8", "weight_decay": 0.1, "int8_block_size": 128}
HALF, STEPS = 3, 6
STAGES = (1, 2)
BF16_MASTER = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def _train(engine, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        engine.backward(engine(exact_grads(step, SHAPES)))
        engine.step()


def _engine(config: dict, model: torch.nn.Module, **lion_kwargs):
    import deepspeed

    opt = Lion(model.parameters(), lr=LR, **QUIET, **lion_kwargs)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def _compensated_config(**extra) -> dict:
    return {**ds_config(2), "bf16": BF16_MASTER, **extra}


def _bf16_model(values: list[torch.Tensor] | None = None) -> GradProbe:
    return GradProbe(initial_values(SHAPES) if values is None else values).bfloat16()


def _save(rank: int, world: int, directory: str) -> dict:
    """Train HALF steps, save; return each param's fragment on this rank: (start in the param, fp32 values, the
    momentum dequantized from this rank's codes and scales)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out: dict = {}
    for stage in STAGES:
        engine, opt = _engine(ds_config(stage), GradProbe(initial_values(SHAPES)), **INT8)
        _train(engine, 0, HALF)
        engine.save_checkpoint(f"{directory}/int8_zero{stage}", tag="half")
        (partition,) = engine.optimizer.single_partition_of_fp32_groups
        state = opt.state[partition]
        momentum = spec.dequantize_momentum(state["exp_avg"], state["exp_avg_scale"], INT8["int8_block_size"])
        fragments = []  # per param: None where the other rank holds all of it
        for p in engine.module.parameters():
            if p._hp_mapping is None:
                fragments.append(None)
                continue
            lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.hp_fragment_address
            values = partition.detach()[hp.start : hp.start + hp.numel].clone()
            fragments.append((lp.start, values, momentum[hp.start : hp.start + hp.numel]))
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        out[stage] = {
            "fragments": fragments,
            "group": group,
            "codes": state["exp_avg"].dtype,
            "numel": partition.numel(),
        }

    engine, _ = _engine(_compensated_config(), _bf16_model(), compensation=True)
    _train(engine, 0, HALF)
    engine.save_checkpoint(f"{directory}/compensated", tag="half")
    _train(engine, HALF, STEPS - HALF)
    out["compensated"] = _full(engine)
    return out


def _resume(rank: int, world: int, directory: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    universal = {"checkpoint": {"load_universal": True}}
    out: dict = {}
    for stage in STAGES:
        zeros = [torch.zeros(s) for s in SHAPES]
        engine, opt = _engine({**ds_config(stage), **universal}, GradProbe(zeros), **INT8)
        engine.load_checkpoint(f"{directory}/int8_zero{stage}")
        (partition,) = engine.optimizer.single_partition_of_fp32_groups
        layout = [(p._hp_mapping.hp_fragment_address.start, p.numel()) for p in engine.module.parameters()]
        loaded = {k: v.clone() for k, v in opt.state[partition].items()}
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        param = partition.detach().clone()
        _train(engine, HALF, STEPS - HALF)
        state = opt.state[partition]
        out[stage] = {
            "layout": layout,
            "loaded": (param, loaded, group),
            "resumed": (partition.detach().clone(), state["exp_avg"].clone(), state["exp_avg_scale"].clone()),
        }

    model = _bf16_model([torch.zeros(s) for s in SHAPES])
    engine, opt = _engine(_compensated_config(**universal), model, compensation=True)
    engine.load_checkpoint(f"{directory}/compensated")
    (partition,) = engine.optimizer.single_partition_of_fp32_groups
    out["compensation_loaded"] = opt.state[partition]["compensation"].abs().sum().item()
    _train(engine, HALF, STEPS - HALF)
    out["compensated"] = _full(engine)
    out["world"] = dist.get_world_size()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict]:
    directory = tmp_path_factory.mktemp("zero_resume_int8")
    saved = spawn(_save, 2, str(directory), env=DS_ENV)
    for name in ("int8_zero1", "int8_zero2", "compensated"):
        to_universal(directory / name / "half")
    (resumed,) = spawn(_resume, 1, str(directory), env=DS_ENV)
    return saved, resumed


def _flat(layout: list[tuple[int, int]], numel: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    """`tensors` (one per param) laid out as the world-1 partition: each at its start, zeros elsewhere."""
    flat = torch.zeros(numel)
    for (start, n), t in zip(layout, tensors, strict=True):
        flat[start : start + n] = t.flatten()
    return flat


def _full_tensors(saved: list[dict], stage: int, index: int) -> list[torch.Tensor]:
    """Each param's full fp32 values (index 1) or dequantized momentum (index 2), from both ranks' fragments."""
    full = [torch.full((torch.Size(s).numel(),), float("nan")) for s in SHAPES]
    for rank in saved:
        for i, fragment in enumerate(rank[stage]["fragments"]):
            if fragment is None:
                continue
            start, values = fragment[0], fragment[index]
            full[i][start : start + values.numel()] = values
    return full


@pytest.mark.parametrize("stage", STAGES)
def test_int8_momentum_is_dequantized_then_requantized_over_the_new_partition(runs, stage: int) -> None:
    saved, resumed = runs
    assert all(rank[stage]["codes"] == torch.int8 and rank[stage]["numel"] >= 4096 for rank in saved)
    layout = resumed[stage]["layout"]
    param, loaded, group = resumed[stage]["loaded"]
    numel = param.numel()
    expected_param = _flat(layout, numel, _full_tensors(saved, stage, 1))
    expected_momentum = _flat(layout, numel, _full_tensors(saved, stage, 2))
    assert not expected_param.isnan().any() and not expected_momentum.isnan().any()  # both ranks covered all
    assert torch.equal(param, expected_param)
    assert set(loaded) == {"exp_avg"} and loaded["exp_avg"].dtype == torch.float32
    assert torch.equal(loaded["exp_avg"], expected_momentum)
    assert group == saved[0][stage]["group"] and group["momentum_dtype"] == torch.int8 and group["step"] == HALF

    block = INT8["int8_block_size"]
    codes, scales = spec.quantize_momentum(expected_momentum, block)  # what conform does at the first step
    flat = expected_param.clone()
    reference = Lion([flat], lr=LR, **QUIET, **INT8)
    reference.load_state_dict(
        {"state": {0: {"exp_avg": codes, "exp_avg_scale": scales}}, "param_groups": [{**group, "params": [0]}]}
    )
    for step in range(HALF, STEPS):
        flat.grad = _flat(layout, numel, exact_grads(step, SHAPES))
        reference.step()
    got_param, got_codes, got_scales = resumed[stage]["resumed"]
    state = reference.state[flat]
    assert torch.equal(got_param, flat)
    assert torch.equal(got_codes, state["exp_avg"]) and torch.equal(got_scales, state["exp_avg_scale"])


def test_compensation_reshards_exactly(runs) -> None:
    saved, resumed = runs
    assert resumed["world"] == 1 and resumed["compensation_loaded"] > 0
    for (param, momentum), (ref_param, ref_momentum) in zip(
        resumed["compensated"], saved[0]["compensated"], strict=True
    ):
        assert torch.equal(param, ref_param) and torch.equal(momentum, ref_momentum)
