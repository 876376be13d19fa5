"""The batch guard: Lion wants an effective batch of at least 64 (Chen et al. 2023).

In-process tests cover the threshold, the once-per-process warning, the policies and the arithmetic; one
2-rank run covers rank-0-only warnings, "error" on every rank, and the data-parallel size taken from the
default group, an FSDP2 mesh, HSDP meshes and a mesh with a tensor-parallel dim. DeepSpeed's arithmetic
(train_batch_size) is tested with the DeepSpeed entry in test_deepspeed_entry.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import lion_dist
from lion_dist import Lion, SmallBatchWarning, batch_guard
from lion_dist.layouts import data_parallel_size as infer_data_parallel_size
from tests.distributed import spawn


@pytest.fixture(autouse=True)
def fresh_process_state() -> None:
    """The warning is once per process; each test starts as a fresh process would."""
    batch_guard._warned_this_process.clear()


def step_once(**guard_kwargs) -> list[warnings.WarningMessage]:
    """One Lion step on a tiny model; the SmallBatchWarnings it emitted."""
    model = torch.nn.Linear(3, 2)
    opt = Lion(model.parameters(), **guard_kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()  # the guard looks only at the first step
    return [w for w in caught if issubclass(w.category, SmallBatchWarning)]


def test_warns_below_the_minimum_naming_the_numbers_and_the_fix() -> None:
    caught = step_once(micro_batch_size=9, grad_accum_steps=7)  # 63, one process
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "effective batch is 63" in message
    assert "micro batch 9 x grad accumulation 7 x data-parallel size 1" in message
    assert "minimum of 64" in message
    assert "batch_size_policy='ignore'" in message


@pytest.mark.parametrize("kwargs", [{"global_batch_size": 64}, {"global_batch_size": 4096}, {"micro_batch_size": 64}])
def test_quiet_at_and_above_the_minimum(kwargs: dict) -> None:
    assert step_once(**kwargs) == []


def test_min_batch_size_moves_the_threshold() -> None:
    assert step_once(global_batch_size=127, min_batch_size=128)
    batch_guard._warned_this_process.clear()
    assert step_once(global_batch_size=32, min_batch_size=32) == []


def test_warns_once_per_process_across_optimizers() -> None:
    assert len(step_once(global_batch_size=8)) == 1
    assert step_once(global_batch_size=8) == []  # a second optimizer in the same process stays quiet


def test_unknown_batch_warns_once_saying_how_to_declare_it() -> None:
    caught = step_once()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "does not know the effective batch size" in message
    assert "global_batch_size=N" in message and "micro_batch_size=M" in message
    assert step_once() == []


def test_error_policy_raises_and_ignore_is_silent() -> None:
    with pytest.raises(ValueError, match="effective batch is 16"):
        step_once(global_batch_size=16, batch_size_policy="error")
    assert step_once(global_batch_size=16, batch_size_policy="ignore") == []
    assert step_once(batch_size_policy="ignore") == []  # unknown batch, silenced


def test_small_batch_warning_is_a_user_warning_and_exported() -> None:
    assert issubclass(lion_dist.SmallBatchWarning, UserWarning)
    assert "SmallBatchWarning" in lion_dist.__all__ and "global_batch_size" in lion_dist.__all__


def test_global_batch_size_arithmetic() -> None:
    assert lion_dist.global_batch_size(8, 4, 2) == 64
    assert lion_dist.global_batch_size(3) == 3  # no process group: data-parallel size 1
    assert lion_dist.global_batch_size(5, 3) == 15


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0,), "micro_batch_size must be a positive int, got 0"),
        ((8, 0), "grad_accum_steps must be a positive int, got 0"),
        ((8, 1, 0), "data_parallel_size must be a positive int, got 0"),
        ((8, 1, True), "data_parallel_size must be a positive int, got True"),
        ((8.0,), "micro_batch_size must be a positive int, got 8.0"),
    ],
)
def test_global_batch_size_rejects_bad_numbers(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lion_dist.global_batch_size(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size_policy": "loud"}, "batch_size_policy must be one of"),
        ({"global_batch_size": -1}, "global_batch_size must be a positive int, got -1"),
        ({"micro_batch_size": 2.5}, "micro_batch_size must be a positive int, got 2.5"),
        ({"min_batch_size": 0}, "min_batch_size must be a positive int, got 0"),
    ],
)
def test_lion_rejects_bad_guard_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion(torch.nn.Linear(2, 2).parameters(), **kwargs)


def _guard_on_two_ranks(rank: int, world_size: int) -> dict:
    out: dict = {"small": [str(w.message) for w in step_once(micro_batch_size=16)], "unknown": len(step_once())}
    try:
        step_once(global_batch_size=32, batch_size_policy="error")
        out["error"] = None
    except ValueError as error:
        out["error"] = str(error)
    out["quiet_at_64"] = len(step_once(micro_batch_size=32))

    # The data-parallel size a params list implies.
    weight = torch.randn(4, 3)
    flat = init_device_mesh("cpu", (world_size,))
    model = torch.nn.Linear(3, 4)
    fully_shard(model, mesh=flat)
    out["fsdp2"] = infer_data_parallel_size(model.parameters())
    out["plain"] = infer_data_parallel_size([weight])
    sizes = {}
    for shape, names, placements in [
        ((world_size, 1), ("replicate", "shard"), [Replicate(), Shard(0)]),  # HSDP, replicas only
        ((1, world_size), ("replicate", "shard"), [Replicate(), Shard(0)]),  # HSDP, shards only
        ((1, world_size), ("dp", "tp"), [Shard(0), Shard(1)]),  # FSDP2 + tensor parallel
        ((world_size, 1), ("cp", "dp_shard"), [Replicate(), Shard(0)]),  # + context parallel
    ]:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        sizes[f"{names}{shape}"] = infer_data_parallel_size([distribute_tensor(weight, mesh, placements)])
    out["meshes"] = sizes
    # HSDP end to end: 16 per rank x (2 replicas x 1 shard) = 32 warns; 32 per rank is quiet.
    hsdp = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard"))
    batch_guard._warned_this_process.clear()
    for micro in (16, 32):
        model = torch.nn.Linear(3, 4)
        fully_shard(model, mesh=hsdp)
        opt = Lion(model.parameters(), micro_batch_size=micro, batch_size_policy="error")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        try:
            opt.step()
            out[f"hsdp_{micro}"] = "ok"
        except ValueError as error:
            out[f"hsdp_{micro}"] = str(error)
    return out


@pytest.mark.slow
def test_two_ranks_warn_on_rank_0_only_error_everywhere_and_infer_the_data_parallel_size() -> None:
    results = spawn(_guard_on_two_ranks, 2)
    rank0, rank1 = results  # micro batch 16 x 2 ranks = 32
    assert len(rank0["small"]) == 1 and rank1["small"] == []
    assert "effective batch is 32 (micro batch 16 x grad accumulation 1 x data-parallel size 2)" in rank0["small"][0]
    assert (rank0["unknown"], rank1["unknown"]) == (1, 0)
    for result in results:
        assert result["error"] is not None and "effective batch is 32" in result["error"]
        assert result["quiet_at_64"] == 0
        assert result["fsdp2"] == 2
        assert result["plain"] == 2  # plain tensors: the default group
        assert result["meshes"] == {
            "('replicate', 'shard')(2, 1)": 2,
            "('replicate', 'shard')(1, 2)": 2,
            "('dp', 'tp')(1, 2)": 1,
            "('cp', 'dp_shard')(2, 1)": 1,
        }
        assert "micro batch 16 x grad accumulation 1 x data-parallel size 2" in result["hsdp_16"]
        assert result["hsdp_32"] == "ok"
