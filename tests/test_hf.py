"""The Hugging Face Trainer routes, on CPU with the tiny Llama of examples/hf_toy.py (nothing is downloaded).

1. `Trainer(optimizers=(lion_dist.Lion(...), scheduler))` (examples/hf_trainer.py): a 6-step run checkpoints at
   step 3, and a fresh Trainer resumed from checkpoint-3 must end with the same params, momentum, param groups and
   losses, bit for bit, in one process and in two (DDP over gloo). Resuming without the checkpoint's optimizer.pt
   must not, so the test sees the momentum being restored.
2. A DeepSpeed JSON whose optimizer is "LionDist", with the "auto" values Hugging Face's templates have
   (examples/hf_ds_zero2.json: ZeRO-2 with optimizer offload; hf_ds_zero3.json: ZeRO-3 with DeepSpeed's WarmupLR),
   launched with torchrun on 2 CPU processes; the example's only DeepSpeed line is `lion_dist.deepspeed.register()`
   (plus, on CPU only, `deepspeed.init_distributed`). The batch guard must report DeepSpeed's train_batch_size, and
   ZeRO-2 must train like the DDP run.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lion_dist import SmallBatchWarning
from tests.distributed import spawn
from tests.test_examples import run

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _trainer_runs(rank: int, world_size: int, out: str, per_device_batch: int) -> dict:
    """The example's main(), in this worker: a full run, a run resumed from its checkpoint-3, and (one process)
    a run resumed without the optimizer state and one with warmup."""
    sys.path.insert(0, str(ROOT / "examples"))
    import hf_trainer

    common = ["--steps", str(STEPS), "--save-steps", "3", "--per-device-batch", str(per_device_batch)]
    result: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["full"] = hf_trainer.main([*common, "--out", f"{out}/full"])
        resume = ["--resume-from-checkpoint", f"{out}/full/checkpoint-3"]
        result["resumed"] = hf_trainer.main([*common, "--out", f"{out}/resumed", *resume])
    result["small_batch_warnings"] = [str(w.message) for w in caught if issubclass(w.category, SmallBatchWarning)]
    if world_size == 1:
        shutil.copytree(f"{out}/full/checkpoint-3", f"{out}/no_optimizer_state")
        Path(f"{out}/no_optimizer_state/optimizer.pt").unlink()
        resume = ["--resume-from-checkpoint", f"{out}/no_optimizer_state"]
        hf_trainer.main([*common, "--out", f"{out}/resumed_without_momentum", *resume])
        try:
            hf_trainer.main([*common, "--steps", "2", "--warmup-steps", "1", "--out", f"{out}/warmup"])
            result["warmup_error"] = None
        except ValueError as error:
            result["warmup_error"] = str(error)
    return result


def checkpoint(path: Path) -> tuple[dict, dict]:
    """(model tensors, optimizer state dict) of a Trainer checkpoint."""
    return load_file(path / "model.safetensors"), torch.load(path / "optimizer.pt", weights_only=False)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    (model_a, optim_a), (model_b, optim_b) = checkpoint(a), checkpoint(b)
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert optim_a["param_groups"] == optim_b["param_groups"]
    assert optim_a["state"].keys() == optim_b["state"].keys()
    for key, state in optim_a["state"].items():
        assert torch.equal(state["exp_avg"], optim_b["state"][key]["exp_avg"]), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hf1")
    return out, spawn(_trainer_runs, 1, str(out), 32, timeout=600)[0]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("hf2")
    return out, spawn(_trainer_runs, 2, str(out), 16, timeout=600)


@pytest.mark.slow
def test_trainer_with_lion_resumes_exactly_in_one_process(one_process: tuple[Path, dict]) -> None:
    out, result = one_process
    assert result["small_batch_warnings"] == []  # 32 x 2 accumulation = 64: the guard is quiet
    full, resumed = result["full"], result["resumed"]
    assert len(full["losses"]) == STEPS and full["losses"][-1] < full["losses"][0] - 0.2
    assert resumed["losses"] == full["losses"]
    assert_same_checkpoint(out / "full" / f"checkpoint-{STEPS}", out / "resumed" / f"checkpoint-{STEPS}")
    _, saved = checkpoint(out / "full" / "checkpoint-3")
    assert all(state["exp_avg"].abs().sum() > 0 for state in saved["state"].values())
    model_full, _ = checkpoint(out / "full" / f"checkpoint-{STEPS}")
    model_cold, _ = checkpoint(out / "resumed_without_momentum" / f"checkpoint-{STEPS}")
    assert any(not torch.equal(model_full[name], model_cold[name]) for name in model_full)


@pytest.mark.slow
def test_trainer_with_warmup_from_lr_0(one_process: tuple[Path, dict]) -> None:
    error = one_process[1]["warmup_error"]
    assert error is None, error


@pytest.mark.slow
def test_trainer_with_lion_resumes_exactly_on_two_processes(two_processes: tuple[Path, list[dict]]) -> None:
    out, results = two_processes
    for result in results:
        assert result["full"]["world"] == 2
        assert result["small_batch_warnings"] == []  # 16 x 2 accumulation x 2 ranks = 64
        assert result["resumed"]["losses"] == result["full"]["losses"]
    assert results[0]["full"]["losses"][-1] < results[0]["full"]["losses"][0] - 0.2
    assert_same_checkpoint(out / "full" / f"checkpoint-{STEPS}", out / "resumed" / f"checkpoint-{STEPS}")


def _losses(output: str) -> tuple[float, float]:
    found = [line for line in output.splitlines() if line.startswith("loss ") and " on 2 ranks" in line]
    assert len(found) == 1, output[-4000:]
    words = found[0].split()
    assert words[5:7] == [str(STEPS), "steps"], found[0]
    return float(words[1]), float(words[3])


def deepspeed_run(config: str, per_device_batch: int, out: Path) -> str:
    """examples/hf_trainer.py with a DeepSpeed JSON, under torchrun on 2 CPU processes."""
    return run(
        "launch/torchrun_single_node.sh",
        "examples/hf_trainer.py",
        *("--deepspeed", config, "--per-device-batch", str(per_device_batch)),
        *("--steps", str(STEPS), "--save-steps", "100", "--out", str(out)),
        timeout=600,
    )


@pytest.mark.slow
def test_deepspeed_zero3_json_with_auto_values_feeds_train_batch_size_to_the_guard(tmp_path: Path) -> None:
    output = deepspeed_run("examples/hf_ds_zero3.json", 4, tmp_path)  # with DeepSpeed's WarmupLR scheduler
    assert "zero_allow_untested_optimizer" not in output
    assert output.count("SmallBatchWarning") == 1  # rank 0 only
    assert (
        "the effective batch is 16 (DeepSpeed train_batch_size = micro batch 4 x gradient_accumulation_steps 2 x "
        "data-parallel size 2)" in output
    )
    first, last = _losses(output)
    assert last < first


@pytest.mark.slow
def test_deepspeed_zero2_offload_json_trains_like_ddp(tmp_path: Path, two_processes: tuple[Path, list[dict]]) -> None:
    """ZeRO-2 with Lion on the CPU partitions (optimizer offload), the Trainer's cosine schedule: the DDP run's
    losses. (ZeRO-3 builds the model under zero.Init, which draws other initial weights.)"""
    output = deepspeed_run("examples/hf_ds_zero2.json", 16, tmp_path)
    assert "SmallBatchWarning" not in output  # DeepSpeed's train_batch_size 64
    ddp = two_processes[1][0]["full"]["losses"]
    first, last = _losses(output)
    assert first == pytest.approx(ddp[0], abs=1e-5)
    assert last == pytest.approx(ddp[-1], abs=2e-3)
