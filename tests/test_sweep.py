"""`lion-dist sweep`: the grid it plans, the table and plots it writes, and how it resumes a killed sweep.

The planning and report tests build the sweep's cells and fake their finished runs on disk (a config record and
a summary, as the main job writes them), so they run in a second; one slow test runs a real tiny sweep, kills it
(the sweep process and its torchrun workers, SIGKILL) inside its second run, and resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from lion_dist import checkpoint
from lion_dist.train import cli, sweep
from lion_dist.train.config import OPTIMIZER_DEFAULTS, SWEEP_LR_GRIDS, TrainConfig
from tests.test_train import RUN_TIMEOUT, lion_dist_command, records, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def planned(tmp_path: Path, **kwargs) -> sweep.Sweep:
    base = TrainConfig(out=str(tmp_path / "sweep"), steps=400, micro_batch_size=16, grad_accum=2, eval_interval=50)
    options = {"grids": dict(SWEEP_LR_GRIDS), "seeds": 2, "batches": (64, 256, 1024), "lr_wd_product": 1e-4}
    return sweep.plan(base, 2, **{**options, **kwargs})


def test_plan_holds_tokens_and_decay_fixed_across_the_grid(tmp_path: Path) -> None:
    plan = planned(tmp_path)
    assert SWEEP_LR_GRIDS.keys() == OPTIMIZER_DEFAULTS.keys()  # every optimizer the job has gets a default grid
    assert len(plan.cells) == 3 * (4 + 4) * 2 and len({c.name for c in plan.cells}) == len(plan.cells)
    assert plan.tokens == 400 * 64 * 64
    by_batch = {c.batch: c.cfg for c in plan.cells}
    # a 4x larger batch: 4x the accumulation, a quarter of the steps, intervals at the same tokens
    assert {b: (c.grad_accum, c.steps, c.warmup_steps, c.eval_interval) for b, c in by_batch.items()} == {
        64: (2, 400, 40, 50),
        256: (8, 100, 10, 12),
        1024: (32, 25, 2, 3),
    }
    for cell in plan.cells:
        cfg = cell.cfg
        assert cfg.micro_batch_size * cfg.grad_accum * 2 * cfg.steps * cfg.seq_len == plan.tokens
        assert cfg.lr * cfg.weight_decay == pytest.approx(1e-4) and cfg.optimizer == cell.optimizer
        assert Path(cfg.out) == plan.out / f"b{cell.batch}" / cell.optimizer / f"lr{cell.lr:g}" / f"seed{cell.seed}"
    assert {c.seed for c in plan.cells} == {0, 1}
    assert sorted({c.lr for c in plan.cells if c.optimizer == "lion"}) == list(SWEEP_LR_GRIDS["lion"])
    # without --batch-sizes: only the train flags' own global batch
    assert {c.batch for c in planned(tmp_path, batches=None).cells} == {64}


def test_bad_sweep_flags_get_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    def launch(*args: object) -> int:
        raise AssertionError("a sweep with bad flags started a run")

    monkeypatch.setattr(sweep, "launch", launch)
    out = ["sweep", "--out", str(tmp_path / "sweep")]
    cases = [
        (["--batch-sizes", "100"], "a global batch must be a multiple of --micro-batch-size x workers = 16 x 2 = 32"),
        (["--batch-sizes", "96"], "is not a whole number of steps of 96"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--lion-lrs", "1e-3", "-1"], "--lion-lrs needs one or more lrs > 0"),
        (["--lr-wd-product", "0"], "--lr-wd-product must be > 0"),
        (["--resume", "--overwrite"], "pass one of them"),
        (["--report-only"], "holds no finished run of this sweep yet"),
        (["--optimizers", "sgd"], "invalid choice: 'sgd'"),
        (["--lr", "1e-3"], "unrecognized arguments: --lr"),  # the sweep sets each run's lr itself
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*out, "--nproc-per-node", "2", "--device", "cpu", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def fake_run(cell: sweep.Cell | TrainConfig, loss: float, state_bytes: int) -> None:
    """What the main job leaves in a finished run's --out: the config record, val records and the summary."""
    cfg = cell.cfg if isinstance(cell, sweep.Cell) else cell
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "config", **dataclasses.asdict(cfg), "world_size": 2, "n_params": 1000}]
    lines += [{"kind": "val", "step": s, "val_loss": loss + (cfg.steps - s) / cfg.steps} for s in (0, cfg.steps)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "step": cfg.steps,
        "steps": cfg.steps,
        "final_val_loss": loss,
        "tokens_per_s": 1000.0,
        "optimizer_state_bytes_per_rank": [state_bytes, state_bytes],
        "peak_memory_bytes_per_rank": [1 << 20, 1 << 20],
        "device": "cpu",
        "n_params": 1000,
    }
    (out / "summary.json").write_text(json.dumps(summary))


