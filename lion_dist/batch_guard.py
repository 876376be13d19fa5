"""The batch-size guard: Lion is recommended only for an effective (global) batch of at least 64.

Chen et al. (2023, section 5) found Lion's gain over AdamW grows with the batch size and recommend >= 64;
below that, AdamW is usually the better choice. The effective batch is
micro batch per rank x gradient-accumulation steps x data-parallel size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

POLICIES = ("warn", "error", "ignore")

# Mesh dims with these names split the model, not the batch; every other dim of a param's mesh is data parallel.
_MODEL_PARALLEL_DIM_PREFIXES = ("tp", "tensor", "cp", "context", "pp", "pipe", "ep", "expert")

_warned_this_process: set[str] = set()


class SmallBatchWarning(UserWarning):
    """Lion runs with an effective batch below the recommended minimum (or one it cannot determine)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def infer_data_parallel_size(params: Iterable[torch.Tensor] = ()) -> int:
    """How many ranks see different data: the first DTensor param's mesh (HSDP: replicate x shard), with
    dims named like a model-parallel dim (tp, cp, pp, ep, ...) left out; else the default process group."""
    for p in params:
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            names = mesh.mesh_dim_names or ()
            sizes = [
                mesh.size(dim)
                for dim in range(mesh.ndim)
                if not (dim < len(names) and names[dim].lower().startswith(_MODEL_PARALLEL_DIM_PREFIXES))
            ]
            return math.prod(sizes)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_batch_size(micro_batch_size: int, grad_accum_steps: int = 1, data_parallel_size: int | None = None) -> int:
    """The effective batch: `micro_batch_size x grad_accum_steps x data_parallel_size`.

    `data_parallel_size` defaults to the default process group's world size (1 without torch.distributed).
    """
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if data_parallel_size is None:
        data_parallel_size = infer_data_parallel_size()
    if not isinstance(data_parallel_size, int) or isinstance(data_parallel_size, bool) or data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be a positive int, got {data_parallel_size!r}")
    return micro_batch_size * grad_accum_steps * data_parallel_size


class BatchGuard:
    """Checks the effective batch once, at the optimizer's first step (when the process group exists)."""

    def __init__(
        self,
        *,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        grad_accum_steps: int = 1,
        min_batch_size: int = 64,
        policy: str = "warn",
        source: str = "global_batch_size",
    ) -> None:
        """`source` says where `global_batch_size` came from, for the message (e.g. DeepSpeed's arithmetic)."""
        if policy not in POLICIES:
            raise ValueError(f"batch_size_policy must be one of {POLICIES}, got {policy!r}")
        for name, value in (
            ("global_batch_size", global_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("grad_accum_steps", grad_accum_steps),
            ("min_batch_size", min_batch_size),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.min_batch_size = min_batch_size
        self.policy = policy
        self.source = source
        self.checked = False

    def check(self, params: Iterable[torch.Tensor], data_parallel_size: int | None = None) -> None:
        """Warn (rank 0, once per process) or raise (every rank) when the effective batch is too small.

        `data_parallel_size` overrides what `infer_data_parallel_size(params)` would say.
        """
        if self.checked or self.policy == "ignore":
            return
        self.checked = True
        if self.global_batch_size is not None:
            batch, how = self.global_batch_size, self.source
        elif self.micro_batch_size is not None:
            dp = data_parallel_size or infer_data_parallel_size(params)
            batch = global_batch_size(self.micro_batch_size, self.grad_accum_steps, dp)
            how = (
                f"micro batch {self.micro_batch_size} x grad accumulation {self.grad_accum_steps} "
                f"x data-parallel size {dp}"
            )
        else:
            self._warn_once(
                "unknown",
                "lion_dist.Lion does not know the effective batch size, so it cannot check it against the "
                f"recommended minimum of {self.min_batch_size} for Lion. Pass global_batch_size=N, or "
                "micro_batch_size=M (with grad_accum_steps=A) to Lion(...); or batch_size_policy='ignore' "
                "to silence this.",
            )
            return
        if batch >= self.min_batch_size:
            return
        message = (
            f"lion_dist.Lion: the effective batch is {batch} ({how}), below the minimum of "
            f"{self.min_batch_size} recommended for Lion (Chen et al. 2023: Lion's advantage over AdamW "
            "needs a large batch; below it prefer AdamW). Raise the micro batch, gradient accumulation or "
            f"number of data-parallel ranks so that the product is >= {self.min_batch_size}; to silence this, "
            "pass batch_size_policy='ignore' (or a smaller min_batch_size)."
        )
        if self.policy == "error":
            raise ValueError(message)
        self._warn_once("small", message)

    @staticmethod
    def _warn_once(kind: str, message: str) -> None:
        if kind in _warned_this_process or _rank() != 0:
            return
        _warned_this_process.add(kind)
        warnings.warn(message, SmallBatchWarning, stacklevel=4)
