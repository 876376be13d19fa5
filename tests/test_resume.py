"""Resume across world sizes with `torch.distributed.checkpoint` (DCP): a sharded save of model + Lion at world 2.

One run at world 2 trains `STEPS // 2` steps, saves (FSDP2, and FSDP1 with flat params), and runs on to
`STEPS` (the uninterrupted run). Fresh processes then load the checkpoint into fresh models and optimizers:
- world 2 (FSDP2 and FSDP1): the continued run equals the uninterrupted one, bit for bit;
- world 1 (FSDP2 on a 1-rank mesh, and a plain unwrapped model from both checkpoints) and world 4 (FSDP2):
  params and momentum after loading equal the saved full tensors, and with the same gradients the next
  steps equal the uninterrupted run (Lion is element-wise: resharding changes nothing).
DeepSpeed's own checkpoint format is tested in `test_zero.py` (same spawn as the other ZeRO checks).

The recipe is the standard one (no lion_dist helper needed), because Lion's momentum for a DTensor param
is a DTensor on the param's mesh: `get_state_dict` -> `dcp.save`; to resume, `get_state_dict` ->
`dcp.load` -> `set_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lion_dist import Lion
from tests.distributed import spawn
from tests.sharding import (
    CONFIGS,
    LR,
    QUIET,
    SHAPES,
    STEPS,
    Block,
    GradProbe,
    exact_grads,
    fsdp2_probe,
    reference_run,
    step_with_dtensor_grads,
)

pytestmark = pytest.mark.slow
CONFIG = CONFIGS["decoupled"]  # weight decay relative to the initial lr: lr0 must survive the checkpoint too
HALF = STEPS // 2
FULL = StateDictOptions(full_state_dict=True)


def save(model: nn.Module, opt: Lion, path: str) -> None:
    """What a user writes to save model + Lion, sharded: every rank writes its own shards."""
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


def load(model: nn.Module, opt: Lion, path: str) -> None:
    """What a user writes to resume, at any world size: DCP reshards on load."""
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state(model: nn.Module, opt: Lion) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Full params and momentum in `SHAPES` order (gathered if sharded), and the group's step counter."""
    params = get_model_state_dict(model, options=FULL)
    optim = get_optimizer_state_dict(model, opt, options=FULL)
    names = sorted(params)  # blocks.0.leaves.0 ... blocks.1.leaves.1: `SHAPES` order
    # Copies: on one rank (or unwrapped) these are the live tensors themselves.
    return (
        [params[n].clone() for n in names],
        [optim["state"][n]["exp_avg"].clone() for n in names],
        opt.param_groups[0]["step"],
    )


def fsdp1_probe(values: list[torch.Tensor] | None = None) -> FSDP:
    """FSDP1 built on a device mesh, so its sharded state dicts hold DTensors.

    Built on a process group instead, FSDP1 uses ShardedTensors, and a rank that holds no rows of a
    param (here (1, 4) and (1,) on rank 1) has no entry for it; DCP's load then takes the checkpoint for
    an old-format one and fails with "Missing key in checkpoint state_dict: optim.param_groups" (torch
    2.13, with torch.optim.AdamW as well). With a mesh every rank has every key.
    """
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return FSDP(
        GradProbe(values), auto_wrap_policy=ModuleWrapPolicy({Block}), device_mesh=mesh, device_id=torch.device("cpu")
    )


