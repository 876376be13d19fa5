"""torch.optim's generic contract, for `lion_dist.Lion` on every CPU backend.

An `OptimizerInfo` (torch/testing/_internal/common_optimizers.py, shipped in the wheel) describes Lion: a spread
of constructor kwargs (`optim_inputs_func`) and inputs that must fail (`optim_error_inputs_func`). The tests are
ours, written after what torch's `TestOptimRenewed` (test/test_optim.py, not in the wheel) checks for its own
optimizers: errors, descent, schedulers and tensor lr, param groups, closures, zero and missing gradients,
state_dict round trips (with and without deepcopy, weights_only, older dicts), hooks, complex and
non-contiguous params, printing, and every backend giving the same bits. The Triton backend runs a subset of
them in Triton's interpreter (tests/test_triton_kernel.py, `contract_holds_for_the_triton_backend`).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

pytest.importorskip("expecttest", reason="torch.testing._internal imports expecttest: pip install expecttest")
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from lion_dist import Lion
from lion_dist.backends import capabilities
from tests.conftest import bits

BACKENDS = ("reference", "foreach", "cpu_fused", "auto")
QUIET = {"batch_size_policy": "ignore"}


def lion_inputs(device: str = "cpu", dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """Constructor kwargs to run every generic test with (params are the test's)."""
    inputs = [
        ({}, "default"),
        ({"lr": 0.01}, "non-default lr"),
        ({"lr": torch.tensor(0.001)}, "tensor lr"),
        ({"weight_decay": 0.1}, "weight decay"),
        ({"weight_decay": 3e-3, "decoupled_weight_decay": True}, "decoupled weight decay"),
        ({"weight_decay": 0.1, "maximize": True}, "maximize"),
        ({"betas": (0.95, 0.98)}, "betas"),
        ({"cautious_factor": 0.5, "weight_decay": 0.1}, "cautious"),
        ({"cautious_factor": 0.0, "cautious_wd": True, "weight_decay": 0.1}, "cautious weight decay"),
        ({"momentum_dtype": torch.float32}, "fp32 momentum"),
        ({"momentum_dtype": torch.bfloat16}, "bf16 momentum"),  # complex params: a bf16 real view
        ({"stochastic_rounding": True, "seed": 7}, "stochastic rounding"),
    ]
    return [OptimizerInput(params=None, kwargs={**QUIET, **kwargs}, desc=desc) for kwargs, desc in inputs]


def lion_error_inputs(device: str = "cpu", dtype: torch.dtype | None = None) -> list[ErrorOptimizerInput]:
    """Inputs that must fail, when (construction or step), how and saying what."""
    p = lambda: [torch.zeros(2, 3, requires_grad=True)]  # noqa: E731

    def error(kwargs, regex, error_type=ValueError, on=OptimizerErrorEnum.CONSTRUCTION_ERROR, params=None):
        return ErrorOptimizerInput(
            OptimizerInput(params=params or p(), kwargs={**QUIET, **kwargs}),
            error_on=on,
            error_type=error_type,
            error_regex=regex,
        )

    return [
        error({"lr": -1e-3}, "lr must be a finite number > 0, got -0.001"),
        error({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
        error({"betas": (1.0, 0.99)}, r"beta1 must be in \[0, 1\), got 1.0"),
        error({"betas": (0.9, -0.1)}, r"beta2 must be in \[0, 1\), got -0.1"),
        error({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
        error({"lr": 0.5, "weight_decay": 2.0}, r"lr x weight_decay = 0.5 x 2.0 = 1.0 >= 1"),
        error({}, "Lion optimizes floating-point params", TypeError, params=[torch.zeros(3, dtype=torch.int64)]),
        error({"backend": "cuda_magic"}, "backend must be one of"),
    ]


LION = OptimizerInfo(
    Lion,
    optim_inputs_func=lion_inputs,
    optim_error_inputs_func=lion_error_inputs,
    scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],),
    supported_impls=(),
    supports_sparse=False,
    has_capturable_arg=True,
    supports_complex=True,
)
INPUTS = {i.desc: i for i in LION.optim_inputs_func("cpu")}


def make(kwargs: dict, backend: str, params) -> Lion:
    return LION.optim_cls(params, **{"backend": backend, **kwargs})


def takes(backend: str, kwargs: dict) -> bool:
    """Whether `backend` declares what these kwargs need (a fused kernel has no cautious variant)."""
    cautious = kwargs.get("cautious_factor") is not None or kwargs.get("cautious_wd", False)
    return backend == "auto" or not cautious or capabilities(backend).cautious


def cases(descs=None) -> list[tuple[str, str]]:
    """(input, backend) pairs where the backend takes the input; the others must refuse (test_refusals)."""
    return [(d, b) for d in descs or INPUTS for b in BACKENDS if takes(b, INPUTS[d].kwargs)]


def fresh(kwargs: dict) -> dict:
    """A deep copy of the kwargs (a tensor lr must not be shared between optimizers)."""
    return copy.deepcopy(kwargs)


def problem(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A small least-squares problem: [weight, bias] and the input x."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 5, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(10, generator=gen).to(dtype).requires_grad_()
    return [weight, bias], torch.randn(5, generator=gen).to(dtype)


def loss_of(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    weight, bias = params
    return ((weight @ x + bias) ** 2).sum().float()


def run(opt: Lion, params, x: torch.Tensor, steps: int = 10, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        value = loss_of(params, x)
        value.backward()
        losses.append(value.item())
        opt.step()
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(value.item())
        elif scheduler is not None:
            scheduler.step()
    return losses


def same(a, b) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- the checks
# Plain functions of (kwargs, backend) so that the Triton backend runs them too, in Triton's interpreter.


def check_errors(backend: str) -> None:
    for case in LION.optim_error_inputs_func("cpu"):
        inp = case.optimizer_error_input
        if case.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(case.error_type, match=case.error_regex):
                make(inp.kwargs, backend, inp.params)


def check_goes_right_direction(kwargs: dict, backend: str, with_scheduler: bool) -> None:
    params, x = problem()
    opt = make(fresh(kwargs), backend, params)
    schedulers = [None] if not with_scheduler else [f(opt) for f in LION.scheduler_inputs[0]]
    losses = run(opt, params, x, steps=20, scheduler=schedulers[-1])
    if kwargs.get("maximize"):
        assert losses[-1] > losses[0]
    else:
        assert losses[-1] < losses[0]


def check_param_groups(kwargs: dict, backend: str) -> None:
    """Each group steps with its own lr: the bias, at 500x the weight's lr, moves far more."""
    (weight, bias), x = problem()
    opt = make(fresh(kwargs), backend, [{"params": [weight], "lr": 1e-4}, {"params": [bias], "lr": 0.05}])
    before = [weight.detach().clone(), bias.detach().clone()]
    run(opt, [weight, bias], x, steps=3)
    weight_moved, bias_moved = (
        (t.detach() - b).abs().max().item() for t, b in zip((weight, bias), before, strict=True)
    )
    assert bias_moved > 10 * weight_moved > 0


def check_zero_and_missing_grads(kwargs: dict, backend: str) -> None:
    """A zero gradient moves nothing (sign(0) = 0) unless there is weight decay; a missing one, never."""
    params, _ = problem()
    opt = make(fresh(kwargs), backend, params)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.zeros_like(params[0])  # params[1] has no grad
    opt.step()
    decays = kwargs.get("weight_decay", 0) != 0
    assert torch.equal(params[1].detach(), before[1]) and params[1] not in opt.state
    assert torch.equal(params[0].detach(), before[0]) != decays


def check_closure(kwargs: dict, backend: str) -> None:
    params, x = problem()
    opt = make(fresh(kwargs), backend, params)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        value = loss_of(params, x)
        value.backward()
        return value

    expected = loss_of(params, x).item()
    assert opt.step(closure).item() == expected and len(calls) == 1


def check_state_dict_round_trip(kwargs: dict, backend: str, deepcopied: bool) -> None:
    """A second optimizer loaded from the first's state dict continues exactly like the first."""
    params, x = problem()
    opt = make(fresh(kwargs), backend, params)
    run(opt, params, x, steps=3)
    state = copy.deepcopy(opt.state_dict()) if deepcopied else opt.state_dict()
    twins = [p.detach().clone().requires_grad_() for p in params]
    twin = make(fresh(kwargs), backend, twins)
    twin.load_state_dict(state)
    run(opt, params, x, steps=3)
    run(twin, twins, x, steps=3)
    assert same(params, twins)


def check_backends_agree(kwargs: dict, dtype: torch.dtype = torch.float32) -> None:
    results = []
    for backend in (b for b in BACKENDS if takes(b, kwargs)):
        params, x = problem(dtype=dtype)
        run(make(fresh(kwargs), backend, params), params, x, steps=5)
        results.append(params)
    assert all(same(results[0], other) for other in results[1:])


def check_complex(kwargs: dict, backend: str, shape: tuple[int, ...]) -> None:
    """A complex param steps as its real view: each real and imaginary part is an element with its own sign."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(*shape, dtype=torch.complex64, generator=gen).requires_grad_()
    r = torch.view_as_real(z.detach().clone()).requires_grad_()
    opt_z, opt_r = make(fresh(kwargs), backend, [z]), make(fresh(kwargs), backend, [r])
    for _ in range(4):
        g = torch.randn(*shape, dtype=torch.complex64, generator=gen)
        z.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
    assert same([torch.view_as_real(z.detach())], [r])
    assert opt_z.state[z]["exp_avg"].is_complex()
    assert torch.equal(torch.view_as_real(opt_z.state[z]["exp_avg"]), opt_r.state[r]["exp_avg"])


# ---------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend: str) -> None:
    check_errors(backend)


def test_refusals() -> None:
    """Where a requested backend does not take an input, the first step says so (no silent fallback)."""
    refused = [(d, b) for d in INPUTS for b in BACKENDS if not takes(b, INPUTS[d].kwargs)]
    assert refused
    for desc, backend in refused:
        params, x = problem()
        opt = make(fresh(INPUTS[desc].kwargs), backend, params)
        loss_of(params, x).backward()
        with pytest.raises(ValueError, match=f"backend='{backend}' cannot update .* cautious Lion needs"):
            opt.step()


def test_errors_at_step() -> None:
    p, dense = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt, dense_opt = Lion([p], **QUIET), Lion([dense], **QUIET)
    p.grad, dense.grad = torch.tensor([0.0, -2.0, 0.0]).to_sparse(), torch.tensor([0.0, -2.0, 0.0])
    opt.step()  # a sparse gradient is used as its dense values (lion-pytorch's result), not refused
    dense_opt.step()
    assert same([p, opt.state[p]["exp_avg"]], [dense, dense_opt.state[dense]["exp_avg"]])
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 2e-3])
    p.grad = torch.zeros(3)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.step()
    opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = 20.0, 0.1  # a schedule pushed lr too far
    with pytest.raises(ValueError, match=r"lr x weight_decay = 20.0 x 0.1 = 2.0 >= 1"):
        opt.step()


@pytest.mark.parametrize(("desc", "backend"), cases())
def test_goes_right_direction(desc: str, backend: str) -> None:
    check_goes_right_direction(INPUTS[desc].kwargs, backend, with_scheduler=False)
    check_goes_right_direction(INPUTS[desc].kwargs, backend, with_scheduler=True)


@pytest.mark.parametrize("desc", list(INPUTS))
def test_backends_agree_bit_for_bit(desc: str) -> None:
    check_backends_agree(INPUTS[desc].kwargs)
    check_backends_agree(INPUTS[desc].kwargs, torch.bfloat16)


@pytest.mark.parametrize(("desc", "backend"), cases())
def test_state_dict_round_trip(desc: str, backend: str) -> None:
    check_state_dict_round_trip(INPUTS[desc].kwargs, backend, deepcopied=False)
    check_state_dict_round_trip(INPUTS[desc].kwargs, backend, deepcopied=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_zero_grads_closures(backend: str) -> None:
    for desc in ("default", "weight decay", "tensor lr", "cautious"):
        kwargs = INPUTS[desc].kwargs
        if not takes(backend, kwargs):
            continue
        check_param_groups(kwargs, backend)
        check_zero_and_missing_grads(kwargs, backend)
        check_closure(kwargs, backend)


@pytest.mark.parametrize(
    ("desc", "backend"), cases(["default", "weight decay", "maximize", "cautious", "fp32 momentum"])
)
def test_complex(desc: str, backend: str) -> None:
    check_complex(INPUTS[desc].kwargs, backend, (6,))
    check_complex(INPUTS[desc].kwargs, backend, (3, 4))  # torch's test_complex_2d


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params_equal_contiguous_ones(backend: str) -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 4, generator=gen)
    strided = base.t().requires_grad_()
    dense = strided.detach().contiguous().requires_grad_()
    opts = [make(fresh(INPUTS["weight decay"].kwargs), backend, [t]) for t in (strided, dense)]
    for _ in range(3):
        g = torch.randn(4, 6, generator=gen)
        strided.grad, dense.grad = g.t().contiguous().t(), g.clone()
        for opt in opts:
            opt.step()
    assert same([strided], [dense])


def test_schedulers_write_a_tensor_lr_in_place() -> None:
    params, x = problem()
    lr = torch.tensor(0.01)
    opt = Lion(params, lr=lr, **QUIET)
    scheduler = StepLR(opt, step_size=1, gamma=0.5)
    run(opt, params, x, steps=2, scheduler=scheduler)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.0025)


def test_hooks_run_and_a_load_pre_hook_can_convert_a_foreign_state_dict() -> None:
    params, x = problem()
    opt = Lion(params, lr=0.01, **QUIET)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("step pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("step post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("state_dict pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "post"})
    run(opt, params, x, steps=1)
    saved = opt.state_dict()
    assert seen == ["step pre", "step post", "state_dict pre"] and saved["note"] == "post"

    foreign = copy.deepcopy(saved)  # another library's names for the same state
    del foreign["note"]
    for s in foreign["state"].values():
        s["momentum"] = s.pop("exp_avg")
    twin = Lion([p.detach().clone().requires_grad_() for p in params], **QUIET)

    def rename(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for s in state_dict["state"].values():
            s["exp_avg"] = s.pop("momentum")
        return state_dict

    twin.register_load_state_dict_pre_hook(rename)
    loaded = []
    twin.register_load_state_dict_post_hook(lambda o: loaded.append(True))
    twin.load_state_dict(foreign)  # checked after the hook: the converted dict
    assert loaded == [True]
    for p, q in zip(opt.param_groups[0]["params"], twin.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"])


def test_what_a_load_pre_hook_returns_is_checked() -> None:
    params, x = problem()
    opt = Lion(params, lr=0.01, **QUIET)
    run(opt, params, x, steps=1)
    saved = opt.state_dict()

    def bad(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = -5.0
        return state_dict

    twin = Lion([p.detach().clone().requires_grad_() for p in params], lr=0.02, **QUIET)
    twin.register_load_state_dict_pre_hook(bad)
    with pytest.raises(ValueError, match=r"got -5\.0"):
        twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == 0.02 and not twin.state  # left as it was


def test_a_saved_lr_of_zero_loads() -> None:
    """A warmup schedule from lr 0 saves lr 0 (Accelerate and the HF Trainer save and reload right away)."""
    params, x = problem()
    opt = Lion(params, lr=0.01, **QUIET)
    run(opt, params, x, steps=1)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.0
    twin = Lion([p.detach().clone().requires_grad_() for p in params], lr=0.01, **QUIET)
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == 0.0


def test_older_state_dicts_without_the_newer_keys_load() -> None:
    params, x = problem()
    opt = Lion(params, lr=0.01, weight_decay=0.1, **QUIET)
    run(opt, params, x, steps=2)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("capturable", "maximize", "stochastic_rounding", "seed", "step", "lr0"):
            group.pop(key)
    twins = [p.detach().clone().requires_grad_() for p in params]
    twin = Lion(twins, lr=0.01, weight_decay=0.1, **QUIET)
    twin.load_state_dict(old)
    assert twin.param_groups[0]["capturable"] is False and twin.param_groups[0]["step"] == 0
    for p, q in zip(params, twins, strict=True):
        p.grad = q.grad = torch.ones_like(p)
    opt.step()
    twin.step()
    assert same(params, twins)


def test_weights_only_save_and_load() -> None:
    params, x = problem()
    opt = Lion(params, lr=0.01, momentum_dtype=torch.bfloat16, stochastic_rounding=True, **QUIET)
    run(opt, params, x, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twin = Lion([p.detach().clone().requires_grad_() for p in params], **QUIET)
    twin.load_state_dict(loaded)
    assert twin.param_groups[0]["momentum_dtype"] == torch.bfloat16
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in twin.state.values())


def test_deepcopy_copies_everything_and_shares_nothing() -> None:
    params, x = problem()
    opt = Lion(params, lr=0.01, **QUIET)
    run(opt, params, x, steps=1)
    copied = copy.deepcopy(opt)
    assert all(copied.defaults[k] == v for k, v in opt.defaults.items())
    assert {k: v for k, v in copied.param_groups[0].items() if k != "params"} == {
        k: v for k, v in opt.param_groups[0].items() if k != "params"
    }
    for name in ("skipped_steps",):
        assert getattr(copied, name) == getattr(opt, name)
    for p, q in zip(opt.param_groups[0]["params"], copied.param_groups[0]["params"], strict=True):
        assert q is not p and torch.equal(q, p)
        assert copied.state[q]["exp_avg"] is not opt.state[p]["exp_avg"]


def test_printing_shows_the_hyperparameters() -> None:
    text = repr(Lion([torch.zeros(2, requires_grad=True)], lr=3e-4, weight_decay=0.1, **QUIET))
    assert text.startswith("Lion (") and "lr: 0.0003" in text and "weight_decay: 0.1" in text


def test_mixed_dtypes_in_one_group() -> None:
    gen = torch.Generator().manual_seed(3)
    params = [
        torch.randn(5, generator=gen).to(d).requires_grad_()
        for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ]
    results = []
    for backend in BACKENDS:
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = Lion(ps, lr=0.01, weight_decay=0.1, backend=backend, **QUIET)
        for _ in range(3):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        results.append(ps)
    assert all(same(results[0], other) for other in results[1:])
