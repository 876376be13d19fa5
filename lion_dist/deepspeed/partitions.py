"""Where each rank's ZeRO partition sits in its flat group, declared to `lion_dist.layouts`.

DeepSpeed hands the optimizer plain 1-D tensors that are this rank's slice of a flat buffer (ZeRO 1/2: one fp32
partition per param group; ZeRO 3: one per sub-group), with nothing on them that says so. Undeclared, every rank
would draw the same stochastic-rounding noise (bf16 partitions, int8 momentum's stochastic requantization) for
different elements; declared, each partition's noise starts at its own offset in the group's flat buffer.
`initialize` declares them; code that builds the engine itself calls `declare_partitions(engine)` once after it.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from lion_dist import layouts


def declare_partitions(engine: Any) -> int:
    """Declare the flat partitions of a DeepSpeed engine's ZeRO optimizer (none below ZeRO 1); return how many."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO 3: every rank's sub-group i has the same size
        rank, world = dist.get_rank(zero.dp_process_group), dist.get_world_size(zero.dp_process_group)
        before = 0
        for partition in zero.fp32_partitioned_groups_flat:
            layouts.declare_flat_partition(partition, world * before + rank * partition.numel())
            before += partition.numel()
        return len(zero.fp32_partitioned_groups_flat)
    partitions = getattr(zero, "single_partition_of_fp32_groups", None)
    if partitions is None:
        return 0
    for partition, group in zip(partitions, zero.real_dp_process_group, strict=True):
        layouts.declare_flat_partition(partition, dist.get_rank(group) * partition.numel())
    return len(partitions)
