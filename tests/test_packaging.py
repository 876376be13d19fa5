"""What `pip install lion-dist` needs: the optimizer alone imports none of the main job's packages (tqdm,
matplotlib: the `train` extra) nor deepspeed, and the job without the extra says how to install it.

Each check runs in a fresh interpreter, so what other tests imported does not count; a missing package is
simulated by `sys.modules[name] = None`, which makes `import name` fail as if it were not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB_PACKAGES = ("tqdm", "matplotlib")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


STEP = (
    "p = torch.nn.Parameter(torch.ones(4))\n"
    "opt = lion_dist.Lion([p], lr=0.1, global_batch_size=64)\n"
    "p.grad = torch.ones(4)\n"
    "opt.step()\n"
    "assert torch.equal(p.detach(), torch.full((4,), 0.9))\n"
)


@pytest.mark.slow
def test_the_optimizer_imports_and_steps_without_the_jobs_packages_or_deepspeed() -> None:
    """`import torch` itself imports tqdm where it is installed (torch.hub's progress bar), so this checks what
    lion_dist adds to it, and then that everything works with all three missing."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import lion_dist, lion_dist.deepspeed\n"
        f"{STEP}"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(added & {'tqdm', 'matplotlib', 'deepspeed'}), 'lion_dist' in added)\n"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] True"
    blocked = python(
        "import sys\n"
        "for name in ('tqdm', 'matplotlib', 'deepspeed'):\n"
        "    sys.modules[name] = None\n"
        f"import torch, lion_dist, lion_dist.deepspeed\n{STEP}"
    )
    assert blocked.returncode == 0, blocked.stderr


CLI = "from lion_dist.train.cli import main; sys.exit(main(['train', '--steps', '1']))"
WORKER = "import runpy; runpy.run_module('lion_dist.train', run_name='__main__')"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("missing", "entry", "what"),
    [
        (("tqdm",), CLI, "lion-dist train"),
        (("matplotlib",), WORKER, "python -m lion_dist.train"),
        (("tqdm", "matplotlib"), CLI, "lion-dist train"),
    ],
)
def test_the_job_without_the_train_extra_says_how_to_install_it(missing: tuple, entry: str, what: str) -> None:
    done = python(f"import sys\nfor name in {missing!r}:\n    sys.modules[name] = None\n{entry}\n")
    assert done.returncode == 1, done.stderr
    verb = "is" if len(missing) == 1 else "are"
    assert f"{what} needs the packages of lion-dist's train extra, and {', '.join(missing)} {verb} not" in done.stderr
    assert "pip install 'lion-dist[train]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_job_packages_are_an_extra_that_the_quick_start_installs() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names.isdisjoint(JOB_PACKAGES) and "deepspeed" not in names
    assert set(project["optional-dependencies"]["train"]) == set(JOB_PACKAGES)
    requirements = (ROOT / "requirements-cpu.txt").read_text().split()
    assert "-e" in requirements and ".[dev,train]" in requirements
