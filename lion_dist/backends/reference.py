"""The reference backend: `spec.lion_reference`, one tensor at a time. Slow and plain; what the tests trust."""

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
    ) -> None:
        if skip is not None and bool(skip):
            return
        for i, (entry, grad) in enumerate(zip(prepared, grads, strict=True)):
            mean = None if means is None else means[i]
            spec.lion_reference(entry.param, grad, entry.exp_avg, hp, mean=mean, noise=entry.noise(sr_key))

    def direction(self, prepared: list[Entry], grads: Sequence[Tensor], hp: LionHyperparams) -> list[Tensor]:
        return [
            spec.lion_direction(grad, entry.exp_avg, hp, spec.math_dtype(entry.param.dtype))
            for entry, grad in zip(prepared, grads, strict=True)
        ]

    def apply(
        self, prepared: list[Entry], directions: Sequence[Tensor], hp: LionHyperparams, sr_key: int | DeviceKey | None
    ) -> None:
        for entry, u in zip(prepared, directions, strict=True):
            spec.apply_direction(entry.param, u, hp, entry.noise(sr_key))


BACKEND = ReferenceBackend()
