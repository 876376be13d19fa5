"""The CPU kernel's Philox noise (`philox.h`) on each of its implementations, AVX-512, AVX2 and portable C: equal
to `spec.sr_noise` at odd bases and lengths (across the kernel's 1024-element tiles, 16-counter steps and the
2**32 boundary of the counter), and so are the stochastic steps built on it (bf16 params, int8 requantization)."""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from lion_dist import backends, spec
from lion_dist.backends import StepArgs
from lion_dist.backends.cpu import build as cpu_build
from lion_dist.backends.cpu import library as cpu_library
from tests.conftest import assert_same, entry

# flags that pick each implementation: x86-64 with AVX2 (and no AVX-512), and no vector extension at all
IMPLEMENTATIONS = {"avx2": ("-mavx2", "-mfma", "-mno-avx512f"), "portable": ()}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict:
    """The native build (the one in use) and, on x86-64, the AVX2 and portable ones, each by its Philox."""
    assert cpu_library.is_available(), cpu_library.unavailable_reason()
    libs = {cpu_library.philox_impl(): cpu_library.library().lib}
    if platform.machine() in ("x86_64", "AMD64"):
        for name, flags in IMPLEMENTATIONS.items():
            if name == "avx2" and "avx2" not in _cpu_flags():
                continue
            path = cpu_build.build(tmp_path_factory.mktemp(name), openmp=False, flags=flags)
            libs.setdefault(name, cpu_library.load(path))
    return libs


@pytest.fixture(params=["avx512", "avx2", "portable"])
def philox(request, libraries, monkeypatch) -> str:
    """Run the test with the kernel built for one Philox implementation."""
    lib = libraries.get(request.param)
    if lib is None:
        pytest.skip(f"no {request.param} build on this machine")
    monkeypatch.setattr(cpu_library, "library", lambda: cpu_library._Loaded(lib, None, 0.0, None))
    assert cpu_library.philox_impl() == request.param
    return request.param


BASES = [0, 1, 7, 8, 1023, 1 << 20, (8 << 32) - 13]  # the last crosses from counter 2**32 - 2 to 2**32 and on
LENGTHS = [1, 2, 7, 127, 128, 129, 1024, 1025, 5003]


def test_noise_equals_the_spec_at_odd_bases_and_lengths(philox) -> None:
    for i, base in enumerate(BASES):
        for numel in LENGTHS:
            stream = spec.NoiseStream(key=spec.sr_key(i, 3, numel), param_id=2**32 - 1 - i, base=base, shard=i)
            got = cpu_library.sr_noise(stream, numel)
            assert torch.equal(got, spec.sr_noise(stream, numel)), (base, numel)


def test_stochastic_steps_equal_the_reference(philox) -> None:
    """bf16 params with stochastic rounding and int8 momenta with stochastic requantization, at odd noise bases,
    in tensors that cross tiles and blocks of odd rows."""
    gen = torch.Generator().manual_seed(0)
    entries = []
    for k, n in enumerate([1, 1025, 3001]):
        p = torch.randn(n, generator=gen).bfloat16()
        entries.append(entry(p, torch.randn(n, generator=gen) * 0.1, torch.float32, k, 13 * k + 5))
    for k, (rows, cols) in enumerate([(3, 1111), (9, 130)]):
        codes, scales = spec.quantize_momentum(torch.randn(rows, cols, generator=gen), 128)
        p = torch.randn(rows, cols, generator=gen).bfloat16()
        entries.append(entry(p, codes, torch.bfloat16, 5 + k, 999 * k + 3, scales=scales))
    want = copy.deepcopy(entries)
    fused, reference = backends.get("cpu_fused"), backends.get("reference")
    prepared = fused.prepare(entries)
    hp = spec.LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    for step in range(2):
        grads = [torch.randn(e.param.shape, generator=gen).to(e.grad_dtype) for e in entries]
        key = spec.sr_key(1, 0, step)
        fused.step(prepared, grads, StepArgs(hp, sr_key=key, quant_key=key))
        reference.step(want, grads, StepArgs(hp, sr_key=key, quant_key=key))
        assert_same([t for e in entries for t in (e.param, *e.state)], [t for e in want for t in (e.param, *e.state)])
