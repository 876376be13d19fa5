"""Shared pieces of the sharded-engine tests (FSDP2, FSDP1, DeepSpeed ZeRO, resume).

- `exact_grads`: seeded full gradients whose values are bf16-representable fp32 numbers. Adding a few equal
  copies (what an all-reduce of equal gradients does) and scaling by powers of two are then exact, so
  gradients that pass through an engine's real reductions arrive bit for bit.
- `GradProbe`: a model whose loss is `sum_i (p_i * G_i).sum()`, so a real backward hands param i exactly
  `G_i`, through the engine's own hooks, buckets and reductions (FSDP1 and ZeRO own their flat gradient
  buffers: this is how the tests set their gradients).
- `reference_run`: the single-process, unsharded `Lion` that every sharded run is compared with.
- `e2e_*`: a small MLP trained on real data, sharded and unsharded, for the end-to-end tracking tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lion_dist import Lion

LR = 1e-2
STEPS = 12
# (1, 4) and (1,) have fewer rows than two ranks, so some ranks hold empty shards; (5, 3) and (3,) split unevenly.
SHAPES = ((5, 3), (3,), (1, 4), (1,), (7, 2))
BLOCKS = ((0, 1, 2), (3, 4))  # param indices of each wrapped unit (FSDP unit, ZeRO sub-module)
QUIET = {"batch_size_policy": "ignore"}  # the batch guard is tested elsewhere
# Single-tensor references inside a worker must not take part in collectives (the non-finite check all-reduces).
LOCAL = {**QUIET, "nonfinite": "ignore"}
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "decay": {"weight_decay": 0.5, "betas": (0.95, 0.98)},
    "decoupled": {"weight_decay": 3e-3, "decoupled_weight_decay": True},
}
CAUTIOUS_CONFIGS: dict[str, dict[str, Any]] = {
    "cautious": {"cautious_factor": 0.5, "weight_decay": 0.1},
    "cautious_wd": {"cautious_factor": 0.0, "cautious_wd": True, "weight_decay": 0.2},
}


def initial_values(shapes: tuple[tuple[int, ...], ...] = SHAPES, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def exact_grads(step: int, shapes: tuple[tuple[int, ...], ...] = SHAPES) -> list[Tensor]:
    """Step `step`'s full gradients: bf16-representable values (see module doc), about 1 in 8 exactly zero."""
    gen = torch.Generator().manual_seed(10_000 + step)
    grads = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen).to(torch.bfloat16).float()
        g[torch.rand(shape, generator=gen) < 0.125] = 0.0
        grads.append(g)
    return grads


def reference_run(
    config: dict[str, Any], steps: int = STEPS, start: int = 0, values: list[Tensor] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Params and momentum of an unsharded single-process `Lion` after `steps` steps of `exact_grads`."""
    params = [v.clone() for v in (initial_values() if values is None else values)]
    opt = Lion(params, lr=LR, **LOCAL, **config)
    for step in range(start, start + steps):
        for p, g in zip(params, exact_grads(step), strict=True):
            p.grad = g
        opt.step()
    return params, [opt.state[p]["exp_avg"] for p in params]


class Leaf(nn.Module):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone())

    def forward(self, grad: Tensor) -> Tensor:
        return (self.weight * grad).sum()


class Block(nn.Module):
    def __init__(self, values: list[Tensor]) -> None:
        super().__init__()
        self.leaves = nn.ModuleList(Leaf(v) for v in values)

    def forward(self, grads: list[Tensor]) -> Tensor:
        return sum(leaf(g) for leaf, g in zip(self.leaves, grads, strict=True))


class GradProbe(nn.Module):
    """`forward(grads)` is `sum_i (p_i * grads[i]).sum()`: its backward gives param i exactly `grads[i]`.

    Params are grouped in `Block`s (one FSDP unit each); `parameters()` yields them in `SHAPES` order.
    """

    def __init__(self, values: list[Tensor] | None = None) -> None:
        super().__init__()
        values = initial_values() if values is None else values
        self.blocks = nn.ModuleList(Block([values[i] for i in index]) for index in BLOCKS)

    def forward(self, grads: list[Tensor]) -> Tensor:
        return sum(block([grads[i] for i in index]) for block, index in zip(self.blocks, BLOCKS, strict=True))


def bitwise_mismatches(pairs: dict[str, tuple[Tensor, Tensor]]) -> list[str]:
    """Names (with the largest difference) of the (got, expected) pairs that are not bit for bit equal."""
    bad = []
    for name, (got, expected) in pairs.items():
        got, expected = got.detach().cpu(), expected.detach().cpu()
        if got.shape != expected.shape or got.dtype != expected.dtype:
            bad.append(f"{name}: {got.dtype}{tuple(got.shape)} != {expected.dtype}{tuple(expected.shape)}")
        elif not torch.equal(got, expected):
            bad.append(f"{name}: max |diff| {(got - expected).abs().max().item():.3g}")
    return bad


E2E_LR = 3e-3
E2E_STEPS = 20
E2E_BATCH = 16  # global batch; each of W ranks trains on its E2E_BATCH / W rows


def e2e_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))


def e2e_batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(20_000 + step)
    x = torch.randn(E2E_BATCH, 8, generator=gen)
    return x, torch.sin(x[:, :3] * 2.0) + 0.1 * torch.randn(E2E_BATCH, 3, generator=gen)


def e2e_rank_batch(step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    x, y = e2e_batch(step)
    rows = E2E_BATCH // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def e2e_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(model(x), y)


def e2e_unsharded(config: dict[str, Any] | None = None) -> tuple[list[float], dict[str, Tensor]]:
    """Losses and final params of the unsharded run over the whole global batch."""
    model = e2e_model()
    opt = Lion(model.parameters(), lr=E2E_LR, **LOCAL, **(config or {}))
    losses = []
    for step in range(E2E_STEPS):
        loss = e2e_loss(model, *e2e_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def e2e_distance(
    losses: list[float], params: dict[str, Tensor], config: dict[str, Any] | None = None
) -> dict[str, float]:
    """How far a sharded e2e run is from the unsharded one: the largest relative loss gap and param gap
    (in units of the learning rate), and the fraction of param elements that differ by more than 1e-5."""
    ref_losses, ref_params = e2e_unsharded(config)
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    diffs = torch.cat([(params[k].flatten() - ref_params[k].flatten()).abs() for k in ref_params])
    return {
        "loss_rel": loss_gap,
        "param_max_lr": diffs.max().item() / E2E_LR,
        "param_frac": (diffs > 1e-5).float().mean().item(),
    }


def fsdp2_probe(mesh: Any, **shard_kwargs: Any) -> GradProbe:
    """A `GradProbe` with each block and the root wrapped by FSDP2's `fully_shard` on `mesh`."""
    from torch.distributed.fsdp import fully_shard

    model = GradProbe()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **shard_kwargs)
    fully_shard(model, mesh=mesh, **shard_kwargs)
    return model


