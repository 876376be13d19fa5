"""The main job end to end: `lion-dist train` and `lion-dist compare` on 2 gloo workers (tiny model, few steps).

These launch the real console script (torchrun, FSDP2, DCP), so they run in subprocesses rather than through
`tests/distributed.spawn`: what is tested is the job a user runs. Every run uses the same tiny flags, so the
runs double as determinism checks (same seed, same world size -> identical params). The compare run includes
the Distributed Lion variant, which is also the `train --distributed-lion` smoke run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lion_dist import checkpoint, distributed_lion
from lion_dist.train import cli, config
from lion_dist.train.config import OPTIMIZER_DEFAULTS, GPTConfig, TrainConfig, resolve_hyperparams
from lion_dist.train.data import eval_batches, load_corpus, train_batches
from lion_dist.train.model import GPT
from lion_dist.train.optimizers import OPTIMIZERS, lr_at

pytestmark = pytest.mark.slow

STEPS = 12
TINY = [
    *("--steps", str(STEPS), "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32"),
    *("--micro-batch-size", "4", "--grad-accum", "2", "--eval-seqs", "16", "--eval-interval", "4"),
    *("--ckpt-interval", "4", "--log-interval", "2", "--samples", "1", "--sample-chars", "20"),
    *("--lr", "3e-3", "--weight-decay", "0.1"),
]
RUN_TIMEOUT = 240


def lion_dist_command() -> list[str]:
    """The installed `lion-dist` console script next to this interpreter, else the same entry point via -c."""
    script = Path(sys.executable).with_name("lion-dist")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from lion_dist.train.cli import main; sys.exit(main())"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*lion_dist_command(), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=os.environ.copy()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"lion-dist {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return result


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(out: Path) -> tuple[list[tuple[int, float]], dict[int, float]]:
    """(train (step, loss) pairs, {step: val loss}) of a run: what must match between equivalent runs."""
    return [(r["step"], r["loss"]) for r in records(out, "train")], {
        r["step"]: r["val_loss"] for r in records(out, "val")
    }


def saved_state(out: Path, step: int, tmp: Path) -> dict:
    """Model and optimizer tensors of a run's checkpoint at `step`, gathered into full tensors."""
    path = checkpoint.checkpoint_dir(out / "checkpoints", step)
    assert checkpoint.read_marker(path) is not None, f"{path} is not a complete checkpoint"
    target = tmp / f"{out.name}_{step}.pt"
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    """Bit-identical model params and optimizer state."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"param {name} differs"
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for name, state in a["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optim"]["state"][name][key]), f"optimizer state {name}.{key} differs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def reference(workdir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted tiny Lion run on 2 workers; the other runs are checked against it."""
    out = workdir / "reference"
    return out, run_cli("train", "--out", str(out), *TINY)


