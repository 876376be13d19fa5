"""`python -m lion_dist.train`: one rank of the job; what `torchrun ... -m lion_dist.train` runs on each worker.

It exits the normal way, so the process's exit handlers (atexit, logging, profilers, experiment loggers) run:
`run_worker` frees the process groups and joins gloo's threads before it returns, which removed the rare abort at
interpreter exit of issue 14 (see `loop.close_process_groups`). A failed run raises and exits non-zero.
"""

import sys

from lion_dist.train import train_extra_message

if (missing := train_extra_message("python -m lion_dist.train")) is not None:
    sys.exit(missing)

from lion_dist.train.cli import train_config  # after the check: loop imports tqdm
from lion_dist.train.loop import run_worker

run_worker(train_config(sys.argv[1:]))
