"""Momentum formats: how a param's one piece of optimizer state, its momentum, is stored.

A format owns everything about its state: the keys it keeps in `optimizer.state[p]`, how it is created beside a
local shard (as a DTensor laid out like the param, so DCP and full state dicts see and reshard it like the param),
how it converts to and from a float momentum (to load another format's state, lion-pytorch's included), what it
accepts at load, and how many bytes it holds. The optimizer and the plan only ask the format.

Backends declare which format kinds they fuse (`Capabilities.formats`); a backend that runs any format
(`Capabilities.any_format`: foreach, reference) does the math on `decode(state)` and writes the result back with
`encode`. A new format is therefore one class, registered with `register`, plus, where it should be fast, a
kernel branch in a fused backend:

    class Fp16Momentum(MomentumFormat): ...
    formats.register("fp16", lambda group: Fp16Momentum())
    Lion(params, momentum_dtype="fp16")

Built in: `FloatMomentum` (the param's dtype, fp32, bf16; `floats.py`) and `Int8Momentum` (block-linear int8 codes
with fp32 scales; `int8.py`). The Kahan compensation buffer is a per-param companion of any format
(`compensation.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lion_dist import layouts
from lion_dist.layouts import Layout


class MomentumFormat(ABC):
    """One way to store a momentum. Subclasses set `name`, `kind` and `keys` and implement the methods."""

    name: str  # how param groups and state dicts name it (`momentum_dtype`)
    kind: str  # what fused backends declare they take (`Capabilities.formats`): "float" is any float dtype
    keys: tuple[str, ...]  # its entries in `optimizer.state[p]`; the first is the momentum itself
    stochastic: bool = False  # `encode` takes noise (the optimizer passes the step's key; backends draw it)

    def for_param(self, param: Tensor) -> MomentumFormat:
        """The format `param` gets in a group of this format (int8: fp32 for params too small to quantize)."""
        return self

    def float_dtype(self, param: Tensor) -> torch.dtype | None:
        """The dtype of a momentum that is one float tensor the math reads and writes directly; None when it must
        be decoded and encoded (int8 codes)."""
        return None

    @abstractmethod
    def zeros(self, param: Tensor, layout: Layout) -> dict[str, Tensor]:
        """A zero momentum for `param`, each state tensor laid out like it (`layout.around`)."""

    @abstractmethod
    def decode(self, state: Sequence[Tensor]) -> Tensor:
        """The momentum, as a float tensor, from this rank's state tensors (in `keys` order)."""

    @abstractmethod
    def encode(self, state: Sequence[Tensor], momentum: Tensor, noise: Tensor | None) -> None:
        """Store the float `momentum` into this rank's state tensors, in place. `noise`: 16 bits per element
        (`spec.sr_noise`) when `stochastic`, else None."""

    @abstractmethod
    def holds(self, param: Tensor, state: Mapping[str, Any]) -> bool:
        """Whether `state` is a momentum of this format for `param` (no conversion needed)."""

    @abstractmethod
    def check(self, param: Tensor, state: Mapping[str, Any], where: str) -> None:
        """Raise a TypeError or ValueError naming `where` and what is wrong if `state` does not fit `param`."""

    def normalize(self, param: Tensor, state: dict[str, Any], *, loaded: bool) -> None:
        """Bring a state this format `holds` to the exact dtypes it keeps, in place; `loaded`: it came from a
        state dict (where torch's own rule would cast a float momentum to the param's dtype)."""
        return

    def from_float(self, param: Tensor, layout: Layout, momentum: Tensor) -> dict[str, Tensor]:
        """This format's state from a float `momentum` laid out like `param` (another format's, converted)."""
        state = self.zeros(param, layout)
        self.encode([layout.local(state[k]) for k in self.keys], layout.local(momentum).float(), None)
        return state

    def to_float(self, param: Tensor, layout: Layout, state: Mapping[str, Tensor]) -> Tensor:
        """The momentum as an fp32 tensor laid out like `param` (a copy)."""
        local = self.decode([layout.local(state[k]) for k in self.keys]).to(torch.float32, copy=True)
        return layout.around(local, tuple(state[self.keys[0]].shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _local_bytes(t: Tensor) -> int:
    local = layouts.local(t)
    return local.numel() * local.element_size()


_FACTORIES: dict[str, Callable[[Mapping[str, Any]], MomentumFormat]] = {}


def register(name: str, factory: Callable[[Mapping[str, Any]], MomentumFormat]) -> None:
    """Make `Lion(momentum_dtype=name)` use `factory(group)`'s format (the group's other settings may shape it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a momentum format's name must be a non-empty string, got {name!r}")
    _FACTORIES[name] = factory


def names() -> tuple[str, ...]:
    """The registered format names (built-in and added)."""
    return tuple(_FACTORIES)


def canonical(value: Any) -> Any:
    """A group's `momentum_dtype` as the optimizer keeps it: None, a torch dtype for the built-in formats
    (their names map to the dtype), else a registered name; anything else is returned as is (and refused)."""
    if isinstance(value, str) and value in _DTYPE_NAMES:
        return _DTYPE_NAMES[value]
    return value


def is_known(value: Any) -> bool:
    return value is None or value in _BUILT_IN_DTYPES or (isinstance(value, str) and value in _FACTORIES)


def describe_choices() -> str:
    added = tuple(n for n in _FACTORIES if n not in ("param", "float32", "bfloat16", "int8"))
    return (
        "None (the param's dtype), torch.float32, torch.bfloat16 or torch.int8 (or one of the names "
        f"{(*_DTYPE_NAMES, *added)})"
    )


def name_of(value: Any) -> str | None:
    """How a state dict writes a group's `momentum_dtype`: None, or a name (torch dtypes are not JSON)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def of_group(group: Mapping[str, Any]) -> MomentumFormat:
    """The format a param group asks for."""
    value = group["momentum_dtype"]
    name = "param" if value is None else name_of(value)
    return _FACTORIES[name](group)


def _source(
    param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any], own: MomentumFormat
) -> MomentumFormat | None:
    """The format that holds `state`, to convert it to the group's (`own`): `own` itself, else the newest
    registered one that holds it (custom formats, then int8, then the float formats, which take any float)."""
    if own.holds(param, state):
        return own
    for name in reversed(_FACTORIES):
        candidate = _FACTORIES[name](group).for_param(param)
        if candidate.holds(param, state):
            return candidate
    return None


def _all_keys(group: Mapping[str, Any]) -> set[str]:
    return {key for name in _FACTORIES for key in _FACTORIES[name](group).keys}


def conform(param: Tensor, state: dict[str, Any], group: Mapping[str, Any], layout: Layout, *, create: bool) -> None:
    """Make `state` what `group` asks for `param`, in place, leaving keys of no format (a wrapper's) alone.

    A momentum of another format is converted through a float momentum (an fp32 one quantized for an int8
    group, int8 dequantized for a float group, one float dtype cast to another); the compensation companion is
    added or dropped. `create` (a plan is built for a step): a param without momentum gets a zero one. Else (a
    loaded state dict) it stays without, and a float momentum of `momentum_dtype=None` takes the param's dtype,
    as torch's `load_state_dict` casts it.
    """
    fmt = of_group(group).for_param(param)
    if not state.keys() & _all_keys(group):  # no momentum of any format yet
        if create:
            state.update(fmt.zeros(param, layout))
    else:
        source = _source(param, state, group, fmt)
        if source is None:  # `check_state` refuses this at load; a hand-made state gets the same error
            fmt.check(param, state, "a param")
        elif source is fmt:
            fmt.normalize(param, state, loaded=not create)
        else:
            momentum = source.to_float(param, layout, state)
            for key in source.keys:
                del state[key]
            state.update(fmt.from_float(param, layout, momentum))
    if state:
        compensation.conform(param, state, group, layout)


def check_state(param: Tensor, state: Any, group: Mapping[str, Any], where: str) -> None:
    """Raise (naming `where`) if a loaded per-param `state` cannot be this group's: a non-empty state needs a
    momentum some format holds; keys of no format (a wrapper's, e.g. timm's Lookahead) are carried as they are."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state for {where} must be a dict of tensors, got {type(state).__name__}")
    if state and not state.keys() & (_all_keys(group) | {compensation.KEY}):
        return  # only a wrapper's keys: no momentum yet
    own = of_group(group).for_param(param)
    source = _source(param, state, group, own)
    if source is None and own.keys[0] not in state and "exp_avg" not in state:
        raise ValueError(
            f"state for {where} has {sorted(state)}; a Lion state holds 'exp_avg' (the momentum), with int8 momentum "
            "'exp_avg_scale', with compensation 'compensation' (is this state dict from another optimizer?)"
        )
    (source or own).check(param, state, where)
    compensation.check(param, state, where)


def state_bytes(state: Mapping[str, Any], group: Mapping[str, Any]) -> int:
    """This rank's bytes of a param's momentum (of any format) and compensation; a wrapper's keys are not Lion's.
    By key, not by param: ZeRO-3 steps sub-groups whose params are swapped in and out of the group."""
    keys = _all_keys(group) | {compensation.KEY}
    return sum(_local_bytes(t) for key, t in state.items() if key in keys and isinstance(t, Tensor))


def as_float(param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """`state` with a non-float momentum (int8) as an fp32 `exp_avg` (a copy; float ones and other keys as
    they are), for tools that expect float momenta."""
    fmt = of_group(group).for_param(param)
    if "exp_avg" not in state or fmt.float_dtype(param) is not None or not fmt.holds(param, state):
        return dict(state)
    rest = {k: v for k, v in state.items() if k not in fmt.keys}
    return {"exp_avg": fmt.to_float(param, layout, state), **rest}


from lion_dist.formats import compensation, floats, int8  # noqa: E402 (the built-ins register themselves)

_BUILT_IN_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}

__all__ = ["MomentumFormat", "check_state", "compensation", "conform", "floats", "int8", "of_group", "register"]
