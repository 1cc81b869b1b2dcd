#!/usr/bin/env bash
# Mutation score of the core modules (geometry, rasterize, sparse, targets, decoders, losses, the
# evaluator, sampling, the LR schedule, checkpoint) with mutmut 3 and the fast tests that cover them
# ([tool.mutmut] in pyproject.toml).  Not part of CI: ~45 minutes on 2 cores.
#   uv sync --group mutation && bash bench/mutation.sh        # -> bench/out/mutation.txt
# It runs in a copy of the package and tests (mutmut writes its mutants/ next to them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MUTATION_WORK:-/tmp/roiseg-mutation}
rm -rf "$WORK" && mkdir -p "$WORK"
cp -r roiseg tests bench pyproject.toml "$WORK/"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK"
export ROISEG_TEST_DATA="$WORK/fixtures"     # the synthetic stores and checkpoint, built once for all mutants
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # one thread per mutant worker, ${JOBS:-2} workers
"$ROOT/.venv/bin/mutmut" run --max-children "${JOBS:-2}" > /dev/null 2>&1 || true
mkdir -p "$ROOT/bench/out"
"$ROOT/.venv/bin/python" "$ROOT/bench/mutation_score.py" "$WORK/mutants" | tee "$ROOT/bench/out/mutation.txt"
