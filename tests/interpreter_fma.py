"""Which Triton interpreters round `tl.fma` once, as the spec and the compiled kernels do.

The kernels compute each `x*a + y*b` of the spec with `tl.fma`, one rounding, so every backend agrees bit for bit.
Triton 3.6's interpreter (`create_fma` in `triton/runtime/interpreter.py`) computes `x * y + z` in numpy, which
rounds twice, so there the interpreter cases that compare a kernel with the reference bit for bit fail by an ulp;
3.9's computes a real fma (`_interpreter.fma_fp32`). The interpreter cases (`triton_cases.Cases.params`) skip
under an older triton, asserting nothing less where they run (3.7 and 3.8 were not checked: they skip too).
"""

from __future__ import annotations

import importlib.metadata
import re

import pytest

FIXED_IN = (3, 9)


def _triton_version() -> tuple[int, int] | None:
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


TRITON = _triton_version()
ROUNDS_FMA_ONCE = TRITON is None or TRITON >= FIXED_IN  # without triton the modules skip for that reason
needs_single_rounding_fma = pytest.mark.skipif(
    not ROUNDS_FMA_ONCE,
    reason=f"triton {'.'.join(map(str, TRITON or ()))}'s interpreter rounds tl.fma twice (x * y, then + z), so it "
    f"cannot match the reference's single-rounding fma bit for bit; needs triton >= {'.'.join(map(str, FIXED_IN))}",
)
