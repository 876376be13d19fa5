"""Distributed Lion's communication: bytes each worker sends per step, and step time, against DDP + plain Lion.

    python benchmarks/comm.py             # the main job's GPT and data (default shape), gloo on CPU, 2 and 4 workers
    python benchmarks/comm.py --smoke     # a tiny GPT on this file's text, 2 workers, 3 steps: checks that it runs

Both runs train the same model, in lockstep, on the same per-rank batches of the main job's character data (its default
corpus, `lion_dist.train.data`), one process per rank (tests/distributed.py), with the job's Lion settings:
"plain" is DDP (fp32 gradient all-reduce) + lion_dist.Lion, "distributed" is `distributed_lion.setup(ddp)`
(majority vote). After the last step rank 0 reports each run's validation loss on fixed held-out sequences.

Bytes are counted from the collectives each run actually issues during the timed steps: every
`torch.distributed` all-reduce and all-gather, which includes DDP's buckets (the plain run registers DDP's
default `allreduce_hook`, which reduces through `dist.all_reduce`), the sign exchange, and the 4-byte
non-finite flag that both runs all-reduce. Each payload is converted into
the bytes one worker sends with a ring algorithm (`distributed_lion.ring_bytes_sent`: an all-gather forwards N - 1
chunks, an all-reduce sends 2 (N - 1) / N of the buffer). Times are medians over the timed steps; "collective
only" times a bare fp32 all-reduce of every gradient against a bare all-gather of the packed bits. (step() alone
is not compared: Distributed Lion's first collective is in step(), so its step() absorbs the ranks' skew.)
"""

# No `from __future__ import annotations`: DDP checks a comm hook's annotations against the real types.
import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lion_dist import Lion, distributed_lion
from lion_dist.distributed_lion import choose_transport, ring_bytes_sent, vote_bytes_sent
from lion_dist.train.config import OPTIMIZER_DEFAULTS, GPTConfig
from lion_dist.train.data import eval_batches, load_corpus, train_batches
from lion_dist.train.model import GPT
from tests.distributed import spawn

LR, WD = OPTIMIZER_DEFAULTS["lion"].lr, OPTIMIZER_DEFAULTS["lion"].weight_decay  # the job's Lion defaults