def test_report_picks_the_best_mean_and_pairs_the_seeds(tmp_path: Path) -> None:
    plan = planned(tmp_path, grids={"lion": (1e-4, 3e-4, 1e-3), "adamw": (1e-3, 3e-3)}, batches=(64, 256))

    def loss(cell: sweep.Cell) -> float:  # Lion best at 3e-4 at batch 64 (inside its grid), AdamW at 3e-3
        base = {(64, "lion"): {1e-4: 2.3, 3e-4: 2.0, 1e-3: 2.1}, (64, "adamw"): {1e-3: 2.2, 3e-3: 2.05}}
        base |= {(256, "lion"): {1e-4: 2.6, 3e-4: 2.5, 1e-3: 2.4}, (256, "adamw"): {1e-3: 2.3, 3e-3: 2.35}}
        if (cell.batch, cell.optimizer, cell.lr) == (256, "lion", 1e-3) and cell.seed == 1:
            return math.nan  # a diverged seed: its lr cannot win
        return base[(cell.batch, cell.optimizer)][cell.lr] + 0.01 * cell.seed

    for cell in plan.cells:
        fake_run(cell, loss(cell), 400 if cell.optimizer == "lion" else 804)
    report = sweep.write_report(plan, "lion-dist sweep --test")
    assert report == (plan.out / "sweep.md").read_text()
    assert "Made by `lion-dist sweep --test`" in report
    assert "20 of 20 runs finished" in report and f"{plan.tokens:,} tokens" in report
    # batch 64: Lion 2.000/2.010 at 3e-4 vs AdamW 2.050/2.060 at 3e-3 (the top of its grid): Lion lower by 0.05
    assert "| 64 | 400 | 0.0003 (wd 0.333) | 2.0050 ± 0.0071 [2.0000, 2.0100] |" in report
    assert "0.003 (wd 0.0333) (grid's highest: try higher) | 2.0550" in report
    assert "-0.0500 [-0.0500, -0.0500]" in report
    assert (
        "global batch 64: **Lion** is lower by 0.0500 nats (2.4% of AdamW's), on every one of the 2 seeds; "
        "best lrs: Lion 0.0003, AdamW 0.003 (AdamW's / Lion's = 10)."
    ) in report
    # batch 256: Lion's 1e-3 diverged on seed 1, so 3e-4 is its best; AdamW wins at 1e-3
    assert "| 256 | Lion | 0.001 | 0.1 | 2.4000 | nan | diverged |" in report
    assert "| 256 | 100 | 0.0003 (wd 0.333) | 2.5050" in report
    assert "global batch 256: **AdamW** is lower by 0.2000 nats" in report
    assert "Lion 400 / 400 bytes; AdamW 804 / 804 bytes" in report
    for name in ("sweep_lr.png", "sweep_best.png", "sweep_batch.png"):
        assert (plan.out / name).read_bytes()[:8] == PNG and f"]({name})" in report
    record = json.loads((plan.out / "sweep.json").read_text())
    assert [(p["batch"], p["optimizer"], p["lr"]) for p in record["best"]] == [
        (64, "lion", 3e-4),
        (64, "adamw", 3e-3),
        (256, "lion", 3e-4),
        (256, "adamw", 1e-3),
    ]
    diverged = next(p for p in record["points"] if (p["batch"], p["optimizer"], p["lr"]) == (256, "lion", 1e-3))
    assert diverged["losses_by_seed"] == {"0": 2.4, "1": None} and diverged["mean"] is None


