"""The step engine: dispatch by declared capability, the cached per-group plan and its invalidation, fp16 and
fp64 on every path, tensor lr, and a module graph without import circles.

Every check compares against `spec.lion_reference` run on copies, bit for bit.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lion_dist import Lion, backends, spec
from lion_dist.backends import FUSED_TRIPLES, Need
from lion_dist.spec import LionHyperparams, lion_reference
from tests.conftest import assert_same

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ROOT = Path(__file__).resolve().parents[1]
HP = LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
SHAPES = [(33, 7), (129,), (1,), (4, 5, 6)]


class Mirror:
    """The reference step on copies of an optimizer's params: what every step must produce."""

    def __init__(self, params, momentum_dtype=None) -> None:
        self.params = [p.detach().clone() for p in params]
        self.moms = [torch.zeros_like(p, dtype=momentum_dtype or p.dtype) for p in params]

    def step(self, grads, hp: LionHyperparams, only=None) -> None:
        for i, (p, m, g) in enumerate(zip(self.params, self.moms, grads, strict=True)):
            if g is not None and (only is None or i in only):
                lion_reference(p, g, m, hp)


def route_names(opt: Lion, gi: int = 0) -> list[str]:
    (plan,) = list(opt._plans._plans[gi].values())[-1:]
    return sorted(route.backend.name for route in plan.routes)


# ---------------------------------------------------------------------------------------------- dispatch

TRIPLES = list(itertools.product([FP32, BF16, FP16, FP64], repeat=3))


@pytest.mark.parametrize("triple", TRIPLES, ids=lambda t: "-".join(str(d).removeprefix("torch.") for d in t))
def test_auto_routes_every_dtype_triple_to_a_backend_that_takes_it(triple) -> None:
    """Fused triples go to the C kernel, the rest (fp64 mixed with others) to foreach; all equal the reference."""
    p_dtype, g_dtype, m_dtype = triple
    expected = "cpu_fused" if triple in FUSED_TRIPLES else "foreach"
    need = Need("cpu", triple)
    assert backends.select("auto", need) == expected
    assert backends.refusal(expected, need) is None

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(p_dtype).requires_grad_() for s in SHAPES]
    opt = Lion(params, lr=3e-3, weight_decay=0.1, batch_size_policy="ignore")
    mirror = Mirror(params)
    mirror.moms = [m.to(m_dtype) for m in mirror.moms]
    for p in params:  # the momentum dtype the triple asks for
        opt.state[p]["exp_avg"] = torch.zeros_like(p, dtype=m_dtype)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(g_dtype) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad_dtype = None  # torch refuses a gradient of another dtype unless told
            p.grad = g
        opt.step()
        mirror.step(grads, HP)
    assert route_names(opt) == [expected]
    assert_same(params + [opt.state[p]["exp_avg"] for p in params], mirror.params + mirror.moms)


def test_requested_backend_that_refuses_a_tensor_raises_naming_it() -> None:
    """No backend falls back: a requested one that cannot take a tensor says so, and which tensor."""
    p = torch.zeros(3, dtype=FP64, requires_grad=True)
    opt = Lion([("w", p)], backend="cpu_fused", momentum_dtype=torch.float32)
    p.grad = torch.ones(3, dtype=FP64)
    with pytest.raises(ValueError, match=r"w: backend='cpu_fused' cannot update .*float64.*float32.*backend='auto'"):
        opt.step()
    cautious = Lion([torch.zeros(3, requires_grad=True)], backend="cpu_fused", cautious_factor=0.5)
    cautious.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="cautious Lion needs a per-tensor pass"):
        cautious.step()


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpu_fused"])
def test_fp64_params_do_fp64_math(backend: str) -> None:
    """0.1 - 1e-3 in double is 0.099 (fp32 math would give 0.0989999994635582)."""
    p = torch.full((5,), 0.1, dtype=FP64, requires_grad=True)
    opt = Lion([p], lr=1e-3, backend=backend)
    p.grad = torch.ones(5, dtype=FP64)
    opt.step()
    assert p.detach().tolist() == [0.1 - 1e-3] * 5 and (0.1 - 1e-3) != 0.0989999994635582
    assert opt.state[p]["exp_avg"].dtype == FP64 and opt.state[p]["exp_avg"][0].item() == 1 - 0.99


