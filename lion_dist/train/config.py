"""The job's settings and their checks, importable without torch so that `lion-dist` starts fast.

`TrainConfig` is every flag of `lion-dist train` (`--micro-batch-size` -> `micro_batch_size`); `GPTConfig` is the
model's shape; `OPTIMIZER_DEFAULTS` names the optimizers the job can train with (the builders live in `loop.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

ADAMW_LR = 1e-3
ADAMW_WEIGHT_DECAY = 0.1
# `lion-dist sweep`'s lr grids: half-decades spanning both optimizers' best lrs in docs/sweep.md
SWEEP_LR_GRIDS: dict[str, tuple[float, ...]] = {"lion": (3e-4, 1e-3, 3e-3, 1e-2), "adamw": (3e-4, 1e-3, 3e-3, 1e-2)}
AGGREGATES = ("vote", "mean")
MOMENTUM_DTYPES = (None, "float32", "bfloat16", "int8")  # `lion_dist.Lion(momentum_dtype=...)` by name
PARAM_DTYPES = ("float32", "bfloat16")
# How a bf16 param takes its update: rounded to nearest, stochastically, or with Kahan compensation (Lion's options)
BF16_UPDATES = (
    "nearest",
    "stochastic",
    "compensation",
)  # `distributed_lion.AGGREGATES`, named here because that module imports torch


@dataclass(frozen=True)
class OptimizerDefaults:
    """An optimizer's default lr, weight decay and betas in the main job.

    Lion's lr is AdamW's, not the paper's AdamW lr / 3 (weight decay x 3): in docs/sweep.md Lion's best lr was
    3e-3 at every batch, 1 to 3.3x below AdamW's best, while AdamW's 1e-3 default is itself below AdamW's best
    here, so dividing it by 3 put Lion 9x under its best (main job: val loss 2.144 at 3.3e-4, 2.034 at 1e-3).
    """

    lr: float
    weight_decay: float
    betas: tuple[float, float]


OPTIMIZER_DEFAULTS: dict[str, OptimizerDefaults] = {
    "lion": OptimizerDefaults(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99)),
    "adamw": OptimizerDefaults(lr=ADAMW_LR, weight_decay=ADAMW_WEIGHT_DECAY, betas=(0.9, 0.95)),
}


@dataclass(frozen=True)
class GPTConfig:
    """Model shape; `vocab_size` comes from the data."""

    vocab_size: int
    seq_len: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); e.g. --d-model "
                f"{self.n_head * max(1, round(self.d_model / self.n_head))}"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI flags map one to one (`--micro-batch-size` -> `micro_batch_size`)."""

    out: str = "runs/train"
    data: str | None = None
    steps: int = 400
    stop_at: int | None = None
    micro_batch_size: int = 16
    grad_accum: int = 2
    seq_len: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    optimizer: str = "lion"
    distributed_lion: bool = False
    replicate: int | None = None
    ddp: bool = False
    link_iface: str | None = None
    aggregate: str | None = None
    momentum_dtype: str | None = None
    int8_block_size: int = 128
    int8_rounding: str = "stochastic"
    param_dtype: str = "float32"
    bf16_update: str = "nearest"
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 50
    eval_seqs: int = 128
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    samples: int = 3
    sample_chars: int = 200
    device: str = "auto"


