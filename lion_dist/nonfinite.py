"""What a step does when a gradient holds a NaN or an Inf.

Lion's update is a sign, so a NaN gradient does not announce itself in the loss right away: it turns the
momentum into NaN and, depending on the kernel, moves the param by +lr or -lr or to NaN. Other Lions differ
here by accident. We make it a policy:

- "skip": the whole step is skipped on every rank when any rank saw a non-finite gradient (one 1-element
  all-reduce; on GPU the fused kernel reads the flag on the device, so there is no host sync). Skipped steps
  are counted and rank 0 warns once: on GPU at a later step, once the flag's copy to the host has landed (an
  event says so; nothing waits for it). A skipped step still counts in the group's `step`, on every device.
- "error": every rank raises `NonFiniteGradientError`; the rank holding the bad gradient names the param.
- "ignore" (the default): no check; non-finite values propagate into params and momentum as NaN, visibly.

The check reads every gradient once more: `benchmarks/step.py` measures it at +20-30% of a fused step (2-core
CPU), far over the 5% the design allows for a default, so "ignore" is the default and "skip" is one argument away.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

POLICIES = ("skip", "error", "ignore")


class NonFiniteGradientError(ValueError):
    """A gradient holds a NaN or an Inf and the optimizer's `nonfinite` policy is "error"."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device(grads: Sequence[Tensor]) -> torch.device:
    """Where the flag is all-reduced: the same device type on every rank, chosen from the process group (a rank
    whose local shards are all empty has no gradient to ask), so that every rank uses the same backend of a
    "cpu:gloo,cuda:nccl" group; not distributed, the gradients' device."""
    cuda = next((g.device for g in grads if g.is_cuda), None)
    if not _distributed():
        return grads[0].device if grads else torch.device("cpu")
    if "nccl" in str(dist.get_backend()):
        return cuda or torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def nonfinite_mask(grads: Sequence[Tensor]) -> list[Tensor]:
    """Per tensor, a 0-dim bool: does it hold a NaN or an Inf? One read of each gradient.

    CPU tensors use the fused CPU kernel's check where it is available (one multi-threaded call for all).
    """
    result: list[Tensor] = [torch.zeros((), dtype=torch.bool)] * len(grads)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        if g.numel():
            buckets[(g.device, g.dtype)].append(i)
    for (device, _), index in buckets.items():
        if device.type == "cpu" and (flags := _cpu_flags([grads[i] for i in index])) is not None:
            if flags.any():  # else every entry stays the shared False
                for i, flag in zip(index, flags.bool().unbind(), strict=True):
                    result[i] = flag
            continue
        norms = torch._foreach_norm([grads[i] for i in index], float("inf"))
        for i, norm in zip(index, norms, strict=True):
            result[i] = ~torch.isfinite(norm)
    return result


def _cpu_flags(tensors: Sequence[Tensor]) -> Tensor | None:
    """The fused CPU kernel's one-pass check, when it is available."""
    from lion_dist.backends.cpu import library

    return library.nonfinite_flags(tensors)


class NonfiniteGuard:
    """Applies the `nonfinite` policy to one step's local gradients."""

    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._skipped: Tensor | None = None
        self._pending: list[tuple[Tensor, Any]] = []  # device flags on their way to the host, with their events
        self._warned = False

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite gradient (reading it syncs with the GPU)."""
        return 0 if self._skipped is None else int(self._skipped)

    def check(self, grads: Sequence[Tensor], describe: Callable[[int], str]) -> bool | Tensor | None:
        """The step's skip decision: None when not checked, a bool on CPU, a device flag on GPU.

        `describe(i)` names the param of `grads[i]` for the error message. Every rank must call this
        once per step (it all-reduces), whatever its local gradients.
        """
        if self.policy == "ignore":
            return None
        capturing = _capturing()
        if not capturing:  # querying an event inside a stream capture is an error
            self._warn_for_earlier_skips()
        device = _reduce_device(grads)
        mask = nonfinite_mask(grads)
        flag = (
            torch.stack(mask).any().to(device, torch.int32).reshape(1)
            if mask
            else torch.zeros(1, dtype=torch.int32, device=device)
        )
        if _distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if grads and grads[0].device != flag.device:  # the fused GPU kernel reads the flag on its own device
            flag = flag.to(grads[0].device, non_blocking=True)

        if self.policy == "error":
            if bool(flag):
                self._raise(mask, describe)
            return False

        self._skipped = flag.clone() if self._skipped is None else self._skipped.add_(flag)
        if flag.device.type == "cpu":
            skip = bool(flag)
            if skip:
                self._warn_skipped()
            return skip
        if not (self._warned or capturing):  # read later, once the copy has landed: never a host sync
            event = torch.cuda.Event()
            self._pending.append((flag.to("cpu", non_blocking=True), event))
            event.record(torch.cuda.current_stream(flag.device))  # the flag's device, not the current one
        return flag

    def _raise(self, mask: Sequence[Tensor], describe: Callable[[int], str]) -> None:
        rank = dist.get_rank() if _distributed() else 0
        bad = [describe(i) for i, m in enumerate(mask) if bool(m)]
        where = f"in {', '.join(bad)} on rank {rank}" if bad else f"on another rank (not on rank {rank})"
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) {where}. No param or momentum was changed. Usual causes: "
            "a learning rate that is too high, fp16 overflow without loss scaling, or a bad batch. Use "
            "Lion(..., nonfinite='skip') to skip such steps instead of stopping."
        )

    def _warn_for_earlier_skips(self) -> None:
        """Warn for a skip of an earlier GPU step whose flag has reached the host; wait for none."""
        while self._pending and self._pending[0][1].query():
            host_flag, _ = self._pending.pop(0)
            if bool(host_flag):
                self._warn_skipped()

    def _warn_skipped(self) -> None:
        if self._warned or (_distributed() and dist.get_rank() != 0):
            return
        self._warned = True
        self._pending.clear()
        warnings.warn(
            "lion_dist.Lion skipped a step because a gradient held a NaN or an Inf (on some rank); params "
            "and momentum were left unchanged. This warning is shown once; Lion.skipped_steps counts them. "
            "Use nonfinite='error' to stop at the first one.",
            RuntimeWarning,
            stacklevel=4,
        )
