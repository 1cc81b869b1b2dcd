#!/usr/bin/env bash
# The one prepared GPU check (a lent device machine, <= 10 minutes on one H200).
#   1. bench/gpu_checks.py: resume on CUDA (and CPU -> CUDA with AMP), a few hundred AMP steps without
#      NaN, 2-rank DDP on one GPU with the replica checksum, ORT CUDA vs CPU, TensorRT engines of two
#      same-graph models (each its own).  One PASS/FAIL/SKIP line each; any FAIL fails this script.
#   2. Timings: training throughput by data path at the real feature size (1024x80x80 fp16), the
#      evaluator, the exported decoder on CUDA / TensorRT.
# Wheels the device image lacks go in .whl/ (see README: zarr 2.18, numcodecs, pycocotools, ...).
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| ort', o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"

status=0
python3 bench/gpu_checks.py --work /tmp/gpu_checks 2>"$OUT/gpu_checks.log" | tee "$OUT/gpu_checks.txt" || status=1

if [ "${TIMINGS:-1}" = "1" ]; then
  for bs in ${BATCH_SIZES:-64}; do
    python3 bench/bench_train.py --synthetic 256 --channels 1024 --keep-store /tmp/bench_store --device cuda \
        --hidden ${HIDDEN:-256} --batch-size $bs --samples-per-roi 4 --steps 30 --workers 12 \
        --modes ${MODES:-pinned,resident,memory,stream} --rois-per-step ${ROIS_PER_STEP:-0} \
        2>&1 | grep -v "it/s\|img/s" | tee "$OUT/gpu_bench_train_bs$bs.txt" || status=1
  done
  python3 bench/bench_eval.py --synthetic ${EVAL_IMAGES:-500} --channels 1024 --keep-store /tmp/bench_eval_store \
      --device cuda --threads 8 2>&1 | grep -v "it/s\|img/s\|INFO" | tee "$OUT/gpu_bench_eval.txt" || status=1
  for p in cuda tensorrt; do   # TensorRT without its libraries says so and is skipped, not failed
    if [ "$p" = tensorrt ] && ! python3 -c "from featcache.providers import load_tensorrt; import sys; sys.exit(load_tensorrt() is not None)"; then
      echo "SKIP export_tensorrt: TensorRT libraries not loadable" | tee "$OUT/gpu_bench_export_$p.txt"; continue
    fi
    python3 bench/bench_export.py --provider $p --end-to-end --half --repeat 10 2>&1 | grep -v "Warning\|^ " \
        | tee "$OUT/gpu_bench_export_$p.txt" || status=1
  done
fi
echo "gpu_bench: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
