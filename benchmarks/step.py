"""Time one optimizer step: lion_dist against its peers, as ratios measured in one process.

    python benchmarks/step.py            # full run: W1, W2, W3 in fp32 and bf16 on the GPU if there is one, else CPU
    python benchmarks/step.py --quick    # fewer repeats, no reference backend (CPU: a few minutes)
    python benchmarks/step.py --smoke    # tiny tensors, one repeat: checks that the script runs (seconds)

Workloads (issue 3): W1 one 64M-element tensor; W2 a GPT-2-small-like list (GPU: GPT-2 small itself, 148
tensors, 124M elements; CPU: 10 GPT-2 blocks at width 448, 120 tensors, 24M elements); W3 2000 tensors of 1024;
W2u is W2 with its first tensor a view into a flat buffer one element off 16-byte alignment (as in a flat
parameter), so that tensor takes the kernels' unaligned variant while the rest of its bucket stays aligned.
Params and grads share a dtype (fp32 or bf16); every optimizer keeps its default state dtype, except the
lion_dist rows that name another: bf16, fp32 or int8 momentum (codes and a scale per 128 elements; its bytes
moved count the scales) and, for bf16 params, stochastic rounding, a Kahan compensation buffer, and both int8
momentum and compensation.

For each optimizer: the median `step()` time, the ratio to lion_dist (its default backend, nonfinite="ignore":
above 1 means slower than lion_dist), the ratio to lion_dist's fused step on fp32 params timed in the same rounds
("x fp32"; bf16 workloads time an fp32 copy of the params for it), the GB/s it achieves counting the bytes its
algorithm must move (Lion: read p, g, m and write p, m; AdamW: also v), that as a % of the in-place add and copy
bandwidths measured on a buffer of the same size, its optimizer state bytes, and the peak extra memory during one
step (CUDA: max_memory_allocated; CPU: the growth of the process's resident-set high-water mark, reset through
/proc/self/clear_refs). The "bandwidth floor" row is the time Lion's bytes take at that add bandwidth. Optimizers
that cannot run here (no GPU, a package or a compiler missing, a failed build) are listed with the reason;
nothing fails the run (deepspeed and lion-pytorch are optional: a GPU image may lack them). A summary then lists
every memory-saving option and DeepSpeedCPULion as "x fp32", one line per workload and param dtype.

The host-cost rows (leave them out with --no-host; `--workloads ""` runs only them) time the Python and launch
work of a step, in CPU time of the stepping thread (so other processes on the machine do not count): a whole
step on 2000 params of 16 elements, where the update itself is negligible, for lion_dist, lion-pytorch and fused
AdamW, and the Triton launcher's host side for GPT-2 small's 148 tensors and W3, with the launch stubbed out
(it runs on CPU tensors, so it leaves out the pinned-memory copy of the gradient table and Triton's own
dispatch).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lion_dist import Lion, backends, functional
from lion_dist.backends import Entry, Need, NoisePlace, StepArgs
from lion_dist.backends.cpu import build as cpu_build
from lion_dist.backends.cpu import library as cpu_library
from lion_dist.formats.floats import FloatMomentum
from lion_dist.spec import LionHyperparams

LR, WD, BETAS = 1e-4, 0.01, (0.9, 0.99)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# The memory-saving options, each timed as a ratio to the fused step on fp32 params in the same rounds (`summary`).
BF16_MOMENTUM = "lion_dist auto, momentum_dtype=bf16"
INT8 = "lion_dist auto, momentum_dtype=int8"
INT8_NEAREST = "lion_dist auto, momentum_dtype=int8, int8_rounding=nearest"
STOCHASTIC = "lion_dist auto, stochastic_rounding=True"
COMPENSATION = "lion_dist auto, compensation=True"
COMPENSATION_INT8 = "lion_dist auto, int8 momentum, compensation=True"
DEEPSPEED_CPU = "DeepSpeedCPULion"
FP32_BASE = "lion_dist fused step on fp32 params (the x fp32 base)"
DEFAULT_PREFIX = "lion_dist (auto: "  # the default optimizer's row: the "x lion_dist" base
SUMMARY_COLUMNS = {  # column -> optimizer row
    "bf16 momentum": BF16_MOMENTUM,
    "int8, nearest": INT8_NEAREST,
    "int8, stochastic (default)": INT8,
    "stochastic rounding": STOCHASTIC,
    "compensation": COMPENSATION,
    "compensation + int8": COMPENSATION_INT8,
    "DeepSpeedCPULion": DEEPSPEED_CPU,
}


class Unavailable(Exception):
    """This optimizer cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------- workloads


