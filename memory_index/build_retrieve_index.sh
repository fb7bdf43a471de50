#!/usr/bin/env bash
# Build the caption index of the memory bank, then try one retrieval.
# Every variable can be overridden from the environment, e.g.
#   CSV=data/OpenVidHD_memory.csv MODEL=models/gte-base-en-v1.5 bash memory_index/build_retrieve_index.sh
set -euo pipefail

CSV="${CSV:-data/memory.csv}"              # OpenVid-style table: video (or video_path), caption, ...
OUT="${OUT:-memory_index}"                 # index folder (index.faiss, ids.parquet, manifest.json)
MODEL="${MODEL:-}"                         # sentence-transformers folder; empty = all-MiniLM-L6-v2
KIND="${KIND:-flat}"                       # flat (exact, paper) | ivf | hnsw
BATCH_SIZE="${BATCH_SIZE:-256}"
DEVICE="${DEVICE:-}"                       # cuda / cpu; empty = auto
OVERWRITE="${OVERWRITE:-0}"                # 1 = replace an existing index in OUT
PROMPT="${PROMPT:-A red fox running through fresh snow in a pine forest.}"
TOP_K="${TOP_K:-5}"

args=(--csv "$CSV" --out "$OUT" --kind "$KIND" --batch-size "$BATCH_SIZE")
[[ -n "$MODEL" ]] && args+=(--model "$MODEL")
[[ -n "$DEVICE" ]] && args+=(--device "$DEVICE")
[[ "$OVERWRITE" == 1 ]] && args+=(--overwrite)

dit-mem build-index "${args[@]}"
dit-mem retrieve "$PROMPT" -k "$TOP_K" --index "$OUT"
