"""DeepSpeed's JSON optimizer entry for `lion_dist.Lion`: `"optimizer": {"type": "LionDist", "params": {...}}`.

DeepSpeed builds only its own optimizers from the JSON config (its `"Lion"` is CUDA-only, or `DeepSpeedCPULion`
under optimizer offload) and looks any other name up as an attribute of `torch.optim`. Two ways in:

- `initialize(...)`, a drop-in for `deepspeed.initialize`: it reads the config (a path or a dict), builds
  `lion_dist.Lion` from `"params"` (Lion's keyword arguments) for ZeRO stages 0-3 and optimizer offload, sets in
  a copy of the config what DeepSpeed needs for a client optimizer under ZeRO (`zero_allow_untested_optimizer`,
  `zero_force_ds_cpu_optimizer: false`), and gives the batch guard DeepSpeed's `train_batch_size`. Any other
  optimizer type, DeepSpeed's own `"Lion"` included, goes to `deepspeed.initialize` untouched.
- `register()`, for code that must call `deepspeed.initialize` itself: it adds `torch.optim.LionDist` (a new
  name; nothing of torch or DeepSpeed is replaced), which DeepSpeed's documented lookup then finds. That path
  cannot see `train_batch_size` and DeepSpeed still asks for `"zero_allow_untested_optimizer": true` under
  ZeRO, so `initialize` is the recommended one.

`deepspeed` is imported only inside `initialize`: `lion_dist` works without it.
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

from lion_dist.batch_guard import BatchGuard
from lion_dist.optimizer import Lion

OPTIMIZER_TYPE = "LionDist"

# DeepSpeed owns the batch: train_batch_size = micro batch x gradient accumulation x data-parallel size.
_BATCH_KEYS = {
    "global_batch_size": "train_batch_size",
    "micro_batch_size": "train_micro_batch_size_per_gpu",
    "grad_accum_steps": "gradient_accumulation_steps",
}
_GUARD_KEYS = {"min_batch_size": "min_batch_size", "batch_size_policy": "policy"}  # Lion's name: BatchGuard's
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _lion_keywords() -> list[str]:
    return [name for name in inspect.signature(Lion.__init__).parameters if name not in ("self", "params")]


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
    params = section.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f'DeepSpeed config "optimizer.params" must be an object of Lion arguments, got {params!r:.80}')
    allowed = [k for k in _lion_keywords() if k not in _BATCH_KEYS]
    kwargs = dict(params)
    for key in kwargs:
        if key in _BATCH_KEYS:
            raise ValueError(
                f'DeepSpeed config "optimizer.params" has {key!r}: DeepSpeed owns the batch, so set '
                f'"{_BATCH_KEYS[key]}" at the top level of the config instead (lion_dist feeds DeepSpeed\'s '
                "train_batch_size to the batch guard)"
            )
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise ValueError(
                f'DeepSpeed config "optimizer.params" has unknown key {key!r} for "{OPTIMIZER_TYPE}"'
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; lion_dist.Lion takes: {', '.join(allowed)}"
            )
    if isinstance(kwargs.get("momentum_dtype"), str):
        name = kwargs["momentum_dtype"]
        if name not in _DTYPES:
            raise ValueError(
                f'DeepSpeed config "optimizer.params.momentum_dtype" is {name!r}; use one of {sorted(_DTYPES)} or null'
            )
        kwargs["momentum_dtype"] = _DTYPES[name]
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        Lion([torch.zeros(1)], **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f'DeepSpeed config "optimizer.params": {e}') from e
    return kwargs


def _section(config: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """`config[k1][k2]...`, or {} where a level is missing or not an object (DeepSpeed reports those itself)."""
    for key in keys:
        config = config.get(key) if isinstance(config, Mapping) else None
    return config if isinstance(config, Mapping) else {}


def _flattens_params(config: Mapping[str, Any]) -> bool:
    """Whether DeepSpeed hands the optimizer flat buffers of many params (ZeRO >= 1, or an fp16/bf16 wrapper)."""
    mixed = any(_section(config, key).get("enabled") for key in ("fp16", "bf16", "bfloat16"))
    return mixed or int(_section(config, "zero_optimization").get("stage", 0)) >= 1


def _offloads_optimizer(config: Mapping[str, Any]) -> bool:
    return _section(config, "zero_optimization", "offload_optimizer").get("device", "none") not in (None, "none")


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    *,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    config_params: str | os.PathLike | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """`deepspeed.initialize` that also understands `"optimizer": {"type": "LionDist", "params": {...}}`.

    Same arguments and return value (engine, optimizer, dataloader, lr_scheduler). The config comes from
    `config`, `config_params` or `args.deepspeed_config`, as in DeepSpeed. With "LionDist", `params` are
    `lion_dist.Lion`'s keyword arguments (`momentum_dtype` as "float32"/"bfloat16"), and the batch guard checks
    DeepSpeed's `train_batch_size` right here, before the first step.
    """
    sources = [
        (name, value)
        for name, value in (
            ("config", config),
            ("config_params", config_params),
            ("args.deepspeed_config", getattr(args, "deepspeed_config", None)),
        )
        if value is not None
    ]
    if not sources:
        raise ValueError(
            "lion_dist.deepspeed.initialize needs a DeepSpeed config: pass config= (a JSON path or a dict) "
            "or args with deepspeed_config"
        )
    if len(sources) > 1:
        raise ValueError(f"pass the DeepSpeed config once, got it as {' and '.join(name for name, _ in sources)}")
    source_name, source = sources[0]
    ds_config = load_config(source)
    lion_args = lion_kwargs(ds_config)
    passthrough = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, **kwargs)
    if lion_args is None:  # not ours: DeepSpeed sees exactly what the caller passed
        import deepspeed

        return deepspeed.initialize(**passthrough, config=config, config_params=config_params)

    if optimizer is not None:
        raise ValueError(
            f'got both optimizer= and a "{OPTIMIZER_TYPE}" optimizer in the DeepSpeed config; '
            "DeepSpeed would silently drop the config's, so pass one of them"
        )
    if lion_args.get("cautious_factor") is not None and _flattens_params(ds_config):
        raise ValueError(
            'DeepSpeed config "optimizer.params.cautious_factor": cautious Lion rescales by a mean over each whole '
            "tensor, but under ZeRO (stage >= 1) or fp16/bf16 DeepSpeed hands the optimizer flat buffers of many "
            "tensors, so the mean would be wrong. Remove cautious_factor, or use FSDP2 for cautious Lion."
        )
    guard_args = {name: lion_args.pop(key) for key, name in _GUARD_KEYS.items() if key in lion_args}
    del ds_config["optimizer"]
    ds_config["zero_allow_untested_optimizer"] = True
    if _offloads_optimizer(ds_config):
        ds_config["zero_force_ds_cpu_optimizer"] = False
    if source_name == "args.deepspeed_config":
        passthrough["args"] = copy.copy(args)
        passthrough["args"].deepspeed_config = None
    # a callable: DeepSpeed builds Lion after its own param conversion (ZeRO-3) on the params it trains
    passthrough["optimizer"] = lambda params: Lion(params, **lion_args, batch_size_policy="ignore")

    import deepspeed  # only now, after the checks above: it takes seconds

    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(**passthrough, config=ds_config)
    guard = BatchGuard(
        global_batch_size=engine.train_batch_size(),
        source=(
            f"DeepSpeed train_batch_size = micro batch {engine.train_micro_batch_size_per_gpu()} x "
            f"gradient_accumulation_steps {engine.gradient_accumulation_steps()} x data-parallel size "
            f"{engine.dp_world_size}"
        ),
        **guard_args,
    )
    engine.basic_optimizer._batch_guard = guard
    guard.check(())
    return engine, ds_optimizer, dataloader, scheduler


def register() -> None:
    """Let a plain `deepspeed.initialize` build `lion_dist.Lion` from `"type": "LionDist"`.

    DeepSpeed looks an optimizer type it does not know up as an attribute of `torch.optim` (case-sensitive);
    this adds `torch.optim.LionDist = lion_dist.Lion`. Under ZeRO, DeepSpeed then also wants
    `"zero_allow_untested_optimizer": true`, and the batch guard learns the batch only from
    `"global_batch_size"` in `params`. Idempotent; refuses to shadow a different `torch.optim.LionDist`.
    """
    existing = getattr(torch.optim, OPTIMIZER_TYPE, None)
    if existing is not None and existing is not Lion:
        raise RuntimeError(
            f"torch.optim.{OPTIMIZER_TYPE} is already {existing!r}; not replacing it with lion_dist.Lion"
        )
    setattr(torch.optim, OPTIMIZER_TYPE, Lion)
