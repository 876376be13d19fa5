"""Distributed Lion (Liu et al. 2024, arXiv 2404.00438): data-parallel replicas exchange 1-bit signs, not gradients.

Plain data parallelism all-reduces every fp32 gradient. Lion only needs the sign of its interpolated momentum, so
here each replica keeps its *own* gradient and momentum, computes its local Lion direction, sends it as 1 bit per
element, and every replica applies the same aggregate of all the replicas' directions:

    on replica r:  c_r = b1 * m_r + (1 - b1) * g_r;  d_r = sign(c_r) as a +-1 vote;  m_r <- b2 * m_r + (1 - b2) * g_r
    everywhere:    S = sum_r d_r;  u = sign(S) ("vote") or S / N ("mean");  p <- p * (1 - lr * wd) - lr * u

Momenta differ across replicas; params stay bit-identical because every replica applies the same `u` to the same
`p` with the same arithmetic (the plain-Lion rounding of `functional.lion_reference`; decay only where `u * p > 0`
with `cautious_wd=True`).

Zeros and ties. One bit cannot hold sign(0) = 0, so a replica whose `c` is exactly 0 (or NaN, with
`nonfinite="ignore"`) votes by parity: +1 when `rank_in_group + step` is odd, else -1. With an even number of
replicas an element that is zero on every replica (an embedding row no batch touched, zero padding) therefore
ties, and a tie (S == 0) moves nothing, exactly as plain Lion; with an odd number N >= 3 such an element moves by
+-lr (mean: +-lr / N) alternately from step to step and does not drift. A group of one replica has nothing to
exchange and steps exactly as `lion_dist.Lion` (sign(0) = 0 included).

What goes over the wire (bytes each worker sends per step for n elements and N replicas, ring algorithms:
an all-gather forwards N - 1 chunks, an all-reduce sends 2 (N - 1) / N of the buffer; see `vote_bytes_sent`):

    fp32 gradient all-reduce (DDP)     2 (N - 1) / N * 4 n
    "gather": all-gather packed bits   (N - 1) * ceil(n / 8)          -> 64 / N times fewer: 16x at N = 4
    "reduce": all-reduce int8 votes    2 (N - 1) / N * n              -> 4x fewer (int16 above N = 127)

The all-gather is cheaper below N = 16, the int8 reduce above; `transport="auto"` picks the smaller by that
count (ties go to the gather). Both give the same S, hence the same params.

Enabling it. DDP: `distributed_lion.setup(ddp_model, lr=...)` registers `local_gradients_hook` (DDP then skips its
gradient all-reduce) and returns the optimizer. FSDP2 inside each replica: shard on the replica's own 1-D mesh
(`fully_shard(model, mesh=mesh["shard"])`) and exchange over `mesh.get_group("replicate")`. FSDP2's own HSDP (a
2-D mesh) cannot be used: with `set_requires_all_reduce(False)` it keeps the reduce-scattered gradient in a
private buffer for the next micro-batch and never writes `param.grad` (checked on torch 2.13).
"""

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lion_dist.batch_guard import infer_data_parallel_size
from lion_dist.optimizer import Lion
from lion_dist.plan import Bound
from lion_dist.spec import LionHyperparams

AGGREGATES = ("vote", "mean")
TRANSPORTS = ("auto", "gather", "reduce")
_INT8_MAX_WORLD = 127  # |S| <= N must fit the reduce's integer type
_BYTES = torch.arange(256)
_SPREAD = sum(((_BYTES >> k) & 1) << (8 * k) for k in range(8))  # byte k of _SPREAD[v] = bit k of v


# ---------------------------------------------------------------------------------------------- wire format


def pack_bits(bits: Tensor) -> Tensor:
    """A 1-D bool tensor as uint8, 8 elements per byte (element i is bit i % 8 of byte i // 8; zero padded).

    Each group of 8 bools is read as one int64 whose bytes are 0 or 1, and three shift-ors fold the 8 bytes'
    low bits into the low byte: a few passes over n / 8 words instead of a per-bit loop.
    """
    words = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(torch.int64)  # a fresh, aligned copy
    for shift in (7, 14, 28):
        words |= words >> shift
    return words.to(torch.uint8)  # keeps the low byte


