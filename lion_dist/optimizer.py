"""`lion_dist.Lion`: a `torch.optim.Optimizer` that manages groups and state and dispatches the math.

The class knows no kernel and no storage details: `spec.py` holds the math, `formats/` how a momentum is stored,
`layouts.py` how a param is sharded, `backends/` the ways to run the step, and `plan.py` the per-group plan (local
views, state, routes to backends, their tables) that is built once and reused across steps. It updates only each
rank's local shard. Per param it keeps its momentum in the group's format (and, with `compensation=True`, a Kahan
buffer); everything else lives in the param groups, so `state_dict()` and `torch.distributed.checkpoint` carry it.

`step`: the closure, the batch guard, binding each group's plan to this step's gradients, the non-finite policy,
then one fused step per group; or, with a direction `exchange` (Distributed Lion), each group's directions, the
exchange, then the agreed update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lion_dist import _torch, formats, groups, layouts, spec
from lion_dist.backends import StepArgs
from lion_dist.batch_guard import BatchGuard
from lion_dist.exchange import DirectionExchange
from lion_dist.nonfinite import NonfiniteGuard
from lion_dist.plan import Bound, PlanCache
from lion_dist.spec import LionHyperparams

_NOT_TRACEABLE = (
    "lion_dist.Lion.step checks each gradient against its cached plan with data_ptr() and calls its fused kernels "
    "with raw pointer tables (ctypes on CPU, Triton on GPU): nothing dynamo can trace, and the host work is a few "
    "C-level passes already. torch.compile runs the step eagerly; to capture a whole step use capturable=True and "
    "a CUDA graph."
)


class Lion(Optimizer):
    """Lion (Chen et al. 2023, arXiv 2302.06675) for sharded training: each rank updates only its shard.

    A drop-in for `lion_pytorch.Lion` (same positional arguments and defaults). Its one piece of state per
    param is the momentum (AdamW keeps two), in the param's dtype or the format `momentum_dtype` names.

    Args:
        lr, betas, weight_decay: as in the paper; `p <- p * (1 - lr * wd)` each step.
        decoupled_weight_decay: use `wd / lr0` (lr0: the group's initial lr), so the decay follows the schedule.
        cautious_factor: None for plain Lion; in [0, 1] for cautious Lion (arXiv 2411.16085).
        cautious_wd: decay only where the update and the param agree in sign (arXiv 2510.12402).
        maximize: ascend instead of descend.
        momentum_dtype: None (the param's dtype), torch.float32, torch.bfloat16 or torch.int8 (also by name,
            "int8"): 8-bit codes with one fp32 scale per `int8_block_size` elements of a row (see
            `formats/int8.py` for which params keep fp32); or the name of a format added with
            `lion_dist.formats.register`. Math is fp32 (fp64 for fp64 params).
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
        exchange: a `lion_dist.exchange.DirectionExchange` that replicas agree on directions through
            (`lion_dist.distributed_lion.DistributedLion` sets its 1-bit vote here).
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
        exchange: DirectionExchange | None = None,
    ) -> None:
        if use_triton is not None:
            if backend != "auto":
                raise ValueError(
                    f"pass backend or use_triton, not both (got backend={backend!r}, use_triton={use_triton!r})"
                )
            backend = "triton" if use_triton else "foreach"
        if capturable and nonfinite == "error":
            raise ValueError(
                "capturable=True with nonfinite='error' cannot work: raising needs the flag on the host, a sync "
                "that a captured CUDA graph cannot make. Use nonfinite='skip' (read on the device) or 'ignore'."
            )
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_factor=cautious_factor,
            cautious_wd=cautious_wd,
            maximize=maximize,
            momentum_dtype=formats.canonical(momentum_dtype),
            int8_block_size=int8_block_size,
            int8_rounding=int8_rounding,
            compensation=compensation,
            backend=backend,
            capturable=capturable,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        groups.validate({**defaults, "params": []})
        self._nonfinite = NonfiniteGuard(nonfinite)
        self._batch_guard = BatchGuard(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            min_batch_size=min_batch_size,
            policy=batch_size_policy,
        )
        self._plans = PlanCache()
        self._exchange = exchange
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["momentum_dtype"] = formats.canonical(group["momentum_dtype"])
            groups.validate(group)
            if self._exchange is not None:
                self._exchange.check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        group.setdefault("lr0", float(group["lr"]))  # decoupled weight decay's reference lr
        group.setdefault("step", 0)  # steps taken with lr > 0 (skipped ones too); seeds stochastic rounding
        self._plans.clear()

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:  # pickling and copy.deepcopy keep the policies, not the plans
        return {
            **super().__getstate__(),
            "_nonfinite": self._nonfinite,
            "_batch_guard": self._batch_guard,
            "_exchange": self._exchange,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = PlanCache()  # a copy plans its own tensors

    def declare_batch_size(self, global_batch_size: int, *, source: str = "global_batch_size") -> None:
        """Tell the batch guard the effective (global) batch and check it now, with this optimizer's
        `min_batch_size` and `batch_size_policy`. For code that owns the batch (a DeepSpeed engine's
        `train_batch_size`); `source` says where the number came from, for the message."""
        self._batch_guard.declare(global_batch_size, source)
        self._batch_guard.check(self._data_parallel_size)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was non-finite (policy "skip")."""
        return self._nonfinite.skipped_steps

    def _params_with_groups(self) -> Iterable[tuple[Tensor, dict[str, Any]]]:
        return ((p, group) for group in self.param_groups for p in group["params"])

    def state_bytes(self) -> int:
        """This rank's optimizer-state bytes: local momentum (int8: codes and scales) and compensation."""
        return sum(formats.state_bytes(state, self.param_groups[0]) for state in self.state.values())

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's, with each group's `momentum_dtype` by name ("int8": DCP's state-dict tools carry
        tensors, numbers and strings, not torch dtypes); with an exchange, every replica's momentum."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["momentum_dtype"] = formats.name_of(group.get("momentum_dtype"))
        if self._exchange is not None:
            state_dict = self._exchange.stacked_state_dict(state_dict, self.param_groups)
        return state_dict

    def dequantized_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with every int8 momentum as an fp32 `exp_avg`, for tools that expect float momenta
        (lion-pytorch, a world size of FSDP1 or ZeRO flat partitions other than the one it was saved at)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["momentum_dtype"] = formats.name_of(group.get("momentum_dtype"))
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, (p, group) in zip(ids, self._params_with_groups(), strict=True):
            if i in state_dict["state"]:
                state_dict["state"][i] = formats.as_float(p, state_dict["state"][i], group, layouts.of(p))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what the load-state-dict pre-hooks make of `state_dict`, after checking all of it, so a bad
        state dict raises and leaves this optimizer as it was; then the post-hooks run, as in torch.optim.
        Per-param keys of no momentum format (a wrapper's, e.g. timm's Lookahead) are carried as they are."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for hook in _torch.load_state_dict_pre_hooks(self).values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if self._exchange is not None and isinstance(state_dict, dict):
            state_dict = self._exchange.unstacked_state_dict(state_dict, self.param_groups)
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            state_dict["param_groups"] = [groups.by_value(g) for g in state_dict["param_groups"]]
        current_values = self._check_state_dict(state_dict)
        saved_states = self._saved_states(state_dict)
        pre_hooks = _torch.load_state_dict_pre_hooks(self)
        _torch.set_load_state_dict_pre_hooks(self, {})
        try:
            super().load_state_dict(state_dict)  # the pre-hooks ran above, on what is checked
        finally:
            _torch.set_load_state_dict_pre_hooks(self, pre_hooks)
        self._plans.clear()  # new state tensors
        for group, values in zip(self.param_groups, current_values, strict=True):
            for key, value in values.items():  # keys an older or lion-pytorch state dict lacks
                group.setdefault(key, value)
            if isinstance(group["step"], Tensor) and not group["capturable"]:
                group["step"] = int(group["step"])  # saved by a capturable run
            for p in group["params"]:
                state = self.state.get(p)
                if state:  # as saved: torch casts every float state to the param's dtype (bf16 scales, momenta)
                    state.update({k: v.to(device=p.device) for k, v in saved_states[p].items()})
                    formats.conform(p, state, group, layouts.of(p), create=False)

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
            groups.validate(merged, allow_zero_lr=True)  # a schedule's warmup from 0 saves lr 0
            current_values.append({k: v for k, v in group.items() if k != "params"})
            for pi, (param_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                state = state_dict["state"].get(param_id)
                if state is not None:
                    formats.check_state(p, state, merged, f"param_groups[{gi}]['params'][{pi}]")
        return current_values

    # ------------------------------------------------------------------ step

    def _param_name(self, gi: int, pi: int) -> str:
        """How errors name a param: its name when the optimizer got `named_parameters()`, else its position."""
        group = self.param_groups[gi]
        names = group.get("param_names")
        if names:
            return names[pi]
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(group['params'][pi].shape)})"

    def _data_parallel_size(self) -> int:
        """How many ranks see different data, for the batch guard: the exchange's replicas x the params' own."""
        params = [p for p, _ in self._params_with_groups()]
        if self._exchange is not None and (size := self._exchange.data_parallel_size(params)) is not None:
            return size
        return layouts.data_parallel_size(params)

    def _splits(self) -> bool:
        return self._exchange is not None and self._exchange.active()

    def _cautious_means(self, bound: Bound, hp: LionHyperparams) -> list[Tensor]:
        """Each entry's cautious mean over its whole tensor: local counts, summed over shards in one batch.

        Every param with a gradient takes part in the batch, an empty local shard with a count of 0, so that
        all ranks reduce tensors of the same size.
        """
        plan = bound.plan
        counts = [
            spec.cautious_aligned_count(g, e.format.decode(e.state), hp, spec.math_dtype(e.param.dtype))
            for g, e in zip(bound.grads, plan.entries, strict=True)
        ]
        if plan.nonempty is not None:
            padded = [torch.zeros((), dtype=torch.int64, device=layouts.local(p).device) for p in plan.present]
            for k, count in zip(plan.nonempty, counts, strict=True):
                padded[k] = count
            summed = layouts.sum_over_shards(plan.present_layouts, padded)
            counts = [summed[k] for k in plan.nonempty]
        else:
            counts = layouts.sum_over_shards(plan.present_layouts, counts)
        return [spec.cautious_mean(c, n, hp.cautious_factor) for c, n in zip(counts, plan.entry_numels, strict=True)]

    def _bind(self) -> list[Bound]:
        split = self._splits()
        return [
            self._plans.bind(gi, group, self.state, lambda pi, gi=gi: self._param_name(gi, pi), split=split)
            for gi, group in enumerate(self.param_groups)
        ]

    def _bind_param(self, param: Tensor, group: dict[str, Any]) -> Bound:
        """A split-step plan of `param` alone, from its `group` (Distributed Lion's overlap takes each param's
        direction as its gradient is ready), kept with the groups' plans so that what drops those drops it."""

        def name(_: int) -> str:
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            return self._param_name(gi, next(i for i, p in enumerate(group["params"]) if p is param))

        return self._plans.bind(("param", id(param)), {**group, "params": [param]}, self.state, name, split=True)

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
        self._batch_guard.check(self._data_parallel_size)
        bound = self._bind()
        skip = None if self._nonfinite.policy == "ignore" else self._check_nonfinite(bound)
        hps = [groups.hyperparams(group) for group in self.param_groups]
        for group, b in zip(self.param_groups, bound, strict=True):
            if group["capturable"] and not isinstance(group["step"], Tensor) and b.plan.entries:
                group["step"] = torch.tensor(group["step"], dtype=torch.int64, device=b.plan.entries[0].param.device)
        if skip is not True:
            self._update(bound, hps, skip if isinstance(skip, Tensor) else None)
        for group, hp in zip(self.param_groups, hps, strict=True):
            groups.count_step(group, hp)
        return loss

    def _check_nonfinite(self, bound: list[Bound]) -> bool | Tensor | None:
        grads = [g for b in bound for g in b.grads]
        where = [(gi, pi) for gi, b in enumerate(bound) for pi in b.plan.entry_positions]
        return self._nonfinite.check(grads, lambda i: self._param_name(*where[i]))

    def _update(self, bound: list[Bound], hps: list[LionHyperparams], skip: Tensor | None) -> None:
        """The update of every group: fused, or split around the exchange."""
        args = [
            StepArgs(
                hp,
                skip=skip,
                sr_key=groups.sr_key(gi, group),
                quant_key=groups.quant_key(gi, group),
                means=self._cautious_means(b, hp) if hp.cautious_factor is not None else None,
            )
            for gi, (group, b, hp) in enumerate(zip(self.param_groups, bound, hps, strict=True))
        ]
        if not self._splits():
            for b, a in zip(bound, args, strict=True):
                b.step(a)
            return
        if skip is not None and bool(skip):  # a device flag read on the host: the exchange syncs anyway
            return
        agreed = self._exchange.exchange(bound, args, self.param_groups)
        for b, a, u in zip(bound, args, agreed, strict=True):
            if u is not None:
                b.apply(u, a)