def test_strided_params_reach_the_fused_kernel_through_staged_copies() -> None:
    base = torch.randn(8, 6)
    p = base.t().requires_grad_()  # a view: not contiguous
    mirror = Mirror([p])
    opt = Lion([p], lr=3e-3, weight_decay=0.1, backend="cpu_fused")
    for _ in range(3):
        g = torch.randn(6, 8).t().contiguous().t()  # a non-contiguous grad too
        p.grad = g
        opt.step()
        mirror.step([g], HP)
    assert route_names(opt) == ["cpu_fused"]
    assert p.data_ptr() == base.data_ptr()  # the param itself was updated
    assert_same([p, opt.state[p]["exp_avg"]], mirror.params + mirror.moms)


def test_params_sharing_memory_are_refused() -> None:
    flat = torch.zeros(10)
    a, b = flat[:6].requires_grad_(), flat[4:].requires_grad_()  # overlap in elements 4 and 5
    opt = Lion([("a", a), ("b", b)])
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    with pytest.raises(ValueError, match="param of a and the param of b share memory"):
        opt.step()
    disjoint = Lion([flat[:5].requires_grad_(), flat[5:].requires_grad_()], batch_size_policy="ignore")
    for q in disjoint.param_groups[0]["params"]:
        q.grad = torch.ones(5)
    disjoint.step()  # views that do not overlap are fine (FSDP1's use_orig_params hands over such views)


# ---------------------------------------------------------------------------------------------- the plan


class CountPrepares:
    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        backend = backends.get("cpu_fused")
        prepare = backend.prepare

        def counted(entries):
            self.calls += 1
            return prepare(entries)

        monkeypatch.setattr(backend, "prepare", counted)


def test_the_plan_is_built_once_and_reused(monkeypatch) -> None:
    counter = CountPrepares(monkeypatch)
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    opt = Lion(params, lr=3e-3, weight_decay=0.1, batch_size_policy="ignore")
    mirror = Mirror(params)
    for _ in range(5):
        grads = [torch.randn(p.shape) for p in params]  # new gradient tensors every step
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        mirror.step(grads, HP)
        opt.param_groups[0]["lr"] = 3e-3  # a scheduler writing lr each step changes nothing of the plan
    assert counter.calls == 1 and len(opt._plans) == 1
    assert_same(params, mirror.params)


def _between_steps_cases():
    """Each: a change made between steps, and what the reference must do in that step."""

    def swap_grad(opt, params, grads):
        grads[0] = torch.randn(params[0].shape)  # a new tensor
        return HP, None

    def grad_none(opt, params, grads):
        grads[1] = None
        return HP, {0, 2, 3}

    def grad_dtype(opt, params, grads):
        grads[2] = grads[2].to(BF16)
        return HP, None

    def grad_strided(opt, params, grads):
        grads[0] = torch.randn(params[0].shape[::-1]).t()
        return HP, None

    def lr_change(opt, params, grads):
        opt.param_groups[0]["lr"] = 7e-4
        return LionHyperparams(lr=7e-4, beta1=0.9, beta2=0.99, weight_decay=0.1), None

    def param_storage(opt, params, grads):
        params[3].data = params[3].data.clone()  # new storage: the plan's addresses are stale
        return HP, None

    def load_state_dict(opt, params, grads):
        saved = opt.state_dict()
        for s in saved["state"].values():
            s["exp_avg"] = s["exp_avg"].clone()
        opt.load_state_dict(saved)  # new momentum tensors
        return HP, None

    def backend_change(opt, params, grads):
        opt.param_groups[0]["backend"] = "foreach"
        return HP, None

    return {
        f.__name__: f
        for f in (
            swap_grad,
            grad_none,
            grad_dtype,
            grad_strided,
            lr_change,
            param_storage,
            load_state_dict,
            backend_change,
        )
    }


