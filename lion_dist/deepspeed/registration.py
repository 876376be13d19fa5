"""`register()` and the `LionDist` factory: "LionDist" for code that calls `deepspeed.initialize` itself (the
Hugging Face Trainer, Accelerate).

DeepSpeed looks an optimizer type it does not know up as `torch.optim.<type>` and calls it with the params and
the config's "params". `register()` adds `torch.optim.LionDist` (a new name: nothing of torch is replaced) and
appends `Lion` to DeepSpeed's own list of ZeRO-tested optimizers; nothing else is changed.

The factory is called before the engine exists, and DeepSpeed passes it no config, so it learns the batch from
what the caller published: Accelerate's active `DeepSpeedPlugin` (its `deepspeed_config` is the dict Accelerate
passes to `deepspeed.initialize`, the HF Trainer's included) or Hugging Face's `HfDeepSpeedConfig` (kept by
`transformers.integrations.deepspeed` for code outside the Trainer), taken only when its "optimizer" section is
the one being built; or from `global_batch_size`/`micro_batch_size` in "params". Neither package is imported
here: one that is not loaded has published nothing. Without any of these the batch guard warns at the first step
that it does not know the batch, and how to declare it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lion_dist.deepspeed.config import (
    NO_CAUTIOUS_UNDER_ZERO,
    OPTIMIZER_TYPE,
    batch_source,
    flattens_params,
    lion_params,
)
from lion_dist.optimizer import Lion


def _published_configs() -> Iterator[tuple[Mapping[str, Any], str]]:
    """(DeepSpeed config, who published it) from the libraries that start DeepSpeed for their users."""
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None and accelerate_state.is_initialized():
        plugin = accelerate_state.AcceleratorState().deepspeed_plugin  # None unless Accelerate runs DeepSpeed
        if plugin is not None and isinstance(plugin.deepspeed_config, Mapping):
            yield plugin.deepspeed_config, "Accelerate's DeepSpeedPlugin"
    hf = sys.modules.get("transformers.integrations.deepspeed")
    if hf is not None and isinstance(config := hf.deepspeed_config(), Mapping):
        yield config, "transformers' HfDeepSpeedConfig"


def published_batch(config_params: Mapping[str, Any]) -> tuple[int, str, Mapping[str, Any]] | None:
    """(train_batch_size, where it came from, the whole config) from the published DeepSpeed config whose
    "LionDist" params are `config_params` (what DeepSpeed handed the factory), or None."""
    for config, publisher in _published_configs():
        section = config.get("optimizer")
        if not (isinstance(section, Mapping) and section.get("type") == OPTIMIZER_TYPE):
            continue
        if dict(section.get("params") or {}) != dict(config_params):
            continue  # a config for another engine (or an older one): not what DeepSpeed is building from
        batch = config.get("train_batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            continue  # "auto" not filled yet, or left for DeepSpeed to derive
        micro, accum = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps")
        parts = isinstance(micro, int) and isinstance(accum, int) and micro > 0 and accum > 0
        if parts and batch % (micro * accum) == 0:
            return batch, batch_source(micro, accum, batch // (micro * accum)), config
        return batch, f"DeepSpeed train_batch_size, from {publisher}", config
    return None


def LionDist(params: Any, **config_params: Any) -> Lion:
    """`lion_dist.Lion` from a DeepSpeed config's `"optimizer": {"type": "LionDist", "params": {...}}`.

    `register()` makes this `torch.optim.LionDist`, which a plain `deepspeed.initialize` (the Hugging Face
    Trainer's and Accelerate's included) calls as `torch.optim.LionDist(params, **config_params)`. The params are
    checked and converted as `initialize` does (with clear errors for unknown keys, `"eps"`, a `momentum_dtype`
    string). The batch guard gets `global_batch_size` or `micro_batch_size` from the params when given, else the
    `train_batch_size` of the config Accelerate or Hugging Face published (module doc), declared at once.
    """
    kwargs = lion_params(config_params, batch_keys=True)
    if "global_batch_size" in kwargs or "micro_batch_size" in kwargs:
        return Lion(params, **kwargs)
    published = published_batch(config_params)
    if published is not None and kwargs.get("cautious_factor") is not None and flattens_params(published[2]):
        raise ValueError(NO_CAUTIOUS_UNDER_ZERO)
    optimizer = Lion(params, **kwargs)
    if published is not None:
        optimizer.declare_batch_size(published[0], source=published[1])
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
