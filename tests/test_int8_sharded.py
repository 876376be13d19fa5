"""int8 momentum under FSDP2: the sharded step equals the unsharded one bit for bit, and a DCP checkpoint saved
at 2 ranks loads exactly at 1 and 4 ranks (codes and scales equal the saved full tensors; the runs continue as
the uninterrupted unsharded run).

Shapes: (5, 1000) splits its rows unevenly (3 + 2); (1, 4200) leaves rank 1 (and ranks 1-3 at world 4) an
empty shard; (7, 700) has a short last block in every row (700 = 5 x 128 + 60); (4200,) is a 1-D DTensor whose
shards would split blocks, and (3, 10) is small: both keep fp32 momentum. Unsharded, the 1-D param is a whole
plain tensor and is quantized, so its reference is the unsharded run with fp32 momenta (same group, same noise).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lion_dist import Lion
from tests.distributed import spawn

pytestmark = pytest.mark.slow
SHAPES = ((5, 1000), (1, 4200), (7, 700), (4200,), (3, 10))
QUANTIZED = (True, True, True, False, False)
CONFIG = {
    "lr": 1e-2,
    "weight_decay": 0.1,
    "momentum_dtype": "int8",
    "stochastic_rounding": True,
    "batch_size_policy": "ignore",
}
HALF, STEPS = 3, 6
FULL = StateDictOptions(full_state_dict=True)


class Params(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES)


def _grads(step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES]


def _step(params: list[Tensor], opt: Lion, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = (
                distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g
            )
        opt.step()


def _unsharded(steps: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The unsharded run, with each param's momentum of the kind its FSDP2 shard has (see the module doc)."""
    runs = {}
    for momentum_dtype in ("int8", "float32"):
        params = list(Params().parameters())
        opt = Lion(params, nonfinite="ignore", **{**CONFIG, "momentum_dtype": momentum_dtype})
        _step(params, opt, 0, steps)
        runs[momentum_dtype] = [(p.detach(), opt.state[p]) for p in params]
    chosen = [runs["int8"][i] if q else runs["float32"][i] for i, q in enumerate(QUANTIZED)]
    return [p for p, _ in chosen], [state for _, state in chosen]