def local_slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of `full` when laid out like the DTensor `like` (same mesh and placements)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def step_with_dtensor_grads(params: list[Tensor], opt: Lion, steps: int, start: int = 0) -> None:
    """Set each DTensor param's gradient by hand from `exact_grads` (its local shard of it) and step."""
    from torch.distributed.tensor import distribute_tensor

    for step in range(start, start + steps):
        for p, g in zip(params, exact_grads(step), strict=True):
            p.grad = distribute_tensor(g.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        opt.step()


def dtensor_pairs(
    prefix: str, params: list[Tensor], opt: Lion, ref_params: list[Tensor], ref_moms: list[Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """(local param, its slice of the reference) and (local momentum, its slice) for every DTensor param."""
    from torch.distributed.tensor import DTensor

    pairs = {}
    for i, (p, ref_p, ref_m) in enumerate(zip(params, ref_params, ref_moms, strict=True)):
        exp_avg = opt.state[p]["exp_avg"]
        assert isinstance(exp_avg, DTensor) and exp_avg.placements == p.placements, f"{prefix}/{i}: {exp_avg!r:.80}"
        pairs[f"{prefix}/{i}/param"] = (p.to_local().detach().clone(), local_slice(ref_p, p))
        pairs[f"{prefix}/{i}/exp_avg"] = (exp_avg.to_local().clone(), local_slice(ref_m, p))
    return pairs


class Replay:
    """Replays every `opt.step()` on independent copies of exactly what the engine handed the optimizer.

    Each param tensor seen in a step (a flat partition, a view, a ZeRO-3 sub-group swapped in) gets a copy,
    taken before its first step, with its own unsharded `Lion`; each step feeds the copy the same gradient.
    Afterwards `pairs()` holds (engine's tensor, copy) for params and momentum: equal means the sharded
    step is plain Lion applied to each handed tensor as a whole, so a cautious mean is over that tensor.
    """

    def __init__(self, opt: Lion, config: dict[str, Any]) -> None:
        self.opt = opt
        self.config = config
        self.copies: dict[int, tuple[Tensor, Tensor, Lion]] = {}
        self._step = opt.step
        opt.step = self.step  # the engine calls opt.step(): record, then step the copies and the real one

    def step(self, *args: Any, **kwargs: Any) -> Any:
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) not in self.copies:
                    copy = p.detach().clone()
                    self.copies[id(p)] = (p, copy, Lion([copy], lr=group["lr"], **LOCAL, **self.config))
                _, copy, copy_opt = self.copies[id(p)]
                copy.grad = p.grad.detach().clone()
                copy_opt.param_groups[0]["lr"] = group["lr"]
                copy_opt.step()
        return self._step(*args, **kwargs)

    def pairs(self, prefix: str) -> dict[str, tuple[Tensor, Tensor]]:
        pairs = {}
        for i, (p, copy, copy_opt) in enumerate(self.copies.values()):
            pairs[f"{prefix}/{i}/param"] = (p.detach().clone(), copy)
            pairs[f"{prefix}/{i}/exp_avg"] = (self.opt.state[p]["exp_avg"].clone(), copy_opt.state[copy]["exp_avg"])
        return pairs
