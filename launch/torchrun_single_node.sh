#!/usr/bin/env bash
# Run a training script on this machine with torchrun.
#
#   launch/torchrun_single_node.sh SCRIPT.py [SCRIPT ARGS...]
#   launch/torchrun_single_node.sh examples/fsdp2.py --steps 100
#   NPROC_PER_NODE=4 launch/torchrun_single_node.sh examples/fsdp1.py
#
# Processes: NPROC_PER_NODE if set, else one per visible GPU, else 2 CPU processes. The script picks the
# process-group backend: NCCL when CUDA is available, gloo on CPU (the examples do). PYTHON: the interpreter
# (default: python on PATH, e.g. your virtual environment's).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 SCRIPT.py [SCRIPT ARGS...]" >&2
    exit 2
fi
PYTHON="${PYTHON:-python}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE=gpu  # torchrun counts the visible GPUs
    else
        NPROC_PER_NODE=2
    fi
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" "$@"
