"""The fused CPU kernel: equal to the reference bit for bit, for every dtype combination, any tensor layout and
any thread count; stochastic rounding reproducible and unbiased; the non-finite check; the cached, atomic build;
and `benchmarks/step.py` still runs."""

from __future__ import annotations

import itertools
import json
import os
import stat
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lion_dist import Lion, backends
from lion_dist.backends import Need
from lion_dist.backends.cpu import build as cpu_build
from lion_dist.backends.cpu import library as cpu_library
from lion_dist.functional import lion
from lion_dist.nonfinite import nonfinite_mask
from lion_dist.spec import LionHyperparams, lion_reference
from tests.scripts import benchmark_script

FP32, BF16 = torch.float32, torch.bfloat16
SIZES = [1, 3, 127, 1025, 40_000, 70_001]  # odd sizes; 110k elements in all, so two threads split a tensor
HPS = [
    LionHyperparams(lr=3e-3, beta1=0.9, beta2=0.99),
    LionHyperparams(lr=1e-2, beta1=0.95, beta2=0.98, weight_decay=0.3, maximize=True),
]


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    assert cpu_library.is_available(), cpu_library.unavailable_reason()


@contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparison: the bit pattern, with every NaN made the same (NaN payloads are not specified)."""
    t = t.detach().contiguous()
    as_int = t.view(torch.int16 if t.element_size() == 2 else torch.int32 if t.element_size() == 4 else torch.int64)
    return torch.where(t.isnan(), torch.full_like(as_int, -1), as_int)


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(bits(g), bits(e)), f"tensor {i} ({g.dtype}, {tuple(g.shape)}) differs from the reference"


def make_triples(dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], seed: int = 0, sizes=SIZES):
    """Params, grads and momenta with the awkward values: zeros (sign(0)), -0.0, NaN and Inf in the gradient."""
    gen = torch.Generator().manual_seed(seed)
    pd, gd, md = dtypes
    params = [torch.randn(n, generator=gen).to(pd) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(gd) for n in sizes]
    moms = [(torch.randn(n, generator=gen) * 0.1).to(md) for n in sizes]
    grads[2][:5] = torch.tensor([0.0, 0.0, 0.0, 0.0, -0.0])  # with these momenta: c = +0 and c = -0
    moms[2][:5] = torch.tensor([0.0, -0.0, 0.0, -0.0, -0.0])
    params[2][:5] = torch.tensor([0.0, -0.0, -0.0, 0.0, -0.0])
    grads[3][7], grads[3][8], grads[3][9] = float("nan"), float("inf"), -float("inf")
    # b1 * m + (1 - b1) * g close to 0, where only the reference's rounding (one fma) gets the sign right
    m = moms[4][:2000].float()
    grads[4][:2000] = -(m * 0.9) / torch.tensor(1 - 0.9, dtype=FP32)
    return params, grads, moms


def reference(params, grads, moms, hp, *, steps=1):
    params, moms = [p.clone() for p in params], [m.clone() for m in moms]
    for _ in range(steps):
        for p, g, m in zip(params, grads, moms, strict=True):
            lion_reference(p, g, m, hp)
    return params, moms


DTYPE_COMBOS = list(itertools.product([FP32, BF16], repeat=3))


@pytest.mark.parametrize("dtypes", DTYPE_COMBOS, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
def test_equals_reference_bit_for_bit_for_every_dtype_combination(dtypes) -> None:
    for hp in HPS:
        params, grads, moms = make_triples(dtypes)
        expected = reference(params, grads, moms, hp, steps=3)
        for _ in range(3):
            lion(params, grads, moms, hp, backend="cpu_fused")
        assert_same(params + moms, expected[0] + expected[1])


def test_any_thread_count_gives_the_same_bits_including_stochastic_rounding() -> None:
    hp = HPS[1]
    results = []
    for n in (1, 2, 3):
        params, grads, moms = make_triples((BF16, FP32, FP32))
        fp32_params, _, fp32_moms = make_triples((FP32, FP32, FP32))
        with num_threads(n):
            lion(params, grads, moms, hp, backend="cpu_fused", sr_seed=1234)
            lion(fp32_params, grads, fp32_moms, hp, backend="cpu_fused")
        results.append([bits(t) for t in params + moms + fp32_params + fp32_moms])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def openmp_libraries_loaded() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if cpu_build._OPENMP_LIBRARY.match(Path(line.split()[-1]).name)}


def test_runs_on_torchs_openmp_threads_and_the_pthreads_build_gives_the_same_bits(monkeypatch, tmp_path) -> None:
    runtime = cpu_build.openmp_runtime()
    assert runtime is not None, "torch on Linux runs its CPU ops on an OpenMP runtime"
    assert "_openmp_" in cpu_library.library_path().name
    assert openmp_libraries_loaded() == {str(runtime)}  # the kernel added no second OpenMP runtime

    hp = HPS[1]
    results = []
    for lib in (cpu_library.library().lib, cpu_library.load(cpu_build.build(tmp_path, openmp=False))):
        monkeypatch.setattr(cpu_library, "library", lambda lib=lib: cpu_library._Loaded(lib, None, 0.0, None))
        params, grads, moms = make_triples((BF16, FP32, BF16))
        fp32 = make_triples((FP32, FP32, FP32))
        with num_threads(2):
            lion(params, grads, moms, hp, backend="cpu_fused", sr_seed=99)
            lion(*fp32, hp, backend="cpu_fused")
        results.append([bits(t) for t in params + moms + fp32[0] + fp32[2]])
    assert [p.name.split("_")[4] for p in tmp_path.iterdir()] == ["pthreads"]
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    expected = reference(*make_triples((FP32, FP32, FP32)), hp)
    assert all(torch.equal(a, bits(e)) for a, e in zip(results[1][-12:], expected[0] + expected[1], strict=True))


def test_mixed_dtypes_noncontiguous_and_unsupported_dtypes_in_one_call() -> None:
    """The general path: per-tensor dtype codes, contiguous copies written back, fp16/fp64 sent to foreach."""
    hp = HPS[1]
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=gen)
    params = [
        base.t(),  # transposed: not contiguous
        torch.randn(300, generator=gen).to(BF16),
        torch.randn(50, 40, generator=gen)[:, ::3],  # strided slice
        torch.randn(77, generator=gen).half(),  # fp16: foreach fallback
        torch.randn(33, generator=gen).double(),  # fp64: foreach fallback
    ]
    grads = [
        torch.randn(48, 64, generator=gen).t().contiguous().t(),  # a non-contiguous grad too
        torch.randn(300, generator=gen),
        torch.randn(50, 14, generator=gen).to(BF16),
        torch.randn(77, generator=gen).half(),
        torch.randn(33, generator=gen).double(),
    ]
    moms = [
        torch.randn(64, 48, generator=gen).t() * 0.1,
        (torch.randn(300, generator=gen) * 0.1).to(BF16),
        torch.randn(50, 14, generator=gen),
        torch.randn(77, generator=gen).half(),
        torch.randn(33, generator=gen).double(),
    ]
    expected = reference(params, grads, moms, hp)
    originals = [p.data_ptr() for p in params]
    lion(params, grads, moms, hp, backend="cpu_fused")
    assert [p.data_ptr() for p in params] == originals  # updated in place, through any copies
    assert_same(params + moms, expected[0] + expected[1])


def test_many_tiny_tensors_in_one_call() -> None:
    hp = HPS[0]
    params, grads, moms = make_triples((FP32, BF16, BF16), sizes=[10 + i % 7 for i in range(3000)])
    expected = reference(params, grads, moms, hp)
    lion(params, grads, moms, hp, backend="cpu_fused")
    assert_same(params + moms, expected[0] + expected[1])


def test_stochastic_rounding_is_reproducible_and_unbiased() -> None:
    n = 200_000
    lr = 2.0**-10  # 1 - lr lies a quarter of the way from 1 down to the next bf16 below it (1 - 2**-8)
    hp = LionHyperparams(lr=lr, beta1=0.9, beta2=0.99)

    def step(seed):
        p = torch.ones(n, dtype=BF16)
        p[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
        lion([p], [torch.ones(n)], [torch.zeros(n)], hp, backend="cpu_fused", sr_seed=seed)
        return p

    a, b, c, nearest = step(7), step(7), step(8), step(None)
    assert torch.equal(bits(a), bits(b)) and not torch.equal(bits(a), bits(c))
    assert torch.all(nearest[3:] == 1.0)  # round-to-nearest always goes back to 1
    assert a[0] == float("inf") and a[1] == -float("inf") and a[2].isnan()  # non-finite values kept
    body = a[3:].float()
    assert set(body.unique().tolist()) == {1.0, 1.0 - 2.0**-8}
    down = (body < 1).double().mean().item()
    sigma = (0.25 * 0.75 / body.numel()) ** 0.5
    assert abs(down - 0.25) < 5 * sigma, f"rounded down {down:.4f} of the time, expected 0.25"
    assert abs(body.double().mean().item() - (1 - lr)) < 5 * sigma * 2.0**-8


def test_optimizer_uses_it_and_matches_the_reference_backend() -> None:
    assert backends.select("auto", Need("cpu", (FP32,) * 3)) == "cpu_fused"

    def train(backend, dtype):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in [(33, 7), (129,), (1,)]]
        opt = Lion(
            params, lr=3e-3, weight_decay=0.1, decoupled_weight_decay=True, backend=backend, batch_size_policy="ignore"
        )
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
            opt.param_groups[0]["lr"] = 3e-3 / (step + 2)  # lr changes between steps
        return [p.detach() for p in params] + [s["exp_avg"] for s in opt.state.values()]

    for dtype in (FP32, BF16):
        assert_same(train("auto", dtype), train("reference", dtype))


def test_nonfinite_flags_and_mask() -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=gen).to(dt) for n, dt in [(70_001, FP32), (5, BF16), (9, FP32), (100, BF16)]]
    tensors[0][-1] = float("nan")  # the very last element of the part the last thread reads
    tensors[1][0] = -float("inf")
    tensors.append(torch.randn(10, 8, generator=gen)[:, ::2])  # non-contiguous, finite
    tensors.append(torch.full((3,), float("inf")).to(BF16)[::2])
    with num_threads(2):
        flags = cpu_library.nonfinite_flags(tensors)
    assert flags.tolist() == [1, 1, 0, 0, 0, 1]
    assert cpu_library.nonfinite_flags([torch.zeros(3, dtype=torch.float16)]) is None  # caller checks otherwise
    mask = nonfinite_mask([*tensors, torch.tensor([float("nan")], dtype=torch.float16)])
    assert [bool(m) for m in mask] == [True, True, False, False, False, True, True]
    assert not any(bool(m) for m in nonfinite_mask(tensors[2:5]))


def test_bad_input_gets_a_clear_error() -> None:
    hp = HPS[0]
    ones = [torch.ones(3), torch.ones(4)]
    with pytest.raises(ValueError, match=r"tensor 1 has param shape \(4,\), grad \(5,\)"):
        lion(ones, [torch.ones(3), torch.ones(5)], ones, hp, backend="cpu_fused")
    with pytest.raises(ValueError, match="cautious"):
        cautious = LionHyperparams(lr=1e-3, beta1=0.9, beta2=0.99, cautious_factor=0.5)
        lion([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], cautious, backend="cpu_fused")


def test_build_is_cached_and_safe_when_built_concurrently(tmp_path: Path) -> None:
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(cpu_build.build(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].exists()
    assert [f.name for f in tmp_path.iterdir()] == [paths[0].name]  # no temporary file left behind
    mtime = paths[0].stat().st_mtime_ns
    assert cpu_build.build(tmp_path) == paths[0] and paths[0].stat().st_mtime_ns == mtime  # cached: not rebuilt


def _unwritable_cache(monkeypatch, tmp_path: Path) -> Path:
    """Make the cache directory unusable (a file is in the way) and the temporary directory `tmp_path / "tmp"`;
    return the per-user directory the build then falls back to."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("LION_DIST_CACHE", str(not_a_dir / "cache"))  # mkdir fails: a file is in the way
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(mode=0o777)  # like /tmp: anyone may create entries in it
    return tmp_path / "tmp" / f"lion_dist-{os.getuid()}"


