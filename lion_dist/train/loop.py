"""The training job that runs on every rank: an FSDP2-sharded GPT trained with Lion or AdamW.

Everything a step does is a pure function of (seed, step): the batch, the learning rate. So a checkpoint only
needs model, optimizer and the step, and a resumed or repeated run on the same world size is bit-identical to
an uninterrupted one.

The layout (`config.layout`): FSDP2 over all ranks (default); `--replicate N`: a (N, world / N) ("replicate",
"shard") mesh, FSDP2's HSDP (reduce-scatter inside a replica, all-reduce across replicas); `--ddp`: every rank a
whole replica (DistributedDataParallel). `--distributed-lion` shards each replica with FSDP2 on its own
`mesh["shard"]` (so FSDP2 reduces nothing across replicas and each replica keeps its own gradient), and
`distributed_lion.DistributedLion` exchanges the replicas' 1-bit signs of each rank's local shard over the
"replicate" group; `--replicate` defaults to the world size there (every rank a whole replica). Params stay
identical, momenta differ, so its checkpoints keep every replica's momentum (`DistributedLion`'s state dict
stacks them) and resume on the same layout only. Every step counts the bytes each rank sends in collectives, and
those to other nodes (`comm.py`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from tqdm import tqdm

from lion_dist import checkpoint, layouts
from lion_dist.distributed_lion import (
    OVERLAP_BUCKET,
    DistributedLion,
    choose_transport,
    ring_bytes_sent,
    vote_bytes_sent,
)
from lion_dist.train.comm import CollectiveCounter, LinkCounter, node_of_ranks
from lion_dist.train.config import (
    GPTConfig,
    Layout,
    TrainConfig,
    check_out_dir,
    layout,
    resolve_hyperparams,
    validate,
)
from lion_dist.train.data import Corpus, eval_batches, load_corpus, train_batches
from lion_dist.train.model import GPT
from lion_dist.train.optimizers import OPTIMIZERS, lr_at, param_groups
from lion_dist.train.plot import plot_runs, read_metrics
from lion_dist.train.report import exchange_words, format_summary


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Run:
    """One invocation of the job on one rank: model, optimizer, data and the output directory."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = _device(cfg)
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.lr, self.wd, self.betas, self.hparam_note = resolve_hyperparams(cfg)
        self.aggregate = (cfg.aggregate or "vote") if cfg.distributed_lion else None
        self.name = f"distributed lion ({self.aggregate})" if cfg.distributed_lion else cfg.optimizer
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * self.world
        self.corpus: Corpus = load_corpus(cfg.data, min_len=cfg.seq_len + 1)
        self.model_cfg = GPTConfig(
            vocab_size=self.corpus.vocab_size,
            seq_len=cfg.seq_len,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_model=cfg.d_model,
        )
        torch.manual_seed(cfg.seed)  # every rank builds the same initial model; fully_shard keeps its shard
        self.model: nn.Module = GPT(self.model_cfg).to(self.device, getattr(torch, cfg.param_dtype))
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.layout: Layout = layout(cfg, self.world)
        self.mesh = self._distribute()  # run_worker frees its process groups at the end (`close_process_groups`)
        self.counter = CollectiveCounter(node_of_ranks())
        self.link = LinkCounter(cfg.link_iface) if cfg.link_iface else None
        groups = param_groups(self.model, self.wd)
        if cfg.distributed_lion:
            self.optimizer: Optimizer = DistributedLion(
                groups,
                process_group=self.mesh.get_group("replicate"),
                # votes start as FSDP2 finishes each unit's gradients, unless clipping must see them all first
                overlap_bucket_elements=None if cfg.grad_clip else OVERLAP_BUCKET,
                lr=self.lr,
                betas=self.betas,
                weight_decay=self.wd,
                aggregate=self.aggregate,
                global_batch_size=self.global_batch,  # the vote is over every replica's batch
            )
        else:
            self.optimizer = OPTIMIZERS[cfg.optimizer].build(groups, self.lr, self.wd, self.betas, cfg)

    def _distribute(self) -> DeviceMesh | None:
        """Wrap the model for the layout (module doc); returns the device mesh, None for DDP."""
        lay = self.layout
        if lay.mode == "ddp":
            self.model = DistributedDataParallel(self.model, broadcast_buffers=False)
            self.model.register_comm_hook(None, allreduce_hook)  # through dist.all_reduce: the counter sees it
            return None
        if lay.mode == "fsdp":
            mesh = shard_mesh = init_device_mesh(self.device.type, (self.world,))
        else:
            mesh = init_device_mesh(self.device.type, (lay.replicas, lay.shards), mesh_dim_names=("replicate", "shard"))
            shard_mesh = mesh["shard"] if lay.mode == "distributed-lion" else mesh  # 2-D: FSDP2's HSDP
        for block in self.model.blocks:
            fully_shard(block, mesh=shard_mesh)
        fully_shard(self.model, mesh=shard_mesh)
        return mesh

    # ---------------------------------------------------------------- output

    def print(self, *args: Any) -> None:
        if self.rank == 0:
            tqdm.write(" ".join(str(a) for a in args))

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def meta(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed by this run."""
        return {
            "model": self.model_cfg.to_dict(),
            "optimizer": self.cfg.optimizer,
            "data": self.corpus.source,
            "seed": self.cfg.seed,
            "param_dtype": self.cfg.param_dtype,
            "global_batch": self.global_batch,
            "replicas": self.layout.replicas if self.cfg.distributed_lion else None,  # momenta per param
            "layout": _layout_key(self.layout.mode, self.layout.replicas),
        }

    # ---------------------------------------------------------------- start

    def start(self) -> tuple[int, tuple[int, float] | None]:
        """Prepare --out and load the newest complete checkpoint when resuming: (start step, last eval)."""
        check_out_dir(self.cfg)
        path: list[str | None] = [None]
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            latest = checkpoint.latest_complete(self.ckpt_root) if self.cfg.resume else None
            path[0] = None if latest is None else str(latest)
            if path[0] is None:  # a fresh start: nothing of an earlier run may remain
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
                for name in ("metrics.jsonl", "summary.json", "loss.png"):
                    (self.out / name).unlink(missing_ok=True)
        dist.broadcast_object_list(path, src=0)  # one decision for all ranks
        if path[0] is None:
            if self.cfg.resume:
                self.print(f"--resume: no complete checkpoint in {self.ckpt_root}; starting from step 0")
            self.log({"kind": "config", **asdict(self.cfg), "world_size": self.world, "n_params": self.n_params})
            return 0, None
        saved = checkpoint.read_marker(path[0])
        if saved is not None:  # checked before loading: a checkpoint of another model or mode does not load
            self._check_resumable(saved["meta"], path[0])
        marker = checkpoint.load(path[0], self.model, self.optimizer)
        step = marker["step"]
        self.print(f"resumed from {path[0]} (step {step}, saved on {marker['world_size']} ranks)")
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", step)
        self.log({"kind": "resume", "step": step, "checkpoint": path[0], "world_size": self.world})
        last_eval = marker["meta"].get("val")
        return step, (tuple(last_eval) if last_eval else None)

    def _check_resumable(self, saved: dict[str, Any], path: str) -> None:
        mine = self.meta()
        for key in ("model", "optimizer"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"checkpoint {path} was saved with {key} {saved.get(key)!r}, this run has {mine[key]!r}: "
                    f"pass the same flags as the run that saved it, or start over with --overwrite"
                )
        # checkpoints from before --replicate have no "layout": FSDP2, or Distributed Lion on `replicas` ranks
        old = ["distributed-lion", saved["replicas"]] if saved.get("replicas") else ["fsdp", None]
        theirs = saved.get("layout", old)
        if theirs != mine["layout"]:
            why = (
                "a Distributed Lion checkpoint holds one momentum per replica, so "
                if "distributed-lion" in (theirs[0], mine["layout"][0])
                else ""
            )
            raise ValueError(
                f"checkpoint {path} was saved with layout {_layout_flags(*theirs)}, this run has "
                f"{_layout_flags(*mine['layout'])}: {why}resume it with the same --replicate / --distributed-lion / "
                "--ddp flags and number of workers, or start over with --overwrite"
            )
        changed = [k for k in ("data", "seed", "global_batch") if saved.get(k) != mine[k]]
        if changed:
            self.print(
                f"note: {', '.join(changed)} changed since the checkpoint; batches differ from an uninterrupted run"
            )

    # ---------------------------------------------------------------- steps

    def train_step(self, step: int, lr: float) -> torch.Tensor:
        """One optimizer step over the rank's micro batches; returns the summed local micro-batch losses."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        cfg = self.cfg
        batches = train_batches(
            self.corpus.train,
            step=step,
            seed=cfg.seed,
            seq_len=cfg.seq_len,
            micro_batch=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
            rank=self.rank,
            world=self.world,
        )
        loss_sum = torch.zeros((), device=self.device)
        with self.counter.counting():
            for i, (x, y) in enumerate(batches):
                with self._gradient_sync(i == len(batches) - 1):  # reduce once per step
                    logits = self.model(x.to(self.device))
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten())
                    (loss / len(batches)).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _gradient_sync(self, sync: bool) -> AbstractContextManager[Any]:
        """FSDP2 and DDP's ways to skip the gradient reduction of all but the last micro batch."""
        if isinstance(self.model, DistributedDataParallel):
            return nullcontext() if sync else self.model.no_sync()
        self.model.set_requires_gradient_sync(sync)
        return nullcontext()

    def _link_tx(self) -> int | None:
        """This node's link tx counter once every rank got here (None without --link-iface)."""
        if self.link is None:
            return None
        dist.barrier()
        return self.link.read()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation sequences (all ranks together)."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y, w in eval_batches(
            self.corpus.val,
            n_seqs=self.cfg.eval_seqs,
            seq_len=self.cfg.seq_len,
            micro_batch=self.cfg.micro_batch_size,
            rank=self.rank,
            world=self.world,
        ):
            logits = self.model(x.to(self.device))
            per_seq = F.cross_entropy(logits.float().transpose(1, 2), y.to(self.device), reduction="none").mean(dim=1)
            totals[0] += (per_seq.double() * w.to(self.device)).sum()
            totals[1] += w.sum()
        dist.all_reduce(totals)
        self.model.train()
        return (totals[0] / totals[1]).item()

    def samples(self) -> list[tuple[str, str]]:
        """(prompt, continuation) pairs sampled on rank 0 from an unsharded copy; [] on other ranks."""
        cfg = self.cfg
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0 or not cfg.samples:
            return []
        model = GPT(self.model_cfg)
        model.load_state_dict(full)
        model.eval()
        val = self.corpus.val
        prompt_len = min(32, cfg.seq_len, len(val))
        starts = [i * (len(val) - prompt_len) // cfg.samples for i in range(cfg.samples)]
        prompts = torch.stack([val[s : s + prompt_len].long() for s in starts])
        out = model.generate(prompts, cfg.sample_chars, generator=torch.Generator().manual_seed(cfg.seed))
        return [(self.corpus.decode(p), self.corpus.decode(o[prompt_len:])) for p, o in zip(prompts, out, strict=True)]

    # ---------------------------------------------------------------- the run

    def run(self) -> dict[str, Any] | None:
        cfg = self.cfg
        self.print(self.hparam_note)
        start, last_eval = self.start()
        stop = cfg.stop_at or cfg.steps
        tokens_per_step = self.global_batch * cfg.seq_len
        self.print(
            f"{self.n_params:,} params on {self.world} rank{'s' if self.world > 1 else ''} ({self.device.type}, "
            f"{self.layout.words()}), global batch "
            f"{cfg.micro_batch_size} x {cfg.grad_accum} x {self.world} = {self.global_batch} sequences of "
            f"{cfg.seq_len} chars, data: {self.corpus.source} ({len(self.corpus.train):,} train / "
            f"{len(self.corpus.val):,} val chars, vocab {self.corpus.vocab_size})"
        )
        if cfg.distributed_lion:
            self.print(exchange_words(self.exchange()))
        if start == 0:
            last_eval = (0, self.evaluate())
            self.log({"kind": "val", "step": 0, "val_loss": last_eval[1]})
        bar = tqdm(total=stop, initial=start, disable=self.rank != 0, desc=self.name, dynamic_ncols=True)
        train_time, interval_loss, interval_steps = 0.0, torch.zeros((), device=self.device), 0
        counted = self.counter.totals()
        link_tx = [self._link_tx(), None]  # the link's counter around the training steps
        interval_start = time.perf_counter()
        for step in range(start + 1, stop + 1):
            lr = lr_at(step, self.lr, cfg)
            interval_loss += self.train_step(step, lr)
            interval_steps += 1
            bar.update()
            if step % cfg.log_interval == 0 or step == stop:
                dist.all_reduce(interval_loss)
                loss = interval_loss.item() / (interval_steps * cfg.grad_accum * self.world)
                elapsed = time.perf_counter() - interval_start
                train_time += elapsed
                tokens_per_s = interval_steps * tokens_per_step / elapsed
                now = self.counter.totals()
                sent, link = ((now[i] - counted[i]) / interval_steps for i in (0, 1))
                counted = now
                self.log(
                    {
                        "kind": "train",
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "tokens_per_s": tokens_per_s,
                        "bytes_sent_per_step": sent,  # rank 0's, in collectives (comm.py)
                        "link_bytes_sent_per_step": link,  # of them, to other nodes
                    }
                )
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}", sent=f"{sent:,.0f}")
                interval_loss.zero_()
                interval_steps = 0
                interval_start = time.perf_counter()
            if step == stop:
                link_tx[1] = self._link_tx()
            paused = time.perf_counter()  # evaluation and checkpoints do not count towards tokens/s
            if step % cfg.eval_interval == 0 or step == stop:
                last_eval = (step, self.evaluate())
                self.log({"kind": "val", "step": step, "val_loss": last_eval[1]})
                self.print(f"step {step}: val loss {last_eval[1]:.4f}")
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == stop:
                meta = {**self.meta(), "val": list(last_eval) if last_eval and last_eval[0] == step else None}
                checkpoint.save(self.ckpt_root, step, self.model, self.optimizer, meta)
                if self.rank == 0:
                    checkpoint.prune(self.ckpt_root, cfg.keep_checkpoints)
            interval_start += time.perf_counter() - paused
        bar.close()
        if last_eval is None or last_eval[0] != stop:  # resumed at the end: nothing trained, evaluate once
            last_eval = (stop, self.evaluate())
        tx = None if None in link_tx else link_tx[1] - link_tx[0]
        return self.finish(start, stop, train_time, last_eval[1], tx)

    def finish(
        self, start: int, stop: int, train_time: float, val_loss: float, link_tx: int | None
    ) -> dict[str, Any] | None:
        """Plot, summarise and sample on rank 0; returns the summary there (None elsewhere)."""
        cfg = self.cfg
        per_rank: list[Any] = [None] * self.world
        local = (
            OPTIMIZERS[cfg.optimizer].state_bytes(self.optimizer),
            _peak_memory_bytes(self.device),
            self.param_digest() if self.layout.replicas > 1 else None,
            self.counter.totals(),
            link_tx,
        )
        dist.all_gather_object(per_rank, local)
        samples = self.samples() if stop == cfg.steps else []
        if self.rank != 0:
            return None
        records = read_metrics(self.out / "metrics.jsonl")
        plot_runs({self.name: records}, self.out / "loss.png", title=f"{self.name}: loss")
        trained = stop - start
        summary = {
            "optimizer": cfg.optimizer,
            "lr": self.lr,
            "weight_decay": self.wd,
            "betas": list(self.betas),
            "step": stop,
            "steps": cfg.steps,
            "final_val_loss": val_loss,
            "final_train_loss": next((r["loss"] for r in reversed(records) if r["kind"] == "train"), None),
            "tokens_per_s": trained * self.global_batch * cfg.seq_len / train_time if train_time else None,
            "train_time_s": train_time,
            "optimizer_state_bytes_per_rank": [b for b, *_ in per_rank],
            "peak_memory_bytes_per_rank": [m for _, m, *_ in per_rank],
            "peak_memory_kind": "cuda max allocated" if self.device.type == "cuda" else "max RSS",
            "world_size": self.world,
            "global_batch": self.global_batch,
            "n_params": self.n_params,
            "device": self.device.type,
            "checkpoint": str(checkpoint.checkpoint_dir(self.ckpt_root, stop)),
            "layout": self.layout_summary([d for _, _, d, _, _ in per_rank]),
            "comm": self.comm_summary([(c, t) for _, _, _, c, t in per_rank], stop - start),
            "distributed_lion": {**self.exchange(), "param_sha256_per_rank": [d for _, _, d, _, _ in per_rank]}
            if cfg.distributed_lion
            else None,
            "samples": [{"prompt": p, "continuation": c} for p, c in samples],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary, self.out), flush=True)
        return summary

    def exchange(self) -> dict[str, Any]:
        """What `--distributed-lion` sends per step: one sign bit per element of this rank's shard
        (`distributed_lion.vote_bytes_sent`), against an fp32 all-reduce of the same shard across the replicas."""
        numel, replicas = sum(layouts.local(p).numel() for p in self.model.parameters()), self.layout.replicas
        transport = choose_transport(numel, replicas)
        return {
            "aggregate": self.aggregate,
            "replicas": replicas,
            "shards": self.layout.shards,
            "transport": transport,
            "bytes_sent_per_worker_per_step": vote_bytes_sent(transport, numel, replicas),
            "fp32_all_reduce_bytes_per_worker_per_step": ring_bytes_sent("all_reduce", 4 * numel, replicas),
        }

    def layout_summary(self, digests: list[str | None]) -> dict[str, Any]:
        """The layout, and whether every replica ended with the same params (a hash per rank, compared between
        the ranks that hold the same shard: rank r and r + shards)."""
        lay = self.layout
        by_shard = [{digests[r] for r in range(s, self.world, lay.shards)} for s in range(lay.shards)]
        return {
            **asdict(lay),
            "words": lay.words(),
            "param_sha256_per_rank": digests,
            "replicas_identical": all(len(found) == 1 for found in by_shard) if lay.replicas > 1 else None,
        }

    def comm_summary(self, per_rank: list[tuple[tuple[int, int, int], int | None]], steps: int) -> dict[str, Any]:
        """Bytes sent per step by each rank in collectives and to other nodes (comm.py), and per node: counted,
        and read from --link-iface's counter (the first rank of each node read it)."""
        nodes = self.counter.node_of_rank
        per_step = (lambda b: b / steps) if steps else (lambda b: None)
        link = [link for (_, link, _), _ in per_rank]
        first_rank = {node: nodes.index(node) for node in sorted(set(nodes))}
        tx = [per_rank[r][1] for r in first_rank.values()]
        return {
            "nodes": len(first_rank),
            "node_of_rank": nodes,
            "steps": steps,
            "bytes_sent_per_rank_per_step": [per_step(sent) for (sent, _, _), _ in per_rank],
            "link_bytes_sent_per_rank_per_step": [per_step(b) for b in link],
            "link_bytes_sent_per_node_per_step": [
                per_step(sum(b for b, n in zip(link, nodes, strict=True) if n == node)) for node in first_rank
            ],
            "collectives_per_step": per_step(per_rank[0][0][2]),
            "link_iface": self.cfg.link_iface,
            "link_tx_bytes_per_node_per_step": None if None in tx else [per_step(b) for b in tx],
        }

    def param_digest(self) -> str:
        """sha256 of this rank's local params, in order: the same on every replica exactly when they are identical.

        FSDP2 leaves the root's params unsharded after an evaluation's forward, so its modules reshard first (else
        ranks of one replica would hash whole params, and a numpy view of the all-gathered storage makes FSDP2's
        later free of it fail). Each shard is copied before numpy sees it, for the same reason.
        """
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        digest = hashlib.sha256()
        for p in self.model.parameters():
            digest.update(
                layouts.local(p).detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes()
            )
        return digest.hexdigest()


