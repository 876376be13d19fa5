"""`python -m lion_dist.train`: one rank of the job; what `torchrun ... -m lion_dist.train` runs on each worker."""

import sys

from lion_dist.train.cli import train_config
from lion_dist.train.loop import run_worker

run_worker(train_config(sys.argv[1:]))
