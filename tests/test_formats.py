"""Momentum formats: a new format is one class, defined here, with no edit to any lion_dist module.

`Fp16Momentum` below keeps the momentum as fp16 codes under a key of its own. Registered under "fp16-test", it
trains through `Lion` on the reference and foreach backends (the fused ones do not declare it, so `auto` routes
it to foreach), sharded under FSDP2 bit for bit like the unsharded run, and checkpointed with DCP at 2 ranks and
resumed at 1 and 2. The expected results are the paper's update written plainly (`spec.lion_reference`) with the
momentum rounded to fp16 after every step. Also here: conversions between formats at load, state keys of no
format (a wrapper's) carried through a state dict, complex params with bf16 momentum, and sparse gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor

from lion_dist import Lion, formats, spec
from lion_dist.layouts import Layout
from tests.conftest import assert_same
from tests.distributed import spawn
from tests.sharding import SHAPES, exact_grads, fsdp2_probe, initial_values

KEY = "fp16_momentum"
QUIET = {"batch_size_policy": "ignore"}
HP = spec.LionHyperparams(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


class Fp16Momentum(formats.MomentumFormat):
    """The momentum as an fp16 tensor under `KEY`: decoded to fp32 for the math, rounded to fp16 when stored."""

    name = "fp16-test"
    kind = "fp16-test"
    keys = (KEY,)

    def zeros(self, param: Tensor, layout: Layout) -> dict[str, Tensor]:
        local = torch.zeros_like(layout.local(param), dtype=torch.float16, memory_format=torch.contiguous_format)
        return {KEY: layout.around(local, tuple(param.shape))}

    def decode(self, state: Sequence[Tensor]) -> Tensor:
        return state[0].float()

    def encode(self, state: Sequence[Tensor], momentum: Tensor, noise: Tensor | None) -> None:
        state[0].copy_(momentum)

    def holds(self, param: Tensor, state: Mapping[str, Any]) -> bool:
        m = state.get(KEY)
        return isinstance(m, Tensor) and m.shape == param.shape

    def check(self, param: Tensor, state: Mapping[str, Any], where: str) -> None:
        if not self.holds(param, state) or state[KEY].dtype != torch.float16:
            raise ValueError(f"state for {where}: {KEY} must be fp16 shaped as the param {tuple(param.shape)}")

    def normalize(self, param: Tensor, state: dict[str, Any], *, loaded: bool) -> None:
        state[KEY] = state[KEY].to(torch.float16)  # torch's load_state_dict casts float state to the param's dtype


formats.register("fp16-test", lambda group: Fp16Momentum())


def expected_run(steps: int, start: int = 0, values: list[Tensor] | None = None, moms: list[Tensor] | None = None):
    """The paper's update on whole tensors, the momentum kept in fp16 between steps."""
    params = [v.clone() for v in (initial_values() if values is None else values)]
    moms = [torch.zeros(s, dtype=torch.float16) for s in SHAPES] if moms is None else [m.clone() for m in moms]
    for step in range(start, start + steps):
        for p, m, g in zip(params, moms, exact_grads(step), strict=True):
            m32 = m.float()
            spec.lion_reference(p, g, m32, HP)
            m.copy_(m32)
    return params, moms


