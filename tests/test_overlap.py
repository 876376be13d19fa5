"""Distributed Lion with votes that start during backward (`overlap_bucket_elements`) equals the one-collective
exchange bit for bit, and really starts them before `step()`.

The main job's GPT, sharded with FSDP2 inside each replica: 2 replicas x 1 shard (world 2) and 2 replicas x 2
shards (world 4), trained a few steps on each replica's own batches, with and without overlap.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lion_dist.distributed_lion import DistributedLion
from tests.conftest import assert_same
from tests.distributed import spawn
from tests.sharding import LR, exact_grads, fsdp2_probe
from tests.test_distributed_lion import lm_loss, markov_batch, tiny_gpt

pytestmark = pytest.mark.slow
STEPS = 3


def _two_level(world: int, shards: int, bucket: int | None):
    """The main job's GPT sharded with FSDP2 inside each replica, and Distributed Lion over the replicas."""
    mesh = init_device_mesh("cpu", (world // shards, shards), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = tiny_gpt()
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = DistributedLion(
        model.parameters(),
        lr=3e-3,
        weight_decay=0.1,
        process_group=mesh.get_group("replicate"),
        overlap_bucket_elements=bucket,
        batch_size_policy="ignore",
    )
    return mesh, model, opt


def _train(rank: int, world: int, shards: int, bucket: int | None) -> dict:
    from lion_dist.backends.cpu import BACKEND as cpu_fused

    mesh, model, opt = _two_level(world, shards, bucket)
    in_step, launched_in_backward, fused_in_backward = [False], [0], [0]
    opt.register_step_pre_hook(lambda *a: in_step.__setitem__(0, True))
    opt.register_step_post_hook(lambda *a: in_step.__setitem__(0, False))
    launch, direction = opt.vote.launch, cpu_fused.direction

    def counted(bits):
        launched_in_backward[0] += not in_step[0]
        return launch(bits)

    def fused(*args):  # the overlap takes its directions from the backend step() uses: the fused C kernel here
        fused_in_backward[0] += not in_step[0]
        return direction(*args)

    cpu_fused.direction = fused

    opt.vote.launch = counted
    if opt.vote.overlap is not None:
        opt.vote.overlap.launch = counted
    replica = mesh.get_local_rank("replicate")
    for step in range(STEPS):
        opt.zero_grad()
        lm_loss(model, markov_batch(1000 * step + replica)).backward()
        opt.step()
    params = [p.to_local().detach().clone() for p in model.parameters()]
    momenta = [opt.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
    dist.barrier()
    return {
        "params": params,
        "momenta": momenta,
        "launched_in_backward": launched_in_backward[0],
        "fused_in_backward": fused_in_backward[0],
    }


@pytest.mark.parametrize("world, shards", [(2, 1), (4, 2)], ids=["2x1", "2x2"])
def test_overlapped_votes_equal_the_one_collective_exchange(world: int, shards: int) -> None:
    plain = spawn(_train, world, shards, None)
    overlapped = spawn(_train, world, shards, 2048)
    for a, b in zip(plain, overlapped, strict=True):
        assert_same(b["params"] + b["momenta"], a["params"] + a["momenta"])
        assert a["launched_in_backward"] == 0 and b["launched_in_backward"] >= STEPS * 2, b["launched_in_backward"]
        assert a["fused_in_backward"] == 0 and b["fused_in_backward"] >= STEPS * len(b["params"]) // 2
    for r in range(world):  # replicas end with identical params, shard by shard
        assert_same(overlapped[r]["params"], overlapped[(r + shards) % world]["params"])


def _probe(rank: int, world: int, bucket: int | None) -> tuple[list[torch.Tensor], bool]:
    """`tests.sharding`'s GradProbe, 2 replicas x 2 FSDP2 shards: uneven shards, and empty ones (its (1, 4) and (1,)
    params), each replica with gradients of its own."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = fsdp2_probe(mesh["shard"])
    opt = DistributedLion(
        model.parameters(),
        lr=LR,
        process_group=mesh.get_group("replicate"),
        overlap_bucket_elements=bucket,
        batch_size_policy="ignore",
    )
    replica = mesh.get_local_rank("replicate")
    for step in range(STEPS):
        opt.zero_grad()
        model(exact_grads(step + 100 * replica)).backward()
        opt.step()
    params = list(model.parameters())
    local = [p.to_local().detach().clone() for p in params] + [opt.state[p]["exp_avg"].to_local() for p in params]
    return local, any(p.to_local().numel() == 0 for p in params)


def test_overlapped_votes_with_uneven_and_empty_shards() -> None:
    plain, overlapped = spawn(_probe, 4, None), spawn(_probe, 4, 4)
    assert any(empty for _, empty in overlapped)  # some rank holds an empty shard
    for (a, _), (b, _) in zip(plain, overlapped, strict=True):
        assert_same(b, a)


def _resume(rank: int, world: int, directory: str, resume: bool) -> list[torch.Tensor]:
    """2 steps, a DCP checkpoint, 2 more; or a fresh run loading that checkpoint and running the last 2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _, model, opt = _two_level(world, 1, 2048)
    start = 0
    if resume:  # the load replaces the param group dicts and calls __setstate__: the hooks must follow
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = 2
    for step in range(start, 4):
        opt.zero_grad()
        lm_loss(model, markov_batch(1000 * step + rank)).backward()
        opt.step()
        if step == 1 and not resume:
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    return [p.to_local().detach().clone() for p in model.parameters()] + [
        opt.state[p]["exp_avg"].to_local().clone() for p in model.parameters()
    ]


def test_overlapped_votes_resume_bit_for_bit(tmp_path) -> None:
    uninterrupted = spawn(_resume, 2, str(tmp_path / "ckpt"), False)
    resumed = spawn(_resume, 2, str(tmp_path / "ckpt"), True)
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert_same(b, a)