def gpt2_block_shapes(d: int) -> list[tuple[int, ...]]:
    """One GPT-2 block's parameter shapes at width d (HF Conv1D layout)."""
    return [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]


def workloads(device: str, size: str) -> dict[str, list[tuple[int, ...]]]:
    """Name -> parameter shapes. `size` is "full" (the issue's sizes) or "smoke" (tiny)."""
    if size == "smoke":
        return {
            "W1": [(1 << 16,)],
            "W2": gpt2_block_shapes(64) * 2,
            "W2u": gpt2_block_shapes(64) * 2,
            "W3": [(1024,)] * 50,
        }
    if device == "cuda":
        w2 = [(50257, 768), (1024, 768), *gpt2_block_shapes(768) * 12, (768,), (768,)]
    else:
        w2 = gpt2_block_shapes(448) * 10
    return {"W1": [(64 << 20,)], "W2": w2, "W2u": w2, "W3": [(1024,)] * 2000}


UNALIGNED = {"W2u"}  # workloads whose first param is a view one element off 16-byte alignment


def make_params(shapes, dtype: torch.dtype, device: str, gen: torch.Generator, unaligned: bool) -> list[torch.Tensor]:
    """Leaf params with gradients; with `unaligned`, the first is a view into a buffer at a one-element offset."""
    params = []
    for i, s in enumerate(shapes):
        value = torch.randn(s, device=device, generator=gen).to(dtype)
        if unaligned and i == 0:
            flat = torch.empty(value.numel() + 1, device=device, dtype=dtype)
            value = flat[1:].view(s).copy_(value)  # a leaf: its base does not require grad
        params.append(value.requires_grad_())
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen).to(dtype) * 1e-2
    return params


# ---------------------------------------------------------------------------------------------- peers


@dataclass
class Peer:
    name: str
    algorithm: str  # "lion" or "adamw": which state tensors the step must read and write
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    baseline: bool = False
    dtypes: tuple[str, ...] = tuple(DTYPES)  # the param dtypes it is timed on


def _lion_dist(backend: str, nonfinite: str = "ignore", stochastic_rounding: bool = False, **options) -> Callable:
    def make(params):
        if backend == "cpu_fused" and not cpu_library.is_available():
            raise Unavailable(f"the fused CPU kernel is unavailable ({cpu_library.unavailable_reason()})")
        hp = dict(lr=LR, betas=BETAS, weight_decay=WD, stochastic_rounding=stochastic_rounding, **options)
        return Lion(params, **hp, backend=backend, nonfinite=nonfinite, batch_size_policy="ignore")

    return make