def _layout_key(mode: str, replicas: int) -> list[Any]:
    """What a checkpoint's layout must match: the mode, and the number of replicas where momenta depend on it."""
    return [mode, replicas if mode in ("hsdp", "distributed-lion") else None]


def _layout_flags(mode: str, replicas: int | None) -> str:
    return {
        "fsdp": "FSDP2 over all ranks (--replicate 1)",
        "hsdp": f"HSDP with {replicas} replicas (--replicate {replicas})",
        "distributed-lion": f"Distributed Lion with {replicas} replicas (--distributed-lion --replicate {replicas})",
        "ddp": "DDP (--ddp)",
    }.get(mode, repr(mode))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step`: the resumed run writes them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def run_worker(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run the job on this process: joins the torchrun group from the environment (a group of 1 without one)."""
    validate(cfg)
    device = _device(cfg)
    if "RANK" not in os.environ:  # plain `python -m lion_dist.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run = _Run(cfg)
        summary = run.run()
        dist.barrier()  # ranks leave together: none tears down its group while rank 0 still plots and samples
    except BaseException:
        # A failed run only unregisters its groups: the traceback holds the job, and a collective a failed peer
        # never joins would block a group's destructor. The run fails either way.
        dist.destroy_process_group()
        raise
    mesh, run = run.mesh, None  # the job's last strong references to its modules and optimizer
    close_process_groups(mesh)
    return summary


