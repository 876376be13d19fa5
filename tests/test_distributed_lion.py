"""Distributed Lion: replicas exchange 1-bit votes, stay bit-identical, and apply the majority (or mean) of the votes.

Every multi-process check runs in one spawn of 4 gloo workers (process startup dominates on 2 cores): 4 replicas
over the default group, 2 replicas over each of the groups {0, 1} and {2, 3}, 1 replica over a group of one, and
2 replicas x 2 FSDP2 shards. Results are asserted here, in the parent, against plain-Python majorities and
`lion_dist.spec.lion_reference`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from lion_dist import Lion, SmallBatchWarning, distributed_lion
from lion_dist.distributed_lion import (
    DistributedLion,
    choose_transport,
    count_set_bits,
    pack_bits,
    ring_bytes_sent,
    vote_bytes_sent,
)
from lion_dist.spec import LionHyperparams, lion_reference
from lion_dist.train.config import GPTConfig
from lion_dist.train.model import GPT
from tests.distributed import spawn

LR = 0.05
BETAS = (0.9, 0.99)
VOTE_STEPS = 4
VOTE_SHAPES = [(5, 7), (13,), (3,)]  # 51 elements: the packed bits need padding
FROZEN = 4  # the first FROZEN elements of the first param get a zero gradient on every replica, every step
# Two groups: one plain, one with cautious weight decay (masked by the agreed update).
VOTE_GROUPS = ({"weight_decay": 0.0}, {"weight_decay": 0.2, "cautious_wd": True})
CONFIGS = [(aggregate, transport) for aggregate in ("vote", "mean") for transport in ("gather", "reduce")]

TRAIN_STEPS = 40
TRAIN_LR = 3e-3
LOSS_MARGIN = 0.1  # nats: Distributed Lion's final loss may exceed plain Lion's by at most this


# ---------------------------------------------------------------------------------------------- the model


def tiny_gpt() -> GPT:
    """The main job's GPT (`lion_dist.train.model`), two layers, small enough for four gloo workers on two cores."""
    return GPT(GPTConfig(vocab_size=16, seq_len=16, n_layer=2, n_head=2, d_model=32))


def markov_batch(seed: int, batch: int = 8, length: int = 17, vocab: int = 16) -> torch.Tensor:
    """Token sequences from a fixed Markov chain where each token has two equally likely successors (loss >= ln 2)."""
    table = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(k))[:2] for k in range(vocab)])
    gen = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(vocab, (batch,), generator=gen)]
    for _ in range(length - 1):
        tokens.append(table[tokens[-1], torch.randint(2, (batch,), generator=gen)])
    return torch.stack(tokens, dim=1)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        lm_loss(model, markov_batch(1000 * step + rank)).backward()
        opt.step()


