#!/usr/bin/env bash
# Generate the VBench videos of one run (resumable: rerun to continue).
#   bash evaluation/vbench/generate.sh RUN_DIR [options] [KEY=VALUE ...]  (GenerationConfig keys, as for dit-mem generate)
# Examples:
#   bash evaluation/vbench/generate.sh runs/mem base_model=model/Wan2.1-T2V-1.3B \
#       encoder=checkpoint/dit-mem-1.3b index=memory_index tokens=tokens
#   bash evaluation/vbench/generate.sh runs/base --no-memory base_model=model/Wan2.1-T2V-1.3B
#   ... --full                      VBench's complete per-dimension lists (run/vbench_full/)
#   ... --prompt-filter cat --limit 5   a smoke test
# Several GPUs: one process per GPU with --shard i/N (CUDA_VISIBLE_DEVICES=i).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
RUN="$1"; shift
exec dit-mem eval vbench generate --run "$RUN" "$@"