def count_set_bits(rows: Tensor, numel: int) -> Tensor:
    """For packed rows (shape (R, B), uint8, from `pack_bits`), how many rows have each of the first `numel`
    elements' bit set, as int16 (int32 from 2**15 rows).

    A 256-entry table spreads a byte's 8 bits into the 8 byte lanes of an int64; adding up to 255 spread rows
    counts 8 elements per int64 add without carries between lanes.
    """
    count_dtype = torch.int16 if rows.shape[0] < 2**15 else torch.int32
    total = torch.zeros(numel, dtype=count_dtype, device=rows.device)
    spread = _SPREAD.to(rows.device)
    for start in range(0, rows.shape[0], 255):
        lanes = torch.zeros(rows.shape[1], dtype=torch.int64, device=rows.device)
        for row in rows[start : start + 255]:
            lanes += spread.index_select(0, row.int())
        total += lanes.view(torch.uint8)[:numel]
    return total


def _reduce_dtype(world_size: int) -> torch.dtype:
    return torch.int8 if world_size <= _INT8_MAX_WORLD else torch.int16


def ring_bytes_sent(collective: str, payload_bytes: int, world_size: int) -> int:
    """Bytes one worker sends in a ring `collective` whose per-rank input is `payload_bytes`.

    A ring all-gather forwards the N - 1 other ranks' chunks: (N - 1) x payload. A ring all-reduce is a
    reduce-scatter plus an all-gather, each sending (N - 1) / N of the buffer: 2 (N - 1) / N x payload.
    """
    if collective == "all_gather":
        return (world_size - 1) * payload_bytes
    if collective == "all_reduce":
        return math.ceil(2 * (world_size - 1) * payload_bytes / world_size)
    raise ValueError(f"collective must be 'all_gather' or 'all_reduce', got {collective!r}")


def vote_bytes_sent(transport: str, numel: int, world_size: int) -> int:
    """Bytes one worker sends per step to exchange `numel` votes with `transport` ("gather" or "reduce").

    Compare `ring_bytes_sent("all_reduce", 4 * numel, world_size)`, the fp32 gradient all-reduce it replaces.
    """
    if transport == "gather":
        return ring_bytes_sent("all_gather", math.ceil(numel / 8), world_size)
    if transport == "reduce":
        return ring_bytes_sent("all_reduce", numel * _reduce_dtype(world_size).itemsize, world_size)
    raise ValueError(f"transport must be 'gather' or 'reduce', got {transport!r}")


def choose_transport(numel: int, world_size: int) -> str:
    """The transport that sends fewer bytes per worker: "gather" up to 16 workers (16: a tie), "reduce" above."""
    reduce_is_cheaper = vote_bytes_sent("reduce", numel, world_size) < vote_bytes_sent("gather", numel, world_size)
    return "reduce" if reduce_is_cheaper else "gather"


# ---------------------------------------------------------------------------------------------- enabling it