class FunctionalLion:
    """`lion_dist.functional.lion` on the same tensors without the optimizer's bookkeeping: the update's own cost."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.state = {p: {"exp_avg": torch.zeros_like(p)} for p in params}
        self.hp = LionHyperparams(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD)

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        functional.lion(self.params, grads, [self.state[p]["exp_avg"] for p in self.params], self.hp)


def _lion_pytorch(variant: str) -> Callable:
    def make(params):
        try:
            if variant == "foreach":
                from lion_pytorch.foreach import Lion as PeerLion

                return PeerLion(params, lr=LR, betas=BETAS, weight_decay=WD)
            from lion_pytorch import Lion as PeerLion
        except ImportError as e:
            raise Unavailable(f"lion-pytorch is not installed ({e}); pip install lion-pytorch") from e
        return PeerLion(params, lr=LR, betas=BETAS, weight_decay=WD, use_triton=variant == "triton")

    return make


def _deepspeed(cls_name: str) -> Callable:
    def make(params):
        try:
            from deepspeed.ops import lion
        except ImportError as e:
            raise Unavailable(f"deepspeed is not installed ({e}); pip install deepspeed") from e
        except Exception as e:  # deepspeed raises more than ImportError when its accelerator is unusable
            raise Unavailable(f"deepspeed does not import: {type(e).__name__}: {e}") from e
        cls = getattr(lion, cls_name)
        return cls(params, lr=LR, betas=BETAS, weight_decay=WD)  # both build a C++/CUDA op on first use

    return make


def _adamw(**flags) -> Callable:
    def make(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD, **flags)

    return make


def peers(device: str, quick: bool) -> tuple[list[Peer], list[tuple[str, str]]]:
    """The optimizers to time on `device`, and (name, reason) for those that cannot run on it."""
    skipped: list[tuple[str, str]] = []
    auto = backends.select("auto", Need(device, (torch.float32,) * 3))
    run = [Peer(f"{DEFAULT_PREFIX}{auto})", "lion", _lion_dist("auto"), True)]
    run.append(Peer("lion_dist auto, nonfinite='skip'", "lion", _lion_dist("auto", "skip")))
    sr = _lion_dist("auto", stochastic_rounding=True)
    run.append(Peer(STOCHASTIC, "lion", sr, dtypes=("bf16",)))  # SR: bf16 params only
    run.append(Peer(BF16_MOMENTUM, "lion", _lion_dist("auto", momentum_dtype="bf16")))
    run.append(Peer(INT8, "lion", _lion_dist("auto", momentum_dtype="int8")))
    int8_nearest = _lion_dist("auto", momentum_dtype="int8", int8_rounding="nearest")
    run.append(Peer(INT8_NEAREST, "lion", int8_nearest))
    comp = _lion_dist("auto", compensation=True)
    run.append(Peer(COMPENSATION, "lion", comp, dtypes=("bf16",)))  # Kahan compensation: bf16 params only
    int8_comp = _lion_dist("auto", momentum_dtype="int8", compensation=True)
    run.append(Peer(COMPENSATION_INT8, "lion", int8_comp, dtypes=("bf16",)))
    fp32_momentum = _lion_dist("auto", momentum_dtype=torch.float32)
    run.append(Peer("lion_dist auto, momentum_dtype=fp32", "lion", fp32_momentum, dtypes=("bf16",)))
    run.append(Peer("lion_dist functional.lion only (no optimizer)", "lion", FunctionalLion))
    run.append(Peer("lion_dist foreach", "lion", _lion_dist("foreach")))
    if quick:
        skipped.append(("lion_dist reference", "left out of --quick (the readable per-tensor reference)"))
    else:
        run.append(Peer("lion_dist reference", "lion", _lion_dist("reference")))
    run += [
        Peer("lion-pytorch Lion", "lion", _lion_pytorch("plain")),
        Peer("lion-pytorch foreach Lion", "lion", _lion_pytorch("foreach")),
    ]
    if device == "cuda":
        run += [
            Peer("lion-pytorch Lion (triton)", "lion", _lion_pytorch("triton")),
            Peer("DeepSpeed FusedLion", "lion", _deepspeed("FusedLion")),
            Peer("torch AdamW foreach", "adamw", _adamw(foreach=True)),
            Peer("torch AdamW fused", "adamw", _adamw(fused=True)),
        ]
        skipped.append(("DeepSpeedCPULion", "CPU optimizer (offload); this run is on the GPU"))
    else:
        run += [
            Peer(DEEPSPEED_CPU, "lion", _deepspeed("DeepSpeedCPULion")),
            Peer("torch AdamW foreach", "adamw", _adamw(foreach=True)),
            Peer("torch AdamW fused", "adamw", _adamw(fused=True)),
        ]
        for name in ("lion_dist triton", "lion-pytorch Lion (triton)", "DeepSpeed FusedLion"):
            skipped.append((name, "needs a CUDA GPU"))
    return run, skipped


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one `fn()`: CUDA events around it on the GPU (then a synchronize), a wall clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Extra memory at the peak of one `fn()` over what was allocated before it; None when not measurable."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the resident-set high-water mark, to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if before is None or peak is None else max(0, peak - before) * 1024


STATE_KEYS = {"lion": ("exp_avg", "exp_avg_scale", "compensation"), "adamw": ("exp_avg", "exp_avg_sq")}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def step_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor], algorithm: str) -> int:
    """Bytes the algorithm must move in one step: read p, g and each state tensor, write p and each state tensor."""
    total = 0
    for p in params:
        state = opt.state[p]
        moved_state = sum(state[k].numel() * state[k].element_size() for k in STATE_KEYS[algorithm] if k in state)
        total += p.numel() * (2 * p.element_size() + p.grad.element_size()) + 2 * moved_state
    return total


@dataclass
class Row:
    workload: str
    dtype: str
    optimizer: str
    ms: float | None = None
    ratio: float | None = None
    ratio_fp32: float | None = None  # to the fused step on fp32 params, timed in the same rounds
    gbs: float | None = None
    pct_add_bw: float | None = None
    pct_copy_bw: float | None = None
    state_mb: float | None = None
    peak_extra_mb: float | None = None


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # optimizer -> why it did not run
    notes: list[str] = field(default_factory=list)
    host: list[HostRow] = field(default_factory=list)


@dataclass
class HostRow:
    """Host (Python and launch) time of a step, in CPU time of this thread: other processes do not count."""

    case: str
    what: str
    us_per_step: float
    tensors: int

    @property
    def us_per_tensor(self) -> float:
        return self.us_per_step / self.tensors


def _record_failure(report: Report, name: str, e: Exception) -> None:
    reason = str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}".splitlines()[0][:300]
    report.not_run.setdefault(name, reason)
    if not isinstance(e, Unavailable) and os.environ.get("LION_DIST_BENCH_TRACEBACK"):
        traceback.print_exc()


def bench_workload(name: str, shapes, dtype_name: str, device: str, repeats: int, peer_list, report: Report) -> None:
    """Time every optimizer and the bandwidth probes on one workload, round-robin: each round steps each once.

    Interleaving makes the ratios robust to a machine whose load changes during the run.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    params = make_params(shapes, DTYPES[dtype_name], device, gen, name in UNALIGNED)
    peer_list = [peer for peer in peer_list if dtype_name in peer.dtypes]
    numel = sum(p.numel() for p in params)
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    timed: dict[str, Callable[[], object]] = {"add probe": lambda: a.add_(b), "copy probe": lambda: a.copy_(b)}
    opts: dict[str, torch.optim.Optimizer] = {}
    if dtype_name != "fp32":  # the base of the "x fp32" ratios: the fused step on fp32 params, in the same rounds
        fp32_params = make_params(shapes, torch.float32, device, torch.Generator(device=device).manual_seed(0), False)
        try:
            fp32_base = _lion_dist("auto")(fp32_params)
            fp32_base.step()
            timed[FP32_BASE] = fp32_base.step
        except Exception as e:
            _record_failure(report, FP32_BASE, e)
    for peer in peer_list:
        gc.collect()
        try:
            opt = peer.make(params)
            opt.step()  # creates the state and builds/compiles whatever the optimizer builds on first use
            _sync(device)
        except Exception as e:
            _record_failure(report, peer.name, e)
            continue
        opts[peer.name] = opt
        timed[peer.name] = opt.step
    for fn in (timed["add probe"], timed["copy probe"]):
        fn()  # warm up: page faults, thread pools
    times: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(repeats):
        for key, fn in list(timed.items()):
            try:
                times[key].append(time_once(fn, device))
            except Exception as e:
                _record_failure(report, key, e)
                del timed[key]
    ms = {k: statistics.median(v) for k, v in times.items() if k in timed}
    add_gbs = 12 * numel / ms["add probe"] / 1e6
    copy_gbs = 8 * numel / ms["copy probe"] / 1e6
    probe = {"add_gbs": add_gbs, "copy_gbs": copy_gbs, "elements": numel}
    report.machine["probes"][f"{name} {dtype_name}"] = {**probe, "tensors": len(shapes)}
    timed.clear()

    results: dict[str, dict] = {}
    for peer in peer_list:
        if peer.name in ms:
            opt = opts[peer.name]
            extra = peak_extra_bytes(opt.step, device)
            results[peer.name] = {
                "ms": ms[peer.name],
                "bytes": step_bytes(opt, params, peer.algorithm),
                "state": state_bytes(opt),
                "extra": extra,
            }
    del opts
    base = next((results[p.name] for p in peer_list if p.baseline and p.name in results), None)
    fp32_ms = ms.get(FP32_BASE, base["ms"] if base and dtype_name == "fp32" else None)
    for peer in peer_list:
        r = results.get(peer.name)
        if r is None:
            continue
        gbs = r["bytes"] / r["ms"] / 1e6
        report.rows.append(
            Row(
                name,
                dtype_name,
                peer.name,
                ms=r["ms"],
                ratio=r["ms"] / base["ms"] if base else None,
                ratio_fp32=r["ms"] / fp32_ms if fp32_ms else None,
                gbs=gbs,
                pct_add_bw=100 * gbs / add_gbs,
                pct_copy_bw=100 * gbs / copy_gbs,
                state_mb=r["state"] / 2**20,
                peak_extra_mb=None if r["extra"] is None else r["extra"] / 2**20,
            )
        )
    if FP32_BASE in ms:
        report.rows.append(
            Row(name, dtype_name, FP32_BASE, ms=fp32_ms, ratio=fp32_ms / base["ms"] if base else None, ratio_fp32=1.0)
        )
    if base:
        floor_ms = base["bytes"] / add_gbs / 1e6
        report.rows.append(
            Row(
                name,
                dtype_name,
                "bandwidth floor (lion_dist's bytes at add bandwidth)",
                ms=floor_ms,
                ratio=floor_ms / base["ms"],
                gbs=add_gbs,
                pct_add_bw=100.0,
                pct_copy_bw=100 * add_gbs / copy_gbs,
            )
        )
    skip_name = "lion_dist auto, nonfinite='skip'"
    if base and skip_name in results:
        cost = 100 * (results[skip_name]["ms"] / base["ms"] - 1)
        report.notes.append(f"{name} {dtype_name}: the non-finite check (nonfinite='skip') adds {cost:+.1f}% to a step")
    del params
    gc.collect()


