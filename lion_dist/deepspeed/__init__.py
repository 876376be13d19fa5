"""DeepSpeed for `lion_dist.Lion`: the JSON entry `"optimizer": {"type": "LionDist", "params": {...}}` and
universal checkpoints.

DeepSpeed builds only its own optimizers from the JSON config (its `"Lion"` is CUDA-only, or `DeepSpeedCPULion`
under optimizer offload) and looks any other name up as an attribute of `torch.optim`. Three ways in, one
module each (the config checks they share are in `config`):

- `initialize(...)` (`initialization`), a drop-in for `deepspeed.initialize`: it reads the config, builds
  `lion_dist.Lion` from `"params"` for ZeRO stages 0-3 and optimizer offload, and declares DeepSpeed's
  `train_batch_size` to the batch guard once the engine exists.
- `register()` (`registration`), for code that calls `deepspeed.initialize` itself (the Hugging Face Trainer,
  Accelerate): it adds `torch.optim.LionDist` (the `LionDist` factory) and lists `Lion` as ZeRO-tested.
- `declare_partitions(engine)` (`partitions`): where each rank's ZeRO partition sits, for stochastic rounding's
  noise (`initialize` calls it; call it yourself after a `deepspeed.initialize` you make).
- `to_universal(...)` (`universal`): a ZeRO 1/2 checkpoint of Lion in DeepSpeed's universal format, to resume at
  another data-parallel world size.

`deepspeed` is imported only inside `initialize`, `register` and `to_universal`: `lion_dist` works without it.
"""

from lion_dist.deepspeed.config import OPTIMIZER_TYPE, lion_kwargs, load_config
from lion_dist.deepspeed.initialization import initialize
from lion_dist.deepspeed.partitions import declare_partitions
from lion_dist.deepspeed.registration import LionDist, register
from lion_dist.deepspeed.universal import to_universal

__all__ = [
    "OPTIMIZER_TYPE",
    "LionDist",
    "declare_partitions",
    "initialize",
    "lion_kwargs",
    "load_config",
    "register",
    "to_universal",
]
