#!/usr/bin/env bash
# Generate a video per row of a prompt CSV (columns: prompt, optional filename, seed) with DiT-Mem.
# Resumable: videos already written are skipped. Beside each mp4: a JSON (retrieved memory,
# settings) and a contact-sheet PNG. Override variables from the environment, and any
# GenerationConfig key as trailing KEY=VALUE arguments:
#   CSV_FILE=data/inference.csv bash inference/generate_videos.sh k=3 memory_mode=cond
set -euo pipefail

CSV_FILE="${CSV_FILE:-data/inference.csv}"
OUT_DIR="${OUT_DIR:-outputs/inference}"
CONFIG="${CONFIG:-config/generate.yaml}"
BASE_MODEL="${BASE_MODEL:-model/Wan2.1-T2V-1.3B}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-checkpoint/DiT-Mem-1.3B.safetensors}"
RETRIEVAL_K="${RETRIEVAL_K:-5}"
NUM_INFERENCE_STEPS="${NUM_INFERENCE_STEPS:-40}"

exec dit-mem generate --csv "$CSV_FILE" --out "$OUT_DIR" --config "$CONFIG" \
  base_model="$BASE_MODEL" encoder="$CHECKPOINT_PATH" k="$RETRIEVAL_K" steps="$NUM_INFERENCE_STEPS" "$@"
