"""The reference backend: `spec.lion_reference` (`lion_reference_int8` for int8 momentum), one tensor at a time.

Slow and plain; what the tests trust.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lion_dist import spec
from lion_dist.backends import Backend, Entry
from lion_dist.spec import DeviceKey, LionHyperparams


class ReferenceBackend(Backend):
    name = "reference"

    def step(
        self,
        prepared: list[Entry],
        grads: Sequence[Tensor],
        hp: LionHyperparams,
        *,
        skip: Tensor | None = None,
        sr_key: int | DeviceKey | None = None,
        means: Sequence[Tensor] | None = None,
        quant_key: int | DeviceKey | None = None,
    ) -> None:
        if skip is not None and bool(skip):
            return
        for i, (e, grad) in enumerate(zip(prepared, grads, strict=True)):
            mean = None if means is None else means[i]
            noise = e.noise(sr_key)
            if e.scales is None:
                spec.lion_reference(e.param, grad, e.exp_avg, hp, mean=mean, noise=noise, compensation=e.compensation)
            else:
                spec.lion_reference_int8(
                    e.param,
                    grad,
                    e.exp_avg,
                    e.scales,
                    hp,
                    e.block,
                    mean=mean,
                    noise=noise,
                    momentum_noise=e.momentum_noise(quant_key),
                    compensation=e.compensation,
                )

    def direction(self, prepared: list[Entry], grads: Sequence[Tensor], hp: LionHyperparams) -> list[Tensor]:
        return [
            spec.lion_direction(grad, entry.exp_avg, hp, spec.math_dtype(entry.param.dtype))
            for entry, grad in zip(prepared, grads, strict=True)
        ]

    def apply(
        self, prepared: list[Entry], directions: Sequence[Tensor], hp: LionHyperparams, sr_key: int | DeviceKey | None
    ) -> None:
        for entry, u in zip(prepared, directions, strict=True):
            spec.apply_direction(entry.param, u, hp, entry.noise(sr_key), entry.compensation)


BACKEND = ReferenceBackend()
