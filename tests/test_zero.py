"""Lion under DeepSpeed ZeRO 0, 1, 2 and 3 (CPU accelerator, 2 gloo ranks), passed to `deepspeed.initialize` as an
object with `"zero_allow_untested_optimizer": true`.

What DeepSpeed hands the optimizer: ZeRO 1/2 keep one flat fp32 partition per param group in
`param_groups`; ZeRO 3 calls `step()` once per sub-group with that sub-group's flat partition swapped into
the group's `params` (and `[]` afterwards), so the state is keyed by partition tensor. Gradients come from a
real backward of `GradProbe` through DeepSpeed's hooks and reductions, with values those reductions
reproduce exactly, so the step comparisons are bit for bit.

Cautious Lion: DeepSpeed's flat partitions hide the tensor boundaries, so the cautious mean is over each
partition handed to `step()` (ZeRO 1/2: the rank's whole partition of a param group; ZeRO 3: the rank's part
of one sub-group), padding included. The mask is the per-element one; only the 1/mean rescaling differs.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from lion_dist import Lion, layouts
from lion_dist.deepspeed import declare_partitions
from tests.distributed import spawn
from tests.sharding import (
    CAUTIOUS_CONFIGS,
    CONFIGS,
    E2E_BATCH,
    E2E_LR,
    E2E_STEPS,
    LR,
    QUIET,
    SHAPES,
    STEPS,
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
STAGES = (1, 2, 3)
SUB_GROUP_SIZE = 4  # elements per rank: ZeRO 3 splits `SHAPES` into 3 sub-groups, each stepped by its own step() call
DS_ENV = {"DS_ACCELERATOR": "cpu"}


def ds_config(stage: int, micro_batch: int = 1, offload: bool = False) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero |= {"sub_group_size": SUB_GROUP_SIZE, "stage3_param_persistence_threshold": 0}
    # DeepSpeed clips gradients to norm 1.0 unless told otherwise; the unsharded reference does not clip.
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeed refuses any optimizer but its own CPU ones
    return {**config, "zero_optimization": zero}


def _engine(
    stage: int,
    config: dict,
    *,
    offload: bool = False,
    model: torch.nn.Module | None = None,
    lr: float = LR,
    micro_batch: int = 1,
):
    import deepspeed

    model = GradProbe() if model is None else model
    opt = Lion(model.parameters(), lr=lr, **QUIET, **config)
    ds = ds_config(stage, micro_batch=micro_batch, offload=offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine, opt


def _train(engine, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        engine.backward(engine(exact_grads(step)))
        engine.step()


def _partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions this rank's optimizer steps (ZeRO 3: one per sub-group)."""
    zero = engine.optimizer
    return list(
        zero.fp32_partitioned_groups_flat
        if hasattr(zero, "fp32_partitioned_groups_flat")
        else zero.single_partition_of_fp32_groups
    )


