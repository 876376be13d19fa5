"""The DeepSpeed JSON entry `"optimizer": {"type": "LionDist", "params": {...}}`: reading a config and checking
its "params" as `lion_dist.Lion`'s keyword arguments.

Everything here runs before DeepSpeed starts (which takes seconds), so a bad key fails at once, naming the key.
Nothing here imports deepspeed.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from lion_dist import formats
from lion_dist.optimizer import Lion

OPTIMIZER_TYPE = "LionDist"

# DeepSpeed owns the batch: train_batch_size = micro batch x gradient accumulation x data-parallel size.
BATCH_KEYS = {
    "global_batch_size": "train_batch_size",
    "micro_batch_size": "train_micro_batch_size_per_gpu",
    "grad_accum_steps": "gradient_accumulation_steps",
}

NO_CAUTIOUS_UNDER_ZERO = (
    'DeepSpeed config "optimizer.params.cautious_factor": cautious Lion rescales by a mean over each whole '
    "tensor, but under ZeRO (stage >= 1) or fp16/bf16 DeepSpeed hands the optimizer flat buffers of many "
    "tensors, so the mean would be wrong. Remove cautious_factor, or use FSDP2 for cautious Lion."
)

_NO_EPS = (
    'DeepSpeed config "optimizer.params" has "eps": Lion has no epsilon (it takes the sign of the update), so '
    'remove "eps" (Hugging Face\'s AdamW template has "eps": "auto")'
)


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a new dict: a copy of a mapping, or a JSON file read from a path."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"a DeepSpeed config must be a path to a JSON file or a dict, got {type(config).__name__}")
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"DeepSpeed config file {os.fspath(config)!r} does not exist; pass a JSON path or a dict"
        )
    with open(config) as f:
        try:
            loaded = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepSpeed config file {os.fspath(config)!r} is not valid JSON: {e}") from e
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config file {os.fspath(config)!r} must hold a JSON object, got {loaded!r:.80}")
    return loaded


def lion_kwargs(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """`lion_dist.Lion`'s keyword arguments from a config whose optimizer is "LionDist"; None for any other.

    Raises naming the key for a malformed "optimizer" section, an unknown or DeepSpeed-owned key in "params",
    or a value `Lion` rejects (checked here, before DeepSpeed's slow start).
    """
    section = config.get("optimizer")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ValueError(f'DeepSpeed config "optimizer" must be an object like {{"type": "{OPTIMIZER_TYPE}"}}')
    kind = section.get("type")
    if not isinstance(kind, str):
        raise ValueError(f'DeepSpeed config "optimizer" needs a "type" string (e.g. "{OPTIMIZER_TYPE}"), got {kind!r}')
    if kind != OPTIMIZER_TYPE:
        if kind.lower() == OPTIMIZER_TYPE.lower():
            raise ValueError(
                f'DeepSpeed config "optimizer.type" is {kind!r}; write "{OPTIMIZER_TYPE}" (case-sensitive)'
            )
        return None
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ValueError(f'DeepSpeed config "optimizer" has unknown key {unknown[0]!r}; it takes "type" and "params"')
    return lion_params(section.get("params", {}), batch_keys=False)


def lion_params(params: Any, *, batch_keys: bool) -> dict[str, Any]:
    """`lion_dist.Lion`'s keyword arguments from a "LionDist" config's "params", checked and converted
    (`momentum_dtype` from a string, `betas` from a list). `batch_keys`: whether `global_batch_size`,
    `micro_batch_size` and `grad_accum_steps` may be given (the `register()` path; `initialize` reads the batch
    from DeepSpeed)."""
    if not isinstance(params, Mapping):
        raise ValueError(f'DeepSpeed config "optimizer.params" must be an object of Lion arguments, got {params!r:.80}')
    keywords = [name for name in inspect.signature(Lion.__init__).parameters if name not in ("self", "params")]
    allowed = [k for k in keywords if batch_keys or k not in BATCH_KEYS]
    kwargs = dict(params)
    for key in kwargs:
        if key in BATCH_KEYS and not batch_keys:
            raise ValueError(
                f'DeepSpeed config "optimizer.params" has {key!r}: DeepSpeed owns the batch, so set '
                f'"{BATCH_KEYS[key]}" at the top level of the config instead (lion_dist feeds DeepSpeed\'s '
                "train_batch_size to the batch guard)"
            )
        if key == "eps":
            raise ValueError(_NO_EPS)
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise ValueError(
                f'DeepSpeed config "optimizer.params" has unknown key {key!r} for "{OPTIMIZER_TYPE}"'
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; lion_dist.Lion takes: {', '.join(allowed)}"
            )
    if isinstance(kwargs.get("momentum_dtype"), str):
        name = kwargs["momentum_dtype"]
        if not formats.is_known(formats.canonical(name)):
            raise ValueError(
                f'DeepSpeed config "optimizer.params.momentum_dtype" is {name!r}; use one of '
                f"{formats.describe_choices()} or null"
            )
        kwargs["momentum_dtype"] = formats.canonical(name)
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        Lion([torch.zeros(1)], **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f'DeepSpeed config "optimizer.params": {e}') from e
    return kwargs


def section(config: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """`config[k1][k2]...`, or {} where a level is missing or not an object (DeepSpeed reports those itself)."""
    for key in keys:
        config = config.get(key) if isinstance(config, Mapping) else None
    return config if isinstance(config, Mapping) else {}


def flattens_params(config: Mapping[str, Any]) -> bool:
    """Whether DeepSpeed hands the optimizer flat buffers of many params (ZeRO >= 1, or an fp16/bf16 wrapper)."""
    mixed = any(section(config, key).get("enabled") for key in ("fp16", "bf16", "bfloat16"))
    return mixed or int(section(config, "zero_optimization").get("stage", 0)) >= 1


def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    return section(config, "zero_optimization", "offload_optimizer").get("device", "none") not in (None, "none")


def batch_source(micro_batch: int, grad_accum: int, data_parallel: int) -> str:
    """What the batch guard says about where DeepSpeed's train_batch_size came from."""
    return (
        f"DeepSpeed train_batch_size = micro batch {micro_batch} x gradient_accumulation_steps {grad_accum} x "
        f"data-parallel size {data_parallel}"
    )