@pytest.mark.parametrize("change", list(_between_steps_cases()))
def test_plan_invalidation(change: str) -> None:
    """A change between steps is seen by the next step: it equals the reference step with the change."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = Lion(params, lr=3e-3, weight_decay=0.1, batch_size_policy="ignore")
    mirror = Mirror(params)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        hp, only = _between_steps_cases()[change](opt, params, grads) if step == 2 else (HP, None)
        for p, g in zip(params, grads, strict=True):
            p.grad_dtype = None  # torch refuses a gradient of another dtype unless told
            p.grad = g
        opt.step()
        mirror.step([g if only is None or i in only else None for i, g in enumerate(grads)], hp)
        if step == 2 and change == "lr_change":
            opt.param_groups[0]["lr"] = 3e-3
    assert_same(params, mirror.params)
    assert_same([opt.state[p]["exp_avg"] for p in params], mirror.moms)
    if change == "backend_change":
        assert route_names(opt) == ["foreach"]


def test_a_new_param_group_is_planned_and_stepped() -> None:
    a, b = torch.randn(5).requires_grad_(), torch.randn(7).requires_grad_()
    opt = Lion([a], lr=3e-3, weight_decay=0.1, batch_size_policy="ignore")
    mirror = Mirror([a, b])
    for step in range(3):
        if step == 1:
            opt.add_param_group({"params": [b]})
        grads = [torch.randn(5), torch.randn(7)]
        a.grad, b.grad = grads[0], grads[1] if step >= 1 else None
        opt.step()
        mirror.step(grads, HP, only={0, 1} if step >= 1 else {0})
    assert_same([a, b], mirror.params)


def test_tensor_lr_equals_float_lr() -> None:
    """A 1-element tensor lr, as torch optimizers accept (and schedulers then write in place)."""
    results = []
    for lr in (3e-3, torch.tensor(3e-3, dtype=FP64)):
        gen = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
        opt = Lion(params, lr=lr, weight_decay=0.1, batch_size_policy="ignore")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(params)
    assert_same(*results)


# ---------------------------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("backend", ["foreach", "cpu_fused"])
def test_stochastic_rounding_equals_the_reference_bit_for_bit(backend: str) -> None:
    """Every path draws the spec's Philox noise for each element: the same bits as the reference."""

    def run(name):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen).to(BF16).requires_grad_() for s in [*SHAPES, (3000,)]]
        opt = Lion(
            params,
            lr=1e-3,
            weight_decay=0.1,
            stochastic_rounding=True,
            seed=5,
            backend=name,
            batch_size_policy="ignore",
        )
        for _ in range(3):
            for p in params:
                p.grad_dtype = None
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    assert_same(run(backend), run("reference"))


def test_noise_depends_on_param_and_element_not_on_the_launch() -> None:
    """Two equal params get different noise; a tensor's noise does not depend on what else is in the step."""
    stream = spec.NoiseStream(key=123, param_id=4, base=10)
    assert not torch.equal(spec.sr_noise(stream, 64), spec.sr_noise(spec.NoiseStream(123, 5, 10), 64))
    whole = spec.sr_noise(spec.NoiseStream(123, 4, 0), 100)
    assert torch.equal(whole[10:74], spec.sr_noise(stream, 64))  # a shard at offset 10 draws the whole's noise
    assert int(whole.min()) >= 0 and int(whole.max()) < 1 << 16


def test_philox_reference_matches_the_published_known_answers() -> None:
    """Random123's known-answer vectors for Philox-4x32-10."""
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            0x299F31D0 << 32 | 0xA4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        out = spec.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(o) for o in out) == expected


# ---------------------------------------------------------------------------------------------- structure


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The lion_dist modules `path` imports at run time (`from lion_dist import spec` imports lion_dist.spec;
    imports under `if TYPE_CHECKING:` are for annotations only)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lion_dist"):
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lion_dist")}
    return found


def test_import_lion_dist_loads_no_backend_and_builds_nothing(tmp_path) -> None:
    """Backends load when first used: `import lion_dist` imports no backend module and compiles no kernel."""
    code = (
        "import sys, lion_dist; "
        "print(sorted(m for m in sys.modules if m.startswith('lion_dist.backends.')))"
    )
    env = {**os.environ, "LION_DIST_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    assert not any(tmp_path.iterdir())  # no kernel was built


def test_spec_is_at_the_bottom_and_nothing_imports_in_a_circle() -> None:
    package = ROOT / "lion_dist"
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in package.rglob("*.py")
    }
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert graph["lion_dist.spec"] == set()
    backends_ = {name for name in graph if name.startswith("lion_dist.backends")}
    assert {"lion_dist.backends.cpu", "lion_dist.backends.triton.kernels"} <= backends_
    for name in backends_:  # the backends know the contract and the math, nothing of the optimizer
        assert graph[name] <= backends_ | {"lion_dist.spec"}, (name, graph[name])

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        for dep in graph[name]:
            if not (dep == "lion_dist" or name.startswith(dep + ".")):  # a package's own __init__ is not a cycle
                visit(dep, (*path, name))

    for name in graph:
        visit(name, ())