def test_confirm_seeds_rerun_only_the_winners_and_a_rerun_skips_finished_runs(tmp_path: Path, monkeypatch) -> None:
    """`run` with a stand-in for the main job: the grid, then the best lrs' confirm seeds, then nothing on --resume."""
    plan = planned(tmp_path, grids={"lion": (1e-4, 1e-3), "adamw": (1e-3, 3e-3)}, batches=(64,), seeds=1)
    plan = sweep.plan(plan.base, 2, grids=plan.grids, seeds=1, batches=(64,), lr_wd_product=1e-4, confirm_seeds=2)
    losses = {("lion", 1e-4): 2.3, ("lion", 1e-3): 2.0, ("adamw", 1e-3): 2.1, ("adamw", 3e-3): 2.2}
    launched: list[TrainConfig] = []

    def launch(cfg: TrainConfig, nproc: int) -> int:
        launched.append(cfg)
        fake_run(cfg, losses[(cfg.optimizer, cfg.lr)] + 0.02 * cfg.seed, 400)
        return 0

    monkeypatch.setattr(sweep, "launch", launch)
    assert sweep.run(plan, resume=False, overwrite=False, command="lion-dist sweep --test") == 0
    ran = [(c.optimizer, c.lr, c.seed) for c in launched]
    grid = [("lion", 1e-4, 0), ("lion", 1e-3, 0), ("adamw", 1e-3, 0), ("adamw", 3e-3, 0)]
    assert ran == [*grid, ("lion", 1e-3, 1), ("lion", 1e-3, 2), ("adamw", 1e-3, 1), ("adamw", 1e-3, 2)]
    assert all(not c.resume and c.overwrite for c in launched)  # nothing to continue: each starts clean
    report = (plan.out / "sweep.md").read_text()
    assert "8 of 8 runs finished" in report and "only the best lrs then ran seeds 1, 2 too" in report
    assert "| 0.001 (wd 0.1) (grid's highest: try higher) | 2.0200 ± 0.0200 [2.0000, 2.0400] |" in report  # seeds 0-2
    assert "| 64 | Lion | 0.0001 | 1 | 2.3000 | – | – | 2.3000 |" in report
    assert "-0.1000 [-0.1000, -0.1000]" in report and "on every one of the 3 seeds" in report

    launched.clear()  # the same sweep again: everything is done
    with pytest.raises(ValueError, match="Pass --resume to continue it"):
        sweep.run(plan, resume=False, overwrite=False, command="lion-dist sweep --test")
    assert sweep.run(plan, resume=True, overwrite=False, command="lion-dist sweep --test") == 0 and not launched
    # a run stopped after a complete checkpoint continues from it; one stopped before any starts over
    stopped = plan.cells[1]
    early = next(c for c in plan.confirm if (c.optimizer, c.lr, c.seed) == ("adamw", 1e-3, 2))
    (stopped.out / "summary.json").unlink()
    (early.out / "summary.json").unlink()
    (stopped.out / "checkpoints" / "step_00000100").mkdir(parents=True)
    (stopped.out / "checkpoints" / "step_00000100" / checkpoint.MARKER).write_text('{"step": 100}')
    assert sweep.run(plan, resume=True, overwrite=False, command="lion-dist sweep --test") == 0
    assert [(c.out, c.resume, c.overwrite) for c in launched] == [
        (stopped.cfg.out, True, False),
        (early.cfg.out, False, True),
    ]


