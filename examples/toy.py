"""The toy problem every example trains, so that each example file shows only how Lion meets its engine.

A small MLP regresses y = sin(x @ w / 4) on synthetic batches that depend only on the step, so every run and
every engine sees the same data and the sharded examples can be checked against the single-process one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def make_model() -> nn.Sequential:
    torch.manual_seed(0)  # the same initial model on every rank and in every example
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def make_batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic regression batch, the same for a given step on every run: y = sin(x @ w / 4)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(batch_size, 32, generator=gen)
    w = torch.randn(32, 1, generator=torch.Generator().manual_seed(-1))
    return x, torch.sin(x @ w / 4)


def eval_loss(model: nn.Module, device: torch.device) -> float:
    """Loss on a fixed held-out batch."""
    x, y = (t.to(device) for t in make_batch(-2, 256))
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group: NCCL with one GPU per rank, gloo on CPU. Returns (rank, world, device)."""
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def micro_batch_size(global_batch: int, world: int, grad_accum: int) -> int:
    """Each rank's micro batch: the global batch split over ranks and accumulation steps."""
    micro = global_batch // (world * grad_accum)
    if micro * world * grad_accum != global_batch:
        raise SystemExit(f"--global-batch {global_batch} is not divisible by {world} ranks x {grad_accum}")
    return micro