def snapshot(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of local values (a DTensor's local shard)."""
    return [(t.to_local() if isinstance(t, DTensor) else t).detach().clone() for t in tensors]


def same(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


# ---------------------------------------------------------------------------------------------- worker checks


def crafted_grads(rank: int, step: int) -> list[torch.Tensor]:
    """Gradients in {-1, 0, 1} x a scale, so that c = 0 only where g = m = 0 and votes often tie."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    grads = [(torch.randint(-1, 2, s, generator=gen) * (step + 1.5)).float() for s in VOTE_SHAPES]
    grads[0].view(-1)[:FROZEN] = 0
    return grads


def recorded_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """One step, with this replica's local param, momentum and gradient before it and param and momentum after."""
    momentum = [opt.state[p]["exp_avg"] if p in opt.state else torch.zeros_like(p) for p in params]
    record = {"p": snapshot(params), "m": snapshot(momentum), "g": snapshot([p.grad for p in params])}
    opt.step()
    return {**record, "p_after": snapshot(params), "m_after": snapshot([opt.state[p]["exp_avg"] for p in params])}


def vote_trace(group: dist.ProcessGroup | None, aggregate: str, transport: str) -> list[dict]:
    """VOTE_STEPS recorded steps of DistributedLion over `group` on crafted gradients."""
    params = [torch.randn(s, generator=torch.Generator().manual_seed(7)) for s in VOTE_SHAPES]
    groups = [{"params": params[:2], **VOTE_GROUPS[0]}, {"params": params[2:], **VOTE_GROUPS[1]}]
    opt = DistributedLion(groups, lr=LR, betas=BETAS, aggregate=aggregate, transport=transport, process_group=group)
    trace = []
    for step in range(VOTE_STEPS):
        for p, g in zip(params, crafted_grads(dist.get_rank(group), step), strict=True):
            p.grad = g
        trace.append(recorded_step(opt, params))
    return trace


def bf16_check(rank: int) -> list[torch.Tensor]:
    """bf16 params and momentum with stochastic rounding (seeded alike on every replica), different gradients."""
    params = [torch.randn(64, generator=torch.Generator().manual_seed(3)).bfloat16()]
    kwargs = {"momentum_dtype": torch.bfloat16, "stochastic_rounding": True, "seed": 5, "weight_decay": 0.1}
    opt = DistributedLion(params, lr=1e-2, **kwargs)
    for step in range(3):
        params[0].grad = torch.randn(64, generator=torch.Generator().manual_seed(10 * step + rank)).bfloat16()
        opt.step()
    return params


def world_one_check(rank: int, single: dist.ProcessGroup) -> list[bool]:
    """DDP with the hook on a one-rank group + DistributedLion vs plain Lion on the same local gradients."""
    torch.manual_seed(0)
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    ddp = DDP(model, process_group=single)
    opt = distributed_lion.setup(ddp, lr=TRAIN_LR, weight_decay=0.1, batch_size_policy="ignore")
    ref_opt = Lion(reference.parameters(), lr=TRAIN_LR, weight_decay=0.1, batch_size_policy="ignore")
    train(ddp, opt, rank, 5)
    train(reference, ref_opt, rank, 5)
    return [torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True)]


def training_check(group: dist.ProcessGroup | None) -> dict:
    """Plain Lion over DDP's fp32 all-reduce vs Distributed Lion (vote) over the same per-rank batches."""
    torch.manual_seed(0)
    model = tiny_gpt()
    eval_batch = markov_batch(-1, batch=32)
    with torch.no_grad():
        initial = lm_loss(model, eval_batch).item()
    results = {"initial": initial}
    for name in ("plain", "distributed"):
        ddp = DDP(copy.deepcopy(model), process_group=group)
        kwargs = {"lr": TRAIN_LR, "weight_decay": 0.1, "batch_size_policy": "ignore"}
        opt = distributed_lion.setup(ddp, **kwargs) if name == "distributed" else Lion(ddp.parameters(), **kwargs)
        train(ddp, opt, dist.get_rank(group), TRAIN_STEPS)
        with torch.no_grad():
            results[name] = lm_loss(ddp.module, eval_batch).item()
        results[f"{name}_params"] = snapshot(ddp.module.parameters())
        results[f"{name}_momenta"] = snapshot([opt.state[p]["exp_avg"] for p in ddp.module.parameters()])
    return results


def sharded_replicas_check(rank: int) -> dict:
    """FSDP2 sharding inside each replica (2 replicas x 2 shards), Distributed Lion over the replicate group."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    results: dict = {}
    hsdp = fully_shard(nn.Linear(4, 4), mesh=mesh)
    try:
        distributed_lion.setup(hsdp, lr=LR)
    except ValueError as error:
        results["hsdp_error"] = str(error)

    torch.manual_seed(0)
    model = tiny_gpt()
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    wrong = DistributedLion(model.parameters(), lr=LR)  # the default group mixes shards of different elements
    lm_loss(model, markov_batch(rank)).backward()
    try:
        wrong.step()
    except ValueError as error:
        results["mixed_shards_error"] = str(error)
    model.zero_grad()

    opt = distributed_lion.setup(model, process_group=mesh.get_group("replicate"), lr=LR, micro_batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, rank, 3)
    results["guard"] = [str(w.message) for w in caught if issubclass(w.category, SmallBatchWarning)]
    lm_loss(model, markov_batch(99 + rank)).backward()
    params = list(model.parameters())
    results["trace"] = [recorded_step(opt, params)]
    results["full_params"] = [p.full_tensor() for p in params]
    return results


def worker(rank: int, world: int) -> dict:
    """Everything multi-process, on 4 workers: 4 replicas (the default group), 2 (pairs), 1 (singles), 2 x 2 FSDP2."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(world)]
    replicas = {4: None, 2: pairs[rank // 2]}
    return {
        "vote": {(n, config): vote_trace(group, *config) for n, group in replicas.items() for config in CONFIGS},
        "training": {n: training_check(group) for n, group in replicas.items()},
        "world_one": world_one_check(rank, singles[rank]),
        "bf16": bf16_check(rank),
        "sharded": sharded_replicas_check(rank),
    }


# ---------------------------------------------------------------------------------------------- expectations


def python_sign(x: float) -> int:
    return (x > 0) - (x < 0)


def expected_direction(traces: list[dict], step: int, index: int, aggregate: str, step_count: int) -> torch.Tensor:
    """The agreed direction for param `index`, from a plain-Python majority of the replicas' signs of c."""
    world = len(traces)
    columns = []
    for rank, trace in enumerate(traces):
        m, g = trace[step]["m"][index].reshape(-1).tolist(), trace[step]["g"][index].reshape(-1).tolist()
        signs = [python_sign(BETAS[0] * mi + (1 - BETAS[0]) * gi) for mi, gi in zip(m, g, strict=True)]
        columns.append([s if s != 0 else (1 if (rank + step_count) % 2 else -1) for s in signs])
    sums = [sum(votes) for votes in zip(*columns, strict=True)]
    values = [python_sign(s) for s in sums] if aggregate == "vote" else [s / world for s in sums]
    return torch.tensor(values, dtype=torch.float32).view_as(traces[0][step]["p"][index])


def check_trace(traces: list[dict], aggregate: str, group_of: list[dict], step_offset: int = 0) -> None:
    """Every replica's param after each step is the reference update with the majority (or mean) direction."""
    for step in range(len(traces[0])):
        for index, options in enumerate(group_of):
            u = expected_direction(traces, step, index, aggregate, step + step_offset)
            hp = LionHyperparams(lr=LR, beta1=0.0, beta2=0.0, **options)  # beta1 = 0: the sign of u is u itself
            for rank, trace in enumerate(traces):
                record = trace[step]
                expected = record["p"][index].clone()
                if aggregate == "vote":
                    lion_reference(expected, u, torch.zeros_like(u), hp)
                else:  # lr * mean of the votes, with plain Lion's (cautious) decay
                    if hp.weight_decay:
                        decayed = expected * hp.decay
                        expected = torch.where(u * expected > 0, decayed, expected) if hp.cautious_wd else decayed
                    expected = expected.add(u, alpha=-LR)
                assert torch.equal(record["p_after"][index], expected), (aggregate, step, index, rank)
                momentum, own_param = record["m"][index].clone(), record["p"][index].clone()
                lion_reference(own_param, record["g"][index], momentum, LionHyperparams(LR, *BETAS, **options))
                assert torch.equal(record["m_after"][index], momentum), ("momentum is plain Lion's", step, rank)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(worker, 4, timeout=600)


# the ranks of each replica group: 4 replicas, and two independent groups of 2
REPLICA_SETS = pytest.mark.parametrize(("replicas", "ranks"), [(4, [0, 1, 2, 3]), (2, [0, 1]), (2, [2, 3])])


@pytest.mark.slow
@REPLICA_SETS
@pytest.mark.parametrize("config", CONFIGS)
def test_update_is_the_plain_python_majority_or_mean(
    results: list[dict], replicas: int, ranks: list[int], config: tuple[str, str]
) -> None:
    traces = [results[r]["vote"][(replicas, config)] for r in ranks]
    check_trace(traces, config[0], [VOTE_GROUPS[0], VOTE_GROUPS[0], VOTE_GROUPS[1]])
    # zero on every replica: an even number of parity votes ties, so it never moves, as in plain Lion
    frozen = [t[-1]["p_after"][0].reshape(-1)[:FROZEN] - t[0]["p"][0].reshape(-1)[:FROZEN] for t in traces]
    assert all(torch.equal(f, torch.zeros(FROZEN)) for f in frozen)
    ties = [torch.count_nonzero(expected_direction(traces, s, 0, "vote", s) == 0) for s in range(VOTE_STEPS)]
    assert sum(ties) > VOTE_STEPS * FROZEN, "the crafted gradients must produce ties beyond the frozen elements"


@pytest.mark.slow
@REPLICA_SETS
def test_transports_give_identical_params(results: list[dict], replicas: int, ranks: list[int]) -> None:
    for r in ranks:
        for aggregate in ("vote", "mean"):
            gather = results[r]["vote"][(replicas, (aggregate, "gather"))]
            reduce = results[r]["vote"][(replicas, (aggregate, "reduce"))]
            assert same(gather[-1]["p_after"], reduce[-1]["p_after"])


@pytest.mark.slow
@REPLICA_SETS
def test_replicas_stay_bit_identical_and_train_like_plain_lion(
    results: list[dict], replicas: int, ranks: list[int]
) -> None:
    runs = [results[r]["training"][replicas] for r in ranks]
    for run in runs[1:]:
        assert same(runs[0]["distributed_params"], run["distributed_params"])
        assert same(runs[0]["plain_params"], run["plain_params"])
        # each replica kept its own momentum: DDP did not all-reduce the gradients
        assert not same(runs[0]["distributed_momenta"], run["distributed_momenta"])
        assert same(runs[0]["plain_momenta"], run["plain_momenta"])
    run = runs[0]
    assert run["plain"] < run["initial"] - 1.0, run
    assert run["distributed"] < run["initial"] - 1.0, run
    assert run["distributed"] <= run["plain"] + LOSS_MARGIN, run


@pytest.mark.slow
def test_one_replica_equals_plain_lion_bit_for_bit(results: list[dict]) -> None:
    """Each worker runs DDP + the hook + DistributedLion on a group of its own."""
    for r in results:
        assert all(r["world_one"])


@pytest.mark.slow
def test_bf16_stochastic_rounding_replicas_stay_identical(results: list[dict]) -> None:
    start = torch.randn(64, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert not torch.equal(results[0]["bf16"][0], start)
    for r in results[1:]:
        assert same(results[0]["bf16"], r["bf16"])


@pytest.mark.slow
def test_fsdp2_sharded_replicas(results: list[dict]) -> None:
    """2 replicas x 2 shards: FSDP2 on each replica's shard mesh, votes over the replicate group."""
    sharded = [r["sharded"] for r in results]
    assert all("set_requires_all_reduce" in s["hsdp_error"] for s in sharded)
    assert all("different shards" in s["mixed_shards_error"] for s in sharded)
    # the batch guard counts every rank of every replica: micro batch 8 x 1 x (2 replicas x 2 shards) = 32
    assert [len(s["guard"]) for s in sharded] == [1, 0, 0, 0]
    assert "effective batch is 32" in sharded[0]["guard"][0] and "data-parallel size 4" in sharded[0]["guard"][0]
    for s in sharded[1:]:  # full params agree across replicas (ranks 0, 1: replica 0; ranks 2, 3: replica 1)
        assert same(sharded[0]["full_params"], s["full_params"])
    for shard in (0, 1):  # the same shard in both replicas: ranks shard and 2 + shard vote together
        traces = [sharded[shard]["trace"], sharded[2 + shard]["trace"]]
        check_trace(traces, "vote", [{}] * len(traces[0][0]["p"]), step_offset=3)


# ---------------------------------------------------------------------------------------------- one process


def test_without_process_group_it_is_plain_lion() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in VOTE_SHAPES] + [torch.randn(9, generator=gen).bfloat16()]
    ours = [p.clone() for p in params]
    kwargs = {"lr": 1e-2, "weight_decay": 0.3, "stochastic_rounding": True, "seed": 3, "batch_size_policy": "ignore"}
    opt, ref = DistributedLion(ours, **kwargs), Lion(params, **kwargs)
    assert opt.group_size() == 1
    for step in range(5):
        for a, b in zip(ours, params, strict=True):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step)).to(a.dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    assert same(ours, params)
    copied = copy.deepcopy(opt)
    assert (copied.aggregate, copied.transport) == ("vote", "auto")


def test_deepcopy_with_a_real_process_group_shares_the_group() -> None:
    """A process group is a connection to the other ranks: a copy uses the same one, everything else is its own."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        group = dist.new_group([0])
        p = torch.randn(6, requires_grad=True)
        opt = DistributedLion([p], lr=1e-2, process_group=group, batch_size_policy="ignore")
        p.grad = torch.randn(6)
        opt.step()
        copied = copy.deepcopy(opt)
        assert copied.process_group is group
        q = copied.param_groups[0]["params"][0]
        assert q is not p and torch.equal(q, p) and copied.state[q]["exp_avg"] is not opt.state[p]["exp_avg"]
        q.grad = torch.randn(6)
        copied.step()
        assert not torch.equal(q, p)
    finally:
        dist.destroy_process_group()


def test_pack_and_count_bits() -> None:
    gen = torch.Generator().manual_seed(0)
    for numel in (0, 1, 7, 8, 9, 64, 100):
        rows = torch.randint(2, (300, numel), generator=gen).bool()  # 300 rows: more than one 255-row chunk
        packed = torch.stack([pack_bits(row) for row in rows])
        assert packed.dtype == torch.uint8 and packed.shape == (300, math.ceil(numel / 8))
        assert torch.equal(count_set_bits(packed[:1], numel), rows[0].to(torch.int16))  # one row: unpacking
        assert torch.equal(count_set_bits(packed, numel), rows.sum(0, dtype=torch.int16))
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)).tolist() == [129, 1]
    assert pack_bits(torch.ones(20, dtype=torch.bool)[3:]).tolist() == [255, 255, 1]  # a view at an odd offset


def test_bytes_and_crossover() -> None:
    n = 1_000_000
    fp32 = ring_bytes_sent("all_reduce", 4 * n, 4)
    assert fp32 == 6_000_000  # 2 * 3/4 * 4 bytes * n
    assert vote_bytes_sent("gather", n, 4) == 375_000  # 3 * n / 8
    assert fp32 / vote_bytes_sent("gather", n, 4) == 16
    assert vote_bytes_sent("reduce", n, 4) == 1_500_000
    assert vote_bytes_sent("gather", n + 1, 4) == 3 * (n // 8 + 1)  # a partial byte is sent whole
    assert [choose_transport(n, w) for w in (2, 4, 8, 15, 16, 17, 64, 200)] == ["gather"] * 5 + ["reduce"] * 3
    assert vote_bytes_sent("reduce", n, 200) == math.ceil(2 * 199 * n * 2 / 200)  # int16 votes above 127 workers
    with pytest.raises(ValueError, match="collective"):
        ring_bytes_sent("broadcast", n, 4)
    with pytest.raises(ValueError, match="transport"):
        vote_bytes_sent("fp32", n, 4)


def test_bad_arguments_name_the_value_and_the_fix() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"aggregate.*'median'"):
        DistributedLion(params, aggregate="median")
    with pytest.raises(ValueError, match=r"transport.*'ring'"):
        DistributedLion(params, transport="ring")
    with pytest.raises(TypeError, match="get_group"):
        DistributedLion(params, process_group="replicate")
    with pytest.raises(ValueError, match=r"cautious_factor=0.5.*cautious_factor=None"):
        DistributedLion(params, cautious_factor=0.5)
    opt = DistributedLion(params)
    with pytest.raises(ValueError, match="cautious_factor"):
        opt.add_param_group({"params": [torch.zeros(2)], "cautious_factor": 0.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match=r"DistributedDataParallel.*Linear"):
        distributed_lion.setup(nn.Linear(2, 2))
