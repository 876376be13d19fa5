"""`DistributedLion` + DCP keeps every replica's momentum: a checkpoint saved at 2 replicas resumes bit for bit.

Replicas hold identical params but momenta of their own. A run of 6 steps saves after 3 with the standard DCP
recipe (`get_state_dict` -> `dcp.save`); fresh processes load it (`get_state_dict` -> `dcp.load` ->
`set_state_dict`) into fresh models and optimizers and run steps 4-6. Their params and each replica's momentum
must equal the uninterrupted run's, bit for bit: for plain tensors voted over the whole world (the DDP form) and
for FSDP2 inside each replica (2 replicas x 2 shards, the two-level form). A checkpoint of 2 replicas loaded by 4
is refused, naming both numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor

from lion_dist.distributed_lion import DistributedLion
from tests.conftest import assert_same
from tests.distributed import spawn
from tests.sharding import GradProbe, exact_grads, fsdp2_probe

pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 6, 3
KWARGS = {"lr": 1e-2, "weight_decay": 0.1, "batch_size_policy": "ignore"}


def _grads(step: int, replica: int) -> list[torch.Tensor]:
    """Each replica's own gradients (different data), the same on every shard of one replica."""
    return [g * (1 + replica) - 0.25 * replica for g in exact_grads(step)]


def _model_and_optimizer(two_level: bool):
    """(model, params, optimizer, replica index): plain tensors voted over the world, or FSDP2 on each replica's
    shard mesh voted over the replicate group."""
    world = dist.get_world_size()
    if not two_level:
        model = GradProbe()
        group = None
        replica = dist.get_rank()
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        model = fsdp2_probe(mesh["shard"])
        group = mesh.get_group("replicate")
        replica = mesh.get_local_rank("replicate")
    params = list(model.parameters())
    return model, params, DistributedLion(params, process_group=group, **KWARGS), replica


def _set_grads(params: list[torch.Tensor], step: int, replica: int) -> None:
    for p, g in zip(params, _grads(step, replica), strict=True):
        sharded = hasattr(p, "placements")
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if sharded else g


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _run(rank: int, world: int, two_level: bool, directory: str, resume: bool) -> dict:
    model, params, opt, replica = _model_and_optimizer(two_level)
    start = 0
    if resume:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        try:
            dcp.load(state, checkpoint_id=directory)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except BaseException as error:  # DCP's CheckpointException is a BaseException; the refusal is the result
            saved = opt.state_dict()
            two = {**saved, "param_groups": [{**g, "replicas": 2} for g in saved["param_groups"]]}
            try:
                opt.load_state_dict(two)  # a stacked state dict of 2 replicas, loaded without DCP
            except ValueError as ours:
                return {"dcp_error": str(error), "error": str(ours)}
            return {"dcp_error": str(error), "error": "loaded"}
        start = SAVE_AT
    for step in range(start, STEPS):
        _set_grads(params, step, replica)
        opt.step()
        if step + 1 == SAVE_AT and not resume:
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    return {
        "params": [_local(p) for p in params],
        "momenta": [_local(opt.state[p]["exp_avg"]) for p in params],
        "step": opt.param_groups[0]["step"],
    }


@pytest.mark.parametrize("two_level", [False, True], ids=["replicas", "replicas-x-fsdp2"])
def test_dcp_keeps_every_replicas_momentum_and_resumes_bit_for_bit(two_level: bool, tmp_path) -> None:
    world = 4 if two_level else 2
    uninterrupted = spawn(_run, world, two_level, str(tmp_path / "ckpt"), False)
    resumed = spawn(_run, world, two_level, str(tmp_path / "ckpt"), True)
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert after["step"] == STEPS
        assert_same(after["params"] + after["momenta"], before["params"] + before["momenta"])
    # the momenta really differ between replicas (else one replica's would do), the params do not
    first, other = uninterrupted[0], uninterrupted[2 if two_level else 1]
    assert not all(torch.equal(a, b) for a, b in zip(first["momenta"], other["momenta"], strict=True))
    assert_same(first["params"], other["params"])


def test_another_number_of_replicas_is_refused_by_name(tmp_path) -> None:
    """DCP itself refuses the stacked momenta's shapes; a stacked state dict loaded directly is refused by name."""
    spawn(_run, 2, False, str(tmp_path / "ckpt"), False)
    results = spawn(_run, 4, False, str(tmp_path / "ckpt"), True)
    for result in results:
        assert "Size mismatch between saved torch.Size([2, 5, 3]) and current: torch.Size([4, 5, 3])" in result[
            "dcp_error"
        ], result["dcp_error"][-500:]
        assert "momenta of [2] replicas" in result["error"] and "has 4" in result["error"], result["error"]
