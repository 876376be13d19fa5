"""Lion across nodes over real links: the main job on an emulated cluster of network namespaces (issue 25).

    python benchmarks/cluster.py --out runs/cluster       # as root: the grid below (needs a quiet machine)
    python benchmarks/cluster.py --out runs/smoke --models tiny --rates 100mbit --layouts hsdp dlion --steps 3 --seeds 1
    python benchmarks/cluster.py --cleanup                # remove namespaces left behind by a killed run

Each node is a Linux network namespace (`ip netns`) with one veth link to a switch, a bridge in a namespace of
its own; every link is shaped in both directions with `tc qdisc ... tbf rate R` (netem is not needed), so a node
can send and receive at most R. On each node `torchrun --nnodes K --node-rank k` runs `python -m lion_dist.train`
of this checkout, its R workers talking gloo over the node's link (GLOO_SOCKET_IFNAME; traffic between workers
of one node stays on its loopback). Layouts: fsdp (FSDP2 over all ranks), hsdp (`--replicate K`: a replica per
node), dlion (`--distributed-lion --replicate K`: FSDP2 inside a node, 1-bit sign votes across nodes), ddp
(`--ddp`). Every run of a model has the same global batch, steps and seed, so its validation loss is at equal
tokens; `--seeds N` repeats each with N seeds.

Reported per run: tokens/s (the job's, evaluation excluded), the bytes each rank sends over the inter-node link
per step as counted from its collectives (`lion_dist/train/comm.py`), the link's own tx counter over the
training steps (the job reads /sys/class/net/link0/statistics/tx_bytes: `--link-iface`), and the final
validation loss. Per rate, its *equivalence*: a CPU worker computes about a thousand times slower than a GPU, so
by FLOP per byte a link here looks far faster than the same link between GPU nodes. The worker's FLOP/s comes
from the fastest run's tokens/s x the model's FLOPs per token (6 x matmul params + 12 x layers x seq_len x
d_model, forward and backward); an 8 x H100 SXM node is assumed to reach --gpu-mfu of 8 x 989 dense bf16
TFLOP/s. Output: `cluster.md` (a table) and `cluster.json` in --out.

Safety: it creates only namespaces named `ldc<pid>-*` (its own pid) and addresses in 10.77.0.0/24 inside them,
never touches the root namespace's interfaces, and removes its namespaces (and stops the processes in them) on
every exit: normal end, exception, Ctrl-C, SIGTERM or SIGHUP. Where it cannot run (not root, no `ip netns`, no
`tc` or no tbf) it says why and exits with code 77.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXIT_CANNOT_RUN = 77
PREFIX_RE = re.compile(r"^ldc(\d+)-")
SUBNET = "10.77.0"
MASTER_PORT = 29500
LINK = "link0"  # every node's veth to the switch, inside the node's namespace
H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (1979 with 2:4 sparsity)
GPUS_PER_NODE = 8
LAYOUTS = {
    "fsdp": lambda nodes: [],
    "hsdp": lambda nodes: ["--replicate", str(nodes)],
    "dlion": lambda nodes: ["--distributed-lion", "--replicate", str(nodes)],
    "ddp": lambda nodes: ["--ddp"],
}
MODELS = {  # train flags on top of the job's defaults (micro batch 16 x accumulation 2 x world, seq_len 64)
    "tiny": ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--micro-batch-size", "4"],
    "default": [],
    "wide": ["--n-layer", "4", "--d-model", "256", "--n-head", "8"],
}


class CannotRun(Exception):
    """This machine cannot host the emulated cluster (the message says why)."""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (no shell), raising with its stderr when it fails and `check`."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def rate_bits(rate: str) -> float | None:
    """bits/s of a tc rate like 100mbit, 1gbit, 10gbit; None for "unshaped"."""
    if rate == "unshaped":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
    if not match:
        raise argparse.ArgumentTypeError(f"a rate is like 100mbit, 1gbit, 10gbit or 'unshaped', got {rate!r}")
    return float(match.group(1)) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match.group(2)]


def _rate_arg(rate: str) -> str:
    rate_bits(rate)
    return rate


# ---------------------------------------------------------------------------------------------- the cluster


class Cluster:
    """K node namespaces `<prefix>n<k>` (address 10.77.0.<k + 1> on `link0`) and a switch namespace `<prefix>sw`
    whose bridge joins their links. `down()` stops every process in them and deletes them; it is idempotent."""

    def __init__(self, nodes: int, prefix: str) -> None:
        self.nodes, self.prefix = nodes, prefix
        self.switch = f"{prefix}sw"
        self.node_ns = [f"{prefix}n{k}" for k in range(nodes)]
        self.rate = "unshaped"

    def up(self) -> None:
        for ns in (self.switch, *self.node_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for k, ns in enumerate(self.node_ns):  # created inside the namespaces: the root namespace never sees them
            sh("ip", "-n", ns, "link", "add", LINK, "type", "veth", "peer", "name", f"p{k}", "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", f"p{k}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{k + 1}/24", "dev", LINK)
            sh("ip", "-n", ns, "link", "set", LINK, "up")

    def shape(self, rate: str) -> None:
        """Every link at `rate` both ways (tbf on each node's egress and on the switch port towards it)."""
        bits = rate_bits(rate)
        for k, ns in enumerate(self.node_ns):
            for where, dev in ((ns, LINK), (self.switch, f"p{k}")):
                if bits is None:
                    sh("ip", "netns", "exec", where, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                    continue
                burst = max(64 * 1024, int(bits / 8 / 250))  # >= one GSO packet, and 4 ms at the rate
                tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
                sh("ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)
        self.rate = rate

    def down(self) -> None:
        with _signals_held():
            remove_namespaces(ns for ns in list_namespaces() if ns.startswith(self.prefix))

    def __enter__(self) -> Cluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def list_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_namespaces(names: Iterator[str] | list[str]) -> list[str]:
    """Stop the processes inside each namespace (SIGTERM, then SIGKILL after 10 s) and delete it."""
    names = list(names)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _pids_in(names)
        for pid in pids:
            _kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _pids_in(names)
        if not pids:
            break
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)
    return names


def _pids_in(names: list[str]) -> list[int]:
    pids = []
    for ns in names:
        out = sh("ip", "netns", "pids", ns, check=False).stdout
        pids += [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]
    return pids


def _kill(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block (the cleanup) is done."""
    caught = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in caught.items():
            signal.signal(s, handler)


def cleanup_leftovers() -> int:
    """`--cleanup`: remove namespaces of earlier runs of this script whose process is gone."""
    mine, alive = [], []
    for ns in list_namespaces():
        match = PREFIX_RE.match(ns)
        if not match:
            continue
        pid = int(match.group(1))
        owner = Path(f"/proc/{pid}/cmdline")
        running = pid != os.getpid() and owner.exists() and b"cluster.py" in owner.read_bytes()
        (alive if running else mine).append(ns)
    removed = remove_namespaces(mine)
    print(f"removed {len(removed)} namespace(s): {' '.join(removed) or '-'}")
    if alive:
        print(f"left {' '.join(alive)}: their benchmarks/cluster.py is still running")
    return 0


def check_can_run(prefix: str) -> None:
    """Raise CannotRun unless this machine can make namespaces with veth links shaped by tbf (tried for real)."""
    if os.geteuid() != 0:
        raise CannotRun("it must run as root (network namespaces, veth links and tc need CAP_NET_ADMIN)")
    for tool in ("ip", "tc"):
        if sh("sh", "-c", f"command -v {tool}", check=False).returncode:
            raise CannotRun(f"`{tool}` (iproute2) is not installed")
    probe = f"{prefix}probe"
    try:
        try:
            sh("ip", "netns", "add", probe)
        except RuntimeError as error:
            raise CannotRun(f"`ip netns add` fails here: {error}") from None
        try:
            sh("ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
            sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1gbit",
               "burst", "64kb", "latency", "50ms")  # fmt: skip
        except RuntimeError as error:
            raise CannotRun(f"no veth link or no tbf qdisc in a namespace: {error}") from None
    finally:
        if probe in list_namespaces():
            remove_namespaces([probe])


# ---------------------------------------------------------------------------------------------- running the job


def job_flags(args: argparse.Namespace, model: str, layout: str, seed: int, out: Path) -> list[str]:
    """The train flags of one run: the model preset, the layout, equal tokens everywhere, evaluation only at the
    start and end (so the link counter sees training steps only), one checkpoint at the end, no samples."""
    return [
        *MODELS[model],
        *LAYOUTS[layout](args.nodes),
        *("--steps", str(args.steps), "--seed", str(seed), "--eval-interval", str(args.steps)),
        *("--log-interval", str(max(1, args.steps // 4)), "--ckpt-interval", "0", "--keep-checkpoints", "1"),
        *("--samples", "0", "--device", "cpu", "--link-iface", LINK, "--out", str(out), "--overwrite"),
        *args.job_args,
    ]


def run_job(cluster: Cluster, args: argparse.Namespace, flags: list[str], out: Path) -> dict[str, Any]:
    """torchrun on every node of `cluster`; the job's summary.json. A failed or stuck node stops them all."""
    out.mkdir(parents=True, exist_ok=True)
    world = cluster.nodes * args.workers_per_node
    threads = max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": LINK, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    procs, logs = [], []
    try:
        for k, ns in enumerate(cluster.node_ns):
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cluster.nodes)]
            torchrun += ["--node-rank", str(k), "--nproc-per-node", str(args.workers_per_node)]
            torchrun += ["--master-addr", f"{SUBNET}.1", "--master-port", str(MASTER_PORT)]
            logs.append(open(out / f"node{k}.log", "w"))  # noqa: SIM115 (closed below)
            cmd = ["ip", "netns", "exec", ns, *torchrun, "--module", "lion_dist.train", *flags]
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, cwd=REPO))
        deadline = time.monotonic() + args.job_timeout
        while any(p.poll() is None for p in procs):
            failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        failed = [k for k, p in enumerate(procs) if p.returncode]  # still running (None): timed out
        if failed:
            node = failed[0]
            why = "timed out" if procs[node].returncode is None else f"exited with {procs[node].returncode}"
            raise RuntimeError(
                f"the job {why} on node {node}; the end of {out}/node{node}.log:\n{_tail(out / f'node{node}.log')}"
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # torchrun passes it on to its workers; Cluster.down() kills what is left
        for log in logs:
            log.close()
    return json.loads((out / "summary.json").read_text())


def _tail(path: Path, lines: int = 12) -> str:
    """A failed node's log, shortened: its exception lines (the root cause), then its last lines."""
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = list(
        dict.fromkeys(line for line in text if re.match(r"^(\[rank\d+\]: )?\w+(\.\w+)*(Error|Exception)\b", line))
    )
    return "\n".join([*errors[:5], "...", *text[-lines:]])


def run_record(summary: dict[str, Any], workers: int) -> dict[str, Any]:
    """The numbers the report needs from one job's summary.json (per rank: averaged over the ranks)."""
    comm, lay = summary["comm"], summary["layout"]
    tx = comm["link_tx_bytes_per_node_per_step"]
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "final_val_loss": summary["final_val_loss"],
        "n_params": summary["n_params"],
        "link_bytes_per_rank_per_step": statistics.fmean(comm["link_bytes_sent_per_rank_per_step"]),
        "link_bytes_per_node_per_step": comm["link_bytes_sent_per_node_per_step"],
        "veth_tx_bytes_per_node_per_step": tx,
        "veth_tx_bytes_per_rank_per_step": statistics.fmean(tx) / workers,
        "bytes_per_rank_per_step": statistics.fmean(comm["bytes_sent_per_rank_per_step"]),
        "replicas_identical": lay["replicas_identical"],
        "param_sha256_per_rank": lay["param_sha256_per_rank"],
        "layout_words": lay["words"],
    }


