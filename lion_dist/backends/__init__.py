"""The ways to run a Lion step on local tensors, and the one contract they share.

    backends/reference.py   `spec.lion_reference`, one tensor at a time (any format)
    backends/foreach.py     torch._foreach_* over many tensors: any device, float dtype and format, cautious Lion
    backends/cpu/           a fused C kernel: one pass over contiguous CPU tensors, built on first use
    backends/triton/        a fused Triton kernel: one pass over contiguous CUDA tensors (CPU tensors in Triton's
                            interpreter, TRITON_INTERPRET=1)

A backend is a `Backend` object: it owns its `capabilities()` (what it accepts) and `unavailable_reason()` (why
it cannot run in this process), `prepare`s a plan's entries once (pointer tables, buckets) and `step`s them with
one `StepArgs` per step; a backend with `split` also has `direction` and `apply`, the two halves of a step that
Distributed Lion exchanges votes between. A backend never falls back to another: `select` routes every tensor to
the fastest backend that declares it takes it (`AUTO_ORDER`). The registry names each backend's module, whose
top level is light (its kernel is built or imported when first prepared): routing, wording an error and
`import lion_dist` load no kernel.
"""

from __future__ import annotations

import importlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from lion_dist.spec import FLOAT_DTYPES, MOMENTUM_STREAM, DeviceKey, LionHyperparams, NoiseStream, key_value

if TYPE_CHECKING:
    from lion_dist.formats import MomentumFormat

Triple = tuple[torch.dtype, torch.dtype, torch.dtype]  # (param, grad, momentum) dtypes; see `Need.triple`

_HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)
# What the fused kernels compute: any mix of fp32, bf16 and fp16 storage (fp32 math), or all-fp64 (fp64 math).
FUSED_TRIPLES: frozenset[Triple] = frozenset(itertools.product(_HALF_AND_SINGLE, repeat=3)) | {(torch.float64,) * 3}
ALL_TRIPLES: frozenset[Triple] = frozenset(itertools.product(FLOAT_DTYPES, repeat=3))


@dataclass(frozen=True)
class Capabilities:
    """What a backend accepts. `devices` None: any device type."""

    devices: tuple[str, ...] | None
    triples: frozenset[Triple]  # float momenta; a format of another kind decodes to fp32: (param, grad, fp32)
    formats: frozenset[str] = frozenset({"float"})  # the format kinds it fuses (`MomentumFormat.kind`)
    any_format: bool = False  # runs every format through its `decode` / `encode`
    cautious: bool = False
    stochastic_rounding: bool = False
    strided: bool = False  # updates non-contiguous params and momenta in place (else the plan stages contiguous copies)
    split: bool = False  # has `direction` and `apply`
    device_skip: bool = False  # reads the non-finite skip flag on the device (no host sync)
    capturable: bool = False  # a step without host reads or allocations (lr, step and flag on the device)
    compensation: bool = False  # Kahan compensation of bf16/fp16 params (a buffer of the param's dtype)


# What a backend of plain torch ops takes (foreach, reference): everything, any format through decode / encode.
TORCH_OPS = Capabilities(
    devices=None,
    triples=ALL_TRIPLES,
    any_format=True,
    cautious=True,
    stochastic_rounding=True,
    strided=True,
    split=True,
    compensation=True,
)


class Need(NamedTuple):
    """What one tensor's update needs from a backend."""

    device_type: str
    triple: Triple  # (param, grad, momentum): a float format's stored dtype, else fp32 (what it decodes to)
    cautious: bool = False
    stochastic_rounding: bool = False  # a bf16 param of a group with stochastic rounding
    split: bool = False
    capturable: bool = False
    compensation: bool = False
    format: str = "float"  # `MomentumFormat.kind`


class NoisePlace(NamedTuple):
    """Where a tensor's stochastic-rounding noise comes from (`spec.NoiseStream` less the step's key)."""

    param_id: int = 0  # the param's index in its group
    base: int = 0  # global index of the local tensor's first element in the whole param
    shard: int = 0  # 0, or an id of a shard that is not a contiguous range of the whole param


