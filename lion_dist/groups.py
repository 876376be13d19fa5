"""A param group's settings: what is allowed, and what they make of one step (hyperparameters, noise keys).

`Lion` keeps its hyperparameters in `param_groups` (so schedulers, `state_dict()` and DCP carry them); this module
checks them (a bad value raises a ValueError/TypeError naming it, its value and what is allowed) and resolves them
for a step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from lion_dist import formats, spec
from lion_dist.backends import NAMES as BACKENDS
from lion_dist.formats.int8 import MAX_BLOCK as MAX_INT8_BLOCK
from lion_dist.spec import FLOAT_DTYPES, DeviceKey, LionHyperparams


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_lr(lr: Any, *, allow_zero: bool) -> float:
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


def validate_decay(lr: float, weight_decay: float, *, decoupled: bool, lr0: float | None) -> None:
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


def validate(group: dict[str, Any], *, allow_zero_lr: bool = False) -> None:
    """Raise a ValueError/TypeError naming the bad hyperparameter, its value and what is allowed."""
    lr = validate_lr(group["lr"], allow_zero=allow_zero_lr)
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
    validate_decay(lr, wd, decoupled=group["decoupled_weight_decay"], lr0=group.get("lr0", lr))
    factor = group["cautious_factor"]
    if factor is not None and (not _is_real_number(factor) or not 0.0 <= factor <= 1.0):
        raise ValueError(f"cautious_factor must be None (plain Lion) or in [0, 1], got {factor!r}")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {group['backend']!r}")
    if not formats.is_known(group["momentum_dtype"]):
        raise ValueError(f"momentum_dtype must be {formats.describe_choices()}, got {group['momentum_dtype']!r}")
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


def hyperparams(group: dict[str, Any]) -> LionHyperparams:
    """This step's hyperparameters of `group`, checked (a schedule may have changed lr): a 1-element lr on an
    accelerator stays a tensor, read by the fused kernel on the device."""
    lr = group["lr"]
    on_device = isinstance(lr, Tensor) and lr.numel() == 1 and lr.device.type != "cpu"
    if not on_device:
        lr = validate_lr(lr, allow_zero=True)
        validate_decay(lr, group["weight_decay"], decoupled=group["decoupled_weight_decay"], lr0=group["lr0"])
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


def step_key(gi: int, group: dict[str, Any]) -> int | DeviceKey:
    """This step's Philox key of group `gi`; a capturable group counts its step on the device."""
    if isinstance(group["step"], Tensor):
        return DeviceKey(spec.sr_key_base(group["seed"], gi), group["step"])
    return spec.sr_key(group["seed"], gi, group["step"])


def sr_key(gi: int, group: dict[str, Any]) -> int | DeviceKey | None:
    """The key of bf16 params' stochastic rounding (None: round to nearest)."""
    return step_key(gi, group) if group["stochastic_rounding"] else None


def quant_key(gi: int, group: dict[str, Any]) -> int | DeviceKey | None:
    """The key of the momentum format's stochastic encoding (None: it has none). It may equal the params' key:
    the momentum's noise streams differ (`spec.MOMENTUM_STREAM`)."""
    return step_key(gi, group) if formats.of_group(group).stochastic else None


def count_step(group: dict[str, Any], hp: LionHyperparams) -> None:
    """Count a step taken with lr != 0 (skipped ones too: a device skip flag is never read on the host), on the
    device for a capturable group."""
    step = group["step"]
    if isinstance(step, Tensor):
        step.add_(hp.lr.ne(0).to(step.dtype) if isinstance(hp.lr, Tensor) else int(hp.lr != 0))
    elif isinstance(hp.lr, Tensor) or hp.lr != 0:
        group["step"] = step + 1


def by_value(group: Any) -> Any:
    """A saved group with its `momentum_dtype` name ("int8", as `Lion.state_dict` writes it) as the value the
    optimizer keeps (a torch dtype for the built-in formats)."""
    if isinstance(group, dict) and isinstance(group.get("momentum_dtype"), str):
        return {**group, "momentum_dtype": formats.canonical(group["momentum_dtype"])}
    return group
