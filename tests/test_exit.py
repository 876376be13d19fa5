"""`lion-dist train` workers exit the normal way (issue 14): their exit handlers run, and no gloo thread is left.

The workers used to leave with `os._exit(0)`, skipping every exit handler of the process, to dodge a rare abort at
interpreter exit: a gloo worker thread still alive then takes the GIL to drop the tensors of a collective it has
just finished, and Python ends it in a way that calls std::terminate (`loop.close_process_groups`). A
`sitecustomize` on PYTHONPATH registers an exit handler in every torchrun worker of a tiny run; registered first,
it runs last, and writes the threads still alive then, just before finalization.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_train import TINY, run_cli

pytestmark = pytest.mark.slow

SITECUSTOMIZE = """
import atexit
import json
import os


def _name(task):
    try:
        with open(f"/proc/self/task/{task}/comm") as f:
            return f.read().strip()
    except OSError:  # the thread ended between the listing and the read: not alive at exit
        return None


def _report_threads():
    names = sorted(n for n in map(_name, os.listdir("/proc/self/task")) if n is not None)
    with open(os.path.join(os.environ["LION_DIST_EXIT_TEST"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(names, f)


if "LION_DIST_EXIT_TEST" in os.environ and "LOCAL_RANK" in os.environ and "RANK" in os.environ:
    atexit.register(_report_threads)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads' names from /proc (Linux)")
@pytest.mark.parametrize("mode", [[], ["--distributed-lion"]], ids=["fsdp2", "distributed-lion"])
def test_workers_run_exit_handlers_with_no_gloo_thread_left(
    mode: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, reports = tmp_path / "site", tmp_path / "reports"
    site.mkdir()
    reports.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(site), prepend=os.pathsep)
    monkeypatch.setenv("LION_DIST_EXIT_TEST", str(reports))

    short = ["--steps", "4", "--eval-interval", "4", "--ckpt-interval", "0"]  # the last of a repeated flag wins
    run_cli("train", "--out", str(tmp_path / "run"), *TINY, *short, *mode)  # exit code 0 on every worker, or raises

    threads = {path.stem: json.loads(path.read_text()) for path in reports.iterdir()}
    assert sorted(threads) == ["rank0", "rank1"], f"a worker skipped its exit handlers: {sorted(threads)}"
    for rank, names in threads.items():  # gloo's are "pt_gloo_runloop" (workers) and "gloo_tcp_loop" (I/O)
        assert not [n for n in names if "gloo" in n], f"{rank} still had gloo threads at exit: {names}"
