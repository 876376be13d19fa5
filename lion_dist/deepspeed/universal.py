"""`to_universal`: a ZeRO 1/2 checkpoint of `lion_dist.Lion` in DeepSpeed's universal format, to resume at another
data-parallel world size.

DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`, 0.19.8) reads Adam's `exp_avg_sq` by name and
fails on Lion. Its ZeRO 1/2 universal loader, though, takes the state names from the files it finds, so this
writes the same layout with Lion's states. Under ZeRO 1/2 each rank's optimizer param is one flat partition of
a param group (fp32, or bf16 with `bf16_master_weights_and_grads`), so a state is one 1-D tensor per rank; the
universal format holds full per-param tensors, which this cuts out of the partitions:

- `exp_avg` (float momentum) and `compensation` (the Kahan buffer of `compensation=True`, kept only for bf16/fp16
  partitions, i.e. bf16 master weights): one value per element, so they reshard exactly.
- int8 momentum (`exp_avg` codes + `exp_avg_scale`, one scale per `int8_block_size` elements of the rank's 1-D
  partition): its blocks run over the partition, so they cannot be cut per param. Each rank's codes are
  dequantized (`spec.dequantize_momentum`) and written as an fp32 `exp_avg`; a Lion with `momentum_dtype="int8"`
  quantizes it again over its new partitions at its first step (rounding to nearest, `formats.conform`). That
  is the only resharding flat partitions allow: the int8 state after resuming is a requantization of the saved
  one, not the saved codes.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lion_dist import groups, spec
from lion_dist.checkpoint import _write_atomically

_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ELEMENTWISE = ("exp_avg", "compensation")


def _elementwise_states(state: dict[str, Any], group: dict[str, Any], partition: torch.Tensor, path: Path) -> dict:
    """A flat partition's Lion state as tensors of one value per element (int8 momentum dequantized to fp32).

    The saved partition leaves out the last rank's alignment padding; the saved state keeps it (DeepSpeed
    strips it only from an elastic checkpoint's state, which would cut int8 scales short: refused above)."""
    unknown = sorted(set(state) - {*_ELEMENTWISE, "exp_avg_scale"})
    if unknown:
        raise ValueError(
            f"optimizer state in {os.fspath(path)!r} has {unknown}, which lion_dist.Lion does not keep (it keeps "
            "'exp_avg', 'exp_avg_scale' with int8 momentum, 'compensation'); convert other optimizers with "
            "DeepSpeed's ds_to_universal"
        )
    states = {key: state[key] for key in _ELEMENTWISE if key in state}
    for key, tensor in states.items():
        if tensor.dim() != 1 or tensor.numel() < partition.numel():
            raise ValueError(
                f"{key!r} in {os.fspath(path)!r} has shape {tuple(tensor.shape)}, but its flat partition has "
                f"{partition.numel()} elements: not a ZeRO 1/2 checkpoint of lion_dist.Lion"
            )
    if "exp_avg_scale" in state:
        block = group["int8_block_size"]
        codes, scales = states["exp_avg"], state["exp_avg_scale"]
        if codes.dtype != torch.int8 or tuple(scales.shape) != spec.int8_scale_shape(codes.shape, block):
            raise ValueError(
                f"int8 momentum in {os.fspath(path)!r} does not match int8_block_size {block}: codes "
                f"{codes.dtype}{tuple(codes.shape)}, scales {tuple(scales.shape)}"
            )
        states["exp_avg"] = spec.dequantize_momentum(codes, scales, block)
    return states


def _loadable_groups(saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved param groups with `momentum_dtype` as the torch dtype: DeepSpeed's universal loader copies the
    groups into the optimizer's as they are, bypassing `Lion.load_state_dict`, which would convert the name
    ("int8", as `Lion.state_dict` writes it) itself."""
    return [groups.by_value(g) for g in saved]


def to_universal(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Convert a ZeRO 1/2 checkpoint of `lion_dist.Lion` into DeepSpeed's universal format; return its path.

    `checkpoint` is the tag directory `engine.save_checkpoint(save_dir)` wrote (`<save_dir>/<tag>`); `output`
    defaults to `<checkpoint>_universal`, and `latest_universal` beside it names it, so an engine with
    `"checkpoint": {"load_universal": true}` resumes from `engine.load_checkpoint(<output's parent>)` at any
    data-parallel world size. Writes `zero/<param>/fp32.pt`, `exp_avg.pt` (fp32 for int8 momentum: module doc)
    and `compensation.pt` where kept (full tensors), `zero/optimizer_state.pt` (the param groups: lr, lr0, step,
    ...) and the model states.
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
        base = optim[BASE_OPTIMIZER_STATE]
        for group, mapping in enumerate(optim[PARAM_SLICE_MAPPINGS]):
            partition = optim[SINGLE_PARTITION_OF_FP32_GROUPS][group]
            states = _elementwise_states(base["state"].get(group, {}), base[PARAM_GROUPS][group], partition, path)
            for name, fragment in mapping.items():
                for key, tensor in {"fp32": partition, **states}.items():
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
    common[PARAM_GROUPS] = _loadable_groups(first[BASE_OPTIMIZER_STATE][PARAM_GROUPS])
    torch.save(common, target / "zero" / "optimizer_state.pt")
    shutil.copy2(model_files[0], target)
    _write_atomically(target.parent / "latest_universal", target.name)  # last: only a whole conversion is named
    return target
