"""CUDA only (skipped without a GPU; CI has none): FSDP2 on NCCL with one GPU stepped by the compiled Triton
kernel, FSDP2's CPUOffloadPolicy on a GPU mesh, a capturable step captured in a CUDA graph and replayed (with an lr
schedule reaching the replays), Kahan compensation and the split step on the compiled kernel, and gradients
misaligned as FSDP2's reduce-scatter views are. The same kernel code is tested on CPU through Triton's interpreter
in test_triton_kernel.py, test_int8_triton_kernel.py and test_triton_paths.py, and what CPU allows of the offload
and capture paths in test_gpu_paths.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lion_dist import Lion
from tests.distributed import spawn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 10


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 33)).cuda()


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(step)
    return [torch.randn(p.shape, device="cuda", generator=gen) for p in params]


def _fsdp2_on_nccl(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    params = list(model.parameters())
    opt = Lion(params, lr=1e-3, weight_decay=0.1, backend="auto", global_batch_size=64)
    for step in range(STEPS):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        opt.step()
    return {
        "params": [p.full_tensor().cpu() for p in params],
        "momentum_is_dtensor": all(type(opt.state[p]["exp_avg"]).__name__ == "DTensor" for p in params),
        "state_bytes": opt.state_bytes(),
    }


def test_fsdp2_nccl_one_gpu_triton_equals_unsharded() -> None:
    (result,) = spawn(_fsdp2_on_nccl, 1, backend="nccl")
    params = list(_model().parameters())
    plain = [p.detach().clone().requires_grad_() for p in params]
    opt = Lion(plain, lr=1e-3, weight_decay=0.1, backend="triton", global_batch_size=64)
    reference = [p.detach().clone().requires_grad_() for p in params]
    ref_opt = Lion(reference, lr=1e-3, weight_decay=0.1, backend="reference", global_batch_size=64)
    for step in range(STEPS):
        for ps in (plain, reference):
            for p, g in zip(ps, _grads(ps, step), strict=True):
                p.grad = g
        opt.step()
        ref_opt.step()
    assert result["momentum_is_dtensor"]
    assert result["state_bytes"] == 4 * sum(p.numel() for p in params)
    for sharded, unsharded, ref in zip(result["params"], plain, reference, strict=True):
        assert torch.equal(sharded, unsharded.detach().cpu())  # same kernel, sharded or not: same bits
        torch.testing.assert_close(sharded, ref.detach().cpu(), rtol=0, atol=1e-6)


def test_capturable_step_is_captured_in_a_cuda_graph_and_replayed() -> None:
    """capturable=True: one warm-up step, then the whole `opt.step()` (stochastic rounding, a device lr that a
    schedule changes in place) captured once and replayed, equals the same steps taken eagerly, bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1000, 33), (4096,), (7,)]
    start = [torch.randn(s, device="cuda", generator=gen).bfloat16() for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(6)]

    def build(capturable: bool):
        params = [t.clone().requires_grad_() for t in start]
        static = [torch.zeros(s, device="cuda") for s in shapes]
        for p, g in zip(params, static, strict=True):
            p.grad_dtype = None
            p.grad = g
        lr = torch.tensor(1e-3, device="cuda")
        opt = Lion(
            params, lr=lr, weight_decay=0.1, stochastic_rounding=True, capturable=capturable, global_batch_size=64
        )
        return params, static, lr, opt

    params, static, lr, opt = build(False)
    for step, gs in enumerate(grads):
        lr.fill_(1e-3 / (step + 1))
        for s, g in zip(static, gs, strict=True):
            s.copy_(g)
        opt.step()
    eager = [p.detach().clone() for p in params]

    params, static, lr, opt = build(True)
    lr.fill_(1e-3)
    for s, g in zip(static, grads[0], strict=True):
        s.copy_(g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: builds the plan, uploads the gradient table, creates the device step count
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step, gs in enumerate(grads[1:], start=1):
        lr.fill_(1e-3 / (step + 1))
        for s, g in zip(static, gs, strict=True):
            s.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    assert int(opt.param_groups[0]["step"]) == len(grads)
    for got, expected in zip(params, eager, strict=True):
        assert torch.equal(got.detach(), expected)


def _fsdp2_cpu_offload_on_nccl(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = _model()
    fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=True))
    params = list(model.parameters())
    opt = Lion(params, lr=1e-3, weight_decay=0.1, global_batch_size=64)
    for step in range(STEPS):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = distribute_tensor(g.cpu(), p.device_mesh, p.placements)
        opt.step()
    return {
        "params": [p.full_tensor().cpu() for p in params],
        "devices": {t.to_local().device.type for p in params for t in (p, opt.state[p]["exp_avg"])},
        "mesh": params[0].device_mesh.device_type,
    }


