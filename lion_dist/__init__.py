"""lion_dist: the Lion optimizer for sharded, large-batch training (FSDP2, FSDP1, DeepSpeed ZeRO).

Each rank updates only its local shard with one fused pass over param, grad and momentum; the momentum is
the only optimizer state (AdamW keeps two buffers).
"""

from lion_dist.batch_guard import SmallBatchWarning, global_batch_size
from lion_dist.nonfinite import NonFiniteGradientError
from lion_dist.optimizer import Lion

__version__ = "0.1.0"

__all__ = ["Lion", "NonFiniteGradientError", "SmallBatchWarning", "__version__", "global_batch_size"]
