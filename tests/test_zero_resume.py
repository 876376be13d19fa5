"""Resume a DeepSpeed ZeRO checkpoint of Lion (`engine.save_checkpoint`) at another world size.

One run at world 2 trains `HALF` steps under ZeRO 1 and ZeRO 2, saves with `engine.save_checkpoint`, and runs
on to `STEPS` (the uninterrupted run). `lion_dist.deepspeed.to_universal` converts each checkpoint to
DeepSpeed's universal format; fresh engines with `"checkpoint": {"load_universal": true}` load it at world 1
and 4 (`engine.load_checkpoint(save_dir)`, which follows `latest_universal`): params, momentum and the param
groups (step, lr0) after loading are the saved ones, every rank's partition (padding included) holds the
right elements, and with the same gradients the next steps equal the uninterrupted run bit for bit.

What DeepSpeed 0.19.8 itself offers, and why neither works for Lion (state `exp_avg` only), both checked here:
- `"elastic_checkpoint": true` (ZeRO 1/2): saving works, but `engine.load_checkpoint` refuses any other
  data-parallel world size before the elastic code runs ("... Automatic adjustment of ZeRO's optimizer state
  partitioning with a new world size is not currently supported"); under ZeRO 3 it is deprecated and raises.
- `python -m deepspeed.checkpoint.ds_to_universal` (with `--inject_missing_state`: a plain engine records no
  `universal_checkpoint_info`): `KeyError: 'exp_avg_sq'`, as it reads Adam's state by name
  (deepspeedai/DeepSpeed#8608). DeepSpeed's ZeRO 1/2 universal loader takes the state names from the files
  it finds, which is why `to_universal` only has to write them. Its ZeRO 3 loader reads a per-param 'step' and
  'exp_avg_sq' (`KeyError: 'step'`, stage3.py), so `to_universal` refuses ZeRO 3 checkpoints: a ZeRO 3 run
  resumes at its own world size (`test_zero.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lion_dist import Lion
from lion_dist.deepspeed import to_universal
from tests.distributed import spawn
from tests.sharding import CONFIGS, LR, QUIET, SHAPES, STEPS, GradProbe, bitwise_mismatches, reference_run
from tests.test_zero import DS_ENV, _full, _local_pairs, _partitions, _train, ds_config

pytestmark = pytest.mark.slow
CONFIG = CONFIGS["decoupled"]  # weight decay relative to lr0: the param groups must survive the conversion
HALF = STEPS // 2
STAGES = (1, 2)
FULL_NUMEL = sum(torch.Size(s).numel() for s in SHAPES)


def _engine(config: dict, model: torch.nn.Module | None = None):
    import deepspeed

    model = GradProbe() if model is None else model
    opt = Lion(model.parameters(), lr=LR, **QUIET, **CONFIG)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def _elastic_config() -> dict:
    config = ds_config(2)
    config["zero_optimization"]["elastic_checkpoint"] = True
    return config


def _universal_config(stage: int) -> dict:
    return {**ds_config(stage), "checkpoint": {"load_universal": True}}


def _fresh_model() -> GradProbe:
    """Zeros: loading must overwrite every element."""
    return GradProbe([torch.zeros(shape) for shape in SHAPES])


def _state(engine, opt: Lion) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Full (param, momentum) of every param, and the param group's hyperparameters (step, lr0, ...)."""
    return _full(engine), {k: v for k, v in opt.param_groups[0].items() if k != "params"}


def _save_world2(rank: int, world: int, directory: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in STAGES:
        engine, opt = _engine(ds_config(stage))
        _train(engine, 0, HALF)
        engine.save_checkpoint(f"{directory}/zero{stage}", tag="half")
        out[stage] = {"saved": _state(engine, opt)}
        _train(engine, HALF, STEPS - HALF)
        out[stage]["uninterrupted"] = _state(engine, opt)
    for name, config in (("zero3", ds_config(3)), ("elastic", _elastic_config())):  # what cannot be converted
        engine, _ = _engine(config)
        _train(engine, 0, 1)
        engine.save_checkpoint(f"{directory}/{name}", tag="half")
    return out


def _resume(rank: int, world: int, directory: str) -> dict:
    """Load the converted world-2 checkpoints at this world size, then run the remaining steps."""
    import deepspeed
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    deepspeed.init_distributed(dist_backend="gloo")
    out: dict = {}
    for stage in STAGES:
        engine, opt = _engine(_universal_config(stage), _fresh_model())
        engine.load_checkpoint(f"{directory}/zero{stage}")
        out[stage] = {
            "loaded": _state(engine, opt),
            "loaded_local": _local_pairs("loaded", engine, opt, *reference_run(CONFIG, steps=HALF)),
            "state_bytes": (opt.state_bytes(), sum(p.numel() for p in _partitions(engine))),
        }
        _train(engine, HALF, STEPS - HALF)
        out[stage]["resumed"] = _state(engine, opt)
        out[stage]["resumed_local"] = _local_pairs("resumed", engine, opt, *reference_run(CONFIG, steps=STEPS))
    if world == 1:  # DeepSpeed's elastic checkpoint, loaded as DeepSpeed documents it
        engine, _ = _engine(_elastic_config(), _fresh_model())
        out["elastic"] = "loaded"
        try:
            engine.load_checkpoint(f"{directory}/elastic", tag="half")
        except ZeRORuntimeException as e:
            out["elastic"] = str(e)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, list[dict]]:
    directory = tmp_path_factory.mktemp("zero_resume")
    saved = spawn(_save_world2, 2, str(directory), env=DS_ENV)
    for stage in STAGES:
        assert to_universal(directory / f"zero{stage}" / "half") == directory / f"zero{stage}" / "half_universal"
    return directory, saved


