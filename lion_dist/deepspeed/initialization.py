"""`lion_dist.deepspeed.initialize`: `deepspeed.initialize` that also understands "LionDist".

DeepSpeed builds only its own optimizers from the JSON config and looks any other name up in `torch.optim`.
Rather than register a name, this reads the config itself, hands DeepSpeed a callable that builds `Lion` (so
DeepSpeed still builds it after its own param conversion, on the params it trains), and once the engine exists
declares DeepSpeed's `train_batch_size` to Lion's batch guard through `Lion.declare_batch_size`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch

from lion_dist.deepspeed.config import (
    NO_CAUTIOUS_UNDER_ZERO,
    OPTIMIZER_TYPE,
    batch_source,
    flattens_params,
    lion_kwargs,
    load_config,
    offloads_optimizer,
)
from lion_dist.deepspeed.partitions import declare_partitions
from lion_dist.optimizer import Lion


def declare_engine_batch(optimizer: Lion, engine: Any) -> None:
    """Declare `engine`'s train_batch_size to `optimizer`'s batch guard (checked at once), naming its parts."""
    source = batch_source(
        engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), engine.dp_world_size
    )
    optimizer.declare_batch_size(engine.train_batch_size(), source=source)


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
    `lion_dist.Lion`'s keyword arguments (`momentum_dtype` as "float32"/"bfloat16"/"int8"; `min_batch_size` and
    `batch_size_policy` for the batch guard), and the guard checks DeepSpeed's `train_batch_size` right here,
    before the first step. Any other optimizer type goes to `deepspeed.initialize` untouched.
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
    if lion_args.get("cautious_factor") is not None and flattens_params(ds_config):
        raise ValueError(NO_CAUTIOUS_UNDER_ZERO)
    del ds_config["optimizer"]
    ds_config["zero_allow_untested_optimizer"] = True
    if offloads_optimizer(ds_config):
        ds_config["zero_force_ds_cpu_optimizer"] = False
    if source_name == "args.deepspeed_config":
        passthrough["args"] = copy.copy(args)
        passthrough["args"].deepspeed_config = None
    built: list[Lion] = []

    def build(params: Any) -> Lion:  # DeepSpeed calls it after its own param conversion (ZeRO-3)
        built.append(Lion(params, **lion_args))
        return built[-1]

    passthrough["optimizer"] = build

    import deepspeed  # only now, after the checks above: it takes seconds

    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(**passthrough, config=ds_config)
    declare_engine_batch(built[-1], engine)
    declare_partitions(engine)
    return engine, ds_optimizer, dataloader, scheduler
