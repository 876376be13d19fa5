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

The package: `wire.py` (1-bit packing and the bytes each transport sends), `vote.py` (the vote as a
`lion_dist.exchange.DirectionExchange` that `Lion` calls between the two halves of its step), `replicas.py` (every
replica's momentum in one checkpoint, so DCP saves all of them). This module: `DistributedLion` (Lion with the vote)
and the one-line setup for DDP and FSDP2.

Enabling it. DDP: `distributed_lion.setup(ddp_model, lr=...)` registers `local_gradients_hook` (DDP then skips its
gradient all-reduce) and returns the optimizer. FSDP2 inside each replica: shard on the replica's own 1-D mesh
(`fully_shard(model, mesh=mesh["shard"])`) and exchange over `mesh.get_group("replicate")`. FSDP2's own HSDP (a
2-D mesh) cannot be used: with `set_requires_all_reduce(False)` it keeps the reduce-scattered gradient in a
private buffer for the next micro-batch and never writes `param.grad` (checked on torch 2.13).
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lion_dist.distributed_lion.vote import AGGREGATES, VoteExchange
from lion_dist.distributed_lion.wire import (
    TRANSPORTS,
    choose_transport,
    count_set_bits,
    pack_bits,
    ring_bytes_sent,
    vote_bytes_sent,
)
from lion_dist.optimizer import Lion

OVERLAP_BUCKET = 1 << 18  # votes per collective while backward runs: 32 KiB of packed bits, small next to a layer

__all__ = [
    "AGGREGATES",
    "OVERLAP_BUCKET",
    "TRANSPORTS",
    "DistributedLion",
    "choose_transport",
    "count_set_bits",
    "enable",
    "local_gradients_hook",
    "pack_bits",
    "ring_bytes_sent",
    "setup",
    "vote_bytes_sent",
]


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
    inside each replica: `opt = setup(model, process_group=mesh.get_group("replicate"), lr=...)`; add
    `overlap_bucket_elements=OVERLAP_BUCKET` to start the votes during backward when nothing changes the gradients
    between backward and `step()` (no gradient clipping). `params`: the params or param groups to optimize
    (default: all of `model`'s). Other keyword arguments go to `DistributedLion` (and so to `lion_dist.Lion`).
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
    would diverge) and int8 momentum. `stochastic_rounding` draws the same noise on every replica (the seed
    defaults to 0 everywhere). Its `state_dict()` holds every replica's momentum (`replicas.py`).

    Args:
        aggregate: "vote" (u = sign of the summed votes; the paper's majority vote, a tie moves nothing) or
            "mean" (u = mean of the votes, a multiple of 1 / N).
        process_group: the replicas: ranks that hold the same elements of every param. None: the default group.
        transport: "auto" (fewer bytes, see `wire.choose_transport`), "gather" (all-gather of packed bits) or
            "reduce" (all-reduce of integer votes). All give the same params.
        overlap_bucket_elements: start the votes while backward still runs, as FSDP2 finishes each param's
            sharded gradient, this many votes per collective (`overlap.py`; FSDP2 params, `nonfinite="ignore"`).
            The direction then uses the gradient as backward left it: nothing may change it before `step()`
            (no gradient clipping, whose norm needs every gradient first). None (the default): every vote in one
            collective at `step()`. The params are the same either way.
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
        overlap_bucket_elements: int | None = None,
        **lion_kwargs: Any,
    ) -> None:
        if overlap_bucket_elements is not None and lion_kwargs.get("nonfinite", "ignore") != "ignore":
            raise ValueError(
                f"overlapped votes advance each momentum during backward, before step() could decide to skip it: "
                f"nonfinite={lion_kwargs['nonfinite']!r} needs overlap_bucket_elements=None"
            )
        vote = VoteExchange(process_group, aggregate, transport, overlap_bucket_elements)
        super().__init__(params, lr, betas, weight_decay, exchange=vote, **lion_kwargs)
        vote.attach(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also the end of torch's load_state_dict: the hooks are in place then
        if self.vote.overlap is None:
            self.vote.attach(self)  # a copy (deepcopy, unpickling) hooks its own params

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.vote.overlap is not None:
            self.vote.overlap.register(self.param_groups[-1]["params"])

    @property
    def vote(self) -> VoteExchange:
        return self._exchange

    @property
    def aggregate(self) -> str:
        return self.vote.aggregate

    @property
    def transport(self) -> str:
        return self.vote.transport

    @property
    def process_group(self) -> ProcessGroup | None:
        return self.vote.process_group

    def group_size(self) -> int:
        """How many replicas exchange signs (1 without torch.distributed)."""
        return self.vote.group_size()
