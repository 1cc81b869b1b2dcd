#!/usr/bin/env bash
# Mutation score of the core modules (geometry, rasterize, sparse, target_sampling, models, losses,
# scoring, sampling, the LR schedule, checkpoint) with mutmut 3 and the fast tests that cover them
# ([tool.mutmut] in pyproject.toml).  Not part of CI: ~10-20 minutes on 2 cores.
#   uv sync --group mutation && bash bench/mutation.sh        # -> bench/out/mutation.txt
# mutmut names a mutant by its file path, and the code imports roiseg.*: it runs in a mirror of the
# checkout whose roiseg/ holds real files (the checkout's roiseg/ links to the folders).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MUTATION_WORK:-/tmp/roiseg-mutation}
rm -rf "$WORK" && mkdir -p "$WORK"
cp -rL roiseg "$WORK/" && cp -r tests pyproject.toml "$WORK/"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK"
export ROISEG_TEST_DATA="$WORK/fixtures"     # the synthetic stores and checkpoint, built once for all mutants
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # one thread per mutant worker, ${JOBS:-2} workers
"$ROOT/.venv/bin/mutmut" run --max-children "${JOBS:-2}" > /dev/null 2>&1 || true
mkdir -p "$ROOT/bench/out"
"$ROOT/.venv/bin/python" "$ROOT/bench/mutation_score.py" "$WORK/mutants" | tee "$ROOT/bench/out/mutation.txt"