def test_fsdp2_cpu_offload_on_a_gpu_mesh_keeps_momentum_on_the_cpu_shard() -> None:
    (result,) = spawn(_fsdp2_cpu_offload_on_nccl, 1, backend="nccl")
    assert result["mesh"] == "cuda" and result["devices"] == {"cpu"}
    params = [p.detach().cpu().clone().requires_grad_() for p in _model().parameters()]
    ref = Lion(params, lr=1e-3, weight_decay=0.1, backend="reference", global_batch_size=64)
    for step in range(STEPS):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g.cpu()
        ref.step()
    for got, expected in zip(result["params"], params, strict=True):
        assert torch.equal(got, expected.detach())


def _train(backend: str, steps: int = 5, **kwargs) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 80), (1000, 33), (300,), (7,)]
    params = [torch.randn(s, device="cuda", generator=gen).bfloat16().requires_grad_() for s in shapes]
    opt = Lion(params, lr=1e-4, weight_decay=0.1, backend=backend, global_batch_size=64, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen).bfloat16()
        opt.step()
    return [p.detach() for p in params] + [t for p in params for t in opt.state[p].values() if t.dim()]


def _same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    from tests.conftest import assert_same

    assert_same(got, expected)


@pytest.mark.parametrize("momentum_dtype", [None, torch.float32, "int8"])
def test_compensation_on_the_compiled_kernel_equals_the_reference(momentum_dtype) -> None:
    got = _train("triton", compensation=True, momentum_dtype=momentum_dtype)
    _same(got, _train("reference", compensation=True, momentum_dtype=momentum_dtype))


def test_the_split_step_on_the_compiled_kernel_equals_foreach() -> None:
    """Direction then apply through `Lion` with a one-replica exchange, the Triton route against foreach."""
    from tests.test_triton_paths import LocalVote

    got = _train("triton", exchange=LocalVote(), stochastic_rounding=True)
    _same(got, _train("foreach", exchange=LocalVote(), stochastic_rounding=True))


def test_gradients_at_odd_offsets_keep_the_state_vectorized_and_equal_the_reference() -> None:
    """FSDP2-like gradients, views into one buffer after a shard of odd length: one launch with 128-bit accesses
    for the aligned tensor, one with them for param and momentum only, equal to the reference."""
    from lion_dist.backends import StepArgs
    from lion_dist.backends.triton import BACKEND
    from lion_dist.spec import LionHyperparams, lion_reference
    from tests.conftest import entry

    sizes = [5, 4096, 100_000, 33, 1 << 20]
    gen = torch.Generator(device="cuda").manual_seed(1)
    params = [torch.randn(n, device="cuda", generator=gen) for n in sizes]
    momenta = [torch.randn(n, device="cuda", generator=gen) for n in sizes]
    flat = torch.randn(sum(sizes), device="cuda", generator=gen)
    grads = list(flat.split(sizes))
    hp = LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    expected_p, expected_m = [p.clone() for p in params], [m.clone() for m in momenta]
    for p, g, m in zip(expected_p, grads, expected_m, strict=True):
        lion_reference(p, g, m, hp)
    entries = [entry(p, m, torch.float32, i) for i, (p, m) in enumerate(zip(params, momenta, strict=True))]
    prepared = BACKEND.prepare(entries)
    BACKEND.step(prepared, grads, StepArgs(hp))
    launched = [(r.constexprs["STATE_ALIGNED"], r.constexprs["STREAM_ALIGNED"], r.entries) for r in prepared.launched]
    assert sorted(launched) == [(True, False, (1, 2, 3, 4)), (True, True, (0,))]
    _same(params + momenta, expected_p + expected_m)


def test_a_schedulers_lr_reaches_a_captured_step() -> None:
    """A tensor lr on the device, changed in place by torch's LambdaLR between replays, is what each replay of a
    captured step reads: the hp table's lr slot is filled by a device-side copy that the graph re-executes."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    start = torch.randn(4096, device="cuda", generator=gen)
    grads = [torch.randn(4096, device="cuda", generator=gen) for _ in range(5)]

    def run(capture: bool) -> torch.Tensor:
        p = start.clone().requires_grad_()
        p.grad = torch.zeros_like(p)
        opt = Lion([p], lr=torch.tensor(1e-2, device="cuda"), capturable=capture, global_batch_size=64)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        p.grad.copy_(grads[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step()  # warm-up: builds the plan, uploads the tables
        torch.cuda.current_stream().wait_stream(side)
        schedule.step()
        graph = torch.cuda.CUDAGraph()
        if capture:
            with torch.cuda.graph(graph):
                opt.step()
        for g in grads[1:]:
            p.grad.copy_(g)
            if capture:
                graph.replay()
            else:
                opt.step()
            schedule.step()
        torch.cuda.synchronize()
        return p.detach()

    assert torch.equal(run(True), run(False))
