"""The fused Triton backend: one pass over contiguous CUDA tensors (CPU tensors in Triton's interpreter).

    __init__.py   this declaration: what the backend takes (`CAPABILITIES`), why not; it loads no Triton
    kernels.py    the `@triton.jit` kernels and the named constants they read (flags, table slots)
    launcher.py   `prepare` (buckets, their static tables) and `step` / `direction` / `apply` (the launches)
    tables.py     the persistent device tables: uploads, per-step addresses, the hyperparameter tensor

`launcher.py` (and with it Triton) is imported when a plan is first prepared. With `TRITON_INTERPRET=1` set for the
whole process the kernels run in Triton's interpreter on CPU tensors (how the tests drive them without a GPU), and
the backend then takes CPU tensors only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from lion_dist.backends import FUSED_TRIPLES, Backend, Capabilities, Entry, StepArgs

_KERNELS = "lion_dist.backends.triton.kernels"
CAPABILITIES = Capabilities(
    devices=("cuda",),
    triples=FUSED_TRIPLES,
    formats=frozenset({"float", "int8"}),
    stochastic_rounding=True,
    split=True,
    device_skip=True,
    capturable=True,
    compensation=True,
)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: as they were imported, else as they would be."""
    kernels = sys.modules.get(_KERNELS)
    if kernels is not None:
        return kernels.interpreted()
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"

    def capabilities(self) -> Capabilities:
        return replace(CAPABILITIES, devices=("cpu",)) if interpreted() else CAPABILITIES

    def unavailable_reason(self) -> str | None:
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"

    def device_refusal(self, device_type: str) -> str | None:
        if interpreted() and device_type != "cpu":
            return (
                f"lion_triton runs in Triton's interpreter (TRITON_INTERPRET=1), which reads raw host addresses: "
                f"it takes CPU tensors, got {device_type} ones. Unset TRITON_INTERPRET to run the compiled kernel "
                "on CUDA."
            )
        if not interpreted() and device_type != "cuda":
            return (
                f"the Triton Lion kernel needs CUDA tensors, got {device_type} ones. Use backend='foreach' or "
                "backend='cpu_fused' on CPU (or backend='auto'), or set TRITON_INTERPRET=1 in the environment before "
                "the process imports triton to run the kernel in Triton's (slow) interpreter for testing."
            )
        return None

    def prepare(self, entries: Sequence[Entry]) -> Any:
        from lion_dist.backends.triton import launcher

        return launcher.prepare(entries)

    def step(self, prepared: Any, grads: Sequence[Tensor], args: StepArgs) -> None:
        from lion_dist.backends.triton import launcher

        launcher.step(prepared, grads, args)

    def direction(self, prepared: Any, grads: Sequence[Tensor], args: StepArgs) -> list[Tensor]:
        """int8 signs (1, -1; 0 for 0 and NaN), views into a buffer that the next `direction` overwrites."""
        from lion_dist.backends.triton import launcher

        return launcher.direction(prepared, grads, args)

    def apply(self, prepared: Any, directions: Sequence[Tensor], args: StepArgs) -> None:
        from lion_dist.backends.triton import launcher

        launcher.apply(prepared, directions, args)


BACKEND = TritonBackend()