def test_train_writes_outputs_and_loss_falls(reference) -> None:
    out, result = reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == summary["steps"] == STEPS
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 * 2 * 2
    val = losses(out)[1]
    assert sorted(val) == [0, 4, 8, 12]
    assert val[STEPS] < val[0] - 0.3, f"validation loss did not fall: {val}"
    assert summary["final_val_loss"] == val[STEPS]
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(2, STEPS + 1, 2))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    # Lion keeps one fp32 momentum per local shard: together the ranks hold exactly one per param.
    assert sum(summary["optimizer_state_bytes_per_rank"]) == 4 * summary["n_params"]
    assert all(m > 0 for m in summary["peak_memory_bytes_per_rank"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(summary["samples"]) == 1 and len(summary["samples"][0]["continuation"]) == 20
    # what the user sees: the summary on stdout, the batch guard's warning (global batch 16 < 64) on stderr
    assert "val loss" in result.stdout and "bytes per rank" in result.stdout and "sample 1" in result.stdout
    assert "SmallBatchWarning" in result.stderr and "effective batch is 16" in result.stderr
    # checkpoints: the newest --keep-checkpoints (2) complete ones
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000008", "step_00000012"]


def test_stop_then_resume_equals_uninterrupted_run(reference, workdir: Path, tmp_path: Path) -> None:
    """Stop at step 6, plant a half-written checkpoint at step 8, resume: same steps, metrics and bits."""
    ref_out, _ = reference
    out = workdir / "resumed"
    run_cli("train", "--out", str(out), *TINY, "--stop-at", "6")
    assert checkpoint.read_marker(checkpoint.checkpoint_dir(out / "checkpoints", 6))["step"] == 6
    assert not (out / "summary.json").read_text().count('"samples": [{')  # samples only at the real end
    partial = checkpoint.checkpoint_dir(out / "checkpoints", 8)
    shutil.copytree(checkpoint.checkpoint_dir(out / "checkpoints", 6), partial)
    (partial / checkpoint.MARKER).unlink()  # every shard written, but never marked complete

    result = run_cli("train", "--out", str(out), *TINY, "--resume")
    assert "resumed from" in result.stdout and "step_00000006" in result.stdout
    assert records(out, "resume") == [
        {
            "kind": "resume",
            "step": 6,
            "checkpoint": str(checkpoint.checkpoint_dir(out / "checkpoints", 6)),
            "world_size": 2,
        }
    ]
    ref_train, ref_val = losses(ref_out)
    train, val = losses(out)
    assert train == ref_train
    assert {s: v for s, v in val.items() if s in ref_val} == ref_val
    assert checkpoint.read_marker(partial)["step"] == 8  # the resumed run rewrote step 8 and marked it
    assert_same_tensors(saved_state(out, STEPS, tmp_path), saved_state(ref_out, STEPS, tmp_path))


@pytest.fixture(scope="module")
def compared(workdir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """`compare` of Lion, AdamW and Distributed Lion (vote) with the reference's flags."""
    out = workdir / "compare"
    return out, run_cli("compare", "--out", str(out), *TINY, "--variants", "lion", "adamw", "distributed-lion")


def test_compare_and_same_seed_determinism(reference, compared, tmp_path: Path) -> None:
    """`compare` writes the plot and table; its Lion run is a second run of the reference's flags: same bits."""
    out, result = compared
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| Lion (lion_dist.Lion) |" in table and "| AdamW (torch.optim.AdamW) |" in table
    assert "| Distributed Lion, vote (lion_dist.distributed_lion) |" in table
    assert "Lowest final validation loss" in table and table in result.stdout
    lion, adamw = (json.loads((out / name / "summary.json").read_text()) for name in ("lion", "adamw"))
    assert adamw["optimizer"] == "adamw" and adamw["steps"] == lion["steps"] == STEPS
    for summary in (lion, adamw):
        val = losses(out / summary["optimizer"])[1]
        assert val[STEPS] < val[0] - 0.3, f"{summary['optimizer']}: validation loss did not fall: {val}"
        assert f"{summary['final_val_loss']:.4f}" in table
    # AdamW keeps two moments per element (plus a step counter per tensor), Lion one
    assert sum(adamw["optimizer_state_bytes_per_rank"]) >= 2 * sum(lion["optimizer_state_bytes_per_rank"])

    ref_out, _ = reference
    assert losses(out / "lion") == losses(ref_out)
    assert_same_tensors(saved_state(out / "lion", STEPS, tmp_path), saved_state(ref_out, STEPS, tmp_path))


def test_distributed_lion_replicas_stay_identical_and_resume_exactly(compared, workdir: Path, tmp_path: Path) -> None:
    """`train --distributed-lion` (compare's variant): the loss falls, both replicas end with the same params, the
    checkpoint keeps each replica's own momentum, and a resume equals the uninterrupted run bit for bit."""
    out = compared[0] / "distributed-lion"
    summary = json.loads((out / "summary.json").read_text())
    val = losses(out)[1]
    assert val[STEPS] < val[0] - 0.3, f"validation loss did not fall: {val}"
    assert f"{summary['final_val_loss']:.4f}" in (compared[0] / "compare.md").read_text()
    exchange, n = summary["distributed_lion"], summary["n_params"]
    assert (exchange["aggregate"], exchange["replicas"], exchange["transport"]) == ("vote", 2, "gather")
    # 2 workers: each sends its n sign bits to the other; a ring all-reduce of fp32 gradients sends 4 n bytes
    assert exchange["bytes_sent_per_worker_per_step"] == math.ceil(n / 8)
    assert exchange["fp32_all_reduce_bytes_per_worker_per_step"] == 4 * n
    assert sum(summary["optimizer_state_bytes_per_rank"]) == 2 * 4 * n  # a whole momentum on each replica

    state = saved_state(out, STEPS, tmp_path)
    vocab = state["model"]["tok_emb.weight"].shape[0]
    names = [name for name, _ in GPT(GPTConfig(vocab, seq_len=32, n_layer=1, n_head=2, d_model=32)).named_parameters()]
    saved_params = hashlib.sha256(b"".join(state["model"][k].view(torch.uint8).numpy().tobytes() for k in names))
    # every rank hashed its own params at the end: all equal, and equal to the checkpoint's
    assert exchange["param_sha256_per_rank"] == [saved_params.hexdigest()] * 2
    momenta = [state["optim"]["state"][name]["exp_avg"] for name in names]
    assert all(m.shape == (2, *state["model"][k].shape) for m, k in zip(momenta, names, strict=True))
    assert not all(torch.equal(m[0], m[1]) for m in momenta), "each replica keeps its own momentum"

    # resume a copy of the run from its step 8 checkpoint: first without --distributed-lion (refused), then with it
    resumed = workdir / "distributed-resumed"
    shutil.copytree(
        checkpoint.checkpoint_dir(out / "checkpoints", 8), checkpoint.checkpoint_dir(resumed / "checkpoints", 8)
    )
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    refused = run_cli("train", "--out", str(resumed), *TINY, "--resume", check=False)
    assert refused.returncode != 0 and "holds one momentum per replica" in refused.stderr
    result = run_cli("train", "--out", str(resumed), *TINY, "--distributed-lion", "--resume")
    assert "resumed from" in result.stdout and "params bit-identical on all 2 ranks" in result.stdout
    assert losses(resumed) == losses(out)
    assert_same_tensors(saved_state(resumed, STEPS, tmp_path), state)


def test_bad_input_gets_a_clear_error(reference, capsys, tmp_path: Path) -> None:
    ref_out, _ = reference
    cases = [
        (["train", "--steps", "0"], "--steps must be a positive integer, got 0"),
        (["train", "--data", str(tmp_path / "missing.txt")], "no such file"),
        (["train", "--n-head", "3", "--d-model", "32"], "d_model (32) must be divisible by n_head (3)"),
        (["train", "--stop-at", "20", "--steps", "10"], "--stop-at must be in [1, --steps=10], got 20"),
        (["train", "--out", str(ref_out)], "--resume to continue it, --overwrite"),
        (["compare", "--out", str(tmp_path), "--resume", "--overwrite"], "pass one of them"),
        (["train", "--optimizer", "adamw", "--distributed-lion"], "needs --optimizer lion, got 'adamw'"),
        (["train", "--aggregate", "mean"], "together with --distributed-lion"),
        (["compare", "--variants", "lion", "sgd"], "invalid choice: 'sgd'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_lion_defaults_are_the_swept_ones_flags_override_them_and_schedule() -> None:
    lr, wd, betas, note = resolve_hyperparams(TrainConfig(optimizer="lion"))
    assert (lr, wd) == (1e-3, 0.1) and betas == (0.9, 0.99)
    assert "docs/sweep.md" in note
    assert resolve_hyperparams(TrainConfig(optimizer="adamw"))[:3] == (1e-3, 0.1, (0.9, 0.95))
    assert resolve_hyperparams(TrainConfig(optimizer="lion", lr=1e-4))[:2] == (1e-4, 0.1)
    lr, wd, _, note = resolve_hyperparams(TrainConfig(optimizer="lion", lr=3e-3, weight_decay=0.03))
    assert (lr, wd) == (3e-3, 0.03) and "docs/sweep.md" not in note
    assert OPTIMIZERS.keys() == OPTIMIZER_DEFAULTS.keys()
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(5, 1.0, cfg) == 0.5 and lr_at(10, 1.0, cfg) == 1.0
    assert lr_at(100, 1.0, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, 1.0, cfg) >= lr_at(s + 1, 1.0, cfg) for s in range(10, 100))


def test_variant_flags_round_trip() -> None:
    """compare rebuilds each variant's train flags from the config: nothing may get lost on the way."""
    cfg = TrainConfig(out="x", data="d.txt", stop_at=3, lr=0.5, betas=(0.8, 0.9), resume=True, seq_len=7)
    variant = cli._variant_config(cfg, cli.VARIANTS["adamw"])
    assert variant == TrainConfig(**{**vars(cfg), "optimizer": "adamw"})
    variant = cli._variant_config(cfg, cli.VARIANTS["distributed-lion-mean"])
    assert variant == TrainConfig(**{**vars(cfg), "distributed_lion": True, "aggregate": "mean"})
    # Distributed Lion is opt-in: a plain `compare` runs Lion and AdamW only
    assert cli.build_parser().parse_args(["compare"]).variants == ["lion", "adamw"]
    assert config.AGGREGATES == distributed_lion.AGGREGATES


def test_batches_depend_on_seed_and_step_only(tmp_path: Path) -> None:
    """A step's global batch is the same set of sequences for any split into ranks and micro batches."""
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + i % 90) for i in range(5000)) + "é\n")
    corpus = load_corpus(str(text), val_fraction=0.2)
    assert corpus.chars == "".join(sorted(set(text.read_text())))
    assert (len(corpus.train), len(corpus.val)) == (4001, 1001)
    assert corpus.decode(corpus.train[:5]) == ' !"#$'

    def global_batch(world: int, micro: int, accum: int, step: int = 3, seed: int = 0) -> list[list[int]]:
        sequences = [
            x.tolist()
            for rank in range(world)
            for xs, _ in train_batches(
                corpus.train,
                step=step,
                seed=seed,
                seq_len=8,
                micro_batch=micro,
                grad_accum=accum,
                rank=rank,
                world=world,
            )
            for x in xs
        ]
        return sorted(sequences)

    reference = global_batch(2, 4, 2)
    assert len(reference) == 16
    assert global_batch(1, 4, 4) == global_batch(4, 2, 2) == global_batch(1, 16, 1) == reference
    assert global_batch(2, 4, 2, step=4) != reference and global_batch(2, 4, 2, seed=1) != reference

    # validation: every rank runs the same number of batches; each of the sequences counts exactly once
    for world in (1, 3):
        per_rank = [
            list(eval_batches(corpus.val, n_seqs=10, seq_len=8, micro_batch=3, rank=r, world=world))
            for r in range(world)
        ]
        assert len({len(batches) for batches in per_rank}) == 1
        assert sum(float(w.sum()) for batches in per_rank for _, _, w in batches) == 10