# ---------------------------------------------------------------------------------------------- the report


def flops_per_token(model: str, data: str | None) -> tuple[float, int]:
    """(training FLOPs per token, params) of a model preset: 6 x matmul params + 12 x layers x seq_len x d_model."""
    sys.path.insert(0, str(REPO))
    import torch

    from lion_dist.train.cli import train_config
    from lion_dist.train.data import load_corpus
    from lion_dist.train.model import GPT, GPTConfig

    cfg = train_config(MODELS[model])
    vocab = load_corpus(data, min_len=cfg.seq_len + 1).vocab_size
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model))
    matmul = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * cfg.n_layer * cfg.seq_len * cfg.d_model
    return 6 * matmul + attention, sum(p.numel() for p in gpt.parameters())


def equivalence(
    rates: list[str], worker_flops: float, workers_per_node: int, mfu: float, gpu_links: list[float]
) -> list[str]:
    """Per rate, the link between 8 x H100 nodes with the same bytes per FLOP; and what GPU links look like here."""
    node_here = worker_flops * workers_per_node
    node_gpu = GPUS_PER_NODE * H100_BF16_DENSE * mfu
    factor = node_gpu / node_here
    lines = [
        f"A worker here reached {worker_flops / 1e9:.2f} GFLOP/s, a node ({workers_per_node} worker"
        f"{'s' if workers_per_node > 1 else ''}) {node_here / 1e9:.2f} GFLOP/s; an {GPUS_PER_NODE} x H100 SXM "
        f"node at {mfu:.0%} of "
        f"{H100_BF16_DENSE / 1e12:.0f} dense bf16 TFLOP/s per GPU (an assumption) does {node_gpu / 1e15:.2f} "
        f"PFLOP/s, {factor:,.0f}x more. "
        "At equal bytes per FLOP:",
        "",
    ]
    for rate in rates:
        bits = rate_bits(rate)
        if bits is not None:
            lines.append(f"- {rate} here ~ {_bits_words(bits * factor)} between 8 x H100 nodes")
    for gbit in gpu_links:
        lines.append(f"- {gbit:g} Gbit/s between 8 x H100 nodes ~ {_bits_words(gbit * 1e9 / factor)} here")
    return lines


