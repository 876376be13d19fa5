"""The main job: a small GPT-style character-level language model trained with FSDP2 and `lion_dist.Lion`.

`lion-dist train` launches it on local workers, `lion-dist compare` runs Lion against AdamW, and
`torchrun --nproc-per-node N -m lion_dist.train` runs it under a user's own launcher.
"""

from __future__ import annotations

import importlib.util

# What the job needs beyond the optimizer (the `train` extra); `pip install lion-dist` alone leaves them out.
TRAIN_PACKAGES = ("tqdm", "matplotlib")


def missing_train_packages() -> list[str]:
    """The packages of the `train` extra that are not installed (found without importing them)."""
    return [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]


def train_extra_message(what: str) -> str | None:
    """Why `what` cannot run here and how to fix it, or None when the `train` extra is installed."""
    missing = missing_train_packages()
    if not missing:
        return None
    return (
        f"{what} needs the packages of lion-dist's train extra, and {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'lion-dist[train]' "
        "(the optimizer itself needs none of them)"
    )
