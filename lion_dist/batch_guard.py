"""The batch-size guard: Lion is recommended only for an effective (global) batch of at least 64.

Chen et al. (2023, section 5) found Lion's gain over AdamW grows with the batch size and recommend >= 64;
below that, AdamW is usually the better choice. The effective batch is
micro batch per rank x gradient-accumulation steps x data-parallel size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lion_dist import _torch

POLICIES = ("warn", "error", "ignore")

# What a mesh dim splits, read from the "_"-separated words of its name. The names torchtitan and Accelerate give
# (dp_replicate, dp_shard, dp_shard_cp, dp_cp, cp, tp, pp) and plain FSDP2/HSDP's (replicate, shard) are known.
_DATA_WORDS = frozenset({"dp", "ddp", "fsdp", "hsdp", "replicate", "shard", "data", "batch"})
# Ranks along a context-parallel dim split one sequence: they see the same samples.
_CONTEXT_WORDS = frozenset({"cp", "sp", "context", "sequence"})
# A dim whose first word starts like this (and that has no data word) splits the model, not the batch.
_MODEL_PREFIXES = ("tp", "tensor", "cp", "context", "sp", "seq", "pp", "pipe", "ep", "etp", "expert", "mp", "model")

_warned_this_process: set[str] = set()


class SmallBatchWarning(UserWarning):
    """Lion runs with an effective batch below the recommended minimum (or one it cannot determine)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _words(name: str) -> list[str]:
    return [w for w in name.lower().split("_") if w and w != "parallel"]


def _dim_kind(name: str) -> str:
    """One of "data", "model", "data_cp" (data parallel flattened with context parallel, like torchtitan's
    dp_shard_cp and dp_cp) or "unknown"."""
    words = _words(name)
    if not words:
        return "unknown"
    if all(w in _DATA_WORDS for w in words):
        return "data"
    if any(w in _DATA_WORDS for w in words):
        return "data_cp" if all(w in _DATA_WORDS or w in _CONTEXT_WORDS for w in words) else "unknown"
    return "model" if words[0].startswith(_MODEL_PREFIXES) else "unknown"


def _context_size(mesh: DeviceMesh, name: str) -> int | None:
    """The context-parallel part of `mesh`'s flattened dim `name` (e.g. dp_shard_cp = dp_shard x cp), read from
    the root mesh it was sliced from (torchtitan and Accelerate build one with a dim per parallelism, dropping
    the dims of size 1); None where there is no such root (one without data- or context-parallel dims, like a
    1-D world mesh unflattened into several meshes, does not say)."""
    root = _torch.root_mesh(mesh)
    contexts = {dim: set(_words(n)) for dim, n in enumerate(root.mesh_dim_names or ()) if _is_context(n)}
    if root is mesh or not (contexts or any(_dim_kind(n) == "data" for n in root.mesh_dim_names or ())):
        return None
    folded = set(_words(name)) & _CONTEXT_WORDS
    return math.prod(root.size(dim) for dim, words in contexts.items() if words <= folded)


def _is_context(name: str) -> bool:
    return bool(_words(name)) and set(_words(name)) <= _CONTEXT_WORDS


def mesh_data_parallel_size(mesh: DeviceMesh) -> int:
    """How many different batches the ranks of `mesh` see: the product of its data-parallel dims, a flattened
    data x context dim divided by its context part, model-parallel dims left out. Unnamed dims are data
    parallel (FSDP2's own 1-D and HSDP 2-D meshes); a dim this cannot read counts as data parallel, with one
    warning per process asking for global_batch_size."""
    names = mesh.mesh_dim_names
    if not names:
        return mesh.size()
    size, doubts = 1, []
    for dim, name in enumerate(names):
        n, kind = mesh.size(dim), _dim_kind(name)
        if kind == "model":
            continue
        if kind == "data_cp":
            cp = _context_size(mesh, name)
            if cp is not None and n % cp == 0:
                size *= n // cp
                continue
            doubts.append(
                f"{name!r} folds context parallelism into data parallelism, but the mesh it was sliced "
                "from does not say by how much"
            )
        elif kind == "unknown":
            doubts.append(
                f"{name!r} is not a data-parallel (dp, dp_replicate, dp_shard, replicate, shard, fsdp) or "
                "model-parallel (tp, cp, pp, ep) name"
            )
        size *= n
    if doubts:
        shape = ", ".join(f"{name}={mesh.size(dim)}" for dim, name in enumerate(names))
        BatchGuard._warn_once(
            "mesh",
            f"lion_dist.Lion cannot tell the data-parallel size from the params' device mesh ({shape}): "
            + "; ".join(doubts)
            + f". It counted those dims as data parallel (data-parallel size {size}), so its batch-size check may "
            "be wrong. Pass global_batch_size=N (micro batch x gradient accumulation x ranks that see different "
            "data) to Lion(...), or batch_size_policy='ignore'.",
            stacklevel=6,
        )
    return size


def global_batch_size(micro_batch_size: int, grad_accum_steps: int = 1, data_parallel_size: int | None = None) -> int:
    """The effective batch: `micro_batch_size x grad_accum_steps x data_parallel_size`.

    `data_parallel_size` defaults to the default process group's world size (1 without torch.distributed).
    """
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if data_parallel_size is None:
        data_parallel_size = _world_size()
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

    def declare(self, global_batch_size: int, source: str = "global_batch_size") -> None:
        """Set the effective batch from whoever owns it (DeepSpeed's train_batch_size, say), to be checked again.

        `source` says where the number came from, for the message.
        """
        if not isinstance(global_batch_size, int) or isinstance(global_batch_size, bool) or global_batch_size < 1:
            raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
        self.global_batch_size, self.source, self.checked = global_batch_size, source, False

    def check(self, data_parallel_size: Callable[[], int | None] | None = None) -> None:
        """Warn (rank 0, once per process) or raise (every rank) when the effective batch is too small.

        `data_parallel_size()` says how many ranks see different data (asked only when the batch is given as a
        micro batch; None or no function: the default process group's size).
        """
        if self.checked or self.policy == "ignore":
            return
        self.checked = True
        if self.global_batch_size is not None:
            batch, how = self.global_batch_size, self.source
        elif self.micro_batch_size is not None:
            dp = (data_parallel_size() if data_parallel_size is not None else None) or _world_size()
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
    def _warn_once(kind: str, message: str, stacklevel: int = 4) -> None:
        if kind in _warned_this_process or _rank() != 0:
            return
        _warned_this_process.add(kind)
        warnings.warn(message, SmallBatchWarning, stacklevel=stacklevel)
