#!/usr/bin/env bash
# Score one run's VBench videos with the vbench package and aggregate Quality/Semantic/Total.
#   bash evaluation/vbench/run_vbench_evaluation.sh RUN_DIR [dit-mem eval vbench score options...]
# Needs vbench's own virtualenv (bash evaluation/vbench/setup_env.sh) and a GPU.
# Environment:
#   VBENCH_ENV                    the venv (default ~/.venvs/dit-mem-vbench)
#   VBENCH_CACHE_DIR              where vbench keeps its model weights (default ~/.cache/vbench)
#   VBENCH_LOAD_CKPT_FROM_LOCAL=1 weights are already cached (offline machines)
# Also writes the offline temporal flickering (no static filter) next to vbench's results.
# Options: --full, --results-only, --allow-incomplete, --rerun, --folders LIST...
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
RUN="$1"; shift
FULL=()
for a in "$@"; do [[ "$a" == "--full" ]] && FULL=(--full); done
dit-mem eval vbench flicker --run "$RUN" "${FULL[@]}" || echo "temporal flickering (offline) skipped"
exec dit-mem eval vbench score --run "$RUN" "$@"