def test_a_run_of_other_settings_is_never_taken_for_this_sweeps(tmp_path: Path) -> None:
    grids = {"lion": (1e-3,)}
    old = planned(tmp_path, grids=grids, batches=None, seeds=1)
    fake_run(old.cells[0], 2.0, 400)
    assert sweep.status(old.cells[0]) == "done"
    longer = dataclasses.replace(old.base, steps=800)
    new = sweep.plan(longer, 2, grids=grids, seeds=1, batches=None, lr_wd_product=1e-4)
    assert new.cells[0].out == old.cells[0].out
    with pytest.raises(ValueError, match=r"holds a run with other settings \(steps 400 -> 800; .*--overwrite"):
        sweep.status(new.cells[0])
    # a field the recorded run did not know yet (a newer TrainConfig) counts as its default
    metrics = old.cells[0].out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    config = json.loads(lines[0])
    del config["device"]
    metrics.write_text("\n".join([json.dumps(config), *lines[1:]]) + "\n")
    assert sweep.status(old.cells[0]) == "done"
    # a started, unfinished run
    (old.cells[0].out / "summary.json").unlink()
    assert sweep.status(old.cells[0]) == "partial"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_tree(pid: int) -> None:
    """SIGKILL the sweep and its torchrun workers (each in its own session, so not its process group)."""
    os.kill(pid, signal.SIGSTOP)  # freeze it, so that it starts no new worker while we look
    for child in _children(pid):
        os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


TINY_SWEEP = [
    *("--data", str(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"), "--steps", "32", "--n-layer", "1"),
    *("--d-model", "32", "--n-head", "2", "--seq-len", "32", "--micro-batch-size", "4", "--grad-accum", "2"),
    *("--eval-seqs", "16", "--eval-interval", "8", "--ckpt-interval", "4", "--log-interval", "4", "--samples", "0"),
    *("--optimizers", "lion", "adamw", "--lion-lrs", "1e-3", "3e-3", "--adamw-lrs", "3e-3", "--seeds", "1"),
]


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), *TINY_SWEEP]
    first, second, third = (
        out / "b16" / o / f"lr{lr}" / "seed0" for o, lr in (("lion", 0.001), ("lion", 0.003), ("adamw", 0.003))
    )
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([*lion_dist_command(), *argv], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while checkpoint.latest_complete(second / "checkpoints") is None:  # the second run is under way
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep did not reach its second run"
            time.sleep(0.05)
        _kill_tree(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    assert (first / "summary.json").exists() and not (second / "summary.json").exists() and not third.exists()
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (first / "summary.json", first / "metrics.jsonl")}

    with pytest.raises(SystemExit) as refused:  # the same command again: it will not mix runs silently
        cli.main(argv)
    assert refused.value.code == 2 and "Pass --resume to continue it" in capsys.readouterr().err

    result = run_cli(*argv, "--resume")
    assert "[1/3] b16/lion/lr0.001/seed0: finished earlier" in result.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished} == finished  # not redone
    assert "resumed from" in result.stdout and len(records(second, "resume")) == 1  # from its own checkpoint
    summaries = {o: json.loads((o / "summary.json").read_text()) for o in (first, second, third)}
    assert all(s["step"] == s["steps"] == 32 for s in summaries.values())
    table = (out / "sweep.md").read_text()
    assert table in result.stdout and "3 of 3 runs finished" in table
    for o, s in summaries.items():
        assert f"{s['final_val_loss']:.4f}" in table, o
    lion_best = min((first, second), key=lambda o: summaries[o]["final_val_loss"])
    lion_lr = {first: "0.001", second: "0.003"}[lion_best]
    assert f"| 16 | Lion | **{lion_lr}** |" in table
    diff = summaries[lion_best]["final_val_loss"] - summaries[third]["final_val_loss"]
    assert f"{diff:+.4f} [{diff:+.4f}, {diff:+.4f}]" in table
    assert (out / "sweep_lr.png").read_bytes()[:8] == PNG and (out / "sweep_best.png").read_bytes()[:8] == PNG
    assert "--resume" not in table  # the command that made it, not how it was continued
    # --report-only rewrites the same table from the runs on disk, training nothing
    assert cli.main([*argv, "--report-only"]) == 0
    assert capsys.readouterr().out.strip() == table.strip() == (out / "sweep.md").read_text().strip()
