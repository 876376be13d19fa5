"""The main job's layouts on 2 gloo workers on loopback: FSDP2 (`--replicate 1`), HSDP (`--replicate 2`), DDP
(`--ddp`) and two-level Distributed Lion (`--distributed-lion --replicate 2`), with the bytes each rank sends per
step as counted from the collectives, and the clear errors for a layout that does not fit.

With 2 workers HSDP is 2 replicas of 1 shard: the same training as FSDP2 over both ranks and as DDP (every
replica averages the same two gradients), which the runs below check on the losses and on a hash of the params.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lion_dist import checkpoint
from lion_dist.train import cli
from lion_dist.train.config import Layout, TrainConfig, layout
from tests.test_train import TINY, losses, run_cli

pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny run per layout flag (TINY: 12 steps, global batch 16) on 2 workers."""
    root = tmp_path_factory.mktemp("layouts")
    flags = {
        "fsdp": ["--replicate", "1"],
        "hsdp": ["--replicate", "2"],
        "ddp": ["--ddp"],
        "dlion": ["--distributed-lion", "--replicate", "2"],
    }
    for name, extra in flags.items():
        run_cli("train", "--out", str(root / name), *TINY, *extra)
    return {name: root / name for name in flags}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_hsdp_with_one_shard_equals_fsdp2_and_ddp(runs) -> None:
    """`--replicate 1` is FSDP2 over both ranks; `--replicate 2` and `--ddp` train the same model bit for bit."""
    fsdp, hsdp, ddp = (summary(runs[name]) for name in ("fsdp", "hsdp", "ddp"))
    assert fsdp["layout"]["mode"] == "fsdp" and (fsdp["layout"]["replicas"], fsdp["layout"]["shards"]) == (1, 2)
    assert (hsdp["layout"]["mode"], hsdp["layout"]["replicas"], hsdp["layout"]["shards"]) == ("hsdp", 2, 1)
    assert (ddp["layout"]["mode"], ddp["layout"]["replicas"]) == ("ddp", 2)
    assert losses(runs["hsdp"]) == losses(runs["fsdp"]) == losses(runs["ddp"])
    assert hsdp["global_batch"] == ddp["global_batch"] == fsdp["global_batch"] == 4 * 2 * 2
    # every replica ends with the same params, and HSDP's equal DDP's (each hashes the whole model, in order)
    assert hsdp["layout"]["replicas_identical"] and ddp["layout"]["replicas_identical"]
    assert hsdp["layout"]["param_sha256_per_rank"] == ddp["layout"]["param_sha256_per_rank"]
    assert len(set(hsdp["layout"]["param_sha256_per_rank"])) == 1


def test_bytes_sent_per_step_counted_from_the_collectives(runs) -> None:
    """HSDP (2 x 1) and DDP all-reduce every fp32 gradient once per step: a ring on 2 ranks sends 4 n bytes per
    rank. FSDP2 also all-gathers the params for each forward and backward, and gloo's reduce-scatter sends an
    all-reduce's bytes, so it sends more. One node: nothing goes to another node."""
    n = summary(runs["hsdp"])["n_params"]
    for name in ("hsdp", "ddp"):
        comm = summary(runs[name])["comm"]
        assert comm["bytes_sent_per_rank_per_step"] == [4 * n, 4 * n], name
        assert comm["steps"] == STEPS and comm["nodes"] == 1 and comm["node_of_rank"] == [0, 0]
        assert comm["link_bytes_sent_per_rank_per_step"] == [0, 0]
        assert comm["link_tx_bytes_per_node_per_step"] is None  # no --link-iface
    fsdp = summary(runs["fsdp"])["comm"]
    assert min(fsdp["bytes_sent_per_rank_per_step"]) > 2 * 4 * n
    train = [r for r in map(json.loads, (runs["hsdp"] / "metrics.jsonl").read_text().splitlines())]
    assert {r["bytes_sent_per_step"] for r in train if r["kind"] == "train"} == {4 * n}


def test_two_level_distributed_lion(runs, tmp_path: Path) -> None:
    """`--distributed-lion --replicate 2` on 2 workers: 2 replicas of one rank that vote with 1 bit per param
    (32x fewer bytes than HSDP's fp32 all-reduce), the loss falls, the replicas end identical, and its
    checkpoint cannot be resumed as HSDP (a clear error)."""
    s = summary(runs["dlion"])
    n = s["n_params"]
    assert (s["layout"]["mode"], s["layout"]["replicas"], s["layout"]["shards"]) == ("distributed-lion", 2, 1)
    assert s["comm"]["bytes_sent_per_rank_per_step"] == [math.ceil(n / 8)] * 2
    assert summary(runs["hsdp"])["comm"]["bytes_sent_per_rank_per_step"][0] / math.ceil(n / 8) == pytest.approx(
        32, 1e-3
    )
    assert s["distributed_lion"]["bytes_sent_per_worker_per_step"] == math.ceil(n / 8)
    assert s["layout"]["replicas_identical"] and len(set(s["layout"]["param_sha256_per_rank"])) == 1
    val = losses(runs["dlion"])[1]
    assert val[STEPS] < val[0] - 0.3, f"validation loss did not fall: {val}"
    marker = checkpoint.read_marker(checkpoint.checkpoint_dir(runs["dlion"] / "checkpoints", STEPS))
    assert marker["meta"]["layout"] == ["distributed-lion", 2] and marker["meta"]["replicas"] == 2

    resumed = tmp_path / "as-hsdp"
    shutil.copytree(runs["dlion"] / "checkpoints", resumed / "checkpoints")
    refused = run_cli("train", "--out", str(resumed), *TINY, "--replicate", "2", "--resume", check=False)
    assert refused.returncode != 0
    assert (
        "was saved with layout Distributed Lion with 2 replicas (--distributed-lion --replicate 2), this run has "
        "HSDP with 2 replicas (--replicate 2)" in refused.stderr
    )


def test_layout_defaults() -> None:
    """--replicate defaults to the world size with --distributed-lion, else 1 (FSDP2 over all ranks)."""
    assert layout(TrainConfig(), 4) == Layout("fsdp", 1, 4)
    assert layout(TrainConfig(replicate=2), 4) == Layout("hsdp", 2, 2)
    assert layout(TrainConfig(distributed_lion=True), 4) == Layout("distributed-lion", 4, 1)
    assert layout(TrainConfig(distributed_lion=True, replicate=2), 4) == Layout("distributed-lion", 2, 2)
    assert layout(TrainConfig(ddp=True), 4) == Layout("ddp", 4, 1)
    assert (
        "two-level Distributed Lion: 2 replicas (FSDP2 over 2 ranks each)" in Layout("distributed-lion", 2, 2).words()
    )
    with pytest.raises(ValueError, match=r"--replicate 3 does not divide the 4 ranks.*one of 1, 2, 4"):
        layout(TrainConfig(replicate=3), 4)


def test_bad_layout_gets_a_clear_error(capsys, tmp_path: Path) -> None:
    """Refused before any worker starts, naming the values and the fix."""
    out = ["--out", str(tmp_path / "never")]
    cases = [
        (["--replicate", "3"], "--replicate 3 does not divide the 2 ranks: each replica is world / N ranks, so pass "
         "one of 1, 2"),
        (["--replicate", "0"], "--replicate must be a positive number of replicas, got 0"),
        (["--ddp", "--replicate", "2"], "--ddp makes every rank a whole replica"),
        (["--ddp", "--distributed-lion"], "leave out --distributed-lion"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *out, "--device", "cpu", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "never").exists()
