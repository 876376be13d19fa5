"""Shard layouts (`lion_dist.layouts`) and the private torch attributes they rest on (`lion_dist._torch`).

Each layout places a rank's local elements in the whole param, so stochastic rounding draws the noise of the
unsharded param (DTensor `Shard(0)`, FSDP1 views of original params) or at least never the same noise for
different elements on different ranks (flat partitions: FSDP1's flat params, declared ZeRO partitions). The
private attributes are checked against this torch here, so an upgrade that moves one fails these tests first.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import Shard, distribute_tensor

from lion_dist import Lion, _torch, layouts, spec
from tests.distributed import spawn


def test_a_plain_tensor_is_whole_and_a_declared_partition_starts_at_its_offset() -> None:
    t = torch.zeros(10)
    assert layouts.of(t) is layouts.PLAIN and layouts.PLAIN.noise_place() == (0, 0)
    layouts.declare_flat_partition(t, 30)
    assert layouts.of(t).noise_place() == (30, 0)
    assert layouts.of(torch.zeros(10)) is layouts.PLAIN  # by identity, not by value
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        layouts.declare_flat_partition(t, -1)
    with pytest.raises(ValueError, match="1-D tensor"):
        layouts.declare_flat_partition(torch.zeros(2, 2), 0)


def _dtensors(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(15.0).reshape(5, 3)
    row = distribute_tensor(full, mesh, [Shard(0)])
    col = distribute_tensor(full, mesh, [Shard(1)])
    local = _torch.local_tensor(row)
    return {
        "row": layouts.of(row).noise_place(),
        "col": layouts.of(col).noise_place(),
        "same_local": local is _torch.local_tensor(row) and torch.equal(local, row.to_local()),
        "spec_shared": _torch.spec(row) is row._spec and _torch.spec(full) is None,
        "around": layouts.of(row).around(torch.ones_like(local), (5, 3)).full_tensor(),
        "dp": layouts.of(row).data_parallel_size(),
        "local_shape": _torch.local_shape_and_offset((5, 3), mesh, (Shard(0),)),
    }


@pytest.mark.slow
def test_dtensor_shards_place_their_noise_and_state() -> None:
    """Row shards start at their first element's global index (the unsharded noise); column shards get distinct
    shard ids; a state tensor built around local elements is laid out like the param."""
    results = spawn(_dtensors, 2)
    assert [r["row"] for r in results] == [(0, 0), (9, 0)]  # rows 0-2 and 3-4 of a (5, 3) param
    assert results[0]["col"][0] == 0 and results[0]["col"][1] != results[1]["col"][1]
    assert all(r["same_local"] and r["spec_shared"] and r["dp"] == 2 for r in results)
    assert all(torch.equal(r["around"], torch.ones(5, 3)) for r in results)
    assert [r["local_shape"] for r in results] == [((3, 3), (0, 0)), ((2, 3), (3, 0))]


def _fsdp1(rank: int, world: int) -> dict:
    out = {}
    for orig in (False, True):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))  # 34 elements: the first weight is split
        whole = {name: p.detach().flatten().clone() for name, p in module.named_parameters()}
        model = FSDP(module, use_orig_params=orig, device_id="cpu")
        if orig:
            layouts.declare_fsdp1(model)
            # each local view is the elements of its whole original param that its declared base says
            out["views"] = [
                (layouts.of(p).noise_place(), torch.equal(p.detach().flatten(), whole[name][base : base + p.numel()]))
                for name, p in ((n.replace("_fsdp_wrapped_module.", ""), p) for n, p in model.named_parameters())
                if p.numel()
                for base in [layouts.of(p).noise_place()[0]]
            ]
        else:
            out["flat"] = [(p.numel(), layouts.of(p).noise_place()) for p in model.parameters()]
    # stochastic rounding of bf16 flat partitions: each rank draws its own noise
    model = FSDP(nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16), device_id="cpu")
    (flat,) = model.parameters()
    base, shard = layouts.of(flat).noise_place()
    key = spec.sr_key(0, 0, 0)
    out["noise"] = spec.sr_noise(spec.NoiseStream(key, 0, base, shard), 64)
    before = flat.detach().clone()
    opt = Lion(model.parameters(), lr=1e-3, stochastic_rounding=True, batch_size_policy="ignore")
    model(torch.ones(2, 64, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    out["moved"] = bool((flat != before).any())
    return out


@pytest.mark.slow
def test_fsdp1_partitions_and_views_are_placed_in_the_whole() -> None:
    results = spawn(_fsdp1, 2)
    flat = [r["flat"] for r in results]
    assert flat[0][0][1] == (0, 0) and flat[1][0][1] == (flat[0][0][0], 0)  # rank 1 starts where rank 0 ends
    # use_orig_params=True: each local view is the slice of its original param that its base says, and the weight
    # split across the ranks starts past 0 on rank 1
    views = [v for r in results for v in r["views"]]
    assert all(matches for _, matches in views), views
    assert any(place[0] > 0 for place, _ in results[1]["views"]), results[1]["views"]
    assert not torch.equal(results[0]["noise"], results[1]["noise"])
    assert all(r["moved"] for r in results)


def test_load_state_dict_pre_hooks_are_where_torch_keeps_them() -> None:
    opt = Lion([nn.Parameter(torch.zeros(2))], batch_size_policy="ignore")
    assert _torch.load_state_dict_pre_hooks(opt) == {}
    handle = opt.register_load_state_dict_pre_hook(lambda o, sd: None)
    assert len(_torch.load_state_dict_pre_hooks(opt)) == 1
    handle.remove()
    assert _torch.load_state_dict_pre_hooks(opt) == {}
