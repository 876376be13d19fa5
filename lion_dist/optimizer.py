"""`lion_dist.Lion`: a `torch.optim.Optimizer` that manages groups and state and dispatches the math.

The class knows no kernel details (`functional.py`, `triton_kernel.py`, `cpu_kernel.py` hold those) and
updates only each rank's local shard (`shards.py`). Per param it keeps one tensor of state, the momentum
`exp_avg`, created at the first step; everything else lives in the param groups, so `state_dict()` and
`torch.distributed.checkpoint` carry it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lion_dist import functional, shards
from lion_dist.batch_guard import BatchGuard
from lion_dist.functional import BACKENDS, LionHyperparams
from lion_dist.nonfinite import NonfiniteGuard

MOMENTUM_DTYPES = (None, torch.float32, torch.bfloat16)
_SEED_MIX = 1_000_003


@dataclass
class _LocalWork:
    """One group's tensors for this step: global params (for state and collectives) and their local parts."""

    params: list[Tensor] = field(default_factory=list)
    local_params: list[Tensor] = field(default_factory=list)
    local_grads: list[Tensor] = field(default_factory=list)
    local_exp_avgs: list[Tensor] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # index of each param in its group, to name it in errors


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_lr(lr: Any, *, allow_zero: bool) -> float:
    if isinstance(lr, Tensor) and lr.numel() == 1:
        lr = lr.item()
    if not _is_real_number(lr) or lr < 0 or (lr == 0 and not allow_zero):
        raise ValueError(
            f"lr must be a finite number > 0, got {lr!r}. Lion's lr is typically 3-10x smaller than AdamW's "
            "(e.g. 1e-4 where AdamW uses 3e-4 to 1e-3)."
        )
    return float(lr)


def _validate_group(group: dict[str, Any]) -> None:
    """Raise a ValueError/TypeError naming the bad hyperparameter, its value and what is allowed."""
    _validate_lr(group["lr"], allow_zero=False)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}; Lion's default is (0.9, 0.99)")
    for name, beta in zip(("beta1", "beta2"), betas, strict=True):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {beta!r}; Lion's default is (0.9, 0.99)")
    wd = group["weight_decay"]
    if not _is_real_number(wd) or wd < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}. Lion's is typically 3-10x AdamW's.")
    factor = group["cautious_factor"]
    if factor is not None and (not _is_real_number(factor) or not 0.0 <= factor <= 1.0):
        raise ValueError(f"cautious_factor must be None (plain Lion) or in [0, 1], got {factor!r}")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {group['backend']!r}")
    if group["momentum_dtype"] not in MOMENTUM_DTYPES:
        raise ValueError(
            f"momentum_dtype must be None (the param's dtype), torch.float32 or torch.bfloat16, "
            f"got {group['momentum_dtype']!r}"
        )
    if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
        raise TypeError(f"seed must be an int, got {group['seed']!r}")
    for flag in ("decoupled_weight_decay", "cautious_wd", "maximize", "stochastic_rounding"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"Lion optimizes tensors, got a {type(p).__name__} in params")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(
                f"Lion supports real floating-point params, got one of dtype {p.dtype} with shape "
                f"{tuple(p.shape)}; optimize a complex param through torch.view_as_real(param)."
            )


