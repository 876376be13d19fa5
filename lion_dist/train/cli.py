"""`lion-dist train` and `lion-dist compare`: launch the main job on local workers with torchrun.

`lion-dist train` runs torchrun (`torch.distributed.run --standalone --nproc-per-node N -m lion_dist.train`, in
this process) with the same flags; `python -m lion_dist.train` is the per-rank job, so a user's own
`torchrun --nproc-per-node N -m lion_dist.train ...` (multi-node too) runs the very same thing.
`lion-dist compare` runs the job once per variant (same model, data, seed and budget) and writes one plot and
one table. A variant is a name plus the train flags that make it: add one to `VARIANTS` to compare more
(`DEFAULT_VARIANTS` run without `--variants`). `lion-dist sweep` tunes each optimizer's lr over seeds and global
batch sizes (`sweep.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lion_dist.train import sweep, train_extra_message
from lion_dist.train.config import (
    ADAMW_LR,
    ADAMW_WEIGHT_DECAY,
    AGGREGATES,
    BF16_UPDATES,
    MOMENTUM_DTYPES,
    OPTIMIZER_DEFAULTS,
    PARAM_DTYPES,
    SWEEP_LR_GRIDS,
    TrainConfig,
    check_out_dir,
    layout,
    validate,
)
from lion_dist.train.launcher import launch, machine_description, to_argv
from lion_dist.train.plot import plot_runs, read_metrics


@dataclass(frozen=True)
class Variant:
    """One contestant of `lion-dist compare`: a label for the plot and table, and its train flags."""

    label: str
    train_args: tuple[str, ...]


VARIANTS: dict[str, Variant] = {
    "lion": Variant("Lion (lion_dist.Lion)", ("--optimizer", "lion")),
    "adamw": Variant("AdamW (torch.optim.AdamW)", ("--optimizer", "adamw")),
    "distributed-lion": Variant(
        "Distributed Lion, vote (lion_dist.distributed_lion)", ("--optimizer", "lion", "--distributed-lion")
    ),
    "distributed-lion-mean": Variant(
        "Distributed Lion, mean (lion_dist.distributed_lion)",
        ("--optimizer", "lion", "--distributed-lion", "--aggregate", "mean"),
    ),
    # 8-bit momentum (issue 16's study): the block size and the requantization's rounding
    "lion-int8": Variant(
        "Lion, int8 momentum (block 128, stochastic)", ("--optimizer", "lion", "--momentum-dtype", "int8")
    ),
    "lion-int8-nearest": Variant(
        "Lion, int8 momentum (block 128, nearest)",
        ("--optimizer", "lion", "--momentum-dtype", "int8", "--int8-rounding", "nearest"),
    ),
    **{
        f"lion-int8-b{block}": Variant(
            f"Lion, int8 momentum (block {block}, stochastic)",
            ("--optimizer", "lion", "--momentum-dtype", "int8", "--int8-block-size", str(block)),
        )
        for block in (32, 256)
    },
    # pure bf16 params, no fp32 master weights: how their small updates survive the rounding
    **{
        f"lion-bf16-{update}": Variant(
            f"Lion, bf16 params ({update})",
            ("--optimizer", "lion", "--param-dtype", "bfloat16", "--bf16-update", update),
        )
        for update in ("nearest", "stochastic", "compensation")
    },
    "lion-bf16-compensation-int8": Variant(
        "Lion, bf16 params (compensation), int8 momentum",
        (
            "--optimizer",
            "lion",
            "--param-dtype",
            "bfloat16",
            "--bf16-update",
            "compensation",
            "--momentum-dtype",
            "int8",
        ),
    ),
}
DEFAULT_VARIANTS = ("lion", "adamw")


def _add_train_flags(
    parser: argparse.ArgumentParser, *, out: str, with_optimizer: bool, omit: tuple[str, ...] = ()
) -> None:
    """The train flags on `parser`; `omit` leaves out those a command sets itself (by TrainConfig field name)."""
    d = TrainConfig()

    def add(flag: str, **kwargs: Any) -> None:
        if flag[2:].replace("-", "_") not in omit:
            parser.add_argument(flag, **kwargs)

    add("--out", default=out, help=f"output directory (default: {out})")
    add("--data", default=None, metavar="FILE", help="a UTF-8 text file (default: the Python stdlib's source)")
    add("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    add(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="end this invocation at STEP (checkpointed), "
        "keeping the schedule of --steps; continue later with --resume",
    )
    add(
        "--micro-batch-size",
        type=int,
        default=d.micro_batch_size,
        help=f"sequences per rank per forward (default: {d.micro_batch_size})",
    )
    add("--grad-accum", type=int, default=d.grad_accum, help=f"micro batches per step (default: {d.grad_accum})")
    add("--seq-len", type=int, default=d.seq_len, help=f"characters per sequence (default: {d.seq_len})")
    add("--n-layer", type=int, default=d.n_layer, help=f"transformer blocks (default: {d.n_layer})")
    add("--n-head", type=int, default=d.n_head, help=f"attention heads (default: {d.n_head})")
    add("--d-model", type=int, default=d.d_model, help=f"model width (default: {d.d_model})")
    if with_optimizer:
        add("--optimizer", choices=sorted(OPTIMIZER_DEFAULTS), default=d.optimizer, help="default: lion")
        add(
            "--distributed-lion",
            action="store_true",
            help="Distributed Lion: replicas send their 1-bit Lion signs instead of all-reducing gradients, and all "
            "apply the vote (needs --optimizer lion); every worker is a whole replica unless --replicate N",
        )
        add(
            "--replicate",
            type=int,
            default=None,
            metavar="N",
            help="N replicas of world / N ranks each: FSDP2 shards inside a replica; across replicas HSDP all-reduces "
            "gradients, --distributed-lion votes with 1-bit signs on each rank's shard (two-level). Default: the world "
            "size with --distributed-lion (every rank a whole replica), else 1 (FSDP2 over all ranks)",
        )
        add(
            "--ddp",
            action="store_true",
            help="DistributedDataParallel instead of FSDP2: every rank a whole replica, fp32 gradient all-reduce",
        )
        add(
            "--aggregate",
            choices=AGGREGATES,
            default=None,
            help="with --distributed-lion: the majority vote of the signs, or their mean (default: vote)",
        )
        add(
            "--momentum-dtype",
            choices=[d for d in MOMENTUM_DTYPES if d],
            default=None,
            help="Lion's momentum: float32, bfloat16, or int8 (1 byte + a scale per block; default: the param's)",
        )
        add(
            "--int8-block-size",
            type=int,
            default=d.int8_block_size,
            help=f"with --momentum-dtype int8: elements per scale (default: {d.int8_block_size})",
        )
        add(
            "--int8-rounding",
            choices=("stochastic", "nearest"),
            default=d.int8_rounding,
            help=f"with --momentum-dtype int8: how the momentum is requantized (default: {d.int8_rounding})",
        )
        add(
            "--bf16-update",
            choices=BF16_UPDATES,
            default=d.bf16_update,
            help="with --param-dtype bfloat16 and Lion: round updated params to nearest, stochastically, or keep "
            "their rounding error in a Kahan compensation buffer (default: nearest)",
        )
    add(
        "--param-dtype",
        choices=PARAM_DTYPES,
        default=d.param_dtype,
        help="the model's params (and activations): float32, or bfloat16 with no fp32 master copy (default: float32)",
    )
    add("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for Lion and AdamW)")
    add("--weight-decay", type=float, default=None, help="default: 0.1 for Lion and AdamW")
    add(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        metavar=("B1", "B2"),
        help="default: Lion 0.9 0.99; AdamW 0.9 0.95",
    )
    add("--warmup-steps", type=int, default=None, help="linear warmup (default: steps / 10, at most 100)")
    add(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help=f"cosine decay ends at lr x this (default: {d.min_lr_ratio})",
    )
    add("--grad-clip", type=float, default=d.grad_clip, help=f"max gradient norm, 0 = off (default: {d.grad_clip})")
    add("--seed", type=int, default=d.seed, help=f"model init and batch order (default: {d.seed})")
    add("--log-interval", type=int, default=d.log_interval, help=f"steps per metrics line (default: {d.log_interval})")
    add("--eval-interval", type=int, default=d.eval_interval, help=f"steps per validation (default: {d.eval_interval})")
    add("--eval-seqs", type=int, default=d.eval_seqs, help=f"validation sequences (default: {d.eval_seqs})")
    add(
        "--ckpt-interval",
        type=int,
        default=d.ckpt_interval,
        help=f"steps per checkpoint, 0 = only at the end (default: {d.ckpt_interval})",
    )
    add(
        "--keep-checkpoints",
        type=int,
        default=d.keep_checkpoints,
        help=f"newest complete checkpoints kept (default: {d.keep_checkpoints})",
    )
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add("--overwrite", action="store_true", help="delete an earlier run in --out and start over")
    add("--samples", type=int, default=d.samples, help=f"text samples generated at the end (default: {d.samples})")
    add("--sample-chars", type=int, default=d.sample_chars, help=f"characters per sample (default: {d.sample_chars})")
    add(
        "--link-iface",
        default=None,
        metavar="NAME",
        help="the network interface that carries this node's traffic to other nodes: the summary adds its tx bytes "
        "per training step (Linux /sys/class/net/NAME/statistics/tx_bytes) beside the bytes counted from the "
        "collectives",
    )
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=d.device,
        help="auto: CUDA (NCCL) if available, else CPU (gloo)",
    )


def _add_launch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="local workers (default: 2 on CPU; on CUDA, min(2, GPUs))",
    )


def _config(args: argparse.Namespace, **override: Any) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("betas") is not None:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**{**values, **override})


def _nproc(requested: int | None, cfg: TrainConfig) -> int:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {requested}")
        return requested
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return 2
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print("lion-dist: one GPU visible, so one NCCL worker (NCCL needs a GPU per rank)", flush=True)
    return min(2, gpus)


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    validate(cfg)
    check_out_dir(cfg)
    nproc = _nproc(args.nproc_per_node, cfg)
    layout(cfg, nproc)  # a --replicate that does not divide the workers fails here, before torchrun starts
    return launch(cfg, nproc)


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    runs = {name: _variant_config(_config(args, out=str(out / name)), VARIANTS[name]) for name in args.variants}
    for cfg in runs.values():  # every variant's flags and --out are checked before anything runs
        validate(cfg)
        check_out_dir(cfg)
    nproc = _nproc(args.nproc_per_node, next(iter(runs.values())))
    for name, cfg in runs.items():
        print(f"\n=== lion-dist compare: {name} ({VARIANTS[name].label}) -> {cfg.out}", flush=True)
        code = launch(cfg, nproc)
        if code:
            print(f"lion-dist compare: the {name} run failed (exit code {code}); see its output above", flush=True)
            return code
    summaries = {name: json.loads((Path(cfg.out) / "summary.json").read_text()) for name, cfg in runs.items()}
    metrics = {VARIANTS[name].label: read_metrics(Path(cfg.out) / "metrics.jsonl") for name, cfg in runs.items()}
    plot_runs(metrics, out / "compare.png", title=" vs ".join(VARIANTS[n].label.split(" (")[0] for n in runs))
    report = compare_report(summaries, "lion-dist " + shlex.join(argv), nproc)
    (out / "compare.md").write_text(report)
    print("\n" + report + f"\nwrote {out / 'compare.png'} and {out / 'compare.md'}", flush=True)
    return 0


def _sweep(args: argparse.Namespace, argv: list[str]) -> int:

    base = _config(args)
    validate(base)
    grids = {name: tuple(getattr(args, f"{name}_lrs")) for name in dict.fromkeys(args.optimizers)}
    plan = sweep.plan(
        base,
        _nproc(args.nproc_per_node, base),
        grids=grids,
        seeds=args.seeds,
        batches=args.batch_sizes,
        lr_wd_product=args.lr_wd_product,
        confirm_seeds=args.confirm_seeds,
    )
    command = "lion-dist " + shlex.join(a for a in argv if a not in ("--resume", "--report-only"))
    if args.report_only:
        print(sweep.write_report(plan, command), flush=True)
        return 0
    return sweep.run(plan, resume=args.resume, overwrite=args.overwrite, command=command)


def _add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--optimizers",
        nargs="+",
        choices=sorted(OPTIMIZER_DEFAULTS),
        default=list(SWEEP_LR_GRIDS),
        metavar="NAME",
        help=f"optimizers to tune, from {', '.join(sorted(OPTIMIZER_DEFAULTS))} (default: {' '.join(SWEEP_LR_GRIDS)})",
    )
    for name, grid in SWEEP_LR_GRIDS.items():
        add(
            f"--{name}-lrs",
            type=float,
            nargs="+",
            default=list(grid),
            metavar="LR",
            help=f"{name}'s peak lrs (default: {' '.join(f'{lr:g}' for lr in grid)})",
        )
    add("--seeds", type=int, default=2, help="seeds per lr: --seed, --seed + 1, ... (default: 2)")
    add(
        "--confirm-seeds",
        type=int,
        default=0,
        metavar="K",
        help="then rerun only each optimizer's best lr at each batch with K more seeds, for the spread and the "
        "difference at a fraction of the cost of more --seeds (default: 0)",
    )
    add(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="B",
        help="global batches (sequences) to tune at, each a multiple of --micro-batch-size x workers; the token "
        "budget stays that of --steps at the train flags' own global batch, so a larger batch takes fewer steps "
        "(default: only that batch)",
    )
    add(
        "--lr-wd-product",
        type=float,
        default=ADAMW_LR * ADAMW_WEIGHT_DECAY,
        metavar="P",
        help=f"every run's weight decay is P / lr, so lr x wd is matched (default: AdamW's {ADAMW_LR:g} x "
        f"{ADAMW_WEIGHT_DECAY:g} = {ADAMW_LR * ADAMW_WEIGHT_DECAY:g})",
    )
    add("--report-only", action="store_true", help="write the table and plots from the finished runs; train nothing")


def _variant_config(cfg: TrainConfig, variant: Variant) -> TrainConfig:
    parser = argparse.ArgumentParser()
    _add_train_flags(parser, out=cfg.out, with_optimizer=True)
    return _config(parser.parse_args([*to_argv(cfg), *variant.train_args]))


def compare_report(summaries: dict[str, dict[str, Any]], command: str, nproc: int) -> str:
    """The markdown table of a compare, and which variant won on final validation loss."""
    first = next(iter(summaries.values()))
    mib = 1 << 20
    lines = [
        "# lion-dist compare",
        "",
        f"Made by `{command}` on {machine_description(first, nproc)}, {time.strftime('%Y-%m-%d')}. "
        "Every variant trains the "
        f"same model ({first['n_params']:,} params) on the same data with the same seed, global batch "
        f"({first['global_batch']} sequences) and {first['steps']} steps.",
        "",
        "| variant | lr | weight decay | betas | final val loss | tokens/s | optimizer state bytes per rank "
        "| peak memory per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        state = " / ".join(f"{b:,}" for b in s["optimizer_state_bytes_per_rank"])
        memory = " / ".join(f"{m / mib:,.0f} MiB" for m in s["peak_memory_bytes_per_rank"])
        speed = "n/a" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"  # resumed with nothing to do
        lines.append(
            f"| {VARIANTS[name].label} | {s['lr']:.3g} | {s['weight_decay']:.3g} | {tuple(s['betas'])} "
            f"| {s['final_val_loss']:.4f} | {speed} | {state} | {memory} ({s['peak_memory_kind']}) |"
        )
    ranked = sorted(summaries, key=lambda n: summaries[n]["final_val_loss"])
    best = summaries[ranked[0]]["final_val_loss"]
    others = ", ".join(
        f"{n} {summaries[n]['final_val_loss']:.4f} (+{100 * (summaries[n]['final_val_loss'] / best - 1):.1f}%)"
        for n in ranked[1:]
    )
    lines += [
        "",
        f"**Lowest final validation loss: {ranked[0]}** ({best:.4f}" + (f"; {others})." if others else ")."),
        "One seed and one small budget: rerun with a few --seed values before reading much into a small gap.",
        "",
        "![loss curves](compare.png)",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lion-dist", description="Train a small GPT with sharded Lion (FSDP2), or compare Lion with AdamW."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the GPT on local workers (torchrun, FSDP2)")
    _add_train_flags(train, out="runs/train", with_optimizer=True)
    _add_launch_flags(train)
    compare = sub.add_parser(
        "compare", help="train once per variant (Lion, AdamW; --variants adds Distributed Lion) and plot them together"
    )
    _add_train_flags(compare, out="runs/compare", with_optimizer=False)
    _add_launch_flags(compare)
    compare.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="NAME",
        default=list(DEFAULT_VARIANTS),
        help=f"what to compare, from {', '.join(VARIANTS)} (default: {' '.join(DEFAULT_VARIANTS)})",
    )
    sweep = sub.add_parser(
        "sweep",
        help="Lion vs AdamW, each tuned: an lr grid per optimizer, several seeds, several global batches; a table and "
        "plots (--resume continues an interrupted sweep, skipping finished runs)",
        allow_abbrev=False,  # else `--lr 1e-3` would silently mean --lr-wd-product
    )
    _add_train_flags(sweep, out="runs/sweep", with_optimizer=False, omit=("lr", "weight_decay", "betas", "stop_at"))
    _add_launch_flags(sweep)
    _add_sweep_flags(sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `lion-dist` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if (missing := train_extra_message(f"lion-dist {args.command}")) is not None:
        parser.exit(1, f"lion-dist {args.command}: error: {missing}\n")
    try:
        if args.command == "train":
            return _train(args)
        return _compare(args, argv) if args.command == "compare" else _sweep(args, argv)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"lion-dist {args.command}: error: {error}\n")


def train_config(argv: list[str]) -> TrainConfig:
    """The TrainConfig of `python -m lion_dist.train [train flags]` (what torchrun runs on each worker)."""
    parser = argparse.ArgumentParser(prog="python -m lion_dist.train", description="One rank of lion-dist train.")
    _add_train_flags(parser, out="runs/train", with_optimizer=True)
    return _config(parser.parse_args(argv))