def local_gradients_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook that keeps each replica's own gradient: no all-reduce, no division by world size.

    `ddp_model.register_comm_hook(None, local_gradients_hook)`; `DistributedLion` then exchanges signs in step().
    (This module has no `from __future__ import annotations`: DDP compares these annotations with the real types.)
    """
    return noop_hook(state, bucket)


def enable(model: nn.Module) -> ProcessGroup | None:
    """Stop `model` from all-reducing gradients across replicas; return the group to exchange signs over.

    A `DistributedDataParallel` model gets `local_gradients_hook` and its process group is returned. An FSDP2
    module sharded on one replica's 1-D mesh does no cross-replica reduction already: None is returned (pass the
    replicate group yourself). FSDP2 HSDP (a 2-D mesh) is rejected: it cannot hand the optimizer unreduced grads.
    """
    if isinstance(model, DistributedDataParallel):
        model.register_comm_hook(None, local_gradients_hook)
        return model.process_group
    if isinstance(model, FSDPModule):
        for p in model.parameters():
            if isinstance(p, DTensor) and p.device_mesh.ndim > 1 and p.placements[0].is_replicate():
                raise ValueError(
                    f"this FSDP2 module uses HSDP (mesh {p.device_mesh}, placements {p.placements}), which "
                    "all-reduces gradients across replicas, and set_requires_all_reduce(False) leaves param.grad "
                    "unset. For Distributed Lion shard each replica on its own mesh: "
                    "fully_shard(model, mesh=mesh['shard']) and pass process_group=mesh.get_group('replicate')."
                )
        return None
    raise TypeError(
        f"enable() expects a DistributedDataParallel model or an FSDP2 (fully_shard) module, got "
        f"{type(model).__name__}; for a model you synchronise yourself, construct DistributedLion(...) directly."
    )


def setup(
    model: nn.Module,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    *,
    process_group: ProcessGroup | None = None,
    **lion_kwargs: Any,
) -> "DistributedLion":
    """Turn off `model`'s gradient all-reduce and return a `DistributedLion` over its replicas: the one-line switch.

    DDP: `opt = setup(ddp_model, lr=1e-4, weight_decay=0.1)` (the replicas are DDP's process group). FSDP2 sharded
    inside each replica: `opt = setup(model, process_group=mesh.get_group("replicate"), lr=...)`. `params`: the
    params or param groups to optimize (default: all of `model`'s). Other keyword arguments go to
    `DistributedLion` (and so to `lion_dist.Lion`).
    """
    group = enable(model)
    if process_group is None:
        if group is None:
            raise ValueError(
                "an FSDP2 module does not know its replicas: pass process_group=mesh.get_group('replicate') "
                "(the group of ranks that hold the same shard in different replicas)"
            )
        process_group = group
    params = model.parameters() if params is None else params
    return DistributedLion(params, process_group=process_group, **lion_kwargs)


# ---------------------------------------------------------------------------------------------- the optimizer


class DistributedLion(Lion):
    """`lion_dist.Lion` for data-parallel replicas that exchange 1-bit signs instead of gradients (see module doc).

    Use it with gradients that were *not* all-reduced (`enable(model)` / `setup(...)`). Every argument of
    `lion_dist.Lion` works, except `cautious_factor` (its mask needs each replica's own gradient, so replicas
    would diverge). `stochastic_rounding` draws the same noise on every replica (the seed defaults to 0 everywhere).

    Args:
        aggregate: "vote" (u = sign of the summed votes; the paper's majority vote, a tie moves nothing) or
            "mean" (u = mean of the votes, a multiple of 1 / N).
        process_group: the replicas: ranks that hold the same elements of every param. None: the default group.
        transport: "auto" (fewer bytes, see `choose_transport`), "gather" (all-gather of packed bits) or
            "reduce" (all-reduce of integer votes). All give the same params.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        aggregate: str = "vote",
        process_group: ProcessGroup | None = None,
        transport: str = "auto",
        **lion_kwargs: Any,
    ) -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if process_group is not None and not isinstance(process_group, ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}"
                " (from a DeviceMesh: mesh.get_group('replicate'))"
            )
        self.aggregate = aggregate
        self.transport = transport
        self.process_group = process_group
        self._meshes_checked = False
        super().__init__(params, lr, betas, weight_decay, **lion_kwargs)

    def __getstate__(self) -> dict[str, Any]:  # pickling and copy.deepcopy keep the exchange settings
        own = ("aggregate", "transport", "process_group", "_meshes_checked")
        return {**super().__getstate__(), **{key: self.__dict__[key] for key in own}}

    def __deepcopy__(self, memo: dict[int, Any]) -> "DistributedLion":
        """A copy with its own params and state that exchanges over the same process group (a group is a
        connection to the other ranks: it is shared, never copied)."""
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["cautious_factor"] is not None:
            self.param_groups.pop()
            raise ValueError(
                f"DistributedLion cannot use cautious_factor={group['cautious_factor']!r}: the cautious mask depends "
                "on each replica's own gradient, so replicas would apply different updates; use cautious_factor=None "
                "(cautious_wd=True works: it masks with the agreed update)"
            )
        if group["momentum_dtype"] == torch.int8:
            self.param_groups.pop()
            raise ValueError(
                "DistributedLion cannot use momentum_dtype=torch.int8: its step is split around the vote (direction, "
                "then apply) and int8 momentum has no split step, its requantization being part of the fused step; "
                "use momentum_dtype=torch.bfloat16 (2 bytes per param) or lion_dist.Lion with int8"
            )

    def group_size(self) -> int:
        """How many replicas exchange signs (1 without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _data_parallel_size(self) -> int:
        """Replicas x the ranks each replica is sharded over: the params' mesh alone is one replica's."""
        dtensors = [p for group in self.param_groups for p in group["params"] if isinstance(p, DTensor)]
        return self.group_size() * (infer_data_parallel_size(dtensors) if dtensors else 1)

    # ------------------------------------------------------------------ step

    def _exchanges_directions(self) -> bool:
        """With more than one replica, the step is split: local directions, one exchange, the agreed update."""
        return self.group_size() > 1

    def _aggregate(
        self, bound: list[Bound], hps: list[LionHyperparams], directions: list[list[Tensor]]
    ) -> list[list[Tensor] | None]:
        """Every group's local directions -> +-1 votes -> one exchange -> the same direction on every replica.

        A group with lr = 0 (e.g. DCP creating state) has advanced its momentum as in Lion, but exchanges
        nothing and keeps its params.
        """
        if not self._meshes_checked:
            self._check_meshes([p for b in bound for p in b.plan.entry_params])
        rank = dist.get_rank(self.process_group)
        votes, exchanging = [], []
        for group, hp, u in zip(self.param_groups, hps, directions, strict=True):
            exchanging.append(bool(u) and (isinstance(hp.lr, Tensor) or hp.lr != 0))
            if exchanging[-1]:
                votes.append(_encode(u, zero_votes_up=(rank + group["step"]) % 2 == 1))
        if not votes:
            return [None] * len(directions)
        totals = iter(self._exchange(torch.cat(votes), self.group_size()).split([v.numel() for v in votes]))
        agreed: list[list[Tensor] | None] = []
        for take, u in zip(exchanging, directions, strict=True):
            if not take:
                agreed.append(None)
                continue
            pieces = next(totals).split([d.numel() for d in u])
            agreed.append([v.view_as(d).to(d.dtype) for v, d in zip(pieces, u, strict=True)])
        return agreed

    def _exchange(self, bits: Tensor, world: int) -> Tensor:
        """S = sum over replicas of each element's +-1 vote (one collective), turned into the fp32 direction u."""
        transport = choose_transport(bits.numel(), world) if self.transport == "auto" else self.transport
        if transport == "gather":
            packed = pack_bits(bits)
            gathered = packed.new_empty(world * packed.numel())
            _all_gather(gathered, packed, self.process_group)
            total = count_set_bits(gathered.view(world, -1), bits.numel()).mul_(2).sub_(world)
        else:
            total = bits.to(_reduce_dtype(world)).mul_(2).sub_(1)
            dist.all_reduce(total, group=self.process_group)
        if self.aggregate == "vote":
            return total.sign().float()
        return total.float().div_(world)

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


def _encode(directions: Sequence[Tensor], *, zero_votes_up: bool) -> Tensor:
    """One bool per element, True = a +1 vote. Directions hold sign(c); 0 (and NaN) vote `zero_votes_up`."""
    flat = [d.reshape(-1) for d in directions]
    return torch.cat([~(d < 0) if zero_votes_up else d > 0 for d in flat])


def _all_gather(output: Tensor, tensor: Tensor, group: ProcessGroup | None) -> None:
    """All-gather into one flat tensor (`all_gather_single` from torch 2.13, `all_gather_into_tensor` before)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)
