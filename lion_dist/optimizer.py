"""`lion_dist.Lion`: a `torch.optim.Optimizer` that manages groups and state and dispatches the math.

The class knows no kernel details: `spec.py` holds the math, `backends/` the ways to run it, and `plan.py`
the per-group plan (local views, momenta, routes to backends, their tables) that is built once and reused
across steps. It updates only each rank's local shard (`shards.py`). Per param it keeps one tensor of state,
the momentum `exp_avg`, created at the first step; everything else lives in the param groups, so
`state_dict()` and `torch.distributed.checkpoint` carry it.

`step` is a template: the closure, the batch guard, binding each group's plan to this step's gradients, the
non-finite policy, then `_update`, which runs the fused step; a subclass that needs the direction before it is
applied (Distributed Lion) returns True from `_exchanges_directions` and combines the directions in
`_aggregate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lion_dist import momentum, shards, spec
from lion_dist.backends import NAMES as BACKENDS
from lion_dist.batch_guard import BatchGuard
from lion_dist.nonfinite import NonfiniteGuard
from lion_dist.plan import Bound, PlanCache
from lion_dist.spec import FLOAT_DTYPES, DeviceKey, LionHyperparams

MOMENTUM_DTYPES = (None, torch.float32, torch.bfloat16, torch.int8)
MOMENTUM_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}
MAX_INT8_BLOCK = 1024
_NOT_TRACEABLE = (
    "lion_dist.Lion.step checks each gradient against its cached plan with data_ptr() and calls its fused kernels "
    "with raw pointer tables (ctypes on CPU, Triton on GPU): nothing dynamo can trace, and the host work is a few "
    "C-level passes already. torch.compile runs the step eagerly; to capture a whole step use capturable=True and "
    "a CUDA graph."
)


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_lr(lr: Any, *, allow_zero: bool) -> float:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"Tensor lr must be 1-element, got one of shape {tuple(lr.shape)}; pass a number or e.g. "
                "torch.tensor(1e-4)"
            )
        lr = lr.item()
    if not _is_real_number(lr) or lr < 0 or (lr == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"lr must be a finite number {bound}, got {lr!r}. Lion's lr is typically 3-10x smaller than AdamW's "
            "(e.g. 1e-4 where AdamW uses 3e-4 to 1e-3)."
        )
    return float(lr)


def _validate_decay(lr: float, weight_decay: float, *, decoupled: bool, lr0: float | None) -> None:
    """Refuse a decay factor `1 - lr * wd` (with decoupled decay `1 - lr / lr0 * wd`) that is zero or negative:
    it would zero or flip every param."""
    product = lr * weight_decay / lr0 if decoupled and lr0 else lr * weight_decay
    if product >= 1:
        what = (
            f"lr / lr0 x weight_decay = {lr!r} / {lr0!r} x {weight_decay!r}"
            if decoupled
            else (f"lr x weight_decay = {lr!r} x {weight_decay!r}")
        )
        raise ValueError(
            f"{what} = {product!r} >= 1, so the decay factor 1 - {product!r} would zero or flip every param each "
            "step. Lion's lr x weight_decay is typically around 1e-5 to 1e-3 (e.g. lr 1e-4 with weight_decay 0.1 to "
            "1); lower one of them."
        )


def _validate_group(group: dict[str, Any], *, allow_zero_lr: bool = False) -> None:
    """Raise a ValueError/TypeError naming the bad hyperparameter, its value and what is allowed."""
    lr = _validate_lr(group["lr"], allow_zero=allow_zero_lr)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}; Lion's default is (0.9, 0.99)")
    for name, beta in zip(("beta1", "beta2"), betas, strict=True):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {beta!r}; Lion's default is (0.9, 0.99)")
    wd = group["weight_decay"]
    if not _is_real_number(wd) or wd < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}. Lion's is typically 3-10x AdamW's.")
    if not isinstance(group["decoupled_weight_decay"], bool):
        raise TypeError(f"decoupled_weight_decay must be a bool, got {group['decoupled_weight_decay']!r}")
    _validate_decay(lr, wd, decoupled=group["decoupled_weight_decay"], lr0=group.get("lr0", lr))
    factor = group["cautious_factor"]
    if factor is not None and (not _is_real_number(factor) or not 0.0 <= factor <= 1.0):
        raise ValueError(f"cautious_factor must be None (plain Lion) or in [0, 1], got {factor!r}")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {group['backend']!r}")
    if group["momentum_dtype"] not in MOMENTUM_DTYPES:
        raise ValueError(
            f"momentum_dtype must be None (the param's dtype), torch.float32, torch.bfloat16 or torch.int8 (or one "
            f"of the names {tuple(MOMENTUM_DTYPE_NAMES)}), got {group['momentum_dtype']!r}"
        )
    block = group["int8_block_size"]
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_INT8_BLOCK:
        raise ValueError(
            f"int8_block_size must be an int in [1, {MAX_INT8_BLOCK}], got {block!r}; "
            f"the default is {spec.INT8_BLOCK} (elements per scale, along each row)"
        )
    if group["int8_rounding"] not in spec.INT8_ROUNDINGS:
        raise ValueError(
            f"int8_rounding must be one of {spec.INT8_ROUNDINGS}, got {group['int8_rounding']!r}; "
            "'stochastic' keeps small momentum changes moving on average, 'nearest' can freeze them"
        )
    if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
        raise TypeError(f"seed must be an int, got {group['seed']!r}")
    for flag in ("cautious_wd", "maximize", "stochastic_rounding", "capturable", "compensation"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
    if group["compensation"] and group["stochastic_rounding"]:
        raise ValueError(
            "compensation=True and stochastic_rounding=True both keep small updates of bf16 params from rounding "
            "away; pick one (compensation keeps a buffer of the param's size, stochastic rounding keeps none)"
        )
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"Lion optimizes tensors, got a {type(p).__name__} in params")
        if not (p.is_floating_point() or p.is_complex()) or p.dtype.to_real() not in FLOAT_DTYPES:
            raise TypeError(
                f"Lion optimizes floating-point params (fp32, bf16, fp16, fp64, or complex of those), got one of "
                f"dtype {p.dtype} with shape {tuple(p.shape)}"
            )
        if p.is_complex() and group["momentum_dtype"] == torch.bfloat16:
            raise ValueError(
                f"a complex param ({p.dtype}, shape {tuple(p.shape)}) has no momentum_dtype="
                f"{group['momentum_dtype']}: its momentum is complex like it (momentum_dtype=None) or complex64 "
                "(momentum_dtype=torch.float32; an int8 group keeps complex64 for it too)"
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
        momentum_dtype: None (the param's dtype), torch.float32, torch.bfloat16 or torch.int8 (also by name,
            "int8"): 8-bit codes with one fp32 scale per `int8_block_size` elements of a row (see `momentum.py`
            for which params keep fp32). Math is fp32 (fp64 for fp64 params).
        int8_block_size, int8_rounding: the int8 momentum's block (default 128) and how it is requantized
            each step ("stochastic", the default, unbiased; or "nearest").
        compensation: keep each bf16/fp16 param's rounding error in a buffer of its dtype and add it back at
            the next step (Kahan summation), for pure bf16 training without fp32 master weights.
        backend: "auto" (fused Triton on CUDA, fused C on CPU where available, else foreach), "foreach",
            "triton", "cpu_fused" or "reference". `use_triton=True/False` maps to "triton"/"foreach".
        capturable: a step that reads nothing on the host and allocates nothing (the step count lives on the
            device, lr may be a device tensor), so `opt.step()` can be captured in a CUDA graph and replayed;
            fused Triton kernel only (CUDA params), as torch's Adam(capturable=True).
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
        momentum_dtype: torch.dtype | str | None = None,
        int8_block_size: int = spec.INT8_BLOCK,
        int8_rounding: str = "stochastic",
        compensation: bool = False,
        backend: str = "auto",
        use_triton: bool | None = None,
        capturable: bool = False,
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
            momentum_dtype=MOMENTUM_DTYPE_NAMES.get(momentum_dtype, momentum_dtype)
            if isinstance(momentum_dtype, str)
            else momentum_dtype,
            int8_block_size=int8_block_size,
            int8_rounding=int8_rounding,
            compensation=compensation,
            backend=backend,
            capturable=capturable,
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
        self._plans = PlanCache()
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
        group.setdefault("step", 0)  # steps taken with lr > 0 (skipped ones too); seeds stochastic rounding
        self._plans.clear()

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:  # pickling and copy.deepcopy keep the two policies, not the plans
        return {**super().__getstate__(), "_nonfinite": self._nonfinite, "_batch_guard": self._batch_guard}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = PlanCache()  # a copy plans its own tensors

    def declare_batch_size(self, global_batch_size: int, *, source: str = "global_batch_size") -> None:
        """Tell the batch guard the effective (global) batch and check it now, with this optimizer's
        `min_batch_size` and `batch_size_policy`. For code that owns the batch (a DeepSpeed engine's
        `train_batch_size`); `source` says where the number came from, for the message."""
        self._batch_guard.declare(global_batch_size, source)
        self._batch_guard.check(())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was non-finite (policy "skip")."""
        return self._nonfinite.skipped_steps

    def state_bytes(self) -> int:
        """This rank's optimizer-state bytes: local momentum (int8: codes and scales) and compensation."""
        return sum(momentum.state_bytes(s) for s in self.state.values())

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's, with each group's `momentum_dtype` by name ("int8"): DCP's state-dict tools carry
        tensors, numbers and strings, not torch dtypes."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            if isinstance(group.get("momentum_dtype"), torch.dtype):
                group["momentum_dtype"] = str(group["momentum_dtype"]).removeprefix("torch.")
        return state_dict

    def dequantized_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with every int8 momentum as an fp32 `exp_avg`, for tools that expect float momenta
        (lion-pytorch, a world size of FSDP1 or ZeRO flat partitions other than the one it was saved at)."""
        state_dict = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        blocks = [group["int8_block_size"] for group in self.param_groups for _ in group["params"]]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, p, block in zip(ids, params, blocks, strict=True):
            if i in state_dict["state"]:
                state_dict["state"][i] = momentum.dequantized_state(p, state_dict["state"][i], block)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what the load-state-dict pre-hooks make of `state_dict`, after checking all of it, so a bad
        state dict raises and leaves this optimizer as it was; then the post-hooks run, as in torch.optim."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            state_dict["param_groups"] = [_momentum_dtype_by_value(g) for g in state_dict["param_groups"]]
        current_values = self._check_state_dict(state_dict)
        saved_states = self._saved_states(state_dict)
        pre_hooks, self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_pre_hooks, {}
        try:
            super().load_state_dict(state_dict)  # the pre-hooks ran above, on what is checked
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
        self._plans.clear()  # new momentum tensors
        for group, values in zip(self.param_groups, current_values, strict=True):
            for key, value in values.items():  # keys an older or lion-pytorch state dict lacks
                group.setdefault(key, value)
            if isinstance(group["step"], Tensor) and not group["capturable"]:
                group["step"] = int(group["step"])  # saved by a capturable run
            for p in group["params"]:
                state = self.state.get(p)
                if state:  # as saved: torch casts every float state to the param's dtype (bf16 scales, momenta)
                    state.update({k: v.to(device=p.device) for k, v in saved_states[p].items()})
                    momentum.conform(p, state, group, create=False)

    def _saved_states(self, state_dict: dict[str, Any]) -> dict[Tensor, dict[str, Any]]:
        """The saved state of each param, by this optimizer's params (the pairing torch's load_state_dict uses)."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        return {p: state_dict["state"][i] for i, p in zip(saved_ids, params, strict=True) if i in state_dict["state"]}

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
            _validate_group(merged, allow_zero_lr=True)  # a schedule's warmup from 0 saves lr 0
            current_values.append({k: v for k, v in group.items() if k != "params"})
            for pi, (param_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                where = f"param_groups[{gi}]['params'][{pi}]"
                self._check_param_state(state_dict["state"].get(param_id), p, merged, where)
        return current_values

    @staticmethod
    def _check_param_state(state: Any, p: Tensor, group: dict[str, Any], where: str) -> None:
        if state is None:
            return
        if not isinstance(state, dict) or "exp_avg" not in state or not set(state) <= set(momentum.STATE_KEYS):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state for {where} has {keys}; a Lion state holds 'exp_avg' (the momentum), with int8 momentum "
                "'exp_avg_scale', with compensation 'compensation' (is this state dict from another optimizer?)"
            )
        exp_avg, scales = state["exp_avg"], state.get("exp_avg_scale")
        if scales is not None:
            expected = spec.int8_scale_shape(p.shape, group["int8_block_size"])
            if not isinstance(exp_avg, Tensor) or exp_avg.dtype != torch.int8 or exp_avg.shape != p.shape:
                raise TypeError(f"state for {where}: an int8 momentum's exp_avg must be int8 codes shaped as the param")
            if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != expected:
                raise ValueError(
                    f"state for {where}: exp_avg_scale must be fp32 of shape {expected} (int8_block_size="
                    f"{group['int8_block_size']}), got {scales!r:.80}"
                )
            return
        if not isinstance(exp_avg, Tensor) or not (exp_avg.is_floating_point() or exp_avg.is_complex()):
            raise TypeError(
                f"state for {where}: exp_avg must be a floating-point tensor (or int8 codes with their "
                f"exp_avg_scale), got {exp_avg!r:.80}"
            )
        if exp_avg.is_complex() != p.is_complex():
            raise TypeError(f"state for {where}: exp_avg is {exp_avg.dtype}, the param {p.dtype}")
        if exp_avg.shape != p.shape:
            raise ValueError(
                f"state for {where}: exp_avg has shape {tuple(exp_avg.shape)}, the param has "
                f"{tuple(p.shape)} (was the state saved for another model?)"
            )

    # ------------------------------------------------------------------ step

    def _hyperparams(self, group: dict[str, Any]) -> LionHyperparams:
        """This step's hyperparameters of `group`, checked (a schedule may have changed lr): a 1-element lr on an
        accelerator stays a tensor, read by the fused kernel on the device."""
        lr = group["lr"]
        on_device = isinstance(lr, Tensor) and lr.numel() == 1 and lr.device.type != "cpu"
        if not on_device:
            lr = _validate_lr(lr, allow_zero=True)
            _validate_decay(lr, group["weight_decay"], decoupled=group["decoupled_weight_decay"], lr0=group["lr0"])
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

    def _data_parallel_size(self) -> int | None:
        """How many ranks see different data, for the batch guard; None: infer it from the params' mesh."""
        return None

    def _exchanges_directions(self) -> bool:
        """Whether `_update` needs each param's direction before it is applied (a split step)."""
        return False

    @staticmethod
    def _sr_key(gi: int, group: dict[str, Any]) -> int | DeviceKey | None:
        """This step's stochastic-rounding key for group `gi` (None: round to nearest); a capturable group's
        counts its step on the device."""
        if not group["stochastic_rounding"]:
            return None
        return Lion._step_key(gi, group)

    @staticmethod
    def _quant_key(gi: int, group: dict[str, Any]) -> int | DeviceKey | None:
        """This step's key of the int8 momenta's stochastic requantization (None: nearest). It may equal the
        params' stochastic-rounding key: the momentum's noise streams differ (`spec.MOMENTUM_STREAM`)."""
        if group["momentum_dtype"] != torch.int8 or group["int8_rounding"] != "stochastic":
            return None
        return Lion._step_key(gi, group)

    @staticmethod
    def _step_key(gi: int, group: dict[str, Any]) -> int | DeviceKey:
        if isinstance(group["step"], Tensor):
            return DeviceKey(spec.sr_key_base(group["seed"], gi), group["step"])
        return spec.sr_key(group["seed"], gi, group["step"])

    def _cautious_means(self, bound: Bound, hp: LionHyperparams) -> list[Tensor]:
        """Each entry's cautious mean over its whole tensor: local counts, summed over shards in one batch.

        Every param with a gradient takes part in the batch, an empty local shard with a count of 0, so that
        all ranks reduce tensors of the same size.
        """
        plan = bound.plan
        counts = [
            spec.cautious_aligned_count(
                g,
                e.exp_avg if e.scales is None else spec.dequantize_momentum(e.exp_avg, e.scales, e.block),
                hp,
                spec.math_dtype(e.param.dtype),
            )
            for g, e in zip(bound.grads, plan.entries, strict=True)
        ]
        if plan.nonempty is not None:
            padded = [torch.zeros((), dtype=torch.int64, device=shards.local(p).device) for p in plan.present]
            for k, count in zip(plan.nonempty, counts, strict=True):
                padded[k] = count
            summed = shards.sum_over_shards(plan.present, padded)
            counts = [summed[k] for k in plan.nonempty]
        else:
            counts = shards.sum_over_shards(plan.present, counts)
        return [spec.cautious_mean(c, n, hp.cautious_factor) for c, n in zip(counts, plan.entry_numels, strict=True)]

    def _bind(self) -> list[Bound]:
        split = self._exchanges_directions()
        return [
            self._plans.bind(gi, group, self.state, lambda pi, gi=gi: self._param_name(gi, pi), split=split)
            for gi, group in enumerate(self.param_groups)
        ]

    @torch.compiler.disable(reason=_NOT_TRACEABLE)
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Lion step on every local shard; returns the closure's loss.

        `torch.compile` runs it as it is (it is marked `torch.compiler.disable`): see `_NOT_TRACEABLE`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._batch_guard.check((p for group in self.param_groups for p in group["params"]), self._data_parallel_size())
        bound = self._bind()
        skip = None if self._nonfinite.policy == "ignore" else self._check_nonfinite(bound)
        hps = [self._hyperparams(group) for group in self.param_groups]
        for group, b in zip(self.param_groups, bound, strict=True):
            if group["capturable"] and not isinstance(group["step"], Tensor) and b.plan.entries:
                group["step"] = torch.tensor(group["step"], dtype=torch.int64, device=b.plan.entries[0].param.device)
        if skip is not True:
            self._update(bound, hps, skip if isinstance(skip, Tensor) else None)
        for group, hp in zip(self.param_groups, hps, strict=True):
            _count_step(group, hp)
        return loss

    def _check_nonfinite(self, bound: list[Bound]) -> bool | Tensor | None:
        grads = [g for b in bound for g in b.grads]
        where = [(gi, pi) for gi, b in enumerate(bound) for pi in b.plan.entry_positions]
        return self._nonfinite.check(grads, lambda i: self._param_name(*where[i]))

    def _update(self, bound: list[Bound], hps: list[LionHyperparams], skip: Tensor | None) -> None:
        """The update of every group: fused, or split around `_aggregate` when directions are exchanged."""
        if not self._exchanges_directions():
            for gi, (b, hp) in enumerate(zip(bound, hps, strict=True)):
                means = self._cautious_means(b, hp) if hp.cautious_factor is not None else None
                group = self.param_groups[gi]
                b.step(hp, skip=skip, sr_key=self._sr_key(gi, group), means=means, quant_key=self._quant_key(gi, group))
            return
        if skip is not None and bool(skip):  # a device flag read on the host: the exchange syncs anyway
            return
        directions = self._aggregate(bound, hps, [b.direction(hp) for b, hp in zip(bound, hps, strict=True)])
        for gi, (b, hp, u) in enumerate(zip(bound, hps, directions, strict=True)):
            if u is not None:
                b.apply(u, hp, self._sr_key(gi, self.param_groups[gi]))

    def _aggregate(
        self, bound: list[Bound], hps: list[LionHyperparams], directions: list[list[Tensor]]
    ) -> Sequence[list[Tensor] | None]:
        """The hook of a split step: each group's local directions in, the directions to apply out (None:
        leave that group's params as they are)."""
        return directions


def _momentum_dtype_by_value(group: Any) -> Any:
    """A saved group with its `momentum_dtype` name ("int8", as `Lion.state_dict` writes it) as the torch dtype."""
    if isinstance(group, dict) and isinstance(name := group.get("momentum_dtype"), str):
        return {**group, "momentum_dtype": MOMENTUM_DTYPE_NAMES.get(name, name)}
    return group


def _count_step(group: dict[str, Any], hp: LionHyperparams) -> None:
    """Count a step taken with lr != 0 (skipped ones too: a device skip flag is never read on the host), on the
    device for a capturable group."""
    step = group["step"]
    if isinstance(step, Tensor):
        step.add_(hp.lr.ne(0).to(step.dtype) if isinstance(hp.lr, Tensor) else int(hp.lr != 0))
    elif isinstance(hp.lr, Tensor) or hp.lr != 0:
        group["step"] = step + 1
