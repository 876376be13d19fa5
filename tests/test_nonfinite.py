"""Non-finite gradients: "skip" skips the whole step on every rank, "error" raises naming the param, neither
ever writes a NaN into params or momentum; "ignore" does no check."""

from __future__ import annotations

import warnings

import pytest
import torch

from lion_dist import Lion, NonFiniteGradientError
from tests.distributed import spawn


def model_and_opt(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = Lion(model.named_parameters(), lr=0.1, weight_decay=0.1, batch_size_policy="ignore", **kwargs)
    return model, opt


def set_grads(model, poison: str | None = None, value: float = float("nan")) -> None:
    for name, p in model.named_parameters():
        p.grad = torch.ones_like(p)
        if name == poison:
            p.grad.view(-1)[1] = value


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], [s["exp_avg"].clone() for s in opt.state.values()]


def assert_unchanged(before, after) -> None:
    for x, y in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
def test_skip_leaves_everything_unchanged_counts_and_warns_once(bad: float, backend: str) -> None:
    model, opt = model_and_opt(nonfinite="skip", backend=backend)
    set_grads(model)
    opt.step()  # creates state
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        set_grads(model, poison="1.weight", value=bad)
        opt.step()
    assert_unchanged(before, snapshot(model, opt))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second skip is counted, not warned again
        opt.step()
    assert opt.skipped_steps == 2
    set_grads(model)
    opt.step()
    assert opt.skipped_steps == 2
    assert not torch.equal(before[0][0], model[0].weight.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_error_names_the_param_and_changes_nothing() -> None:
    model, opt = model_and_opt(nonfinite="error")
    set_grads(model)
    opt.step()
    before = snapshot(model, opt)
    set_grads(model, poison="0.bias")
    with pytest.raises(NonFiniteGradientError, match=r"in 0\.bias on rank 0.*nonfinite='skip'"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


def test_error_names_unnamed_params_by_position() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = Lion([torch.zeros(2, requires_grad=True), p], nonfinite="error", batch_size_policy="ignore")
    p.grad = torch.tensor([0.0, float("inf"), 0.0])
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(3,\)\)"):
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
def test_ignore_does_not_check_and_nan_shows_up_in_the_param(backend: str) -> None:
    """No silent +lr or frozen coordinate: the NaN propagates where it can be seen."""
    model, opt = model_and_opt(nonfinite="ignore", backend=backend)
    set_grads(model, poison="0.weight")
    opt.step()
    assert torch.isnan(model[0].weight).sum() == 1
    assert opt.skipped_steps == 0


def _skip_on_every_rank(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # identical replicas
    model = torch.nn.Linear(4, 2)
    opt = Lion(model.parameters(), lr=0.1, nonfinite="skip", batch_size_policy="ignore")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if rank == 1:
        model.weight.grad[0, 0] = float("nan")  # only rank 1 sees it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    unchanged = all(torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))
    return {"unchanged": unchanged, "skipped": opt.skipped_steps, "warned": len(caught)}


def _error_on_every_rank(rank: int, world_size: int) -> str:
    model = torch.nn.Linear(4, 2)
    opt = Lion(model.named_parameters(), nonfinite="error", batch_size_policy="ignore")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if rank == 0:
        model.bias.grad[1] = float("inf")
    try:
        opt.step()
    except NonFiniteGradientError as error:
        return str(error)
    return "no error"


@pytest.mark.slow
def test_skip_and_error_agree_across_ranks() -> None:
    results = spawn(_skip_on_every_rank, 2)
    assert [r["unchanged"] for r in results] == [True, True]
    assert [r["skipped"] for r in results] == [1, 1]
    assert [r["warned"] for r in results] == [1, 0]  # rank 0 only
    messages = spawn(_error_on_every_rank, 2)
    assert "in bias on rank 0" in messages[0]
    assert "on another rank (not on rank 1)" in messages[1]
