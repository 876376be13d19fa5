"""Accelerate with FSDP2 (`FullyShardedDataParallelPlugin(fsdp_version=2)`) and `lion_dist.Lion`, on 2 CPU processes.

examples/accelerate_fsdp2.py runs once in one process (unsharded: the reference) and once under torchrun on 2
processes through tests/accelerate_cpu_fsdp.py, which turns on for CPU processes the FSDP path Accelerate 1.x
takes only on GPUs (on CPU it silently trains with DDP). The sharded run must be FSDP2, keep half of Lion's
momentum on each rank, and end at the single-process eval loss.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.test_examples import run

STEPS = "5"
RESULT = re.compile(
    r"eval loss (\d+\.\d+) -> (\d+\.\d+) after (\d+) steps on (\d) ranks \((FSDP2|not sharded)\); "
    r"Lion state (\d+) bytes on rank 0, (\d+) on all ranks"
)


def result(output: str) -> tuple:
    found = RESULT.findall(output)
    assert len(found) == 1, output[-4000:]
    first, last, steps, ranks, how, rank0, total = found[0]
    assert steps == STEPS
    return float(first), float(last), int(ranks), how, int(rank0), int(total)


@pytest.mark.slow
def test_accelerate_fsdp2_on_two_processes_trains_like_one() -> None:
    single = result(run(sys.executable, "examples/accelerate_fsdp2.py", "--steps", STEPS, timeout=600))
    output = run(
        "launch/torchrun_single_node.sh",
        "tests/accelerate_cpu_fsdp.py",
        "examples/accelerate_fsdp2.py",
        "--steps",
        STEPS,
        timeout=600,
    )
    assert "SmallBatchWarning" not in output  # 32 per rank x 2 data-parallel ranks (read from the mesh) = 64
    sharded = result(output)
    assert single[2:4] == (1, "not sharded") and sharded[2:4] == (2, "FSDP2")
    assert single[1] < single[0] - 0.3  # it learns
    assert sharded[0] == pytest.approx(single[0], abs=1e-5)  # the same initial model
    assert sharded[1] == pytest.approx(single[1], abs=2e-4)  # the same training, up to reduction order
    assert sharded[5] == single[5] == single[4]  # all of the momentum, once
    assert sharded[4] * 2 == single[4]  # each rank keeps its half
