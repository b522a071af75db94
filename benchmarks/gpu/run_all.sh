#!/usr/bin/env bash
# The GPU suite in one device call (issues 6 and 7). From the repository root, on a CUDA machine:
#
#     bash benchmarks/gpu/run_all.sh [kernels] [decode] [tests] [qlora]      (default: all four)
#
# kernels: benchmarks/gpu/bench_kernels.py -> $OUT/kernels-h200.{md,json}
# decode:  benchmarks/gpu/bench_decode.py  -> $OUT/decode-h200.{md,json}  (GEMV kernel, M = 1..16)
# tests:   pytest -m gpu tests/kernels tests/train -> $OUT/tests.log
# qlora:   benchmarks/gpu/qlora_step.py    -> $OUT/qlora-h200.{md,json}
# OUT defaults to benchmarks/results; QLORA_ARGS="--compile --graph" adds the torch.compile-per-block and whole-step CUDA graph variants. Needs torch with CUDA, triton, bitsandbytes, transformers, peft.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
parts=${*:-kernels decode tests qlora}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
for part in $parts; do
  case $part in
    kernels) timeout 200 python3 -m benchmarks.gpu.bench_kernels --out "$OUT" 2>&1 | tee "$OUT/kernels.log" ;;
    decode) timeout 170 python3 -m benchmarks.gpu.bench_decode --out "$OUT" 2>&1 | tee "$OUT/decode.log" ;;
    tests) timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/train 2>&1 | tee "$OUT/tests.log" ;;
    qlora) timeout ${QLORA_TIMEOUT:-250} python3 -m benchmarks.gpu.qlora_step --out "$OUT" $QLORA_ARGS 2>&1 | tee "$OUT/qlora.log" ;;
    *) echo "unknown part $part (kernels, decode, tests, qlora)"; exit 2 ;;
  esac
done