def test_an_unwritable_cache_falls_back_to_a_private_temporary_directory(monkeypatch, tmp_path: Path) -> None:
    fallback = _unwritable_cache(monkeypatch, tmp_path)
    path = cpu_build.build()
    assert path.parent == fallback == cpu_build.fallback_dir() and path.exists()
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700  # created private, whatever the umask
    assert not path.stat().st_mode & 0o022 and path.stat().st_uid == os.getuid()
    assert cpu_build.build() == path  # and found there again


needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
NOBODY = 65534


@pytest.mark.parametrize(
    "plant, why",
    [
        pytest.param(lambda d: os.chown(d, NOBODY, NOBODY), "owned by uid 65534", marks=needs_root, id="other-owner"),
        pytest.param(lambda d: d.chmod(0o777), "writable by other users", id="world-writable"),
        pytest.param(lambda d: d.chmod(0o770), "writable by other users", id="group-writable"),
    ],
)
def test_a_hostile_fallback_directory_is_refused(monkeypatch, tmp_path: Path, plant, why) -> None:
    """Another user creates `<tmp>/lion_dist-<uid>` first (or leaves it open to all) and plants a library of the
    expected name: the loader refuses the directory, names it and the fix, and auto falls back to foreach."""
    planted = cpu_library.library_path()  # a loadable library of the expected name (the name is the build's key)
    fallback = _unwritable_cache(monkeypatch, tmp_path)
    fallback.mkdir()
    (fallback / planted.name).write_bytes(planted.read_bytes())
    plant(fallback)
    with pytest.raises(cpu_build.CpuKernelUnavailableError, match=why) as error:
        cpu_build.build()
    assert str(fallback) in str(error.value) and "LION_DIST_CACHE" in str(error.value)
    with fresh_library():
        with pytest.warns(RuntimeWarning, match=f"unavailable.*{why}"):
            assert not cpu_library.is_available()
        assert backends.select("auto", Need("cpu", (FP32,) * 3)) == "foreach"