class CollectiveCounter:
    """Records (collective, payload bytes) of every all-reduce / all-gather issued while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, int]] = []
        for name, collective in (
            ("all_reduce", "all_reduce"),
            ("all_gather_single", "all_gather"),
            ("all_gather_into_tensor", "all_gather"),
        ):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), collective, name == "all_reduce"))

    def _wrap(self, fn: Any, collective: str, input_first: bool) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if input_first else args[1]  # all_gather_*(output, input)
            self.record(collective, tensor.numel() * tensor.element_size())
            return fn(*args, **kwargs)

        return counted

    def record(self, collective: str, payload: int) -> None:
        if self.active:
            self.calls.append((collective, payload))


def val_loss(model: torch.nn.Module, val: torch.Tensor, seq_len: int) -> float:
    """Mean next-character loss on 64 fixed, evenly spaced validation sequences."""
    losses = []
    with torch.no_grad():
        for x, y, _ in eval_batches(val, n_seqs=64, seq_len=seq_len, micro_batch=64, rank=0, world=1):
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    return torch.stack(losses).mean().item()


def run(rank: int, world: int, config: GPTConfig, args: argparse.Namespace, corpus: Any) -> dict[str, Any]:
    """Both runs step in lockstep (plain, then distributed, each step), so that load on the machine hits both."""
    counter = CollectiveCounter()
    torch.manual_seed(0)
    model = GPT(config)
    numel = sum(p.numel() for p in model.parameters())
    kwargs = {"lr": LR, "weight_decay": WD, "batch_size_policy": "ignore"}
    plain, ours = DDP(copy.deepcopy(model)), DDP(copy.deepcopy(model))
    plain.register_comm_hook(None, allreduce_hook)  # DDP's default reduction, through dist.all_reduce
    runs = {
        "plain": (plain, Lion(plain.parameters(), **kwargs)),
        "distributed": (ours, distributed_lion.setup(ours, **kwargs)),
    }
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    calls: dict[str, list[tuple[str, int]]] = {mode: [] for mode in runs}
    for step in range(args.warmup + args.steps):
        ((x, y),) = train_batches(
            corpus.train,
            step=step,
            seed=0,
            seq_len=config.seq_len,
            micro_batch=args.micro_batch,
            grad_accum=1,
            rank=rank,
            world=world,
        )
        for mode, (ddp, opt) in runs.items():
            dist.barrier()
            counter.calls, counter.active = calls[mode], step >= args.warmup
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
            end = time.perf_counter()
            if counter.active:
                times[mode].append(end - start)
            counter.active = False
    result: dict[str, Any] = {"numel": numel, "initial_loss": val_loss(model, corpus.val, config.seq_len)}
    for mode, (ddp, _) in runs.items():
        result[mode] = {
            "sent": sum(ring_bytes_sent(c, b, world) for c, b in calls[mode]) / args.steps,
            "collectives": len(calls[mode]) / args.steps,
            "iteration_s": statistics.median(times[mode]),
            "loss": val_loss(ddp.module, corpus.val, config.seq_len) if rank == 0 else None,
        }
    result["collective_only"] = collective_times(numel, world, args.steps)
    return result


def collective_times(numel: int, world: int, repeats: int) -> dict[str, float]:
    """Median seconds of a bare fp32 all-reduce of `numel` elements and of an all-gather of their packed bits."""
    grads = torch.ones(numel)
    packed = torch.ones(math.ceil(numel / 8), dtype=torch.uint8)
    gathered = packed.new_empty(world * packed.numel())
    times: dict[str, list[float]] = {"fp32_all_reduce_s": [], "bits_all_gather_s": []}
    for _ in range(repeats):
        for key, op in (
            ("fp32_all_reduce_s", lambda: dist.all_reduce(grads)),
            ("bits_all_gather_s", lambda: dist.all_gather_single(gathered, packed)),
        ):
            dist.barrier()
            start = time.perf_counter()
            op()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def report(world: int, steps: int, results: list[dict[str, Any]]) -> None:
    """Rank 0's counts and times (every rank sends the same bytes; times are per rank)."""
    r = results[0]
    n, plain, ours = r["numel"], r["plain"], r["distributed"]
    transport = choose_transport(n, world)
    print(f"\n### {world} workers, {n:,} params, transport {transport!r}")
    print("| run | bytes sent / worker / step | collectives / step | iteration (ms, median) |")
    print("|---|---:|---:|---:|")
    for name, row in (("DDP fp32 all-reduce + Lion", plain), ("Distributed Lion (vote)", ours)):
        print(f"| {name} | {row['sent']:,.0f} | {row['collectives']:.0f} | {1e3 * row['iteration_s']:.1f} |")
    fp32 = ring_bytes_sent("all_reduce", 4 * n, world)
    if plain["sent"] < fp32:
        raise RuntimeError(
            f"counted {plain['sent']} bytes for DDP, less than its {fp32} gradient bytes: counting failed"
        )
    grads_only = fp32 / vote_bytes_sent(transport, n, world)
    print(
        f"\nmeasured ratio {plain['sent'] / ours['sent']:.2f}x fewer bytes (all collectives); gradients vs votes "
        f"alone {grads_only:.2f}x; iteration time ratio {plain['iteration_s'] / ours['iteration_s']:.2f} "
        "(above 1: Distributed Lion faster)"
    )
    print(
        f"validation loss after {steps} steps (from {r['initial_loss']:.3f}): plain Lion {plain['loss']:.4f}, "
        f"Distributed Lion {ours['loss']:.4f} ({ours['loss'] - plain['loss']:+.4f})"
    )
    c = r["collective_only"]
    print(
        f"collective only: fp32 all-reduce {1e3 * c['fp32_all_reduce_s']:.2f} ms, packed-bit all-gather "
        f"{1e3 * c['bits_all_gather_s']:.2f} ms"
    )


def crossover_table(numel: int) -> None:
    print(f"\n### Bytes each worker sends per step for {numel:,} params (ring algorithms)")
    print("| workers | fp32 all-reduce | bit all-gather | int vote all-reduce | auto picks | fp32 / auto |")
    print("|---:|---:|---:|---:|---|---:|")
    for world in (2, 4, 8, 16, 32, 64, 128, 256):
        fp32 = ring_bytes_sent("all_reduce", 4 * numel, world)
        gather, reduce = vote_bytes_sent("gather", numel, world), vote_bytes_sent("reduce", numel, world)
        auto = choose_transport(numel, world)
        best = gather if auto == "gather" else reduce
        print(f"| {world} | {fp32:,} | {gather:,} | {reduce:,} | {auto} | {fp32 / best:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4", help="comma-separated worker counts (default 2,4)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run (default 100)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per worker per step (default 8)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 workers, 3 steps")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.smoke:
        corpus = load_corpus(__file__)
        config = GPTConfig(vocab_size=corpus.vocab_size, seq_len=16, n_layer=1, n_head=2, d_model=32)
        worlds, args.steps, args.warmup = [2], 3, 1
    else:
        corpus = load_corpus()  # the job's default corpus
        config = GPTConfig(vocab_size=corpus.vocab_size)  # and its default model shape
    print(f"torch {torch.__version__}, gloo on CPU, 1 thread per worker; model {config}; Lion lr {LR:.3g}, wd {WD:g}")
    print(f"data: {corpus.source}; micro batch {args.micro_batch} per worker")
    for world in worlds:
        results = spawn(run, world, config, args, corpus, timeout=3600)
        report(world, args.warmup + args.steps, results)
    crossover_table(results[0]["numel"])


if __name__ == "__main__":
    main()