def train_fsdp1(model: FSDP, opt: Lion, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        model(exact_grads(step)).backward()
        opt.step()
        opt.zero_grad()


def train_plain(params: list[torch.Tensor], opt: Lion, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        for p, g in zip(params, exact_grads(step), strict=True):
            p.grad = g
        opt.step()


def zeros() -> list[torch.Tensor]:
    """Initial values for the resumed models: loading must overwrite every element."""
    return [torch.zeros(shape) for shape in SHAPES]


def _save_world2(rank: int, world: int, directory: str) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    model = fsdp2_probe(mesh)
    params = list(model.parameters())
    opt = Lion(params, lr=LR, **QUIET, **CONFIG)
    step_with_dtensor_grads(params, opt, HALF)
    save(model, opt, f"{directory}/fsdp2")
    out = {"fsdp2_saved": full_state(model, opt)}
    step_with_dtensor_grads(params, opt, STEPS - HALF, start=HALF)
    out["fsdp2_uninterrupted"] = full_state(model, opt)

    model = fsdp1_probe()
    opt = Lion(model.parameters(), lr=LR, **QUIET, **CONFIG)
    train_fsdp1(model, opt, 0, HALF)
    save(model, opt, f"{directory}/fsdp1")
    train_fsdp1(model, opt, HALF, STEPS - HALF)
    out["fsdp1_uninterrupted"] = full_state(model, opt)
    out["fsdp1_uninterrupted_local"] = [(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in opt.state]
    return out


def _resume_fsdp2(rank: int, world: int, directory: str) -> dict:
    """Load the world-2 FSDP2 checkpoint at this world size, then run the remaining steps."""
    mesh = init_device_mesh("cpu", (world,))
    model = fsdp2_probe(mesh)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    params = list(model.parameters())
    opt = Lion(params, lr=LR, **QUIET, **CONFIG)
    load(model, opt, f"{directory}/fsdp2")
    out = {"loaded": full_state(model, opt)}
    local_numel = sum(p.to_local().numel() for p in params)
    out["state_bytes"] = (opt.state_bytes(), local_numel)
    step_with_dtensor_grads(params, opt, STEPS - HALF, start=HALF)
    out["resumed"] = full_state(model, opt)
    return out


def _resume_world2(rank: int, world: int, directory: str) -> dict:
    out = _resume_fsdp2(rank, world, directory)
    model = fsdp1_probe(zeros())
    opt = Lion(model.parameters(), lr=LR, **QUIET, **CONFIG)
    load(model, opt, f"{directory}/fsdp1")
    out["fsdp1_loaded"] = full_state(model, opt)
    train_fsdp1(model, opt, HALF, STEPS - HALF)
    out["fsdp1_resumed_local"] = [(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in opt.state]
    return out


def _resume_world1(rank: int, world: int, directory: str) -> dict:
    out = _resume_fsdp2(rank, world, directory)
    for name in ("fsdp2", "fsdp1"):  # into a plain, unwrapped model: sharded DTensors load as full tensors
        model = GradProbe(zeros())
        params = list(model.parameters())
        opt = Lion(params, lr=LR, **QUIET, **CONFIG)
        load(model, opt, f"{directory}/{name}")
        out[f"plain_from_{name}_loaded"] = full_state(model, opt)
        train_plain(params, opt, HALF, STEPS - HALF)
        out[f"plain_from_{name}_resumed"] = full_state(model, opt)
    return out


def assert_state_equal(got: tuple, expected: tuple) -> None:
    (params, moms, step), (ref_params, ref_moms, ref_step) = got, expected
    assert step == ref_step
    for p, m, ref_p, ref_m in zip(params, moms, ref_params, ref_moms, strict=True):
        assert torch.equal(p, ref_p)
        assert torch.equal(m, ref_m)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, list[dict]]:
    directory = str(tmp_path_factory.mktemp("dcp"))
    return directory, spawn(_save_world2, 2, directory)


def expected(steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    return (*reference_run(CONFIG, steps=steps), steps)


def test_saved_and_uninterrupted_runs_are_the_unsharded_run(checkpoint) -> None:
    directory, results = checkpoint
    assert {p.name for p in Path(directory).iterdir()} == {"fsdp1", "fsdp2"}
    for result in results:
        assert_state_equal(result["fsdp2_saved"], expected(HALF))
        assert_state_equal(result["fsdp2_uninterrupted"], expected(STEPS))
        assert_state_equal(result["fsdp1_uninterrupted"], expected(STEPS))


def test_resume_at_world_2_continues_bit_for_bit(checkpoint) -> None:
    """FSDP2 and FSDP1: after loading, the remaining steps give exactly the uninterrupted run's shards."""
    directory, saved = checkpoint
    for result, before in zip(spawn(_resume_world2, 2, directory), saved, strict=True):
        assert_state_equal(result["loaded"], before["fsdp2_saved"])
        assert_state_equal(result["resumed"], before["fsdp2_uninterrupted"])
        assert_state_equal(result["fsdp1_loaded"], expected(HALF))
        for (p, m), (ref_p, ref_m) in zip(
            result["fsdp1_resumed_local"], before["fsdp1_uninterrupted_local"], strict=True
        ):
            assert torch.equal(p, ref_p) and torch.equal(m, ref_m)


def test_resume_at_world_1(checkpoint) -> None:
    """A 1-rank FSDP2 mesh, and a plain model loading the FSDP2 and the FSDP1 checkpoints."""
    directory, saved = checkpoint
    (result,) = spawn(_resume_world1, 1, directory)
    assert_state_equal(result["loaded"], saved[0]["fsdp2_saved"])
    assert_state_equal(result["resumed"], saved[0]["fsdp2_uninterrupted"])
    for name in ("fsdp2", "fsdp1"):
        assert_state_equal(result[f"plain_from_{name}_loaded"], expected(HALF))
        assert_state_equal(result[f"plain_from_{name}_resumed"], saved[0][f"{name}_uninterrupted"])
    state_bytes, local_numel = result["state_bytes"]
    assert state_bytes == local_numel * 4 == sum(torch.Size(s).numel() for s in SHAPES) * 4


def test_resume_at_world_4(checkpoint) -> None:
    directory, saved = checkpoint
    results = spawn(_resume_fsdp2, 4, directory)
    for result in results:
        assert_state_equal(result["loaded"], saved[0]["fsdp2_saved"])
        assert_state_equal(result["resumed"], saved[0]["fsdp2_uninterrupted"])
        state_bytes, local_numel = result["state_bytes"]
        assert state_bytes == local_numel * 4
    assert sum(r["state_bytes"][0] for r in results) == sum(torch.Size(s).numel() for s in SHAPES) * 4
