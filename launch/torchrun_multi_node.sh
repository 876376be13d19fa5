#!/usr/bin/env bash
# Run a training script on several machines with torchrun: start this once on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/torchrun_multi_node.sh SCRIPT.py [ARGS...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/torchrun_multi_node.sh SCRIPT.py [ARGS...]
#
# Required: NNODES (number of nodes), NODE_RANK (0..NNODES-1), MASTER_ADDR (the c10d rendezvous host, reachable
# from every node; node 0 by convention). Optional: MASTER_PORT (29500), RDZV_ID (a job id shared by the nodes,
# default lion_dist), NPROC_PER_NODE (default: one per visible GPU, else 2 CPU processes), PYTHON (python).
# The script picks the process-group backend: NCCL when CUDA is available, gloo on CPU (the examples do).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST [MASTER_PORT=P] $0 SCRIPT.py [SCRIPT ARGS...]" >&2
    exit 2
fi
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the rendezvous host every node can reach}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-lion_dist}"
PYTHON="${PYTHON:-python}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE=gpu
    else
        NPROC_PER_NODE=2
    fi
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    "$@"
