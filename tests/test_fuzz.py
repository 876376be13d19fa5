"""Fuzzed inputs: every constructor argument, param group and state dict is either accepted and works, or
raises a clear ValueError/TypeError/KeyError; never a crash deep inside torch, never a silent bad state.

Deterministic: hypothesis derives its examples from each test (`derandomize=True`) and keeps no database between
runs, so a green run means the same thing every time and in CI."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lion_dist import Lion

CLEAR_ERRORS = (ValueError, TypeError, KeyError)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    st.lists(st.floats(-2, 2), max_size=3),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.tensor(0.5)]),
)
ARGUMENTS = [
    "lr",
    "betas",
    "weight_decay",
    "decoupled_weight_decay",
    "cautious_factor",
    "cautious_wd",
    "maximize",
    "momentum_dtype",
    "backend",
    "use_triton",
    "stochastic_rounding",
    "seed",
    "nonfinite",
    "global_batch_size",
    "micro_batch_size",
    "grad_accum_steps",
    "min_batch_size",
    "batch_size_policy",
]
plausible = {
    "lr": st.one_of(st.floats(1e-6, 1.0), junk),
    "betas": st.one_of(st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)), junk),
    "weight_decay": st.one_of(st.floats(0, 2), junk),
    "cautious_factor": st.one_of(st.none(), st.floats(0, 1), junk),
    "momentum_dtype": st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, "float32"]),
    "backend": st.sampled_from(["auto", "reference", "foreach", "cpu_fused", "gpu", ""]),
    "nonfinite": st.sampled_from(["skip", "error", "ignore", "SKIP", None]),
    "batch_size_policy": st.sampled_from(["warn", "error", "ignore", "loud"]),
}


def kwargs_strategy():
    values = {name: plausible.get(name, st.one_of(st.booleans(), st.integers(-3, 200), junk)) for name in ARGUMENTS}
    return st.dictionaries(st.sampled_from(ARGUMENTS), st.nothing()).flatmap(
        lambda _: st.fixed_dictionaries({}, optional=values)
    )


def step_once(opt: Lion, params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.linspace(-1, 1, p.numel()).reshape(p.shape).to(p.dtype)
    opt.step()


@FUZZ
@given(kwargs=kwargs_strategy())
def test_constructor_arguments(kwargs: dict) -> None:
    params = [torch.randn(3, 2, requires_grad=True), torch.randn(5, requires_grad=True)]
    try:
        opt = Lion(params, **kwargs)
    except CLEAR_ERRORS as error:
        assert str(error), "an error must say what is wrong"
        return
    if opt.param_groups[0]["backend"] in ("triton", "cpu_fused"):
        return  # accepted; whether that backend can run here is the kernels' tests' business
    try:
        step_once(opt, params)
    except CLEAR_ERRORS:
        return  # e.g. batch_size_policy="error" with a small declared batch
    lr = opt.param_groups[0]["lr"]
    if float(lr) < 1e3:  # lr x weight_decay >= 1 is refused, so decay never overflows
        assert all(torch.isfinite(p).all() for p in params)
    assert all(set(s) == {"exp_avg"} for s in opt.state.values())


@FUZZ
@given(group=st.dictionaries(st.sampled_from([*ARGUMENTS[:10], "eps", "foo"]), junk, max_size=4))
def test_param_groups(group: dict) -> None:
    opt = Lion([torch.zeros(2, requires_grad=True)], batch_size_policy="ignore")
    extra = torch.ones(4, requires_grad=True)
    for name in ("backend", "use_triton"):
        group.pop(name, None)
    try:
        opt.add_param_group({"params": [extra], **group})
    except CLEAR_ERRORS:
        assert len(opt.param_groups) == 1
        return
    assert len(opt.param_groups) == 2
    step_once(opt, [extra])
    if float(opt.param_groups[1]["lr"]) < 1e3:  # lr x weight_decay >= 1 is refused, so decay never overflows
        assert torch.isfinite(extra).all()


def trained_optimizer():
    params = [torch.randn(3, 2, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = Lion(params, lr=1e-2, batch_size_policy="ignore")
    step_once(opt, params)
    return opt, params


state_mutations = st.sampled_from(
    [
        "drop_state",
        "drop_groups",
        "drop_exp_avg",
        "extra_key",
        "wrong_shape",
        "int_dtype",
        "bf16_dtype",
        "not_tensor",
        "adam_state",
        "group_lr_negative",
        "group_betas_bad",
        "too_many_groups",
        "too_few_params",
        "not_a_dict",
        "missing_param_state",
        "unknown_group_key",
    ]
)


def valid_betas(betas: object) -> bool:
    return (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in betas)
    )


def mutate(sd: dict, how: str, data) -> object:
    state = sd["state"]
    if how == "drop_state":
        del sd["state"]
    elif how == "drop_groups":
        del sd["param_groups"]
    elif how == "drop_exp_avg":
        del state[0]["exp_avg"]
    elif how == "extra_key":
        state[0]["step"] = torch.tensor(3.0)
    elif how == "wrong_shape":
        state[1]["exp_avg"] = torch.zeros(data.draw(st.integers(0, 7).filter(lambda n: n != 5)))
    elif how == "int_dtype":
        state[0]["exp_avg"] = state[0]["exp_avg"].to(torch.int32)
    elif how == "bf16_dtype":
        state[0]["exp_avg"] = state[0]["exp_avg"].to(torch.bfloat16)
    elif how == "not_tensor":
        state[0]["exp_avg"] = data.draw(junk)
    elif how == "adam_state":
        for s in state.values():
            s["exp_avg_sq"] = torch.zeros_like(s["exp_avg"])
            s["step"] = torch.tensor(1.0)
    elif how == "group_lr_negative":
        sd["param_groups"][0]["lr"] = -data.draw(st.floats(1e-9, 10))
    elif how == "group_betas_bad":
        sd["param_groups"][0]["betas"] = data.draw(junk.filter(lambda b: not valid_betas(b)))
    elif how == "too_many_groups":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    elif how == "too_few_params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif how == "not_a_dict":
        return data.draw(junk)
    elif how == "missing_param_state":
        del state[1]
    elif how == "unknown_group_key":
        sd["param_groups"][0]["max_lr"] = 1.0  # schedulers (OneCycleLR) add keys like this
    return sd


@FUZZ
@given(how=state_mutations, data=st.data())
def test_state_dicts(how: str, data) -> None:
    source, _ = trained_optimizer()
    sd = mutate(copy.deepcopy(source.state_dict()), how, data)
    target, params = trained_optimizer()
    before = copy.deepcopy(target.state_dict())
    try:
        target.load_state_dict(sd)
    except CLEAR_ERRORS as error:
        assert str(error)
        after = target.state_dict()  # nothing was lost or half-loaded
        assert after["param_groups"] == before["param_groups"]
        for key, s in before["state"].items():
            assert torch.equal(after["state"][key]["exp_avg"], s["exp_avg"])
        return
    assert how in ("bf16_dtype", "missing_param_state", "unknown_group_key", "extra_key", "adam_state")
    assert all(s["exp_avg"].dtype == torch.float32 for s in target.state.values())
    for key, saved in sd["state"].items():  # keys of no Lion format (a wrapper's) are carried as they are
        loaded = target.state_dict()["state"][key]
        assert all(torch.equal(loaded[k], v) for k, v in saved.items() if k != "exp_avg")
    step_once(target, params)
    assert all(torch.isfinite(p).all() for p in params)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(-2, 2), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
lion_params = st.dictionaries(
    st.sampled_from([*ARGUMENTS, "eps", "lr ", "train_batch_size"]),
    st.one_of(json_values, st.sampled_from(["bfloat16", "float32", "fp16", "warn", "skip", "auto"])),
    max_size=4,
)
optimizer_sections = st.one_of(
    json_values,
    st.just({"type": "LionDist", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "momentum_dtype": "bfloat16"}}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["LionDist", "liondist", "Lion", "AdamW", 3])},
        optional={"params": st.one_of(lion_params, json_values), "extra": json_values},
    ),
)


@FUZZ
@given(section=optimizer_sections, top=st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_deepspeed_config_dicts(section, top: dict) -> None:
    """The "LionDist" entry is read before DeepSpeed starts: a good one yields working Lion arguments."""
    from lion_dist.deepspeed import lion_kwargs, load_config

    config = load_config({**top, "optimizer": section})
    try:
        kwargs = lion_kwargs(config)
    except CLEAR_ERRORS as error:
        assert str(error)
        return
    if kwargs is None:  # another optimizer: DeepSpeed's business
        assert not (isinstance(section, dict) and section.get("type") == "LionDist")
        return
    params = [torch.ones(3, requires_grad=True)]
    opt = Lion(params, **{"batch_size_policy": "ignore", **kwargs})
    for p in params:
        p.grad = torch.ones(3)
    if opt.param_groups[0]["backend"] != "triton":
        opt.step()
        assert set(opt.state[params[0]]) == {"exp_avg"}