class Lion(Optimizer):
    """Lion (Chen et al. 2023, arXiv 2302.06675) for sharded training: each rank updates only its shard.

    A drop-in for `lion_pytorch.Lion` (same positional arguments and defaults). Its one state tensor per
    param is the momentum `exp_avg` (AdamW keeps two), in the param's dtype or `momentum_dtype`.

    Args:
        lr, betas, weight_decay: as in the paper; `p <- p * (1 - lr * wd)` each step.
        decoupled_weight_decay: use `wd / lr0` (lr0: the group's initial lr), so the decay follows the schedule.
        cautious_factor: None for plain Lion; in [0, 1] for cautious Lion (arXiv 2411.16085).
        cautious_wd: decay only where the update and the param agree in sign (arXiv 2510.12402).
        maximize: ascend instead of descend.
        momentum_dtype: None (the param's dtype), torch.float32 or torch.bfloat16. Math is fp32 always.
        backend: "auto" (fused Triton on CUDA, fused C on CPU where available, else foreach), "foreach",
            "triton", "cpu_fused" or "reference". `use_triton=True/False` maps to "triton"/"foreach".
        stochastic_rounding, seed: round bf16 params stochastically, reproducibly from `seed` (0 by default, the
            same on every rank, so replicated shards round alike).
        nonfinite: "ignore" (default: no check; a NaN/Inf gradient shows up as NaN in the param), "skip" the step
            on every rank, or raise ("error"). The check reads every gradient once more, about +25% on a fused
            step, hence off by default (see `nonfinite.py` and benchmarks/RESULTS.md).
        global_batch_size, micro_batch_size, grad_accum_steps, min_batch_size, batch_size_policy: the batch
            guard (see `batch_guard.py`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        cautious_factor: float | None = None,
        cautious_wd: bool = False,
        maximize: bool = False,
        momentum_dtype: torch.dtype | None = None,
        backend: str = "auto",
        use_triton: bool | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        nonfinite: str = "ignore",
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        grad_accum_steps: int = 1,
        min_batch_size: int = 64,
        batch_size_policy: str = "warn",
    ) -> None:
        if use_triton is not None:
            if backend != "auto":
                raise ValueError(
                    f"pass backend or use_triton, not both (got backend={backend!r}, use_triton={use_triton!r})"
                )
            backend = "triton" if use_triton else "foreach"
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_factor=cautious_factor,
            cautious_wd=cautious_wd,
            maximize=maximize,
            momentum_dtype=momentum_dtype,
            backend=backend,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        _validate_group({**defaults, "params": []})
        self._nonfinite = NonfiniteGuard(nonfinite)
        self._batch_guard = BatchGuard(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            min_batch_size=min_batch_size,
            policy=batch_size_policy,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        group.setdefault("lr0", float(group["lr"]))  # decoupled weight decay's reference lr
        group.setdefault("step", 0)  # steps taken with lr > 0; seeds stochastic rounding

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:  # pickling and copy.deepcopy keep the two policies
        return {**super().__getstate__(), "_nonfinite": self._nonfinite, "_batch_guard": self._batch_guard}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was non-finite (policy "skip")."""
        return self._nonfinite.skipped_steps

    def state_bytes(self) -> int:
        """This rank's optimizer-state bytes: local momentum numel x itemsize, summed over params."""
        return sum(
            shards.local(s["exp_avg"]).numel() * s["exp_avg"].element_size()
            for s in self.state.values()
            if "exp_avg" in s
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking everything first, so a bad state dict raises and leaves this one intact."""
        current_values = self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        for group, values in zip(self.param_groups, current_values, strict=True):
            for key, value in values.items():  # keys an older or lion-pytorch state dict lacks
                group.setdefault(key, value)
            for p in group["params"]:
                state = self.state.get(p)
                if state and "exp_avg" in state:
                    state["exp_avg"] = state["exp_avg"].to(group["momentum_dtype"] or p.dtype)

    def _check_state_dict(self, state_dict: Any) -> list[dict[str, Any]]:
        """Raise on anything that does not fit; return each current group's hyperparameters."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise KeyError(f"state_dict has no {key!r} entry; pass what Lion.state_dict() returned")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups) if isinstance(saved_groups, list) else saved_groups!r} "
                f"param groups, this optimizer has {len(self.param_groups)}"
            )
        current_values = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"state_dict param_groups[{gi}] must be a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict param_groups[{gi}] has {len(saved['params'])} params, this optimizer's has "
                    f"{len(group['params'])}"
                )
            merged = {**group, **saved, "params": group["params"]}
            _validate_group(merged)
            current_values.append({k: v for k, v in group.items() if k != "params"})
            for pi, (param_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                self._check_param_state(state_dict["state"].get(param_id), p, f"param_groups[{gi}]['params'][{pi}]")
        return current_values

    @staticmethod
    def _check_param_state(state: Any, p: Tensor, where: str) -> None:
        if state is None:
            return
        if not isinstance(state, dict) or set(state) != {"exp_avg"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state for {where} has {keys}; a Lion state holds exactly one tensor, 'exp_avg' "
                "(is this state dict from another optimizer?)"
            )
        exp_avg = state["exp_avg"]
        if not isinstance(exp_avg, Tensor) or not exp_avg.is_floating_point():
            raise TypeError(f"state for {where}: exp_avg must be a floating-point tensor, got {exp_avg!r:.80}")
        if exp_avg.shape != p.shape:
            raise ValueError(
                f"state for {where}: exp_avg has shape {tuple(exp_avg.shape)}, the param has "
                f"{tuple(p.shape)} (was the state saved for another model?)"
            )

    # ------------------------------------------------------------------ step

    def _hyperparams(self, group: dict[str, Any]) -> LionHyperparams:
        lr = _validate_lr(group["lr"], allow_zero=True)
        wd = group["weight_decay"]
        if group["decoupled_weight_decay"]:
            wd = wd / group["lr0"]
        beta1, beta2 = group["betas"]
        return LionHyperparams(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=wd,
            maximize=group["maximize"],
            cautious_factor=group["cautious_factor"],
            cautious_wd=group["cautious_wd"],
        )

    def _param_name(self, gi: int, pi: int) -> str:
        """How errors name a param: its name when the optimizer got `named_parameters()`, else its position."""
        group = self.param_groups[gi]
        names = group.get("param_names")
        if names:
            return names[pi]
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(group['params'][pi].shape)})"

    def _gather(self, gi: int, group: dict[str, Any]) -> _LocalWork:
        """Local tensors of the group's params that have a grad, creating momentum at the first step.

        This runs for every param on every step, so plain tensors take the shortest path.
        """
        work = _LocalWork()
        state_of = self.state
        for pi, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise TypeError(
                    f"Lion does not support sparse gradients, got one for {self._param_name(gi, pi)}; "
                    "use a dense embedding (sparse=False)"
                )
            state = state_of[p]
            exp_avg = state.get("exp_avg")
            if exp_avg is None:
                exp_avg = state["exp_avg"] = shards.new_momentum(p, group["momentum_dtype"] or p.dtype)
            work.params.append(p)
            work.positions.append(pi)
            if isinstance(p, DTensor):
                work.local_params.append(shards.local(p))
                work.local_grads.append(shards.local_grad(p, self._param_name(gi, pi)))
                work.local_exp_avgs.append(shards.local(exp_avg))
            else:
                work.local_params.append(p)
                work.local_grads.append(grad)
                work.local_exp_avgs.append(exp_avg)
        return work

    def _prepare_step(self, closure: Callable[[], float] | None) -> tuple[Any, list[_LocalWork], bool | Tensor | None]:
        """What every step does before the update: the closure, the batch guard, local tensors, the non-finite
        policy. Returns (loss, each group's work, the skip decision)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._batch_guard.check((p for group in self.param_groups for p in group["params"]), self._data_parallel_size())
        works = [self._gather(gi, group) for gi, group in enumerate(self.param_groups)]
        grads = [g for work in works for g in work.local_grads]
        where = [(gi, pi) for gi, work in enumerate(works) for pi in work.positions]
        skip = self._nonfinite.check(grads, lambda i: self._param_name(*where[i]))
        return loss, works, skip

    def _data_parallel_size(self) -> int | None:
        """How many ranks see different data, for the batch guard; None: infer it from the params' mesh."""
        return None

    @staticmethod
    def _sr_seed(gi: int, group: dict[str, Any]) -> int | None:
        """This step's stochastic-rounding seed for group `gi` (None: round to nearest)."""
        if not group["stochastic_rounding"]:
            return None
        return ((group["seed"] * _SEED_MIX + gi) * _SEED_MIX + group["step"]) % (1 << 62)

    def _cautious_means(self, work: _LocalWork, hp: LionHyperparams) -> list[Tensor]:
        """Each tensor's cautious mean over the whole tensor: local counts, summed over shards in one batch."""
        counts = functional.cautious_aligned_counts(work.local_grads, work.local_exp_avgs, hp)
        counts = shards.sum_over_shards(work.params, counts)
        return [
            functional.cautious_mean(c, p.numel(), hp.cautious_factor) if p.numel() else c.float()
            for c, p in zip(counts, work.params, strict=True)
        ]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Lion step on every local shard; returns the closure's loss."""
        loss, works, skip = self._prepare_step(closure)
        if skip is True:
            return loss

        for gi, (group, work) in enumerate(zip(self.param_groups, works, strict=True)):
            hp = self._hyperparams(group)
            means = self._cautious_means(work, hp) if hp.cautious_factor is not None else None
            tensors = (work.local_params, work.local_grads, work.local_exp_avgs, means)
            if any(p.numel() == 0 for p in work.local_params):  # empty local shards: nothing to update
                keep = [i for i, p in enumerate(work.local_params) if p.numel() > 0]
                tensors = tuple(None if ts is None else [ts[i] for i in keep] for ts in tensors)
            if tensors[0]:
                functional.lion(
                    *tensors[:3],
                    hp,
                    backend=group["backend"],
                    means=tensors[3],
                    skip=skip if isinstance(skip, Tensor) else None,
                    sr_seed=self._sr_seed(gi, group),
                )
            if hp.lr != 0:
                group["step"] += 1
        return loss
