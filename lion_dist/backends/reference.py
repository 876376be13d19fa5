"""The reference backend: `spec.lion_reference`, one tensor at a time, for every momentum format.

A float momentum is stepped in place; any other format is decoded, stepped as an fp32 momentum and encoded
(`spec.lion_reference_int8` is this path for int8). Slow and plain; what the tests trust.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lion_dist import spec
from lion_dist.backends import TORCH_OPS, Backend, Capabilities, Entry, StepArgs


def momentum_of(entry: Entry) -> Tensor:
    """The momentum the math reads and writes: the float momentum itself, or a decoded copy."""
    momentum = entry.format.decode(entry.state)
    return momentum if entry.format.float_dtype(entry.param) is not None else momentum.float()


def store(entry: Entry, momentum: Tensor, args: StepArgs) -> None:
    """Write a decoded momentum back in its format (nothing to do for a float one, updated in place)."""
    if entry.format.float_dtype(entry.param) is None:
        stream = entry.momentum_noise(args.quant_key)
        noise = None if stream is None else spec.sr_noise(stream, momentum.numel(), momentum.device)
        entry.format.encode(entry.state, momentum, noise)


class ReferenceBackend(Backend):
    name = "reference"

    def capabilities(self) -> Capabilities:
        return TORCH_OPS

    def step(self, prepared: list[Entry], grads: Sequence[Tensor], args: StepArgs) -> None:
        if args.skipped:
            return
        for i, (e, grad) in enumerate(zip(prepared, grads, strict=True)):
            mean = None if args.means is None else args.means[i]
            momentum = momentum_of(e)
            spec.lion_reference(
                e.param, grad, momentum, args.hp, mean=mean, noise=e.noise(args.sr_key), compensation=e.compensation
            )
            store(e, momentum, args)

    def direction(self, prepared: list[Entry], grads: Sequence[Tensor], args: StepArgs) -> list[Tensor]:
        directions = []
        for e, grad in zip(prepared, grads, strict=True):
            momentum = momentum_of(e)
            directions.append(spec.lion_direction(grad, momentum, args.hp, spec.math_dtype(e.param.dtype)))
            store(e, momentum, args)
        return directions

    def apply(self, prepared: list[Entry], directions: Sequence[Tensor], args: StepArgs) -> None:
        for e, u in zip(prepared, directions, strict=True):
            spec.apply_direction(e.param, u, args.hp, e.noise(args.sr_key), e.compensation)


BACKEND = ReferenceBackend()