# ---------------------------------------------------------------------------------------------- host cost


def _host_us(step: Callable[[], object], refresh: Callable[[], object], repeats: int) -> float:
    """Median CPU time of `step()` in microseconds, `refresh()` (new gradient tensors) before each, gc paused."""
    times = []
    for _ in range(repeats):
        refresh()
        gc.disable()
        start = time.thread_time()
        step()
        times.append(time.thread_time() - start)
        gc.enable()
    return 1e6 * statistics.median(times)


def _fresh_grads(params: list[torch.Tensor], make=torch.randn) -> Callable[[], None]:
    def refresh() -> None:
        for p in params:
            p.grad = make(p.shape, dtype=p.dtype)  # new tensors every step, as with zero_grad(set_to_none=True)

    return refresh


def host_costs(report: Report, smoke: bool, repeats: int) -> None:
    """Per-tensor host cost of a whole step on many tiny CPU tensors (the kernel's own work is negligible there),
    and the Triton launcher's host time per step with the launch stubbed out, so that it runs without a GPU."""
    n = 200 if smoke else 2000
    contenders = [
        ("lion_dist Lion (auto: cpu_fused)", _lion_dist("auto")),
        ("lion-pytorch Lion", _lion_pytorch("plain")),
        ("torch AdamW fused", _adamw(fused=True)),
    ]
    for name, make in contenders:
        params = [torch.zeros(16, requires_grad=True) for _ in range(n)]
        try:
            opt = make(params)
        except Unavailable as e:
            report.not_run.setdefault(name, str(e))
            continue
        refresh = _fresh_grads(params)
        refresh()
        opt.step()
        case = f"whole step, {n} params of 16 fp32 elements"
        report.host.append(HostRow(case, name, _host_us(opt.step, refresh, repeats), n))
        if isinstance(opt, Lion):
            report.host.append(
                HostRow(case, "lion_dist plan check only (Lion._bind)", _host_us(opt._bind, refresh, repeats), n)
            )
    _triton_launcher_host(report, smoke, repeats)