def close_process_groups(mesh: DeviceMesh | None = None) -> None:
    """Free the process groups (and `mesh`'s) with the interpreter intact, so that no gloo thread outlives the
    job; the DeepSpeed example calls it too.

    Issue 14: `destroy_process_group` only unregisters the groups. DTensor's sharding caches keep the job's mesh
    to the end of the process and the mesh keeps its groups (`_pg_registry`), so gloo's worker threads lived into
    interpreter finalization. A worker drops a finished work, and with the GIL its tensors' Python objects
    (`TensorImpl::decref_pyobject`), only after waking the waiting thread: the final barrier, which holds the last
    all-gather, was dropped while the main thread ran to exit. When that raced the start of finalization, Python
    ended the worker with `pthread_exit`, whose unwinding through noexcept C++ destructors calls std::terminate:
    "terminate called without an active exception", SIGABRT, after a finished run (gdb stacks, and
    `benchmarks/exit_stress.py --widen` which makes it likely: benchmarks/RESULTS.md, "Exit of the main job").
    Freed here, each ProcessGroupGloo's destructor lets its workers finish, their last decrefs included, and joins
    them; `python -m lion_dist.train` then exits normally.
    """
    gc.collect()  # FSDP's hooks and states are cycles that hold the groups
    if dist.is_initialized():
        dist.destroy_process_group()
    getattr(mesh, "_pg_registry", {}).clear()  # the mesh's own references; sub-meshes use their root's
    gc.collect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