def default_warmup_steps(steps: int) -> int:
    """The warmup when --warmup-steps is not given: a tenth of the run, at most 100 steps."""
    return min(100, max(1, steps // 10))


def resolve_hyperparams(cfg: TrainConfig) -> tuple[float, float, tuple[float, float], str]:
    """(lr, weight decay, betas, a note saying where they came from) for `cfg.optimizer`: the flags given, else
    `OPTIMIZER_DEFAULTS` (Lion and AdamW both lr 1e-3, weight decay 0.1)."""
    if cfg.optimizer not in OPTIMIZER_DEFAULTS:
        raise ValueError(f"--optimizer must be one of {sorted(OPTIMIZER_DEFAULTS)}, got {cfg.optimizer!r}")
    defaults = OPTIMIZER_DEFAULTS[cfg.optimizer]
    lr = defaults.lr if cfg.lr is None else cfg.lr
    wd = defaults.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    betas = cfg.betas or defaults.betas
    note = f"{cfg.optimizer}: lr {lr:.3g}, weight decay {wd:.3g}, betas {betas}"
    if cfg.optimizer == "lion" and (cfg.lr is None or cfg.weight_decay is None):
        note += " (Lion's lr is AdamW's here, not the paper's AdamW lr / 3: see docs/sweep.md; set --lr to override)"
    return lr, wd, betas, note


def validate(cfg: TrainConfig) -> None:
    """Raise a ValueError naming the bad flag, its value and what is allowed, before any work starts."""
    positive = ("steps", "micro_batch_size", "grad_accum", "seq_len", "n_layer", "n_head", "d_model")
    positive += ("log_interval", "eval_interval", "eval_seqs", "keep_checkpoints")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("ckpt_interval", "samples", "sample_chars"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.steps:
        raise ValueError(f"--stop-at must be in [1, --steps={cfg.steps}], got {cfg.stop_at!r}")
    if cfg.warmup_steps is not None and not 0 <= cfg.warmup_steps <= cfg.steps:
        raise ValueError(f"--warmup-steps must be in [0, --steps={cfg.steps}], got {cfg.warmup_steps!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.grad_clip < 0:
        raise ValueError(f"--grad-clip must be >= 0 (0 turns clipping off), got {cfg.grad_clip!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise ValueError(f"--data {cfg.data!r}: no such file; pass a UTF-8 text file (e.g. enwik8) or leave it out")
    if cfg.distributed_lion and cfg.optimizer != "lion":
        raise ValueError(
            f"--distributed-lion exchanges Lion's sign updates, so it needs --optimizer lion, got {cfg.optimizer!r}"
        )
    if cfg.replicate is not None and (not isinstance(cfg.replicate, int) or cfg.replicate < 1):
        raise ValueError(
            f"--replicate must be a positive number of replicas, got {cfg.replicate!r}: 1 = FSDP2 over all ranks, "
            "N = HSDP (or two-level Distributed Lion) with N replicas of world / N ranks"
        )
    if cfg.ddp and (cfg.distributed_lion or cfg.replicate is not None):
        raise ValueError(
            "--ddp makes every rank a whole replica that all-reduces its gradients: leave out "
            f"{'--distributed-lion' if cfg.distributed_lion else '--replicate'} (for 1-bit votes across whole "
            "replicas use --distributed-lion alone)"
        )
    if cfg.aggregate is not None and (not cfg.distributed_lion or cfg.aggregate not in AGGREGATES):
        raise ValueError(
            f"--aggregate {cfg.aggregate!r}: pass one of {', '.join(AGGREGATES)}, together with --distributed-lion"
        )
    lion_only = {
        "--momentum-dtype": cfg.momentum_dtype is not None,
        "--bf16-update": cfg.bf16_update != "nearest",
        "--int8-block-size": cfg.int8_block_size != 128,
        "--int8-rounding": cfg.int8_rounding != "stochastic",
    }
    for flag, given in lion_only.items():
        if given and (cfg.optimizer != "lion" or cfg.distributed_lion):
            raise ValueError(
                f"{flag} is an option of lion_dist.Lion: pass it with --optimizer lion (not Distributed Lion)"
            )
    if cfg.momentum_dtype not in MOMENTUM_DTYPES:
        raise ValueError(
            f"--momentum-dtype must be one of {', '.join(map(str, MOMENTUM_DTYPES[1:]))}, got {cfg.momentum_dtype!r}"
        )
    if cfg.param_dtype not in PARAM_DTYPES:
        raise ValueError(f"--param-dtype must be one of {', '.join(PARAM_DTYPES)}, got {cfg.param_dtype!r}")
    if cfg.bf16_update not in BF16_UPDATES:
        raise ValueError(f"--bf16-update must be one of {', '.join(BF16_UPDATES)}, got {cfg.bf16_update!r}")
    if cfg.bf16_update != "nearest" and cfg.param_dtype != "bfloat16":
        raise ValueError(f"--bf16-update {cfg.bf16_update} rounds bf16 params: pass it with --param-dtype bfloat16")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    lr, wd, betas, _ = resolve_hyperparams(cfg)
    if not lr > 0 or not wd >= 0 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"need --lr > 0, --weight-decay >= 0 and --betas in [0, 1), got {lr!r}, {wd!r}, {betas!r}")
    GPTConfig(vocab_size=1, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model)


@dataclass(frozen=True)
class Layout:
    """How the job lays out its ranks: `replicas` copies of the model, each sharded over `shards` ranks.

    mode: "fsdp" (FSDP2 over all ranks), "hsdp" (FSDP2's HSDP: reduce-scatter inside a replica, all-reduce across
    replicas), "distributed-lion" (FSDP2 inside each replica, 1-bit sign votes across replicas), "ddp" (every rank
    a whole replica, fp32 gradient all-reduce). Ranks r and r + shards hold the same shard in neighbouring replicas.
    """

    mode: str
    replicas: int
    shards: int

    def words(self) -> str:
        if self.mode == "fsdp":
            return f"FSDP2 over all {self.shards} ranks"
        if self.mode == "ddp":
            return f"DDP, {self.replicas} whole replicas (fp32 gradient all-reduce)"
        inside = "one rank each" if self.shards == 1 else f"FSDP2 over {self.shards} ranks each"
        across = "1-bit sign votes" if self.mode == "distributed-lion" else "gradient all-reduce"
        name = "two-level Distributed Lion" if self.mode == "distributed-lion" else "HSDP"
        return f"{name}: {self.replicas} replicas ({inside}), {across} across them"


def layout(cfg: TrainConfig, world: int) -> Layout:
    """The layout of `cfg` on `world` ranks; a ValueError naming the values and the fix when it does not fit.

    `--replicate` defaults to the world size with --distributed-lion (every rank a whole replica) and to 1 (FSDP2
    over all ranks) otherwise.
    """
    if cfg.ddp:
        return Layout("ddp", world, 1)
    replicas = cfg.replicate if cfg.replicate is not None else (world if cfg.distributed_lion else 1)
    if replicas < 1 or world % replicas:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"--replicate {replicas} does not divide the {world} ranks: each replica is world / N ranks, so pass "
            f"one of {', '.join(map(str, divisors))} (or change the number of workers)"
        )
    if cfg.distributed_lion:
        return Layout("distributed-lion", replicas, world // replicas)
    return Layout("fsdp" if replicas == 1 else "hsdp", replicas, world // replicas)


def check_out_dir(cfg: TrainConfig) -> None:
    """A fresh run must not mix with an earlier one in the same --out (its checkpoints would win a later resume)."""
    out = Path(cfg.out)
    earlier = [p for p in (out / "checkpoints", out / "metrics.jsonl") if p.exists()]
    if earlier and not cfg.resume and not cfg.overwrite:
        raise ValueError(
            f"--out {cfg.out!r} already holds a run ({', '.join(p.name for p in earlier)}). Pass --resume to "
            "continue it, --overwrite to delete it and start over, or another --out."
        )
