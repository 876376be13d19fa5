"""Votes that start while backward still runs: each param's as soon as its sharded gradient is final.

FSDP2 reduce-scatters a unit's gradients when its backward is done and then runs each sharded param's
post-accumulate-grad hooks (torch 2.11, 2.13: `register_post_accumulate_grad_hook` on the sharded param). From such
a hook this computes the param's local direction (its momentum advanced) with `Bound.direction` on a plan of that
param alone, so on the backend `step()` would use (the fused kernel on CPU and GPU), and queues its votes; once a
bucket holds `bucket_elements` votes, one asynchronous collective sends them, so the link works while earlier
layers still compute. `step()` sends what is left, waits, and applies the agreed directions.

The result is the non-overlapped exchange's, bit for bit: the per-element math is the same (every backend's split
step equals `spec.lion_direction`), each element's vote sum does not depend on how elements are bucketed, and every
replica fills its buckets in the same order (the same model runs the same backward). FSDP2 runs the hooks only when
it reduces, so with gradient accumulation (`set_requires_gradient_sync(False)` for all but the last micro-batch)
they fire once per step. A param whose hook did not fire (a gradient set by hand) gets its direction at `step()`,
as without overlap. The direction uses the gradient as backward leaves it: code that changes gradients between
backward and `step()` (gradient clipping, whose norm needs every gradient first) must not overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lion_dist import groups
from lion_dist.backends import StepArgs

Launch = Callable[[Tensor], Callable[[], Tensor]]  # votes -> (wait -> agreed directions), see `VoteExchange.launch`


class Overlap:
    """The hooks and the votes in flight of one `DistributedLion` (see module doc)."""

    def __init__(
        self, optimizer: Any, launch: Launch, encode: Callable[[Tensor, dict], Tensor], bucket_elements: int
    ) -> None:
        if not isinstance(bucket_elements, int) or isinstance(bucket_elements, bool) or bucket_elements < 1:
            raise ValueError(f"overlap_bucket_elements must be a positive int, got {bucket_elements!r}")
        self.optimizer, self.launch, self.encode, self.bucket_elements = optimizer, launch, encode, bucket_elements
        self.queued: list[tuple[Tensor, Tensor]] = []  # (param, its direction), not sent yet
        self.queued_elements = 0
        self.in_flight: list[tuple[list[tuple[Tensor, Tensor]], Callable[[], Tensor]]] = []
        self.done: set[int] = set()  # ids of the params whose direction this step has
        self._group_index: dict[int, int] = {}  # by param id; the group dicts themselves are replaced on load
        self.handles: list[Any] = []
        self.register([p for group in optimizer.param_groups for p in group["params"]])

    def register(self, params: Sequence[Tensor]) -> None:
        """Hook FSDP2's sharded params (others get their direction at `step()`)."""
        self.handles += [p.register_post_accumulate_grad_hook(self._ready) for p in params if isinstance(p, DTensor)]

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        """The param's group as it is now (torch's `load_state_dict` puts new group dicts in place)."""
        if id(param) not in self._group_index:  # first use, or a param group added since
            groups = self.optimizer.param_groups
            self._group_index = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        return self.optimizer.param_groups[self._group_index[id(param)]]

    def _ready(self, param: Tensor) -> None:
        """A param's sharded gradient is final: its direction now, its votes with the next bucket."""
        if param.grad is None or id(param) in self.done:
            return
        self.add(param, self._group_of(param))

    def add(self, param: Tensor, group: dict[str, Any]) -> None:
        """Compute `param`'s local direction (its momentum advanced) on the backend `step()` would use, and queue
        its votes. An empty local shard has none (every replica holds the same shards, so all skip it alike)."""
        self.done.add(id(param))
        bound = self.optimizer._bind_param(param, group)
        if not bound.plan.entries:
            return
        (direction,) = bound.direction(StepArgs(groups.hyperparams(group)))
        self.queued.append((param, direction))
        self.queued_elements += direction.numel()
        if self.queued_elements >= self.bucket_elements:
            self.flush()

    def flush(self) -> None:
        """Send the queued votes (one collective), if any."""
        if not self.queued:
            return
        votes = torch.cat([self.encode(d, self._group_of(p)) for p, d in self.queued])
        self.in_flight.append((self.queued, self.launch(votes)))
        self.queued, self.queued_elements = [], 0

    def collect(self, entries: Sequence[tuple[Tensor, dict[str, Any]]]) -> dict[int, Tensor]:
        """Every param's agreed direction (by id): the hooks' in flight, plus those of `entries` (param, group)
        whose hooks did not fire this step, sent now in the same order on every replica."""
        for param, group in entries:
            if id(param) not in self.done:
                self.add(param, group)
        self.flush()
        agreed: dict[int, Tensor] = {}
        for bucket, wait in self.in_flight:
            pieces = wait().split([d.numel() for _, d in bucket])
            for (param, direction), piece in zip(bucket, pieces, strict=True):
                dtype = direction.dtype if direction.is_floating_point() else torch.float32
                agreed[id(param)] = piece.view_as(direction).to(dtype)
        self.in_flight, self.done = [], set()
        return agreed
