"""`lion-dist sweep`: Lion against AdamW with each tuned: an lr grid per optimizer, several seeds, several batches.

Every cell of the grid (global batch, optimizer, lr, seed) is one run of the main job, launched like `lion-dist
train`, in its own directory `--out/b{batch}/{optimizer}/lr{lr}/seed{seed}`. All cells train the same model on the
same data for the same number of tokens with the same schedule: a larger global batch takes proportionally fewer
steps (more accumulated micro batches each, so it fits on the same workers), and its warmup, eval, log and
checkpoint intervals shrink with the steps, so they stay at the same tokens. Weight decay is
`--lr-wd-product / lr`, so the decay per step, lr x wd, is the same in every cell (the paper's advice for Lion's
smaller lr). A seed fixes the initial model and the batch order, the same for both optimizers.

The best lr of each optimizer at each batch is the one with the lowest mean final validation loss over the
`--seeds`. `--confirm-seeds K` then reruns only those winners with K more seeds: the spread and the Lion - AdamW
difference are reported over all of them, at a fraction of the cost of K more seeds for the whole grid (the lr
is still chosen on the first seeds alone, so the extra seeds measure it without bias).

A finished cell (its summary reached its last step and its recorded config is this cell's) is skipped; an
unfinished one continues from its newest complete checkpoint. So an interrupted sweep continues with the same
command plus `--resume`, and a grid can be widened later the same way. At the end the sweep writes
`sweep.md` (the table), `sweep.json` (every number in it) and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lion_dist.train.config import TrainConfig, default_warmup_steps, validate
from lion_dist.train.launcher import launch, machine_description
from lion_dist.train.plot import Series, plot_spread, read_metrics

LABELS = {"lion": "Lion", "adamw": "AdamW"}
# Fields that may differ between the invocations of one cell (all others must match its recorded config).
_PER_INVOCATION = ("out", "resume", "overwrite", "stop_at")
_CELL_WALL = "sweep_cell.json"


@dataclass(frozen=True, eq=False)  # hashed by identity: a plan makes each cell once
class Cell:
    """One run of the sweep: its coordinates and the full config it trains with."""

    batch: int
    optimizer: str
    lr: float
    seed: int
    cfg: TrainConfig

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def name(self) -> str:
        return f"b{self.batch}/{self.optimizer}/lr{self.lr:g}/seed{self.seed}"


@dataclass(frozen=True)
class Sweep:
    """The grid: the base train config (its --steps at its own global batch set the token budget) and the cells."""

    base: TrainConfig
    nproc: int
    batches: tuple[int, ...]
    grids: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    lr_wd_product: float
    cells: tuple[Cell, ...]
    confirm_seeds: tuple[int, ...] = ()
    confirm: tuple[Cell, ...] = ()  # every lr's cells at the confirm seeds; only the winners' ever run

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return self.seeds + self.confirm_seeds

    @property
    def out(self) -> Path:
        return Path(self.base.out)

    @property
    def sequences(self) -> int:
        """Sequences every run trains on: --steps x the global batch of the train flags."""
        return self.base.steps * self.base.micro_batch_size * self.base.grad_accum * self.nproc

    @property
    def tokens(self) -> int:
        return self.sequences * self.base.seq_len


def plan(
    base: TrainConfig,
    nproc: int,
    *,
    grids: dict[str, tuple[float, ...]],
    seeds: int,
    batches: tuple[int, ...] | None,
    lr_wd_product: float,
    confirm_seeds: int = 0,
) -> Sweep:
    """The sweep's cells; raises a ValueError naming the bad flag before anything runs."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds!r}")
    if confirm_seeds < 0:
        raise ValueError(f"--confirm-seeds must be >= 0, got {confirm_seeds!r}")
    if not lr_wd_product > 0:
        raise ValueError(f"--lr-wd-product must be > 0 (weight decay = it / lr), got {lr_wd_product!r}")
    for name, grid in grids.items():
        if not grid or not all(lr > 0 for lr in grid):
            raise ValueError(f"--{name}-lrs needs one or more lrs > 0, got {list(grid)!r}")
    validate(base)
    per_step = base.micro_batch_size * nproc  # sequences of one accumulation round over all workers
    sequences = base.steps * per_step * base.grad_accum
    batches = tuple(sorted(set(batches or (per_step * base.grad_accum,))))
    for batch in batches:
        if batch < 1 or batch % per_step:
            raise ValueError(
                f"--batch-sizes {batch}: a global batch must be a multiple of --micro-batch-size x workers = "
                f"{base.micro_batch_size} x {nproc} = {per_step} (it is accumulated from micro batches); "
                f"e.g. {max(1, round(batch / per_step)) * per_step}"
            )
        if sequences % batch:
            raise ValueError(
                f"--batch-sizes {batch}: the budget, --steps {base.steps} at the global batch {sequences // base.steps}"
                f" = {sequences:,} sequences, is not a whole number of steps of {batch}; pick batch sizes that "
                f"divide {sequences:,}, or change --steps"
            )
    warmup = default_warmup_steps(base.steps) if base.warmup_steps is None else base.warmup_steps
    cells, confirm = [], []
    for batch in batches:
        steps = sequences // batch

        def scaled(interval: int, steps: int = steps) -> int:  # the same number of tokens apart at every batch
            return max(1, round(interval * steps / base.steps))

        for optimizer, grid in grids.items():
            for lr in sorted(set(grid)):
                for seed in range(base.seed, base.seed + seeds + confirm_seeds):
                    cell = Cell(batch, optimizer, lr, seed, base)
                    cfg = dataclasses.replace(
                        base,
                        out=str(Path(base.out) / cell.name),
                        optimizer=optimizer,
                        lr=lr,
                        weight_decay=lr_wd_product / lr,
                        betas=None,
                        distributed_lion=False,
                        aggregate=None,
                        seed=seed,
                        steps=steps,
                        grad_accum=batch // per_step,
                        warmup_steps=round(warmup * steps / base.steps),
                        eval_interval=scaled(base.eval_interval),
                        log_interval=scaled(base.log_interval),
                        ckpt_interval=scaled(base.ckpt_interval) if base.ckpt_interval else 0,
                        stop_at=None,
                        resume=False,
                        overwrite=False,
                    )
                    validate(cfg)
                    (cells if seed < base.seed + seeds else confirm).append(dataclasses.replace(cell, cfg=cfg))
    grids = {name: tuple(sorted(set(grid))) for name, grid in grids.items()}
    seed_list = tuple(range(base.seed, base.seed + seeds))
    confirm_list = tuple(range(base.seed + seeds, base.seed + seeds + confirm_seeds))
    return Sweep(base, nproc, batches, grids, seed_list, lr_wd_product, tuple(cells), confirm_list, tuple(confirm))


