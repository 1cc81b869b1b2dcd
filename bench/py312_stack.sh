#!/usr/bin/env bash
# The GPU machine's Python stack, on this machine: Python 3.12 with torch 2.11, torchvision 0.26,
# numpy 2.x, onnxruntime 1.30 (CPU build) and zarr 2.18, as the lent GPU image has them (plus the
# wheels bench/gpu_bench.sh --prepare carries there).  Runs the quick suite and the GPU checks in
# CPU mode, so code that only breaks on that stack breaks here first.  Not in CI: the venv takes
# ~5 GB of downloads (PyPI's torch 2.11 is a CUDA 13 build).
#
#     bash bench/py312_stack.sh            # make /tmp/py312-stack once, then run both
#     VENV=/path bash bench/py312_stack.sh  # another venv folder
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/py312-stack}
PY312=${PY312:-$(pyenv prefix 3.12 2>/dev/null)/bin/python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # the GPU image's versions (device tool's KINDS.md), then what it lacks at the versions gpu_bench.sh carries
  "$VENV/bin/pip" install -q "torch==2.11.*" "torchvision==0.26.*" "numpy>=2.5,<3" "onnxruntime==1.30.*" \
      "onnx>=1.17" click tqdm pyyaml pillow matplotlib tensorboard "opencv-python-headless" \
      pytest import-linter mkdocs-material mkdocs wrapt
  "$VENV/bin/pip" install -q --no-deps "zarr==2.18.3" "numcodecs==0.15.1" "asciitree==1.0.0" "fasteners==0.20" \
      "pycocotools==2.0.11" "faster-coco-eval==1.8.0" "deprecated==1.3.1"
fi
"$VENV/bin/python" -c "import sys, torch, torchvision, numpy, onnxruntime, zarr, numcodecs; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| numpy', numpy.__version__, '| onnxruntime', onnxruntime.__version__, '| zarr', zarr.__version__, \
'| numcodecs', numcodecs.__version__)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" || status=1
"$VENV/bin/python" bench/gpu_checks.py --device cpu --work /tmp/gpu_checks_py312 || status=1
echo "py312_stack: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
