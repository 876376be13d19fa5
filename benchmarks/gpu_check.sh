#!/usr/bin/env bash
# The prepared GPU check, for a session that has a CUDA machine: one call, well inside 10 minutes.
#   CUDA-only tests (compiled Triton kernel vs the reference, FSDP2 on NCCL with one GPU, CPU offload on a CUDA mesh,
#   capturable steps captured in a CUDA graph and replayed), then the step benchmark: W1, W2 (GPT-2 small), W2u (one
#   unaligned view), W3, fp32 and bf16 (bf16 also with stochastic rounding), each with % of add and copy bandwidth.
# Writes logs and the benchmark JSON into ${OUT:-out/gpu}; paste the markdown it prints into benchmarks/RESULTS.md.
#
# It installs nothing: the lent GPU machine reaches no package registry. Its image has torch (2.11), triton (3.6),
# pytest, hypothesis, numpy, matplotlib, tqdm, transformers and accelerate, but not deepspeed, lion-pytorch or
# expecttest; lion_dist runs from this checkout (PYTHONPATH), the test modules that need a missing package skip
# it (pytest.importorskip), and the benchmark lists the peers it cannot import with the reason.
# Check it without a GPU, in a venv holding only those packages: GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh
# (collects the CUDA tests, which then skip for want of a GPU, and runs the benchmark's --smoke size).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    bench_size=(--smoke)
    echo "dry run: no GPU expected" | tee "$out/gpu.txt"
else
    bench_size=(--quick)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 300 python -m pytest -q -rs -m cuda tests/ 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 240 python benchmarks/step.py "${bench_size[@]}" --workloads W1,W2,W2u,W3 --json "$out/step_gpu.json" 2>&1 \
    | tee "$out/step_gpu.md"
bench_rc=${PIPESTATUS[0]}
echo "cuda tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $((tests_rc || bench_rc))
