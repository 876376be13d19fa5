"""Lion under FSDP2 (`fully_shard`, DTensor params): each rank's shard equals its slice of the unsharded step.

Two multi-process runs feed every test here: world 2 (Shard(0) with uneven and empty shards, CPU offload,
full state dicts, end-to-end training) and world 4 (HSDP 2x2, a 2-D (Shard, Shard) layout as tensor
parallelism makes, and state bytes at shard world 1, 2 and 4).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.nn import Parameter

from lion_dist import Lion
from tests.distributed import spawn
from tests.sharding import (
    CAUTIOUS_CONFIGS,
    CONFIGS,
    E2E_LR,
    E2E_STEPS,
    LR,
    QUIET,
    SHAPES,
    STEPS,
    bitwise_mismatches,
    dtensor_pairs,
    e2e_distance,
    e2e_loss,
    e2e_model,
    e2e_rank_batch,
    fsdp2_probe,
    initial_values,
    reference_run,
    step_with_dtensor_grads,
)

pytestmark = pytest.mark.slow


def _world2(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    out: dict = {"pairs": {}}
    for name, config in {**CONFIGS, **CAUTIOUS_CONFIGS}.items():
        model = fsdp2_probe(mesh)
        params = list(model.parameters())
        opt = Lion(params, lr=LR, **QUIET, **config)
        step_with_dtensor_grads(params, opt, STEPS)
        out["pairs"].update(dtensor_pairs(name, params, opt, *reference_run(config)))
        if name == "decay":
            full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            names = [n for n, _ in model.named_parameters()]
            out["full_momentum"] = [full["state"][n]["exp_avg"] for n in names]
            out["local_numels"] = [p.to_local().numel() for p in params]
            out["state_bytes"] = opt.state_bytes()

    # DCP creates missing state with a zero-gradient, lr=0 step: it must leave params and the step count alone.
    model = fsdp2_probe(mesh)
    params = list(model.parameters())
    opt = Lion(params, lr=LR, **QUIET, **CONFIGS["decoupled"])
    before = [p.to_local().clone() for p in params]
    get_optimizer_state_dict(model, opt)
    out["dcp_init"] = (
        all(torch.equal(p.to_local(), b) for p, b in zip(params, before, strict=True)),
        opt.param_groups[0]["step"],
        sorted({opt.state[p]["exp_avg"].to_local().abs().sum().item() for p in params}),
    )

    # CPU offload: on this CPU-only machine the mesh is on CPU too, so only pin_memory=False can run
    # (pin_memory needs an accelerator); the step runs on the offloaded CPU DTensors either way.
    model = fsdp2_probe(mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    params = list(model.parameters())
    opt = Lion(params, lr=LR, **QUIET, **CONFIGS["decay"])
    step_with_dtensor_grads(params, opt, STEPS)
    out["pairs"].update(dtensor_pairs("offload", params, opt, *reference_run(CONFIGS["decay"])))
    out["offload_devices"] = {t.device.type for p in params for t in (p, p.grad, opt.state[p]["exp_avg"])}

    # A gradient not laid out like its param is refused, naming the fix, before anything is written.
    model = fsdp2_probe(mesh)
    param = next(model.parameters())
    opt = Lion([param], lr=LR, **QUIET)
    before = param.to_local().clone()
    out["bad_grad_errors"] = []
    for grad in (distribute_tensor(torch.ones(param.shape), mesh, [Replicate()]), torch.ones(param.shape)):
        param.grad = grad
        try:
            opt.step()
        except ValueError as e:
            out["bad_grad_errors"].append(str(e))
    out["bad_grad_unchanged"] = torch.equal(param.to_local(), before)

    model = e2e_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = Lion(model.parameters(), lr=E2E_LR, **QUIET)
    losses = []
    for step in range(E2E_STEPS):
        loss = e2e_loss(model, *e2e_rank_batch(step, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        dist.all_reduce(loss := loss.detach())
        losses.append(loss.item() / world)
    out["e2e"] = (losses, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    return out


def _world4(rank: int, world: int) -> dict:
    out: dict = {"pairs": {}, "memory": {}}
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for name in ("decay", "cautious"):
        config = {**CONFIGS, **CAUTIOUS_CONFIGS}[name]
        model = fsdp2_probe(hsdp)
        params = list(model.parameters())
        opt = Lion(params, lr=LR, **QUIET, **config)
        step_with_dtensor_grads(params, opt, STEPS)
        out["pairs"].update(dtensor_pairs(f"hsdp/{name}", params, opt, *reference_run(config)))
        out["hsdp_placements"] = {str(p.placements) for p in params}

    # bf16 params with stochastic rounding: the two replicas of each shard must round identically, which
    # needs the same `seed` on every rank (the default, 0, is; an explicit one must be too).
    model = fsdp2_probe(hsdp).to(torch.bfloat16)
    params = list(model.parameters())
    opt = Lion(params, lr=LR, stochastic_rounding=True, seed=1234, **QUIET)
    start = [p.to_local().clone() for p in params]
    step_with_dtensor_grads(params, opt, STEPS)
    out["sr_locals"] = [p.to_local().clone() for p in params]
    out["sr_moved"] = any(not torch.equal(p.to_local(), s) for p, s in zip(params, start, strict=True))

    # Tensor parallelism shards a second dim: (Shard(0), Shard(1)) for matrices, (Shard(0), Shard(0)) for vectors.
    for name in ("plain", "cautious_wd"):
        config = {**CONFIGS, **CAUTIOUS_CONFIGS}[name]
        params = [
            Parameter(distribute_tensor(v, hsdp, (Shard(0), Shard(v.dim() - 1)), src_data_rank=None))
            for v in initial_values()
        ]
        opt = Lion(params, lr=LR, **QUIET, **config)
        step_with_dtensor_grads(params, opt, STEPS)
        out["pairs"].update(dtensor_pairs(f"2d/{name}", params, opt, *reference_run(config)))

    for shard_world in (1, 2, 4):
        mesh = init_device_mesh("cpu", (world // shard_world, shard_world), mesh_dim_names=("replicate", "shard"))
        for momentum_dtype in (torch.float32, torch.bfloat16):
            model = e2e_model()
            fully_shard(model, mesh=mesh["shard"])
            opt = Lion(model.parameters(), lr=E2E_LR, momentum_dtype=momentum_dtype, **QUIET)
            e2e_loss(model, *e2e_rank_batch(0, rank, world)).backward()
            opt.step()
            local_numel = sum(p.to_local().numel() for p in model.parameters())
            out["memory"][shard_world, momentum_dtype] = (opt.state_bytes(), local_numel)
    return out


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return spawn(_world2, 2)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return spawn(_world4, 4)


def test_shard0_with_uneven_and_empty_shards_equals_unsharded_bit_for_bit(world2) -> None:
    """Plain, weight decay, decoupled decay and both cautious forms, STEPS steps, every rank's shard."""
    assert STEPS >= 10
    for result in world2:
        assert bitwise_mismatches(result["pairs"]) == []
    # The layout really has uneven and empty shards: (5, 3) splits 3 + 2 rows, (1, 4) and (1,) are empty on rank 1.
    assert world2[0]["local_numels"] == [9, 2, 4, 1, 8]
    assert world2[1]["local_numels"] == [6, 1, 0, 0, 6]


