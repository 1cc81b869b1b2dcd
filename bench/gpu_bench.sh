#!/usr/bin/env bash
# One prepared GPU check (lent device machine): training throughput by data path at the real
# feature size (1024x80x80 fp16).  The recipe's steps: ROIS_PER_STEP=256 HIDDEN=128 (compare with 0 = one
# step per 64-image read, the earlier default).  Wheels the device image lacks go in .whl/ (see README).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for bs in ${BATCH_SIZES:-64}; do
  python3 bench/bench_train.py --synthetic 256 --channels 1024 --keep-store /tmp/bench_store --device cuda \
      --hidden ${HIDDEN:-256} --batch-size $bs --samples-per-roi 4 --steps 30 --workers 12 --modes ${MODES:-pinned,resident,memory,stream} \
      --rois-per-step ${ROIS_PER_STEP:-0} \
      2>&1 | grep -v "it/s\|img/s" | tee "$OUT/gpu_bench_train_bs$bs.txt"
done
# Validation speed at the real feature size (the vectorized evaluator; issue 10's "seconds on a GPU").
if [ "${EVAL:-1}" = "1" ]; then
  python3 bench/bench_eval.py --synthetic ${EVAL_IMAGES:-500} --channels 1024 --keep-store /tmp/bench_eval_store \
      --device cuda --threads 8 2>&1 | grep -v "it/s\|img/s\|INFO" | tee "$OUT/gpu_bench_eval.txt"
fi
# Exported decoder on the GPU (issue 12): CUDA provider, then TensorRT when its libraries load
# (the first TensorRT run builds engines: minutes; they are cached in cache/trt_engines).
if [ "${EXPORT:-1}" = "1" ]; then
  for p in cuda tensorrt; do
    python3 bench/bench_export.py --provider $p --end-to-end --half --repeat 10 2>&1 | grep -v "Warning\|^ " \
        | tee "$OUT/gpu_bench_export_$p.txt" || true
  done
fi
