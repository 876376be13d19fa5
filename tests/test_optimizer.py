"""lion_dist.Lion on one process: the reference, the foreach path and lion-pytorch agree, and the torch.optim
contract holds."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lion_dist import Lion
from lion_dist.spec import LionHyperparams, lion_reference

try:
    from lion_pytorch import Lion as PeerLion
    from lion_pytorch.cautious_lion import Lion as PeerCautiousLion
except ImportError:  # e.g. the GPU machine's image: the comparisons with lion-pytorch skip, the rest runs
    PeerLion = PeerCautiousLion = None
needs_peer = pytest.mark.skipif(PeerLion is None, reason="lion-pytorch is not installed (pip install lion-pytorch)")

STEPS = 25


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33, 7), (129,), (1,), (4, 5, 6)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def grads_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def run(make_opt, params: list[torch.Tensor], steps: int = STEPS, on_step=None) -> list[torch.Tensor]:
    params = [p.clone().requires_grad_() for p in params]
    opt = make_opt(params)
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step), strict=True):
            p.grad = g
        opt.step()
        if on_step is not None:
            on_step(opt, step)
    return [p.detach() for p in params]


CONFIGS = {
    "plain": ({}, {}),
    "weight_decay": ({"weight_decay": 0.3}, {"weight_decay": 0.3}),
    "decoupled_wd": (
        {"weight_decay": 3e-3, "decoupled_weight_decay": True},
        {"weight_decay": 3e-3, "decoupled_weight_decay": True},
    ),
    "betas": ({"betas": (0.95, 0.98)}, {"betas": (0.95, 0.98)}),
}
CAUTIOUS_CONFIGS = {
    "cautious_0": ({"cautious_factor": 0.0}, {"cautious_factor": 0.0}),
    "cautious_half": ({"cautious_factor": 0.5, "weight_decay": 0.1}, {"cautious_factor": 0.5, "weight_decay": 0.1}),
    "cautious_wd": (
        {"cautious_factor": 0.25, "cautious_wd": True, "weight_decay": 0.2},
        {"cautious_factor": 0.25, "cautious_wd": True, "weight_decay": 0.2},
    ),
}


@needs_peer
@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_lion_pytorch_bit_for_bit(name: str, backend: str) -> None:
    ours, peer = CONFIGS[name]
    params = make_params()
    expected = run(lambda ps: PeerLion(ps, lr=3e-3, **peer), params)
    got = run(lambda ps: Lion(ps, lr=3e-3, backend=backend, **ours), params)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@needs_peer
@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("name", list(CAUTIOUS_CONFIGS))
def test_matches_cautious_lion_pytorch_bit_for_bit(name: str, backend: str) -> None:
    ours, peer = CAUTIOUS_CONFIGS[name]
    params = make_params()
    expected = run(lambda ps: PeerCautiousLion(ps, lr=3e-3, **peer), params)
    got = run(lambda ps: Lion(ps, lr=3e-3, backend=backend, **ours), params)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@needs_peer
def test_maximize_equals_negated_gradient() -> None:
    params = make_params()
    maximized = run(lambda ps: Lion(ps, lr=3e-3, maximize=True, weight_decay=0.1), params)

    def negated(ps):
        peer = PeerLion(ps, lr=3e-3, weight_decay=0.1)
        step = peer.step

        def step_with_negated_grads():
            for p in ps:
                p.grad.neg_()
            step()

        peer.step = step_with_negated_grads
        return peer

    expected = run(negated, params)
    for e, g in zip(expected, maximized, strict=True):
        assert torch.equal(e, g)


def two_groups(ps):
    return [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.5}]


@needs_peer
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_param_groups_with_their_own_hyperparameters(backend: str) -> None:
    params = make_params()
    expected = run(lambda ps: PeerLion(two_groups(ps)), params)
    got = run(lambda ps: Lion(two_groups(ps), backend=backend), params)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    # and the groups really differ: group 1's params move by its own lr
    assert not torch.equal(got[0], run(lambda ps: Lion(ps, lr=1e-3), params)[0])


@needs_peer
def test_scheduler_changes_take_effect_at_once() -> None:
    params = make_params()

    def with_scheduler(cls):
        def make(ps):
            opt = cls(ps, lr=1e-2, weight_decay=0.1)
            make.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
            return opt

        return make

    def step_scheduler(make):
        return lambda opt, step: make.scheduler.step()

    ours, peer = with_scheduler(Lion), with_scheduler(PeerLion)
    got = run(ours, params, on_step=step_scheduler(ours))
    expected = run(peer, params, on_step=step_scheduler(peer))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)

    # lr set by hand between steps is used by the very next step
    p = torch.zeros(4, requires_grad=True)
    opt = Lion([p], lr=1.0)
    opt.param_groups[0]["lr"] = 0.25
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), -0.25))


RESUMES = {
    "bf16_momentum": (
        torch.float32,
        dict(weight_decay=0.1, decoupled_weight_decay=True, momentum_dtype=torch.bfloat16),
    ),
    # stochastic rounding's seed and step ride in the param groups: a resumed run draws the same noise
    "stochastic_rounding": (torch.bfloat16, dict(weight_decay=0.1, stochastic_rounding=True, seed=11)),
}


@pytest.mark.parametrize("name", list(RESUMES))
def test_state_dict_resume_equals_uninterrupted_run(name: str) -> None:
    dtype, extra = RESUMES[name]
    params = make_params(dtype=dtype)
    kwargs = dict(lr=3e-3, backend="foreach", **extra)
    uninterrupted = run(lambda ps: Lion(ps, **kwargs), params)

    first = [p.clone().requires_grad_() for p in params]
    opt = Lion(first, **kwargs)
    for step in range(10):
        for p, g in zip(first, grads_for(first, step), strict=True):
            p.grad = g
        opt.step()
    saved = copy.deepcopy(opt.state_dict())

    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = Lion(resumed, lr=1.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 3e-3 and opt2.param_groups[0]["lr0"] == 3e-3
    assert all(s["exp_avg"].dtype == extra.get("momentum_dtype", dtype) for s in opt2.state.values())
    for step in range(10, STEPS):
        for p, g in zip(resumed, grads_for(resumed, step), strict=True):
            p.grad = g
        opt2.step()
    for e, g in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(e, g.detach())


@needs_peer
def test_loads_a_lion_pytorch_state_dict() -> None:
    params = make_params()
    peer_params = [p.clone().requires_grad_() for p in params]
    peer = PeerLion(peer_params, lr=3e-3)
    for p, g in zip(peer_params, grads_for(peer_params, 0), strict=True):
        p.grad = g
    peer.step()
    ours = Lion([p.detach().clone().requires_grad_() for p in peer_params])
    ours.load_state_dict(peer.state_dict())
    assert ours.param_groups[0]["lr"] == 3e-3 and ours.param_groups[0]["cautious_factor"] is None
    assert all(
        torch.equal(ours.state[q]["exp_avg"], peer.state[p]["exp_avg"])
        for p, q in zip(peer_params, ours.param_groups[0]["params"], strict=True)
    )


def test_deepcopy_is_independent() -> None:
    p = torch.randn(10, requires_grad=True)
    opt = Lion([p], lr=1e-2)
    p.grad = torch.randn(10)
    opt.step()
    clone = copy.deepcopy(opt)
    clone_param = clone.param_groups[0]["params"][0]
    assert clone_param is not p and torch.equal(clone_param, p)
    clone_param.grad = torch.randn(10)
    clone.step()
    assert not torch.equal(clone.state[clone_param]["exp_avg"], opt.state[p]["exp_avg"])


def test_step_with_closure_returns_loss() -> None:
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = Lion([p], lr=0.5)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert torch.equal(p.detach(), torch.tensor([0.5, -1.5]))


def test_params_without_grad_are_untouched_and_get_no_state() -> None:
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    b_before = b.detach().clone()
    opt = Lion([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.randn(5)
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert b not in opt.state and "exp_avg" in opt.state[a]


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_non_contiguous_params_and_grads(backend: str) -> None:
    p_view = torch.randn(8, 6).t().requires_grad_()
    p_view.grad = torch.randn(8, 6).t()
    assert not p_view.is_contiguous() and not p_view.grad.is_contiguous()
    dense = p_view.detach().contiguous().requires_grad_()
    dense.grad = p_view.grad.contiguous()
    Lion([p_view], lr=0.1, weight_decay=0.2, backend=backend).step()
    Lion([dense], lr=0.1, weight_decay=0.2, backend="reference").step()
    assert torch.equal(p_view.detach(), dense.detach())


def test_zero_size_params() -> None:
    empty = torch.zeros(0, 3, requires_grad=True)
    full = torch.randn(4, requires_grad=True)
    opt = Lion([empty, full], lr=0.1)
    empty.grad, full.grad = torch.zeros(0, 3), torch.randn(4)
    opt.step()
    assert opt.state[empty]["exp_avg"].shape == (0, 3)
    assert opt.state_bytes() == 4 * 4


def test_zero_grad_zero_lr_step_changes_nothing() -> None:
    """torch.distributed.checkpoint creates state this way: step() with zero grads and lr=0."""
    params = [torch.randn(7, requires_grad=True), torch.randn(3, 3, dtype=torch.bfloat16, requires_grad=True)]
    before = [p.detach().clone() for p in params]
    opt = Lion(params, lr=1e-3, weight_decay=0.1, stochastic_rounding=True)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
    assert opt.param_groups[0]["step"] == 0


def test_sign_of_zero_is_zero() -> None:
    """Zero padding and frozen rows never move: sign(0) = 0 (other Lions move them by +-lr)."""
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.tensor([0.0, 0.0, 1.0, -1.0])
    Lion([p], lr=0.5).step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 1.0, 0.5, 1.5]))


@pytest.mark.parametrize("momentum_dtype", [None, torch.float32, torch.bfloat16])
def test_bf16_params_within_one_rounding_of_fp32_math(momentum_dtype) -> None:
    """Each step on bf16 storage equals the fp32-math reference step rounded once to bf16."""
    params = make_params(dtype=torch.bfloat16)
    opt_params = [p.clone().requires_grad_() for p in params]
    opt = Lion(opt_params, lr=1e-2, weight_decay=0.1, momentum_dtype=momentum_dtype)
    hp = LionHyperparams(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
    for step in range(5):
        grads = grads_for(opt_params, step)
        expected = []
        for p, g in zip(opt_params, grads, strict=True):
            state = opt.state.get(p)
            m = torch.zeros_like(p, dtype=torch.float32) if state is None else state["exp_avg"].float().clone()
            p32 = p.detach().float().clone()
            lion_reference(p32, g.float(), m, hp)
            expected.append(p32.to(torch.bfloat16))
            p.grad = g
        opt.step()
        for p, e in zip(opt_params, expected, strict=True):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.detach(), e)


def test_momentum_dtype_bf16_halves_state_bytes() -> None:
    def state_bytes(momentum_dtype):
        params = [p.requires_grad_() for p in make_params()]
        opt = Lion(params, momentum_dtype=momentum_dtype)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert all(s["exp_avg"].dtype == (momentum_dtype or torch.float32) for s in opt.state.values())
        return opt.state_bytes()

    numel = sum(p.numel() for p in make_params())
    assert state_bytes(None) == 4 * numel
    assert state_bytes(torch.bfloat16) == 2 * numel


def test_stochastic_rounding_is_reproducible_and_differs_from_nearest() -> None:
    params = make_params(dtype=torch.bfloat16)

    def final(**kwargs):
        return run(lambda ps: Lion(ps, lr=1e-3, backend="foreach", **kwargs), params, steps=5)

    a, b = final(stochastic_rounding=True, seed=3), final(stochastic_rounding=True, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = final(stochastic_rounding=True, seed=4)
    nearest = final()
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, nearest, strict=True))


def test_stochastic_rounding_is_unbiased() -> None:
    from lion_dist.spec import NoiseStream, round_to_bf16_stochastic, sr_noise

    x = torch.full((200_000,), 1.0 + 2**-10)  # a third of the way between two bf16 neighbours
    rounded = round_to_bf16_stochastic(x, sr_noise(NoiseStream(key=0), x.numel())).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5  # nearest rounding would be off by 9.8e-4


def test_use_triton_maps_to_backend() -> None:
    p = torch.zeros(2, requires_grad=True)
    assert Lion([p], use_triton=True).param_groups[0]["backend"] == "triton"
    assert Lion([p], use_triton=False).param_groups[0]["backend"] == "foreach"
    with pytest.raises(ValueError, match="backend or use_triton"):
        Lion([p], backend="foreach", use_triton=True)


def test_same_positional_arguments_and_defaults_as_lion_pytorch() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = Lion([p], 3e-4, (0.95, 0.98), 0.1)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.95, 0.98), 0.1)
    default = Lion([p]).param_groups[0]
    assert (default["lr"], default["betas"], default["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)


BAD_ARGUMENTS = [
    ({"lr": -1e-3}, ValueError, "-0.001"),
    ({"lr": 0.0}, ValueError, "lr must be"),
    ({"lr": float("nan")}, ValueError, "nan"),
    ({"lr": float("inf")}, ValueError, "inf"),
    ({"betas": (1.0, 0.99)}, ValueError, "beta1 must be in \\[0, 1\\), got 1.0"),
    ({"betas": (0.9, -0.1)}, ValueError, "beta2 must be in \\[0, 1\\), got -0.1"),
    ({"betas": (0.9,)}, ValueError, "\\(0.9,\\)"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be a finite number >= 0, got -0.1"),
    ({"cautious_factor": 1.5}, ValueError, "cautious_factor must be .* got 1.5"),
    ({"cautious_factor": -0.5}, ValueError, "got -0.5"),
    ({"backend": "cuda_magic"}, ValueError, "backend must be one of .* got 'cuda_magic'"),
    ({"momentum_dtype": torch.float16}, ValueError, "momentum_dtype .* got torch.float16"),
    ({"nonfinite": "sometimes"}, ValueError, "nonfinite must be one of .* got 'sometimes'"),
    ({"batch_size_policy": "shout"}, ValueError, "batch_size_policy must be one of .* got 'shout'"),
    ({"micro_batch_size": 0}, ValueError, "micro_batch_size must be a positive int, got 0"),
    ({"maximize": "yes"}, TypeError, "maximize must be a bool, got 'yes'"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
    ({"seed": None}, TypeError, "seed must be an int, got None"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_value(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        Lion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_raises_and_leaves_groups_intact() -> None:
    opt = Lion([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="got -3"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -3})
    assert len(opt.param_groups) == 1


def test_non_float_params_are_rejected_and_complex_ones_are_real_views() -> None:
    """Complex params step as their real views (tests/test_contract.py::test_complex); integers are refused."""
    with pytest.raises(TypeError, match=r"floating-point params .* got one of dtype torch.int64"):
        Lion([torch.zeros(2, dtype=torch.int64)])
    z = torch.tensor([1 + 2j, -3 - 0.5j], requires_grad=True)
    z.grad = torch.tensor([1 - 1j, 0 + 2j])
    Lion([z], lr=0.5, batch_size_policy="ignore").step()
    assert torch.equal(z.detach(), torch.tensor([0.5 + 2.5j, -3.0 - 1.0j]))  # sign of each part: not z / |z|


def test_sparse_gradient_steps_as_its_dense_values() -> None:
    """`nn.Embedding(sparse=True)` works (as with lion-pytorch): a row with momentum but no gradient this step
    (row 0 at step 1) moves by sign(b1 * m), exactly as with the dense gradient."""
    sparse, dense = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3)
    dense.load_state_dict(sparse.state_dict())
    opts = [Lion(m.parameters(), lr=0.1, batch_size_policy="ignore") for m in (sparse, dense)]
    for step in range(2):
        for module, opt in zip((sparse, dense), opts, strict=True):
            module(torch.tensor([1, 2, step])).sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(sparse.weight, dense.weight)


def test_bad_lr_from_a_scheduler_raises_at_step() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = Lion([p])
    opt.param_groups[0]["lr"] = float("nan")
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="got nan"):
        opt.step()


def test_named_parameters_are_accepted() -> None:
    model = torch.nn.Linear(3, 2)
    opt = Lion(model.named_parameters(), lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert len(opt.state) == 2


@pytest.mark.parametrize(("lr", "wd"), list(itertools.product([1e-4, 3e-2], [0.0, 1.0])))
def test_reference_against_the_spec_by_hand(lr: float, wd: float) -> None:
    """The reference, checked against the paper's formulas evaluated element by element in float64."""
    gen = torch.Generator().manual_seed(7)
    p, g, m = (torch.randn(50, generator=gen) for _ in range(3))
    p2, m2 = p.clone(), m.clone()
    lion_reference(p2, g, m2, LionHyperparams(lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd))
    for i in range(50):
        c = 0.9 * m[i].item() + 0.1 * g[i].item()
        u = (c > 0) - (c < 0)
        expected_p = p[i].item() * (1 - lr * wd) - lr * u
        expected_m = 0.99 * m[i].item() + 0.01 * g[i].item()
        assert p2[i].item() == pytest.approx(expected_p, rel=1e-6, abs=1e-7)
        assert m2[i].item() == pytest.approx(expected_m, rel=1e-6, abs=1e-7)
