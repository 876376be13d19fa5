"""The majority vote of Distributed Lion, as a direction exchange (`lion_dist.exchange.DirectionExchange`).

Every replica turns its local directions into +-1 votes, one collective sums them over the replicas (an all-gather
of packed bits, or an all-reduce of integer votes: `wire.py`), and every replica applies the same direction:
`sign(S)` ("vote") or `S / N` ("mean"). One bit cannot hold sign(0) = 0, so a replica whose `c` is exactly 0 (or
NaN, with `nonfinite="ignore"`) votes by parity: +1 when `rank_in_group + step` is odd, else -1; a tie (S == 0)
moves nothing. Replicas keep momenta of their own, so the state dict stacks them (`replicas.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from lion_dist import formats, layouts
from lion_dist.distributed_lion import replicas
from lion_dist.distributed_lion.overlap import Overlap
from lion_dist.distributed_lion.wire import choose_transport, count_set_bits, pack_bits, reduce_dtype
from lion_dist.exchange import DirectionExchange

if TYPE_CHECKING:
    from lion_dist.backends import StepArgs
    from lion_dist.plan import Bound

AGGREGATES = ("vote", "mean")


class VoteExchange(DirectionExchange):
    """Sign votes over `process_group` (the replicas: ranks holding the same elements; None: the default group)."""

    def __init__(
        self,
        process_group: ProcessGroup | None = None,
        aggregate: str = "vote",
        transport: str = "auto",
        overlap_bucket_elements: int | None = None,
    ) -> None:
        """`overlap_bucket_elements`: start the votes while backward runs, this many per collective (`overlap.py`:
        FSDP2 params; `attach` registers the hooks); None: all votes in one collective at `step()`."""
        from lion_dist.distributed_lion.wire import TRANSPORTS

        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if process_group is not None and not isinstance(process_group, ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}"
                " (from a DeviceMesh: mesh.get_group('replicate'))"
            )
        self.process_group, self.aggregate, self.transport = process_group, aggregate, transport
        self.overlap_bucket_elements = overlap_bucket_elements
        self.overlap: Overlap | None = None
        self._meshes_checked = False
        self._stacking = replicas.Stacking(process_group)

    def __deepcopy__(self, memo: dict[int, Any]) -> VoteExchange:
        """A copy that exchanges over the same process group (a connection to the other ranks: never copied)."""
        copied = copy.copy(self)
        copied._stacking = replicas.Stacking(self.process_group)
        copied.overlap = None  # the copy's optimizer attaches its own hooks
        return copied

    def attach(self, optimizer: Any) -> None:
        """Register the overlap's hooks on `optimizer`'s params (when overlapping)."""
        if self.overlap_bucket_elements is not None:
            self.overlap = Overlap(optimizer, self.launch, self._encode_one, self.overlap_bucket_elements)

    def group_size(self) -> int:
        """How many replicas exchange signs (1 without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def active(self) -> bool:
        return self.group_size() > 1

    def check_group(self, group: dict[str, Any]) -> None:
        if group["cautious_factor"] is not None:
            raise ValueError(
                f"DistributedLion cannot use cautious_factor={group['cautious_factor']!r}: the cautious mask depends "
                "on each replica's own gradient, so replicas would apply different updates; use cautious_factor=None "
                "(cautious_wd=True works: it masks with the agreed update)"
            )
        if group["momentum_dtype"] == torch.int8:
            raise ValueError(
                "DistributedLion cannot use momentum_dtype=torch.int8 yet: its step is split around the vote "
                "(direction, then apply), and neither the fused CPU kernel's split step nor the votes sent during "
                "backward (overlap) requantize int8 momentum; use momentum_dtype=torch.bfloat16 (2 bytes per param) "
                "or lion_dist.Lion with int8"
            )

    def data_parallel_size(self, params: Sequence[Tensor]) -> int:
        """Replicas x the ranks each replica is sharded over: the params' mesh alone is one replica's."""
        dtensors = [p for p in params if isinstance(p, DTensor)]
        return self.group_size() * (layouts.data_parallel_size(dtensors) if dtensors else 1)

    def exchange(
        self, bound: Sequence[Bound], args: Sequence[StepArgs], groups: Sequence[dict[str, Any]]
    ) -> list[list[Tensor] | None]:
        """Every group's local directions -> +-1 votes -> one exchange -> the same direction on every replica.

        A group with lr = 0 (e.g. DCP creating state) has advanced its momentum as in Lion, but applies nothing.
        """
        if not self._meshes_checked:
            self._check_meshes([p for b in bound for p in b.plan.entry_params])
        applies = [isinstance(a.hp.lr, Tensor) or a.hp.lr != 0 for a in args]
        if self.overlap is not None:
            pairs = [(p, g) for b, g in zip(bound, groups, strict=True) for p in b.plan.entry_params]
            by_param = self.overlap.collect(pairs)
            return [
                [by_param[id(p)] for p in b.plan.entry_params] if take else None
                for b, take in zip(bound, applies, strict=True)
            ]
        directions = [b.direction(a) for b, a in zip(bound, args, strict=True)]
        sent = [take and bool(u) for take, u in zip(applies, directions, strict=True)]
        votes = [self._encode_many(u, g) for u, g, s in zip(directions, groups, sent, strict=True) if s]
        if not votes:
            return [None] * len(directions)
        totals = iter(self.launch(torch.cat(votes))().split([v.numel() for v in votes]))
        agreed: list[list[Tensor] | None] = []
        for take, u in zip(sent, directions, strict=True):
            if not take:
                agreed.append(None)
                continue
            pieces = next(totals).split([d.numel() for d in u])
            dtypes = [d.dtype if d.is_floating_point() else torch.float32 for d in u]
            agreed.append([v.view_as(d).to(t) for v, d, t in zip(pieces, u, dtypes, strict=True)])
        return agreed

    def _zero_votes_up(self, group: dict[str, Any]) -> bool:
        """A direction of 0 (or NaN) votes +1 when rank_in_group + step is odd: ties alternate, never drift."""
        return (dist.get_rank(self.process_group) + group["step"]) % 2 == 1

    def _encode_many(self, directions: Sequence[Tensor], group: dict[str, Any]) -> Tensor:
        return _encode(directions, zero_votes_up=self._zero_votes_up(group))

    def _encode_one(self, direction: Tensor, group: dict[str, Any]) -> Tensor:
        return _encode([direction], zero_votes_up=self._zero_votes_up(group))

    def launch(self, bits: Tensor) -> Callable[[], Tensor]:
        """Start summing each element's +-1 vote over the replicas (one asynchronous collective); the returned
        function waits and gives the direction to apply, `sign(S)` or `S / N`, in fp32."""
        world = self.group_size()
        transport = choose_transport(bits.numel(), world) if self.transport == "auto" else self.transport
        if transport == "gather":
            packed = pack_bits(bits)
            gathered = packed.new_empty(world * packed.numel())
            work = _all_gather(gathered, packed, self.process_group)

            def total() -> Tensor:
                work.wait()
                return count_set_bits(gathered.view(world, -1), bits.numel()).mul_(2).sub_(world)

        else:
            summed = bits.to(reduce_dtype(world)).mul_(2).sub_(1)
            work = dist.all_reduce(summed, group=self.process_group, async_op=True)

            def total() -> Tensor:
                work.wait()
                return summed

        def agreed() -> Tensor:
            s = total()
            return s.sign().float() if self.aggregate == "vote" else s.float().div_(world)

        return agreed

    def _check_meshes(self, params: Sequence[Tensor]) -> None:
        """Refuse to vote across ranks that hold different shards of a param (that would mix unrelated elements)."""
        group_ranks = set(dist.get_process_group_ranks(self.process_group or dist.group.WORLD))
        for p in params:
            if not isinstance(p, DTensor):
                continue
            for dim, placement in enumerate(p.placements):
                if not placement.is_shard():
                    continue
                peers = set(dist.get_process_group_ranks(p.device_mesh.get_group(dim))) & group_ranks
                if len(peers) > 1:
                    raise ValueError(
                        f"DistributedLion's process_group holds ranks {sorted(peers)}, which hold different shards "
                        f"of a param (mesh {p.device_mesh}, placements {p.placements}). Pass the replicate group: "
                        "ranks that hold the same shard in different replicas, e.g. mesh.get_group('replicate')."
                    )
        self._meshes_checked = True

    def stacked_state_dict(self, state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self._stacking.stacked(state_dict, param_groups, self._momentum_keys)

    def unstacked_state_dict(
        self, state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        return self._stacking.unstacked(state_dict, param_groups, self._momentum_keys)

    @staticmethod
    def _momentum_keys(param: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        """The state that differs between replicas: the momentum (params, and so compensation, are the same)."""
        return formats.of_group(group).for_param(param).keys


def _encode(directions: Sequence[Tensor], *, zero_votes_up: bool) -> Tensor:
    """One bool per element, True = a +1 vote. Directions hold sign(c); 0 (and NaN) vote `zero_votes_up`."""
    flat = [d.reshape(-1) for d in directions]
    return torch.cat([~(d < 0) if zero_votes_up else d > 0 for d in flat])


def _all_gather(output: Tensor, tensor: Tensor, group: ProcessGroup | None) -> Any:
    """Start an all-gather into one flat tensor (`all_gather_single` from torch 2.13, `all_gather_into_tensor`
    before); returns its work handle."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, tensor, group=group, async_op=True)
