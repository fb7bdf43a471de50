#!/usr/bin/env bash
# Generate PhyGenBench's 160 videos (seed 42) in PhyGenEval's layout:
#   RUN_DIR/phygenbench/PhyVideos/<model-name>/output_video_{1..160}.mp4
#   bash evaluation/phygenbench/generate.sh RUN_DIR [--model-name NAME] [generate options...]
# Example:
#   bash evaluation/phygenbench/generate.sh runs/mem --model-name dit-mem \
#       base_model=model/Wan2.1-T2V-1.3B encoder=checkpoint/dit-mem-1.3b index=memory_index tokens=tokens
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,8p' "$0"; exit 2
fi
RUN="$1"; shift
exec dit-mem eval phygenbench generate --run "$RUN" "$@"
