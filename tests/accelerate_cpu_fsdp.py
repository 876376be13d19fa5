"""Run a script with Accelerate's FSDP path turned on for CPU processes, so the tests can shard on a CPU machine.

    torchrun --nproc-per-node 2 tests/accelerate_cpu_fsdp.py examples/accelerate_fsdp2.py --steps 5

Accelerate 1.x turns an `fsdp_plugin` into `DistributedType.FSDP` only for GPU-like devices (`AcceleratorState`:
MULTI_GPU, MULTI_XPU, ...); for CPU processes (MULTI_CPU) it drops the plugin and trains with DDP, silently. This
does for MULTI_CPU what Accelerate does on GPUs (sets FSDP and keeps the plugin, in its shared state and the
PartialState's), then runs the script; everything after that, `prepare`'s FSDP2 path included, is Accelerate's own.
A test shim only: users on GPUs need nothing of it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init(self: AcceleratorState, *args, fsdp_plugin=None, **kwargs) -> None:
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = _init
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
