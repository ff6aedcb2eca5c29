#!/usr/bin/env bash
# The prepared GPU check: one command, under 8 minutes on an H100/H200, tables to ${OUT:-gpu_results}/.
#   1. pytest -m gpu (the kernels compiled by Triton for the real device, against the dense path);
#   2. forward and forward+backward at L = 4k and 16k, causal, low and high sparsity, against
#      jax.nn.dot_product_attention(implementation="cudnn") and JAX's Pallas softmax flash attention;
#   3. the cost model with the measured time beside each estimate (benchmarks/kernel_cost.py);
#   4. τ solver passes with and without the histogram start at L = 4096 (benchmarks/tau_passes.py).
# Each step has its own time limit, so one that hangs still leaves the others' tables.
#   bash benchmarks/gpu_check.sh            (from the repository root, on the GPU machine)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee "$out/device.txt"
timeout 150 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_pallas_attention.py 2>&1 | tee "$out/pytest_gpu.txt"
timeout 170 python3 benchmarks/attention_gpu.py --lengths 4096 16384 --causal yes --input-scales 1 4 --reps 5 \
    --skip entmax_dense 2>&1 | tee "$out/attention_gpu.txt"
timeout 120 python3 benchmarks/kernel_cost.py --lengths 4096 16384 --head-dims 64 2>&1 | tee "$out/kernel_cost.txt"
timeout 60 python3 benchmarks/tau_passes.py --length 4096 --alphas 1.5,2 --scales 1 2>&1 | tee "$out/tau_passes.txt"
echo "tables in $out/"