def _bits_words(bits: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:,.3g} {unit}"
    return f"{bits:.3g} bit/s"


def _mean_sd(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def report(results: dict[str, Any]) -> str:
    """The markdown report: one row per (model, rate, layout), seeds pooled; then each model's equivalence."""
    a = results["args"]
    lines = [
        "# Lion across emulated nodes (benchmarks/cluster.py)",
        "",
        f"`{results['command']}`: {a['nodes']} nodes x {a['workers_per_node']} worker(s), {a['steps']} steps, seeds "
        f"{', '.join(map(str, results['seeds']))}; {results['machine']}. Bytes are per rank per step over the "
        "inter-node link: counted from the collectives (ring model) and read from the node's veth tx counter "
        "(per node / workers per node; TCP/IP headers and acks included).",
        "",
    ]
    for model, per_model in results["models"].items():
        lines += [
            f"## model {model}: {per_model['n_params']:,} params, {per_model['flops_per_token'] / 1e6:,.2f} MFLOP "
            "per token",
            "",
            "| rate | layout | tokens/s | link bytes/rank/step (counted) | veth tx bytes/rank/step | veth / counted "
            "| final val loss | replicas identical |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for rate, per_rate in per_model["rates"].items():
            for layout, runs in per_rate.items():
                counted = statistics.fmean(r["link_bytes_per_rank_per_step"] for r in runs)
                veth = statistics.fmean(r["veth_tx_bytes_per_rank_per_step"] for r in runs)
                same = {r["replicas_identical"] for r in runs}
                cells = [
                    rate,
                    layout,
                    _mean_sd([r["tokens_per_s"] for r in runs], ",.0f"),
                    f"{counted:,.0f}",
                    f"{veth:,.0f}",
                    f"{veth / counted:.3f}" if counted else "n/a",
                    _mean_sd([r["final_val_loss"] for r in runs], ".4f"),
                    "n/a" if same == {None} else "yes" if same == {True} else "NO",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        eq = per_model["equivalence"]
        lines += ["", f"Equivalence (worker FLOP/s from {eq['from']}):", "", *eq["lines"], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", default="runs/cluster", help="output directory (default: runs/cluster)")
    add("--nodes", type=int, default=2, help="node namespaces K (default: 2)")
    add("--workers-per-node", type=int, default=1, help="torchrun workers per node R; K x R <= cores x 2 (default: 1)")
    add("--rates", nargs="+", type=_rate_arg, default=["100mbit", "1gbit", "10gbit", "unshaped"],
        help="link rates (tc tbf; 'unshaped' = the bare veth) (default: 100mbit 1gbit 10gbit unshaped)")  # fmt: skip
    add("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="default: all")
    add("--models", nargs="+", choices=list(MODELS), default=["default", "wide"], help="default: default wide")
    add("--seeds", type=int, default=2, help="seeds 0 .. N-1 per run (default: 2)")
    add("--steps", type=int, default=50, help="optimizer steps per run (default: 50)")
    add("--data", default=None, help="a UTF-8 text file for the job (default: its stdlib corpus)")
    add("--job-args", nargs=argparse.REMAINDER, default=[], help="more train flags, passed on (put it last)")
    add("--job-timeout", type=float, default=1800, help="seconds per job before it is stopped (default: 1800)")
    add("--gpu-mfu", type=float, default=0.4, help="the H100 node's assumed fraction of peak (default: 0.4)")
    add("--gpu-links", type=float, nargs="+", default=[100, 400], help="GPU links to translate, Gbit/s")
    add("--cleanup", action="store_true", help="only remove namespaces left by earlier (killed) runs, then exit")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.workers_per_node < 1 or args.seeds < 1 or args.steps < 1:
        parser.error("need --nodes >= 2, --workers-per-node >= 1, --seeds >= 1 and --steps >= 1")
    if args.nodes * args.workers_per_node > 2 * (os.cpu_count() or 1):
        parser.error(f"{args.nodes} x {args.workers_per_node} workers on {os.cpu_count()} cores: too many to measure")
    if args.data:
        args.job_args = ["--data", args.data, *args.job_args]
    return args


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that removes the namespaces


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cleanup:
        return cleanup_leftovers()
    prefix = f"ldc{os.getpid()}-"
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        check_can_run(prefix)
    except CannotRun as why:
        print(f"benchmarks/cluster.py cannot run here: {why}.", file=sys.stderr)
        return EXIT_CANNOT_RUN
    out = Path(args.out)
    seeds = list(range(args.seeds))
    results: dict[str, Any] = {
        "command": "python benchmarks/cluster.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "args": {k: v for k, v in vars(args).items() if k != "cleanup"},
        "seeds": seeds,
        "models": {},
    }
    try:
        with Cluster(args.nodes, prefix) as cluster:
            run_grid(cluster, args, results, out)
    except RuntimeError as error:  # a failed command or job: its message says which (the namespaces are gone)
        print(f"benchmarks/cluster.py: {error}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "cluster.md").write_text(text + "\n")
    print("\n" + text + f"\nwrote {out / 'cluster.md'} and {out / 'cluster.json'}", flush=True)
    return 0


def run_grid(cluster: Cluster, args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    """Every model x rate x layout x seed on `cluster`, into `results["models"]`."""
    seeds = results["seeds"]
    for model in args.models:
        fpt, n_params = flops_per_token(model, args.data)
        per_model: dict[str, Any] = {"flops_per_token": fpt, "n_params": n_params, "rates": {}}
        results["models"][model] = per_model
        for rate in args.rates:
            cluster.shape(rate)
            per_model["rates"][rate] = {}
            for layout in args.layouts:
                runs = per_model["rates"][rate][layout] = []
                for seed in seeds:
                    run_out = out / model / rate / layout / f"seed{seed}"
                    print(f"[{model} {rate} {layout} seed {seed}] -> {run_out}", flush=True)
                    summary = run_job(cluster, args, job_flags(args, model, layout, seed, run_out), run_out)
                    runs.append(run_record(summary, args.workers_per_node))
                    print(f"  {_run_line(runs[-1])}", flush=True)
                    (out / "cluster.json").write_text(json.dumps(results, indent=1))  # so far, if a later run fails
        per_model["equivalence"] = _equivalence(per_model, args)


def _run_line(r: dict[str, Any]) -> str:
    return (
        f"{r['tokens_per_s']:,.0f} tokens/s, link {r['link_bytes_per_rank_per_step']:,.0f} bytes/rank/step counted, "
        f"veth {r['veth_tx_bytes_per_rank_per_step']:,.0f}, val loss {r['final_val_loss']:.4f}"
    )


def _equivalence(per_model: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """From the fastest run: unshaped if there is one (the least held back by the link)."""
    pool = per_model["rates"].get("unshaped") or next(iter(per_model["rates"].values()))
    best_layout, best = max(
        ((layout, r) for layout, runs in pool.items() for r in runs), key=lambda lr: lr[1]["tokens_per_s"]
    )
    rate = "unshaped" if "unshaped" in per_model["rates"] else next(iter(per_model["rates"]))
    world = args.nodes * args.workers_per_node
    worker_flops = best["tokens_per_s"] * per_model["flops_per_token"] / world
    return {
        "from": f"the fastest run, {best_layout} at {rate}: {best['tokens_per_s']:,.0f} tokens/s over {world} workers",
        "worker_flops": worker_flops,
        "lines": equivalence(args.rates, worker_flops, args.workers_per_node, args.gpu_mfu, args.gpu_links),
    }


def _machine() -> str:
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return f"{os.cpu_count()} CPUs ({platform.machine()}), load {load:.1f} at start, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