def lion(params, **kwargs) -> Lion:
    return Lion(params, lr=HP.lr, weight_decay=HP.weight_decay, momentum_dtype="fp16-test", **QUIET, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
def test_a_format_defined_here_trains_through_lion(backend: str) -> None:
    params = [v.clone().requires_grad_() for v in initial_values()]
    opt = lion(params, backend=backend)
    for step in range(4):
        for p, g in zip(params, exact_grads(step), strict=True):
            p.grad = g
        opt.step()
    want_params, want_moms = expected_run(4)
    assert_same(params + [opt.state[p][KEY] for p in params], want_params + want_moms)
    assert set(opt.state[params[0]]) == {KEY}
    assert opt.state_bytes() == sum(2 * p.numel() for p in params)
    plan = list(opt._plans._plans[0].values())[-1]
    assert {route.backend.name for route in plan.routes} == {"foreach" if backend == "auto" else backend}


def test_a_format_defined_here_converts_to_and_from_fp32() -> None:
    """A float momentum loads into this format (a lion-pytorch state dict names no format: the group keeps its
    own), and a group switched back to fp32 converts it at its next step."""
    params = [v.clone().requires_grad_() for v in initial_values()]
    fp32 = Lion(params, lr=HP.lr, weight_decay=HP.weight_decay, **QUIET)
    for p, g in zip(params, exact_grads(0), strict=True):
        p.grad = g
    fp32.step()
    saved = fp32.state_dict()
    for group in saved["param_groups"]:
        del group["momentum_dtype"]
    fp16 = lion([p.detach().clone().requires_grad_() for p in params])
    fp16.load_state_dict(saved)
    for p, q in zip(params, fp16.param_groups[0]["params"], strict=True):
        assert set(fp16.state[q]) == {KEY} and torch.equal(fp16.state[q][KEY], fp32.state[p]["exp_avg"].half())
    before = {q: fp16.state[q][KEY].float() for q in fp16.param_groups[0]["params"]}
    fp16.param_groups[0]["momentum_dtype"] = torch.float32
    fp16.param_groups[0]["lr"] = 0.0  # a step that moves nothing: only the conversion shows
    for q in fp16.param_groups[0]["params"]:
        q.grad = torch.zeros_like(q)
    fp16.step()
    for q in fp16.param_groups[0]["params"]:
        assert set(fp16.state[q]) == {"exp_avg"} and torch.equal(fp16.state[q]["exp_avg"], before[q] * 0.99)


def _fsdp2(rank: int, world: int, directory: str, resume_from: str | None) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    model = fsdp2_probe(mesh)
    params = list(model.parameters())
    opt = lion(params, backend="foreach")
    start = 0
    if resume_from is not None:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=resume_from)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = opt.param_groups[0]["step"]
    for step in range(start, start + 3):
        for p, g in zip(params, exact_grads(step), strict=True):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
    if resume_from is None:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    full = [p.full_tensor() for p in params] + [opt.state[p][KEY].full_tensor() for p in params]
    dist.barrier()
    return {"full": full, "step": opt.param_groups[0]["step"], "placements": opt.state[params[0]][KEY].placements}


@pytest.mark.slow
def test_a_format_defined_here_shards_under_fsdp2_and_reshards_through_dcp(tmp_path) -> None:
    """Sharded == unsharded bit for bit at 2 ranks; a DCP checkpoint saved there resumes at 1 and 2 ranks."""
    first = spawn(_fsdp2, 2, str(tmp_path / "ckpt"), None)
    want_params, want_moms = expected_run(3)
    assert first[0]["placements"] == first[1]["placements"] and first[0]["step"] == 3
    for result in first:
        assert_same(result["full"], want_params + want_moms)
    want_params, want_moms = expected_run(3, start=3, values=want_params, moms=want_moms)
    for world in (1, 2):
        resumed = spawn(_fsdp2, world, str(tmp_path / f"unused{world}"), str(tmp_path / "ckpt"))
        assert resumed[0]["step"] == 6
        assert_same(resumed[0]["full"], want_params + want_moms)


