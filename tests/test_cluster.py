"""Smoke test of benchmarks/cluster.py: 2 namespace nodes x 1 worker over a 100mbit tbf link, the tiny model,
3 steps, HSDP against two-level Distributed Lion, and the same on 3 nodes; then a run whose job fails and a run
stopped by SIGTERM, which must both leave no namespace behind. Skipped only where network namespaces cannot be made
(not root, no `ip`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cluster.py"
TINY_RUN = ["--workers-per-node", "1", "--models", "tiny", "--rates", "100mbit", "--seeds", "1", "--steps", "3"]
TINY_RUN += ["--layouts", "hsdp", "dlion"]
SMOKE = ["--nodes", "2", *TINY_RUN]
TIMEOUT = 300


def _why_no_namespaces() -> str | None:
    """None if a throwaway namespace can be made (and it is removed again), else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"ldctest{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` fails here (root needed): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=True)
    return None


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def namespaces_can_be_made() -> None:
    """Tried when the first test runs (not at collection, so a deselected module makes no namespace)."""
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(f"no network namespaces: {reason}")


def start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(pid: int) -> list[str]:
    """The namespaces of the benchmark process `pid` (named ldc<pid>-*) that still exist."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"ldc{pid}-")]


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (the jobs of a run name its --out)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.Popen, str, dict]:
    out = tmp_path_factory.mktemp("cluster")
    proc = start(out, *SMOKE)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"benchmarks/cluster.py failed ({proc.returncode}):\n{stderr[-5000:]}"
    return proc, stdout, json.loads((out / "cluster.json").read_text())


def test_smoke_numbers_and_link_bytes(smoke) -> None:
    proc, stdout, results = smoke
    assert not leftovers(proc.pid)
    runs = results["models"]["tiny"]["rates"]["100mbit"]
    (hsdp,), (dlion,) = runs["hsdp"], runs["dlion"]
    n = hsdp["n_params"]
    for run in (hsdp, dlion):
        assert math.isfinite(run["final_val_loss"]) and 0 < run["final_val_loss"] < 10
        assert math.isfinite(run["tokens_per_s"]) and run["tokens_per_s"] > 0
        # every replica ends with the same params (one hash per rank, both ranks hold the whole model)
        assert run["replicas_identical"] and len(set(run["param_sha256_per_rank"])) == 1
    # counted: HSDP all-reduces n fp32 gradients over 2 nodes (a ring sends 2 (N - 1) / N x 4 n = 4 n bytes);
    # two-level Distributed Lion all-gathers n sign bits (ceil(n / 8) bytes): 32x fewer
    assert hsdp["link_bytes_per_rank_per_step"] == 4 * n
    assert dlion["link_bytes_per_rank_per_step"] == math.ceil(n / 8)
    assert hsdp["link_bytes_per_rank_per_step"] / dlion["link_bytes_per_rank_per_step"] == pytest.approx(32, rel=1e-3)
    # the veth's own tx counter over the training steps: at least the counted bytes, plus protocol overhead
    # (TCP/IP headers, acks, the per-log loss all-reduce and barriers, gradient clipping's scalar all-reduces)
    for run in (hsdp, dlion):
        for counted, veth in zip(
            run["link_bytes_per_node_per_step"], run["veth_tx_bytes_per_node_per_step"], strict=True
        ):
            assert counted <= veth <= 1.25 * counted + 4096, (counted, veth)
    assert "| 100mbit | hsdp |" in stdout and "| 100mbit | dlion |" in stdout
    assert "100mbit here ~" in stdout and "between 8 x H100 nodes" in stdout
    eq = results["models"]["tiny"]["equivalence"]
    assert eq["worker_flops"] > 0


def test_three_nodes_vote_with_an_odd_number_of_replicas(tmp_path: Path) -> None:
    """3 nodes x 1 worker: HSDP's ring all-reduce sends 2 (N - 1) / N x 4 n bytes per rank, Distributed Lion's
    all-gather (N - 1) x ceil(n / 8); every replica ends with the same params (ties alternate with 3 voters)."""
    proc = start(tmp_path, "--nodes", "3", *TINY_RUN)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"benchmarks/cluster.py failed ({proc.returncode}):\n{stderr[-5000:]}"
    assert not leftovers(proc.pid)
    runs = json.loads((tmp_path / "cluster.json").read_text())["models"]["tiny"]["rates"]["100mbit"]
    (hsdp,), (dlion,) = runs["hsdp"], runs["dlion"]
    n = hsdp["n_params"]
    for run in (hsdp, dlion):
        assert run["replicas_identical"] and len(run["param_sha256_per_rank"]) == 3
        assert len(set(run["param_sha256_per_rank"])) == 1
    assert hsdp["link_bytes_per_rank_per_step"] == pytest.approx(2 * 2 / 3 * 4 * n, abs=2)
    assert dlion["link_bytes_per_rank_per_step"] == 2 * math.ceil(n / 8)


def test_a_failed_job_leaves_no_namespace(tmp_path: Path) -> None:
    """The job fails on purpose (--lr -1): the benchmark says so, exits non-zero and removes its namespaces."""
    proc = start(tmp_path, *SMOKE, "--job-args", "--lr", "-1")
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode not in (0, 77)
    assert "the job exited with" in stderr and "need --lr > 0" in stderr
    assert not leftovers(proc.pid)
    assert not processes_naming(str(tmp_path))


def test_sigterm_leaves_no_namespace_and_no_process(tmp_path: Path) -> None:
    """SIGTERM while the job runs: exit code 128 + 15, no namespace and no job process left."""
    proc = start(tmp_path, *SMOKE)
    log = tmp_path / "tiny" / "100mbit" / "hsdp" / "seed0" / "node1.log"
    deadline = time.monotonic() + 120
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and leftovers(proc.pid), "the job did not start"
    time.sleep(1)  # the workers are importing torch or rendezvousing
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not leftovers(proc.pid)
    assert not processes_naming(str(tmp_path))
