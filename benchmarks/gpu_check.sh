#!/usr/bin/env bash
# The prepared GPU check, for a session that has a CUDA machine: one call, well inside 10 minutes.
#   CUDA-only tests (compiled Triton kernel vs the reference, FSDP2 on NCCL with one GPU, CPU offload on a CUDA mesh,
#   capturable steps captured in a CUDA graph and replayed), then the step benchmark: W1, W2 (GPT-2 small), W2u (one
#   unaligned view), W3, fp32 and bf16 (bf16 also with stochastic rounding), each with % of add and copy bandwidth.
# Writes logs and the benchmark JSON into ${OUT:-out/gpu}; paste the markdown it prints into benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pip install -q -e ".[dev]" 2>&1 | tail -2
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
timeout 300 python -m pytest -q -m cuda tests/ 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 240 python benchmarks/step.py --quick --workloads W1,W2,W2u,W3 --json "$out/step_gpu.json" 2>&1 | tee "$out/step_gpu.md"
bench_rc=${PIPESTATUS[0]}
echo "cuda tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $((tests_rc || bench_rc))
