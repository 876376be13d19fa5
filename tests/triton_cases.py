"""Cases that run in a subprocess per Triton mode: the harness of the Triton test files.

Triton reads TRITON_INTERPRET when `triton` is first imported (its own library functions are jit-decorated then)
and when each kernel is decorated, so one process cannot hold both modes. A test file registers its cases with a
`Cases` (`@cases.case` for the interpreter, `@cases.compiled` for checks of the compiled kernel that need no GPU)
and defines `case_results = cases.fixture()` and one parametrized test per mode; the fixture runs the selected
cases of each mode in one subprocess (the interpreter's with TRITON_INTERPRET=1, the compiled ones without it,
whatever this process's environment says, each with a fresh Triton cache) and each test reports one case's outcome.
Nothing in the pytest process, and no other test module, ever sees interpreter mode. Keep tensors small: the
interpreter runs every program in numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.interpreter_fma import ROUNDS_FMA_ONCE, needs_single_rounding_fma

ROOT = Path(__file__).resolve().parent.parent
MODES = ("interpreter", "compiled")


class Cases:
    """The cases of one test module (`module`: its import name), by mode and name."""

    def __init__(self, module: str, prefix: str = "") -> None:
        self.module, self.prefix = module, prefix
        self.by_mode: dict[str, dict[str, Callable[[], None]]] = {mode: {} for mode in MODES}

    def case(self, fn: Callable[[], None] | None = None, name: str | None = None, mode: str = "interpreter"):
        """Register `fn` (as a decorator, or called with a lambda and a name)."""

        def register(f: Callable[[], None]) -> Callable[[], None]:
            self.by_mode[mode][name or f.__name__] = f
            return f

        return register if fn is None else register(fn)

    def compiled(self, fn: Callable[[], None]) -> Callable[[], None]:
        return self.case(fn, mode="compiled")

    def names(self, mode: str) -> list[str]:
        return list(self.by_mode[mode])

    def params(self, mode: str) -> list:
        """The cases of `mode` as pytest params: the interpreter's compare with the reference's single-rounding
        fma bit for bit, so they skip under a triton whose interpreter rounds it twice (`interpreter_fma.py`)."""
        if mode != "interpreter":
            return self.names(mode)
        return [pytest.param(name, marks=needs_single_rounding_fma) for name in self.names(mode)]

    def test_name(self, mode: str) -> str:
        return f"test_{self.prefix}{mode}_case"

    def run(self, mode: str, names: list[str]) -> None:
        """Subprocess entry: run the named cases, print {name: None or the traceback} as JSON on the last line."""
        import numpy as np

        torch.set_num_threads(1)
        results = {}
        for name in names:
            try:
                with np.errstate(invalid="ignore", divide="ignore"):  # the interpreter's 0 / 0 of all-zero blocks
                    self.by_mode[mode][name]()
                results[name] = None
            except (Exception, pytest.fail.Exception):  # pytest.raises' "DID NOT RAISE" is not an Exception
                results[name] = traceback.format_exc()
        print("\n" + json.dumps(results))

    def fixture(self, attribute: str = "CASES"):
        """A module-scoped fixture: {mode: {name: None or the traceback}} of the cases this session selected."""

        @pytest.fixture(scope="module")
        def case_results(
            request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, dict[str, str | None]]:
            results = {}
            for mode in MODES:
                test = self.test_name(mode)
                names = sorted(
                    {
                        it.callspec.params["name"]
                        for it in request.session.items
                        if getattr(it, "originalname", "") == test
                        and getattr(getattr(it, "module", None), "__name__", None) == self.module
                    }
                )
                if not names or (mode == "interpreter" and not ROUNDS_FMA_ONCE):
                    continue
                env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compiles from scratch
                code = f"from {self.module} import {attribute}; {attribute}.run({mode!r}, {names!r})"
                proc = subprocess.run(
                    [sys.executable, "-c", code],
                    cwd=ROOT,
                    env=env | {"TRITON_INTERPRET": "1"} if mode == "interpreter" else env,
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                lines = proc.stdout.strip().splitlines()
                if proc.returncode or not lines:
                    pytest.fail(f"the {mode} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")
                results[mode] = json.loads(lines[-1])
            return results

        return case_results


def report(results: dict[str, dict[str, str | None]], mode: str, name: str) -> None:
    """Fail with the case's traceback, if it failed."""
    if error := results[mode][name]:
        pytest.fail(error, pytrace=False)
