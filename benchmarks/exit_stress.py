"""Stress the main job's exit: many short `torchrun -m lion_dist.train` runs under CPU load, any abort caught.

    python benchmarks/exit_stress.py --runs 100 --load 2            # 100 tiny runs beside 2 busy loops
    python benchmarks/exit_stress.py --runs 20 --widen              # the same, with the exit race widened
    python benchmarks/exit_stress.py --runs 4 --widen --old-teardown  # the job's teardown before the fix

Issue 14: a gloo worker on CPU rarely aborted at interpreter exit ("terminate called without an active
exception") after a finished run, and torchrun then reported the job as failed. Each run here is a complete tiny
job on 2 gloo workers (train, eval, final DCP checkpoint, a sample; every other run `--distributed-lion`, which
adds sub-groups), launched as `lion-dist train` launches it. Busy loops beside the runs widen the races.

`--widen` makes the race of issue 14 likely instead of rare, without changing torch or the job: an LD_PRELOAD
shim (built with `cc`) makes gloo's worker threads sleep 0..`--delay-ms` ms after they wake a finished work's
waiters, before they drop the work (the gap a loaded machine can leave them in), and each worker's first exit
handler (a `sitecustomize`, so it runs last) holds the GIL in C for a while right before finalization starts.
A gloo thread that is still alive then and drops Python tensors takes the GIL, is ended by `pthread_exit`, and
aborts the process.

Workers run with `PYTHONFAULTHANDLER=1` and core dumps on (a `core_pattern` of plain `core` puts the core in the
run's directory); `gdb -batch` writes the C++ stacks of each core next to it when gdb is installed. A run fails
when torchrun exits non-zero or a worker printed an abort; failed runs keep their logs, passing ones are deleted.
Run it under `nice -n 19` on a shared machine. Results: benchmarks/RESULTS.md, "Exit of the main job".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TINY = [
    *("--steps", "4", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32"),
    *("--micro-batch-size", "4", "--grad-accum", "1", "--eval-seqs", "8", "--eval-interval", "2"),
    *("--log-interval", "1", "--ckpt-interval", "0", "--samples", "1", "--sample-chars", "8", "--device", "cpu"),
]
ABORT_MARKS = ("terminate called", "Fatal Python error", "SIGABRT", "Signal 6", "core dumped")

GLOO_DELAY_C = r"""
/* LD_PRELOAD: a gloo worker thread sleeps 0..GLOO_DELAY_MS ms after each std::condition_variable::notify_all(),
   i.e. after it woke a finished work's waiters and before it drops the work. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void _ZNSt18condition_variable10notify_allEv(void *self) {
    static void (*real)(void *);
    static __thread unsigned seed;
    if (!real)
        real = (void (*)(void *))dlsym(dlopen("libstdc++.so.6", RTLD_LAZY), "_ZNSt18condition_variable10notify_allEv");
    real(self);
    char name[16] = "";
    pthread_getname_np(pthread_self(), name, sizeof name);
    const char *max = getenv("GLOO_DELAY_MS");
    if (max && strncmp(name, "pt_gloo", 7) == 0) {
        if (!seed) seed = (unsigned)time(NULL) ^ (unsigned)(size_t)&seed;
        long ms = rand_r(&seed) % (atol(max) + 1);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}
"""
OLD_TEARDOWN_WORKER = '''
"""The worker before issue 14's fix: run_worker's old teardown (destroy_process_group only), then a normal exit."""
import sys

import torch.distributed as dist

from lion_dist.train.cli import train_config
from lion_dist.train.loop import _Run, validate

cfg = train_config(sys.argv[1:])
validate(cfg)
dist.init_process_group("gloo")
try:
    _Run(cfg).run()
    dist.barrier()
finally:
    dist.destroy_process_group()
'''
HOLD_GIL_SITECUSTOMIZE = """
# exit_stress.py --widen, torchrun workers only: the first exit handler registered runs last, and `sum` over a
# range holds the GIL in C (no bytecode, so no hand-off to another thread) until just before finalization.
import atexit
import os

if "LOCAL_RANK" in os.environ and os.environ.get("HOLD_GIL_AT_EXIT"):
    atexit.register(sum, range(int(os.environ["HOLD_GIL_AT_EXIT"])))
"""


def _widen_env(root: Path, delay_ms: int, hold: int) -> dict[str, str]:
    """Build the delay shim and the GIL-holding sitecustomize under `root`; the environment that loads them."""
    source, shim, site = root / "gloo_delay.c", root / "gloo_delay.so", root / "site"
    source.write_text(GLOO_DELAY_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], check=True)
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HOLD_GIL_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"LD_PRELOAD": str(shim), "GLOO_DELAY_MS": str(delay_ms), "HOLD_GIL_AT_EXIT": str(hold), "PYTHONPATH": path}


def _cores_on() -> None:
    """In the launched torchrun (and so its workers): unlimited core size, so an abort leaves its stacks."""
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _backtraces(core: Path) -> None:
    """`thread apply all bt` of a core, written next to it (needs gdb)."""
    gdb = shutil.which("gdb")
    if gdb is not None:
        cmd = [gdb, "-q", "-batch", "-ex", "thread apply all bt 40", sys.executable, str(core)]
        bt = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        core.with_name(core.name + ".bt.txt").write_text(bt.stdout + bt.stderr)


def run_once(index: int, root: Path, worker: list[str], env: dict[str, str], timeout: float) -> dict:
    """One tiny 2-worker job (every other one `--distributed-lion`): its exit code, abort marks, cores, seconds."""
    run_dir = root / f"run_{index:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    flags = ["--out", str(run_dir / "out"), *TINY, *(["--distributed-lion"] if index % 2 else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *worker, *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=run_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_cores_on,
        start_new_session=True,  # its own process group: an interrupted stress run stops the job's workers too
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, rc = proc.communicate()[0], "timeout"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds = time.perf_counter() - start
    marks = [m for m in ABORT_MARKS if m in output]
    cores = sorted(run_dir.glob("core*"))
    failed = rc != 0 or bool(marks) or bool(cores)
    if failed:
        (run_dir / "output.txt").write_text(output)
        for core in cores:
            _backtraces(core)
    else:
        shutil.rmtree(run_dir)
    return {"run": index, "rc": rc, "marks": marks, "cores": [c.name for c in cores], "failed": failed, "s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="tiny jobs in all (default: 100)")
    parser.add_argument("--parallel", type=int, default=1, help="jobs running at the same time (default: 1)")
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes beside the jobs (default: 2)")
    parser.add_argument("--widen", action="store_true", help="delay gloo's threads and hold the GIL at exit")
    parser.add_argument("--delay-ms", type=int, default=300, help="--widen: longest gloo delay (default: 300)")
    parser.add_argument(
        "--hold", type=int, default=50_000_000, help="--widen: range summed at exit, GIL held (default: 5e7)"
    )
    parser.add_argument("--out", default="/tmp/lion_dist_exit_stress", help="where runs and failed logs go")
    parser.add_argument(
        "--old-teardown", action="store_true", help="workers with the teardown before the fix, for comparison"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job before it counts as hung")
    args = parser.parse_args()
    if args.runs < 1 or args.parallel < 1 or args.load < 0 or args.delay_ms < 0 or args.hold < 0:
        parser.error("--runs and --parallel must be >= 1; --load, --delay-ms and --hold >= 0")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    worker = ["-m", "lion_dist.train"]
    if args.old_teardown:
        (root / "old_teardown_worker.py").write_text(OLD_TEARDOWN_WORKER)
        worker = [str((root / "old_teardown_worker.py").resolve())]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1"}
    if args.widen:
        env.update(_widen_env(root, args.delay_ms, args.hold))
    loads = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    results: list[dict] = []
    start = time.perf_counter()
    pool = ThreadPoolExecutor(args.parallel)
    try:
        jobs = [pool.submit(run_once, i, root, worker, env, args.timeout) for i in range(args.runs)]
        for job in jobs:
            r = job.result()
            results.append(r)
            status = "FAILED " + json.dumps({k: r[k] for k in ("rc", "marks", "cores")}) if r["failed"] else "ok"
            print(f"run {r['run'] + 1}/{args.runs}: {status} ({r['s']:.1f} s)", flush=True)
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C: the running jobs finish, no new one starts
        for p in loads:
            p.kill()
            p.wait()
    failed = [r for r in results if r["failed"]]
    summary = {
        "runs": len(results),
        "failed": len(failed),
        "aborts": sum(1 for r in failed if r["marks"] or r["cores"]),
        "worker": " ".join(worker),
        "load": args.load,
        "parallel": args.parallel,
        "widen": {"delay_ms": args.delay_ms, "hold": args.hold} if args.widen else None,
        "median_s": sorted(r["s"] for r in results)[len(results) // 2],
        "wall_s": round(time.perf_counter() - start),
        "failed_runs": failed,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_runs"}))
    print(f"failed runs' logs, cores and stacks: {root}" if failed else "no failed run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
