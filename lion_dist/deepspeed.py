"""DeepSpeed's JSON optimizer entry for `lion_dist.Lion`: `"optimizer": {"type": "LionDist", "params": {...}}`.

DeepSpeed builds only its own optimizers from the JSON config (its `"Lion"` is CUDA-only, or `DeepSpeedCPULion`
under optimizer offload) and looks any other name up as an attribute of `torch.optim`. Two ways in:

- `initialize(...)`, a drop-in for `deepspeed.initialize`: it reads the config (a path or a dict), builds
  `lion_dist.Lion` from `"params"` (Lion's keyword arguments) for ZeRO stages 0-3 and optimizer offload, sets in
  a copy of the config what DeepSpeed needs for a client optimizer under ZeRO (`zero_allow_untested_optimizer`,
  `zero_force_ds_cpu_optimizer: false`), and gives the batch guard DeepSpeed's `train_batch_size`. Any other
  optimizer type, DeepSpeed's own `"Lion"` included, goes to `deepspeed.initialize` untouched.
- `register()`, for code that cannot call it: the Hugging Face Trainer and Accelerate call
  `deepspeed.initialize` themselves. It adds `torch.optim.LionDist` (the `LionDist` factory below; a new name,
  nothing of torch is replaced), which DeepSpeed's documented lookup then calls, and adds `lion_dist.Lion` to
  DeepSpeed's own list of ZeRO-tested optimizers, so no `"zero_allow_untested_optimizer"` is needed. The factory
  checks and converts `"params"` as `initialize` does and gives the guard the calling engine's
  `train_batch_size`.
- `to_universal(...)`: a ZeRO 1/2 checkpoint of Lion in DeepSpeed's universal format, to resume at another
  data-parallel world size (DeepSpeed's own `ds_to_universal` knows only Adam's state).

`deepspeed` is imported only inside `initialize`, `register` and `to_universal`: `lion_dist` works without it.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lion_dist import formats
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
    return _lion_params(section.get("params", {}), batch_keys=False)


_NO_EPS = (
    'DeepSpeed config "optimizer.params" has "eps": Lion has no epsilon (it takes the sign of the update), so '
    'remove "eps" (Hugging Face\'s AdamW template has "eps": "auto")'
)


def _lion_params(params: Any, *, batch_keys: bool) -> dict[str, Any]:
    """`lion_dist.Lion`'s keyword arguments from a "LionDist" config's "params", checked and converted
    (`momentum_dtype` from a string, `betas` from a list). `batch_keys`: whether `global_batch_size`,
    `micro_batch_size` and `grad_accum_steps` may be given (the `register()` path; `initialize` reads the batch
    from DeepSpeed)."""
    if not isinstance(params, Mapping):
        raise ValueError(f'DeepSpeed config "optimizer.params" must be an object of Lion arguments, got {params!r:.80}')
    allowed = [k for k in _lion_keywords() if batch_keys or k not in _BATCH_KEYS]
    kwargs = dict(params)
    for key in kwargs:
        if key in _BATCH_KEYS and not batch_keys:
            raise ValueError(
                f'DeepSpeed config "optimizer.params" has {key!r}: DeepSpeed owns the batch, so set '
                f'"{_BATCH_KEYS[key]}" at the top level of the config instead (lion_dist feeds DeepSpeed\'s '
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


_NO_CAUTIOUS_UNDER_ZERO = (
    'DeepSpeed config "optimizer.params.cautious_factor": cautious Lion rescales by a mean over each whole '
    "tensor, but under ZeRO (stage >= 1) or fp16/bf16 DeepSpeed hands the optimizer flat buffers of many "
    "tensors, so the mean would be wrong. Remove cautious_factor, or use FSDP2 for cautious Lion."
)


def _engine_guard(engine: Any, guard_args: Mapping[str, Any]) -> BatchGuard:
    """A batch guard that knows `engine`'s train_batch_size, and says where the number came from."""
    return BatchGuard(
        global_batch_size=engine.train_batch_size(),
        source=(
            f"DeepSpeed train_batch_size = micro batch {engine.train_micro_batch_size_per_gpu()} x "
            f"gradient_accumulation_steps {engine.gradient_accumulation_steps()} x data-parallel size "
            f"{engine.dp_world_size}"
        ),
        **guard_args,
    )


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
    `lion_dist.Lion`'s keyword arguments (`momentum_dtype` as "float32"/"bfloat16"/"int8"), and the batch guard checks
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
        raise ValueError(_NO_CAUTIOUS_UNDER_ZERO)
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
    guard = _engine_guard(engine, guard_args)
    engine.basic_optimizer._batch_guard = guard
    guard.check()
    return engine, ds_optimizer, dataloader, scheduler


