"""The batch guard's data-parallel size on named meshes: torchtitan's and Accelerate's dim names, and unknown ones.

torchtitan (`ParallelDims.build_mesh`) and Accelerate (`ParallelismConfig.build_device_mesh`) build one mesh with a
dim per parallelism (pp, dp_replicate, dp_shard, cp, tp; dims of size 1 left out) and flatten dp_shard x cp into
`dp_shard_cp`, the dim FSDP shards over; ranks along cp split one sequence, so they see the same samples and the
data-parallel size is dp_replicate x dp_shard. Meshes of 16 ranks are built in one process on torch's fake process
group; one real 2-rank run trains a step under FSDP2 on torchtitan-style meshes and reads the guard's message.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lion_dist import Lion, SmallBatchWarning, batch_guard
from lion_dist.layouts import data_parallel_size as infer_data_parallel_size
from tests.distributed import spawn

FAKE_WORLD = 16


def torchtitan_mesh(dp_replicate: int, dp_shard: int, cp: int, tp: int, pp: int = 1) -> DeviceMesh:
    """The world mesh torchtitan's ParallelDims.build_mesh builds (dims of size 1 left out, dp / dp_shard_cp /
    dp_cp flattened)."""
    degrees = {"pp": pp, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "cp": cp, "tp": tp}
    dims = [(n, d) for n, d in degrees.items() if d > 1]
    mesh = init_device_mesh("cpu", [d for _, d in dims], mesh_dim_names=[n for n, _ in dims])
    names = [n for n, _ in dims]
    for flat, parts in (
        ("dp", ("dp_replicate", "dp_shard")),
        ("dp_shard_cp", ("dp_shard", "cp")),
        ("dp_cp", ("dp_replicate", "dp_shard", "cp")),
    ):
        present = tuple(n for n in parts if n in names)
        if present:
            mesh[present]._flatten(mesh_dim_name=flat)
    return mesh


def fsdp_param(world: DeviceMesh, fsdp_dims: tuple[str, ...], tp: bool) -> DTensor:
    """A param laid out as FSDP2 lays it out on `world[fsdp_dims]` (and, with TP, on that mesh x tp)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Slicing a flattened dim from root mesh will be deprecated"
        mesh = world[fsdp_dims]
        placements = [Replicate()] * (len(fsdp_dims) - 1) + [Shard(0)]
        if tp:
            mesh = DeviceMesh._concatenate([mesh, world["tp"]])
            placements.append(Shard(1))
    return DTensor.from_local(torch.zeros(2, 2), mesh, placements, run_check=False)


def data_parallel_size(param: DTensor) -> tuple[int, list[str]]:
    """infer_data_parallel_size on a fresh process's warning state, and the SmallBatchWarnings it gave."""
    batch_guard._warned_this_process.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        size = infer_data_parallel_size([param])
    return size, [str(w.message) for w in caught if issubclass(w.category, SmallBatchWarning)]


TORCHTITAN = [  # (dp_replicate, dp_shard, cp, tp, pp)
    (1, 16, 1, 1, 1),  # FSDP
    (2, 8, 1, 1, 1),  # HSDP
    (1, 4, 4, 1, 1),  # FSDP + CP: dp_shard_cp = 16, data parallel 4
    (2, 2, 2, 2, 1),  # HSDP + CP + TP
    (1, 2, 2, 2, 2),  # FSDP + CP + TP + PP
    (2, 1, 4, 2, 1),  # dp_shard 1: dp_shard_cp is the cp dim alone
    (1, 1, 2, 8, 1),  # no data parallelism at all
]


