"""What each rank of the job sends over the network per training step, counted from the collectives it issues.

Across nodes the link, not the compute, is what Distributed Lion saves, so the job reports, per rank and step,
the bytes it sends in all collectives and the part of them that goes to another node.

`CollectiveCounter.counting()` wraps torch.distributed's tensor collectives while a step runs (FSDP2, DDP's
`allreduce_hook` and `DistributedLion` all call them as `dist.<name>`, so the wrappers see every one) and turns
each into the bytes this rank sends with a ring algorithm (`distributed_lion.ring_bytes_sent`): an all-gather
forwards N - 1 chunks, an all-reduce sends 2 (N - 1) / N of the buffer. A reduce-scatter is a ring
reduce-scatter, N - 1 chunks, except on gloo, which has none: gloo reduces the whole input and keeps its chunk,
so it sends an all-reduce's bytes, twice a ring reduce-scatter's (measured with the loopback's tx counter at 2
and 3 ranks: 2.00 and 4.01 chunks per rank, as an all-reduce of the input).

In a ring each rank sends everything to its successor in the group, so a collective's bytes cross the inter-node
link when that successor runs on another node (the node of every rank is torchrun's GROUP_RANK). Summed over a
node's ranks this is what its network interface sends, whichever way round the ring goes; `LinkCounter` reads
that interface's own counter for a cross-check. Not counted: DTensor's functional collectives (gradient
clipping's few scalar all-reduces) and everything outside the training steps (evaluation, checkpoints).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lion_dist.distributed_lion import ring_bytes_sent

# torch.distributed function -> (collective, the argument holding this rank's part of the payload)
WRAPPED = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_gather_single": ("all_gather", "input_tensor"),
    "all_gather_into_tensor": ("all_gather", "input_tensor"),
    "reduce_scatter_single": ("reduce_scatter", "output"),
    "reduce_scatter_tensor": ("reduce_scatter", "output"),
}


def collective_bytes_sent(collective: str, chunk_bytes: int, world: int, backend: str) -> int:
    """Bytes one rank sends in a collective on `world` ranks; `chunk_bytes` is its input (all-reduce, all-gather)
    or its output (reduce-scatter)."""
    if collective == "reduce_scatter":
        if backend == "gloo":  # an all-reduce of the whole input (see the module doc)
            return ring_bytes_sent("all_reduce", world * chunk_bytes, world)
        return ring_bytes_sent("all_gather", chunk_bytes, world)  # a ring reduce-scatter sends as many as a gather
    return ring_bytes_sent(collective, chunk_bytes, world)


class CollectiveCounter:
    """Running totals of this rank's sent bytes (`sent`), the part to other nodes (`link`) and the calls."""

    def __init__(self, node_of_rank: Sequence[int]) -> None:
        self.node_of_rank = list(node_of_rank)
        self.rank = dist.get_rank()
        self.sent = self.link = self.calls = 0
        self._groups: dict[int, tuple[int, bool, str]] = {}  # id(group) -> (size, successor off-node, backend)

    def totals(self) -> tuple[int, int, int]:
        return self.sent, self.link, self.calls

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the collectives issued inside the block (the wrappers are removed again on the way out)."""
        originals = {name: getattr(dist, name) for name in WRAPPED if hasattr(dist, name)}
        for name, fn in originals.items():
            setattr(dist, name, self._wrap(fn, *WRAPPED[name]))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def _wrap(self, fn: Callable[..., Any], collective: str, payload_arg: str) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        def counted(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            tensor = bound.arguments[payload_arg]
            self.record(collective, tensor.numel() * tensor.element_size(), bound.arguments.get("group"))
            return fn(*args, **kwargs)

        return counted

    def record(self, collective: str, chunk_bytes: int, group: dist.ProcessGroup | None) -> None:
        size, off_node, backend = self._group_info(group)
        sent = collective_bytes_sent(collective, chunk_bytes, size, backend) if size > 1 else 0
        self.sent += sent
        self.link += sent if off_node else 0
        self.calls += 1

    def _group_info(self, group: dist.ProcessGroup | None) -> tuple[int, bool, str]:
        group = group or dist.group.WORLD
        if id(group) not in self._groups:
            ranks = dist.get_process_group_ranks(group)
            successor = ranks[(ranks.index(self.rank) + 1) % len(ranks)]
            off_node = self.node_of_rank[successor] != self.node_of_rank[self.rank]
            self._groups[id(group)] = (len(ranks), off_node, str(dist.get_backend(group)))
        return self._groups[id(group)]


def node_of_ranks() -> list[int]:
    """The node (torchrun's GROUP_RANK; 0 without torchrun) of every rank, gathered from all ranks."""
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, int(os.environ.get("GROUP_RANK", "0")))
    return nodes


class LinkCounter:
    """The bytes a network interface of this node has sent (Linux: /sys/class/net/NAME/statistics/tx_bytes)."""

    def __init__(self, iface: str) -> None:
        self.path = Path("/sys/class/net") / iface / "statistics" / "tx_bytes"
        if not self.path.is_file():
            here = sorted(p.name for p in Path("/sys/class/net").iterdir()) if Path("/sys/class/net").is_dir() else []
            raise ValueError(
                f"--link-iface {iface!r}: no {self.path} on this node (its interfaces: {', '.join(here) or 'none'}); "
                "pass the interface that carries the traffic to the other nodes, or leave the flag out"
            )

    def read(self) -> int:
        return int(self.path.read_text())