def _calling_engine() -> Any | None:
    """The DeepSpeed engine building this optimizer from its config, or None.

    DeepSpeed calls `torch.optim.<type>(params, **config params)` from `DeepSpeedEngine._configure_basic_optimizer`,
    after it has worked out its batch; the engine is that method's `self`, a few frames up. This only reads
    (nothing of DeepSpeed is changed); if DeepSpeed ever calls from elsewhere, the guard falls back to saying it
    does not know the batch.
    """
    engine_module = sys.modules.get("deepspeed.runtime.engine")
    if engine_module is None:
        return None
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, engine_module.DeepSpeedEngine):
            return candidate
        frame = frame.f_back
    return None


def LionDist(params: Any, **config_params: Any) -> Lion:
    """`lion_dist.Lion` from a DeepSpeed config's `"optimizer": {"type": "LionDist", "params": {...}}`.

    `register()` makes this `torch.optim.LionDist`, which a plain `deepspeed.initialize` (the Hugging Face
    Trainer's and Accelerate's included) calls as `torch.optim.LionDist(params, **config_params)`. The params are
    checked and converted as `initialize` does (with clear errors for unknown keys, `"eps"`, a `momentum_dtype`
    string); the batch guard gets the calling engine's `train_batch_size` unless `global_batch_size` or
    `micro_batch_size` is given here.
    """
    kwargs = _lion_params(config_params, batch_keys=True)
    engine = _calling_engine()
    if engine is None or "global_batch_size" in kwargs or "micro_batch_size" in kwargs:
        return Lion(params, **kwargs)
    flat = engine.zero_optimization_stage() >= 1 or engine.fp16_enabled() or engine.bfloat16_enabled()
    if kwargs.get("cautious_factor") is not None and flat:
        raise ValueError(_NO_CAUTIOUS_UNDER_ZERO)
    guard_args = {name: kwargs.pop(key) for key, name in _GUARD_KEYS.items() if key in kwargs}
    optimizer = Lion(params, **kwargs, batch_size_policy="ignore")
    optimizer._batch_guard = _engine_guard(engine, guard_args)
    return optimizer


def register() -> None:
    """Let a plain `deepspeed.initialize` build `lion_dist.Lion` from `"type": "LionDist"`: one line, before the
    Hugging Face Trainer (or Accelerate) starts DeepSpeed.

    Adds `torch.optim.LionDist` (the `LionDist` factory), which DeepSpeed looks up by name, and appends
    `lion_dist.Lion` to DeepSpeed's `deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`, the list DeepSpeed
    checks before it asks for `"zero_allow_untested_optimizer": true` (DeepSpeed appends to it itself, for apex's
    FusedAdam and Muon; the tests run Lion under every ZeRO stage against the unsharded step). Nothing else of
    DeepSpeed or torch is changed. Idempotent; refuses to shadow a different `torch.optim.LionDist`.
    """
    existing = getattr(torch.optim, OPTIMIZER_TYPE, None)
    if existing is not None and existing not in (LionDist, Lion):  # Lion: what an older register() added
        raise RuntimeError(f"torch.optim.{OPTIMIZER_TYPE} is already {existing!r}; not replacing it with lion_dist's")
    try:
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError as e:
        raise ImportError(
            "lion_dist.deepspeed.register() is for DeepSpeed, which is not installed: "
            "pip install 'lion-dist[deepspeed]'"
        ) from e
    setattr(torch.optim, OPTIMIZER_TYPE, LionDist)
    if Lion not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(Lion)


