"""The repo's benchmark scripts as modules, for the tests that run them end to end."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@functools.cache
def benchmark_script(stem: str) -> ModuleType:
    """`benchmarks/<stem>.py`, imported once as `benchmark_<stem>` and kept in `sys.modules` (dataclasses look
    their module up there)."""
    module_spec = importlib.util.spec_from_file_location(f"benchmark_{stem}", BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module
