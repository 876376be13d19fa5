"""`python -m lion_dist.train`: one rank of the job; what `torchrun ... -m lion_dist.train` runs on each worker."""

import logging
import os
import sys

from lion_dist.train.cli import train_config
from lion_dist.train.loop import run_worker

run_worker(train_config(sys.argv[1:]))
# Every output is written and closed and the process group destroyed: leave without the interpreter's teardown.
# Under load, a gloo worker on CPU rarely aborted in it ("terminate called without an active exception", no Python
# frame left), and torchrun then reports the finished job as failed. A failed run raises above and exits as usual.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