class Entry(NamedTuple):
    """One local tensor of a plan, as a backend prepares it."""

    param: Tensor
    state: tuple[Tensor, ...]  # the momentum format's local state tensors, in `format.keys` order
    format: MomentumFormat
    grad_dtype: torch.dtype
    place: NoisePlace = NoisePlace()
    compensation: Tensor | None = None  # Kahan compensation: the param's rounding error, in its dtype

    @property
    def exp_avg(self) -> Tensor:
        """The first state tensor: a float momentum, or int8 codes."""
        return self.state[0]

    def noise(self, key: int | DeviceKey | None) -> NoiseStream | None:
        """The stream of the param's stochastic rounding this step (None: round to nearest)."""
        return None if key is None else NoiseStream(key_value(key), *self.place)

    def momentum_noise(self, key: int | DeviceKey | None) -> NoiseStream | None:
        """The stream of the momentum's stochastic encoding: the param's, in another shard field."""
        if key is None or not self.format.stochastic:
            return None
        param_id, base, shard = self.place
        return NoiseStream(key_value(key), param_id, base, shard | MOMENTUM_STREAM)


@dataclass(frozen=True)
class StepArgs:
    """Everything of one step a backend reads besides the gradients."""

    hp: LionHyperparams
    skip: Tensor | None = None  # a 1-element int32 flag; non-zero: write nothing
    sr_key: int | DeviceKey | None = None  # stochastic rounding of bf16 params (None: to nearest)
    quant_key: int | DeviceKey | None = None  # stochastic encoding of momenta whose format is `stochastic`
    means: Sequence[Tensor] | None = None  # per entry: the cautious mean over its whole tensor

    def subset(self, index: Sequence[int]) -> StepArgs:
        """These arguments for the entries at `index` (the per-entry means follow)."""
        return self if self.means is None else replace(self, means=[self.means[i] for i in index])

    @property
    def skipped(self) -> bool:
        """Whether a host-side flag says to write nothing (reading a device flag syncs: fused GPU kernels read
        it on the device instead)."""
        return self.skip is not None and bool(self.skip)


class Backend(ABC):
    """One way to run the step. Each lives in its own module (registered in `_MODULES`) as `BACKEND`."""

    name: str

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What it accepts, in this process."""

    def unavailable_reason(self) -> str | None:
        """Why it cannot run in this process (None: it can). May build a kernel, once."""
        return None

    def device_refusal(self, device_type: str) -> str | None:
        """Why it takes no tensors of `device_type`, in its own words (what to use instead)."""
        devices = self.capabilities().devices
        if devices is None or device_type in devices:
            return None
        return f"it runs on {' or '.join(devices)} tensors, not {device_type}"

    def prepare(self, entries: Sequence[Entry]) -> Any:
        """The static part of a plan for `entries` (all accepted by this backend); by default the entries."""
        return list(entries)

    @abstractmethod
    def step(self, prepared: Any, grads: Sequence[Tensor], args: StepArgs) -> None:
        """One Lion step, in place, with this step's contiguous local `grads` (one per entry, same order)."""

    def direction(self, prepared: Any, grads: Sequence[Tensor], args: StepArgs) -> list[Tensor]:
        """Per entry, the sign of `b1 * m + (1 - b1) * g` (any dtype whose `< 0` and `> 0` read the sign; NaN
        or 0 where c is), advancing each momentum in place: the first half of a split step."""
        raise NotImplementedError(f"backend {self.name!r} has no split step")

    def apply(self, prepared: Any, directions: Sequence[Tensor], args: StepArgs) -> None:
        """`p <- p * (1 - lr * wd) - lr * u` per entry, `u` the agreed float direction: the second half."""
        raise NotImplementedError(f"backend {self.name!r} has no split step")


_MODULES = {
    "triton": "lion_dist.backends.triton",
    "cpu_fused": "lion_dist.backends.cpu",
    "foreach": "lion_dist.backends.foreach",
    "reference": "lion_dist.backends.reference",
}
AUTO_ORDER = ("triton", "cpu_fused", "foreach")  # fastest first; "reference" only when asked for
NAMES = ("auto", *_MODULES)


def get(name: str) -> Backend:
    """Backend `name` (its module's top level: no kernel is built or imported by this)."""
    return importlib.import_module(_MODULES[name]).BACKEND


def capabilities(name: str) -> Capabilities:
    return get(name).capabilities()


