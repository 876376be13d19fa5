"""Lion under FSDP1 (`FullyShardedDataParallel`), both `use_orig_params` modes, on 2 gloo ranks.

- `use_orig_params=False`: the optimizer holds one flat, padded 1-D param per FSDP unit (this rank's chunk
  of all the unit's params, concatenated).
- `use_orig_params=True`: it holds the original params as 1-D views of this rank's part of them; a param
  with no elements on this rank is an empty view whose grad stays None (so it gets no state there).

Gradients come from a real backward of `GradProbe` (FSDP1 owns its flat gradient buffers), with values that
FSDP1's pre/post-divided reduce-scatter reproduces exactly, so every comparison below is bit for bit except
the end-to-end run. Expected local slices come from wrapping a model that holds the reference values the
same way: FSDP1's own layout decides which elements a rank holds.

Cautious Lion on FSDP1 is the one documented difference: a flat param (or a view) is all the optimizer
sees, so the cautious mean is over that local tensor, not over each original param. The sign mask is
the same; only the rescaling by 1/mean differs. FSDP2 (DTensor params) gives the exact per-tensor mean.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn import Linear

from lion_dist import Lion
from tests.distributed import spawn
from tests.sharding import (
    BLOCKS,
    CAUTIOUS_CONFIGS,
    CONFIGS,
    E2E_LR,
    E2E_STEPS,
    LR,
    QUIET,
    SHAPES,
    STEPS,
    Block,
    GradProbe,
    Replay,
    bitwise_mismatches,
    e2e_distance,
    e2e_loss,
    e2e_model,
    e2e_rank_batch,
    exact_grads,
    reference_run,
)

pytestmark = pytest.mark.slow
MODES = {"flat": False, "orig": True}


def fsdp1(module: torch.nn.Module, use_orig_params: bool, wrap: type = Block) -> FSDP:
    return FSDP(
        module,
        auto_wrap_policy=ModuleWrapPolicy({wrap}),
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )


def _train(model: FSDP, opt: Lion, steps: int = STEPS) -> None:
    for step in range(steps):
        model(exact_grads(step)).backward()
        opt.step()
        opt.zero_grad()


def _world2(rank: int, world: int) -> dict:
    out: dict = {"pairs": {}, "replay": {}, "unsharded_cautious": {}, "empty_without_state": [], "state": {}}
    for mode, use_orig_params in MODES.items():
        for name, config in {**CONFIGS, **CAUTIOUS_CONFIGS}.items():
            model = fsdp1(GradProbe(), use_orig_params)
            opt = Lion(model.parameters(), lr=LR, **QUIET, **config)
            replay = Replay(opt, config)
            _train(model, opt)
            ref_params, ref_moms = reference_run(config)
            local_params = list(fsdp1(GradProbe(ref_params), use_orig_params).parameters())
            local_moms = list(fsdp1(GradProbe(ref_moms), use_orig_params).parameters())
            pairs = {}
            layout = zip(model.parameters(), local_params, local_moms, strict=True)
            for i, (p, expected_p, expected_m) in enumerate(layout):
                pairs[f"{mode}/{name}/{i}/param"] = (p.detach().clone(), expected_p.detach())
                if p in opt.state:
                    pairs[f"{mode}/{name}/{i}/exp_avg"] = (opt.state[p]["exp_avg"].clone(), expected_m.detach())
                else:  # only an empty view (use_orig_params=True) may lack state: its grad is None
                    out["empty_without_state"].append((mode, p.numel()))
            out["replay"].update(replay.pairs(f"{mode}/{name}"))
            (out["unsharded_cautious"] if name in CAUTIOUS_CONFIGS else out["pairs"]).update(pairs)
            if name == "decay":
                full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
                fqns = sorted(full["state"])
                out["state"][mode] = {
                    "full_momentum": [full["state"][fqn]["exp_avg"] for fqn in fqns],
                    "fqns": fqns,
                    "state_bytes": opt.state_bytes(),
                    "local_numel": sum(p.numel() for p in model.parameters()),
                }

    model = fsdp1(e2e_model(), use_orig_params=False, wrap=Linear)
    opt = Lion(model.parameters(), lr=E2E_LR, **QUIET)
    losses = []
    for step in range(E2E_STEPS):
        loss = e2e_loss(model, *e2e_rank_batch(step, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        dist.all_reduce(loss := loss.detach())
        losses.append(loss.item() / world)
    with FSDP.summon_full_params(model):
        full_params = {k.replace("_fsdp_wrapped_module.", ""): v.clone() for k, v in model.state_dict().items()}
    out["e2e"] = (losses, full_params)
    return out


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return spawn(_world2, 2)


def test_flat_and_orig_params_equal_unsharded_slices_bit_for_bit(world2) -> None:
    """Plain, weight decay and decoupled decay, STEPS steps; padding elements stay exactly zero."""
    assert STEPS >= 10
    for result in world2:
        assert bitwise_mismatches(result["pairs"]) == []
        assert {name.split("/")[0] for name in result["pairs"]} == set(MODES)


def test_orig_params_empty_views_have_grad_none_and_no_state(world2) -> None:
    """The layout has empty views (the test relies on them), and only empty views go without state."""
    empty = [entry for result in world2 for entry in result["empty_without_state"]]
    assert empty
    assert all(mode == "orig" and numel == 0 for mode, numel in empty)


def test_cautious_mean_is_over_the_local_flat_param_or_view(world2) -> None:
    """Documented: with FSDP1 the cautious step is cautious Lion on each local tensor as a whole (the flat
    param, or the view), bit for bit; where an original param is split that differs from unsharded."""
    for result in world2:
        assert bitwise_mismatches(result["replay"]) == []
    for mode in MODES:
        differing = [
            name
            for result in world2
            for name in bitwise_mismatches(result["unsharded_cautious"])
            if name.startswith(f"{mode}/")
        ]
        assert differing, f"cautious Lion under FSDP1 ({mode}) unexpectedly equals the unsharded result"


def test_full_state_dict_momentum_is_the_unsharded_momentum(world2) -> None:
    _, ref_moms = reference_run(CONFIGS["decay"])
    names = [f"blocks.{b}.leaves.{i}.weight" for b, index in enumerate(BLOCKS) for i in range(len(index))]
    expected = dict(zip(names, ref_moms, strict=True))
    for result in world2:
        for mode in MODES:
            state = result["state"][mode]
            assert state["fqns"] == sorted(names)
            for fqn, got in zip(state["fqns"], state["full_momentum"], strict=True):
                assert torch.equal(got, expected[fqn]), (mode, fqn)


def test_state_bytes_is_local_numel_times_itemsize(world2) -> None:
    full_numel = sum(torch.Size(s).numel() for s in SHAPES)
    for mode in MODES:
        per_rank = [result["state"][mode] for result in world2]
        for state in per_rank:  # an empty view has no state, and no elements either
            assert state["state_bytes"] == state["local_numel"] * 4
        total = sum(state["state_bytes"] for state in per_rank)
        if mode == "orig":  # views hold no padding
            assert total == full_numel * 4
        else:  # each flat param is padded to a multiple of the world size: < 1 element per unit per rank
            assert full_numel * 4 <= total < (full_numel + len(per_rank) * 2) * 4


def test_end_to_end_tracks_the_unsharded_run(world2) -> None:
    """Real backward and reduce-scatter (pre- and post-divided): the same mean gradient up to float
    rounding, which Lion's sign() turns into a different step only where the momentum is near zero."""
    losses, params = world2[0]["e2e"]
    assert world2[1]["e2e"][0] == losses
    distance = e2e_distance(losses, params)
    assert distance["loss_rel"] < 1e-5, distance
    assert distance["param_frac"] < 0.01, distance