def _local_pairs(prefix: str, engine, opt: Lion, ref_params, ref_moms) -> dict:
    """This rank's fp32 elements and momentum of each param against the same elements of the reference."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = {}
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):  # ZeRO 3: rank r holds elements [r * n, (r + 1) * n) of the padded param
        for i, (p, ref_p, ref_m) in enumerate(zip(params, ref_params, ref_moms, strict=True)):
            n = p.partition_numel()
            real = max(0, min(n, ref_p.numel() - rank * n))  # the rest is padding
            momentum = safe_get_local_optimizer_state(p, "exp_avg").clone()
            padded_m = torch.nn.functional.pad(ref_m.flatten(), (0, world * n - ref_m.numel()))
            pairs[f"{prefix}/{i}/exp_avg"] = (momentum, padded_m[rank * n : (rank + 1) * n])
            # DeepSpeed leaves a param's padding uninitialized (momentum's is ours, zero); compare the real part.
            param = safe_get_local_fp32_param(p)[:real].clone()
            pairs[f"{prefix}/{i}/param"] = (param, ref_p.flatten()[rank * n : rank * n + real])
        return pairs
    for g, partition in enumerate(_partitions(engine)):  # ZeRO 1/2: each param's fragment of the flat partition
        covered = torch.zeros(partition.numel(), dtype=torch.bool)
        for i, (p, ref_p, ref_m) in enumerate(zip(params, ref_params, ref_moms, strict=True)):
            mapping = p._hp_mapping
            if mapping is None or mapping.param_group_index != g:
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            covered[hp.start : hp.start + hp.numel] = True
            for kind, got, ref in (
                ("param", mapping.get_hp_fragment(), ref_p),
                ("exp_avg", mapping.get_hp_fragment("exp_avg"), ref_m),
            ):
                pairs[f"{prefix}/{i}/{kind}"] = (got.clone(), ref.flatten()[lp.start : lp.start + lp.numel])
        padding = ~covered  # alignment padding: zero gradient, so sign(0) = 0 keeps it exactly zero
        pairs[f"{prefix}/padding{g}/param"] = (partition.detach()[padding], torch.zeros(int(padding.sum())))
        momentum = opt.state[partition]["exp_avg"][padding]
        pairs[f"{prefix}/padding{g}/exp_avg"] = (momentum, torch.zeros(int(padding.sum())))
    return pairs


def _full(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(full fp32 param, full momentum) of every param, through DeepSpeed's public accessors."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return [
        (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone())
        for p in engine.module.parameters()
    ]


def _local_state(engine, opt: Lion) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(flat partition, its momentum) for each partition this rank steps, as copies."""
    return [(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in _partitions(engine)]


def _world2(rank: int, world: int, checkpoint_dir: str) -> dict:
    import deepspeed
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    deepspeed.init_distributed(dist_backend="gloo")
    out: dict = {
        "pairs": {},
        "full": {},
        "replay": {},
        "unsharded_cautious": {},
        "memory": {},
        "e2e": {},
        "noise_bases": {},
    }
    # Stage 0, DeepSpeed's data parallelism without partitions: Lion steps the module's own (whole) params.
    for name in ("plain", "decay"):
        engine, opt = _engine(0, CONFIGS[name])
        _train(engine, 0, STEPS)
        params = list(engine.module.parameters())
        for i, (p, ref_p, ref_m) in enumerate(zip(params, *reference_run(CONFIGS[name]), strict=True)):
            out["pairs"][f"zero0/{name}/{i}/param"] = (p.detach().clone(), ref_p)
            out["pairs"][f"zero0/{name}/{i}/exp_avg"] = (opt.state[p]["exp_avg"].clone(), ref_m)
    for stage in STAGES:
        for name, config in {**CONFIGS, **CAUTIOUS_CONFIGS}.items():
            if name in ("decoupled", "cautious_wd"):
                continue  # covered by the FSDP tests; the layout is what matters here
            engine, opt = _engine(stage, config)
            replay = Replay(opt, config)
            _train(engine, 0, STEPS)
            pairs = _local_pairs(f"zero{stage}/{name}", engine, opt, *reference_run(config))
            if name in CAUTIOUS_CONFIGS:
                out["replay"].update(replay.pairs(f"zero{stage}/{name}"))
                out["unsharded_cautious"].update(pairs)
            else:
                out["pairs"].update(pairs)
                out["full"][stage, name] = _full(engine)
            if name == "plain":
                partitions = _partitions(engine)
                out["memory"][stage] = (opt.state_bytes(), sum(p.numel() for p in partitions), len(partitions))
                declared = declare_partitions(engine)
                out["noise_bases"][stage] = (declared, [layouts.of(p).noise_place() for p in partitions])

        # ZeRO-Offload: the optimizer steps the CPU partitions (on a CPU machine they were on CPU already).
        if stage > 1:
            engine, opt = _engine(stage, CONFIGS["decay"], offload=True)
            _train(engine, 0, STEPS)
            out["pairs"].update(_local_pairs(f"offload{stage}", engine, opt, *reference_run(CONFIGS["decay"])))
            out[f"offload{stage}_devices"] = {p.device.type for p in _partitions(engine)}

        model = e2e_model()
        engine, _ = _engine(stage, {}, model=model, lr=E2E_LR, micro_batch=E2E_BATCH // world)
        losses = []
        for step in range(E2E_STEPS):
            loss = e2e_loss(engine, *e2e_rank_batch(step, rank, world))
            engine.backward(loss)
            engine.step()
            dist.all_reduce(loss := loss.detach())
            losses.append(loss.item() / world)
        names = [n for n, _ in model.named_parameters()]
        out["e2e"][stage] = (losses, {n: full for n, (full, _) in zip(names, _full(engine), strict=True)})

        # DeepSpeed's own checkpoint: save at step 6, run on to 12; a fresh engine loads and runs the same 6.
        path = os.path.join(checkpoint_dir, f"zero{stage}")
        engine, opt = _engine(stage, CONFIGS["decay"])
        _train(engine, 0, STEPS // 2)
        engine.save_checkpoint(path, tag="half")
        saved = _local_state(engine, opt)
        _train(engine, STEPS // 2, STEPS - STEPS // 2)
        uninterrupted = _local_state(engine, opt)
        engine, opt = _engine(stage, CONFIGS["decay"], model=GradProbe([torch.zeros(s) for s in SHAPES]))
        engine.load_checkpoint(path, tag="half")
        loaded = _local_state(engine, opt)
        _train(engine, STEPS // 2, STEPS - STEPS // 2)
        resumed = _local_state(engine, opt)
        out[f"checkpoint{stage}"] = (saved, loaded, uninterrupted, resumed)

    config = ds_config(2, offload=True)
    del config["zero_force_ds_cpu_optimizer"]
    try:
        deepspeed.initialize(model=GradProbe(), optimizer=Lion(GradProbe().parameters(), **QUIET), config=config)
    except ZeRORuntimeException as e:
        out["offload_without_flag"] = str(e)
    return out


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        return spawn(_world2, 2, checkpoint_dir, env=DS_ENV)


def test_zero_0_1_2_3_equal_unsharded_slices_bit_for_bit(world2) -> None:
    """Every rank's elements of every param and of its momentum, after STEPS steps; padding stays zero. The one
    sharded == unsharded test of DeepSpeed: the entry, resume and example tests check their own concerns."""
    assert STEPS >= 10
    for result in world2:
        assert bitwise_mismatches(result["pairs"]) == []
        stages = {name.split("/")[0] for name in result["pairs"]}
        assert stages == {"zero0", "zero1", "zero2", "zero3", "offload2", "offload3"}


def test_full_params_and_momentum_through_deepspeed_accessors(world2) -> None:
    """`safe_get_full_fp32_param` / `safe_get_full_optimizer_state(p, "exp_avg")` see Lion's momentum."""
    for (stage, name), full in world2[0]["full"].items():
        ref_params, ref_moms = reference_run(CONFIGS[name])
        for (param, momentum), ref_p, ref_m in zip(full, ref_params, ref_moms, strict=True):
            assert torch.equal(param, ref_p), (stage, name)
            assert torch.equal(momentum, ref_m), (stage, name)


def test_zero3_steps_once_per_sub_group_and_keys_state_by_partition(world2) -> None:
    for result in world2:
        state_bytes, numel, partitions = result["memory"][3]
        assert partitions >= 3  # several sub-groups, each stepped separately with the params list swapped
        assert state_bytes == numel * 4


def test_declared_partitions_draw_noise_from_their_own_offsets(world2) -> None:
    """`lion_dist.deepspeed.declare_partitions`: rank r's partition of a flat group starts at r x its size (ZeRO 3:
    after the earlier sub-groups of every rank), so no two ranks draw the same noise for different elements."""
    for stage in STAGES:
        (declared, bases), (_, other) = (result["noise_bases"][stage] for result in world2)
        assert declared == len(bases) >= 1
        assert bases[0] == (0, 0) and other[0][0] > 0, (stage, bases, other)
        starts = sorted(base for base, _ in bases + other)
        assert len(set(starts)) == len(starts)  # every partition of every rank its own start


def test_state_bytes_is_the_local_partition(world2) -> None:
    """ZeRO 1/2/3: momentum = this rank's flat partition x 4 bytes; over ranks, the model plus padding."""
    full_numel = sum(torch.Size(s).numel() for s in SHAPES)
    for stage in STAGES:
        per_rank = [result["memory"][stage] for result in world2]
        for state_bytes, numel, _ in per_rank:
            assert state_bytes == numel * 4
            assert numel <= full_numel / 2 + 2 * len(SHAPES)  # padding: < 1 element per param per rank
        assert sum(numel for _, numel, _ in per_rank) >= full_numel


def test_cautious_mean_is_over_the_partition_handed_to_step(world2) -> None:
    """Documented: cautious Lion under ZeRO is cautious Lion on each flat partition as a whole (bit for bit),
    which differs from the unsharded per-tensor result."""
    for result in world2:
        assert result["replay"] and bitwise_mismatches(result["replay"]) == []
    differing = {name.split("/")[0] for result in world2 for name in bitwise_mismatches(result["unsharded_cautious"])}
    assert differing == {"zero1", "zero2", "zero3"}


def test_offload_runs_lion_on_cpu_partitions(world2) -> None:
    for result in world2:
        assert result["offload2_devices"] == result["offload3_devices"] == {"cpu"}


def test_offload_without_force_flag_is_refused_by_deepspeed(world2) -> None:
    """Documented: ZeRO-Offload with a client optimizer needs `"zero_force_ds_cpu_optimizer": false`."""
    assert "zero_force_ds_cpu_optimizer" in world2[0]["offload_without_flag"]


def test_end_to_end_tracks_the_unsharded_run(world2) -> None:
    """Real backward and DeepSpeed's averaged reductions: the same mean gradient up to float rounding."""
    for stage in STAGES:
        losses, params = world2[0]["e2e"][stage]
        assert world2[1]["e2e"][stage][0] == losses
        distance = e2e_distance(losses, params)
        assert distance["loss_rel"] < 1e-5, (stage, distance)
        assert distance["param_frac"] < 0.01, (stage, distance)


def test_deepspeed_checkpoint_resume_equals_uninterrupted_run(world2) -> None:
    """`engine.save_checkpoint` / `load_checkpoint`: the loaded params and momentum are the saved ones, and
    the continued run equals the uninterrupted one bit for bit (ZeRO 3: state of every sub-group)."""
    for result in world2:
        for stage in STAGES:
            saved, loaded, uninterrupted, resumed = result[f"checkpoint{stage}"]
            for before, after in ((saved, loaded), (uninterrupted, resumed)):
                for (p0, m0), (p1, m1) in zip(before, after, strict=True):
                    assert torch.equal(p0, p1) and torch.equal(m0, m1), stage