@pytest.mark.parametrize(
    "plant, why",
    [
        pytest.param(lambda f: os.chown(f, NOBODY, NOBODY), "owned by uid 65534", marks=needs_root, id="other-owner"),
        pytest.param(lambda f: f.chmod(0o666), "writable by other users", id="world-writable"),
    ],
)
def test_a_library_not_safely_ours_is_refused(tmp_path: Path, plant, why) -> None:
    """In our own private directory, a library file that someone else owns or may write is not loaded."""
    (tmp_path / "cache").mkdir(mode=0o700)
    path = tmp_path / "cache" / cpu_library.library_path().name  # what build() looks for first
    path.write_bytes(cpu_library.library_path().read_bytes())
    path.chmod(0o755)
    assert cpu_build.build(tmp_path / "cache") == path  # ours and private: loaded as it is
    plant(path)
    with pytest.raises(cpu_build.CpuKernelUnavailableError, match=f"the kernel library {path} is {why}"):
        cpu_build.build(tmp_path / "cache")


@contextmanager
def fresh_library():
    cpu_library.library.cache_clear()
    try:
        yield
    finally:
        cpu_library.library.cache_clear()


def test_without_a_compiler_auto_falls_back_to_foreach(monkeypatch, tmp_path: Path) -> None:
    hp = HPS[0]
    monkeypatch.setenv("LION_DIST_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(cpu_build.CpuKernelUnavailableError, match="no C compiler"):
        cpu_build.build()
    with fresh_library():
        with pytest.warns(RuntimeWarning, match="unavailable.*no C compiler"):
            assert not cpu_library.is_available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, and the check stays cheap
            assert not cpu_library.is_available()
        assert backends.select("auto", Need("cpu", (FP32,) * 3)) == "foreach"
        with pytest.raises(RuntimeError, match="backend='cpu_fused' is unavailable"):
            lion([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], hp, backend="cpu_fused")
        monkeypatch.setenv("LION_DIST_CPU_KERNEL", "0")
        cpu_library.library.cache_clear()
        assert not cpu_library.is_available() and "LION_DIST_CPU_KERNEL=0" in cpu_library.unavailable_reason()


def test_a_compile_error_is_reported_with_the_compiler_output(monkeypatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int lion_abi_version(void) { return }\n")
    monkeypatch.setattr(cpu_build, "SOURCE", broken)
    with pytest.raises(cpu_build.CpuKernelUnavailableError, match=r"could not compile(.|\n)*error"):
        cpu_build.build(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_benchmark_script_runs_and_reports_missing_peers(monkeypatch, tmp_path: Path) -> None:
    """`benchmarks/step.py --smoke` end to end, with lion-pytorch and deepspeed made unimportable (a GPU image
    lacks them): reported, not fatal; every option gets its ratio to the fused fp32 step of the same rounds."""
    step = benchmark_script("step")
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import lion_pytorch now raises ImportError
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what the script sets on CPU; restored afterwards
    out = tmp_path / "result.json"
    argv = ["--smoke", "--device", "cpu", "--workloads", "W1,W3", "--peers", "foreach,skip,functional,lion-pytorch"]
    argv[-1] += ",stochastic,compensation,int8,DeepSpeed"
    report = step.main([*argv, "--json", str(out)])
    names = {(r.workload, r.dtype, r.optimizer) for r in report.rows if r.ms is not None and r.ms > 0}
    for workload, dtype in itertools.product(["W1", "W3"], ["fp32", "bf16"]):
        for optimizer in (
            "lion_dist (auto: cpu_fused)",
            "lion_dist foreach",
            "lion_dist auto, nonfinite='skip'",
            "lion_dist functional.lion only (no optimizer)",
        ):
            assert (workload, dtype, optimizer) in names
    assert "not installed" in report.not_run["lion-pytorch Lion"]
    assert "not installed" in report.not_run["DeepSpeedCPULion"]
    assert "needs a CUDA GPU" in report.not_run["DeepSpeed FusedLion"]
    ratios = {(r.workload, r.dtype, r.optimizer): r.ratio_fp32 for r in report.rows}
    for workload in ("W1", "W3"):
        for option in (step.INT8, step.INT8_NEAREST):
            assert ratios[workload, "fp32", option] > 0 and ratios[workload, "bf16", option] > 0
        for option in (step.STOCHASTIC, step.COMPENSATION, step.COMPENSATION_INT8):
            assert ratios[workload, "bf16", option] > 0 and (workload, "fp32", option) not in ratios  # bf16 only
        assert ratios[workload, "bf16", step.FP32_BASE] == 1.0
    summary = step.markdown(report)
    assert "| W3 | bf16 |" in summary and "| compensation + int8 |" in summary
    assert report.machine["cpu_kernel_build_s"] > 0
    saved = json.loads(out.read_text())
    assert "| lion_dist foreach |" in saved["markdown"] and len(saved["rows"]) == len(report.rows)
