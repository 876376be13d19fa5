"""CUDA only (skipped without a GPU; CI has none): FSDP2 on NCCL with one GPU, stepped by the compiled Triton
kernel. The same kernel code is tested on CPU through Triton's interpreter in test_triton_kernel.py."""

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
