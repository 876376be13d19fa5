"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP) that a crash can never leave half-valid.

Each checkpoint is its own directory, `<root>/step_<step>`. Every rank writes its shards there; only after all
of them finished (a barrier) does rank 0 write the marker `complete.json`, atomically (write to a temporary
file, fsync, `os.replace`). A directory without the marker is a partial write, from a crash or a kill, and is
never loaded: `latest_complete` skips it and the next save at that step replaces it. Deleting a checkpoint
removes its marker first, for the same reason.

Model and optimizer go through `torch.distributed.checkpoint.state_dict.get_state_dict` / `set_state_dict`, so a
checkpoint saved on N ranks loads on any number of ranks (DCP reshards; Lion's momentum is a DTensor like its
param). Anything else the caller needs (step, data position, config) rides in the marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives under `root`."""
    return Path(root) / f"step_{step:08d}"


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either no file or the whole file, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker's contents if the checkpoint at `path` is complete, else None."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("step"), int) else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = ((_STEP_DIR.match(p.name), p) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def latest_complete(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (partial ones are skipped), or None."""
    complete = [p for _, p in _step_dirs(Path(root)) if read_marker(p) is not None]
    return complete[-1] if complete else None


def _remove(path: Path) -> None:
    (path / MARKER).unlink(missing_ok=True)  # first, so that a crash mid-delete leaves a partial, ignored dir
    shutil.rmtree(path, ignore_errors=True)


def save(
    root: str | os.PathLike, step: int, model: nn.Module, optimizer: Optimizer, meta: dict[str, Any] | None = None
) -> Path:
    """Save model and optimizer shards of `step` and mark the checkpoint complete once every rank is done.

    Call on every rank. `meta` (JSON-serialisable) is stored in the marker and returned by `load`.
    """
    path = checkpoint_dir(root, step)
    if _rank() == 0:
        if path.exists():
            _remove(path)  # a partial write of this step, or an older save of it
        path.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    _barrier()  # every rank has written its shards
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        marker = {"step": step, "world_size": world, "saved_at": time.time(), "meta": meta or {}}
        _write_atomically(path / MARKER, json.dumps(marker, indent=1))
    _barrier()
    return path


def load(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """Load a complete checkpoint into `model` and `optimizer` (any world size); return its marker.

    Call on every rank. A partial checkpoint raises instead of loading.
    """
    marker = read_marker(path)
    if marker is None:
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete checkpoint (no valid {MARKER}: its save was interrupted); "
            f"use latest_complete(root) to find the newest complete one"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return marker


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and partial ones older than the newest complete.

    Call on one rank (rank 0) after a save. Returns the deleted paths.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    dirs = _step_dirs(Path(root))
    complete = [(s, p) for s, p in dirs if read_marker(p) is not None]
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep]] + [p for s, p in dirs if s < newest and read_marker(p) is None]
    for path in doomed:
        _remove(path)
    return doomed
