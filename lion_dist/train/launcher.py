"""Starting the main job's workers in this process with torchrun's API, and naming the machine they ran on.

Shared by `lion-dist train`, `compare` and `sweep` (cli.py, sweep.py).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from typing import Any

from lion_dist.train.config import TrainConfig


def to_argv(cfg: TrainConfig) -> list[str]:
    """The train flags that reproduce `cfg` (None values are left to their defaults)."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def launch(cfg: TrainConfig, nproc: int) -> int:
    """Run the job on `nproc` local workers with torchrun (in this process); returns 0 or 1 when a worker failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # share the cores, don't oversubscribe
    torchrun = ["--standalone", f"--nproc-per-node={nproc}", "--module", "lion_dist.train", *to_argv(cfg)]
    resume_hint = "rerun with the same flags plus --resume to continue from the last complete checkpoint"
    try:
        run(get_args_parser().parse_args(torchrun))
    except ChildFailedError as error:  # the workers printed their tracebacks; say which failed and how
        print(f"{error.format_msg()}\nlion-dist: a worker failed; {resume_hint}", file=sys.stderr, flush=True)
        return 1
    except SignalException as error:  # Ctrl-C or a kill: torchrun has stopped the workers
        print(f"\nlion-dist: stopped by {error.sigval.name}; {resume_hint}", file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    return 0


def machine_description(summary: dict[str, Any], nproc: int) -> str:
    import torch

    if summary["device"] == "cuda":
        where = f"{nproc} x {torch.cuda.get_device_name(0)}"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        where = f"{nproc} CPU workers on {cores} cores ({platform.machine()})"
    return f"{where}, torch {torch.__version__}, Python {platform.python_version()}"
