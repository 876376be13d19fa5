"""Run a function on N worker processes on this machine and collect what each returns.

`spawn(fn, world_size, *args)` starts `world_size` fresh processes (start method "spawn"), initialises the
default process group with gloo (or `backend="nccl"`, one GPU per rank) on a free port, calls
`fn(rank, world_size, *args)` and returns the list of results by rank. A worker's exception fails the caller
with the worker's traceback. `fn` must be a module-level function (it is pickled by name).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple, env: dict, backend: str
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # two cores: one thread per rank keeps the ranks from starving each other
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done and saved: leave without interpreter finalization. Meshes the function built keep gloo groups (and their
    # worker threads) alive to the end, and a worker thread ended by finalization aborts the process ("terminate
    # called without an active exception", issue 14; the job itself frees them: `loop.close_process_groups`).
    os._exit(0)


def spawn(
    fn: Callable, world_size: int, *args: Any, timeout: float = 300, env: dict | None = None, backend: str = "gloo"
) -> list[Any]:
    """`[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]`, each on its own process."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), out_dir, args, env or {}, backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} workers did not finish in {timeout} s")
        except BaseException:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