_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def to_universal(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Convert a ZeRO 1/2 checkpoint of `lion_dist.Lion` into DeepSpeed's universal format; return its path.

    `checkpoint` is the tag directory `engine.save_checkpoint(save_dir)` wrote (`<save_dir>/<tag>`); `output`
    defaults to `<checkpoint>_universal`, and `latest_universal` beside it names it, so an engine with
    `"checkpoint": {"load_universal": true}` resumes from `engine.load_checkpoint(<output's parent>)` at any
    data-parallel world size. DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`, 0.19.8) reads
    Adam's `exp_avg_sq` by name and fails on Lion; DeepSpeed's ZeRO 1/2 universal loader takes the state names
    from the files it finds, so this writes the same layout with Lion's: `zero/<param>/fp32.pt` and `exp_avg.pt`
    (full tensors), `zero/optimizer_state.pt` (the param groups: lr, lr0, step, ...) and the model states.
    """
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
        PARAM_SHAPES,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
        ZERO_STAGE,
    )

    from lion_dist.checkpoint import _write_atomically

    source = Path(checkpoint)
    target = Path(output) if output is not None else source.with_name(f"{source.name}_universal")
    found = sorted(
        (int(m[1]), int(m[2]), p) for p in source.glob("*_optim_states.pt") if (m := _OPTIM_FILE.search(p.name))
    )
    if not found:
        raise FileNotFoundError(
            f"{os.fspath(source)!r} holds no ZeRO optimizer files (*_optim_states.pt); pass the tag directory "
            "engine.save_checkpoint wrote, e.g. 'ckpt/global_step1000'"
        )
    first = torch.load(found[0][2], map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
    stage = int(first.get(ZERO_STAGE, 1))
    if stage not in (1, 2):
        raise ValueError(
            f"{os.fspath(source)!r} is a ZeRO-{stage} checkpoint: DeepSpeed 0.19.8's ZeRO-3 universal loader reads "
            "a per-param 'step' and Adam's 'exp_avg_sq' (KeyError: 'step'), which Lion does not keep, so a ZeRO-3 "
            "run resumes at the world size it was saved at"
        )
    if not isinstance(first[BASE_OPTIMIZER_STATE], dict):
        raise ValueError(
            f"{os.fspath(source)!r} was saved with zero_optimization.elastic_checkpoint: true, which keeps no param "
            "groups (lr0, step); save without it to convert"
        )
    model_files = sorted(source.glob("mp_rank_*_model_states.pt"))
    if len(model_files) != 1 or any(mp != 0 for _, mp, _ in found):
        raise ValueError(
            f"{os.fspath(source)!r} has {len(model_files)} model-state files (mp_rank_*_model_states.pt); "
            "to_universal converts data-parallel ZeRO 1/2 checkpoints without tensor or pipeline parallelism"
        )
    model_state = torch.load(model_files[0], map_location="cpu", weights_only=False)
    if [dp for dp, _, _ in found] != list(range(model_state["dp_world_size"])):
        raise ValueError(
            f"{os.fspath(source)!r} has optimizer files of ranks {[dp for dp, _, _ in found]}, but was saved by "
            f"{model_state['dp_world_size']} ranks: the checkpoint is incomplete (a save cut short?)"
        )
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{os.fspath(target)!r} is not empty; remove it or pass another output")

    fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
    for dp, _, path in found:
        optim = first if dp == 0 else torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        for group, mapping in enumerate(optim[PARAM_SLICE_MAPPINGS]):
            state = optim[BASE_OPTIMIZER_STATE]["state"].get(group, {})
            if not set(state) <= {"exp_avg"}:
                raise ValueError(
                    f"optimizer state in {os.fspath(path)!r} has {sorted(state)}, not lion_dist.Lion's 'exp_avg'; "
                    "convert other optimizers with DeepSpeed's ds_to_universal"
                )
            flat = {"fp32": optim[SINGLE_PARTITION_OF_FP32_GROUPS][group], **state}
            for name, fragment in mapping.items():
                for key, tensor in flat.items():
                    fragments.setdefault(name, {}).setdefault(key, []).append(
                        tensor.narrow(0, fragment.start, fragment.numel)
                    )

    shapes = {name: shape for group in model_state[PARAM_SHAPES] for name, shape in group.items()}
    for name, states in fragments.items():
        (target / "zero" / name).mkdir(parents=True, exist_ok=True)
        for key, pieces in states.items():
            torch.save({PARAM: torch.cat(pieces).view(shapes[name])}, target / "zero" / name / f"{key}.pt")
    # DeepSpeed's layout: everything but the sharded tensors, with the base optimizer's param groups on top
    sharded = (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)
    common = {k: v for k, v in first.items() if k not in sharded}
    common[PARAM_GROUPS] = first[BASE_OPTIMIZER_STATE][PARAM_GROUPS]
    torch.save(common, target / "zero" / "optimizer_state.pt")
    shutil.copy2(model_files[0], target)
    _write_atomically(target.parent / "latest_universal", target.name)  # last: only a whole conversion is named
    return target
