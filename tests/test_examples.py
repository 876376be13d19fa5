"""Every example runs through every launch script on CPU, as a user would start it.

The examples train the same model on the same global batches (each rank takes its slice), so the sharded runs
(FSDP2, HSDP + CPU offload across two torchrun "nodes" on loopback, FSDP1 with gradient accumulation,
DeepSpeed ZeRO-3 + optimizer offload) must end at the single-process example's eval loss. Each run's global
batch is 64, so the batch guard must stay quiet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = "5"
RESULT = re.compile(r"eval loss (\d+\.\d+) -> (\d+\.\d+) after (\d+) steps")


def env(**extra: str) -> dict[str, str]:
    """The caller's environment, 2 CPU processes per node, and this interpreter for the launch scripts."""
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        **extra,
    }


def run(*command: str, timeout: float = 300, **extra: str) -> str:
    """Run a command from the repo root; its stdout and stderr, after asserting it succeeded."""
    result = subprocess.run(command, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def losses(output: str) -> tuple[float, float]:
    """(first, last) eval loss from the one result line an example prints on rank 0."""
    found = RESULT.findall(output)
    assert len(found) == 1, output[-4000:]
    first, last, steps = found[0]
    assert steps == STEPS
    return float(first), float(last)


@pytest.fixture(scope="module")
def single_process() -> tuple[float, float]:
    """The plain single-process example's (first, last) eval loss: what every sharded run must reproduce."""
    output = run(sys.executable, "examples/plain.py", "--steps", STEPS)
    assert "SmallBatchWarning" not in output
    return losses(output)


def assert_same_training(output: str, single_process: tuple[float, float]) -> None:
    assert "SmallBatchWarning" not in output  # global batch 64: the guard is quiet
    assert "on 2 ranks" in output
    first, last = losses(output)
    assert first == pytest.approx(single_process[0], abs=1e-5)  # the same initial model
    assert last == pytest.approx(single_process[1], abs=2e-4)  # the same training, up to reduction order


@pytest.mark.slow
def test_plain_example_learns_and_the_guard_speaks_below_64(single_process: tuple[float, float]) -> None:
    first, last = single_process
    assert last < first - 0.02
    output = run(sys.executable, "examples/plain.py", "--steps", "1", "--batch-size", "32")
    assert "SmallBatchWarning: lion_dist.Lion: the effective batch is 32" in output


@pytest.mark.slow
@pytest.mark.parametrize(
    "example", [["examples/fsdp2.py"], ["examples/fsdp1.py", "--grad-accum", "2"]], ids=["fsdp2", "fsdp1"]
)
def test_torchrun_single_node(example: list[str], single_process: tuple[float, float]) -> None:
    output = run("launch/torchrun_single_node.sh", *example, "--steps", STEPS)
    assert_same_training(output, single_process)


@pytest.mark.slow
def test_two_level_distributed_lion_example_learns(single_process: tuple[float, float]) -> None:
    """`examples/fsdp2.py --replicate 2 --distributed-lion`: the replicas vote instead of all-reducing, so the run is
    not the single-process one, but it starts from the same model, learns about as much and is quiet."""
    output = run(
        "launch/torchrun_single_node.sh",
        "examples/fsdp2.py",
        "--steps",
        STEPS,
        "--replicate",
        "2",
        "--distributed-lion",
    )
    assert "SmallBatchWarning" not in output and "on 2 ranks" in output
    first, last = losses(output)
    assert first == pytest.approx(single_process[0], abs=1e-5)
    assert last < first - 0.5 * (single_process[0] - single_process[1]), (first, last, single_process)


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(single_process: tuple[float, float]) -> None:
    """Two launchers, one per "node", one c10d rendezvous: HSDP (2 replicas x 1 shard) with CPU offload."""
    command = ["launch/torchrun_multi_node.sh", "examples/fsdp2.py", "--steps", STEPS, "--cpu-offload"]
    command += ["--replicate", "2"]
    nodes = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    launchers = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env(**nodes, NODE_RANK=str(node), RDZV_ID=f"test-{os.getpid()}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=300)[0])
    finally:
        for launcher in launchers:
            launcher.kill()
    for launcher, output in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, output[-4000:]
    assert_same_training("\n".join(outputs), single_process)


@pytest.mark.slow
def test_deepspeed_launcher_zero3_offload(single_process: tuple[float, float]) -> None:
    output = run(
        "launch/deepspeed.sh",
        "launch/ds_zero3_offload.json",
        "examples/deepspeed_json.py",
        "--steps",
        STEPS,
        MASTER_PORT=str(free_port()),
        timeout=400,
    )
    assert_same_training(output, single_process)


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        (["launch/torchrun_single_node.sh"], {}, "usage: launch/torchrun_single_node.sh SCRIPT.py"),
        (["launch/torchrun_multi_node.sh", "examples/fsdp2.py"], {}, "set NNODES, the number of nodes"),
        (["launch/torchrun_multi_node.sh", "x.py"], {"NNODES": "2"}, "set NODE_RANK, the index of this node"),
        (["launch/deepspeed.sh", "launch/ds_zero2.json"], {}, "usage: launch/deepspeed.sh CONFIG.json SCRIPT.py"),
        (["launch/deepspeed.sh", "nope.json", "x.py"], {}, "DeepSpeed config nope.json does not exist"),
    ],
)
def test_launch_scripts_explain_bad_usage(command: list[str], extra: dict, message: str) -> None:
    clean = {key: value for key, value in env(**extra).items() if key not in ("NNODES", "NODE_RANK", "MASTER_ADDR")}
    result = subprocess.run(command, cwd=ROOT, env={**clean, **extra}, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
