#!/usr/bin/env bash
# Run a training script with the deepspeed launcher and a DeepSpeed JSON config.
#
#   launch/deepspeed.sh CONFIG.json SCRIPT.py [SCRIPT ARGS...]
#   launch/deepspeed.sh launch/ds_zero2.json examples/deepspeed_json.py --steps 100
#   HOSTFILE=hosts.txt launch/deepspeed.sh launch/ds_zero3.json examples/deepspeed_json.py   # multi-node
#
# The script gets --deepspeed_config CONFIG.json (and --local_rank from the launcher). Processes per node:
# NUM_GPUS if set, else every visible GPU, else 2 CPU processes (DS_ACCELERATOR=cpu; DeepSpeed then uses gloo,
# NCCL on GPUs). HOSTFILE: DeepSpeed's hostfile ("hostname slots=N" per line) for several nodes, with
# MASTER_ADDR. MASTER_PORT: the rendezvous port (29500). PYTHON: the interpreter (python).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG.json SCRIPT.py [SCRIPT ARGS...]" >&2
    exit 2
fi
config="$1"
script="$2"
shift 2
if [ ! -f "$config" ]; then
    echo "$0: DeepSpeed config $config does not exist (see launch/ds_zero*.json)" >&2
    exit 2
fi
PYTHON="${PYTHON:-python}"
launcher=("$PYTHON" -m deepspeed.launcher.runner --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR with HOSTFILE}")
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    [ -z "${NUM_GPUS:-}" ] || launcher+=(--num_gpus "$NUM_GPUS")
else
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    launcher+=(--num_gpus "${NUM_GPUS:-2}")
fi
exec "${launcher[@]}" "$script" --deepspeed_config "$config" "$@"
