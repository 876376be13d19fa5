"""Every replica's momentum in one checkpoint.

Distributed Lion's replicas hold identical params but momenta of their own. DCP writes a tensor that every rank
holds (a replicated one) once, from one rank: right for the params, wrong for the momenta, which would keep one
replica's and silently lose the others'. So the state dict shows each momentum tensor as row `replica` of a
`(replicas, *shape)` DTensor: over the replicate group (a plain param's momentum), or over a mesh of the replicate
group and the param's own mesh, `Shard(0)` then the param's placements one dim later (FSDP2 inside each replica).
Its local part is a view of the momentum itself, so nothing is copied; every rank's part is distinct, so DCP saves
all of them, and a resume on the same number of replicas continues bit for bit. Each saved param group says
how many replicas it holds (`"replicas"`): another number is refused by name, and a state dict without it (saved by
`Lion`) gives every replica the same momentum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

from lion_dist import _torch, layouts

REPLICAS = "replicas"  # the saved param groups' count of stacked replicas
KeysOf = Callable[[Tensor, dict[str, Any]], Sequence[str]]


class Stacking:
    """Stacks and unstacks the momenta of one `DistributedLion`'s replicas (`process_group`)."""

    def __init__(self, process_group: ProcessGroup | None) -> None:
        self.process_group = process_group
        self._meshes: dict[Any, DeviceMesh] = {}

    def replicas(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1

    def stacked(self, state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]], keys: KeysOf) -> dict:
        if self.replicas() == 1:
            return state_dict
        state = dict(state_dict["state"])
        for param_id, p, group in _pairs(state_dict, param_groups):
            if param_id in state:
                stacked = {k: self._stack(p, v) for k, v in state[param_id].items() if k in keys(p, group)}
                state[param_id] = {**state[param_id], **stacked}
        saved_groups = [{**g, REPLICAS: self.replicas()} for g in state_dict["param_groups"]]
        return {**state_dict, "state": state, "param_groups": saved_groups}

    def unstacked(self, state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]], keys: KeysOf) -> dict:
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or not isinstance(state_dict.get("state"), dict):
            return state_dict  # the optimizer's own checks word what is wrong
        counts = {g.get(REPLICAS) for g in saved_groups if isinstance(g, dict)}
        if counts == {None}:
            return state_dict  # one momentum per param (a `Lion` state dict): every replica starts from it
        if counts != {self.replicas()}:
            raise ValueError(
                f"the state dict holds the momenta of {sorted(counts, key=str)} replicas (a DistributedLion "
                f"checkpoint), this DistributedLion has {self.replicas()}: each replica keeps its own momentum, so "
                "resume on the same number of replicas"
            )
        state = dict(state_dict["state"])
        for param_id, p, group in _pairs(state_dict, param_groups):
            if isinstance(state.get(param_id), dict):
                row = {k: self._row(v) for k, v in state[param_id].items() if k in keys(p, group)}
                state[param_id] = {**state[param_id], **{k: layouts.of(p).around(r, s) for k, (r, s) in row.items()}}
        saved_groups = [{k: v for k, v in g.items() if k != REPLICAS} for g in saved_groups]
        return {**state_dict, "state": state, "param_groups": saved_groups}

    def _stack(self, p: Tensor, t: Tensor) -> DTensor:
        mesh, placements = self._mesh(p)
        return _torch.dtensor_around(layouts.local(t).unsqueeze(0), mesh, placements, (self.replicas(), *t.shape))

    def _row(self, t: Any) -> tuple[Tensor, tuple[int, ...]]:
        """This replica's local momentum from a stacked one, and the momentum's global shape."""
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != self.replicas():
            raise ValueError(
                f"a stacked momentum must be a tensor of {self.replicas()} rows, one per replica, got {t!r:.80}"
            )
        row = layouts.local(t)[0] if isinstance(t, DTensor) else t[dist.get_rank(self.process_group)]
        return row, tuple(t.shape[1:])

    def _mesh(self, p: Tensor) -> tuple[DeviceMesh, tuple[Placement, ...]]:
        """The mesh of a stacked momentum of `p` (built once per param mesh), and its placements."""
        inner = p.device_mesh if isinstance(p, DTensor) else None
        if inner not in self._meshes:
            self._meshes[inner] = self._build_mesh(p, inner)
        placements: tuple[Placement, ...] = (Shard(0),)
        if inner is not None:
            placements += tuple(Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in p.placements)
        return self._meshes[inner], placements

    def _build_mesh(self, p: Tensor, inner: DeviceMesh | None) -> DeviceMesh:
        group = self.process_group or dist.group.WORLD
        device_type = inner.device_type if inner is not None else ("cuda" if p.is_cuda else "cpu")
        if inner is None:
            return DeviceMesh.from_group(group, device_type)
        mine = inner.mesh.tolist()
        everyone: list[Any] = [None] * self.replicas()
        dist.all_gather_object(everyone, mine, group=group)  # each replica's own ranks, in replica order
        groups = [group, *(inner.get_group(d) for d in range(inner.ndim))]
        names = ("replicas", *(f"param_dim_{d}" for d in range(inner.ndim)))  # from_group needs names for N-D
        return DeviceMesh.from_group(groups, device_type, mesh=torch.tensor(everyone), mesh_dim_names=names)


def _pairs(state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]]):
    """(saved param id, param, its group) in order, as torch's load_state_dict pairs them."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(param_groups):
        return
    for saved_group, group in zip(saved, param_groups, strict=True):
        ids = saved_group.get("params") if isinstance(saved_group, dict) else None
        if isinstance(ids, list) and len(ids) == len(group["params"]):
            yield from ((i, p, group) for i, p in zip(ids, group["params"], strict=True))