class _NoLaunch:
    """Stands in for the Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _triton_launcher_host(report: Report, smoke: bool, repeats: int) -> None:
    try:
        from lion_dist.backends.triton import kernels, launcher
    except Exception as e:
        report.not_run["Triton launcher host time"] = f"{type(e).__name__}: {e}".splitlines()[0]
        return
    gpt2 = [(50257, 768), (1024, 768), *gpt2_block_shapes(768) * 12, (768,), (768,)]
    cases = {"GPT-2 small": gpt2[:20] if smoke else gpt2, "W3": [(1024,)] * (50 if smoke else 2000)}
    hp = LionHyperparams(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD)
    original = kernels.lion_kernel
    kernels.lion_kernel = _NoLaunch()
    try:
        for case, shapes in cases.items():
            params = [torch.empty(s) for s in shapes]  # addresses are all the launcher reads
            fmt = FloatMomentum(None)
            entries = [Entry(p, (torch.empty_like(p),), fmt, p.dtype, NoisePlace(i)) for i, p in enumerate(params)]
            prepared = launcher.prepare(entries)
            grads: list[torch.Tensor] = []

            def refresh(params=params, grads=grads) -> None:
                grads[:] = [torch.empty(p.shape) for p in params]

            us = _host_us(lambda p=prepared, g=grads: launcher.step(p, g, StepArgs(hp)), refresh, repeats)
            label = f"Triton launcher, launch stubbed ({len(shapes)} tensors)"
            report.host.append(HostRow(f"{case}: {len(shapes)} tensors", label, us, len(shapes)))
    finally:
        kernels.lion_kernel = original


# ---------------------------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: Report) -> str:
    out = []
    m = report.machine
    out.append(f"Machine: {m['device_name']}; {m['cores']} cores, torch threads {m['threads']}; torch {m['torch']}; ")
    out[-1] += f"load average at start {m['load']}; mode {m['mode']}; repeats {m['repeats']} (median, round-robin)."
    if m.get("cpu_kernel_build_s") is not None:
        out.append(f"lion_dist CPU kernel first-use build: {m['cpu_kernel_build_s']:.2f} s ({m['cpu_kernel_build']}).")
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in report.rows:
        groups.setdefault((row.workload, row.dtype), []).append(row)
    for (workload, dtype), rows in groups.items():
        probe = m["probes"][f"{workload} {dtype}"]
        out.append("")
        out.append(
            f"### {workload}, {dtype} params: {probe['elements'] / 1e6:.2f}M elements in {probe['tensors']} tensors; "
            f"in-place add {probe['add_gbs']:.1f} GB/s, copy {probe['copy_gbs']:.1f} GB/s"
        )
        out.append("")
        out.append(
            "| optimizer | median ms | x lion_dist | x fp32 | GB/s | % of add bw | % of copy bw | state MiB | "
            "peak extra MiB |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            out.append(
                f"| {r.optimizer} | {_fmt(r.ms, '.2f')} | {_fmt(r.ratio, '.2f')} | {_fmt(r.ratio_fp32, '.2f')} | "
                f"{_fmt(r.gbs, '.1f')} | {_fmt(r.pct_add_bw, '.0f')} | {_fmt(r.pct_copy_bw, '.0f')} | "
                f"{_fmt(r.state_mb, '.1f')} | {_fmt(r.peak_extra_mb, '.1f')} |"
            )
    out += summary(report)
    if report.host:
        out.append("")
        out.append("### Host cost per step (CPU time of the stepping thread, median; new gradient tensors each step)")
        out.append("")
        out.append("| case | what | us per step | us per tensor |")
        out.append("|---|---|---:|---:|")
        for h in report.host:
            out.append(f"| {h.case} | {h.what} | {h.us_per_step:,.0f} | {h.us_per_tensor:.2f} |")
    if m.get("seconds") is not None:
        out.append("")
        out.append(f"The run took {m['seconds']:.0f} s.")
    if report.notes:
        out.append("")
        out += [f"- {n}" for n in report.notes]
    if report.not_run:
        out.append("")
        out.append("Not run:")
        out += [f"- {name}: {reason}" for name, reason in report.not_run.items()]
    return "\n".join(out)


def summary(report: Report) -> list[str]:
    """The memory-saving options (and DeepSpeedCPULion) as ratios to the fused step on fp32 params, timed in the
    same rounds: one line per workload and param dtype."""
    by_case: dict[tuple[str, str], dict[str, Row]] = {}
    for row in report.rows:
        by_case.setdefault((row.workload, row.dtype), {})[row.optimizer] = row
    lines = []
    for (workload, dtype), rows in by_case.items():
        default = next((r for name, r in rows.items() if name.startswith(DEFAULT_PREFIX)), None)
        base = rows.get(FP32_BASE) or (default if dtype == "fp32" else None)
        if base is None:
            continue
        cells = [_fmt(rows[o].ratio_fp32 if o in rows else None, ".2f") for o in SUMMARY_COLUMNS.values()]
        cells.insert(0, _fmt(default.ratio_fp32 if default else None, ".2f"))
        lines.append(f"| {workload} | {dtype} | {base.ms:.2f} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    header = ["default (auto)", *SUMMARY_COLUMNS]
    return [
        "",
        "### Options against the fused fp32 step (x its time, same rounds; - : not run or not for these params)",
        "",
        "| workload | params | fused fp32 step, ms | " + " | ".join(header) + " |",
        "|---|---|---:|" + "---:|" * len(header),
        *lines,
    ]


def machine_info(device: str, mode: str, repeats: int) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": device,
        "device_name": name,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load": None if load is None else " ".join(f"{x:.2f}" for x in load),
        "mode": mode,
        "repeats": repeats,
        "probes": {},
    }


def measure_cpu_kernel_build(report: Report) -> None:
    """Time a from-scratch build of the CPU kernel into an empty directory: the cost of its first use."""
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            path = cpu_build.build(Path(d))
            report.machine["cpu_kernel_build_s"] = time.perf_counter() - t0
            report.machine["cpu_kernel_build"] = f"{cpu_build.compiler()}, {path.name}"
    except Exception as e:
        report.not_run["lion_dist CPU kernel build"] = f"{type(e).__name__}: {e}".splitlines()[0]


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 repeats, no reference backend")
    mode.add_argument("--smoke", action="store_true", help="tiny tensors, 1 repeat: does the script run?")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--workloads", default="W1,W2,W3", help="comma-separated subset of W1,W2,W2u,W3")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--peers", default="", help="only optimizers whose name contains one of these (comma-sep.)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-host", action="store_true", help="leave out the host-cost rows")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 10)
    all_workloads = workloads(device, "smoke" if args.smoke else "full")
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for bad in [w for w in chosen if w not in all_workloads] + [d for d in dtype_names if d not in DTYPES]:
        parser.error(f"unknown workload or dtype {bad!r}; workloads: {list(all_workloads)}, dtypes: {list(DTYPES)}")

    report = Report(machine=machine_info(device, mode_name, repeats))
    peer_list, skipped = peers(device, args.quick or args.smoke)
    report.not_run.update(skipped)
    if args.peers:
        wanted = [w.strip() for w in args.peers.split(",") if w.strip()]
        peer_list = [p for p in peer_list if p.baseline or any(w in p.name for w in wanted)]
    measure_cpu_kernel_build(report)
    start = time.perf_counter()
    for name in chosen:
        for dtype_name in dtype_names:
            print(f"[{time.perf_counter() - start:6.1f} s] {name} {dtype_name} ...", file=sys.stderr, flush=True)
            bench_workload(name, all_workloads[name], dtype_name, device, repeats, peer_list, report)
    if not args.no_host:
        print(f"[{time.perf_counter() - start:6.1f} s] host cost ...", file=sys.stderr, flush=True)
        host_costs(report, args.smoke, 5 if args.smoke else 50)
    report.machine["seconds"] = time.perf_counter() - start

    print(markdown(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "markdown": markdown(report)}, indent=1))
    return report


if __name__ == "__main__":
    main()
