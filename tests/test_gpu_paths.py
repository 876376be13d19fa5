"""The GPU paths, as far as a CPU can take them: momentum of CPU-offloaded shards on a GPU mesh, the non-finite
flag read only once its copy has landed, step counting that needs no host read, capturable steps, and what
torch.compile does with a step. The GPU itself is exercised by tests/test_cuda.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from lion_dist import Lion, shards
from lion_dist.nonfinite import NonfiniteGuard


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _offloaded_param(mesh: DeviceMesh, local: torch.Tensor) -> torch.nn.Parameter:
    """What FSDP2's CPUOffloadPolicy hands the optimizer: a DTensor on a GPU mesh whose shard lives on the CPU."""
    meta = TensorMeta(local.shape, local.stride(), local.dtype)
    return torch.nn.Parameter(DTensor(local, DTensorSpec(mesh, (Shard(0),), tensor_meta=meta), requires_grad=True))


def test_offloaded_shards_get_their_momentum_on_the_cpu_and_step_there(one_rank) -> None:
    """DTensor.from_local would move the zeros to the mesh's device (here: fail, torch has no CUDA)."""
    mesh = DeviceMesh("cuda", [0], _init_backend=False)
    local = torch.randn(6, 4)
    p = _offloaded_param(mesh, local.clone())
    momentum = shards.new_momentum(p, torch.float32)
    assert momentum.device_mesh.device_type == "cuda" and momentum.to_local().device.type == "cpu"
    assert momentum.placements == p.placements and momentum.shape == p.shape

    opt = Lion([p], lr=1e-2, weight_decay=0.1, batch_size_policy="ignore")
    g = torch.randn(6, 4)
    p.grad = DTensor(g.clone(), p._spec, requires_grad=False)
    opt.step()  # the fused CPU kernel takes the CPU shard: nothing is moved to the (absent) GPU
    plain = torch.nn.Parameter(local.clone())
    plain.grad = g
    Lion([plain], lr=1e-2, weight_decay=0.1, backend="reference", batch_size_policy="ignore").step()
    assert torch.equal(p.to_local(), plain.detach())
    assert opt.state[p]["exp_avg"].to_local().device.type == "cpu"


class _Event:
    """A CUDA event stand-in: `query()` says whether the copy it follows has landed."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def test_a_device_skip_is_warned_only_once_its_flag_has_reached_the_host() -> None:
    guard = NonfiniteGuard("skip")
    pending = _Event(done=False)
    guard._pending.append((torch.ones(1, dtype=torch.int32), pending))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard._warn_for_earlier_skips()  # not landed yet: no read of a stale flag, no warning, no wait
    assert len(guard._pending) == 1
    pending.done = True
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        guard._warn_for_earlier_skips()
    assert not guard._pending


def test_a_skipped_step_counts_in_the_step_on_every_device() -> None:
    """On GPU the skip flag is never read on the host, so a skipped step counts; on CPU it counts the same."""
    p = torch.zeros(3, requires_grad=True)
    opt = Lion([p], lr=0.1, nonfinite="skip", batch_size_policy="ignore")
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3)) and opt.skipped_steps == 1
    assert opt.param_groups[0]["step"] == 1


def test_capturable_needs_the_fused_gpu_kernel() -> None:
    """Without TRITON_INTERPRET, CPU tensors have no capturable backend: the step says so, naming the param."""
    p = torch.zeros(3, requires_grad=True)
    opt = Lion([("w", p)], capturable=True, batch_size_policy="ignore")
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"w: no backend can update a cpu tensor.*capturable=True needs a step"):
        opt.step()


def test_torch_compile_leaves_the_step_to_eager_and_gets_the_same_result() -> None:
    import torch._dynamo

    def run(compiled: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in ((5, 3), (7,))]
        opt = Lion(params, lr=1e-2, weight_decay=0.1, batch_size_policy="ignore")
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step()
        return params

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a.detach(), b.detach())
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    explained = torch._dynamo.explain(Lion([p], batch_size_policy="ignore").step)()
    assert explained.graph_count == 0  # dynamo skips it (torch.compiler.disable), by design
