"""The optimizers the main job compares: how to build each one, and its learning-rate schedule and param groups."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lion_dist import Lion, layouts
from lion_dist.train.config import TrainConfig, default_warmup_steps


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer of `config.OPTIMIZER_DEFAULTS`, and how to count its state bytes on this rank."""

    build: Callable[[list[dict[str, Any]], float, float, tuple[float, float], TrainConfig], Optimizer]
    state_bytes: Callable[[Optimizer], int]


def _tensor_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state on this rank (local shards only)."""
    return sum(
        layouts.local(v).numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "lion": OptimizerSpec(
        build=lambda groups, lr, wd, betas, cfg: Lion(
            groups,
            lr=lr,
            betas=betas,
            weight_decay=wd,
            momentum_dtype=cfg.momentum_dtype,
            int8_block_size=cfg.int8_block_size,
            int8_rounding=cfg.int8_rounding,
            stochastic_rounding=cfg.bf16_update == "stochastic",
            compensation=cfg.bf16_update == "compensation",
            micro_batch_size=cfg.micro_batch_size,
            grad_accum_steps=cfg.grad_accum,
        ),
        state_bytes=lambda opt: opt.state_bytes(),
    ),
    "adamw": OptimizerSpec(
        build=lambda groups, lr, wd, betas, cfg: torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=wd),
        state_bytes=_tensor_state_bytes,
    ),
}


def lr_at(step: int, lr: float, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over the warmup steps, then cosine decay to `lr * min_lr_ratio` at `cfg.steps`."""
    warmup = default_warmup_steps(cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(cfg.steps - warmup, 1)
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only, not on biases and norm scales (GPT-2 practice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
