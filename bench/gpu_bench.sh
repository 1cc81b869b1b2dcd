#!/usr/bin/env bash
# The one prepared GPU check, for the lent GPU machine: its image (Python 3.12, torch 2.11 CUDA 13,
# torchvision 0.26, numpy 2.x, onnxruntime 1.30 CPU build; no network) plus the wheels it lacks.
#
#   bash bench/gpu_bench.sh --prepare   # HERE: the Python 3.12 wheels the image lacks -> .whl/ (size printed)
#   bash bench/gpu_bench.sh             # THERE (carry .whl): install them into /tmp/site, run the checks
#   TIMINGS=0 bash bench/gpu_bench.sh   # correctness only
#
# 1. bench/gpu_checks.py --device cuda: AMP, bit-exact resume (deterministic), CPU -> CUDA resume with
#    AMP, the data paths, the fine path under AMP, 2-rank DDP, ONNX Runtime CUDA / TensorRT (SKIP,
#    with the reason, on the image's CPU-only onnxruntime).  One PASS/FAIL/SKIP line each, wall times.
# 2. Timings (unless TIMINGS=0): training throughput by data path at the real feature size (1024x80x80
#    fp16), the evaluator, and the exported decoder on CUDA / TensorRT when ONNX Runtime has them.
# Sized for one call of at most 8 minutes on an H100, the wheel install included (not yet run there).
set -euo pipefail
cd "$(dirname "$0")/.."

# the packages the GPU image lacks, at the versions the suite runs with (uv.lock; numcodecs: the
# newest below 0.16 with Python 3.12 wheels); zarr, asciitree, fasteners, deprecated are pure Python
WHEELS=(zarr==2.18.3 numcodecs==0.15.1 asciitree==1.0.0 fasteners==0.20 deprecated==1.3.1 pycocotools==2.0.11
        faster-coco-eval==1.8.0)
if [ "${1:-}" = "--prepare" ]; then
  PIP=${PIP:-python3 -m pip}
  rm -rf .whl && mkdir -p .whl
  plats=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plats+=(--platform "$p")
  done
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plats[@]}" \
      -d .whl "${WHEELS[@]}"
  n=$(ls .whl/*.whl | wc -l)
  bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  ls -l .whl/*.whl | awk '{print "  " $5 "  " $NF}'
  echo "prepared $n wheels in .whl/: $((bytes / 1024 / 1024)) MiB ($bytes bytes; the device carries at most 64 MiB)"
  [ "$n" = "${#WHEELS[@]}" ] && [ "$bytes" -le $((64 * 1024 * 1024)) ]
  exit
fi

t_start=$SECONDS
step() { echo "[gpu_bench $((SECONDS - t_start)) s] $*"; }
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  step "installed $(ls .whl/*.whl | wc -l) carried wheels"
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
python3 -c "import sys, torch, numpy, onnxruntime as o, zarr; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| numpy', numpy.__version__, '| zarr', zarr.__version__, '| ort', \
o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"

status=0
step "correctness checks"
python3 bench/gpu_checks.py --device cuda --work /tmp/gpu_checks --timeout 240 2>"$OUT/gpu_checks.log" \
    | tee "$OUT/gpu_checks.txt" || status=1
skips=$(grep -c "^SKIP" "$OUT/gpu_checks.txt" || true)

if [ "${TIMINGS:-1}" = "1" ]; then
  step "timings: training data paths"
  python3 bench/bench_train.py --synthetic ${TRAIN_IMAGES:-128} --channels 1024 --keep-store /tmp/bench_store \
      --device cuda --hidden ${HIDDEN:-256} --batch-size ${BATCH_SIZE:-64} --samples-per-roi 4 --steps 30 \
      --workers 12 --modes ${MODES:-pinned,resident,memory,stream} --rois-per-step ${ROIS_PER_STEP:-0} \
      2>&1 | grep -v "it/s\|img/s" | tee "$OUT/gpu_bench_train.txt" || status=1
  step "timings: evaluator"
  python3 bench/bench_eval.py --synthetic ${EVAL_IMAGES:-200} --channels 1024 --keep-store /tmp/bench_eval_store \
      --device cuda --threads 8 2>&1 | grep -v "it/s\|img/s\|INFO" | tee "$OUT/gpu_bench_eval.txt" || status=1
  for p in cuda tensorrt; do
    # the image's onnxruntime is a CPU build: an export timing it cannot run is a SKIP, not a failure
    ep=$([ $p = cuda ] && echo CUDAExecutionProvider || echo TensorrtExecutionProvider)
    if ! python3 -c "import onnxruntime as o, sys; sys.exit('$ep' not in o.get_available_providers())"; then
      echo "SKIP export_$p: this onnxruntime has no $ep" | tee "$OUT/gpu_bench_export_$p.txt"
      skips=$((skips + 1)); continue
    fi
    step "timings: exported decoder on $p"
    python3 bench/bench_export.py --provider $p --end-to-end --half --repeat 10 2>&1 | grep -v "Warning\|^ " \
        | tee "$OUT/gpu_bench_export_$p.txt" || status=1
  done
fi
step "done"
echo "gpu_bench: $([ $status = 0 ] && echo PASSED || echo FAILED) ($skips skipped: see the SKIP lines)"
exit $status
