"""The ways to run a Lion step on local tensors, each declaring what it accepts, behind one signature.

    lion_dist/spec.py            the math, written plainly (imports nothing of lion_dist)
    backends/reference.py        `spec.lion_reference`, one tensor at a time
    backends/foreach.py          torch._foreach_* over many tensors: any device and float dtype, cautious Lion
    backends/cpu_kernel.py       a fused C kernel (_cpu_kernel.c): one pass over contiguous CPU tensors
    backends/triton_kernel.py    a fused Triton kernel: one pass over contiguous CUDA tensors (CPU tensors in
                                 Triton's interpreter, TRITON_INTERPRET=1)

Every backend implements `Backend`: `prepare` once per plan (what stays fixed between steps: pointer tables,
buckets, layouts), then `step` every step; backends that declare `split` also implement `direction` and `apply`,
the two halves of a step that Distributed Lion exchanges votes between. A backend never falls back to another:
what it refuses it says in `CAPABILITIES`, and `select` routes every tensor to the fastest backend whose
declaration accepts it (`AUTO_ORDER`). Only this table decides; a backend module is imported when first used.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lion_dist.spec import FLOAT_DTYPES, MOMENTUM_STREAM, DeviceKey, LionHyperparams, NoiseStream, key_value
from lion_dist.spec import sr_noise as spec_sr_noise

Triple = tuple[torch.dtype, torch.dtype, torch.dtype]  # (param, grad, momentum) dtypes; int8 momentum: codes + scales

_HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)
# What the fused kernels compute: any mix of fp32, bf16 and fp16 storage (fp32 math), or all-fp64 (fp64 math).
FUSED_TRIPLES: frozenset[Triple] = frozenset(itertools.product(_HALF_AND_SINGLE, repeat=3)) | {(torch.float64,) * 3}
ALL_TRIPLES: frozenset[Triple] = frozenset(itertools.product(FLOAT_DTYPES, repeat=3))


@dataclass(frozen=True)
class Capabilities:
    """What a backend accepts. `devices` None: any device type. `split`: it has `direction` and `apply`."""

    devices: tuple[str, ...] | None
    triples: frozenset[Triple]
    cautious: bool = False
    stochastic_rounding: bool = False
    strided: bool = False  # updates non-contiguous params and momenta in place (else the plan stages contiguous copies)
    split: bool = False
    device_skip: bool = False  # reads the non-finite skip flag on the device (no host sync)
    capturable: bool = False  # a step without host reads or allocations (lr, step and flag on the device)
    int8: bool = False  # int8 momentum (codes + per-block scales, `spec.quantize_momentum`), for its float triples
    compensation: bool = False  # Kahan compensation of bf16/fp16 params (a buffer of the param's dtype)


class Need(NamedTuple):
    """What one tensor's update needs from a backend."""

    device_type: str
    triple: Triple
    cautious: bool = False
    stochastic_rounding: bool = False  # a bf16 param of a group with stochastic rounding
    split: bool = False
    capturable: bool = False
    compensation: bool = False


class Entry(NamedTuple):
    """One tensor of a plan, as a backend prepares it: local param and momentum, and its noise stream's place."""

    param: Tensor
    exp_avg: Tensor
    grad_dtype: torch.dtype
    param_id: int = 0  # its index in its group
    base: int = 0  # global index of its first element in the whole param
    shard: int = 0  # 0, or an id of a shard that is not a contiguous range of the whole param
    scales: Tensor | None = None  # int8 momentum (exp_avg holds the codes): fp32, `spec.int8_scale_shape`
    block: int = 0  # int8 momentum: elements per scale, along the last dim
    compensation: Tensor | None = None  # Kahan compensation: the param's rounding error, in its dtype

    def noise(self, key: int | DeviceKey | None) -> NoiseStream | None:
        return None if key is None else NoiseStream(key_value(key), self.param_id, self.base, self.shard)

    def momentum_noise(self, key: int | DeviceKey | None) -> NoiseStream | None:
        """The stream of the int8 momentum's stochastic requantization: the param's, in another shard field."""
        if key is None:
            return None
        return NoiseStream(key_value(key), self.param_id, self.base, self.shard | MOMENTUM_STREAM)


class Backend(ABC):
    """One way to run the step. Subclasses live one per module and are registered in `CAPABILITIES`."""

    name: str

    def prepare(self, entries: Sequence[Entry]) -> Any:
        """The static part of a plan for `entries` (all accepted by this backend); by default the entries."""
        return list(entries)

    @abstractmethod
    def step(
        self,
        prepared: Any,
        grads: Sequence[Tensor],
        hp: LionHyperparams,
        *,
        skip: Tensor | None = None,
        sr_key: int | DeviceKey | None = None,
        means: Sequence[Tensor] | None = None,
        quant_key: int | DeviceKey | None = None,
    ) -> None:
        """One Lion step, in place, with this step's contiguous local `grads` (one per entry, same order).

        `skip`: a 1-element int32 flag; non-zero means write nothing. `sr_key`: this step's stochastic-rounding
        key (None: round to nearest; a `DeviceKey` where the step count lives on the device). `means`: per-entry
        cautious means (cautious backends only). `quant_key`: the key of int8 momenta's stochastic
        requantization (`Entry.momentum_noise`; None: round to nearest).
        """

    def check_device(self, device: torch.device) -> None:
        """Raise this backend's own error (what to use instead) if it cannot run tensors on `device`."""
        devices = capabilities(self.name).devices
        if devices is not None and device.type not in devices:
            raise RuntimeError(
                f"backend={self.name!r} runs on {' or '.join(devices)} tensors, got {device} ones; use "
                "backend='auto', which sends every tensor to the fastest backend that takes it"
            )

    def direction(self, prepared: Any, grads: Sequence[Tensor], hp: LionHyperparams) -> list[Tensor]:
        """`u = sign(b1 * m + (1 - b1) * g)` per entry (math dtype), advancing each momentum in place."""
        raise NotImplementedError(f"backend {self.name!r} has no split step")

    def apply(
        self, prepared: Any, directions: Sequence[Tensor], hp: LionHyperparams, sr_key: int | DeviceKey | None
    ) -> None:
        """`p <- p * (1 - lr * wd) - lr * u` per entry, for the given directions."""
        raise NotImplementedError(f"backend {self.name!r} has no split step")