def refusal(name: str, need: Need) -> str | None:
    """Why backend `name`'s declaration refuses `need` (None: it accepts it)."""
    backend = get(name)
    caps = backend.capabilities()
    if (why := backend.device_refusal(need.device_type)) is not None:
        return why
    if need.format != "float" and need.format not in caps.formats and not caps.any_format:
        return f"it has no {need.format} momentum"
    if need.triple not in caps.triples:
        names = "/".join(str(d).removeprefix("torch.") for d in need.triple)
        return f"it has no (param, grad, momentum) = ({names}) variant"
    if need.cautious and not caps.cautious:
        return "cautious Lion needs a per-tensor pass before the update, and this backend is single-pass"
    if need.stochastic_rounding and not caps.stochastic_rounding:
        return "it has no stochastic rounding"
    if need.split and not caps.split:
        return "it has no split step (direction, then apply), which Distributed Lion needs"
    if need.compensation and not caps.compensation:
        return "it has no Kahan compensation of bf16 params"
    if need.capturable and not caps.capturable:
        return "capturable=True needs a step without host reads, which only the fused Triton kernel has"
    return None


def _dtypes(need: Need) -> tuple[str, ...]:
    return tuple(str(d).removeprefix("torch.") for d in need.triple)


def select(requested: str, need: Need) -> str:
    """The backend for a tensor with `need`: `requested` itself, or with "auto" the first of `AUTO_ORDER` that
    accepts it and can run here. Raises saying why when a requested backend refuses it."""
    if requested == "auto":
        reasons = {}
        for name in AUTO_ORDER:
            reasons[name] = refusal(name, need) or get(name).unavailable_reason()
            if reasons[name] is None:
                return name
        raise ValueError(
            f"no backend can update a {need.device_type} tensor with (param, grad, momentum) dtypes {_dtypes(need)}: "
            + "; ".join(f"{name}: {why}" for name, why in reasons.items())
        )
    backend = get(requested)
    if (why := backend.device_refusal(need.device_type)) is not None:
        raise RuntimeError(f"backend={requested!r}: {why}")
    why = refusal(requested, need)
    if why is None and (unavailable := backend.unavailable_reason()) is not None:
        raise RuntimeError(f"backend={requested!r} is unavailable: {unavailable}; use backend='auto'")
    if why is not None:
        raise ValueError(
            f"backend={requested!r} cannot update a {need.device_type} tensor with (param, grad, momentum) dtypes "
            f"{_dtypes(need)}: {why}. Use backend='auto', which sends every tensor to the fastest backend that "
            "takes it."
        )
    return requested


def sr_noise(stream: NoiseStream, numel: int, device: torch.device) -> Tensor:
    """`spec.sr_noise`, on CPU from the C kernel when it builds: the same values, without the torch Philox's
    microsecond per element (for backends that encode momenta in torch: a compensated int8 step of 24M elements
    took 35 s with it)."""
    from lion_dist import spec

    cpu = get("cpu_fused")
    if device.type == "cpu" and cpu.unavailable_reason() is None:
        return cpu.sr_noise(stream, numel)
    return spec.sr_noise(stream, numel, device)


def refuse_overlaps(pairs: Sequence[tuple[Tensor, Tensor]], names: Sequence[str] | None = None) -> None:
    """Two params or momenta sharing memory would race in a fused kernel (and double-update anywhere): refuse."""
    spans = []
    for i, pair in enumerate(pairs):
        for what, t in zip(("param", "momentum"), pair, strict=True):
            start = t.data_ptr()
            if start == 0:
                continue
            extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
            spans.append((start, start + (extent + 1) * t.element_size(), t.device, what, i))
    spans.sort(key=lambda s: (str(s[2]), s[0]))
    for a, b in pairwise(spans):
        if a[2] == b[2] and b[0] < a[1]:
            name_a, name_b = (f"tensor {i}" if names is None else names[i] for i in (a[4], b[4]))
            raise ValueError(
                f"the {a[3]} of {name_a} and the {b[3]} of {name_b} share memory "
                f"(bytes {b[0]:#x} to {min(a[1], b[1]):#x}); Lion would update those elements twice (and race on a "
                "GPU). Optimize each tensor once: tie shared weights to one Parameter, or pass the flat buffer "
                "instead of views into it."
            )