@pytest.fixture(scope="module")
def world1(checkpoints) -> list[dict]:
    return spawn(_resume, 1, str(checkpoints[0]), env=DS_ENV)


@pytest.fixture(scope="module")
def world4(checkpoints) -> list[dict]:
    return spawn(_resume, 4, str(checkpoints[0]), env=DS_ENV)


def assert_state_equal(got: tuple, expected: tuple) -> None:
    (full, group), (ref_full, ref_group) = got, expected
    assert group == ref_group
    for (p, m), (ref_p, ref_m) in zip(full, ref_full, strict=True):
        assert torch.equal(p, ref_p) and torch.equal(m, ref_m)


def assert_resumed(result: dict, saved: dict) -> None:
    """Loaded = saved (full tensors, param groups, this rank's fragments and zero padding); resumed = uninterrupted."""
    for stage in STAGES:
        assert_state_equal(result[stage]["loaded"], saved[stage]["saved"])
        assert_state_equal(result[stage]["resumed"], saved[stage]["uninterrupted"])
        for pairs in (result[stage]["loaded_local"], result[stage]["resumed_local"]):
            assert pairs and bitwise_mismatches(pairs) == [], stage
        state_bytes, partition_numel = result[stage]["state_bytes"]
        assert state_bytes == partition_numel * 4


def test_saved_and_uninterrupted_runs_are_the_unsharded_run(checkpoints) -> None:
    _, saved = checkpoints
    for result in saved:
        for stage in STAGES:
            for key, steps in (("saved", HALF), ("uninterrupted", STEPS)):
                (full, group) = result[stage][key]
                assert group["step"] == steps and group["lr0"] == LR
                for (p, m), ref_p, ref_m in zip(full, *reference_run(CONFIG, steps=steps), strict=True):
                    assert torch.equal(p, ref_p) and torch.equal(m, ref_m)


def test_resume_at_world_1(checkpoints, world1) -> None:
    (result,) = world1
    assert_resumed(result, checkpoints[1][0])
    for stage in STAGES:
        assert result[stage]["state_bytes"][0] >= FULL_NUMEL * 4  # one rank holds all the momentum


def test_resume_at_world_4(checkpoints, world4) -> None:
    for result in world4:
        assert_resumed(result, checkpoints[1][0])
    for stage in STAGES:
        per_rank = [result[stage]["state_bytes"][0] for result in world4]
        assert max(per_rank) < FULL_NUMEL * 4 / 2  # resharded four ways, not two
        assert sum(per_rank) >= FULL_NUMEL * 4


def test_deepspeed_alone_cannot_resume_lion_at_another_world_size(checkpoints, world1, tmp_path) -> None:
    """Documented DeepSpeed 0.19.8 limits (module doc): why `to_universal` exists."""
    assert "Automatic adjustment of ZeRO's optimizer state partitioning" in world1[0]["elastic"]
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"]
    command += ["--input_folder", str(checkpoints[0] / "zero2" / "half"), "--output_folder", str(tmp_path / "out")]
    command += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **DS_ENV}, timeout=120)
    assert done.returncode != 0 and "KeyError: 'exp_avg_sq'" in done.stderr, done.stderr[-2000:]


def test_to_universal_refuses_what_it_cannot_convert(checkpoints, tmp_path) -> None:
    directory, _ = checkpoints
    with pytest.raises(ValueError, match="ZeRO-3 checkpoint"):
        to_universal(directory / "zero3" / "half", tmp_path / "zero3")
    with pytest.raises(ValueError, match="elastic_checkpoint: true"):
        to_universal(directory / "elastic" / "half", tmp_path / "elastic")
    with pytest.raises(FileNotFoundError, match="tag directory"):
        to_universal(directory / "zero2", tmp_path / "no_tag")
    with pytest.raises(FileExistsError, match="not empty"):
        to_universal(directory / "zero2" / "half")  # converted already by the fixture
    partial = tmp_path / "partial"
    shutil.copytree(directory / "zero2" / "half", partial)
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        to_universal(partial, tmp_path / "partial_universal")
    assert not (tmp_path / "latest_universal").exists()  # nothing was named