# ---------------------------------------------------------------- the cells on disk


def _recorded_config(cell: Cell) -> dict[str, Any] | None:
    path = cell.out / "metrics.jsonl"
    if not path.exists():
        return None
    return next((r for r in read_metrics(path) if r.get("kind") == "config"), None)


def _differences(recorded: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'name: recorded -> wanted' for each setting the cell's earlier run had otherwise (new fields at defaults)."""
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as the record holds them
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    return [
        f"{name} {recorded.get(name, defaults[name])!r} -> {value!r}"
        for name, value in wanted.items()
        if name not in _PER_INVOCATION and recorded.get(name, defaults[name]) != value
    ]


def status(cell: Cell) -> str:
    """'new' (nothing on disk), 'partial' (started, unfinished) or 'done'; raises if it holds another run."""
    recorded = _recorded_config(cell)
    if recorded is None:
        return "partial" if (cell.out / "checkpoints").exists() else "new"
    changed = _differences(recorded, cell.cfg)
    if changed:
        raise ValueError(
            f"{cell.out} holds a run with other settings ({'; '.join(changed)}): resume with the flags of the sweep "
            "that made it, pass --overwrite to redo every cell, or use another --out"
        )
    summary = _summary(cell)
    return "done" if summary is not None and summary["step"] == summary["steps"] == cell.cfg.steps else "partial"


def _summary(cell: Cell) -> dict[str, Any] | None:
    path = cell.out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _wall_s(cell: Cell) -> float:
    path = cell.out / _CELL_WALL
    return json.loads(path.read_text())["wall_s"] if path.exists() else 0.0


def run(sweep: Sweep, *, resume: bool, overwrite: bool, command: str) -> int:
    """Run every unfinished cell of the grid, then the winners' confirm seeds, then write the report.

    Returns 0, or the exit code of a run that failed or was stopped (the sweep stops there).
    """
    statuses = {cell: "new" if overwrite else status(cell) for cell in (*sweep.cells, *sweep.confirm)}
    started = [cell for cell, s in statuses.items() if s != "new"]
    if started and not resume:
        raise ValueError(
            f"--out {str(sweep.out)!r} already holds {len(started)} of this sweep's runs (e.g. {started[0].out}). "
            "Pass --resume to continue it (finished runs are skipped), --overwrite to redo every run, or another --out."
        )
    confirm_runs = len(sweep.batches) * len(sweep.grids) * len(sweep.confirm_seeds)
    print(
        f"lion-dist sweep: {len(sweep.cells)} runs ({sum(statuses[c] == 'done' for c in sweep.cells)} finished "
        f"earlier) = {len(sweep.batches)} global batch size(s) x "
        f"({' + '.join(f'{len(g)} {LABELS[n]} lrs' for n, g in sweep.grids.items())}) x {len(sweep.seeds)} seed(s)"
        + (
            f", then {confirm_runs} runs of the best lrs at seeds {_seed_words(sweep.confirm_seeds)}"
            if confirm_runs
            else ""
        )
        + f"; {sweep.tokens:,} tokens each -> {sweep.out}",
        flush=True,
    )
    pace: list[float] = []  # wall seconds of the runs of this invocation, for the estimate of what is left
    code = _run_cells(sweep, list(sweep.cells), statuses, pace, confirm_runs)
    if code or not sweep.confirm:
        return code or _report(sweep, command)
    best_lrs = winners(sweep, collect(sweep)[0])
    chosen = [c for c in sweep.confirm if (w := best_lrs[(c.batch, c.optimizer)]) is not None and w.lr == c.lr]
    return _run_cells(sweep, chosen, statuses, pace, 0) or _report(sweep, command)


def _report(sweep: Sweep, command: str) -> int:
    print("\n" + write_report(sweep, command), flush=True)
    return 0


def _seed_words(seeds: tuple[int, ...]) -> str:
    return ", ".join(map(str, seeds))


def _run_cells(sweep: Sweep, cells: list[Cell], statuses: dict[Cell, str], pace: list[float], later: int) -> int:
    """Run `cells` in order (skipping finished ones, continuing started ones); `later`: runs still to come after."""
    from lion_dist import checkpoint

    for i, cell in enumerate(cells, 1):
        where = f"[{i}/{len(cells)}] {cell.name}"
        if statuses[cell] == "done":
            print(f"{where}: finished earlier (val loss {_summary(cell)['final_val_loss']:.4f}), skipped", flush=True)
            continue
        cont = statuses[cell] == "partial" and checkpoint.latest_complete(cell.out / "checkpoints") is not None
        cfg = dataclasses.replace(cell.cfg, resume=cont, overwrite=not cont)
        print(
            f"\n=== lion-dist sweep {where}: {LABELS[cell.optimizer]} lr {cell.lr:g}, weight decay "
            f"{cfg.weight_decay:.3g}, seed {cell.seed}, global batch {cell.batch} = {cfg.micro_batch_size} x "
            f"{cfg.grad_accum} x {sweep.nproc}, {cfg.steps} steps" + (" (continuing)" if cont else ""),
            flush=True,
        )
        start = time.perf_counter()
        code = launch(cfg, sweep.nproc)
        pace.append(time.perf_counter() - start)
        cell.out.mkdir(parents=True, exist_ok=True)
        wall = pace[-1] + (_wall_s(cell) if cont else 0.0)
        (cell.out / _CELL_WALL).write_text(json.dumps({"wall_s": wall}))
        if code:
            print(
                f"lion-dist sweep: {cell.name} stopped (exit code {code}); rerun the same command plus --resume to "
                "continue (finished runs are skipped)",
                flush=True,
            )
            return code
        statuses[cell] = "done"
        left = sum(statuses[c] != "done" for c in cells[i:]) + later
        print(
            f"lion-dist sweep: {cell.name} took {pace[-1]:.0f} s; about {left} runs left, "
            f"{left * statistics.fmean(pace) / 60:.0f} min at this pace",
            flush=True,
        )
    return 0


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Point:
    """One (global batch, optimizer, lr) of the grid: the final validation loss of each of its finished seeds."""

    batch: int
    optimizer: str
    lr: float
    weight_decay: float
    losses: dict[int, float]

    @property
    def finite(self) -> list[float]:
        return [v for v in self.losses.values() if math.isfinite(v)]

    @property
    def mean(self) -> float:
        """Mean over its seeds; inf when a seed diverged (a diverged lr is never the best)."""
        return self.mean_over(tuple(self.losses))

    def mean_over(self, seeds: tuple[int, ...]) -> float:
        values = [self.losses.get(s, math.nan) for s in seeds]
        return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.inf

    @property
    def sd(self) -> float:
        return statistics.stdev(self.finite) if len(self.finite) > 1 else math.nan


def collect(sweep: Sweep) -> tuple[list[Point], dict[Cell, dict[str, Any]]]:
    """The grid's points (finished seeds only, confirm seeds included) and the summary of every finished cell."""
    summaries = {cell: _summary(cell) for cell in (*sweep.cells, *sweep.confirm) if status(cell) == "done"}
    points = []
    for batch in sweep.batches:
        for optimizer, grid in sweep.grids.items():
            for lr in grid:
                mine = [c for c in summaries if (c.batch, c.optimizer, c.lr) == (batch, optimizer, lr)]
                losses = {c.seed: float(summaries[c]["final_val_loss"]) for c in mine}
                wd = sweep.lr_wd_product / lr
                points.append(Point(batch, optimizer, lr, wd, losses))
    return points, summaries


def best(points: list[Point], batch: int, optimizer: str, seeds: tuple[int, ...]) -> Point | None:
    """The lr with the lowest mean over the tuning `seeds` (lrs that have them all, none diverged); or None."""
    mine = [p for p in points if (p.batch, p.optimizer) == (batch, optimizer)]
    full = [p for p in mine if math.isfinite(p.mean_over(seeds))]
    return min(full, key=lambda p: p.mean_over(seeds)) if full else None


def winners(sweep: Sweep, points: list[Point]) -> dict[tuple[int, str], Point | None]:
    """The best point of each (global batch, optimizer), picked on the tuning seeds."""
    return {(b, o): best(points, b, o, sweep.seeds) for b in sweep.batches for o in sweep.grids}


def _loss(p: Point) -> str:
    if not p.losses:
        return "not run yet"
    if not math.isfinite(p.mean):
        return "diverged" if len(p.finite) < len(p.losses) else "n/a"
    spread = f" ± {p.sd:.4f} [{min(p.finite):.4f}, {max(p.finite):.4f}]" if len(p.losses) > 1 else ""
    return f"{p.mean:.4f}{spread}"


def _edge(p: Point, grid: tuple[float, ...]) -> str:
    if len(grid) < 2 or grid[0] < p.lr < grid[-1]:
        return ""
    return " (grid's lowest: try lower)" if p.lr == grid[0] else " (grid's highest: try higher)"


def _curve(cell_outs: list[Path], batch: int, seq_len: int) -> Series:
    """Validation loss against tokens seen, over the seeds of one point (steps every seed logged)."""
    per_seed = [
        {r["step"]: r["val_loss"] for r in read_metrics(o / "metrics.jsonl") if r["kind"] == "val"} for o in cell_outs
    ]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    return [(step * batch * seq_len, [s[step] for s in per_seed]) for step in steps]


def _intro(sweep: Sweep, first: dict[str, Any]) -> str:
    base = sweep.base
    warmup = default_warmup_steps(base.steps) if base.warmup_steps is None else base.warmup_steps
    data = base.data or "the Python standard library's source"
    return (
        f"Every run trains the same model ({first['n_params']:,} params: {base.n_layer} blocks, d_model "
        f"{base.d_model}, {base.n_head} heads) on the same data ({data}) for the "
        f"same {sweep.tokens:,} tokens ({sweep.sequences:,} sequences of {base.seq_len} characters), with the same "
        f"schedule: linear warmup over the first {warmup / base.steps:.1%} of the tokens, then cosine decay to "
        f"{base.min_lr_ratio:g} x lr; gradient clipping at {base.grad_clip:g}. Weight decay is "
        f"{sweep.lr_wd_product:g} / lr, so lr x wd is the same in every run; betas are each optimizer's defaults. "
        f"Seeds {_seed_words(sweep.seeds)}: a seed fixes the initial model and the batch order, for both optimizers "
        "alike, so differences at one seed are paired; the best lr of each optimizer is the lowest mean over them"
        + (
            f", and only the best lrs then ran seeds {_seed_words(sweep.confirm_seeds)} too (their loss, spread "
            "and the Lion − AdamW difference are over all their seeds). "
            if sweep.confirm_seeds
            else ". "
        )
        + "A larger global batch takes proportionally "
        "fewer steps, accumulated from the same micro batches on the same workers. Losses are the final validation "
        f"loss in nats per character on {base.eval_seqs} fixed held-out sequences: mean ± sd over seeds [min, max]."
    )


def _verdict(batch: int, lion: Point, adamw: Point, diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    winner, other = ("Lion", adamw) if mean < 0 else ("AdamW", lion)
    lower = all(d < 0 for d in diffs) if mean < 0 else all(d > 0 for d in diffs)
    if len(diffs) == 1:
        how = "on the one seed run (no spread to judge it by)"
    else:
        how = f"on every one of the {len(diffs)} seeds" if lower else "but not on every seed"
    return (
        f"- global batch {batch}: **{winner}** is lower by {abs(mean):.4f} nats "
        f"({100 * abs(mean) / other.mean:.1f}% of {'AdamW' if winner == 'Lion' else 'Lion'}'s), {how}; "
        f"best lrs: Lion {lion.lr:g}, AdamW {adamw.lr:g} (AdamW's / Lion's = {adamw.lr / lion.lr:.3g})."
    )


def write_report(sweep: Sweep, command: str) -> str:
    """Write sweep.md, sweep.json and the plots from the finished cells; returns the markdown."""
    points, summaries = collect(sweep)
    if not summaries:
        raise ValueError(f"--out {str(sweep.out)!r} holds no finished run of this sweep yet; run it first")
    first = next(iter(summaries.values()))
    best_lrs = winners(sweep, points)
    wall = sum(_wall_s(c) for c in summaries)
    machine = machine_description(first, sweep.nproc)
    both = "lion" in sweep.grids and "adamw" in sweep.grids
    columns = ["global batch", "steps"] + [
        f"{LABELS[o]}: {w}" for o in sweep.grids for w in ("best lr", "final val loss")
    ]
    columns += ["Lion − AdamW, mean [per seed min, max]"] if both else []
    total = len(sweep.cells) + len(sweep.batches) * len(sweep.grids) * len(sweep.confirm_seeds)
    lines = [
        "# lion-dist sweep: Lion vs AdamW, each at its best lr",
        "",
        f"Made by `{command}` on {machine}, {time.strftime('%Y-%m-%d')}: {len(summaries)} of {total} "
        f"runs finished, {wall / 3600:.2f} h of run time (the sum of the runs' wall times).",
        "",
        _intro(sweep, first),
        "",
        "## Best lr per optimizer and global batch",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    verdicts = []
    for b in sweep.batches:
        row = [str(b), str(sweep.sequences // b)]
        for o, grid in sweep.grids.items():
            p = best_lrs[(b, o)]
            row += ["n/a", "n/a"] if p is None else [f"{p.lr:g} (wd {p.weight_decay:.3g}){_edge(p, grid)}", _loss(p)]
        lion, adamw = best_lrs.get((b, "lion")), best_lrs.get((b, "adamw"))
        if lion is not None and adamw is not None:
            diffs = [
                lion.losses[s] - adamw.losses[s] for s in sweep.all_seeds if s in lion.losses and s in adamw.losses
            ]
            row.append(f"{statistics.fmean(diffs):+.4f} [{min(diffs):+.4f}, {max(diffs):+.4f}]")
            verdicts.append(_verdict(b, lion, adamw, diffs))
        elif both:
            row.append("n/a")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *verdicts] if verdicts else []
    state = {}
    for cell, summary in summaries.items():
        state.setdefault(cell.optimizer, summary["optimizer_state_bytes_per_rank"])
    lines += [
        "",
        "Optimizer state per rank (the same at every batch and lr): "
        + "; ".join(f"{LABELS[o]} {' / '.join(f'{x:,}' for x in b)} bytes" for o, b in state.items())
        + ".",
        "",
        "## Every run: final validation loss",
        "",
        "| global batch | optimizer | lr | weight decay |"
        + "".join(f" seed {s} |" for s in sweep.all_seeds)
        + " mean |",
        "|" + "---|" * (5 + len(sweep.all_seeds)),
    ]
    for p in points:
        mark = "**" if best_lrs[(p.batch, p.optimizer)] is p else ""
        seeds = "".join(f" {p.losses[s]:.4f} |" if s in p.losses else " – |" for s in sweep.all_seeds)
        lines.append(
            f"| {p.batch} | {LABELS[p.optimizer]} | {mark}{p.lr:g}{mark} | {p.weight_decay:.3g} |{seeds} {_loss(p)} |"
        )
    lines += ["", "The best lr of each optimizer at each batch in bold.", ""]
    lines += [f"![{alt}]({name})" for name, alt in _plots(sweep, points, best_lrs)] + [""]
    report = "\n".join(lines)
    (sweep.out / "sweep.md").write_text(report)
    record = _record(sweep, command, machine, points, best_lrs, summaries)
    (sweep.out / "sweep.json").write_text(json.dumps(record, indent=1))
    return report


def _plots(sweep: Sweep, points: list[Point], best_lrs: dict[tuple[int, str], Point | None]) -> list[tuple[str, str]]:
    """Draw the plots that have data; returns (file name, alt text) of each."""
    out, drawn = sweep.out, []
    lr_panels = {
        f"global batch {b}": {
            LABELS[o]: [
                (p.lr, list(p.losses.values())) for p in points if (p.batch, p.optimizer) == (b, o) and p.losses
            ]
            for o in sweep.grids
        }
        for b in sweep.batches
    }
    plot_spread(
        lr_panels,
        out / "sweep_lr.png",
        title="Final validation loss against lr (each seed, and the mean)",
        xlabel="peak lr",
    )
    drawn.append(("sweep_lr.png", "final validation loss against lr"))
    curves = {}
    for b in sweep.batches:
        panel = {}
        for o in sweep.grids:
            p = best_lrs[(b, o)]
            if p is not None:
                outs = [c.out for c in sweep.cells if (c.batch, c.optimizer, c.lr) == (b, o, p.lr)]
                panel[f"{LABELS[o]}, lr {p.lr:g}"] = _curve(outs, b, sweep.base.seq_len)
        curves[f"global batch {b}"] = panel
    if any(curves.values()):
        plot_spread(
            curves,
            out / "sweep_best.png",
            title="Validation loss of each optimizer at its best lr (mean over seeds, min-max shaded)",
            xlabel="tokens seen",
            ylabel="validation loss (nats per char)",
            logx=False,
            curve=True,
        )
        drawn.append(("sweep_best.png", "validation loss curves at the best lrs"))
    if len(sweep.batches) > 1:
        series = {
            LABELS[o]: [(b, list(best_lrs[(b, o)].losses.values())) for b in sweep.batches if best_lrs[(b, o)]]
            for o in sweep.grids
        }
        title = f"Best final validation loss against global batch ({sweep.tokens:,} tokens each)"
        plot_spread(
            {"each optimizer at its best lr": series},
            out / "sweep_batch.png",
            title=title,
            xlabel="global batch (sequences)",
        )
        drawn.insert(0, ("sweep_batch.png", "best final validation loss against global batch"))
    return drawn


def _record(
    sweep: Sweep,
    command: str,
    machine: str,
    points: list[Point],
    best_lrs: dict[tuple[int, str], Point | None],
    summaries: dict[Cell, dict[str, Any]],
) -> dict[str, Any]:
    """Every number of the report, for other tools (and for the README's figures)."""

    def number(x: float) -> float | None:  # JSON has no inf or NaN: a diverged or single-seed value is null
        return x if math.isfinite(x) else None

    def point(p: Point) -> dict[str, Any]:
        losses = {str(s): number(v) for s, v in p.losses.items()}
        return {
            "batch": p.batch,
            "optimizer": p.optimizer,
            "lr": p.lr,
            "weight_decay": p.weight_decay,
            "losses_by_seed": losses,
            "mean": number(p.mean),
            "sd": number(p.sd),
        }

    return {
        "command": command,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "tokens_per_run": sweep.tokens,
        "base_config": dataclasses.asdict(sweep.base),
        "workers": sweep.nproc,
        "batches": list(sweep.batches),
        "steps": {str(b): sweep.sequences // b for b in sweep.batches},
        "grids": {o: list(g) for o, g in sweep.grids.items()},
        "seeds": list(sweep.seeds),
        "confirm_seeds": list(sweep.confirm_seeds),
        "lr_wd_product": sweep.lr_wd_product,
        "best": [point(p) for p in best_lrs.values() if p is not None],
        "points": [point(p) for p in points],
        "runs": [
            {
                "cell": c.name,
                "final_val_loss": number(s["final_val_loss"]),
                "tokens_per_s": s["tokens_per_s"],
                "optimizer_state_bytes_per_rank": s["optimizer_state_bytes_per_rank"],
                "peak_memory_bytes_per_rank": s["peak_memory_bytes_per_rank"],
                "wall_s": _wall_s(c),
            }
            for c, s in summaries.items()
        ],
        "finished": len(summaries),
        "total": len(sweep.cells),
    }