_EVERYTHING = Capabilities(
    devices=None,
    triples=ALL_TRIPLES,
    cautious=True,
    stochastic_rounding=True,
    strided=True,
    split=True,
    int8=True,
    compensation=True,
)
_FUSED = dict(triples=FUSED_TRIPLES, stochastic_rounding=True, int8=True)
CAPABILITIES: dict[str, Capabilities] = {
    "triton": Capabilities(devices=("cuda",), device_skip=True, capturable=True, **_FUSED),
    "cpu_fused": Capabilities(devices=("cpu",), **_FUSED),
    "foreach": _EVERYTHING,
    "reference": _EVERYTHING,
}
AUTO_ORDER = ("triton", "cpu_fused", "foreach")  # fastest first; "reference" only when asked for
NAMES = ("auto", *CAPABILITIES)
_MODULES = {
    "triton": "lion_dist.backends.triton_kernel",
    "cpu_fused": "lion_dist.backends.cpu_kernel",
    "foreach": "lion_dist.backends.foreach",
    "reference": "lion_dist.backends.reference",
}


def capabilities(name: str) -> Capabilities:
    """The declaration of backend `name`, for this process: the Triton kernel takes CPU tensors, and only
    those, when it runs in Triton's interpreter (TRITON_INTERPRET=1)."""
    caps = CAPABILITIES[name]
    if name == "triton" and _triton_interpreted():
        return Capabilities(**{**caps.__dict__, "devices": ("cpu",)})
    return caps


def _triton_interpreted() -> bool:
    module = sys.modules.get(_MODULES["triton"])
    if module is not None:
        return module.interpreted()
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run in this process (None: it can). May build the CPU kernel (~1 s, once)."""
    if name == "triton":
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"
    if name == "cpu_fused":
        from lion_dist.backends import cpu_kernel

        return cpu_kernel.unavailable_reason()
    return None


def sr_noise(stream: NoiseStream, numel: int, device: torch.device) -> Tensor:
    """`spec.sr_noise`, on CPU from the C kernel when it builds: the same values, without the torch Philox's
    microsecond per element (for backends that requantize in torch: a compensated int8 step of 24M elements
    took 35 s with it)."""
    if device.type == "cpu" and unavailable_reason("cpu_fused") is None:
        from lion_dist.backends import cpu_kernel

        return cpu_kernel.sr_noise(stream, numel)
    return spec_sr_noise(stream, numel, device)


def refusal(name: str, need: Need) -> str | None:
    """Why backend `name`'s declaration refuses `need` (None: it accepts it)."""
    caps = capabilities(name)
    if caps.devices is not None and need.device_type not in caps.devices:
        return f"it runs on {' or '.join(caps.devices)} tensors, not {need.device_type}"
    if need.triple[2] == torch.int8:  # codes and scales: the math is that of an fp32 momentum
        if not caps.int8:
            return "it has no int8 momentum"
        if need.split:
            return "int8 momentum has no split step (Distributed Lion): its requantization is part of the step"
        need = need._replace(triple=(*need.triple[:2], torch.float32))
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


def select(requested: str, need: Need) -> str:
    """The backend for a tensor with `need`: `requested` itself, or with "auto" the first of `AUTO_ORDER` that
    accepts it and can run here. Raises a ValueError saying why when a requested backend refuses it."""
    if requested == "auto":
        reasons = {}
        for name in AUTO_ORDER:
            reasons[name] = refusal(name, need) or unavailable_reason(name)
            if reasons[name] is None:
                return name
        raise ValueError(
            f"no backend can update a {need.device_type} tensor with (param, grad, momentum) dtypes "
            f"{tuple(str(d).removeprefix('torch.') for d in need.triple)}: "
            + "; ".join(f"{name}: {why}" for name, why in reasons.items())
        )
    why = refusal(requested, need)
    devices = capabilities(requested).devices
    if devices is not None and need.device_type not in devices:
        get(requested).check_device(torch.device(need.device_type))  # the backend's own, more specific error
    if why is None and (unavailable := unavailable_reason(requested)) is not None:
        raise RuntimeError(f"backend={requested!r} is unavailable: {unavailable}; use backend='auto'")
    if why is not None:
        raise ValueError(
            f"backend={requested!r} cannot update a {need.device_type} tensor with (param, grad, momentum) dtypes "
            f"{tuple(str(d).removeprefix('torch.') for d in need.triple)}: {why}. Use backend='auto', which "
            "sends every tensor to the fastest backend that takes it."
        )
    return requested


def get(name: str) -> Backend:
    """Backend `name`'s implementation, importing its module on first use."""
    return importlib.import_module(_MODULES[name]).BACKEND


def resolve_backend(
    backend: str,
    device: torch.device,
    hp: LionHyperparams,
    triple: Triple = (torch.float32,) * 3,
    *,
    stochastic_rounding: bool = False,
) -> str:
    """The backend that updates a contiguous tensor on `device` with these dtypes (a query; see `select`)."""
    need = Need(device.type, triple, hp.cautious, stochastic_rounding and triple[0] == torch.bfloat16)
    return select(backend, need)


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