def _full(model: nn.Module, opt: Lion) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Full params and states (gathered), in `SHAPES` order."""
    optim = get_optimizer_state_dict(model, opt, options=FULL)
    names = [f"weights.{i}" for i in range(len(SHAPES))]
    params = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    return [p.clone() for p in params], [{k: v.clone() for k, v in optim["state"][n].items()} for n in names]


def _sharded_model(world: int) -> tuple[nn.Module, list[Tensor], Lion]:
    mesh = init_device_mesh("cpu", (world,))
    model = Params()
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    return model, params, Lion(params, **CONFIG)


def _save_world2(rank: int, world: int, directory: str) -> dict:
    model, params, opt = _sharded_model(world)
    _step(params, opt, 0, HALF)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    out = {"saved": _full(model, opt), "kinds": [opt.state[p]["exp_avg"].dtype for p in params]}
    out["placements"] = [
        (opt.state[p]["exp_avg"].placements, opt.state[p].get("exp_avg_scale", opt.state[p]["exp_avg"]).placements)
        for p in params
    ]
    _step(params, opt, HALF, STEPS - HALF)
    out["uninterrupted"] = _full(model, opt)
    return out


def _load(rank: int, world: int, directory: str) -> dict:
    model, params, opt = _sharded_model(world)
    with torch.no_grad():
        for p in params:
            p.zero_()
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out = {"loaded": _full(model, opt)}
    _step(params, opt, HALF, STEPS - HALF)
    out["resumed"] = _full(model, opt)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    directory = str(tmp_path_factory.mktemp("int8_dcp"))
    return {
        "world2": spawn(_save_world2, 2, directory)[0],
        "world1": spawn(_load, 1, directory)[0],
        "world4": spawn(_load, 4, directory)[0],
        "half": _unsharded(HALF),
        "all": _unsharded(STEPS),
    }


def _assert_equal(got: tuple, expected: tuple) -> None:
    for i, (p, state, ref_p, ref_state) in enumerate(zip(*got, *expected, strict=True)):
        assert torch.equal(p, ref_p), f"param {SHAPES[i]}"
        assert set(state) == set(ref_state), f"state keys of {SHAPES[i]}"
        for key in state:
            assert state[key].dtype == ref_state[key].dtype and torch.equal(state[key], ref_state[key]), (
                f"{key} of {SHAPES[i]}"
            )


def test_which_sharded_params_are_quantized_and_how_their_state_is_laid_out(runs) -> None:
    kinds = runs["world2"]["kinds"]
    assert [k == torch.int8 for k in kinds] == list(QUANTIZED)
    for (codes, scales), quantized in zip(runs["world2"]["placements"], QUANTIZED, strict=True):
        assert codes == scales  # scales sharded like the param (for fp32 momenta: the momentum's own)
        assert quantized or codes is not None


def test_sharded_int8_step_equals_unsharded_bit_for_bit(runs) -> None:
    _assert_equal(runs["world2"]["saved"], runs["half"])
    _assert_equal(runs["world2"]["uninterrupted"], runs["all"])


@pytest.mark.parametrize("world", ["world1", "world4"])
def test_dcp_checkpoint_reshards_exactly(runs, world) -> None:
    _assert_equal(runs[world]["loaded"], runs["half"])
    _assert_equal(runs[world]["resumed"], runs["all"])


# FSDP1 flat partitions: plain 1-D tensors whose int8 blocks run over each rank's partition, so the state depends
# on the world size; resharding goes through `dequantized_state_dict()` (fp32 momenta) and FSDP1's own optimizer
# state-dict tools, and the load quantizes again.
FLAT_SHAPE = (96, 97)  # 9312 elements: 4656 per rank at 2 ranks (a short last block), one unit, no padding


def _flat_model(world: int) -> tuple[nn.Module, Lion]:
    torch.manual_seed(0)
    model = FSDP(
        nn.Linear(FLAT_SHAPE[1], FLAT_SHAPE[0], bias=False), use_orig_params=False, device_id=torch.device("cpu")
    )
    return model, Lion(model.parameters(), **{**CONFIG, "stochastic_rounding": False})


def _local_momentum(opt: Lion) -> Tensor:
    (state,) = opt.dequantized_state_dict()["state"].values()
    return state["exp_avg"]


def _fsdp1_save_world2(rank: int, world: int, path: str) -> dict:
    model, opt = _flat_model(world)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(4, FLAT_SHAPE[1], generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    (flat,) = model.parameters()
    state = opt.state[flat]
    full = FSDP.optim_state_dict(model, opt, optim_state_dict=opt.dequantized_state_dict())
    if rank == 0:
        torch.save(full, path)
    return {
        "layout": (flat.shape, state["exp_avg"].dtype, state["exp_avg"].shape, state["exp_avg_scale"].shape),
        "local": _local_momentum(opt),
        "full": full["state"]["weight"]["exp_avg"],
    }


def _fsdp1_load(rank: int, world: int, path: str) -> Tensor:
    model, opt = _flat_model(world)
    opt.load_state_dict(FSDP.optim_state_dict_to_load(model, opt, torch.load(path, weights_only=False)))
    (flat,) = model.parameters()
    assert opt.state[flat]["exp_avg"].dtype == torch.int8  # quantized again over this world's partition
    return _local_momentum(opt)


def test_fsdp1_flat_partitions_quantize_locally_and_reshard_through_the_dequantized_state(tmp_path) -> None:
    path = str(tmp_path / "full.pt")
    saved = spawn(_fsdp1_save_world2, 2, path)
    half = FLAT_SHAPE[0] * FLAT_SHAPE[1] // 2
    for out in saved:
        assert out["layout"] == ((half,), torch.int8, (half,), (-(-half // 128),))
    expected = torch.cat([out["local"] for out in saved]).reshape(FLAT_SHAPE)
    assert torch.equal(saved[0]["full"], expected)  # FSDP1 gathered the fp32 momenta into the full param's shape
    (reloaded,) = spawn(_fsdp1_load, 1, path)
    # requantized over the whole param: within half a code of its new blocks (absmax / 127 per 128 elements)
    blocks = expected.flatten()[: reloaded.numel() // 128 * 128].reshape(-1, 128)
    half_code = blocks.abs().amax(dim=1, keepdim=True) / 127 / 2
    error = (reloaded[: blocks.numel()].reshape(-1, 128) - blocks).abs()
    assert bool((error <= half_code * 1.001).all()) and error.amax() > 0  # 1.001: the rounding of code x scale
