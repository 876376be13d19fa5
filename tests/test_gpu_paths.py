"""The GPU paths, as far as a CPU can take them: momentum of CPU-offloaded shards on a GPU mesh, the non-finite
flag read only once its copy has landed, step counting that needs no host read, capturable steps, and what
torch.compile does with a step; and the host-side defects that only a GPU would show, each with a mocked capture
(`torch.cuda.is_current_stream_capturing`), a mocked process-group backend or fake CUDA tensors (FakeTensorMode).
The GPU itself is exercised by tests/test_cuda.py; the Triton launcher's side of a capture by
tests/test_triton_paths.py in Triton's interpreter."""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from lion_dist import Lion, layouts, nonfinite
from lion_dist.formats.floats import FloatMomentum
from lion_dist.functional import lion
from lion_dist.nonfinite import NonfiniteGuard
from lion_dist.spec import LionHyperparams


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
    momentum = FloatMomentum(torch.float32).zeros(p, layouts.of(p))["exp_avg"]
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


# ---------------------------------------------------------------------------------------------- mocked GPU defects


@pytest.fixture
def capturing(monkeypatch: pytest.MonkeyPatch):
    """Pretend a CUDA graph is being captured on the current stream (a CPU-only torch has no CUDA)."""
    state = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


class _Unqueryable:
    """An event that must not be queried (querying an event inside a stream capture is a CUDA error)."""

    def query(self) -> bool:
        raise AssertionError("an event was queried during a capture")


def test_skip_under_capture_queries_no_event_and_queues_no_flag(capturing) -> None:
    """nonfinite="skip" with capturable=True: `check` drains pending flags with `event.query()` only outside a
    capture, and queues no new one inside it (a capture records no host read)."""
    guard = NonfiniteGuard("skip")
    guard._pending.append((torch.ones(1, dtype=torch.int32), _Unqueryable()))
    assert guard.check([torch.ones(3), torch.tensor([1.0, 2.0])], str) is False
    assert len(guard._pending) == 1  # the earlier step's flag stays queued, unread
    capturing["on"] = False
    with pytest.raises(AssertionError, match="queried during a capture"):
        guard.check([torch.ones(3)], str)  # outside the capture it drains, as it should


def test_error_policy_with_capturable_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"capturable=True with nonfinite='error' cannot work.*'skip'"):
        Lion([torch.zeros(3, requires_grad=True)], capturable=True, nonfinite="error")
    Lion([torch.zeros(3, requires_grad=True)], capturable=True, nonfinite="skip")  # the device-side policy is fine


class _Device:
    """A stand-in gradient that says where it lives (all `_reduce_device` asks)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"


@pytest.mark.parametrize(
    ("backend", "grads", "expected"),
    [
        ("gloo", [], "cpu"),
        ("gloo", ["cuda:1"], "cpu"),  # a gloo group reduces on the CPU whatever the gradients' device
        ("cpu:gloo,cuda:nccl", [], "cuda:3"),  # a rank whose local shards are all empty: NCCL like its peers
        ("cpu:gloo,cuda:nccl", ["cpu", "cuda:1"], "cuda:1"),
        ("nccl", [], "cuda:3"),
    ],
)
def test_the_skip_flag_is_reduced_where_the_process_group_says(monkeypatch, backend, grads, expected) -> None:
    """The flag's device comes from the process group's backend, not from `grads[0]`: a rank with no local
    elements used to make a CPU flag and all-reduce on gloo while its peers used NCCL, a hang."""
    monkeypatch.setattr(nonfinite, "_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert nonfinite._reduce_device([_Device(d) for d in grads]) == torch.device(expected)


def test_an_empty_rank_all_reduces_its_flag_on_the_gpu_under_a_mixed_backend(monkeypatch) -> None:
    """The whole `check` on a rank without local gradients, with fake CUDA tensors: its flag goes to NCCL."""
    reduced = []
    monkeypatch.setattr(nonfinite, "_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: reduced.append(t.device))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Event", _RecordingEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        flag = NonfiniteGuard("skip").check([], str)
    assert reduced == [torch.device("cuda", 0)] and flag.device == torch.device("cuda", 0)


class _RecordingEvent:
    """A CUDA event stand-in that records the stream it is recorded on."""

    recorded: ClassVar[list] = []

    def record(self, stream=None) -> None:
        _RecordingEvent.recorded.append(stream)


def test_the_pending_flags_event_is_recorded_on_the_flags_device(monkeypatch) -> None:
    """Gradients on cuda:1 while cuda:0 is current: the event that says the flag's copy has landed is recorded on
    cuda:1's stream (recorded on the current device's, it could say so before the copy ran)."""
    _RecordingEvent.recorded = []
    monkeypatch.setattr(torch.cuda, "Event", _RecordingEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(  # FakeTensorMode cannot run the norm's isfinite without CUDA: a mask of fake CUDA bools
        nonfinite, "nonfinite_mask", lambda grads: [torch.zeros((), dtype=torch.bool, device=g.device) for g in grads]
    )
    guard = NonfiniteGuard("skip")
    with FakeTensorMode(allow_non_fake_inputs=True):
        grads = [torch.empty(5, device="cuda:1"), torch.empty(3, device="cuda:1")]
        flag = guard.check(grads, str)
    assert flag.device == torch.device("cuda", 1)
    assert _RecordingEvent.recorded == [("stream of", torch.device("cuda", 1))] and len(guard._pending) == 1


def test_capturing_the_first_step_says_to_take_one_step_first(capturing) -> None:
    """The first step builds its plan with host copies that a capture cannot record: a clear error, not a raw
    CUDA one; once a step has built the plan, a captured step only reads it."""
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    opt = Lion([p], lr=0.1, batch_size_policy="ignore")
    with pytest.raises(RuntimeError, match=r"needs a new plan.*Take one step before capturing"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))
    capturing["on"] = False
    opt.step()
    capturing["on"] = True
    opt.step()  # the plan is cached: nothing to build
    assert torch.equal(p.detach(), torch.full((4,), -0.2))


HP = LionHyperparams(lr=1e-2, beta1=0.9, beta2=0.99)


@pytest.mark.parametrize("backend", ["triton", "cpu_fused", "foreach", "auto"])
def test_the_one_shot_form_refuses_gradients_no_kernel_may_read(backend) -> None:
    """`functional.lion` checks the gradients before any backend sees them (a fused kernel reads raw addresses):
    a DTensor (data_ptr() 0), a wrong size, another device, a sparse layout."""
    p, m = torch.zeros(8), torch.zeros(8)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        g = distribute_tensor(torch.ones(8), DeviceMesh("cpu", [0]), [Shard(0)])
        with pytest.raises(TypeError, match=r"the grad of tensor 0 is a DTensor, whose data_ptr\(\) is 0"):
            lion([p], [g], [m], HP, backend=backend)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match=r"tensor 0 has param shape \(8,\), grad \(9,\)"):
        lion([p], [torch.ones(9)], [m], HP, backend=backend)
    with pytest.raises(ValueError, match="tensor 0's param, grad and momentum are on cpu, meta and cpu"):
        lion([p], [torch.ones(8, device="meta")], [m], HP, backend=backend)
    with pytest.raises(TypeError, match=r"the grad of tensor 0 is torch\.sparse_coo"):
        lion([p], [torch.ones(8).to_sparse()], [m], HP, backend=backend)
    assert torch.equal(p, torch.zeros(8)) and torch.equal(m, torch.zeros(8))