def test_a_wrappers_state_keys_are_carried_through_a_state_dict() -> None:
    """timm's Lookahead keeps `lookahead_slow_buff` in the optimizer's own state; torch.optim and lion-pytorch
    load it back, and so must we (untouched, not counted as Lion's bytes)."""
    params = [v.clone().requires_grad_() for v in initial_values()]
    opt = Lion(params, lr=HP.lr, **QUIET)
    for p, g in zip(params, exact_grads(0), strict=True):
        p.grad = g
    opt.step()
    bytes_before = opt.state_bytes()
    for p in params:
        opt.state[p]["lookahead_slow_buff"] = p.detach().clone().double()
    assert opt.state_bytes() == bytes_before
    twin = Lion([p.detach().clone().requires_grad_() for p in params], lr=HP.lr, **QUIET)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, twin.param_groups[0]["params"], strict=True):
        assert set(twin.state[q]) == {"exp_avg", "lookahead_slow_buff"}
        assert_same(
            [twin.state[q]["lookahead_slow_buff"], twin.state[q]["exp_avg"]],
            [p.detach().double(), opt.state[p]["exp_avg"]],
        )
    for q, g in zip(twin.param_groups[0]["params"], exact_grads(1), strict=True):
        q.grad = g
    twin.step()  # the foreign key rides along
    assert all("lookahead_slow_buff" in twin.state[q] for q in twin.param_groups[0]["params"])


@pytest.mark.parametrize("backend", ["auto", "foreach", "reference"])
def test_complex_params_take_bf16_momentum_as_a_real_view(backend: str) -> None:
    """A complex param steps exactly as its real view would, with a bf16 momentum of shape (*shape, 2)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, dtype=torch.complex64, generator=gen)
    complex_p, real_p = nn.Parameter(z.clone()), nn.Parameter(torch.view_as_real(z).clone())
    kwargs = dict(lr=1e-2, weight_decay=0.1, momentum_dtype=torch.bfloat16, backend=backend, **QUIET)
    complex_opt, real_opt = Lion([complex_p], **kwargs), Lion([real_p], **kwargs)
    for _ in range(3):
        g = torch.randn(6, 5, dtype=torch.complex64, generator=gen)
        complex_p.grad, real_p.grad = g, torch.view_as_real(g).clone()
        complex_opt.step()
        real_opt.step()
    m = complex_opt.state[complex_p]["exp_avg"]
    assert m.dtype == torch.bfloat16 and m.shape == (6, 5, 2)
    assert_same([torch.view_as_real(complex_p.detach()), m], [real_p.detach(), real_opt.state[real_p]["exp_avg"]])
    loaded = Lion([nn.Parameter(z.clone())], **kwargs)
    loaded.load_state_dict(complex_opt.state_dict())
    assert_same([next(iter(loaded.state.values()))["exp_avg"]], [m])


def test_sparse_gradients_give_lion_pytorchs_dense_result() -> None:
    """`nn.Embedding(sparse=True)`: Lion's update moves every row (sign(b1 * m) for rows without gradient), so
    the sparse gradient is densified, as lion-pytorch's arithmetic does; the result is lion-pytorch's."""
    lion_pytorch = pytest.importorskip("lion_pytorch")  # not on the GPU machine's image
    torch.manual_seed(0)
    ours, theirs = nn.Embedding(10, 3, sparse=True), nn.Embedding(10, 3, sparse=True)
    theirs.load_state_dict(ours.state_dict())
    opt = Lion(ours.parameters(), lr=1e-2, weight_decay=0.1, **QUIET)
    reference = lion_pytorch.Lion(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        index = torch.tensor([step, 3, 3, 7])
        for module, optimizer in ((ours, opt), (theirs, reference)):
            module(index).pow(2).sum().backward()
            assert module.weight.grad.is_sparse
            optimizer.step()
            optimizer.zero_grad()
    assert_same(
        [ours.weight.detach(), opt.state[ours.weight]["exp_avg"]],
        [theirs.weight.detach(), reference.state[theirs.weight]["exp_avg"]],
    )


def test_register_refuses_a_bad_name_and_lion_names_the_formats() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        formats.register("", lambda group: Fp16Momentum())
    with pytest.raises(ValueError, match=r"momentum_dtype must be .*'fp16-test'"):
        Lion([nn.Parameter(torch.zeros(2))], momentum_dtype="fp12")
