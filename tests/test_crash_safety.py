"""Crash safety of the main job's checkpoints (issue 7): a partial checkpoint is never loaded, and a run with a
rank killed by SIGKILL resumes from the newest complete checkpoint.

The helpers are tested on one process (DCP needs no process group); the kill runs the real `lion-dist train`
on 2 gloo workers under torchrun, whose agent tears the other rank down as it would in production.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from lion_dist import Lion, checkpoint
from tests.test_train import TINY, lion_dist_command, records, run_cli


def _model_and_optimizer(seed: int) -> tuple[nn.Module, Lion]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    optimizer = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, batch_size_policy="ignore")
    model(torch.randn(5, 8)).square().sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP on one process, on purpose
def test_partial_checkpoints_are_never_taken_for_complete(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 2, model, optimizer, {"note": "two"})
    saved = checkpoint.save(root, 4, model, optimizer, {"note": "four"})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["exp_avg"].clone() for s in optimizer.state.values()]
    # three ways a save can be cut short: shards written but no marker, a torn marker, a marker never renamed
    for step in (6, 8, 10):
        shutil.copytree(saved, checkpoint.checkpoint_dir(root, step))
    (checkpoint.checkpoint_dir(root, 6) / checkpoint.MARKER).unlink()
    marker_8 = checkpoint.checkpoint_dir(root, 8) / checkpoint.MARKER
    marker_8.write_text(marker_8.read_text()[:20])
    marker_10 = checkpoint.checkpoint_dir(root, 10) / checkpoint.MARKER
    marker_10.rename(marker_10.with_name(f".{checkpoint.MARKER}.tmp"))

    assert checkpoint.latest_complete(root) == saved
    assert checkpoint.latest_complete(tmp_path / "nothing here") is None
    for step in (6, 8, 10):
        assert checkpoint.read_marker(checkpoint.checkpoint_dir(root, step)) is None
    other_model, other_optimizer = _model_and_optimizer(1)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(checkpoint.checkpoint_dir(root, 6), other_model, other_optimizer)

    marker = checkpoint.load(saved, other_model, other_optimizer)
    assert marker["step"] == 4 and marker["meta"] == {"note": "four"} and marker["world_size"] == 1
    for name, value in other_model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for mine, theirs in zip(other_optimizer.state.values(), momentum, strict=True):
        assert torch.equal(mine["exp_avg"], theirs)

    # a new save at a partial's step replaces it; pruning keeps the newest complete ones and drops older partials
    checkpoint.save(root, 8, model, optimizer)
    assert checkpoint.latest_complete(root) == checkpoint.checkpoint_dir(root, 8)
    removed = checkpoint.prune(root, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000002", "step_00000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000008", "step_00000010"]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found += children[todo[-1]]
        todo += children.pop(todo.pop(), [])
    return found


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` under the `lion-dist` process `launcher`."""
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ):
            return pid
    raise AssertionError(f"no rank {rank} worker under pid {launcher}")


@pytest.mark.slow
def test_sigkill_on_one_rank_then_resume_continues_from_last_complete_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [*TINY, "--steps", "400", "--ckpt-interval", "2", "--log-interval", "1", "--eval-interval", "1000"]
    flags += ["--keep-checkpoints", "3"]
    launcher = subprocess.Popen(
        [*lion_dist_command(), "train", "--out", str(out), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 200
        while (latest := checkpoint.latest_complete(out / "checkpoints")) is None or latest.name < "step_00000004":
            assert launcher.poll() is None, f"the run ended before it was killed:\n{launcher.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint at step >= 4 within 200 s"
            time.sleep(0.05)
        os.kill(_worker_pid(launcher.pid, rank=1), signal.SIGKILL)
        output, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0 and "SIGKILL" in output, output[-3000:]

    last = checkpoint.read_marker(checkpoint.latest_complete(out / "checkpoints"))["step"]
    assert 4 <= last < 400
    before = {r["step"]: r["loss"] for r in records(out, "train")}

    stop = last + 4
    result = run_cli("train", "--out", str(out), *flags, "--resume", "--stop-at", str(stop))
    assert f"resumed from {checkpoint.checkpoint_dir(out / 'checkpoints', last)} (step {last}" in result.stdout
    assert [r["step"] for r in records(out, "resume")] == [last]
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, stop + 1))  # every step once: none lost, none repeated
    assert all(r["loss"] == before[r["step"]] for r in train if r["step"] <= last)
    assert checkpoint.read_marker(checkpoint.checkpoint_dir(out / "checkpoints", stop))["step"] == stop
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == stop and summary["steps"] == 400