def test_full_state_dict_momentum_is_the_unsharded_momentum(world2) -> None:
    _, ref_moms = reference_run(CONFIGS["decay"])
    for result in world2:
        for got, expected in zip(result["full_momentum"], ref_moms, strict=True):
            assert got.shape == expected.shape
            assert torch.equal(got, expected)


def test_state_bytes_is_local_numel_times_itemsize(world2) -> None:
    full_numel = sum(torch.Size(s).numel() for s in SHAPES)
    for result in world2:
        assert result["state_bytes"] == sum(result["local_numels"]) * 4
    assert sum(result["state_bytes"] for result in world2) == full_numel * 4


def test_dcp_state_initialisation_changes_nothing(world2) -> None:
    for result in world2:
        assert result["dcp_init"] == (True, 0, [0.0])


def test_cpu_offload_policy_steps_on_cpu_shards_bit_for_bit(world2) -> None:
    for result in world2:
        assert result["offload_devices"] == {"cpu"}
        assert any(name.startswith("offload/") for name in result["pairs"])


def test_gradient_laid_out_unlike_its_param_is_refused(world2) -> None:
    for result in world2:
        replicated, plain = result["bad_grad_errors"]
        assert "Replicate()" in replicated and "redistribute" in replicated
        assert "plain tensor" in plain and "distribute_tensor" in plain
        assert result["bad_grad_unchanged"]


def test_end_to_end_tracks_the_unsharded_run(world2) -> None:
    """Real backward and reduce-scatter: the gradient is the same mean, summed in another order, so it
    differs by float rounding; Lion's sign() turns that into +-lr only where the momentum is near zero."""
    losses, params = world2[0]["e2e"]
    assert world2[1]["e2e"][0] == losses
    distance = e2e_distance(losses, params)
    assert distance["loss_rel"] < 1e-5, distance
    assert distance["param_frac"] < 0.01, distance


def test_hsdp_2x2_equals_unsharded_bit_for_bit(world4) -> None:
    """Replicate x Shard: the cautious count is summed over the shard dim only (replicas are copies)."""
    for result in world4:
        assert result["hsdp_placements"] == {"(Replicate(), Shard(dim=0))"}
        assert bitwise_mismatches({k: v for k, v in result["pairs"].items() if k.startswith("hsdp/")}) == []


def test_hsdp_replicas_stay_identical_with_stochastic_rounding(world4) -> None:
    """Mesh [[0, 1], [2, 3]]: ranks 0 and 2 hold the same shard, as do 1 and 3."""
    for a, b in ((0, 2), (1, 3)):
        assert world4[a]["sr_moved"]
        for x, y in zip(world4[a]["sr_locals"], world4[b]["sr_locals"], strict=True):
            assert x.dtype == torch.bfloat16 and torch.equal(x, y)


def test_two_dim_sharding_equals_unsharded_bit_for_bit(world4) -> None:
    for result in world4:
        assert bitwise_mismatches({k: v for k, v in result["pairs"].items() if k.startswith("2d/")}) == []


def test_state_bytes_scale_as_one_over_shard_world(world4) -> None:
    """Per rank: local numel x itemsize; over a shard group: the full numel (FSDP2 keeps no padding in state)."""
    full_numel = sum(p.numel() for p in e2e_model().parameters())
    for momentum_dtype, itemsize in ((torch.float32, 4), (torch.bfloat16, 2)):
        for shard_world in (1, 2, 4):
            per_rank = [result["memory"][shard_world, momentum_dtype] for result in world4]
            for state_bytes, local_numel in per_rank:
                assert state_bytes == local_numel * itemsize
                # torch.chunk layout: at most one extra row per param (two params have 32 and 3 rows).
                assert state_bytes <= (full_numel / shard_world + 8 + 32 + 1) * itemsize
            group = per_rank[:shard_world]  # ranks 0 .. shard_world-1 form one shard group
            assert sum(b for b, _ in group) == full_numel * itemsize