def _fake_world_meshes(rank: int, world_size: int) -> dict:
    dist.destroy_process_group()  # this worker's gloo group of 1; meshes of 16 ranks need the fake group
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD)
    from accelerate.parallelism_config import ParallelismConfig

    out: dict = {"torchtitan": {}, "accelerate": {}}
    for dp_replicate, dp_shard, cp, tp, pp in TORCHTITAN:
        world = torchtitan_mesh(dp_replicate, dp_shard, cp, tp, pp)
        fsdp_dims = ("dp_replicate", "dp_shard_cp") if dp_replicate > 1 else ("dp_shard_cp",)
        out["torchtitan"][(dp_replicate, dp_shard, cp, tp, pp)] = data_parallel_size(
            fsdp_param(world, fsdp_dims, tp > 1)
        )
    for dp_replicate, dp_shard, cp, tp in [(1, 16, 1, 1), (2, 4, 2, 1), (2, 2, 2, 2), (1, 2, 8, 1)]:
        config = ParallelismConfig(dp_replicate_size=dp_replicate, dp_shard_size=dp_shard, cp_size=cp, tp_size=tp)
        world = config.build_device_mesh("cpu")
        param = fsdp_param(world, tuple(config.fsdp_dim_names), tp > 1)
        out["accelerate"][(dp_replicate, dp_shard, cp, tp)] = (*data_parallel_size(param), config.data_parallel_size)

    # a 1-D world mesh unflattened into several (newer torchtitan): the cp part of dp_shard_cp is in a sibling
    world = init_device_mesh("cpu", (FAKE_WORLD,), mesh_dim_names=("world",))
    unflattened = world._unflatten(0, (2, 4, 2), ("dp_replicate", "dp_shard_cp", "tp"))
    out["unflattened"] = data_parallel_size(
        DTensor.from_local(torch.zeros(2, 2), unflattened, [Replicate(), Shard(0), Shard(1)], run_check=False)
    )
    # names that say nothing; a name of its own root (dp_shard_cp with no cp dim to read)
    for key, shape, names in [
        ("unknown", (4, 4), ("nodes", "gpus")),
        ("moe", (2, 8), ("dp_replicate", "dp_shard_in_ep")),
        ("own_root", (16,), ("dp_shard_cp",)),
        ("unnamed", (2, 8), None),
        ("plain_hsdp", (2, 8), ("replicate", "shard")),
        ("tp_only", (2, 8), ("dp", "tp")),
    ]:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        param = DTensor.from_local(torch.zeros(2, 2), mesh, [Replicate()] * len(shape), run_check=False)
        out[key] = data_parallel_size(param)
        if key == "unknown":  # once per process
            with warnings.catch_warnings(record=True) as again:
                warnings.simplefilter("always")
                infer_data_parallel_size([param])
            out["unknown_again"] = len(again)
    return out


@pytest.fixture(scope="module")
def fake_world() -> dict:
    return spawn(_fake_world_meshes, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("dims", TORCHTITAN, ids=lambda d: "dp_replicate{}-dp_shard{}-cp{}-tp{}-pp{}".format(*d))
def test_torchtitan_meshes_count_dp_replicate_times_dp_shard(fake_world: dict, dims: tuple) -> None:
    dp_replicate, dp_shard = dims[:2]
    assert math.prod(dims) == FAKE_WORLD
    size, warned = fake_world["torchtitan"][dims]
    assert (size, warned) == (dp_replicate * dp_shard, [])


@pytest.mark.slow
def test_accelerate_parallelism_config_meshes(fake_world: dict) -> None:
    for dims, (size, warned, accelerate_says) in fake_world["accelerate"].items():
        assert (size, warned) == (accelerate_says, []), dims


@pytest.mark.slow
def test_unreadable_meshes_warn_once_asking_for_global_batch_size(fake_world: dict) -> None:
    for key, size, words in [
        ("unknown", 16, "'nodes' is not a data-parallel"),
        ("moe", 16, "'dp_shard_in_ep' is not a data-parallel"),
        ("unflattened", 8, "'dp_shard_cp' folds context parallelism into data parallelism"),
        ("own_root", 16, "'dp_shard_cp' folds context parallelism"),
    ]:
        got, warned = fake_world[key]
        assert got == size, key
        assert len(warned) == 1, key
        assert words in warned[0], key
        assert f"data-parallel size {size}" in warned[0] and "Pass global_batch_size=N" in warned[0], key
    assert fake_world["unknown_again"] == 0
    assert fake_world["unnamed"] == (16, [])  # FSDP2's own meshes have no names: all data parallel
    assert fake_world["plain_hsdp"] == (16, [])
    assert fake_world["tp_only"] == (2, [])


def _fsdp2_on_torchtitan_meshes(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    # One world mesh per case; FSDP2 reuses an equal mesh it saw before (equal: same ranks and dim names, whatever
    # its root), so no two cases here shard over equal meshes. dp_shard alone is covered on the fake group above.
    for key, dims in {"cp2": (1, 1, 2, 1), "dp_replicate2": (2, 1, 1, 1)}.items():
        dp_replicate, dp_shard, cp, tp = dims
        world = torchtitan_mesh(dp_replicate, dp_shard, cp, tp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mesh = world["dp_replicate"] if dp_replicate > 1 else world["dp_shard_cp"]
        model = torch.nn.Linear(4, 4)
        fully_shard(model, mesh=mesh)
        batch_guard._warned_this_process.clear()
        opt = Lion(model.parameters(), micro_batch_size=16, batch_size_policy="error")
        model(torch.randn(2, 4)).sum().backward()
        try:
            opt.step()
            out[key] = "ok"
        except ValueError as error:
            out[key] = str(error)
    return out


@pytest.mark.slow
def test_fsdp2_on_torchtitan_meshes_two_ranks() -> None:
    for result in spawn(_fsdp2_on_torchtitan_meshes, 2):
        # micro batch 16: 2 data-parallel ranks give 32, 1 gives 16; both below 64, so "error" names the size
        assert "effective batch is 16 (micro batch 16 x grad accumulation 1 x data-parallel size 1)" in result["cp2"]
        assert (
            "effective batch is 32 (micro batch 16 x grad accumulation 1 x data-parallel size 2)"
            in result["dp_replicate2"]
        )
